//! The op trait the model is written against, and its candle interpreter.
//!
//! Every forward pass in this crate is generic over [`Ops`]: the candle interpreter below runs it (and
//! keeps autograd for training), and the exporter's graph builder records the same calls as ONNX nodes,
//! so the exported graphs cannot drift from the model that trains. Rules that keep both interpreters
//! honest: forwards never read a batch or sequence length into a Rust integer and never branch on
//! tensor values; every op here has a direct ONNX lowering.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor, TensorId, D};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::Result;

/// A named weight: the checkpoint key it was loaded from and its value.
#[derive(Debug, Clone)]
pub struct Param {
    /// Full safetensors key, e.g. `model.layers.0.self_attn.q_proj.weight`.
    pub key: String,
    /// The tensor (a candle `Var`'s tensor when training).
    pub t: Tensor,
}

impl Param {
    /// Pairs a key with its tensor.
    pub fn new(key: impl Into<String>, t: Tensor) -> Self {
        Self { key: key.into(), t }
    }
    /// Dims of the weight (weights have static shapes).
    pub fn dims(&self) -> &[usize] {
        self.t.dims()
    }
}

/// A LoRA adapter on a linear layer: `y += scale · B·A·dropout(x)`, A [r, in], B [out, r]. Never
/// formed into a dense delta in the forward; merging is a separate step (see `crate::adapter`). Beside [`Param`] because a weight source
/// hands it out with the weights it adapts..
#[derive(Debug, Clone)]
pub struct Lora {
    pub a: Param,
    pub b: Param,
    pub scale: f64,
    pub dropout: f32,
}

/// A LoRA adapter's values for [`Ops::lora_linear`].
#[derive(Debug)]
pub struct LoraArgs<'a, T> {
    /// [r, in].
    pub a: &'a T,
    /// [out, r].
    pub b: &'a T,
    pub scale: f64,
    /// Dropout probability on the adapter's input.
    pub dropout: f32,
}

/// A decoder self-attention over a KV cache, handed whole to an interpreter that has one fused
/// kernel for it (the exporter's `--fused` graphs: ONNX Runtime's `GroupQueryAttention`).
#[derive(Debug)]
pub struct SelfAttention<'a, T> {
    /// The layer-normed input [B, S, D].
    pub x: &'a T,
    /// The q, k and v projections: weight [D, D] and bias [D] each (LoRA merged).
    pub qkv: [(&'a Param, Option<&'a Param>); 3],
    pub heads: usize,
    /// Leading dims of each head that rotate (NeoX rotate_half); the rest pass through.
    pub rotary_dims: usize,
    pub rope_theta: f64,
    /// This layer's cache, post-RoPE (K, V).
    pub past: Option<&'a (T, T)>,
    /// [B, P+S], 1 = attend.
    pub mask2d: &'a T,
    /// [B, S].
    pub position_ids: &'a T,
}

/// The operations a forward pass may use. `T` is a tensor (candle) or a graph value (ONNX).
pub trait Ops {
    /// A value flowing through the forward pass.
    type T: Clone;

