//! `qadapt.json`, the manifest `qadapt-export` writes next to the graphs, and the TensorRT
//! optimisation profiles derived from its shapes.

use serde::Deserialize;

/// The `format` of `qadapt.json` this runtime reads (the exporter writes it).
pub const FORMAT: u32 = 1;

/// The parts of `qadapt.json` the runtime reads.
#[derive(Debug, Clone, Deserialize)]
pub struct Manifest {
    /// Version of the layout; [`Manifest::parse`] refuses any other than [`FORMAT`].
    pub format: Option<u32>,
    #[serde(default)]
    /// `bunny-phi` or the Q-Adapt model type.
    pub model_type: String,
    /// Float type of the graphs: `f32` or `f16`.
    pub dtype: String,
    /// Graph file names.
    pub graphs: Graphs,
    /// Preprocessing.
    pub image: ImageSpec,
    /// Decoder shapes.
    pub decoder: DecoderSpec,
    /// Token ids.
    pub tokens: TokenSpec,
    /// Present for Q-Adapt exports.
    pub qformer: Option<QFormerSpec>,
}

/// Graph file names.
#[derive(Debug, Clone, Deserialize)]
pub struct Graphs {
    /// Pixels (and Q-Former ids) → image features.
    pub vision: String,
    /// Token ids → embeddings.
    pub embed: String,
    /// One decoder step with KV cache.
    pub decoder: String,
    /// Two KV caches → one (exports since 2026-11-26; without it a running batch admits nothing).
    #[serde(default)]
    pub cache_join: Option<String>,
    /// The rows of a KV cache that go on (without it, finished rows idle until the batch ends).
    #[serde(default)]
    pub cache_select: Option<String>,
}

/// Preprocessing and the number of image tokens.
#[derive(Debug, Clone, Deserialize)]
pub struct ImageSpec {
    /// Side of the square the image is resized to.
    pub size: u32,
    /// Per-channel normalisation mean (also the padding colour).
    pub mean: [f32; 3],
    /// Per-channel normalisation standard deviation.
    pub std: [f32; 3],
    /// Feature rows one image adds to the prompt.
    pub tokens: usize,
}

/// Decoder shapes.
#[derive(Debug, Clone, Deserialize)]
pub struct DecoderSpec {
    /// Decoder layers (each with a cached key and value).
    pub layers: usize,
    /// Attention heads.
    pub heads: usize,
    /// Size of one head.
    pub head_dim: usize,
    /// Embedding width.
    pub hidden_size: usize,
    /// Logits per position (padded vocabulary).
    pub vocab_size: usize,
    /// Longest sequence, prompt and answer together.
    pub max_positions: usize,
}

/// Special and level-word token ids.
#[derive(Debug, Clone, Deserialize)]
pub struct TokenSpec {
    /// `<|endoftext|>`: generation stops there.
    pub eos: u32,
    /// First tokens of " excellent", " good", " fair", " poor", " bad".
    pub levels: [u32; 5],
}

/// Present for Q-Adapt exports.
#[derive(Debug, Clone, Deserialize)]
pub struct QFormerSpec {
    /// Longest Q-Former text (tokens).
    pub max_text_length: usize,
}

impl Manifest {
    /// Parses and validates `qadapt.json` text: an error names the field at fault, so a damaged
    /// export is refused when opened instead of failing (or panicking) mid-request.
    pub fn parse(text: &str) -> Result<Self, String> {
        let m: Manifest = crate::from_json(text.as_bytes()).map_err(|(_, msg)| msg)?;
        m.validate()?;
        Ok(m)
    }

