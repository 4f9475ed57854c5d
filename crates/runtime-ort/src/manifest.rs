//! The TensorRT optimisation profiles derived from the shapes of `qadapt.json` (the manifest type
//! itself is `qadapt_core::manifest`, shared with the exporter).

pub use qadapt_core::manifest::{DecoderSpec, Graphs, ImageSpec, Manifest, QFormerSpec, TokenSpec, FORMAT};

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
        parts.push(dims(
            "inputs_embeds",
            [[1, 1, d.hidden_size, 0], [1, 1, d.hidden_size, 0], [b, p, d.hidden_size, 0]],
            3,
        ));
        parts.push(dims("attention_mask", [[1, 1, 0, 0], [1, typical + 1, 0, 0], [b, p, 0, 0]], 2));
        parts.push(dims("position_ids", [[1, 1, 0, 0], [1, 1, 0, 0], [b, p, 0, 0]], 2));
        for i in 0..d.layers {
            for kv in ["key", "value"] {
                parts.push(dims(
                    &format!("past_key_values.{i}.{kv}"),
                    [[1, d.heads, 0, d.head_dim], [1, d.heads, typical, d.head_dim], [b, d.heads, p - 1, d.head_dim]],
                    4,
                ));
            }
        }
    } else if graph == m.graphs.vision {
        let s = m.image.size as usize;
        parts.push(dims("pixel_values", [[1, 3, s, s], [1, 3, s, s], [b, 3, s, s]], 4));
        if let Some(q) = &m.qformer {
            for name in ["qformer_input_ids", "qformer_attention_mask"] {
                parts.push(dims(
                    name,
                    [[1, 1, 0, 0], [1, q.max_text_length.min(32), 0, 0], [b, q.max_text_length, 0, 0]],
                    2,
                ));
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
    fn profiles_cover_every_input_of_each_graph() {
        let m = manifest();
        let (min, opt, max) = trt_profiles(&m, "decoder.onnx", 8).expect("decoder");
        assert!(
            min.starts_with(
                "inputs_embeds:1x1x2560,attention_mask:1x1,position_ids:1x1,past_key_values.0.key:1x32x0x80,"
            ),
            "{min}"
        );
        assert!(opt.contains("attention_mask:1x794,") && opt.contains("past_key_values.1.value:1x32x793x80"), "{opt}");
        assert!(
            max.contains("inputs_embeds:8x2048x2560") && max.ends_with("past_key_values.1.value:8x32x2047x80"),
            "{max}"
        );
        assert_eq!(min.split(',').count(), 3 + 2 * 2);
        let (min, _, max) = trt_profiles(&m, "vision.onnx", 4).expect("vision");
        assert_eq!(min, "pixel_values:1x3x384x384,qformer_input_ids:1x1,qformer_attention_mask:1x1");
        assert_eq!(max, "pixel_values:4x3x384x384,qformer_input_ids:4x256,qformer_attention_mask:4x256");
        assert!(trt_profiles(&m, "other.onnx", 1).is_none());
    }
}
