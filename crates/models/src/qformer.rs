//! The V-T generator: LAVIS's BERT Q-Former as InstructBLIP uses it, keys `model.vlm_att_encoder.bert`.
//! Learned queries and the instruction text share self-attention (bidirectional, BERT's −10000 mask);
//! on every `cross_attention_freq`-th layer the query rows alone cross-attend to the image; query rows
//! and text rows have separate feed-forward weights (`*_query`). Post-LN residuals throughout.

use std::sync::Arc;

use qadapt_core::QFormerConfig;

use crate::loader::Vb;
use crate::nn::{LayerNorm, Linear};
use crate::ops::{attention, Block, Ops, Param};
use crate::{Error, Result};

/// BERT attention + `output.dense` + post-LN residual (`attention` or `crossattention`).
#[derive(Debug, Clone)]
pub struct BertAttention {
    pub query: Linear,
    pub key: Linear,
    pub value: Linear,
    pub dense: Linear,
    pub layer_norm: LayerNorm,
    heads: usize,
}

impl BertAttention {
    fn new(vb: &Vb, d: usize, kv_dim: usize, cfg: &QFormerConfig) -> Result<Self> {
        let s = vb.pp("self");
        Ok(Self {
            query: Linear::new(&s.pp("query"), d, d, true)?,
            key: Linear::new(&s.pp("key"), kv_dim, d, true)?,
            value: Linear::new(&s.pp("value"), kv_dim, d, true)?,
            dense: Linear::new(&vb.pp("output.dense"), d, d, true)?,
            layer_norm: LayerNorm::new(&vb.pp("output.LayerNorm"), d, cfg.layer_norm_eps)?,
            heads: cfg.num_attention_heads,
        })
    }

    /// `LN(dense(attn(x, kv)) + x)`; x [B, L, D], kv [B, M, kv_dim], bias [B, 1, 1, M].
    fn forward<O: Ops>(&self, o: &mut O, x: &O::T, kv: &O::T, bias: Option<&O::T>) -> Result<O::T> {
        let d = self.query.dims().1;
        let q = self.query.forward(o, x)?;
        let q = o.split_heads(&q, self.heads)?;
        let k = self.key.forward(o, kv)?;
        let k = o.split_heads(&k, self.heads)?;
        let v = self.value.forward(o, kv)?;
        let v = o.split_heads(&v, self.heads)?;
        let a = attention(o, &q, &k, &v, bias, 1.0 / ((d / self.heads) as f64).sqrt())?;
        let a = o.merge_heads(&a)?;
        let a = self.dense.forward(o, &a)?;
        let a = o.add(&a, x)?;
        self.layer_norm.forward(o, &a)
    }
}

/// BERT feed-forward: `LN(out(gelu(in(x))) + x)`.
#[derive(Debug, Clone)]
pub struct Ffn {
    pub intermediate: Linear,
    pub output: Linear,
    pub layer_norm: LayerNorm,
}

impl Ffn {
    fn new(vb: &Vb, intermediate: &str, output: &str, cfg: &QFormerConfig) -> Result<Self> {
        let (d, i) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            intermediate: Linear::new(&vb.pp(intermediate).pp("dense"), d, i, true)?,
            output: Linear::new(&vb.pp(output).pp("dense"), i, d, true)?,
            layer_norm: LayerNorm::new(&vb.pp(output).pp("LayerNorm"), d, cfg.layer_norm_eps)?,
        })
    }

    fn forward<O: Ops>(&self, o: &mut O, x: &O::T) -> Result<O::T> {
        let h = self.intermediate.forward(o, x)?;
        let h = o.gelu_erf(&h)?;
        let h = self.output.forward(o, &h)?;
        let h = o.add(&h, x)?;
        self.layer_norm.forward(o, &h)
    }
}

/// One Q-Former layer.
#[derive(Debug, Clone)]
pub struct QFormerLayer {
    pub attention: BertAttention,
    pub crossattention: Option<BertAttention>,
    pub ffn_query: Ffn,
    pub ffn_text: Ffn,
}

/// The Q-Former encoder with its text embeddings.
#[derive(Debug, Clone)]
pub struct QFormer {
    pub word_embeddings: Param,
    pub position_embeddings: Param,
    pub embeddings_layer_norm: LayerNorm,
    pub layers: Vec<QFormerLayer>,
}

