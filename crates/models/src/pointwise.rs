//! GELU and LayerNorm for training on the CPU, each as one candle op with a closed-form backward.
//!
//! Composed of candle ops, the tanh GELU's backward pass is a dozen element-wise kernels (a cube, a
//! tanh, their products and sums: one temporary each) and a LayerNorm's forward and backward some
//! twenty passes over the activation. Here each is one pass forward and one (LayerNorm: two) back,
//! split over the CPU's threads. Forward values are those of candle's kernels (the same expression per
//! element), except that the tanh GELU's tanh is a vectorised rational function within 4 ulp of libm's
//! (a scalar call per element, a tenth of the step at the bench-small shapes); gradients are the exact
//! derivatives, which agree with candle's (whose GELU backward rounds its constants to six digits) to
//! rounding.

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};

use crate::Result;

/// Below this many elements a loop runs on the calling thread: waking the pool costs more.
const PAR_MIN: usize = 1 << 15;
/// Elements per parallel task.
pub(crate) const CHUNK: usize = 1 << 13;

/// A new vector of `n` values written chunk by chunk by `f(start, chunk)` (`start` the index of
/// the chunk's first element; chunks of `chunk` elements, the last one shorter), split over threads
/// when large. Not zeroed
/// first: with freed memory kept for reuse (the trainer's allocator settings) zeroing is a full pass.
/// `f` must write every element of its chunk.
pub(crate) fn build<T: Send>(n: usize, chunk: usize, f: impl Fn(usize, &mut [MaybeUninit<T>]) + Sync) -> Vec<T> {
    let mut out = Vec::with_capacity(n);
    let spare = &mut out.spare_capacity_mut()[..n];
    let chunk = chunk.max(1);
    if n < PAR_MIN {
        // The same chunks on this thread, so that `f` sees one chunk whichever way it runs.
        for (i, c) in spare.chunks_mut(chunk).enumerate() {
            f(i * chunk, c);
        }
    } else {
        // candle's own element-wise pool, in which the calling thread works too: handing the loop to
        // rayon's workers instead put four threads on two cores, spinning for each other.
        let base = spare.as_mut_ptr() as usize;
        candle_core::utils::barrier_pool().execute_chunked(n.div_ceil(chunk), |units| {
            for u in units {
                let start = u * chunk;
                // SAFETY: `start + len ≤ n` lies inside `spare`, and each unit (a disjoint range)
                // is handed to exactly one call.
                let c = unsafe {
                    std::slice::from_raw_parts_mut((base as *mut MaybeUninit<T>).add(start), chunk.min(n - start))
                };
                f(start, c);
            }
        });
    }
    // SAFETY: every caller's `f` writes each element of the chunk it is handed, and the chunks
    // cover `0..n`.
    unsafe { out.set_len(n) };
    out
}

/// `out[i] = f(a[i])`.
fn map1(a: &[f32], f: impl Fn(f32) -> f32 + Sync) -> Vec<f32> {
    build(a.len(), CHUNK, |s, o| {
        o.iter_mut().zip(&a[s..]).for_each(|(o, &a)| {
            o.write(f(a));
        })
    })
}

/// `out[i] = f(a[i], b[i])`.
pub(crate) fn map2(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32 + Sync) -> Vec<f32> {
    build(a.len(), CHUNK, |s, o| {
        o.iter_mut().zip(&a[s..]).zip(&b[s..]).for_each(|((o, &a), &b)| {
            o.write(f(a, b));
        })
    })
}

/// The contiguous f32 slice a CPU storage and layout describe.
pub(crate) fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else { return Err(candle_core::Error::Msg(format!("{op}: f32 only"))) };
    let Some((a, b)) = l.contiguous_offsets() else {
        return Err(candle_core::Error::Msg(format!("{op}: non-contiguous input")));
    };
    Ok(&v[a..b])
}

