//! A frozen linear layer with a LoRA adapter, `y = x·Wᵀ + b + scale · (dropout(x)·Aᵀ)·Bᵀ`, for
//! training on the CPU as one candle op.
//!
//! Composed of candle ops it is seven recorded nodes (the dropout product, two adapter products, the
//! scale, the bias, the frozen product, the sum), four of them of the output's size, and every node's
//! gradient costs candle a zeroed tensor and a sum; its dropout mask is kept as f32 values. Here the
//! forward pass is the three products and one pass over the output, the mask is kept as bytes, and
//! the backward pass recomputes the masked input and the small `[rows, r]` product instead of keeping
//! them. The forward value is that of the composed ops bit for bit (the same kernels, the same
//! operations per element in the same order); gradients agree to rounding (the scale is applied to
//! the rank-sized product instead of the output-sized one).

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Storage, Tensor};
use rand::rngs::StdRng;
use rand::Rng;

use crate::pointwise::{build, f32_pair, f32_slice, CHUNK};
use crate::Result;

/// A dropout mask: which elements keep (scaled by `keep`).
#[derive(Debug, Clone)]
pub(crate) struct Mask {
    kept: Arc<Vec<u8>>,
    keep: f32,
}

impl Mask {
    /// A mask over `n` elements dropping each with probability `p`; `None` for `p ≤ 0`. One draw
    /// from `rng` seeds a SplitMix64 stream whose `i`-th value decides element `i`: element-parallel
    /// where drawing `n` values from `rng` one after the other is a serial pass (220 M draws per
    /// bench-small step). A checkpointed block's two forwards take the same draw, so the same mask.
    pub(crate) fn draw(rng: &mut StdRng, n: usize, p: f32) -> Option<Self> {
        if p <= 0.0 {
            return None;
        }
        let seed: u64 = rng.random();
        // Keep where the value's top 32 bits reach p · 2³²: drop with probability p.
        let threshold = (f64::from(p) * 4_294_967_296.0) as u64;
        let kept = build(n, CHUNK, |s, o| {
            for (i, o) in o.iter_mut().enumerate() {
                o.write(u8::from(splitmix64(seed, (s + i) as u64) >> 32 >= threshold));
            }
        });
        Some(Self { kept: Arc::new(kept), keep: 1.0 / (1.0 - p) })
    }

    /// The factor of element `i`: what the composed dropout multiplies it by.
    #[inline(always)]
    fn factor(&self, kept: u8) -> f32 {
        if kept != 0 {
            self.keep
        } else {
            0.0
        }
    }
}

/// The layer's frozen part and its adapter.
pub(crate) struct LoraLinear<'a> {
    /// [out, in], frozen.
    pub w: &'a Tensor,
    /// [out], frozen.
    pub bias: Option<&'a Tensor>,
    /// [r, in].
    pub a: &'a Tensor,
    /// [out, r].
    pub b: &'a Tensor,
    pub scale: f64,
}

impl LoraLinear<'_> {
    /// Whether the fused op takes `x`: everything f32 on the CPU, the weight and bias frozen, the
    /// shapes those of a linear layer.
    pub(crate) fn applies(&self, x: &Tensor) -> bool {
        let cpu_f32 = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
        let (Ok((n, k)), Ok((r, ka)), Ok((nb, rb))) = (self.w.dims2(), self.a.dims2(), self.b.dims2()) else {
            return false;
        };
        let bias_ok = self.bias.is_none_or(|b| cpu_f32(b) && !b.track_op() && b.dims() == [n]);
        cpu_f32(x)
            && cpu_f32(self.w)
            && cpu_f32(self.a)
            && cpu_f32(self.b)
            && !self.w.track_op()
            && bias_ok
            && x.dims().last() == Some(&k)
            && (ka, nb, rb) == (k, n, r)
    }

    /// The layer of `x` [.., in] → [.., out] with dropout `mask` over `x`'s elements (see the module
    /// docs). Call only where [`LoraLinear::applies`].
    pub(crate) fn forward(&self, x: &Tensor, mask: Option<Mask>) -> Result<Tensor> {
        let dims = x.dims();
        let k = dims[dims.len() - 1];
        let rows = x.elem_count() / k.max(1);
        let mut out_dims = dims.to_vec();
        out_dims[dims.len() - 1] = self.w.dim(0)?;
        let x2 = x.reshape((rows, k))?.contiguous()?;
        let op =
            LoraOp { w: self.w.clone(), bias: self.bias.map(|b| b.contiguous()).transpose()?, scale: self.scale, mask };
        Ok(x2.apply_op3(&self.a.contiguous()?, &self.b.contiguous()?, op)?.reshape(out_dims)?)
    }
}

struct LoraOp {
    w: Tensor,
    bias: Option<Tensor>,
    scale: f64,
    mask: Option<Mask>,
}

