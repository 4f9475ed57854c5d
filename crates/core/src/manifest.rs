//! `qadapt.json`: what `qadapt-export` writes next to the graphs and every runtime reads — one
//! type for both sides (serialized by the exporter, parsed and validated by the runtime), so the
//! two cannot drift. A damaged or foreign manifest is refused with the field at fault named.

use serde::{Deserialize, Serialize};

/// The `format` of `qadapt.json` this runtime reads (the exporter writes it).
pub const FORMAT: u32 = 1;

/// `qadapt.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Version of the layout; [`Manifest::parse`] refuses any other than [`FORMAT`].
    pub format: Option<u32>,
    /// `bunny-phi` or the Q-Adapt model type.
    #[serde(default)]
    pub model_type: String,
    /// Float type of the graphs: `f32` or `f16`.
    pub dtype: String,
    /// ONNX opset of the graphs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub opset: Option<u32>,
    /// Graph file names.
    pub graphs: Graphs,
    /// Preprocessing.
    pub image: ImageSpec,
    /// Decoder shapes.
    pub decoder: DecoderSpec,
    /// Token ids.
    pub tokens: TokenSpec,
    /// The conversation template the model was trained with (checked against this build's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<TemplateSpec>,
    /// Present for Q-Adapt exports.
    pub qformer: Option<QFormerSpec>,
    /// The model directory the export was made from (informational).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// Which graph variant the directory holds: `standard` (standard ONNX ops, a KV cache that
    /// grows by concatenation; absent in exports before 2026-12-03) or `fused` (ONNX Runtime's
    /// contrib ops, each row's cache in its own slot of one buffer of `decoder.max_positions`
    /// that a step writes in place).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    /// Weight-only quantization of the linears (`MatMulNBits`), when the export has it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantization: Option<QuantSpec>,
}

/// How an export's linears were quantized (`qadapt-export --quantize`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuantSpec {
    /// 4 or 8.
    pub bits: u8,
    /// Weights per scale along the input dimension.
    pub block_size: usize,
    /// `MatMulNBits`' accuracy level (4: int8 activations on CPU).
    pub accuracy_level: u8,
    /// Scales only, the default zero point.
    pub symmetric: bool,
    /// Whether `lm_head` is quantized.
    pub lm_head: bool,
    /// Whether the vision graph's linears are quantized.
    pub vision: bool,
}

/// The prompt template and scoring words of an export.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TemplateSpec {
    /// The system line.
    pub system: String,
    /// The image placeholder of user turns.
    pub image_token: String,
    /// The Q-Align question.
    pub score_question: String,
    /// What the scored answer begins with.
    pub score_answer_prefix: String,
    /// The level words and their scores, best first.
    pub levels: Vec<LevelSpec>,
}

/// One Q-Align level.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LevelSpec {
    /// The word (" excellent" without its space).
    pub word: String,
    /// Its score (5 … 1).
    pub score: f32,
}

impl TemplateSpec {
    /// The template this build renders prompts with (`crate::template`, `crate::sampling::LEVELS`).
    pub fn current() -> Self {
        Self {
            system: crate::template::SYSTEM.into(),
            image_token: crate::template::IMAGE_TOKEN.into(),
            score_question: crate::template::SCORE_QUESTION.into(),
            score_answer_prefix: crate::template::SCORE_ANSWER_PREFIX.into(),
            levels: crate::sampling::LEVELS.iter().map(|(w, s)| LevelSpec { word: (*w).into(), score: *s }).collect(),
        }
    }
}

/// Graph file names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageSpec {
    /// Side of the square the image is resized to.
    pub size: u32,
    /// Per-channel normalisation mean (also the padding colour).
    pub mean: [f32; 3],
    /// Per-channel normalisation standard deviation.
    pub std: [f32; 3],
    /// Bunny's `image_aspect_ratio` (`pad`: expanded to a square first).
    #[serde(default = "pad")]
    pub aspect_ratio: String,
    /// Feature rows one image adds to the prompt.
    pub tokens: usize,
}

/// Decoder shapes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
    /// Last dim of the cache when it differs from `head_dim`: fused exports pad heads to a
    /// multiple of 8 (what `GroupQueryAttention` takes) with zeros.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_head_dim: Option<usize>,
}

impl DecoderSpec {
    /// Last dim of each cached key and value.
    pub fn cache_head_dim(&self) -> usize {
        self.cache_head_dim.unwrap_or(self.head_dim)
    }
}

impl Manifest {
    /// Whether the graphs are the `fused` variant.
    pub fn fused(&self) -> bool {
        self.variant.as_deref() == Some("fused")
    }
}

/// Special and level-word token ids.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenSpec {
    /// Beginning of text (phi-2: `<|endoftext|>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bos: Option<u32>,
    /// `<|endoftext|>`: generation stops there.
    pub eos: u32,
    /// Padding id, when the config names one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pad: Option<u32>,
    /// First tokens of " excellent", " good", " fair", " poor", " bad".
    pub levels: [u32; 5],
}