/// Two equally long contiguous f32 slices (an activation and its gradient, say).
pub(crate) fn f32_pair<'a>(
    a: &'a CpuStorage,
    al: &Layout,
    b: &'a CpuStorage,
    bl: &Layout,
    op: &str,
) -> candle_core::Result<(&'a [f32], &'a [f32])> {
    let (a, b) = (f32_slice(a, al, op)?, f32_slice(b, bl, op)?);
    if a.len() != b.len() {
        return Err(candle_core::Error::Msg(format!("{op}: operands differ in size ({} and {})", a.len(), b.len())));
    }
    Ok((a, b))
}

/// Whether the fused ops take `x`: f32, on the CPU, contiguous.
fn applies(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32 && x.is_contiguous()
}

/// Which GELU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Gelu {
    /// `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))` (`gelu_new`, `gelu_pytorch_tanh`).
    Tanh,
    /// `0.5·x·(1 + erf(x/√2))` (torch `nn.GELU()`).
    Erf,
}

const SQRT_TWO_OVER_PI: f32 = 0.797_884_6;

/// tanh as a [13/6] rational function on [−7.905, 7.905] (clamped outside, where f32's tanh is ±1
/// to rounding): polynomials the compiler vectorises, where libm's `tanhf` is a scalar call per
/// element. Within 4 ulp (relative 4.8e-7) of the exact tanh over the range (tested below).
#[inline(always)]
fn tanh_fast(x: f32) -> f32 {
    const A: [f32; 7] =
        [4.893_524_6e-3, 6.372_619_3e-4, 1.485_722_4e-5, 5.122_297e-8, -8.604_672e-11, 2.000_188e-13, -2.760_768_5e-16];
    const B: [f32; 4] = [4.893_525e-3, 2.268_434_7e-3, 1.185_347_1e-4, 1.198_258_4e-6];
    let x = x.clamp(-7.905_311, 7.905_311);
    let x2 = x * x;
    let p = x2 * A[6] + A[5];
    let p = x2 * p + A[4];
    let p = x2 * p + A[3];
    let p = x2 * p + A[2];
    let p = x2 * p + A[1];
    let p = x * (x2 * p + A[0]);
    let q = x2 * B[3] + B[2];
    let q = x2 * q + B[1];
    let q = x2 * q + B[0];
    // Plain products and sums: `mul_add` is a libm call on a target without FMA.
    // Near 0 the quotient's rounding matters more than tanh's curvature.
    if x.abs() < 4e-4 {
        x
    } else {
        p / q
    }
}

impl Gelu {
    /// candle's kernels, expression for expression (tanh: [`tanh_fast`]).
    #[inline(always)]
    fn value(self, x: f32) -> f32 {
        match self {
            Gelu::Tanh => 0.5 * x * (1.0 + tanh_fast(SQRT_TWO_OVER_PI * x * (1.0 + 0.044715 * x * x))),
            Gelu::Erf => (candle_core::cpu::erf::erf_f32(x * std::f32::consts::FRAC_1_SQRT_2) + 1.) * 0.5 * x,
        }
    }

    /// d GELU / dx.
    #[inline(always)]
    fn slope(self, x: f32) -> f32 {
        match self {
            Gelu::Tanh => {
                let t = tanh_fast(SQRT_TWO_OVER_PI * x * (1.0 + 0.044715 * x * x));
                0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * SQRT_TWO_OVER_PI * (1.0 + 3.0 * 0.044715 * x * x)
            }
            Gelu::Erf => {
                let cdf = 0.5 * (1.0 + candle_core::cpu::erf::erf_f32(x * std::f32::consts::FRAC_1_SQRT_2));
                // x · φ(x), φ the standard normal density.
                cdf + x * (-0.5 * x * x).exp() * 0.398_942_3
            }
        }
    }
}

/// GELU of `x` as one op with its own backward (see the module docs); `None` where it does not apply
/// (not f32 on the CPU, or non-contiguous).
pub(crate) fn gelu(x: &Tensor, kind: Gelu) -> Result<Option<Tensor>> {
    if !applies(x) {
        return Ok(None);
    }
    Ok(Some(x.apply_op1(GeluOp(kind))?))
}

struct GeluOp(Gelu);

