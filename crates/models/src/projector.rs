//! The `mlp2x_gelu` connector: `model.mm_projector.{0,2}` (nn.Sequential indices kept).

use crate::loader::Vb;
use crate::nn::Linear;
use crate::ops::Ops;
use crate::Result;

/// Linear(mm_hidden → hidden), erf GELU, Linear(hidden → hidden).
#[derive(Debug, Clone)]
pub struct Projector {
    pub l0: Linear,
    pub l2: Linear,
}

impl Projector {
    pub fn new(vb: &Vb, mm_hidden: usize, hidden: usize) -> Result<Self> {
        Ok(Self {
            l0: Linear::new(&vb.pp(0), mm_hidden, hidden, true)?,
            l2: Linear::new(&vb.pp(2), hidden, hidden, true)?,
        })
    }

    /// [B, N, mm_hidden] → [B, N, hidden].
    pub fn forward<O: Ops>(&self, o: &mut O, x: &O::T) -> Result<O::T> {
        let h = self.l0.forward(o, x)?;
        let h = o.gelu_erf(&h)?;
        self.l2.forward(o, &h)
    }
}
