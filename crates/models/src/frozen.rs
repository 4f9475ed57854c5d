//! Ops of a training activation with a tensor that gets no gradient (a frozen weight, bias or
//! LayerNorm weight, a mask, a dropout mask, a rotary table), whose backward pass computes the
//! activation's gradient alone.
//!
//! Candle differentiates a recorded op with respect to every float operand and never takes an
//! unrecorded operand's gradient out of its store. So `x · wᵀ` with a frozen `w` would cost a
//! weight-sized gradient nobody reads (a third of the backward pass's matmul work for a frozen
//! linear), and `x + b` with a frozen bias `b` broadcast to `x`'s shape an `x`-sized one; where that
//! gradient is computed from the recorded `x` it is recorded too, and keeps the op's incoming
//! gradient alive until the backward pass ends. Here the constant is part of the op, not an operand.
//! Forward and backward compute exactly what the plain ops compute (the same kernels and layouts for
//! the product, one IEEE operation per element otherwise), so values and gradients are bit for bit
//! those of the plain ops.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Storage, Tensor};

use crate::pointwise::{build, rows_per_task};
use crate::Result;

/// An element-wise op of an activation and a constant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Elementwise {
    Add,
    Mul,
}

/// `x + c` or `x · c` for a constant `c` that broadcasts to `x`'s shape (see the module docs); CPU
/// only (`None` elsewhere, or when `c` does not broadcast to `x`).
pub(crate) fn with_constant(x: &Tensor, c: &Tensor, op: Elementwise) -> Result<Option<Tensor>> {
    if !x.device().is_cpu() || x.dtype() != c.dtype() {
        return Ok(None);
    }
    let Ok(c) = c.broadcast_as(x.shape()) else { return Ok(None) };
    Ok(Some(x.apply_op1(WithConstant { c, op })?))
}

struct WithConstant {
    /// The constant, viewed at the activation's shape.
    c: Tensor,
    op: Elementwise,
}

fn zip_map<T: Copy + Send + Sync>(x: &[T], xl: &Layout, c: &[T], cl: &Layout, f: impl Fn(T, T) -> T + Sync) -> Vec<T> {
    let n = xl.shape().elem_count();
    match (Rows::new(xl), Rows::new(cl)) {
        // Row by row where both have unit stride along the last dim (a bias, a rotary table, a mask
        // broadcast over the leading dims): tight loops over slices, rows split over threads.
        (Some((xr, len)), Some((cr, _))) if len > 0 => {
            let (xr, cr): (Vec<usize>, Vec<usize>) = (xr.collect(), cr.collect());
            build(n, rows_per_task(len) * len, |s, o| {
                for (r, o) in o.chunks_mut(len).enumerate() {
                    let (i, j) = (xr[s / len + r], cr[s / len + r]);
                    for ((o, &a), &b) in o.iter_mut().zip(&x[i..i + len]).zip(&c[j..j + len]) {
                        o.write(f(a, b));
                    }
                }
            })
        }
        _ => Offsets::new(xl).zip(Offsets::new(cl)).map(|(i, j)| f(x[i], c[j])).collect(),
    }
}

/// The storage offsets of a layout's rows (all dims but the last) and the row length, where the last
/// dim has unit stride.
pub(crate) struct Rows;

impl Rows {
    #[allow(clippy::new_ret_no_self)]
    pub(crate) fn new(l: &Layout) -> Option<(Offsets<'_>, usize)> {
        let (&len, outer) = l.dims().split_last()?;
        if len > 1 && l.stride().last() != Some(&1) {
            return None;
        }
        let stride = &l.stride()[..outer.len()];
        Some((Offsets::from_parts(outer, stride, l.start_offset()), len))
    }
}

/// The storage offsets of a layout's elements in row-major order (candle's own iterator is private).
pub(crate) struct Offsets<'a> {
    dims: &'a [usize],
    stride: &'a [usize],
    index: Vec<usize>,
    next: Option<usize>,
}

impl<'a> Offsets<'a> {
    pub(crate) fn new(l: &'a Layout) -> Self {
        Self::from_parts(l.dims(), l.stride(), l.start_offset())
    }

    fn from_parts(dims: &'a [usize], stride: &'a [usize], start: usize) -> Self {
        let next = (dims.iter().product::<usize>() > 0).then_some(start);
        Self { dims, stride, index: vec![0; dims.len()], next }
    }
}

impl Iterator for Offsets<'_> {
    type Item = usize;

    fn next(&mut self) -> Option<usize> {
        let at = self.next?;
        let mut offset = at;
        // Advance the last dim; carry into the ones before it.
        let mut d = self.dims.len();
        loop {
            if d == 0 {
                self.next = None;
                return Some(at);
            }
            d -= 1;
            self.index[d] += 1;
            offset += self.stride[d];
            if self.index[d] < self.dims[d] {
                break;
            }
            offset -= self.stride[d] * self.dims[d];
            self.index[d] = 0;
        }
        self.next = Some(offset);
        Some(at)
    }
}

