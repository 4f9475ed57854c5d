//! Rotary embedding (NeoX `rotate_half`, partial) for training on the CPU as one candle op.
//!
//! Composed of candle ops it is two views, a negation, two concatenations, two products with the
//! tables and a sum: six q- or k-sized tensors per layer and each one's gradient. Here it is one pass
//! forward, `y = x ⊙ cos + rotate_half(x) ⊙ sin` on the rotated dims and a copy of the rest, and one
//! pass back, `dx = g ⊙ cos + rotate_halfᵀ(g ⊙ sin)` with `rotate_halfᵀ(u) = [u₂, −u₁]`. The forward
//! value is the composed ops' bit for bit (the same two products and sum per element).

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Storage, Tensor};

use crate::pointwise::{build, f32_slice, rows_per_task};
use crate::Result;

/// `x` [B, H, L, D] rotated on its first `rot` dims by `cos`, `sin` [B or 1, 1, L, rot] (see the
/// module docs); `None` where the op does not apply (not f32 on the CPU, other shapes).
pub(crate) fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, rot: usize) -> Result<Option<Tensor>> {
    let cpu_f32 = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
    let Ok((b, _, l, d)) = x.dims4() else { return Ok(None) };
    let table_ok =
        |t: &Tensor| matches!(t.dims4(), Ok((tb, 1, tl, tr)) if (tb == b || tb == 1) && tl == l && tr == rot);
    if !cpu_f32(x) || !cpu_f32(cos) || !cpu_f32(sin) || rot == 0 || !rot.is_multiple_of(2) || rot > d {
        return Ok(None);
    }
    if !table_ok(cos) || !table_ok(sin) {
        return Ok(None);
    }
    let op = Rope { cos: cos.contiguous()?, sin: sin.contiguous()?, rot, backward: false };
    Ok(Some(x.contiguous()?.apply_op1(op)?))
}

struct Rope {
    cos: Tensor,
    sin: Tensor,
    rot: usize,
    /// Applies the transpose (the backward pass).
    backward: bool,
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "rope"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "rope")?;
        let (_, h, len, d) = l.shape().dims4()?;
        let (cs, cl) = self.cos.storage_and_layout();
        let (ss, sl) = self.sin.storage_and_layout();
        let (Storage::Cpu(cs), Storage::Cpu(ss)) = (&*cs, &*ss) else {
            return Err(candle_core::Error::Msg("rope: tables not on the CPU".into()));
        };
        let (cos, sin) = (f32_slice(cs, cl, "rope")?, f32_slice(ss, sl, "rope")?);
        let (rot, half) = (self.rot, self.rot / 2);
        let table_batch = cl.shape().dims()[0];
        let backward = self.backward;
        let out = build(x.len(), rows_per_task(d) * d, |s, o| {
            for (r, o) in o.chunks_mut(d).enumerate() {
                let row = s / d + r; // over (b, h, l)
                let (bi, li) = (row / (h * len), row % len);
                let t = ((if table_batch == 1 { 0 } else { bi }) * len + li) * rot;
                let (cos, sin) = (&cos[t..t + rot], &sin[t..t + rot]);
                let x = &x[row * d..(row + 1) * d];
                for (j, o) in o.iter_mut().enumerate() {
                    o.write(if j >= rot {
                        x[j]
                    } else if !backward {
                        // x ⊙ cos + [−x₂, x₁] ⊙ sin.
                        let rotated = if j < half { -x[j + half] } else { x[j - half] };
                        x[j] * cos[j] + rotated * sin[j]
                    } else {
                        // g ⊙ cos + [(g ⊙ sin)₂, −(g ⊙ sin)₁].
                        let rotated =
                            if j < half { x[j + half] * sin[j + half] } else { -(x[j - half] * sin[j - half]) };
                        x[j] * cos[j] + rotated
                    });
                }
            }
        });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let op = Rope { cos: self.cos.clone(), sin: self.sin.clone(), rot: self.rot, backward: true };
        Ok(Some(grad.contiguous()?.detach().apply_op1_no_bwd(&op)?))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor, Var};

    /// Against the composed ops (full and partial rotation, tables per batch row): values bit for
    /// bit, gradients to rounding.
    #[test]
    fn fused_rope_equals_the_composed_ops() {
        let dev = Device::Cpu;
        for (d, rot) in [(8, 8), (12, 4)] {
            let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3, 5, d), &dev).unwrap()).unwrap();
            let w = Tensor::randn(0f32, 1.0, (2, 3, 5, d), &dev).unwrap();
            let cos = Tensor::randn(0f32, 1.0, (2, 1, 5, rot), &dev).unwrap();
            let sin = Tensor::randn(0f32, 1.0, (2, 1, 5, rot), &dev).unwrap();
            // The composed form (`Candle::rope` outside training).
            let xt = x.as_tensor();
            let xr = xt.narrow(3, 0, rot).unwrap();
            let (x1, x2) = (xr.narrow(3, 0, rot / 2).unwrap(), xr.narrow(3, rot / 2, rot / 2).unwrap());
            let rotated = Tensor::cat(&[&x2.neg().unwrap(), &x1], 3).unwrap();
            let y = (xr.broadcast_mul(&cos).unwrap() + rotated.broadcast_mul(&sin).unwrap()).unwrap();
            let plain = if rot == d { y } else { Tensor::cat(&[&y, &xt.narrow(3, rot, d - rot).unwrap()], 3).unwrap() };
            let fused = super::rope(xt, &cos, &sin, rot).unwrap().unwrap();
            let v = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let bits = |t: &Tensor| v(t).iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&plain), bits(&fused), "values, rot {rot} of {d}");
            let g0 = (plain * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let g1 = (fused * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let (a, b) = (v(g0.get(xt).unwrap()), v(g1.get(xt).unwrap()));
            let diff = a.iter().zip(&b).map(|(p, q)| (p - q).abs()).fold(0f32, f32::max);
            assert!(diff < 1e-6, "gradients differ by {diff}, rot {rot} of {d}");
        }
    }
}
