//! Q-Adapt's instruction-adaptive visual prompt module (DESIGN §3, steps 1–4), keys under `model.`:
//! `vlm_att_projector`, `vlm_att_ln`, `vlm_att_query`, `vlm_att_encoder.bert` (the Q-Former),
//! `vlm_att_deprojector` and `vlm_cross_attn` (the T-V prompter).

use qadapt_core::QFormerConfig;

use crate::loader::Vb;
use crate::nn::{LayerNorm, Linear};
use crate::ops::{attention, Ops, Param};
use crate::qformer::QFormer;
use crate::{Error, Result};

/// The T-V prompter: torch `nn.MultiheadAttention` (visual tokens as queries, the deprojected
/// Q-Former output as keys and values) followed by a per-token sigmoid gate.
#[derive(Debug, Clone)]
pub struct TvPrompter {
    /// `self_attn.in_proj_weight` [3·d, d], split into q/k/v rows in the forward (torch's layout).
    pub in_proj_weight: Param,
    pub in_proj_bias: Param,
    pub out_proj: Linear,
    pub linear1: Linear,
    pub linear2: Linear,
    pub norm1: LayerNorm,
    pub norm2: LayerNorm,
    heads: usize,
    dim: usize,
}

impl TvPrompter {
    fn new(vb: &Vb, d: usize, cfg: &QFormerConfig) -> Result<Self> {
        let a = vb.pp("self_attn");
        // torch's default LayerNorm eps: the official module never sets one.
        let eps = 1e-5;
        let ffn = vb.pp("linear1").require_shape("weight")?.first().copied().unwrap_or(cfg.cross_attn_ffn_dim);
        Ok(Self {
            in_proj_weight: a.get("in_proj_weight", &[3 * d, d])?,
            in_proj_bias: a.get("in_proj_bias", &[3 * d])?,
            out_proj: Linear::new(&a.pp("out_proj"), d, d, true)?,
            linear1: Linear::new(&vb.pp("linear1"), 2 * d, ffn, true)?,
            linear2: Linear::new(&vb.pp("linear2"), ffn, 1, true)?,
            norm1: LayerNorm::new(&vb.pp("norm1"), 2 * d, eps)?,
            norm2: LayerNorm::new(&vb.pp("norm2"), d, eps)?,
            heads: cfg.cross_attn_num_heads,
            dim: d,
        })
    }

    /// f [B, N, d] visual tokens, kv [B, Nq, d] → prompt P [B, N, d].
    pub fn forward<O: Ops>(&self, o: &mut O, f: &O::T, kv: &O::T) -> Result<O::T> {
        let d = self.dim;
        let w = o.param(&self.in_proj_weight)?;
        let b = o.param(&self.in_proj_bias)?;
        let proj = |o: &mut O, x: &O::T, i: usize| -> Result<O::T> {
            let wi = o.narrow(&w, 0, i * d, Some(d))?;
            let bi = o.narrow(&b, 0, i * d, Some(d))?;
            let y = o.linear(x, &wi, Some(&bi))?;
            o.split_heads(&y, self.heads)
        };
        let q = proj(o, f, 0)?; // [B, h, N, d/h]
        let k = proj(o, kv, 1)?; // [B, h, Nq, d/h]
        let v = proj(o, kv, 2)?;
        let a = attention(o, &q, &k, &v, None, 1.0 / ((d / self.heads) as f64).sqrt())?;
        let a = o.merge_heads(&a)?;
        let a = self.out_proj.forward(o, &a)?; // A [B, N, d]

        // α = σ(linear2(relu(linear1(norm1(cat[F, A]))))) per token, [B, N, 1].
        let g = o.cat(&[f.clone(), a.clone()], 2)?;
        let g = self.norm1.forward(o, &g)?;
        let g = self.linear1.forward(o, &g)?;
        let g = o.relu(&g)?;
        let g = self.linear2.forward(o, &g)?;
        let alpha = o.sigmoid(&g)?;
        // (1−α)·F + α·A, written as F + α·(A − F). The paper's eq. 5 has the gate the other way
        // round; the official code (what released weights were trained with) does this.
        let diff = o.sub(&a, f)?;
        let mixed = o.mul(&alpha, &diff)?;
        let mixed = o.add(f, &mixed)?;
        self.norm2.forward(o, &mixed)
    }
}

