//! The five graphs (vision, embed, decoder with KV cache, and the `cache_join` / `cache_select`
//! cache graphs of continuous batching) and `qadapt.json`, each traced from the model's own forward
//! passes.

use std::path::Path;

use models::{Bunny, QFormerText};
use qadapt_core::Manifest;

use models::phi::Keep;

use crate::graph::{attr_int, FloatType, Fused, Graph, V};
use crate::onnx_pb::tensor_proto::DataType;
use crate::quant::Quant;
use crate::write::{Dim, Io, OPSET};
use crate::Result;

/// A traced graph with its interface.
pub struct Traced {
    /// File name in the export directory.
    pub file: &'static str,
    pub graph: Graph,
    pub inputs: Vec<Io>,
    pub outputs: Vec<Io>,
}

const B: Dim = Dim::Sym("batch");

/// `decoder.onnx`: one step of phi-2 with KV cache (HF Optimum names). One graph serves prefill
/// (past length 0) and decode.
/// With `quant`, every linear with a weight (lm_head unless kept) is a `MatMulNBits`.
/// `fused`: the contrib-op variant ([`crate::fused`]): the caches are buffers of a fixed length
/// (`cache_sequence`, at most `max_positions`) that a step writes in place, rows are right-padded,
/// and `logits_positions` [B, K] picks each row's positions instead of `num_logits_to_keep`.
pub fn decoder(model: &Bunny, ft: FloatType, quant: Option<Quant>, fused: bool) -> Result<Traced> {
    let c = &model.config;
    let (layers, heads) = (c.num_hidden_layers, c.num_attention_heads);
    let head_dim = if fused { crate::fused::cache_head_dim(c.head_dim()) } else { c.head_dim() };
    let mut g = Graph::new(ft);
    g.quant = quant;
    if fused {
        g.fused = Some(Fused::new(c.max_position_embeddings));
    }
    let embeds = g.input("inputs_embeds", 3);
    let mask = g.input("attention_mask", 2);
    let pos = g.input("position_ids", 2);
    let past: Vec<_> = (0..layers)
        .map(|i| (g.input(&format!("past_key_values.{i}.key"), 4), g.input(&format!("past_key_values.{i}.value"), 4)))
        .collect();
    let keep = if fused { g.input("logits_positions", 2) } else { g.input("num_logits_to_keep", 0) };
    let kept = if fused { Keep::At(&keep) } else { Keep::Last(&keep) };
    let (logits, present) = model.llm.forward(&mut g, &embeds, &mask, &pos, Some(&past), Some(kept))?;
    let uses_positions = g.fused.as_ref().is_none_or(|f| f.uses_positions);
    let (past_len, total_len) =
        if fused { ("cache_sequence", "cache_sequence") } else { ("past_sequence", "total_sequence") };
    g.output_f32(&logits, "logits");
    for (i, (k, v)) in present.iter().enumerate() {
        g.output(k, &format!("present.{i}.key"));
        g.output(v, &format!("present.{i}.value"));
    }
    let kv = |name: String, len: &'static str| {
        Io::new(name, ft.onnx(), vec![B, Dim::Fixed(heads as i64), Dim::Sym(len), Dim::Fixed(head_dim as i64)])
    };
    let mut inputs = vec![
        Io::new("inputs_embeds", ft.onnx(), vec![B, Dim::Sym("sequence"), Dim::Fixed(c.hidden_size as i64)]),
        Io::new("attention_mask", DataType::Int64, vec![B, Dim::Sym("total_sequence")]),
    ];
    // The fused graph with the rotary inside its attention op reads no positions.
    if uses_positions {
        inputs.push(Io::new("position_ids", DataType::Int64, vec![B, Dim::Sym("sequence")]));
    }
    let mut outputs =
        vec![Io::new("logits", DataType::Float, vec![B, Dim::Sym("kept_sequence"), Dim::Fixed(c.vocab_size as i64)])];
    for i in 0..layers {
        for part in ["key", "value"] {
            inputs.push(kv(format!("past_key_values.{i}.{part}"), past_len));
            outputs.push(kv(format!("present.{i}.{part}"), total_len));
        }
    }
    if fused {
        inputs.push(Io::new("logits_positions", DataType::Int64, vec![B, Dim::Sym("kept_sequence")]));
    } else {
        inputs.push(Io::new("num_logits_to_keep", DataType::Int64, vec![]));
    }
    Ok(Traced { file: "decoder.onnx", graph: g, inputs, outputs })
}

