//! phi-2 (HF `PhiForCausalLM`) as a step function: `(inputs_embeds, attention_mask, position_ids,
//! past) → (logits, present)` — exactly the `decoder.onnx` signature, so the request owns its cache.
//! Keys: `model.embed_tokens`, `model.layers.N`, `model.final_layernorm`, `lm_head` (Bunny: no bias).

use std::sync::Arc;

use qadapt_core::BunnyConfig;

use crate::loader::Vb;
use crate::nn::{LayerNorm, Linear};
use crate::ops::{attention, Block, Ops, Param, SelfAttention};
use crate::{Error, Result};

/// One decoder layer. Parallel block: `h = ln(x); x = x + attn(h) + mlp(h)`.
#[derive(Debug, Clone)]
pub struct PhiLayer {
    pub input_layernorm: LayerNorm,
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub dense: Linear,
    pub fc1: Linear,
    pub fc2: Linear,
}

impl PhiLayer {
    fn new(vb: &Vb, cfg: &BunnyConfig) -> Result<Self> {
        let (d, i) = (cfg.hidden_size, cfg.intermediate_size);
        let a = vb.pp("self_attn");
        Ok(Self {
            input_layernorm: LayerNorm::new(&vb.pp("input_layernorm"), d, cfg.layer_norm_eps)?,
            q_proj: Linear::new(&a.pp("q_proj"), d, d, true)?,
            k_proj: Linear::new(&a.pp("k_proj"), d, d, true)?,
            v_proj: Linear::new(&a.pp("v_proj"), d, d, true)?,
            dense: Linear::new(&a.pp("dense"), d, d, true)?,
            fc1: Linear::new(&vb.pp("mlp.fc1"), d, i, true)?,
            fc2: Linear::new(&vb.pp("mlp.fc2"), i, d, true)?,
        })
    }
}

/// The phi-2 decoder with its embedding table and LM head.
#[derive(Debug, Clone)]
pub struct Phi {
    pub embed_tokens: Param,
    pub layers: Vec<PhiLayer>,
    pub final_layernorm: LayerNorm,
    pub lm_head: Linear,
    pub heads: usize,
    pub rotary_dims: usize,
    pub rope_theta: f64,
}

/// Post-RoPE keys and values of one layer, each [B, H, L, Dh].
pub type KvPair<T> = (T, T);

/// What a decoder step returns: logits (or hidden states) and the present (K, V) of every layer.
pub type Step<T> = (T, Vec<KvPair<T>>);

