//! The product of a training activation with a frozen weight, as one candle op whose backward pass
//! computes the activation's gradient alone.
//!
//! Candle differentiates a recorded matmul with respect to both operands, so `x · wᵀ` with a frozen
//! `w` would cost a weight-sized gradient nobody reads (a third of the backward pass's matmul work
//! for a frozen linear), and that gradient, recorded against `x`, would keep the layer's incoming
//! gradient alive until the backward pass ends. Here `w` is not an operand of the op but part of it.
//! Forward and backward run the very kernels (and layouts) `Tensor::matmul` would, so values and
//! gradients are bit for bit those of the plain product.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Storage, Tensor};

use crate::Result;

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
}