/// `cache_join.onnx`: two KV caches (`a.*`, `b.*`, each [B, H, L, Dh]) → one (`kv.*`), the shorter
/// left-padded with zeros to the longer's length, rows of `a` first. With `cache_select.onnx`
/// (`in.*`, `rows` and `start` → `kv.*`: the rows kept, from position `start` on, the padding they
/// all share dropped) it lets the runtime admit requests into a running decode batch and drop
/// finished ones without the cache leaving the device.
/// `fused`: the caches are buffers whose rows start at slot 0, so a join pads the shorter buffer
/// at its end and a select gathers rows (no `start`).
pub fn cache_join(model: &Bunny, ft: FloatType, fused: bool) -> Result<Traced> {
    cache_graph(model, ft, fused, "cache_join.onnx", |g, i, part| {
        let (a, b) = (g.input(&format!("a.{i}.{part}"), 4), g.input(&format!("b.{i}.{part}"), 4));
        // Fused buffers hold each row from slot 0: a shorter buffer grows at its end.
        g.pad_and_stack(&a, &b, 2, fused)
    })
}

/// `cache_select.onnx`: see [`cache_join`].
pub fn cache_select(model: &Bunny, ft: FloatType, fused: bool) -> Result<Traced> {
    let mut t = cache_graph(model, ft, fused, "cache_select.onnx", |g, i, part| {
        let (kv, rows) = (g.input(&format!("in.{i}.{part}"), 4), g.input("rows", 1));
        if fused {
            let (kn, rn) = (g.name(&kv), g.name(&rows));
            return g.node("Gather", &[&kn, &rn], vec![attr_int("axis", 0)], 4);
        }
        let start = g.input("start", 0);
        g.take_rows(&kv, &rows, &start, 2)
    })?;
    t.inputs.push(Io::new("rows", DataType::Int64, vec![Dim::Sym("kept")]));
    if !fused {
        t.inputs.push(Io::new("start", DataType::Int64, vec![]));
    }
    Ok(t)
}

/// A graph with one output `kv.{i}.{key,value}` per layer cache, built by `part`; its inputs are
/// declared from the names `part` used (`a.`/`b.` for a join, `in.` for a select).
fn cache_graph(
    model: &Bunny,
    ft: FloatType,
    fused: bool,
    file: &'static str,
    mut part: impl FnMut(&mut Graph, usize, &str) -> crate::graph::V,
) -> Result<Traced> {
    let c = &model.config;
    let heads = c.num_attention_heads as i64;
    let head_dim = if fused { crate::fused::cache_head_dim(c.head_dim()) } else { c.head_dim() } as i64;
    let kv = |name: String, b: &'static str, len: &'static str| {
        Io::new(name, ft.onnx(), vec![Dim::Sym(b), Dim::Fixed(heads), Dim::Sym(len), Dim::Fixed(head_dim)])
    };
    let mut g = Graph::new(ft);
    let (mut inputs, mut outputs) = (Vec::new(), Vec::new());
    for i in 0..c.num_hidden_layers {
        for p in ["key", "value"] {
            let out = part(&mut g, i, p);
            g.output(&out, &format!("kv.{i}.{p}"));
            outputs.push(kv(format!("kv.{i}.{p}"), "batch", "sequence"));
            if file == "cache_join.onnx" {
                inputs.push(kv(format!("a.{i}.{p}"), "batch_a", "sequence_a"));
                inputs.push(kv(format!("b.{i}.{p}"), "batch_b", "sequence_b"));
            } else {
                inputs.push(kv(format!("in.{i}.{p}"), "batch_in", "sequence"));
            }
        }
    }
    Ok(Traced { file, graph: g, inputs, outputs })
}