/// Which positions of a step get logits.
#[derive(Debug, Clone, Copy)]
pub enum Keep<'a, T> {
    /// The last K of every row, K an int64 scalar (left-padded batches end together).
    Last(&'a T),
    /// Positions [B, K] (int64) of each row: right-padded rows end at their own lengths.
    At(&'a T),
}

impl Phi {
    /// Loads from the checkpoint root (keys `model.*` and `lm_head.*`).
    pub fn new(vb: &Vb, cfg: &BunnyConfig) -> Result<Self> {
        if cfg.hidden_act != "gelu_new" {
            return Err(Error::Unsupported(format!("LLM hidden_act {:?} (phi-2 uses gelu_new)", cfg.hidden_act)));
        }
        let d = cfg.hidden_size;
        let m = vb.pp("model");
        let embed_tokens = m.get("embed_tokens.weight", &[cfg.vocab_size, d])?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| PhiLayer::new(&m.pp("layers").pp(i), cfg))
            .collect::<Result<Vec<_>>>()?;
        let final_layernorm = LayerNorm::new(&m.pp("final_layernorm"), d, cfg.layer_norm_eps)?;
        // Bunny's lm_head has no bias; a plain phi-2 checkpoint's bias is honoured when present.
        let head = vb.pp("lm_head");
        let lm_head = Linear {
            weight: head.get("weight", &[cfg.vocab_size, d])?,
            bias: head.get_opt("bias", &[cfg.vocab_size])?,
            lora: None,
        };
        Ok(Self {
            embed_tokens,
            layers,
            final_layernorm,
            lm_head,
            heads: cfg.num_attention_heads,
            rotary_dims: cfg.rotary_dims(),
            rope_theta: cfg.rope_theta,
        })
    }

    /// Token ids [B, L] → embeddings [B, L, D].
    pub fn embed<O: Ops>(&self, o: &mut O, ids: &O::T) -> Result<O::T> {
        let table = o.param(&self.embed_tokens)?;
        o.embedding(&table, ids)
    }

    /// One decoder step over S new positions.
    /// - `embeds` [B, S, D]; `mask2d` [B, P+S] (1 = attend); `position_ids` [B, S];
    /// - `past`: per layer post-RoPE (K, V) [B, H, P, Dh], or `None` for a prefill from nothing.
    ///
    /// - `keep`: the positions that get logits (`None`: all). Generation needs one row per sequence;
    ///   the lm_head over a whole prompt is the largest matmul of a small model's prefill.
    ///
    /// Returns logits [B, K, V] and the present (K, V) [B, H, P+S, Dh] of every layer.
    pub fn forward<O: Ops>(
        &self,
        o: &mut O,
        embeds: &O::T,
        mask2d: &O::T,
        position_ids: &O::T,
        past: Option<&[KvPair<O::T>]>,
        keep: Option<Keep<'_, O::T>>,
    ) -> Result<Step<O::T>> {
        let (x, present) = self.hidden(o, embeds, mask2d, position_ids, past)?;
        let x = match keep {
            Some(Keep::Last(k)) => o.last_positions(&x, k)?,
            Some(Keep::At(idx)) => o.gather_positions(&x, idx)?,
            None => x,
        };
        let logits = self.lm_head.forward(o, &x)?; // [B, K, V]
        Ok((logits, present))
    }

    /// [`Phi::forward`] without the `lm_head`: the final-layer-normed hidden states [B, S, D]. Training
    /// applies the head to the answer positions only, which skips most of the largest matmul.
    pub fn hidden<O: Ops>(
        &self,
        o: &mut O,
        embeds: &O::T,
        mask2d: &O::T,
        position_ids: &O::T,
        past: Option<&[KvPair<O::T>]>,
    ) -> Result<Step<O::T>> {
        if let Some(p) = past {
            if p.len() != self.layers.len() {
                return Err(Error::Input(format!("past has {} layers, the model {}", p.len(), self.layers.len())));
            }
        }
        let Some(first) = self.layers.first() else {
            return Ok((self.final_layernorm.forward(o, embeds)?, Vec::new()));
        };
        let mut x = embeds.clone();
        if past.is_none() && o.checkpointing() {
            // Training with gradient checkpointing: each layer a block that keeps only its input x
            // (its LayerNorm runs inside it). Values and gradients equal the plain pass's: x's
            // gradient sums two terms (the residual's and the LayerNorm's) in either pass, and a sum
            // of two does not depend on their order.
            let phi = Arc::new(self.clone());
            let ctx = [mask2d.clone(), position_ids.clone()];
            for i in 0..self.layers.len() {
                let out = o.checkpoint(LayerBlock { phi: phi.clone(), i }, &[x], &ctx)?;
                let [nx]: [O::T; 1] = out.try_into().map_err(|_| Error::Input("a phi layer block returns x".into()))?;
                x = nx;
            }
            return Ok((self.final_layernorm.forward(o, &x)?, Vec::new()));
        }
        let mut h = first.input_layernorm.forward(o, &x)?;
        let mut shared = Shared::default();
        let mut present = Vec::with_capacity(self.layers.len());
        for i in 0..self.layers.len() {
            let (delta, kv) = self.layer(o, i, &h, past.map(|p| &p[i]), mask2d, position_ids, &mut shared)?;
            // HF's order: (attn + mlp) + residual, then the next block's (or the final) LayerNorm.
            let next = self.layers.get(i + 1).map_or(&self.final_layernorm, |l| &l.input_layernorm);
            (x, h) = next.residual(o, &x, &delta)?;
            present.push(kv);
        }
        Ok((h, present))
    }

    /// Layer `i`: what it adds to the residual stream from its normed input `h`, `attn(h) + mlp(h)`,
    /// and its present (K, V).
    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    fn layer<O: Ops>(
        &self,
        o: &mut O,
        i: usize,
        h: &O::T,
        past: Option<&KvPair<O::T>>,
        mask2d: &O::T,
        position_ids: &O::T,
        shared: &mut Shared<O::T>,
    ) -> Result<(O::T, KvPair<O::T>)> {
        let layer = &self.layers[i];
        let (a, kv) = self.attention(o, layer, h, past, mask2d, position_ids, shared)?; // [B, S, D]
        let a = layer.dense.forward(o, &a)?;
        let m = layer.fc1.forward(o, h)?;
        let m = o.gelu_tanh(&m)?;
        let m = layer.fc2.forward(o, &m)?;
        Ok((o.add(&a, &m)?, kv))
    }

    /// One layer's self-attention over its cache: the fused kernel when the interpreter has one,
    /// else q/k/v projections, RoPE, the cache concatenated and masked attention. Returns the
    /// heads merged [B, S, D] (before `dense`) and the present (K, V) [B, H, P+S, Dh].
    #[allow(clippy::too_many_arguments)]
    fn attention<O: Ops>(
        &self,
        o: &mut O,
        layer: &PhiLayer,
        h: &O::T,
        past: Option<&KvPair<O::T>>,
        mask2d: &O::T,
        position_ids: &O::T,
        shared: &mut Shared<O::T>,
    ) -> Result<(O::T, KvPair<O::T>)> {
        let (q, k, v) = (&layer.q_proj, &layer.k_proj, &layer.v_proj);
        if q.lora.is_none() && k.lora.is_none() && v.lora.is_none() {
            let spec = SelfAttention {
                x: h,
                qkv: [q, k, v].map(|l| (&l.weight, l.bias.as_ref())),
                heads: self.heads,
                rotary_dims: self.rotary_dims,
                rope_theta: self.rope_theta,
                past,
                mask2d,
                position_ids,
            };
            if let Some(fused) = o.fused_self_attention(&spec)? {
                return Ok(fused);
            }
        }
        if shared.rope.is_none() {
            shared.rope = Some(o.rope_tables(position_ids, self.rotary_dims, self.rope_theta)?);
            // [B, 1, S, rot]
        }
        let Some((cos, sin)) = shared.rope.clone() else { unreachable!("set above") };
        let q = q.forward(o, h)?;
        let q = o.split_heads(&q, self.heads)?; // [B, H, S, Dh]
        let q = o.rope(&q, &cos, &sin, self.rotary_dims)?;
        let k = k.forward(o, h)?;
        let k = o.split_heads(&k, self.heads)?;
        let k = o.rope(&k, &cos, &sin, self.rotary_dims)?;
        let v = v.forward(o, h)?;
        let v = o.split_heads(&v, self.heads)?;
        let (k, v) = match past {
            Some((pk, pv)) => (o.cat(&[pk.clone(), k], 2)?, o.cat(&[pv.clone(), v], 2)?), // [B, H, P+S, Dh]
            None => (k, v),
        };
        if shared.bias.is_none() {
            shared.bias = Some(o.causal_bias(mask2d, &q)?); // [B, 1, S, P+S]
        }
        let head_dim = layer.q_proj.dims().1 / self.heads;
        let a = attention(o, &q, &k, &v, shared.bias.as_ref(), 1.0 / (head_dim as f64).sqrt())?;
        Ok((o.merge_heads(&a)?, (k, v)))
    }
}

/// Layer `i` of a phi model as a checkpointable block: input x, ctx (mask2d, position_ids); output
/// the next layer's x (the residual sum, the same op the plain pass's fused residual LayerNorm does).
struct LayerBlock {
    phi: Arc<Phi>,
    i: usize,
}

impl Block for LayerBlock {
    fn forward<O: Ops>(&self, o: &mut O, inputs: &[O::T], ctx: &[O::T]) -> Result<Vec<O::T>> {
        let ([x], [mask2d, position_ids]) = (inputs, ctx) else {
            return Err(Error::Input("a phi layer block takes x and (mask2d, position_ids)".into()));
        };
        let h = self.phi.layers[self.i].input_layernorm.forward(o, x)?;
        let (delta, _) = self.phi.layer(o, self.i, &h, None, mask2d, position_ids, &mut Shared::default())?;
        Ok(vec![o.add(x, &delta)?])
    }
}

/// What the layers of one step share: the RoPE tables and the attention mask, built once.
struct Shared<T> {
    rope: Option<(T, T)>,
    bias: Option<T>,
}

impl<T> Default for Shared<T> {
    fn default() -> Self {
        Self { rope: None, bias: None }
    }
}