impl CustomOp3 for LoraOp {
    fn name(&self) -> &'static str {
        "lora-linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        a: &CpuStorage,
        al: &Layout,
        b: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, k) = xl.shape().dims2()?;
        let (n, r) = bl.shape().dims2()?;
        let wt = self.w.t()?;
        let (w, wl) = wt.storage_and_layout();
        let Storage::Cpu(w) = &*w else {
            return Err(candle_core::Error::Msg("lora-linear: the weight is not on the CPU".into()));
        };
        // The frozen product, as `x.matmul(&w.t())` computes it.
        let y = xs.matmul(w, (1, rows, n, k), xl, wl)?;
        // The adapter: dropout(x)·Aᵀ, then ·Bᵀ.
        let x = f32_slice(xs, xl, "lora-linear")?;
        let dropped;
        let (xm, xml) = match &self.mask {
            Some(m) => {
                dropped = CpuStorage::F32(masked(x, m));
                (&dropped, Layout::contiguous((rows, k)))
            }
            None => (xs, xl.clone()),
        };
        let h = xm.matmul(a, (1, rows, r, k), &xml, &al.transpose(0, 1)?)?;
        let d = h.matmul(b, (1, rows, n, r), &Layout::contiguous((rows, r)), &bl.transpose(0, 1)?)?;
        let (CpuStorage::F32(y), CpuStorage::F32(d)) = (y, d) else {
            return Err(candle_core::Error::Msg("lora-linear: f32 only".into()));
        };
        let bias_storage = self.bias.as_ref().map(|t| t.storage_and_layout());
        let bias = match &bias_storage {
            Some((s, l)) => match &**s {
                Storage::Cpu(s) => Some(f32_slice(s, l, "lora-linear bias")?),
                _ => return Err(candle_core::Error::Msg("lora-linear: the bias is not on the CPU".into())),
            },
            None => None,
        };
        // `(x·Wᵀ + b) + (d·scale + 0)`: the composed ops' bias add, affine and sum, in their order.
        let scale = self.scale as f32;
        let chunk = (CHUNK / n.max(1)).max(1) * n;
        let out = build(y.len(), chunk, |s, o| {
            for ((o, y), d) in o.chunks_mut(n).zip(y[s..].chunks(n)).zip(d[s..].chunks(n)) {
                for (j, ((o, &y), &d)) in o.iter_mut().zip(y).zip(d).enumerate() {
                    let yb = match bias {
                        Some(b) => y + b[j],
                        None => y,
                    };
                    o.write(yb + (d * scale + 0.0));
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((rows, n))))
    }

    #[allow(clippy::type_complexity)]
    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // Detached: the gradients must not record ops on the trainable A and B (that would chain
        // each step's graph into the optimizer's state).
        let (track_x, track_a, track_b) = (x.track_op(), a.track_op(), b.track_op());
        let (x, a, b) = (x.detach(), a.detach(), b.detach());
        let g = grad.contiguous()?.detach(); // [rows, n]
                                             // d(scale·h·Bᵀ)/dh: the rank-sized gradient of the adapter's middle.
        let dh = g.matmul(&b)?.affine(self.scale, 0.0)?; // [rows, r]
        let dx = if track_x {
            let frozen = g.matmul(&self.w)?; // [rows, k]
            let adapter = dh.matmul(&a)?; // [rows, k]
            Some(match &self.mask {
                Some(m) => frozen.apply_op2_no_bwd(&adapter, &AddMasked(m.clone()))?,
                None => (frozen + adapter)?,
            })
        } else {
            None
        };
        if !track_a && !track_b {
            return Ok((dx, None, None));
        }
        let xm = match &self.mask {
            Some(m) => x.apply_op1_no_bwd(&ApplyMask(m.clone()))?,
            None => x.clone(),
        };
        let da = track_a.then(|| dh.t()?.matmul(&xm)).transpose()?; // [r, k]
        let db = if track_b {
            let h = xm.matmul(&a.t()?)?.affine(self.scale, 0.0)?; // [rows, r]
            Some(g.t()?.matmul(&h)?) // [n, r]
        } else {
            None
        };
        Ok((dx, da, db))
    }
}

/// The `i`-th value of the SplitMix64 stream seeded with `seed`.
#[inline(always)]
fn splitmix64(seed: u64, i: u64) -> u64 {
    let mut z = seed.wrapping_add(i.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// `x ⊙ mask`, as the composed dropout's product.
fn masked(x: &[f32], m: &Mask) -> Vec<f32> {
    build(x.len(), CHUNK, |s, o| {
        for ((o, &x), &k) in o.iter_mut().zip(&x[s..]).zip(&m.kept[s..]) {
            o.write(x * m.factor(k));
        }
    })
}

/// `x ⊙ mask` (the backward pass's recomputation of the adapter's input).
struct ApplyMask(Mask);

impl CustomOp1 for ApplyMask {
    fn name(&self) -> &'static str {
        "lora-apply-mask"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "lora-apply-mask")?;
        if x.len() != self.0.kept.len() {
            return Err(candle_core::Error::Msg("lora-apply-mask: mask and input differ in size".into()));
        }
        Ok((CpuStorage::F32(masked(x, &self.0)), l.shape().clone()))
    }
}

