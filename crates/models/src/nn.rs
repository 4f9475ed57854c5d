//! The two building blocks every module uses, generic over [`Ops`].

use crate::loader::Vb;
use crate::ops::{Lora, LoraArgs, Ops, Param};
use crate::Result;

/// torch `nn.Linear`: weight [out, in], optional bias [out], optional LoRA adapter.
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Param,
    pub bias: Option<Param>,
    pub lora: Option<Lora>,
}

impl Linear {
    /// Loads `{vb}.weight` [out, in] and `{vb}.bias` [out] (required when `bias`).
    pub fn new(vb: &Vb, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let weight = vb.get("weight", &[out_dim, in_dim])?;
        let bias = if bias { Some(vb.get("bias", &[out_dim])?) } else { None };
        let lora = vb.lora(in_dim, out_dim)?;
        Ok(Self { weight, bias, lora })
    }

    /// Loads a linear layer whose dims the checkpoint decides (`[out, in]` read from the weight).
    pub fn from_shape(vb: &Vb, bias: bool) -> Result<Self> {
        let s = vb.require_shape("weight")?;
        if s.len() != 2 {
            return Err(crate::Error::ShapeMismatch { key: vb.key("weight"), expected: vec![0, 0], found: s });
        }
        Self::new(vb, s[1], s[0], bias)
    }

    /// `(in, out)` features.
    pub fn dims(&self) -> (usize, usize) {
        (self.weight.dims()[1], self.weight.dims()[0])
    }

    pub fn forward<O: Ops>(&self, o: &mut O, x: &O::T) -> Result<O::T> {
        let w = o.param(&self.weight)?;
        let b = match &self.bias {
            Some(b) => Some(o.param(b)?),
            None => None,
        };
        let Some(l) = &self.lora else { return o.linear(x, &w, b.as_ref()) };
        let a = o.param(&l.a)?;
        let bm = o.param(&l.b)?;
        o.lora_linear(x, &w, b.as_ref(), &LoraArgs { a: &a, b: &bm, scale: l.scale, dropout: l.dropout })
    }
}

/// torch `nn.LayerNorm` over the last dim.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    pub weight: Param,
    pub bias: Param,
    pub eps: f64,
}

impl LayerNorm {
    /// Loads `{vb}.weight` and `{vb}.bias`, both [dim].
    pub fn new(vb: &Vb, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self { weight: vb.get("weight", &[dim])?, bias: vb.get("bias", &[dim])?, eps })
    }

    pub fn forward<O: Ops>(&self, o: &mut O, x: &O::T) -> Result<O::T> {
        let w = o.param(&self.weight)?;
        let b = o.param(&self.bias)?;
        o.layer_norm(x, &w, &b, self.eps)
    }

    /// `(x + delta, self(x + delta))`: a residual sum and this norm of it, in one op where the
    /// interpreter fuses them ([`Ops::residual_layer_norm`]).
    pub fn residual<O: Ops>(&self, o: &mut O, x: &O::T, delta: &O::T) -> Result<(O::T, O::T)> {
        let w = o.param(&self.weight)?;
        let b = o.param(&self.bias)?;
        o.residual_layer_norm(x, delta, &w, &b, self.eps)
    }
}