    /// A weight as a value (candle: the tensor itself; ONNX: an initializer named by `p.key`).
    fn param(&mut self, p: &Param) -> Result<Self::T>;
    /// `x @ wᵀ + b` for a torch-layout weight `w` [out, in].
    fn linear(&mut self, x: &Self::T, w: &Self::T, b: Option<&Self::T>) -> Result<Self::T>;
    /// A linear layer with a LoRA adapter: `x @ wᵀ + b + scale · (dropout(x) @ aᵀ) @ bᵀ`. The
    /// default composes it from the ops here; the candle interpreter trains it as one op.
    fn lora_linear(
        &mut self,
        x: &Self::T,
        w: &Self::T,
        b: Option<&Self::T>,
        l: &LoraArgs<'_, Self::T>,
    ) -> Result<Self::T> {
        composite_lora_linear(self, x, w, b, l)
    }
    /// Batched matrix product over the last two dims.
    fn matmul(&mut self, a: &Self::T, b: &Self::T) -> Result<Self::T>;
    /// Element-wise sum with numpy broadcasting.
    fn add(&mut self, a: &Self::T, b: &Self::T) -> Result<Self::T>;
    /// Element-wise difference with broadcasting.
    fn sub(&mut self, a: &Self::T, b: &Self::T) -> Result<Self::T>;
    /// Element-wise product with broadcasting.
    fn mul(&mut self, a: &Self::T, b: &Self::T) -> Result<Self::T>;
    /// `x · mul + add` with scalars.
    fn affine(&mut self, x: &Self::T, mul: f64, add: f64) -> Result<Self::T>;
    /// LayerNorm over the last dim.
    fn layer_norm(&mut self, x: &Self::T, w: &Self::T, b: &Self::T, eps: f64) -> Result<Self::T>;
    /// GELU, tanh approximation (`gelu_pytorch_tanh`, phi's `gelu_new`).
    fn gelu_tanh(&mut self, x: &Self::T) -> Result<Self::T>;
    /// GELU with erf (torch `nn.GELU()`, BERT `gelu`).
    fn gelu_erf(&mut self, x: &Self::T) -> Result<Self::T>;
    /// ReLU.
    fn relu(&mut self, x: &Self::T) -> Result<Self::T>;
    /// Logistic sigmoid.
    fn sigmoid(&mut self, x: &Self::T) -> Result<Self::T>;
    /// Softmax over the last dim, computed in f32 and cast back.
    fn softmax_last(&mut self, x: &Self::T) -> Result<Self::T>;
    /// Swaps two dims.
    fn transpose(&mut self, x: &Self::T, d1: usize, d2: usize) -> Result<Self::T>;
    /// `[B, L, H·D] → [B, H, L, D]`.
    fn split_heads(&mut self, x: &Self::T, heads: usize) -> Result<Self::T>;
    /// `[B, H, L, D] → [B, L, H·D]`.
    fn merge_heads(&mut self, x: &Self::T) -> Result<Self::T>;
    /// `x[.., start .. start+len, ..]` along `dim`; `len = None` runs to the end.
    fn narrow(&mut self, x: &Self::T, dim: usize, start: usize, len: Option<usize>) -> Result<Self::T>;
    /// Concatenation along `dim`.
    fn cat(&mut self, xs: &[Self::T], dim: usize) -> Result<Self::T>;
    /// Rows of `table` [V, D] picked by integer `ids` [B, L] → [B, L, D].
    fn embedding(&mut self, table: &Self::T, ids: &Self::T) -> Result<Self::T>;
    /// Non-overlapping patch convolution: `pixels` [B, C, S, S], `w` [D, C, p, p] → [B, N, D].
    fn patchify(&mut self, pixels: &Self::T, w: &Self::T, b: &Self::T, patch: usize) -> Result<Self::T>;
    /// A `[1, n, d]` weight repeated over the batch of `like` ([B, …]) → [B, n, d].
    fn expand_batch(&mut self, x: &Self::T, like: &Self::T) -> Result<Self::T>;
    /// `(cos, sin)` [B, 1, L, rot] for integer `position_ids` [B, L] (NeoX layout, halves repeated).
    fn rope_tables(&mut self, position_ids: &Self::T, rot_dims: usize, theta: f64) -> Result<(Self::T, Self::T)>;
    /// Rotates the first `rot_dims` of `x` [B, H, L, D] (rotate_half); the rest pass through.
    fn rope(&mut self, x: &Self::T, cos: &Self::T, sin: &Self::T, rot_dims: usize) -> Result<Self::T>;
    /// Additive mask [B, 1, S, P+S] for a causal decoder: `mask2d` [B, P+S] (1 = keep), queries are the
    /// last S = `query_like.dim(2)` positions. Masked entries get the dtype's minimum.
    fn causal_bias(&mut self, mask2d: &Self::T, query_like: &Self::T) -> Result<Self::T>;
    /// Additive BERT mask [B, 1, 1, L] from `mask2d` [B, L] (1 = keep): `(1 − m) · fill`.
    fn padding_bias(&mut self, mask2d: &Self::T, fill: f64) -> Result<Self::T>;
    /// A `[B, L]` mask of ones shaped like the first two dims of `like`.
    fn ones_mask(&mut self, like: &Self::T) -> Result<Self::T>;
    /// Integer positions `[1, L]` = 0..L for L = `like.dim(1)`.
    fn positions_like(&mut self, like: &Self::T) -> Result<Self::T>;
    /// The last `keep` positions of `x` [B, S, …] along dim 1, `keep` an int64 scalar (a graph input
    /// in ONNX, so one graph serves a prefill that needs one row and a scoring pass that needs all).
    fn last_positions(&mut self, x: &Self::T, keep: &Self::T) -> Result<Self::T>;
    /// Inverted dropout with drop probability `p` while training; the identity otherwise (and in ONNX).
    fn dropout(&mut self, x: &Self::T, p: f32) -> Result<Self::T>;
    /// Rows `idx` [B, K] (int64, per batch row) of `x` [B, S, D] along dim 1 → [B, K, D].
    fn gather_positions(&mut self, x: &Self::T, idx: &Self::T) -> Result<Self::T>;

