//! Attention's `softmax(scores · scale + bias)` for training on the CPU, as one candle op.
//!
//! Composed of candle ops, it keeps six score-sized tensors per layer until the backward pass (the
//! product, its scaled and masked forms, `x − max`, `exp`, the quotient); this op keeps its output
//! alone, and its backward pass uses only that output: `dx = scale · y ⊙ (g − Σ g ⊙ y)`, one pass.
//! Both are split by rows over the CPU's threads. The forward pass computes what the composed ops
//! compute, operation for operation (candle's affine, add, max, exp, its own row sum and the quotient),
//! so the probabilities are bit for bit the same; gradients agree to rounding.

use candle_core::cpu::kernels::VecOps;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Storage, Tensor};

use crate::pointwise::{build, f32_pair, f32_slice, rows_per_task};

use crate::Result;

/// `softmax(scores · scale + bias)` over the last dim (see the module docs); `None` where the op does
/// not apply (not f32 on the CPU, a non-contiguous input, a bias that does not broadcast).
pub(crate) fn scaled_masked_softmax(scores: &Tensor, scale: f64, bias: Option<&Tensor>) -> Result<Option<Tensor>> {
    if !scores.device().is_cpu() || scores.dtype() != candle_core::DType::F32 || !scores.is_contiguous() {
        return Ok(None);
    }
    let bias = match bias {
        Some(b) if b.dtype() != candle_core::DType::F32 => return Ok(None),
        Some(b) => match b.broadcast_as(scores.shape()) {
            // Row-wise (unit stride along the keys), as every mask here is.
            Ok(b) if crate::frozen::Rows::new(b.layout()).is_some() => Some(b),
            _ => return Ok(None),
        },
        None => None,
    };
    Ok(Some(scores.apply_op1(ScaledMaskedSoftmax { scale, bias })?))
}

struct ScaledMaskedSoftmax {
    scale: f64,
    /// Viewed at the scores' shape.
    bias: Option<Tensor>,
}

impl CustomOp1 for ScaledMaskedSoftmax {
    fn name(&self) -> &'static str {
        "scaled-masked-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let src = f32_slice(s, l, "scaled-masked-softmax")?;
        let t = l.shape().dims().last().copied().unwrap_or(1).max(1);
        // candle's affine: v · mul + add, both in the element type.
        let (mul, add) = (self.scale as f32, 0f32);
        // The bias's storage offset for each row (it is a row-wise broadcast: a mask).
        let bias = self.bias.as_ref().map(|b| b.storage_and_layout());
        let bias = match &bias {
            Some((bs, bl)) => {
                let Storage::Cpu(CpuStorage::F32(bs)) = &**bs else {
                    return Err(candle_core::Error::Msg(
                        "scaled-masked-softmax: the bias is not f32 on the CPU".into(),
                    ));
                };
                let Some((rows, len)) = crate::frozen::Rows::new(bl) else {
                    return Err(candle_core::Error::Msg("scaled-masked-softmax: the bias is not row-wise".into()));
                };
                if len != t {
                    return Err(candle_core::Error::Msg("scaled-masked-softmax: bias rows differ in length".into()));
                }
                Some((bs.as_slice(), rows.collect::<Vec<usize>>()))
            }
            None => None,
        };
        let out = build(src.len(), rows_per_task(t) * t, |s, o| {
            let mut z = vec![0f32; t];
            for (r, o) in o.chunks_mut(t).enumerate() {
                let row = s / t + r;
                for (z, &v) in z.iter_mut().zip(&src[row * t..(row + 1) * t]) {
                    *z = v * mul + add;
                }
                if let Some((bs, offsets)) = &bias {
                    for (z, &b) in z.iter_mut().zip(&bs[offsets[row]..offsets[row] + t]) {
                        *z += b;
                    }
                }
                let max = z.iter().copied().fold(z[0], f32::max);
                for v in z.iter_mut() {
                    *v = (*v - max).exp();
                }
                let mut sum = 0f32;
                // SAFETY: `z` holds `t` initialised f32 values; the kernel reads exactly those.
                unsafe { f32::vec_reduce_sum(z.as_ptr(), &mut sum, t) };
                for (o, &v) in o.iter_mut().zip(&z) {
                    o.write(v / sum);
                }
            }
        });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let y = y.detach();
        Ok(Some(y.apply_op2_no_bwd(&grad.contiguous()?.detach(), &SoftmaxBackward { scale: self.scale })?))
    }
}

/// `dx = ((g − Σ g ⊙ y) ⊙ y) · scale`, row by row.
struct SoftmaxBackward {
    scale: f64,
}

impl CustomOp2 for SoftmaxBackward {
    fn name(&self) -> &'static str {
        "scaled-masked-softmax-backward"
    }

    fn cpu_fwd(
        &self,
        ys: &CpuStorage,
        yl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (y, g) = f32_pair(ys, yl, gs, gl, "scaled-masked-softmax-backward")?;
        let t = yl.shape().dims().last().copied().unwrap_or(1).max(1);
        let scale = self.scale as f32;
        let out = build(y.len(), rows_per_task(t) * t, |s, o| {
            for ((o, y), g) in o.chunks_mut(t).zip(y[s..].chunks(t)).zip(g[s..].chunks(t)) {
                let gy: f32 = y.iter().zip(g).map(|(&y, &g)| g * y).sum();
                for ((o, &y), &g) in o.iter_mut().zip(y).zip(g) {
                    o.write((g - gy) * y * scale + 0.0);
                }
            }
        });
        Ok((CpuStorage::F32(out), yl.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor, Var, D};

    /// Against candle's composed ops: the same probabilities bit for bit, gradients within 1e-6.
    #[test]
    fn fused_softmax_equals_the_composed_ops() {
        let dev = Device::Cpu;
        let s0 = (Tensor::randn(0f32, 3.0, (2, 3, 4, 5), &dev).unwrap()).contiguous().unwrap();
        let bias = Tensor::new(&[0f32, 0.0, f32::MIN, 0.0, -1e4], &dev).unwrap().reshape((1, 1, 1, 5)).unwrap();
        let bias = bias.broadcast_as((2, 1, 4, 5)).unwrap().contiguous().unwrap();
        let w = Tensor::randn(0f32, 1.0, (2, 3, 4, 5), &dev).unwrap();
        let scale = 0.125;
        let s = Var::from_tensor(&s0).unwrap();
        let plain = candle_nn::ops::softmax(
            &s.as_tensor().affine(scale, 0.0).unwrap().broadcast_add(&bias).unwrap(),
            D::Minus1,
        )
        .unwrap();
        let fused = super::scaled_masked_softmax(s.as_tensor(), scale, Some(&bias)).unwrap().unwrap();
        let v = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let bits = |t: &Tensor| v(t).iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&plain), bits(&fused));
        let g0 = (plain * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let g1 = (fused * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let (a, b) = (v(g0.get(s.as_tensor()).unwrap()), v(g1.get(s.as_tensor()).unwrap()));
        let d = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        assert!(d < 1e-6, "gradients differ by {d}");
        assert!(a.iter().any(|x| x.abs() > 1e-3), "a gradient that says something");
    }
}