    /// Range checks of every size and id the runtime indexes with.
    pub fn validate(&self) -> Result<(), String> {
        let fail = |field: &str, msg: String| Err(format!("{field}: {msg}"));
        match self.format {
            Some(FORMAT) => {}
            Some(f) if f > FORMAT => return fail("format", format!("{f} is newer than this runtime reads ({FORMAT}); update qadapt-run")),
            Some(f) => return fail("format", format!("{f} is older than this runtime reads ({FORMAT}); re-export the model")),
            None => return fail("format", "missing (not written by qadapt-export?)".into()),
        }
        if self.dtype != "f32" && self.dtype != "f16" {
            return fail("dtype", format!("{:?} is not f32 or f16", self.dtype));
        }
        let g = &self.graphs;
        for (field, name) in [("graphs.vision", Some(&g.vision)), ("graphs.embed", Some(&g.embed)), ("graphs.decoder", Some(&g.decoder)), ("graphs.cache_join", g.cache_join.as_ref()), ("graphs.cache_select", g.cache_select.as_ref())] {
            // Graphs are files of the export directory itself, never a path out of it.
            if let Some(n) = name.filter(|n| n.is_empty() || n.contains(['/', '\\']) || n.starts_with('.')) {
                return fail(field, format!("{n:?} is not a file name in the export directory"));
            }
        }
        let i = &self.image;
        if !(1..=8192).contains(&i.size) {
            return fail("image.size", format!("{} is not between 1 and 8192", i.size));
        }
        if i.mean.iter().any(|m| !(0.0..=1.0).contains(m)) {
            return fail("image.mean", format!("{:?} is not within [0, 1]", i.mean));
        }
        if i.std.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
            return fail("image.std", format!("{:?} must be positive", i.std));
        }
        let d = &self.decoder;
        for (field, v) in [("decoder.layers", d.layers), ("decoder.heads", d.heads), ("decoder.head_dim", d.head_dim), ("decoder.hidden_size", d.hidden_size), ("decoder.vocab_size", d.vocab_size)] {
            if !(1..=1 << 20).contains(&v) {
                return fail(field, format!("{v} is not between 1 and {}", 1 << 20));
            }
        }
        if i.tokens == 0 || i.tokens >= d.max_positions {
            return fail("image.tokens", format!("{} image tokens do not fit decoder.max_positions {}", i.tokens, d.max_positions));
        }
        if d.max_positions > 1 << 20 {
            return fail("decoder.max_positions", format!("{} is over {}", d.max_positions, 1 << 20));
        }
        let v = d.vocab_size;
        if self.tokens.eos as usize >= v {
            return fail("tokens.eos", format!("{} is outside the vocabulary of {v}", self.tokens.eos));
        }
        if let Some(l) = self.tokens.levels.iter().find(|&&l| l as usize >= v) {
            return fail("tokens.levels", format!("{l} is outside the vocabulary of {v}"));
        }
        if let Some(q) = &self.qformer {
            if !(1..=8192).contains(&q.max_text_length) {
                return fail("qformer.max_text_length", format!("{} is not between 1 and 8192", q.max_text_length));
            }
        }
        Ok(())
    }
}