/// `embed.onnx`: token ids → input embeddings (a Gather on the embedding table). A graph rather
/// than a raw table so that the runtime needs no second weight format and the table's dtype and
/// layout stay the exporter's business.
pub fn embed(model: &Bunny, ft: FloatType) -> Result<Traced> {
    let mut g = Graph::new(ft);
    let ids = g.input("input_ids", 2);
    let e = model.llm.embed(&mut g, &ids)?;
    g.output(&e, "inputs_embeds");
    let inputs = vec![Io::new("input_ids", DataType::Int64, vec![B, Dim::Sym("sequence")])];
    let outputs = vec![Io::new(
        "inputs_embeds",
        ft.onnx(),
        vec![B, Dim::Sym("sequence"), Dim::Fixed(model.config.hidden_size as i64)],
    )];
    Ok(Traced { file: "embed.onnx", graph: g, inputs, outputs })
}

/// `vision.onnx`: pixels (and, for Q-Adapt, the question's Q-Former ids and mask) → the image
/// features the decoder reads: SigLIP, the prompt module and the connector in one graph.
/// With `quant` and its `vision` set, the linears of SigLIP, the prompt module and the connector are
/// `MatMulNBits` (the patch convolution stays float).
/// `fused`: SigLIP's attention, GELU and residual LayerNorms as contrib ops ([`crate::fused`]).
pub fn vision(model: &Bunny, ft: FloatType, quant: Option<Quant>, fused: bool) -> Result<Traced> {
    let c = &model.config;
    let s = c.vision_config.image_size as i64;
    let mut g = Graph::new(ft);
    g.quant = quant.filter(|q| q.vision);
    if fused {
        g.fused = Some(Fused::new(c.max_position_embeddings));
    }
    let pixels = g.input("pixel_values", 4);
    let mut inputs = vec![Io::new("pixel_values", ft.onnx(), vec![B, Dim::Fixed(3), Dim::Fixed(s), Dim::Fixed(s)])];
    let feats = if model.is_qadapt() {
        let ids = g.input("qformer_input_ids", 2);
        let mask = g.input("qformer_attention_mask", 2);
        inputs.push(Io::new("qformer_input_ids", DataType::Int64, vec![B, Dim::Sym("qformer_sequence")]));
        inputs.push(Io::new("qformer_attention_mask", DataType::Int64, vec![B, Dim::Sym("qformer_sequence")]));
        model.image_features(&mut g, &pixels, Some(QFormerText { input_ids: &ids, attention_mask: &mask }))?
    } else {
        model.image_features(&mut g, &pixels, None)?
    };
    g.output(&feats.projected, "image_features");
    let n = c.vision_config.num_patches() as i64;
    let outputs = vec![Io::new("image_features", ft.onnx(), vec![B, Dim::Fixed(n), Dim::Fixed(c.hidden_size as i64)])];
    Ok(Traced { file: "vision.onnx", graph: g, inputs, outputs })
}