impl CustomOp1 for WithConstant {
    fn name(&self) -> &'static str {
        "with-constant"
    }

    fn cpu_fwd(&self, x: &CpuStorage, xl: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (c, cl) = self.c.storage_and_layout();
        let Storage::Cpu(c) = &*c else {
            return Err(candle_core::Error::Msg("with-constant: the constant is not on the CPU".into()));
        };
        macro_rules! apply {
            ($x:expr, $c:expr, $variant:ident) => {
                CpuStorage::$variant(match self.op {
                    Elementwise::Add => zip_map($x, xl, $c, cl, |a, b| a + b),
                    Elementwise::Mul => zip_map($x, xl, $c, cl, |a, b| a * b),
                })
            };
        }
        let out = match (x, c) {
            (CpuStorage::F32(x), CpuStorage::F32(c)) => apply!(x, c, F32),
            (CpuStorage::F64(x), CpuStorage::F64(c)) => apply!(x, c, F64),
            (CpuStorage::F16(x), CpuStorage::F16(c)) => apply!(x, c, F16),
            (CpuStorage::BF16(x), CpuStorage::BF16(c)) => apply!(x, c, BF16),
            _ => return Err(candle_core::Error::Msg("with-constant: unsupported or mixed dtypes".into())),
        };
        Ok((out, xl.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        // What candle's add and mul give their left operand.
        Ok(Some(match self.op {
            Elementwise::Add => grad.clone(),
            Elementwise::Mul => grad.mul(&self.c)?,
        }))
    }
}

/// `x [rows, k] · wᵀ` for a frozen `w [n, k]` (see the module docs).
pub(crate) fn frozen_matmul(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    Ok(x.apply_op1(FrozenMatmul { w: w.clone(), wt: w.t()? })?)
}

struct FrozenMatmul {
    w: Tensor,
    /// `w.t()`: the right operand, with the layout `x.matmul(&w.t())` would hand the kernel.
    wt: Tensor,
}

impl FrozenMatmul {
    /// (batch, m, n, k) as `Tensor::matmul` passes them.
    fn bmnk(&self, layout: &Layout) -> candle_core::Result<(usize, usize, usize, usize)> {
        let (rows, k) = layout.shape().dims2()?;
        Ok((1, rows, self.w.dim(0)?, k))
    }
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(&self, x: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, m, n, k) = self.bmnk(layout)?;
        let (w, wl) = self.wt.storage_and_layout();
        match &*w {
            Storage::Cpu(w) => Ok((x.matmul(w, (b, m, n, k), layout, wl)?, Shape::from((m, n)))),
            _ => Err(candle_core::Error::Msg("frozen-matmul: the weight is not on the CPU".into())),
        }
    }

    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (b, m, n, k) = self.bmnk(layout)?;
        let (w, wl) = self.wt.storage_and_layout();
        match &*w {
            Storage::Cuda(w) => Ok((x.matmul(w, (b, m, n, k), layout, wl)?, Shape::from((m, n)))),
            _ => Err(candle_core::Error::Msg("frozen-matmul: the weight is not on the GPU".into())),
        }
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        // What candle's matmul backward computes for its left operand: grad · (wᵀ)ᵀ.
        Ok(Some(grad.matmul(&self.wt.t()?)?))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor, Var};

    /// Values and the activation's gradient equal the plain product's bit for bit; the frozen
    /// weight gets no gradient.
    #[test]
    fn frozen_matmul_equals_the_plain_product() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (7, 5), &dev).unwrap();
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (4, 5), &dev).unwrap()).unwrap();
        let weights = Tensor::randn(0f32, 1.0, (4, 7), &dev).unwrap();
        let run = |y: Tensor| {
            let loss = (y.clone() * &weights).unwrap().sum_all().unwrap();
            let g = loss.backward().unwrap();
            let gx = g.get(x.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            (y.flatten_all().unwrap().to_vec1::<f32>().unwrap(), gx, g.get_ids().count())
        };
        let (y0, g0, stored0) = run(x.as_tensor().matmul(&w.t().unwrap()).unwrap());
        let (y1, g1, stored1) = run(super::frozen_matmul(x.as_tensor(), &w).unwrap());
        // The plain product leaves a gradient for wᵀ in the store too; the frozen one does not.
        assert_eq!(stored0, stored1 + 1, "gradients stored: plain {stored0}, frozen {stored1}");
        assert_eq!(
            y0.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            y1.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
        assert_eq!(
            g0.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            g1.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
    }

    /// `x + c` and `x · c` with a broadcast constant (a non-contiguous `x` too): values and the
    /// activation's gradient equal the plain ops' bit for bit, and no gradient is stored for `c`.
    #[test]
    fn constants_get_no_gradient_and_change_no_bit() {
        use super::{with_constant, Elementwise};
        let dev = Device::Cpu;
        let c = Tensor::randn(0f32, 1.0, (1, 6), &dev).unwrap();
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (6, 4), &dev).unwrap()).unwrap();
        let weights = Tensor::randn(0f32, 1.0, (4, 6), &dev).unwrap();
        let bits = |t: &Tensor| {
            t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        };
        for op in [Elementwise::Add, Elementwise::Mul] {
            let xt = x.as_tensor().t().unwrap(); // [4, 6], transposed strides
            let plain = match op {
                Elementwise::Add => xt.broadcast_add(&c).unwrap(),
                Elementwise::Mul => xt.broadcast_mul(&c).unwrap(),
            };
            let fused = with_constant(&xt, &c, op).unwrap().unwrap();
            assert_eq!(bits(&plain), bits(&fused), "{op:?} values");
            let g0 = (plain * &weights).unwrap().sum_all().unwrap().backward().unwrap();
            let g1 = (fused * &weights).unwrap().sum_all().unwrap().backward().unwrap();
            assert_eq!(bits(g0.get(x.as_tensor()).unwrap()), bits(g1.get(x.as_tensor()).unwrap()), "{op:?} gradient");
            assert_eq!(g0.get_ids().count(), g1.get_ids().count() + 1, "{op:?}: the constant's gradient is gone");
        }
    }
}