impl CustomOp1 for GeluOp {
    fn name(&self) -> &'static str {
        "fused-gelu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "fused-gelu")?;
        let kind = self.0;
        Ok((CpuStorage::F32(map1(x, |v| kind.value(v))), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(&grad.contiguous()?, &GeluBackward(self.0))?))
    }
}

/// `g · GELU'(x)`.
struct GeluBackward(Gelu);

impl CustomOp2 for GeluBackward {
    fn name(&self) -> &'static str {
        "fused-gelu-backward"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, g) = f32_pair(xs, xl, gs, gl, "fused-gelu-backward")?;
        let kind = self.0;
        Ok((CpuStorage::F32(map2(x, g, |x, g| g * kind.slope(x))), xl.shape().clone()))
    }
}

/// LayerNorm of `x` [.., D] over its last dim with weight and bias [D], as one op with its own
/// backward (see the module docs); the weight and bias get gradients only where they train. `None`
/// where it does not apply (not f32 on the CPU, non-contiguous, or `w`, `b` not [D]).
pub(crate) fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Option<Tensor>> {
    let d = x.dims().last().copied().unwrap_or(0);
    if !applies(x) || !applies(w) || !applies(b) || d == 0 || w.dims() != [d] || b.dims() != [d] {
        return Ok(None);
    }
    Ok(Some(x.apply_op3(w, b, LayerNormOp { eps: eps as f32 })?))
}

struct LayerNormOp {
    eps: f32,
}

/// A row's mean and `1 / √(var + eps)`, the statistics in f32 as torch computes them.
#[inline(always)]
fn moments(row: &[f32], eps: f32) -> (f32, f32) {
    let n = row.len() as f32;
    let mean = row.iter().sum::<f32>() / n;
    let var = row.iter().map(|&v| (v - mean) * (v - mean)).sum::<f32>() / n;
    (mean, 1.0 / (var + eps).sqrt())
}

/// Rows per parallel task for rows of `d` elements.
pub(crate) fn rows_per_task(d: usize) -> usize {
    (CHUNK / d.max(1)).max(1)
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "fused-layer-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(xs, xl, "fused-layer-norm")?;
        let w = f32_slice(ws, wl, "fused-layer-norm")?;
        let b = f32_slice(bs, bl, "fused-layer-norm")?;
        let d = w.len();
        let eps = self.eps;
        let out = build(x.len(), rows_per_task(d) * d, |s, o| {
            for (o, x) in o.chunks_mut(d).zip(x[s..].chunks(d)) {
                let (mean, rstd) = moments(x, eps);
                for (((o, &x), &w), &b) in o.iter_mut().zip(x).zip(w).zip(b) {
                    o.write((x - mean) * rstd * w + b);
                }
            }
        });
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }

    #[allow(clippy::type_complexity)]
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let dx = x.apply_op3_no_bwd(w, &grad, &LayerNormInputGrad { eps: self.eps })?;
        let (dw, db) = if w.track_op() || b.track_op() {
            let dwb = x.apply_op2_no_bwd(&grad, &LayerNormParamGrad { eps: self.eps })?; // [2, D]
            (w.track_op().then(|| dwb.get(0)).transpose()?, b.track_op().then(|| dwb.get(1)).transpose()?)
        } else {
            (None, None)
        };
        Ok((Some(dx), dw, db))
    }
}

/// `dx = rstd · (ĝ − mean(ĝ) − x̂ · mean(ĝ ⊙ x̂))` with `ĝ = g ⊙ w`, row by row.
struct LayerNormInputGrad {
    eps: f32,
}