/// Present for Q-Adapt exports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QFormerSpec {
    /// Directory of the Q-Former's tokenizer inside the export.
    #[serde(default = "qformer_dir")]
    pub tokenizer: String,
    /// Longest Q-Former text (tokens).
    pub max_text_length: usize,
}

fn pad() -> String {
    "pad".into()
}

fn qformer_dir() -> String {
    "qformer".into()
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
            Some(f) if f > FORMAT => {
                return fail("format", format!("{f} is newer than this runtime reads ({FORMAT}); update qadapt-run"))
            }
            Some(f) => {
                return fail("format", format!("{f} is older than this runtime reads ({FORMAT}); re-export the model"))
            }
            None => return fail("format", "missing (not written by qadapt-export?)".into()),
        }
        if let Some(t) = self.template.as_ref().filter(|t| **t != TemplateSpec::current()) {
            return fail(
                "template",
                format!(
                    "the export was made with another template (system {:?}); this build renders {:?}",
                    t.system,
                    TemplateSpec::current().system
                ),
            );
        }
        if self.image.aspect_ratio != "pad" {
            return fail("image.aspect_ratio", format!("{:?} is not supported (only pad)", self.image.aspect_ratio));
        }
        if let Some(q) = self
            .qformer
            .as_ref()
            .filter(|q| q.tokenizer.is_empty() || q.tokenizer.contains(['/', '\\']) || q.tokenizer.starts_with('.'))
        {
            return fail("qformer.tokenizer", format!("{:?} is not a directory name in the export", q.tokenizer));
        }
        if self.dtype != "f32" && self.dtype != "f16" {
            return fail("dtype", format!("{:?} is not f32 or f16", self.dtype));
        }
        if let Some(v) = self.variant.as_deref().filter(|v| !["standard", "fused"].contains(v)) {
            return fail("variant", format!("{v:?} is not a graph variant this runtime runs (standard, fused)"));
        }
        if let Some(q) = &self.quantization {
            if q.bits != 4 && q.bits != 8 {
                return fail("quantization.bits", format!("{} is not 4 or 8", q.bits));
            }
            if q.block_size < 16 || !q.block_size.is_power_of_two() {
                return fail("quantization.block_size", format!("{} is not a power of two ≥ 16", q.block_size));
            }
        }
        let g = &self.graphs;
        for (field, name) in [
            ("graphs.vision", Some(&g.vision)),
            ("graphs.embed", Some(&g.embed)),
            ("graphs.decoder", Some(&g.decoder)),
            ("graphs.cache_join", g.cache_join.as_ref()),
            ("graphs.cache_select", g.cache_select.as_ref()),
        ] {
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
        for (field, v) in [
            ("decoder.layers", d.layers),
            ("decoder.heads", d.heads),
            ("decoder.head_dim", d.head_dim),
            ("decoder.hidden_size", d.hidden_size),
            ("decoder.vocab_size", d.vocab_size),
            ("decoder.cache_head_dim", d.cache_head_dim()),
        ] {
            if !(1..=1 << 20).contains(&v) {
                return fail(field, format!("{v} is not between 1 and {}", 1 << 20));
            }
        }
        if i.tokens == 0 || i.tokens >= d.max_positions {
            return fail(
                "image.tokens",
                format!("{} image tokens do not fit decoder.max_positions {}", i.tokens, d.max_positions),
            );
        }
        if d.cache_head_dim() < d.head_dim {
            return fail("decoder.cache_head_dim", format!("{} is below head_dim {}", d.cache_head_dim(), d.head_dim));
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

#[cfg(test)]
mod tests {
    use super::*;

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
    fn written_and_read_back_the_same_and_the_template_is_checked() {
        let mut m: Manifest = serde_json::from_value(serde_json::json!({
            "format": 1, "dtype": "f32",
            "graphs": {"vision": "v.onnx", "embed": "e.onnx", "decoder": "d.onnx"},
            "image": {"size": 8, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "tokens": 4},
            "decoder": {"layers": 1, "heads": 1, "head_dim": 4, "hidden_size": 4, "vocab_size": 10, "max_positions": 16},
            "tokens": {"eos": 1, "levels": [1, 2, 3, 4, 5]},
            "qformer": null
        }))
        .unwrap();
        m.template = Some(TemplateSpec::current());
        let text = serde_json::to_string(&m).unwrap();
        assert_eq!(Manifest::parse(&text).unwrap(), m);
        m.template.as_mut().unwrap().system = "You are a pirate.".into();
        let e = Manifest::parse(&serde_json::to_string(&m).unwrap()).unwrap_err();
        assert!(e.starts_with("template: the export was made with another template"), "{e}");
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