    /// `a` computed by one fused kernel: the attention output [B, S, H·Dh] (heads merged, before
    /// the output projection) and the present (K, V). `None` (the default) makes the model compose
    /// it from the ops above.
    #[allow(clippy::type_complexity)]
    fn fused_self_attention(
        &mut self,
        _a: &SelfAttention<'_, Self::T>,
    ) -> Result<Option<(Self::T, (Self::T, Self::T))>> {
        Ok(None)
    }

    /// Bidirectional multi-head attention without a mask, handed whole to an interpreter with a
    /// fused kernel: q, k, v [B, N, D] (projected, heads not split) → [B, N, D] heads merged.
    /// `None` (the default) makes the model compose it.
    fn fused_mha(
        &mut self,
        _q: &Self::T,
        _k: &Self::T,
        _v: &Self::T,
        _heads: usize,
        _scale: f64,
    ) -> Result<Option<Self::T>> {
        Ok(None)
    }

    /// Whether [`Ops::checkpoint`] checkpoints (then layers run as blocks and no cache is returned).
    fn checkpointing(&self) -> bool {
        false
    }

    /// Runs `block` on `inputs` (activations that get gradients) and `ctx` (masks, positions: no
    /// gradient). The candle interpreter checkpoints it when training asks for it (see
    /// [`Candle::checkpoint`]); every other interpreter just runs it.
    fn checkpoint<B: Block>(&mut self, block: B, inputs: &[Self::T], ctx: &[Self::T]) -> Result<Vec<Self::T>>
    where
        Self: Sized,
    {
        block.forward(self, inputs, ctx)
    }

    /// `(x + delta, LayerNorm(x + delta))`: a residual stream and the next block's normed input
    /// (one `SkipLayerNormalization` in fused graphs).
    fn residual_layer_norm(
        &mut self,
        x: &Self::T,
        delta: &Self::T,
        w: &Self::T,
        b: &Self::T,
        eps: f64,
    ) -> Result<(Self::T, Self::T)> {
        composite_residual_layer_norm(self, x, delta, w, b, eps)
    }

    /// Scaled dot-product attention over split heads: `softmax(q kᵀ · scale + bias) v`, q [B, H, Lq, Dh],
    /// k and v [B, H, Lk, Dh], `bias` broadcast to [B, H, Lq, Lk]. Interpreters computing in f16
    /// override it: real phi-2 weights give q·k products past f16's 65,504 (see [`attention_f32_scores`]).
    fn attention(
        &mut self,
        q: &Self::T,
        k: &Self::T,
        v: &Self::T,
        bias: Option<&Self::T>,
        scale: f64,
    ) -> Result<Self::T>
    where
        Self: Sized,
    {
        composite_attention(self, q, k, v, bias, scale)
    }
}

/// Scaled dot-product attention over split heads (see [`Ops::attention`]).
pub fn attention<O: Ops>(o: &mut O, q: &O::T, k: &O::T, v: &O::T, bias: Option<&O::T>, scale: f64) -> Result<O::T> {
    o.attention(q, k, v, bias, scale)
}

/// [`Ops::lora_linear`] from the basic ops: the frozen layer, then the adapter's low-rank path.
pub fn composite_lora_linear<O: Ops + ?Sized>(
    o: &mut O,
    x: &O::T,
    w: &O::T,
    b: Option<&O::T>,
    l: &LoraArgs<'_, O::T>,
) -> Result<O::T> {
    let y = o.linear(x, w, b)?;
    let h = o.dropout(x, l.dropout)?;
    let h = o.linear(&h, l.a, None)?; // [.., r]
    let h = o.linear(&h, l.b, None)?; // [.., out]
    let h = o.affine(&h, l.scale, 0.0)?;
    o.add(&y, &h)
}