impl QFormer {
    /// Loads `vb` = `model.vlm_att_encoder.bert`; `att_feat` is the width of the image features.
    pub fn new(vb: &Vb, cfg: &QFormerConfig, att_feat: usize) -> Result<Self> {
        if cfg.hidden_act != "gelu" {
            return Err(Error::Unsupported(format!("qformer hidden_act {:?} (BERT uses gelu)", cfg.hidden_act)));
        }
        let d = cfg.hidden_size;
        let e = vb.pp("embeddings");
        let word_embeddings = e.get("word_embeddings.weight", &[cfg.vocab_size, d])?;
        let position_embeddings = e.get("position_embeddings.weight", &[cfg.max_position_embeddings, d])?;
        let embeddings_layer_norm = LayerNorm::new(&e.pp("LayerNorm"), d, cfg.layer_norm_eps)?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let l = vb.pp("encoder.layer").pp(i);
            let cross = i % cfg.cross_attention_freq == 0;
            layers.push(QFormerLayer {
                attention: BertAttention::new(&l.pp("attention"), d, d, cfg)?,
                crossattention: if cross {
                    Some(BertAttention::new(&l.pp("crossattention"), d, att_feat, cfg)?)
                } else {
                    None
                },
                ffn_query: Ffn::new(&l, "intermediate_query", "output_query", cfg)?,
                ffn_text: Ffn::new(&l, "intermediate", "output", cfg)?,
            });
        }
        Ok(Self { word_embeddings, position_embeddings, embeddings_layer_norm, layers })
    }

    /// - `queries` [B, Nq, D] (the learned query tokens, batch-expanded), `nq` = Nq (a weight dim);
    /// - `input_ids`, `text_mask` [B, T] (`[CLS] … [SEP]`, 1 = token);
    /// - `image` [B, M, att_feat] (projected, normalised visual tokens).
    ///
    /// Returns the query rows of the last layer [B, Nq, D].
    pub fn forward<O: Ops>(
        &self,
        o: &mut O,
        queries: &O::T,
        nq: usize,
        input_ids: &O::T,
        text_mask: &O::T,
        image: &O::T,
    ) -> Result<O::T> {
        // Embeddings: LN(cat[queries, word(ids) + pos(0..T)]); the queries get no position embedding.
        let words = o.param(&self.word_embeddings)?;
        let words = o.embedding(&words, input_ids)?; // [B, T, D]
        let pos_table = o.param(&self.position_embeddings)?;
        let pos_ids = o.positions_like(input_ids)?; // [1, T]
        let pos = o.embedding(&pos_table, &pos_ids)?; // [1, T, D]
        let text = o.add(&words, &pos)?;
        let x = o.cat(&[queries.clone(), text], 1)?; // [B, Nq+T, D]
        let mut x = self.embeddings_layer_norm.forward(o, &x)?;

        let query_mask = o.ones_mask(queries)?; // [B, Nq]
        let mask = o.cat(&[query_mask, text_mask.clone()], 1)?;
        let bias = o.padding_bias(&mask, -10000.0)?; // BERT's additive mask, not −inf (DESIGN §7.5)

        let qformer = o.checkpointing().then(|| Arc::new(self.clone()));
        for i in 0..self.layers.len() {
            x = match &qformer {
                // Gradient checkpointing: each layer a block that keeps only its inputs (and the
                // image, on a cross-attention layer).
                Some(q) => {
                    let inputs = match self.layers[i].crossattention {
                        Some(_) => vec![x, image.clone()],
                        None => vec![x],
                    };
                    let out =
                        o.checkpoint(LayerBlock { qformer: q.clone(), i, nq }, &inputs, std::slice::from_ref(&bias))?;
                    out.into_iter()
                        .next()
                        .ok_or_else(|| Error::Input(format!("Q-Former layer {i} returned nothing")))?
                }
                None => self.layer(o, i, &x, image, &bias, nq)?,
            };
        }
        o.narrow(&x, 1, 0, Some(nq))
    }

    /// Layer `i`: x [B, Nq+T, D] → the next x.
    fn layer<O: Ops>(&self, o: &mut O, i: usize, x: &O::T, image: &O::T, bias: &O::T, nq: usize) -> Result<O::T> {
        let layer = &self.layers[i];
        let x = layer.attention.forward(o, x, x, Some(bias))?;
        let q = o.narrow(&x, 1, 0, Some(nq))?; // [B, Nq, D]
        let q = match &layer.crossattention {
            Some(c) => c.forward(o, &q, image, None)?,
            None => q,
        };
        let q = layer.ffn_query.forward(o, &q)?;
        let t = o.narrow(&x, 1, nq, None)?; // [B, T, D]
        let t = layer.ffn_text.forward(o, &t)?;
        o.cat(&[q, t], 1)
    }
}

/// Layer `i` of the Q-Former as a checkpointable block: inputs `[x]`, or `[x, image]` on a
/// cross-attention layer; ctx `[bias]`.
struct LayerBlock {
    qformer: Arc<QFormer>,
    i: usize,
    nq: usize,
}

impl Block for LayerBlock {
    fn forward<O: Ops>(&self, o: &mut O, inputs: &[O::T], ctx: &[O::T]) -> Result<Vec<O::T>> {
        let (x, image) = match inputs {
            [x] => (x, x), // no cross-attention: the image is not read
            [x, image] => (x, image),
            _ => return Err(Error::Input("a Q-Former layer block takes [x] or [x, image]".into())),
        };
        let [bias] = ctx else { return Err(Error::Input("a Q-Former layer block takes [bias]".into())) };
        Ok(vec![self.qformer.layer(o, self.i, x, image, bias, self.nq)?])
    }
}
