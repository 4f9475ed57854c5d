//! The `--fused` decoder: what the graph builder records instead of the composed ops when
//! [`Graph::fused`] is set, the way onnxruntime-genai builds phi:
//! - each layer's attention is one `com.microsoft.GroupQueryAttention` over a packed QKV
//!   projection (one MatMul, or `MatMulNBits`, instead of three), with the cache in a buffer of
//!   `max_positions` per row that a step writes in place when the runtime binds the same memory to
//!   `past_*` and `present_*` (each row's keys are the first `seqlens_k + 1` slots of its buffer,
//!   so batches are right-padded: see `runtime_ort`);
//! - the residual sum and the next LayerNorm are one `SkipLayerNormalization`;
//! - tanh-GELU is one `FastGelu`;
//! - in the vision graph, SigLIP's attention is one `MultiHeadAttention` and its residual sums
//!   with the LayerNorms after them `SkipLayerNormalization` (the prompt module and connector are
//!   unchanged).
//!
//! `GroupQueryAttention` takes heads whose size is a multiple of 8, and rotates inside only when
//! the head size is a multiple of 16 and the rotary tables' width (rotary dims / 2) a multiple of
//! 8 (ONNX Runtime's `group_query_attention_helper.h`; phi-2: head 80, width 16). Other shapes (the
//! tiny test fixtures) get zero-padded heads and/or the rotary applied before the op.

use models::ops::{Ops, SelfAttention};
use models::{Error, Result};

use crate::graph::{attr_float, attr_int, Ctx, Graph, Rotary, MS_DOMAIN, V};
use crate::onnx_pb::tensor_proto::DataType;
use crate::weights::{Part, Weight};

/// The last dim of a fused export's cache for heads of `head_dim`: the next multiple of 8.
pub fn cache_head_dim(head_dim: usize) -> usize {
    head_dim.next_multiple_of(8)
}

/// Whether `GroupQueryAttention` can rotate heads of `head_dim` by `rotary_dims` itself.
pub fn rotary_inside(head_dim: usize, rotary_dims: usize) -> bool {
    let width = rotary_dims / 2;
    head_dim.is_multiple_of(16) && width > 0 && width.is_multiple_of(8) && width <= head_dim / 16 * 8
}

impl Graph {
    /// One `GroupQueryAttention` layer (see the module docs): the heads merged [B, S, H·hd] and the
    /// present buffers.
    pub(crate) fn group_query_attention(&mut self, a: &SelfAttention<'_, V>) -> Result<(V, (V, V))> {
        let [(wq, bq), (wk, bk), (wv, bv)] = a.qkv;
        let heads = a.heads;
        let hd = wq.dims()[0] / heads;
        let dp = cache_head_dim(hd);
        let inside = dp == hd && rotary_inside(hd, a.rotary_dims);
        // Packed projection: q, k and v weights (and biases) stacked, each head padded to dp; built
        // when written (see `crate::weights`).
        let mut ws = Vec::new();
        let mut bs = Vec::new();
        for (w, b) in [(wq, bq), (wk, bk), (wv, bv)] {
            ws.push(Part::Param(w.clone()));
            bs.push(match b {
                Some(b) => Part::Param(b.clone()),
                None => Part::Zeros { rows: w.dims()[0], dtype: w.t.dtype() },
            });
        }
        let key = wq.key.replace("q_proj", "qkv_proj");
        let bkey = key.replace(".weight", ".bias");
        let w = self.weight(Weight::Packed { key, parts: ws, heads, hd, dp });
        let b = self.weight(Weight::Packed { key: bkey, parts: bs, heads, hd, dp });
        let qkv = self.linear(a.x, &w, Some(&b))?; // [B, S, 3·H·dp]

        let ctx = self.fused_ctx(a, inside)?;
        let (pk, pv) = match a.past {
            Some((k, v)) => (self.name(k), self.name(v)),
            None => (String::new(), String::new()),
        };
        let width = (heads * dp) as i64;
        let (mut inputs, do_rotary) = match &ctx.rotary {
            Rotary::Inside { cos, sin } => {
                let q = self.name(&qkv);
                (vec![q, String::new(), String::new(), pk, pv, ctx.seqlens_k, ctx.total, cos.clone(), sin.clone()], 1)
            }
            rotary => {
                let mut parts = Vec::new();
                for i in 0..3 {
                    let mut p = self.slice(&qkv, 2, i * width, (i + 1) * width);
                    if let (Rotary::Outside { cos, sin }, true) = (rotary, i < 2) {
                        let h = self.reshape(&p, &[0, 0, heads as i64, dp as i64]);
                        let r = self.rope(&h, cos, sin, a.rotary_dims)?;
                        p = self.reshape(&r, &[0, 0, width]);
                    }
                    parts.push(p.name);
                }
                parts.extend([pk, pv, ctx.seqlens_k, ctx.total]);
                (parts, 0)
            }
        };
        // Trailing optional inputs left unnamed are dropped, as ONNX allows.
        while inputs.last().is_some_and(String::is_empty) {
            inputs.pop();
        }
        let ins: Vec<&str> = inputs.iter().map(String::as_str).collect();
        let attrs = vec![
            attr_int("num_heads", heads as i64),
            attr_int("kv_num_heads", heads as i64),
            attr_float("scale", (1.0 / (hd as f64).sqrt()) as f32),
            attr_int("do_rotary", do_rotary),
        ];
        let outs = self.node_outputs("GroupQueryAttention", MS_DOMAIN, &ins, attrs, &[Some(3), Some(4), Some(4)]);
        let mut outs = outs.into_iter().flatten();
        let (Some(out), Some(k), Some(v)) = (outs.next(), outs.next(), outs.next()) else {
            return Err(Error::Input("GroupQueryAttention node without its outputs".into()));
        };
        if dp == hd {
            return Ok((out, (k, v)));
        }
        let h = self.reshape(&out, &[0, 0, heads as i64, dp as i64]);
        let h = self.slice(&h, 3, 0, hd as i64);
        Ok((self.reshape(&h, &[0, 0, (heads * hd) as i64]), (k, v)))
    }