/// `(x + delta, LayerNorm(x + delta))` from the basic ops: the default of
/// [`Ops::residual_layer_norm`], for interpreters that fuse it only sometimes.
pub fn composite_residual_layer_norm<O: Ops + ?Sized>(
    o: &mut O,
    x: &O::T,
    delta: &O::T,
    w: &O::T,
    b: &O::T,
    eps: f64,
) -> Result<(O::T, O::T)> {
    let sum = o.add(x, delta)?;
    let normed = o.layer_norm(&sum, w, b, eps)?;
    Ok((sum, normed))
}

/// [`Ops::attention`] from the elementary ops, scores in the compute type: the default, and what
/// interpreters that override it use outside f16.
pub fn composite_attention<O: Ops>(
    o: &mut O,
    q: &O::T,
    k: &O::T,
    v: &O::T,
    bias: Option<&O::T>,
    scale: f64,
) -> Result<O::T> {
    let kt = o.transpose(k, 2, 3)?;
    let scores = o.matmul(q, &kt)?; // [B, H, Lq, Lk]
    let scores = o.affine(&scores, scale, 0.0)?;
    let scores = match bias {
        Some(b) => o.add(&scores, b)?,
        None => scores,
    };
    let probs = o.softmax_last(&scores)?;
    o.matmul(&probs, v)
}

/// How much an additive mask is amplified once scores are f32: a masked entry of f16's mask value
/// (about −3.3·10⁴) must stay far below any real score, and scores in f32 may exceed 6.5·10⁴.
pub const F16_MASK_TO_F32: f64 = 1e30;

/// f16 attention without overflow (transformers PR #28163 upcasts phi-2's q and k for the same
/// reason): q·kᵀ, the scale, the mask and the softmax in f32, only the probabilities back in f16 for
/// the product with v. Candle side; the exporter's graph builder records the same steps.
fn attention_f32_scores(q: &Tensor, k: &Tensor, v: &Tensor, bias: Option<&Tensor>, scale: f64) -> Result<Tensor> {
    let dt = q.dtype();
    let qf = q.to_dtype(DType::F32)?.contiguous()?;
    let kt = k.to_dtype(DType::F32)?.transpose(2, 3)?.contiguous()?;
    let mut scores = (qf.matmul(&kt)? * scale)?;
    if let Some(b) = bias {
        // The mask in f16 may be −∞ or f16's minimum: either way it must dominate f32 scores.
        let b = b.to_dtype(DType::F32)?.clamp(-65504f32, 0f32)?.affine(F16_MASK_TO_F32, 0.0)?;
        scores = scores.broadcast_add(&b)?;
    }
    let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(dt)?;
    Ok(probs.matmul(&v.contiguous()?)?)
}

/// A piece of a forward pass (a layer) that gradient checkpointing may run twice: unrecorded in the
/// forward pass, then again, recorded, in the backward pass. It owns what it needs (cheap clones of
/// the layer's parameters), because the backward pass runs it after the forward has returned.
pub trait Block: Send + Sync + 'static {
    /// The block's outputs from `inputs` (activations) and `ctx` (no gradient).
    fn forward<O: Ops>(&self, o: &mut O, inputs: &[O::T], ctx: &[O::T]) -> Result<Vec<O::T>>;
}

/// The gradients of parameters used inside checkpointed blocks: the backward pass computes them while
/// it recomputes the blocks, outside the gradient store `backward()` returns.
#[derive(Debug, Clone, Default)]
pub struct SideGrads(Arc<Mutex<HashMap<TensorId, Tensor>>>);

impl SideGrads {
    /// Removes and returns the gradient accumulated for `t`.
    pub fn take(&self, t: &Tensor) -> Option<Tensor> {
        self.0.lock().ok()?.remove(&t.id())
    }

    /// Adds `g` to the gradient of `t`.
    pub(crate) fn add(&self, t: &Tensor, g: Tensor) -> Result<()> {
        let mut m = self.0.lock().map_err(|_| crate::Error::Input("checkpoint gradients poisoned".into()))?;
        let g = match m.remove(&t.id()) {
            Some(prev) => (prev + g)?,
            None => g,
        };
        m.insert(t.id(), g);
        Ok(())
    }
}

