//! The graph builder as an interpreter of [`models::ops::Ops`]: every op the forward passes call is
//! recorded as ONNX nodes on a [`Graph`] (the `--fused` ops in [`crate::fused`], quantized linears as
//! `MatMulNBits`, see [`crate::quant`]).

use models::ops::{Ops, Param};
use models::{Error, Result};

use crate::graph::{attr_float, attr_int, attr_ints, FloatType, Graph, InitData, V};
use crate::onnx_pb::{attribute_proto::AttributeType, tensor_proto::DataType, AttributeProto};
use crate::weights::Weight;

impl Ops for Graph {
    type T = V;

    fn param(&mut self, p: &Param) -> Result<V> {
        Ok(self.weight(Weight::Param(p.clone())))
    }

    fn linear(&mut self, x: &V, w: &V, b: Option<&V>) -> Result<V> {
        if let (Some(q), Some(p)) = (self.quant, &w.param) {
            if let (true, &[n, k]) = (q.applies(p.key()), p.dims().as_slice()) {
                let (bn, sn) = (format!("{}^q{}", p.key(), q.bits), format!("{}^scales", p.key()));
                self.register(&bn, InitData::Quantized { w: p.clone(), q, scales: false });
                self.register(&sn, InitData::Quantized { w: p.clone(), q, scales: true });
                let xn = self.name(x);
                let y = self.ms_node(
                    "MatMulNBits",
                    &[&xn, &bn, &sn],
                    vec![
                        attr_int("K", k as i64),
                        attr_int("N", n as i64),
                        attr_int("bits", q.bits as i64),
                        attr_int("block_size", q.block_size as i64),
                        attr_int("accuracy_level", q.accuracy_level as i64),
                    ],
                    x.rank,
                );
                return Ok(match b {
                    Some(b) => self.binary("Add", &y, b),
                    None => y,
                });
            }
        }
        let wn = match &w.param {
            Some(p) => {
                let name = format!("{}^T", p.key());
                self.register(&name, InitData::Weight { w: p.clone(), transpose: true });
                name
            }
            None => {
                let n = self.name(w);
                self.node("Transpose", &[&n], vec![attr_ints("perm", &[1, 0])], 2).name
            }
        };
        let xn = self.name(x);
        let y = self.node("MatMul", &[&xn, &wn], vec![], x.rank);
        Ok(match b {
            Some(b) => self.binary("Add", &y, b),
            None => y,
        })
    }
    fn matmul(&mut self, a: &V, b: &V) -> Result<V> {
        Ok(self.binary("MatMul", a, b))
    }
    fn add(&mut self, a: &V, b: &V) -> Result<V> {
        Ok(self.binary("Add", a, b))
    }
    fn sub(&mut self, a: &V, b: &V) -> Result<V> {
        Ok(self.binary("Sub", a, b))
    }
    fn mul(&mut self, a: &V, b: &V) -> Result<V> {
        Ok(self.binary("Mul", a, b))
    }
    fn affine(&mut self, x: &V, mul: f64, add: f64) -> Result<V> {
        let n = self.name(x);
        let mut y = V { name: n, rank: x.rank, param: None };
        if mul != 1.0 {
            let m = self.scalar(mul as f32);
            y = self.node("Mul", &[&y.name, &m], vec![], x.rank);
        }
        if add != 0.0 {
            let a = self.scalar(add as f32);
            y = self.node("Add", &[&y.name, &a], vec![], x.rank);
        }
        Ok(y)
    }
    fn layer_norm(&mut self, x: &V, w: &V, b: &V, eps: f64) -> Result<V> {
        // Statistics in f32 as in the candle interpreter; the affine part in the export type.
        let width = match &w.param {
            Some(p) => p.dims()[0],
            None => return Err(Error::Input("layer_norm: the scale must be a weight".into())),
        };
        let xf = self.as_f32(x);
        let ones = self.floats(&vec![1.0; width], &[width as i64], true);
        let zeros = self.floats(&vec![0.0; width], &[width as i64], true);
        let y = self.node(
            "LayerNormalization",
            &[&xf.name, &ones, &zeros],
            vec![attr_int("axis", -1), attr_float("epsilon", eps as f32)],
            x.rank,
        );
        let y = self.back_from_f32(y);
        let y = self.binary("Mul", &y, w);
        Ok(self.binary("Add", &y, b))
    }
    fn gelu_tanh(&mut self, x: &V) -> Result<V> {
        if self.fused.is_some() {
            return Ok(self.fast_gelu(x));
        }
        Ok(self.gelu_tanh_impl(x))
    }
    fn gelu_erf(&mut self, x: &V) -> Result<V> {
        let r = self.scalar(std::f32::consts::FRAC_1_SQRT_2);
        let n = self.name(x);
        let xs = self.node("Mul", &[&n, &r], vec![], x.rank);
        let e = self.unary("Erf", &xs);
        Ok(self.half_x_one_plus(x, &e))
    }
    fn relu(&mut self, x: &V) -> Result<V> {
        Ok(self.unary("Relu", x))
    }
    fn sigmoid(&mut self, x: &V) -> Result<V> {
        Ok(self.unary("Sigmoid", x))
    }
    fn softmax_last(&mut self, x: &V) -> Result<V> {
        let xf = self.as_f32(x);
        let y = self.node("Softmax", &[&xf.name], vec![attr_int("axis", -1)], x.rank);
        Ok(self.back_from_f32(y))
    }
    fn transpose(&mut self, x: &V, d1: usize, d2: usize) -> Result<V> {
        let mut perm: Vec<i64> = (0..x.rank as i64).collect();
        if d1 >= x.rank || d2 >= x.rank {
            return Err(Error::Input(format!("transpose({d1}, {d2}) of a rank-{} value", x.rank)));
        }
        perm.swap(d1, d2);
        Ok(self.permute(x, &perm))
    }
    fn split_heads(&mut self, x: &V, heads: usize) -> Result<V> {
        let r = self.reshape(x, &[0, 0, heads as i64, -1]);
        Ok(self.permute(&r, &[0, 2, 1, 3]))
    }
    fn merge_heads(&mut self, x: &V) -> Result<V> {
        let t = self.permute(x, &[0, 2, 1, 3]);
        Ok(self.reshape(&t, &[0, 0, -1]))
    }
    fn narrow(&mut self, x: &V, dim: usize, start: usize, len: Option<usize>) -> Result<V> {
        let end = len.map(|l| (start + l) as i64).unwrap_or(i64::MAX);
        Ok(self.slice(x, dim as i64, start as i64, end))
    }
    fn cat(&mut self, xs: &[V], dim: usize) -> Result<V> {
        let names: Vec<String> = xs.iter().map(|x| self.name(x)).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let rank = xs.first().map(|x| x.rank).unwrap_or(0);
        Ok(self.concat(&refs, dim as i64, rank))
    }
    fn embedding(&mut self, table: &V, ids: &V) -> Result<V> {
        let (t, i) = (self.name(table), self.name(ids));
        Ok(self.node("Gather", &[&t, &i], vec![attr_int("axis", 0)], ids.rank + 1))
    }
    fn patchify(&mut self, pixels: &V, w: &V, b: &V, patch: usize) -> Result<V> {
        let (p, wn, bn) = (self.name(pixels), self.name(w), self.name(b));
        let k = patch as i64;
        let y = self.node(
            "Conv",
            &[&p, &wn, &bn],
            vec![attr_ints("kernel_shape", &[k, k]), attr_ints("strides", &[k, k])],
            4,
        );
        let y = self.reshape(&y, &[0, 0, -1]); // [B, D, N]
        Ok(self.permute(&y, &[0, 2, 1]))
    }
    fn expand_batch(&mut self, x: &V, like: &V) -> Result<V> {
        let (xn, ln) = (self.name(x), self.name(like));
        let like_shape = self.node("Shape", &[&ln], vec![], 1);
        let x_shape = self.node("Shape", &[&xn], vec![], 1);
        let b = self.slice(&like_shape, 0, 0, 1);
        let rest = self.slice(&x_shape, 0, 1, i64::MAX);
        let shape = self.concat(&[&b.name, &rest.name], 0, 1);
        Ok(self.node("Expand", &[&xn, &shape.name], vec![], x.rank))
    }
    fn rope_tables(&mut self, position_ids: &V, rot_dims: usize, theta: f64) -> Result<(V, V)> {
        let inv: Vec<f32> =
            (0..rot_dims / 2).map(|i| (1.0 / theta.powf(2.0 * i as f64 / rot_dims as f64)) as f32).collect();
        let inv = self.floats(&inv, &[(rot_dims / 2) as i64], true);
        let pn = self.name(position_ids);
        let pos = self.cast(&pn, DataType::Float, 2);
        let pos = self.unsqueeze(&pos, &[2]); // [B, L, 1]
        let freqs = self.node("Mul", &[&pos.name, &inv], vec![], 3); // [B, L, rot/2]
        let emb = self.concat(&[&freqs.name, &freqs.name], 2, 3);
        let emb = self.unsqueeze(&emb, &[1]); // [B, 1, L, rot]
        let cos = self.unary("Cos", &emb);
        let sin = self.unary("Sin", &emb);
        Ok((self.back_from_f32(cos), self.back_from_f32(sin)))
    }
    fn rope(&mut self, x: &V, cos: &V, sin: &V, rot_dims: usize) -> Result<V> {
        let (r, h) = (rot_dims as i64, (rot_dims / 2) as i64);
        let xr = self.slice(x, 3, 0, r);
        let x1 = self.slice(&xr, 3, 0, h);
        let x2 = self.slice(&xr, 3, h, r);
        let nx2 = self.unary("Neg", &x2);
        let rotated = self.concat(&[&nx2.name, &x1.name], 3, 4);
        let a = self.binary("Mul", &xr, cos);
        let b = self.binary("Mul", &rotated, sin);
        let y = self.binary("Add", &a, &b);
        // The pass-through part is empty when all dims rotate; Concat takes the empty slice.
        let pass = self.slice(x, 3, r, i64::MAX);
        Ok(self.concat(&[&y.name, &pass.name], 3, 4))
    }
    fn causal_bias(&mut self, mask2d: &V, query_like: &V) -> Result<V> {
        let total = self.dim(mask2d, 1);
        let s = self.dim(query_like, 2);
        let (zero, one) = (self.int_scalar(0), self.int_scalar(1));
        let start = self.node("Sub", &[&total.name, &s.name], vec![], 0);
        let k = self.node("Range", &[&zero, &total.name, &one], vec![], 1); // [P+S]
        let q = self.node("Range", &[&start.name, &total.name, &one], vec![], 1); // [S]
        let k = self.unsqueeze(&k, &[0]); // [1, P+S]
        let q = self.unsqueeze(&q, &[1]); // [S, 1]
        let causal = self.binary("LessOrEqual", &k, &q); // [S, P+S]
        let mn = self.name(mask2d);
        let keep = self.cast(&mn, DataType::Bool, 2);
        let keep = self.unsqueeze(&keep, &[1, 2]); // [B, 1, 1, P+S]
        let keep = self.binary("And", &keep, &causal); // [B, 1, S, P+S]
        let (z, m) = (self.scalar(0.0), self.scalar(self.ft.mask_min()));
        Ok(self.node("Where", &[&keep.name, &z, &m], vec![], 4))
    }
    fn padding_bias(&mut self, mask2d: &V, fill: f64) -> Result<V> {
        let n = self.name(mask2d);
        let m = self.cast(&n, self.ft.onnx(), 2);
        let b = self.affine(&m, -fill, fill)?;
        Ok(self.unsqueeze(&b, &[1, 2]))
    }
    fn ones_mask(&mut self, like: &V) -> Result<V> {
        let n = self.name(like);
        let shape = self.node("Shape", &[&n], vec![], 1);
        let bl = self.slice(&shape, 0, 0, 2);
        let value = AttributeProto {
            name: "value".into(),
            r#type: AttributeType::Tensor as i32,
            t: Some(crate::onnx_pb::TensorProto {
                dims: vec![1],
                data_type: DataType::Int64 as i32,
                int64_data: vec![1],
                ..Default::default()
            }),
            ..Default::default()
        };
        Ok(self.node("ConstantOfShape", &[&bl.name], vec![value], 2))
    }
    fn positions_like(&mut self, like: &V) -> Result<V> {
        let l = self.dim(like, 1);
        let (zero, one) = (self.int_scalar(0), self.int_scalar(1));
        let r = self.node("Range", &[&zero, &l.name, &one], vec![], 1);
        Ok(self.unsqueeze(&r, &[0]))
    }
    fn last_positions(&mut self, x: &V, keep: &V) -> Result<V> {
        let (xn, kn) = (self.name(x), self.name(keep));
        let neg = self.node("Neg", &[&kn], vec![], keep.rank);
        let start = if keep.rank == 0 { self.unsqueeze(&neg, &[0]) } else { neg };
        let (end, axis) = (self.ints(&[i64::MAX]), self.ints(&[1]));
        Ok(self.node("Slice", &[&xn, &start.name, &end, &axis], vec![], x.rank))
    }
    fn dropout(&mut self, x: &V, _p: f32) -> Result<V> {
        Ok(x.clone())
    }
    fn gather_positions(&mut self, x: &V, idx: &V) -> Result<V> {
        let (xn, inn) = (self.name(x), self.name(idx));
        let idx3 = self.unsqueeze(&V { name: inn, rank: 2, param: None }, &[2]); // [B, K, 1]
        Ok(self.node("GatherND", &[&xn, &idx3.name], vec![attr_int("batch_dims", 1)], 3))
    }
    fn fused_self_attention(&mut self, a: &models::ops::SelfAttention<'_, V>) -> Result<Option<(V, (V, V))>> {
        if self.fused.is_none() {
            return Ok(None);
        }
        self.group_query_attention(a).map(Some)
    }
    fn fused_mha(&mut self, q: &V, k: &V, v: &V, heads: usize, scale: f64) -> Result<Option<V>> {
        if self.fused.is_none() {
            return Ok(None);
        }
        Ok(Some(self.multi_head_attention(q, k, v, heads, scale)))
    }
    fn residual_layer_norm(&mut self, x: &V, delta: &V, w: &V, b: &V, eps: f64) -> Result<(V, V)> {
        if self.fused.is_some() {
            return self.skip_layer_norm(x, delta, w, b, eps);
        }
        models::ops::composite_residual_layer_norm(self, x, delta, w, b, eps)
    }
    fn attention(&mut self, q: &V, k: &V, v: &V, bias: Option<&V>, scale: f64) -> Result<V> {
        if self.ft == FloatType::F32 {
            return models::ops::composite_attention(self, q, k, v, bias, scale);
        }
        // f16: as the candle interpreter, scores in f32 (q·k of real phi-2 weights passes 65,504).
        let (qn, kn) = (self.name(q), self.name(k));
        let qf = self.cast(&qn, DataType::Float, q.rank);
        let kf = self.cast(&kn, DataType::Float, k.rank);
        let kt = self.permute(&kf, &[0, 1, 3, 2]);
        let scores = self.binary("MatMul", &qf, &kt);
        let sc = self.floats(&[scale as f32], &[], true);
        let mut scores = self.node("Mul", &[&scores.name, &sc], vec![], 4);
        if let Some(b) = bias {
            // The f16 mask value (about −3.3·10⁴) scaled far below any f32 score.
            let bn = self.name(b);
            let bf = self.cast(&bn, DataType::Float, b.rank);
            let amp = self.floats(&[models::ops::F16_MASK_TO_F32 as f32], &[], true);
            let bf = self.node("Mul", &[&bf.name, &amp], vec![], b.rank);
            scores = self.node("Add", &[&scores.name, &bf.name], vec![], 4);
        }
        let probs = self.node("Softmax", &[&scores.name], vec![attr_int("axis", -1)], 4);
        let probs = self.cast(&probs.name, DataType::Float16, 4);
        Ok(self.binary("MatMul", &probs, v))
    }
}