/// `a + b ⊙ mask`: the input's gradient through the frozen product and through the dropout.
struct AddMasked(Mask);

impl CustomOp2 for AddMasked {
    fn name(&self) -> &'static str {
        "lora-add-masked"
    }

    fn cpu_fwd(
        &self,
        a: &CpuStorage,
        al: &Layout,
        b: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (a, b) = f32_pair(a, al, b, bl, "lora-add-masked")?;
        let m = &self.0;
        if a.len() != m.kept.len() {
            return Err(candle_core::Error::Msg("lora-add-masked: sizes differ".into()));
        }
        let out = build(a.len(), CHUNK, |s, o| {
            for (((o, &a), &b), &k) in o.iter_mut().zip(&a[s..]).zip(&b[s..]).zip(&m.kept[s..]) {
                o.write(a + b * m.factor(k));
            }
        });
        Ok((CpuStorage::F32(out), al.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use rand::SeedableRng;

    fn v(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    /// Against the composed ops with the same dropout mask: the output bit for bit, the gradients of
    /// the input and of both adapter matrices to rounding; the frozen weight and bias get none.
    #[test]
    fn fused_lora_linear_equals_the_composed_ops() {
        let dev = Device::Cpu;
        let (rows, k, n, r, p, scale) = (300, 24, 40, 4, 0.25f32, 2.5);
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (3, rows / 3, k), &dev).unwrap()).unwrap();
        let w = Tensor::randn(0f32, 0.2, (n, k), &dev).unwrap();
        let bias = Tensor::randn(0f32, 0.2, (n,), &dev).unwrap();
        let a = Var::from_tensor(&Tensor::randn(0f32, 0.2, (r, k), &dev).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::randn(0f32, 0.2, (n, r), &dev).unwrap()).unwrap();
        let weights = Tensor::randn(0f32, 1.0, (3, rows / 3, n), &dev).unwrap();
        let mask = Mask::draw(&mut StdRng::seed_from_u64(7), rows * k, p).unwrap();
        // Drops about p of the elements (7,200 of them: 1,800 ± 4σ), and another draw differs.
        let dropped = mask.kept.iter().filter(|&&m| m == 0).count() as f64;
        assert!((dropped - 1800.0).abs() < 4.0 * (7200.0 * 0.25 * 0.75f64).sqrt(), "{dropped} dropped");
        let other = Mask::draw(&mut StdRng::seed_from_u64(8), rows * k, p).unwrap();
        assert_ne!(mask.kept, other.kept);
        // The composed ops, with the same mask as f32 factors.
        let factors: Vec<f32> = mask.kept.iter().map(|&m| mask.factor(m)).collect();
        let factors = Tensor::from_vec(factors, (3, rows / 3, k), &dev).unwrap();
        let xt = x.as_tensor();
        // As `crate::ops::Candle::linear` computes each product: one [rows, in] matrix.
        let x2 = xt.reshape((rows, k)).unwrap();
        let y0 = x2.matmul(&w.t().unwrap()).unwrap().broadcast_add(&bias).unwrap();
        let h = (x2 * factors.reshape((rows, k)).unwrap()).unwrap().matmul(&a.as_tensor().t().unwrap()).unwrap();
        let h = h.matmul(&b.as_tensor().t().unwrap()).unwrap().affine(scale, 0.0).unwrap();
        let plain = (y0 + h).unwrap().reshape((3, rows / 3, n)).unwrap();
        let layer = LoraLinear { w: &w, bias: Some(&bias), a: a.as_tensor(), b: b.as_tensor(), scale };
        assert!(layer.applies(xt));
        let fused = layer.forward(xt, Some(mask)).unwrap();
        let bits = |t: &Tensor| v(t).iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&plain), bits(&fused), "values");
        let g0 = (plain * &weights).unwrap().sum_all().unwrap().backward().unwrap();
        let g1 = (fused * &weights).unwrap().sum_all().unwrap().backward().unwrap();
        for (name, t) in [("x", xt), ("A", a.as_tensor()), ("B", b.as_tensor())] {
            let (p, q) = (v(g0.get(t).unwrap()), v(g1.get(t).unwrap()));
            let d = p.iter().zip(&q).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
            let m = p.iter().fold(0f32, |m, x| m.max(x.abs()));
            assert!(d <= 1e-5 * m.max(1.0), "{name}: gradients differ by {d} (largest {m})");
            assert!(m > 1e-3, "{name}: a gradient that says something");
        }
        // A frozen (untracked) input gets no gradient, and nothing but A and B are stored then.
        let g2 =
            (layer.forward(&xt.detach(), None).unwrap() * &weights).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(g2.get(a.as_tensor()).is_some() && g2.get(b.as_tensor()).is_some());
        assert!(g2.get(&w).is_none() && g2.get(&bias).is_none());
    }
}