/// The candle interpreter: runs the ops on tensors.
#[derive(Debug, Clone)]
pub struct Candle {
    /// Device new tensors (masks, rope tables) are created on.
    pub device: Device,
    /// Compute dtype of activations.
    pub dtype: DType,
    /// Set while training: dropout masks come from this seeded RNG, so a run (and its resume) is
    /// reproducible, and every op keeps its backward; `None` (inference) makes dropout the identity
    /// and allows fused kernels without gradients.
    pub dropout_rng: Option<StdRng>,
    /// Gradient checkpointing (training): [`Ops::checkpoint`] blocks keep only their inputs, and the
    /// gradients of the parameters inside them arrive here during `backward()`.
    pub checkpointing: Option<SideGrads>,
    /// A block's unrecorded forward: parameters are handed out detached.
    pub(crate) quiet: bool,
    /// A block's forward or recomputation: the parameters it used (which train; whose gradients to
    /// collect).
    pub(crate) used: Option<Arc<Mutex<Vec<Tensor>>>>,
}

impl Candle {
    /// An inference interpreter computing in `dtype` on `device`.
    pub fn new(device: Device, dtype: DType) -> Self {
        Self { device, dtype, dropout_rng: None, checkpointing: None, quiet: false, used: None }
    }

    /// A training interpreter whose dropout masks derive from `seed`.
    pub fn training(device: Device, dtype: DType, seed: u64) -> Self {
        Self { dropout_rng: Some(StdRng::seed_from_u64(seed)), ..Self::new(device, dtype) }
    }

    /// `a + b` or `a · b` with numpy broadcasting. Training, where one operand is recorded and the
    /// other a constant broadcast to its shape, the constant gets no gradient (`crate::frozen`).
    fn elementwise(&self, a: &Tensor, b: &Tensor, op: crate::frozen::Elementwise) -> Result<Tensor> {
        use crate::frozen::{with_constant, Elementwise};
        if self.dropout_rng.is_some() && a.track_op() != b.track_op() {
            let (x, c) = if a.track_op() { (a, b) } else { (b, a) };
            if let Some(y) = with_constant(x, c, op)? {
                return Ok(y);
            }
        }
        Ok(match op {
            Elementwise::Add => a.broadcast_add(b)?,
            Elementwise::Mul => a.broadcast_mul(b)?,
        })
    }
}

impl Ops for Candle {
    type T = Tensor;