impl CustomOp3 for LayerNormInputGrad {
    fn name(&self) -> &'static str {
        "fused-layer-norm-dx"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, g) = f32_pair(xs, xl, gs, gl, "fused-layer-norm-dx")?;
        let w = f32_slice(ws, wl, "fused-layer-norm-dx")?;
        let d = w.len();
        let eps = self.eps;
        let out = build(x.len(), rows_per_task(d) * d, |s, o| {
            for ((o, x), g) in o.chunks_mut(d).zip(x[s..].chunks(d)).zip(g[s..].chunks(d)) {
                let (mean, rstd) = moments(x, eps);
                let n = d as f32;
                let (mut sg, mut sgx) = (0f32, 0f32);
                for ((&x, &g), &w) in x.iter().zip(g).zip(w) {
                    let gh = g * w;
                    sg += gh;
                    sgx += gh * (x - mean) * rstd;
                }
                let (mg, mgx) = (sg / n, sgx / n);
                for (((o, &x), &g), &w) in o.iter_mut().zip(x).zip(g).zip(w) {
                    o.write(rstd * (g * w - mg - (x - mean) * rstd * mgx));
                }
            }
        });
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }
}

/// `[Σ g ⊙ x̂, Σ g]` over all rows: the weight's and the bias's gradients, [2, D].
struct LayerNormParamGrad {
    eps: f32,
}