/// TensorRT optimisation profiles of one graph: `(min, opt, max)` shapes in the provider's
/// `name:AxBxC,…` syntax. TensorRT builds one engine per profile; the shapes cover batch 1 to
/// `max_batch` and every sequence the decoder's positions allow, with the optimum at the common
/// case (one image, one new token after a prompt of about the image's length).
pub fn trt_profiles(m: &Manifest, graph: &str, max_batch: usize) -> Option<(String, String, String)> {
    let d = &m.decoder;
    let (b, p) = (max_batch.max(1), d.max_positions);
    let join = |v: Vec<String>| v.join(",");
    let dims = |name: &str, shapes: [[usize; 4]; 3], rank: usize| -> [String; 3] {
        shapes.map(|s| format!("{name}:{}", s[..rank].iter().map(|x| x.to_string()).collect::<Vec<_>>().join("x")))
    };
    let mut parts: Vec<[String; 3]> = Vec::new();
    if graph == m.graphs.decoder {
        let typical = (m.image.tokens + 64).min(p - 1);
        parts.push(dims("inputs_embeds", [[1, 1, d.hidden_size, 0], [1, 1, d.hidden_size, 0], [b, p, d.hidden_size, 0]], 3));
        parts.push(dims("attention_mask", [[1, 1, 0, 0], [1, typical + 1, 0, 0], [b, p, 0, 0]], 2));
        parts.push(dims("position_ids", [[1, 1, 0, 0], [1, 1, 0, 0], [b, p, 0, 0]], 2));
        for i in 0..d.layers {
            for kv in ["key", "value"] {
                parts.push(dims(&format!("past_key_values.{i}.{kv}"), [[1, d.heads, 0, d.head_dim], [1, d.heads, typical, d.head_dim], [b, d.heads, p - 1, d.head_dim]], 4));
            }
        }
    } else if graph == m.graphs.vision {
        let s = m.image.size as usize;
        parts.push(dims("pixel_values", [[1, 3, s, s], [1, 3, s, s], [b, 3, s, s]], 4));
        if let Some(q) = &m.qformer {
            for name in ["qformer_input_ids", "qformer_attention_mask"] {
                parts.push(dims(name, [[1, 1, 0, 0], [1, q.max_text_length.min(32), 0, 0], [b, q.max_text_length, 0, 0]], 2));
            }
        }
    } else if graph == m.graphs.embed {
        parts.push(dims("input_ids", [[1, 1, 0, 0], [1, 1, 0, 0], [b, p, 0, 0]], 2));
    } else {
        return None;
    }
    let pick = |k: usize| join(parts.iter().map(|x| x[k].clone()).collect());
    Some((pick(0), pick(1), pick(2)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> Manifest {
        serde_json::from_value(serde_json::json!({
            "format": 1,
            "dtype": "f16",
            "graphs": {"vision": "vision.onnx", "embed": "embed.onnx", "decoder": "decoder.onnx"},
            "image": {"size": 384, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "tokens": 729},
            "decoder": {"layers": 2, "heads": 32, "head_dim": 80, "hidden_size": 2560, "vocab_size": 51200, "max_positions": 2048},
            "tokens": {"eos": 50256, "levels": [1, 2, 3, 4, 5]},
            "qformer": {"max_text_length": 256}
        }))
        .expect("manifest")
    }

    #[test]
    fn damaged_manifests_name_the_field() {
        let good = serde_json::json!({
            "format": 1, "dtype": "f16",
            "graphs": {"vision": "vision.onnx", "embed": "embed.onnx", "decoder": "decoder.onnx"},
            "image": {"size": 384, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "tokens": 729},
            "decoder": {"layers": 2, "heads": 32, "head_dim": 80, "hidden_size": 2560, "vocab_size": 51200, "max_positions": 2048},
            "tokens": {"eos": 50256, "levels": [1, 2, 3, 4, 5]},
        });
        assert!(Manifest::parse(&good.to_string()).is_ok());
        let cases: [(&str, serde_json::Value, &str); 9] = [
            ("/image/size", 0.into(), "image.size: 0"),
            ("/format", 2.into(), "format: 2 is newer"),
            ("/format", 0.into(), "format: 0 is older"),
            ("/decoder/layers", "two".into(), "decoder.layers: invalid type"),
            ("/tokens/eos", 60000.into(), "tokens.eos: 60000"),
            ("/graphs/decoder", "../../etc/passwd".into(), "graphs.decoder"),
            ("/image/tokens", 4096.into(), "image.tokens"),
            ("/decoder/heads", 0.into(), "decoder.heads: 0"),
            ("/image/std", serde_json::json!([0.5, 0.0, 0.5]), "image.std"),
        ];
        for (ptr, v, want) in cases {
            let mut m = good.clone();
            *m.pointer_mut(ptr).unwrap() = v;
            let e = Manifest::parse(&m.to_string()).unwrap_err();
            assert!(e.starts_with(want), "{ptr}: {e}");
        }
        assert!(Manifest::parse("{").unwrap_err().contains("EOF"));
    }

    #[test]
    fn profiles_cover_every_input_of_each_graph() {
        let m = manifest();
        let (min, opt, max) = trt_profiles(&m, "decoder.onnx", 8).expect("decoder");
        assert!(min.starts_with("inputs_embeds:1x1x2560,attention_mask:1x1,position_ids:1x1,past_key_values.0.key:1x32x0x80,"), "{min}");
        assert!(opt.contains("attention_mask:1x794,") && opt.contains("past_key_values.1.value:1x32x793x80"), "{opt}");
        assert!(max.contains("inputs_embeds:8x2048x2560") && max.ends_with("past_key_values.1.value:8x32x2047x80"), "{max}");
        assert_eq!(min.split(',').count(), 3 + 2 * 2);
        let (min, _, max) = trt_profiles(&m, "vision.onnx", 4).expect("vision");
        assert_eq!(min, "pixel_values:1x3x384x384,qformer_input_ids:1x1,qformer_attention_mask:1x1");
        assert_eq!(max, "pixel_values:4x3x384x384,qformer_input_ids:4x256,qformer_attention_mask:4x256");
        assert!(trt_profiles(&m, "other.onnx", 1).is_none());
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 2000, failure_persistence: None, ..Default::default() })]

        /// A manifest with any of its fields replaced by any JSON, or cut short: parsed (and then
        /// every index the runtime takes from it is in range) or refused with a message.
        #[test]
        fn damaged_manifests_never_panic(m in crate::testing::mutated(
            serde_json::to_value(serde_json::json!({
                "format": 1, "dtype": "f16",
                "graphs": {"vision": "vision.onnx", "embed": "embed.onnx", "decoder": "decoder.onnx"},
                "image": {"size": 384, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "tokens": 729},
                "decoder": {"layers": 2, "heads": 32, "head_dim": 80, "hidden_size": 2560, "vocab_size": 51200, "max_positions": 2048},
                "tokens": {"eos": 50256, "levels": [1, 2, 3, 4, 5]},
                "qformer": {"max_text_length": 256}
            })).unwrap_or_default(),
            &["/format", "/dtype", "/graphs", "/graphs/decoder", "/image", "/image/size", "/image/mean", "/image/mean/1", "/image/std/0", "/image/tokens", "/decoder/layers", "/decoder/vocab_size", "/decoder/max_positions", "/tokens/eos", "/tokens/levels", "/tokens/levels/4", "/qformer", "/qformer/max_text_length"],
        ), cut in 0usize..400) {
            let text = m.to_string();
            let mut c = cut.min(text.len());
            while !text.is_char_boundary(c) {
                c -= 1;
            }
            for t in [text.as_str(), &text[..c]] {
                match Manifest::parse(t) {
                    Ok(p) => {
                        proptest::prop_assert!(p.image.size >= 1 && p.image.tokens < p.decoder.max_positions);
                        proptest::prop_assert!((p.tokens.eos as usize) < p.decoder.vocab_size);
                        proptest::prop_assert!(p.tokens.levels.iter().all(|&l| (l as usize) < p.decoder.vocab_size));
                    }
                    Err(e) => proptest::prop_assert!(!e.is_empty()),
                }
            }
        }
    }
}