    fn param(&mut self, p: &Param) -> Result<Tensor> {
        if let Some(used) = &self.used {
            used.lock().map_err(|_| crate::Error::Input("checkpoint parameters poisoned".into()))?.push(p.t.clone());
        }
        Ok(if self.quiet { p.t.detach() } else { p.t.clone() })
    }
    fn checkpointing(&self) -> bool {
        self.checkpointing.is_some()
    }
    fn checkpoint<B: Block>(&mut self, block: B, inputs: &[Tensor], ctx: &[Tensor]) -> Result<Vec<Tensor>> {
        if self.checkpointing.is_none() {
            return block.forward(self, inputs, ctx);
        }
        self.checkpointed(
            Arc::new(move |o: &mut Candle, x: &[Tensor], c: &[Tensor]| block.forward(o, x, c)),
            inputs,
            ctx,
        )
    }
    fn linear(&mut self, x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
        // One [rows, in] × [in, out] product: broadcasting the weight over the batch instead makes
        // candle materialise a [B, in, out] copy of it (for phi's lm_head, B × 2560 × 50295 floats).
        let dims = x.dims();
        let (k, n) = (dims[dims.len() - 1], w.dim(0)?);
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().expect("linear input has at least one dim") = n;
        let x2 = x.reshape((rows, k))?;
        // Training through a frozen weight: no gradient for the weight (see `crate::frozen`).
        let y = if self.dropout_rng.is_some() && x2.track_op() && !w.track_op() {
            crate::frozen::frozen_matmul(&x2, w)?
        } else {
            x2.matmul(&w.t()?)?
        };
        let y = y.reshape(out_dims)?;
        Ok(match b {
            Some(b) => self.elementwise(&y, b, crate::frozen::Elementwise::Add)?,
            None => y,
        })
    }
    fn lora_linear(&mut self, x: &Tensor, w: &Tensor, b: Option<&Tensor>, l: &LoraArgs<'_, Tensor>) -> Result<Tensor> {
        if let Some(rng) = self.dropout_rng.as_mut() {
            // Training on the CPU: one op (`crate::lora`). Whether it applies does not depend on
            // what is recorded, so a checkpointed block's two forwards both take it: same masks.
            let layer = crate::lora::LoraLinear { w, bias: b, a: l.a, b: l.b, scale: l.scale };
            if layer.applies(x) {
                let mask = crate::lora::Mask::draw(rng, x.elem_count(), l.dropout);
                return layer.forward(x, mask);
            }
        }
        composite_lora_linear(self, x, w, b, l)
    }
    fn matmul(&mut self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        Ok(a.contiguous()?.matmul(&b.contiguous()?)?)
    }
    fn add(&mut self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        self.elementwise(a, b, crate::frozen::Elementwise::Add)
    }
    fn sub(&mut self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        Ok(a.broadcast_sub(b)?)
    }
    fn mul(&mut self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        self.elementwise(a, b, crate::frozen::Elementwise::Mul)
    }
    fn affine(&mut self, x: &Tensor, mul: f64, add: f64) -> Result<Tensor> {
        Ok(x.affine(mul, add)?)
    }
    fn layer_norm(&mut self, x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
        if self.dropout_rng.is_some() {
            // Training: one op with its own backward (`crate::pointwise`).
            if let Some(y) = crate::pointwise::layer_norm(x, w, b, eps)? {
                return Ok(y);
            }
        }
        // Statistics in f32 whatever the compute dtype, as torch does for half inputs.
        let dt = x.dtype();
        let xf = x.to_dtype(DType::F32)?;
        let mean = xf.mean_keepdim(D::Minus1)?;
        let xc = xf.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        let y = xc.broadcast_div(&(var + eps)?.sqrt()?)?.to_dtype(dt)?;
        let y = self.elementwise(&y, w, crate::frozen::Elementwise::Mul)?;
        self.elementwise(&y, b, crate::frozen::Elementwise::Add)
    }
    fn gelu_tanh(&mut self, x: &Tensor) -> Result<Tensor> {
        if self.dropout_rng.is_some() {
            if let Some(y) = crate::pointwise::gelu(x, crate::pointwise::Gelu::Tanh)? {
                return Ok(y);
            }
        }
        Ok(x.gelu()?)
    }
    fn gelu_erf(&mut self, x: &Tensor) -> Result<Tensor> {
        if self.dropout_rng.is_some() {
            if let Some(y) = crate::pointwise::gelu(x, crate::pointwise::Gelu::Erf)? {
                return Ok(y);
            }
        }
        Ok(x.gelu_erf()?)
    }
    fn relu(&mut self, x: &Tensor) -> Result<Tensor> {
        Ok(x.relu()?)
    }
    fn sigmoid(&mut self, x: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::sigmoid(x)?)
    }
    fn softmax_last(&mut self, x: &Tensor) -> Result<Tensor> {
        let dt = x.dtype();
        let xf = x.to_dtype(DType::F32)?;
        // candle's fused softmax_last_dim records no backward op: gradients would silently stop at
        // every attention softmax (q and k would never learn). Training uses the composite form.
        let y = if self.dropout_rng.is_some() {
            candle_nn::ops::softmax(&xf, D::Minus1)?
        } else {
            candle_nn::ops::softmax_last_dim(&xf)?
        };
        Ok(y.to_dtype(dt)?)
    }
    fn transpose(&mut self, x: &Tensor, d1: usize, d2: usize) -> Result<Tensor> {
        Ok(x.transpose(d1, d2)?)
    }
    fn split_heads(&mut self, x: &Tensor, heads: usize) -> Result<Tensor> {
        let (b, l, hd) = x.dims3()?;
        Ok(x.reshape((b, l, heads, hd / heads))?.transpose(1, 2)?.contiguous()?)
    }
    fn merge_heads(&mut self, x: &Tensor) -> Result<Tensor> {
        let (b, h, l, d) = x.dims4()?;
        Ok(x.transpose(1, 2)?.contiguous()?.reshape((b, l, h * d))?)
    }
    fn narrow(&mut self, x: &Tensor, dim: usize, start: usize, len: Option<usize>) -> Result<Tensor> {
        let len = len.unwrap_or(x.dim(dim)?.saturating_sub(start));
        Ok(x.narrow(dim, start, len)?)
    }
    fn cat(&mut self, xs: &[Tensor], dim: usize) -> Result<Tensor> {
        Ok(Tensor::cat(xs, dim)?)
    }
    fn embedding(&mut self, table: &Tensor, ids: &Tensor) -> Result<Tensor> {
        let (b, l) = ids.dims2()?;
        let flat = ids.flatten_all()?;
        Ok(table.index_select(&flat, 0)?.reshape((b, l, table.dim(1)?))?)
    }
    fn patchify(&mut self, pixels: &Tensor, w: &Tensor, b: &Tensor, patch: usize) -> Result<Tensor> {
        let y = pixels.conv2d(w, 0, patch, 1, 1)?; // [B, D, h, w]
        let y = y.broadcast_add(&b.reshape((1, (), 1, 1))?)?;
        Ok(y.flatten_from(2)?.transpose(1, 2)?.contiguous()?)
    }
    fn expand_batch(&mut self, x: &Tensor, like: &Tensor) -> Result<Tensor> {
        let (_, n, d) = x.dims3()?;
        Ok(x.broadcast_as((like.dim(0)?, n, d))?.contiguous()?)
    }
    fn rope_tables(&mut self, position_ids: &Tensor, rot_dims: usize, theta: f64) -> Result<(Tensor, Tensor)> {
        let inv: Vec<f32> =
            (0..rot_dims / 2).map(|i| (1.0 / theta.powf(2.0 * i as f64 / rot_dims as f64)) as f32).collect();
        let inv = Tensor::new(inv, &self.device)?.reshape((1, 1, ()))?;
        let pos = position_ids.to_dtype(DType::F32)?.unsqueeze(2)?; // [B, L, 1]
        let freqs = pos.broadcast_mul(&inv)?; // [B, L, rot/2]
        let emb = Tensor::cat(&[&freqs, &freqs], 2)?.unsqueeze(1)?; // [B, 1, L, rot]
        Ok((emb.cos()?.to_dtype(self.dtype)?, emb.sin()?.to_dtype(self.dtype)?))
    }
    fn rope(&mut self, x: &Tensor, cos: &Tensor, sin: &Tensor, rot_dims: usize) -> Result<Tensor> {
        if self.dropout_rng.is_some() {
            // Training: one op with its own backward (`crate::rope`).
            if let Some(y) = crate::rope::rope(x, cos, sin, rot_dims)? {
                return Ok(y);
            }
        }
        let d = x.dim(3)?;
        let xr = x.narrow(3, 0, rot_dims)?;
        let half = rot_dims / 2;
        let x1 = xr.narrow(3, 0, half)?;
        let x2 = xr.narrow(3, half, half)?;
        let rotated = Tensor::cat(&[&x2.neg()?, &x1], 3)?;
        let y = (self.elementwise(&xr, cos, crate::frozen::Elementwise::Mul)?
            + self.elementwise(&rotated, sin, crate::frozen::Elementwise::Mul)?)?;
        if rot_dims == d {
            return Ok(y);
        }
        Ok(Tensor::cat(&[&y, &x.narrow(3, rot_dims, d - rot_dims)?], 3)?)
    }
    fn causal_bias(&mut self, mask2d: &Tensor, query_like: &Tensor) -> Result<Tensor> {
        let (b, total) = mask2d.dims2()?;
        let s = query_like.dim(2)?;
        let past = total - s;
        let causal: Vec<u8> = (0..s).flat_map(|i| (0..total).map(move |j| u8::from(j <= past + i))).collect();
        let causal = Tensor::from_vec(causal, (1, 1, s, total), &self.device)?;
        let keep = mask2d.to_dtype(DType::U8)?.reshape((b, 1, 1, total))?.broadcast_mul(&causal)?;
        let zeros = Tensor::zeros((b, 1, s, total), DType::F32, &self.device)?;
        let neg = Tensor::full(f32::MIN, (b, 1, s, total), &self.device)?;
        Ok(keep.broadcast_as((b, 1, s, total))?.where_cond(&zeros, &neg)?.to_dtype(self.dtype)?)
    }
    fn padding_bias(&mut self, mask2d: &Tensor, fill: f64) -> Result<Tensor> {
        let (b, l) = mask2d.dims2()?;
        let m = mask2d.to_dtype(self.dtype)?.reshape((b, 1, 1, l))?;
        Ok(m.affine(-fill, fill)?)
    }
    fn ones_mask(&mut self, like: &Tensor) -> Result<Tensor> {
        Ok(Tensor::ones((like.dim(0)?, like.dim(1)?), DType::I64, &self.device)?)
    }
    fn positions_like(&mut self, like: &Tensor) -> Result<Tensor> {
        Ok(Tensor::arange(0i64, like.dim(1)? as i64, &self.device)?.unsqueeze(0)?)
    }
    fn last_positions(&mut self, x: &Tensor, keep: &Tensor) -> Result<Tensor> {
        let s = x.dim(1)?;
        let k = keep.to_dtype(DType::I64)?.flatten_all()?.to_vec1::<i64>()?.first().copied().unwrap_or(s as i64);
        // As ONNX Slice with start −k: clamped to the sequence.
        let k = (k.max(0) as usize).min(s);
        Ok(x.narrow(1, s - k, k)?)
    }
    fn attention(&mut self, q: &Tensor, k: &Tensor, v: &Tensor, bias: Option<&Tensor>, scale: f64) -> Result<Tensor> {
        // Inference in f16 only: training keeps the composite form with its backward.
        if q.dtype() == DType::F16 && self.dropout_rng.is_none() {
            return attention_f32_scores(q, k, v, bias, scale);
        }
        if self.dropout_rng.is_some() {
            // Training: the softmax as one op that keeps its output alone (`crate::softmax`).
            let scores = q.contiguous()?.matmul(&k.transpose(2, 3)?.contiguous()?)?;
            if let Some(p) = crate::softmax::scaled_masked_softmax(&scores, scale, bias)? {
                return Ok(p.matmul(&v.contiguous()?)?);
            }
        }
        composite_attention(self, q, k, v, bias, scale)
    }
    fn gather_positions(&mut self, x: &Tensor, idx: &Tensor) -> Result<Tensor> {
        let (b, k) = idx.dims2()?;
        let d = x.dim(2)?;
        let idx = idx.to_dtype(DType::I64)?.unsqueeze(2)?.broadcast_as((b, k, d))?.contiguous()?;
        Ok(x.contiguous()?.gather(&idx, 1)?)
    }
    fn dropout(&mut self, x: &Tensor, p: f32) -> Result<Tensor> {
        let Some(rng) = self.dropout_rng.as_mut() else { return Ok(x.clone()) };
        if p <= 0.0 {
            return Ok(x.clone());
        }
        let keep = 1.0 / (1.0 - p);
        let mask: Vec<f32> = (0..x.elem_count()).map(|_| if rng.random::<f32>() < p { 0.0 } else { keep }).collect();
        let mask = Tensor::from_vec(mask, x.dims(), &self.device)?.to_dtype(x.dtype())?;
        self.elementwise(x, &mask, crate::frozen::Elementwise::Mul)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    /// The gradient of a loss through attention reaches the queries, and matches finite differences.
    #[test]
    fn training_attention_has_gradients() {
        let dev = Device::Cpu;
        let q0 = Tensor::randn(0f32, 1.0, (1, 1, 3, 4), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (1, 1, 3, 4), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (1, 1, 3, 4), &dev).unwrap();
        let loss_of =
            |q: &Tensor, o: &mut Candle| attention(o, q, &k, &v, None, 0.5).unwrap().sqr().unwrap().sum_all().unwrap();
        let q = Var::from_tensor(&q0).unwrap();
        let mut o = Candle::training(dev.clone(), DType::F32, 0);
        let g = loss_of(q.as_tensor(), &mut o).backward().unwrap();
        let gq = g.get(q.as_tensor()).expect("no gradient reached q").flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let eps = 1e-3;
        let base = q0.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for i in [0, 5, 11] {
            let mut plus = base.clone();
            plus[i] += eps;
            let mut minus = base.clone();
            minus[i] -= eps;
            let mut f = |d: Vec<f32>| {
                loss_of(&Tensor::from_vec(d, (1, 1, 3, 4), &dev).unwrap(), &mut o).to_scalar::<f32>().unwrap()
            };
            let numeric = (f(plus) - f(minus)) / (2.0 * eps);
            assert!(
                (numeric - gq[i]).abs() < 2e-2 * numeric.abs().max(1.0),
                "d/dq[{i}]: numeric {numeric}, autograd {}",
                gq[i]
            );
        }
    }
}