impl CustomOp2 for LayerNormParamGrad {
    fn name(&self) -> &'static str {
        "fused-layer-norm-dwb"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, g) = f32_pair(xs, xl, gs, gl, "fused-layer-norm-dwb")?;
        let d = xl.shape().dims().last().copied().unwrap_or(1).max(1);
        let eps = self.eps;
        // One partial [Σ g ⊙ x̂, Σ g] per fixed group of rows (in parallel), then their sum in group
        // order: the same gradient on every run, however the threads share the groups.
        let per = rows_per_task(d) * d;
        let groups = x.len().div_ceil(per);
        let partials = build(groups * 2 * d, 2 * d, |s, o| {
            // `o` is group `s / 2d`'s partial.
            let at = s / (2 * d) * per;
            let (x, g) = (&x[at..(at + per).min(x.len())], &g[at..(at + per).min(g.len())]);
            let mut acc = vec![0f32; 2 * d];
            for (x, g) in x.chunks(d).zip(g.chunks(d)) {
                let (mean, rstd) = moments(x, eps);
                let (dw, db) = acc.split_at_mut(d);
                for (((dw, db), &x), &g) in dw.iter_mut().zip(db).zip(x).zip(g) {
                    *dw += g * (x - mean) * rstd;
                    *db += g;
                }
            }
            for (o, a) in o.iter_mut().zip(acc) {
                o.write(a);
            }
        });
        let mut acc = vec![0f32; 2 * d];
        for p in partials.chunks(2 * d) {
            acc.iter_mut().zip(p).for_each(|(a, &p)| *a += p);
        }
        Ok((CpuStorage::F32(acc), Shape::from((2, d))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var, D};

    fn v(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max)
    }

    /// The rational tanh against f64's over [−10, 10] (and at the clamp, ±1): within 4 ulp, i.e.
    /// a relative 4.8e-7 (measured: 4.0e-7).
    #[test]
    fn fast_tanh_is_within_four_ulp() {
        let mut worst = 0f64;
        for i in -200_000..=200_000 {
            let x = i as f32 * 5e-5;
            let exact = (x as f64).tanh();
            let err = (tanh_fast(x) as f64 - exact).abs() / exact.abs().max(1e-30);
            worst = worst.max(err);
        }
        assert!(worst < 4.8e-7, "relative error {worst}");
        assert_eq!(tanh_fast(30.0), 1.0);
        assert_eq!(tanh_fast(-30.0), -1.0);
        assert_eq!(tanh_fast(0.0), 0.0);
    }

    /// Both GELUs at sizes on both sides of the threading threshold: values those of candle's kernels
    /// (erf: bit for bit; tanh: to the rational tanh's 4 ulp), gradients those of candle's composed
    /// backward to rounding (its constants have six digits).
    #[test]
    fn fused_gelu_equals_candles() {
        let dev = Device::Cpu;
        for n in [37, PAR_MIN + 5] {
            let x = Var::from_tensor(&Tensor::randn(0f32, 2.0, (n,), &dev).unwrap()).unwrap();
            let w = Tensor::randn(0f32, 1.0, (n,), &dev).unwrap();
            for kind in [Gelu::Tanh, Gelu::Erf] {
                let plain = match kind {
                    Gelu::Tanh => x.as_tensor().gelu().unwrap(),
                    Gelu::Erf => x.as_tensor().gelu_erf().unwrap(),
                };
                let fused = gelu(x.as_tensor(), kind).unwrap().unwrap();
                match kind {
                    Gelu::Erf => assert_eq!(
                        v(&plain).iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                        v(&fused).iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                        "{kind:?} values, n = {n}"
                    ),
                    Gelu::Tanh => {
                        let d = max_diff(&v(&plain), &v(&fused));
                        assert!(d < 2e-6, "{kind:?} values differ by {d}, n = {n}");
                    }
                }
                let g0 = (plain * &w).unwrap().sum_all().unwrap().backward().unwrap();
                let g1 = (fused * &w).unwrap().sum_all().unwrap().backward().unwrap();
                let (a, b) = (v(g0.get(x.as_tensor()).unwrap()), v(g1.get(x.as_tensor()).unwrap()));
                let d = max_diff(&a, &b);
                assert!(d < 2e-4, "{kind:?} gradients differ by {d}, n = {n}");
                assert!(a.iter().any(|g| g.abs() > 0.1), "a gradient that says something");
            }
        }
    }

    /// Against LayerNorm composed of candle ops: values and the gradients of the input, weight and
    /// bias agree to rounding; a frozen weight and bias get no gradient.
    #[test]
    fn fused_layer_norm_equals_the_composed_ops() {
        let dev = Device::Cpu;
        for rows in [3, PAR_MIN / 16 + 7] {
            let d = 48;
            let x = Var::from_tensor(&(Tensor::randn(0f32, 3.0, (rows, d), &dev).unwrap() + 1.5).unwrap()).unwrap();
            let w = Var::from_tensor(&Tensor::randn(1f32, 0.3, (d,), &dev).unwrap()).unwrap();
            let b = Var::from_tensor(&Tensor::randn(0f32, 0.3, (d,), &dev).unwrap()).unwrap();
            let k = Tensor::randn(0f32, 1.0, (rows, d), &dev).unwrap();
            let eps = 1e-5;
            let xt = x.as_tensor();
            let mean = xt.mean_keepdim(D::Minus1).unwrap();
            let xc = xt.broadcast_sub(&mean).unwrap();
            let var = xc.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
            let plain = xc
                .broadcast_div(&(var + eps).unwrap().sqrt().unwrap())
                .unwrap()
                .broadcast_mul(w.as_tensor())
                .unwrap()
                .broadcast_add(b.as_tensor())
                .unwrap();
            let fused = layer_norm(xt, w.as_tensor(), b.as_tensor(), eps).unwrap().unwrap();
            assert!(max_diff(&v(&plain), &v(&fused)) < 1e-5, "values");
            let g0 = (plain * &k).unwrap().sum_all().unwrap().backward().unwrap();
            let g1 = (fused * &k).unwrap().sum_all().unwrap().backward().unwrap();
            for (name, t, tol) in
                [("x", xt, 1e-5), ("w", w.as_tensor(), 1e-5 * rows as f32), ("b", b.as_tensor(), 1e-5 * rows as f32)]
            {
                let (a, c) = (v(g0.get(t).unwrap()), v(g1.get(t).unwrap()));
                let d = max_diff(&a, &c);
                assert!(d < tol, "{name} gradients differ by {d} (rows {rows})");
            }
            // Frozen weight and bias: the input's gradient alone.
            let frozen = layer_norm(xt, &w.as_tensor().detach(), &b.as_tensor().detach(), eps).unwrap().unwrap();
            let g2 = (frozen * &k).unwrap().sum_all().unwrap().backward().unwrap();
            assert_eq!(g1.get_ids().count(), g2.get_ids().count() + 2, "no gradient for a frozen weight and bias");
            assert!(max_diff(&v(g1.get(xt).unwrap()), &v(g2.get(xt).unwrap())) == 0.0);
        }
    }
}
