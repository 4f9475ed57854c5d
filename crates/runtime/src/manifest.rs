//! `qadapt.json`, the manifest `qadapt-export` writes next to the graphs, and the TensorRT
//! optimisation profiles derived from its shapes.

use serde::Deserialize;

/// The parts of `qadapt.json` the runtime reads.
#[derive(Debug, Clone, Deserialize)]
pub struct Manifest {
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
}