/// What the runtime needs besides the graphs: the shared [`Manifest`] type, so the runtime parses
/// exactly what is written here.
pub fn manifest(
    model: &Bunny,
    dir: &Path,
    ft: FloatType,
    quant: Option<Quant>,
    fused: bool,
    level_ids: [u32; 5],
) -> Manifest {
    use qadapt_core::manifest::{
        DecoderSpec, Graphs, ImageSpec, QFormerSpec, QuantSpec, TemplateSpec, TokenSpec, FORMAT,
    };
    let c = &model.config;
    let v = &c.vision_config;
    Manifest {
        format: Some(FORMAT),
        model_type: c.model_type.as_str().to_string(),
        dtype: match ft {
            FloatType::F32 => "f32",
            FloatType::F16 => "f16",
        }
        .to_string(),
        opset: Some(OPSET as u32),
        graphs: Graphs {
            vision: "vision.onnx".into(),
            embed: "embed.onnx".into(),
            decoder: "decoder.onnx".into(),
            cache_join: Some("cache_join.onnx".into()),
            cache_select: Some("cache_select.onnx".into()),
        },
        image: ImageSpec {
            size: v.image_size as u32,
            mean: v.image_mean,
            std: v.image_std,
            aspect_ratio: c.image_aspect_ratio.clone(),
            tokens: v.num_patches(),
        },
        decoder: DecoderSpec {
            layers: c.num_hidden_layers,
            heads: c.num_attention_heads,
            head_dim: c.head_dim(),
            hidden_size: c.hidden_size,
            vocab_size: c.vocab_size,
            max_positions: c.max_position_embeddings,
            cache_head_dim: Some(crate::fused::cache_head_dim(c.head_dim())).filter(|&d| fused && d != c.head_dim()),
        },
        tokens: TokenSpec { bos: Some(c.bos_token_id), eos: c.eos_token_id, pad: c.pad_token_id, levels: level_ids },
        template: Some(TemplateSpec::current()),
        qformer: c
            .qformer_config
            .as_ref()
            .filter(|_| model.is_qadapt())
            .map(|q| QFormerSpec { tokenizer: "qformer".into(), max_text_length: q.max_text_length }),
        source: Some(dir.display().to_string()),
        variant: Some(if fused { "fused" } else { "standard" }.into()),
        quantization: quant.map(|q| QuantSpec {
            bits: q.bits,
            block_size: q.block_size,
            accuracy_level: q.accuracy_level,
            symmetric: true,
            lm_head: q.lm_head,
            vision: q.vision,
        }),
    }
}

/// The two cache graphs' ops.
impl Graph {
    /// `a` [Ba, …, La, …] and `b` [Bb, …, Lb, …] stacked along axis 0, the shorter first padded
    /// with zeros along `axis` to the longer's length (at its start, or its end when `at_end`): two
    /// KV caches made one.
    fn pad_and_stack(&mut self, a: &V, b: &V, axis: i64, at_end: bool) -> V {
        let (la, lb) = (self.dim(a, axis), self.dim(b, axis));
        let longest = self.node("Max", &[&la.name, &lb.name], vec![], 0);
        let rank = a.rank;
        // Pad's pads: the begin of every axis, then the end of every axis.
        let at = if at_end { rank + axis as usize } else { axis as usize };
        let mut padded = Vec::new();
        for (x, l) in [(a, &la), (b, &lb)] {
            let short = self.node("Sub", &[&longest.name, &l.name], vec![], 0);
            let short = self.unsqueeze(&short, &[0]);
            let mut parts = Vec::new();
            if at > 0 {
                parts.push(self.ints(&vec![0; at]));
            }
            parts.push(short.name.clone());
            if at + 1 < 2 * rank {
                parts.push(self.ints(&vec![0; 2 * rank - at - 1]));
            }
            let refs: Vec<&str> = parts.iter().map(String::as_str).collect();
            let pads = self.concat(&refs, 0, 1);
            let n = self.name(x);
            padded.push(self.node("Pad", &[&n, &pads.name], vec![], rank));
        }
        self.concat(&[&padded[0].name, &padded[1].name], 0, rank)
    }

    /// Rows `rows` (int64 [K]) of `x` along axis 0, from position `start` (int64 scalar) on along
    /// `axis`: the rows of a KV cache that go on, without the padding they all share.
    fn take_rows(&mut self, x: &V, rows: &V, start: &V, axis: i64) -> V {
        let (n, r, st) = (self.name(x), self.name(rows), self.name(start));
        let kept = self.node("Gather", &[&n, &r], vec![attr_int("axis", 0)], x.rank);
        let zero = self.ints(&[0]);
        let st = self.node("Unsqueeze", &[&st, &zero], vec![], 1);
        let (end, ax) = (self.ints(&[i64::MAX]), self.ints(&[axis]));
        self.node("Slice", &[&kept.name, &st.name, &end, &ax], vec![], x.rank)
    }
}