/// The whole prompt module.
#[derive(Debug, Clone)]
pub struct PromptModule {
    pub vlm_att_projector: Linear,
    pub vlm_att_ln: LayerNorm,
    pub vlm_att_query: Param,
    pub qformer: QFormer,
    pub vlm_att_deprojector: Linear,
    pub vlm_cross_attn: TvPrompter,
    pub prompt_scale: f64,
    pub num_query: usize,
}

/// What the prompt module computes, intermediate values included for parity checks.
pub struct PromptOutput<T> {
    /// Q-Former query outputs [B, Nq, Dq].
    pub qformer_output: T,
    /// Fused visual features `F + scale·P` [B, N, d].
    pub fused: T,
}

impl PromptModule {
    /// Loads from `vb` = `model`. The query count, Q-Former width, `att_feat_size` and the gate's
    /// hidden width are read from the weights (the official code hard-codes 32, 768, 1408, 2048).
    pub fn new(vb: &Vb, mm_hidden: usize, cfg: &QFormerConfig) -> Result<Self> {
        let qshape = vb.require_shape("vlm_att_query")?;
        let (num_query, qh) = match qshape.as_slice() {
            [1, n, h] => (*n, *h),
            _ => {
                return Err(Error::ShapeMismatch {
                    key: vb.key("vlm_att_query"),
                    expected: vec![1, cfg.num_query, cfg.hidden_size],
                    found: qshape,
                })
            }
        };
        if qh != cfg.hidden_size {
            return Err(Error::ShapeMismatch {
                key: vb.key("vlm_att_query"),
                expected: vec![1, num_query, cfg.hidden_size],
                found: qshape,
            });
        }
        let att_feat = vb.pp("vlm_att_projector").require_shape("weight")?[0];
        Ok(Self {
            vlm_att_projector: Linear::new(&vb.pp("vlm_att_projector"), mm_hidden, att_feat, true)?,
            vlm_att_ln: LayerNorm::new(&vb.pp("vlm_att_ln"), att_feat, cfg.att_ln_eps)?,
            vlm_att_query: vb.get("vlm_att_query", &[1, num_query, qh])?,
            qformer: QFormer::new(&vb.pp("vlm_att_encoder.bert"), cfg, att_feat)?,
            vlm_att_deprojector: Linear::new(&vb.pp("vlm_att_deprojector"), qh, mm_hidden, true)?,
            vlm_cross_attn: TvPrompter::new(&vb.pp("vlm_cross_attn"), mm_hidden, cfg)?,
            prompt_scale: cfg.prompt_scale,
            num_query,
        })
    }

    /// f [B, N, d] visual features, `input_ids` / `text_mask` [B, T] the Q-Former text.
    pub fn forward<O: Ops>(
        &self,
        o: &mut O,
        f: &O::T,
        input_ids: &O::T,
        text_mask: &O::T,
    ) -> Result<PromptOutput<O::T>> {
        // The official code drops token 0 for the Q-Former's image input only (DESIGN §7.3).
        let x = o.narrow(f, 1, 1, None)?;
        let x = self.vlm_att_projector.forward(o, &x)?;
        let x = self.vlm_att_ln.forward(o, &x)?; // [B, N−1, att_feat]
        let queries = o.param(&self.vlm_att_query)?;
        let queries = o.expand_batch(&queries, f)?; // [B, Nq, Dq]
        let qout = self.qformer.forward(o, &queries, self.num_query, input_ids, text_mask, &x)?;
        let kv = self.vlm_att_deprojector.forward(o, &qout)?; // [B, Nq, d]
        let p = self.vlm_cross_attn.forward(o, f, &kv)?;
        let p = o.affine(&p, self.prompt_scale, 0.0)?;
        let fused = o.add(f, &p)?;
        Ok(PromptOutput { qformer_output: qout, fused })
    }
}