    /// The per-step values every layer reads, built by the first layer.
    fn fused_ctx(&mut self, a: &SelfAttention<'_, V>, inside: bool) -> Result<Ctx> {
        let max_positions = match &self.fused {
            Some(f) => match &f.ctx {
                Some(c) => return Ok(c.clone()),
                None => f.max_positions,
            },
            None => return Err(Error::Input("not a fused graph".into())),
        };
        // seqlens_k = Σ mask − 1 and the total length, as int32 (the op's type for both).
        let mask = self.name(a.mask2d);
        let axes = self.ints(&[1]);
        let sum = self.node("ReduceSum", &[&mask, &axes], vec![attr_int("keepdims", 0)], 1);
        let one = self.int_scalar(1);
        let sk = self.node("Sub", &[&sum.name, &one], vec![], 1);
        let sk = self.cast(&sk.name, DataType::Int32, 1);
        let total = self.dim(a.mask2d, 1);
        let total = self.cast(&total.name, DataType::Int32, 0);
        let rot = a.rotary_dims;
        let rotary = if rot == 0 {
            Rotary::None
        } else if inside {
            // cos/sin(p · θ^(−2i/rot)) for p < max_positions, i < rot/2, in the export type.
            let half = rot / 2;
            let inv: Vec<f32> =
                (0..half).map(|i| (1.0 / a.rope_theta.powf(2.0 * i as f64 / rot as f64)) as f32).collect();
            let (mut c, mut s) = (Vec::new(), Vec::new());
            for p in 0..max_positions {
                for f in &inv {
                    let angle = p as f32 * f;
                    c.push(angle.cos());
                    s.push(angle.sin());
                }
            }
            let dims = [max_positions as i64, half as i64];
            Rotary::Inside { cos: self.floats(&c, &dims, false), sin: self.floats(&s, &dims, false) }
        } else {
            let (cos, sin) = self.rope_tables(a.position_ids, rot, a.rope_theta)?; // [B, 1, S, rot]
            let cos = self.permute(&cos, &[0, 2, 1, 3]);
            let sin = self.permute(&sin, &[0, 2, 1, 3]);
            Rotary::Outside { cos, sin }
        };
        let ctx = Ctx { seqlens_k: sk.name, total: total.name, rotary };
        if let Some(f) = self.fused.as_mut() {
            f.uses_positions = matches!(ctx.rotary, Rotary::Outside { .. });
            f.ctx = Some(ctx.clone());
        }
        Ok(ctx)
    }

    /// `(x + delta, LayerNorm(x + delta))` as one `SkipLayerNormalization`.
    pub(crate) fn skip_layer_norm(&mut self, x: &V, delta: &V, w: &V, b: &V, eps: f64) -> Result<(V, V)> {
        let (xn, dn, wn, bn) = (self.name(x), self.name(delta), self.name(w), self.name(b));
        let outs = self.node_outputs(
            "SkipLayerNormalization",
            MS_DOMAIN,
            &[&dn, &xn, &wn, &bn],
            vec![attr_float("epsilon", eps as f32)],
            &[Some(3), None, None, Some(3)],
        );
        match (&outs[0], &outs[3]) {
            (Some(normed), Some(sum)) => Ok((sum.clone(), normed.clone())),
            _ => Err(Error::Input("SkipLayerNormalization node without its outputs".into())),
        }
    }

    /// Bidirectional unmasked attention of [B, N, D] projections as one `MultiHeadAttention`.
    pub(crate) fn multi_head_attention(&mut self, q: &V, k: &V, v: &V, heads: usize, scale: f64) -> V {
        let (qn, kn, vn) = (self.name(q), self.name(k), self.name(v));
        let attrs = vec![attr_int("num_heads", heads as i64), attr_float("scale", scale as f32)];
        self.ms_node("MultiHeadAttention", &[&qn, &kn, &vn], attrs, 3)
    }

    /// tanh-GELU as one `FastGelu`.
    pub(crate) fn fast_gelu(&mut self, x: &V) -> V {
        let n = self.name(x);
        self.ms_node("FastGelu", &[&n], vec![], x.rank)
    }
}
