//! SigLIP vision tower (HF `SiglipVisionModel`), run to the second-to-last layer as Bunny does.
//! Keys under `model.vision_tower.vision_tower.vision_model`.

use std::sync::Arc;

use qadapt_core::VisionConfig;

use crate::loader::Vb;
use crate::nn::{LayerNorm, Linear};
use crate::ops::{attention, Block, Ops, Param};
use crate::{Error, Result};

/// Multi-head self-attention of one encoder layer.
#[derive(Debug, Clone)]
pub struct SelfAttention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub out_proj: Linear,
    heads: usize,
}

impl SelfAttention {
    fn new(vb: &Vb, d: usize, heads: usize) -> Result<Self> {
        Ok(Self {
            q_proj: Linear::new(&vb.pp("q_proj"), d, d, true)?,
            k_proj: Linear::new(&vb.pp("k_proj"), d, d, true)?,
            v_proj: Linear::new(&vb.pp("v_proj"), d, d, true)?,
            out_proj: Linear::new(&vb.pp("out_proj"), d, d, true)?,
            heads,
        })
    }

    /// x [B, N, D] → [B, N, D]; bidirectional, no mask.
    fn forward<O: Ops>(&self, o: &mut O, x: &O::T) -> Result<O::T> {
        let (_, d) = self.q_proj.dims();
        let scale = 1.0 / ((d / self.heads) as f64).sqrt();
        let q = self.q_proj.forward(o, x)?; // [B, N, D]
        let k = self.k_proj.forward(o, x)?;
        let v = self.v_proj.forward(o, x)?;
        let y = match o.fused_mha(&q, &k, &v, self.heads, scale)? {
            Some(y) => y,
            None => {
                let q = o.split_heads(&q, self.heads)?; // [B, H, N, Dh]
                let k = o.split_heads(&k, self.heads)?;
                let v = o.split_heads(&v, self.heads)?;
                let y = attention(o, &q, &k, &v, None, scale)?;
                o.merge_heads(&y)? // [B, N, D]
            }
        };
        self.out_proj.forward(o, &y)
    }
}

/// One pre-LN encoder layer: `x += attn(ln1 x); x += mlp(ln2 x)` (run by [`SiglipVision::forward`],
/// which pairs each residual sum with the LayerNorm that follows it).
#[derive(Debug, Clone)]
pub struct EncoderLayer {
    pub layer_norm1: LayerNorm,
    pub self_attn: SelfAttention,
    pub layer_norm2: LayerNorm,
    pub fc1: Linear,
    pub fc2: Linear,
}

impl EncoderLayer {
    fn new(vb: &Vb, cfg: &VisionConfig) -> Result<Self> {
        let d = cfg.hidden_size;
        Ok(Self {
            layer_norm1: LayerNorm::new(&vb.pp("layer_norm1"), d, cfg.layer_norm_eps)?,
            self_attn: SelfAttention::new(&vb.pp("self_attn"), d, cfg.num_attention_heads)?,
            layer_norm2: LayerNorm::new(&vb.pp("layer_norm2"), d, cfg.layer_norm_eps)?,
            fc1: Linear::new(&vb.pp("mlp.fc1"), d, cfg.intermediate_size, true)?,
            fc2: Linear::new(&vb.pp("mlp.fc2"), cfg.intermediate_size, d, true)?,
        })
    }

    /// The MLP branch of `h` (the second norm's output).
    fn mlp<O: Ops>(&self, o: &mut O, h: &O::T) -> Result<O::T> {
        let h = self.fc1.forward(o, h)?;
        let h = o.gelu_tanh(&h)?;
        self.fc2.forward(o, &h)
    }
}

/// The tower: patch embedding, learned positions (no CLS), `num_hidden_layers − 1` layers.
#[derive(Debug, Clone)]
pub struct SiglipVision {
    pub patch_weight: Param,
    pub patch_bias: Param,
    pub position_embedding: Param,
    pub layers: Vec<EncoderLayer>,
    pub patch_size: usize,
}

impl SiglipVision {
    /// Loads the layers Bunny runs; later layers, `post_layernorm` and `head` are left unread.
    pub fn new(vb: &Vb, cfg: &VisionConfig) -> Result<Self> {
        if cfg.hidden_act != "gelu_pytorch_tanh" {
            return Err(Error::Unsupported(format!(
                "vision hidden_act {:?} (SigLIP uses gelu_pytorch_tanh)",
                cfg.hidden_act
            )));
        }
        let d = cfg.hidden_size;
        let p = cfg.patch_size;
        let emb = vb.pp("embeddings");
        let patch_weight = emb.get("patch_embedding.weight", &[d, 3, p, p])?;
        let patch_bias = emb.get("patch_embedding.bias", &[d])?;
        let position_embedding = emb.get("position_embedding.weight", &[cfg.num_patches(), d])?;
        let layers = (0..cfg.layers_used())
            .map(|i| EncoderLayer::new(&vb.pp("encoder.layers").pp(i), cfg))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { patch_weight, patch_bias, position_embedding, layers, patch_size: p })
    }

    /// pixel_values [B, 3, S, S] → features of the second-to-last layer [B, N, D].
    pub fn forward<O: Ops>(&self, o: &mut O, pixels: &O::T) -> Result<O::T> {
        let w = o.param(&self.patch_weight)?;
        let b = o.param(&self.patch_bias)?;
        let mut x = o.patchify(pixels, &w, &b, self.patch_size)?; // [B, N, D]
        let pos = o.param(&self.position_embedding)?; // [N, D]
        x = o.add(&x, &pos)?;
        let Some(first) = self.layers.first() else { return Ok(x) };
        let h = first.layer_norm1.forward(o, &x)?;
        let tower = o.checkpointing().then(|| Arc::new(self.clone()));
        let mut xh = vec![x, h];
        for i in 0..self.layers.len() {
            let [x, h] = xh.as_slice() else {
                return Err(Error::Input(format!("SigLIP layer {i} got {} inputs, not (x, h)", xh.len())));
            };
            xh = match &tower {
                // Gradient checkpointing: each layer a block that keeps only (x, h).
                Some(t) => o.checkpoint(LayerBlock { tower: t.clone(), i }, &xh, &[])?,
                None => self.layer(o, i, x, h)?,
            };
        }
        xh.into_iter().next().ok_or_else(|| Error::Input("the last SigLIP layer returned nothing".into()))
    }

    /// Layer `i`: the residual stream `x` and its normed form `h` → the next layer's `[x, h]` (its
    /// first LayerNorm applied), or `[x]` after the last layer.
    fn layer<O: Ops>(&self, o: &mut O, i: usize, x: &O::T, h: &O::T) -> Result<Vec<O::T>> {
        let layer = &self.layers[i];
        let a = layer.self_attn.forward(o, h)?;
        let (mid, h2) = layer.layer_norm2.residual(o, x, &a)?;
        let m = layer.mlp(o, &h2)?;
        Ok(match self.layers.get(i + 1) {
            Some(next) => {
                let (x, h) = next.layer_norm1.residual(o, &mid, &m)?;
                vec![x, h]
            }
            None => vec![o.add(&mid, &m)?],
        })
    }
}

/// Layer `i` of the tower as a checkpointable block: inputs (x, h), no ctx.
struct LayerBlock {
    tower: Arc<SiglipVision>,
    i: usize,
}

impl Block for LayerBlock {
    fn forward<O: Ops>(&self, o: &mut O, inputs: &[O::T], _ctx: &[O::T]) -> Result<Vec<O::T>> {
        let [x, h] = inputs else {
            return Err(Error::Input("a SigLIP layer block takes (x, h)".into()));
        };
        self.tower.layer(o, self.i, x, h)
    }
}
