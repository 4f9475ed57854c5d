//! The composed model: SigLIP → (Q-Adapt prompt module) → connector → phi-2, chosen by `model_type`.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device};
use qadapt_core::{BunnyConfig, ModelType};

use crate::adapter::AdaptedSource;
use crate::loader::{is_known_extra, Checkpoint, Vb, WeightSource};
use crate::ops::Ops;
use crate::phi::Phi;
use crate::projector::Projector;
use crate::prompter::PromptModule;
use crate::siglip::SiglipVision;
use crate::{Error, Result};

/// Key prefix of the vision tower in Bunny checkpoints.
pub const VISION_PREFIX: &str = "model.vision_tower.vision_tower.vision_model";

/// Bunny or Q-Adapt, as a tree of modules named like the checkpoint.
#[derive(Debug, Clone)]
pub struct Bunny {
    pub config: BunnyConfig,
    pub vision: SiglipVision,
    pub prompt: Option<PromptModule>,
    pub mm_projector: Projector,
    pub llm: Phi,
}

/// The Q-Former's text input for a batch: ids and mask, [B, T] each.
pub struct QFormerText<'a, T> {
    pub input_ids: &'a T,
    pub attention_mask: &'a T,
}

/// Visual features at each stage, for parity checks and the exporter.
pub struct ImageFeatures<T> {
    /// SigLIP second-to-last layer [B, N, mm_hidden].
    pub vision: T,
    /// Q-Adapt only: Q-Former output [B, Nq, Dq] and fused features [B, N, mm_hidden].
    pub qformer_output: Option<T>,
    pub fused: Option<T>,
    /// After the connector [B, N, hidden]: what is spliced into the prompt.
    pub projected: T,
}

/// The dims a Bunny reads from its weights rather than its config, answered from the config: what a
/// weightless source ([`crate::loader::ShapeOnly`], random init) needs to build the module tree.
pub fn dims_from_config(config: &BunnyConfig) -> HashMap<String, Vec<usize>> {
    let mut known = HashMap::new();
    if let (ModelType::QAdapt, Some(q)) = (config.model_type, &config.qformer_config) {
        let mm = config.mm_hidden_size;
        known.insert("model.vlm_att_query".into(), vec![1, q.num_query, q.hidden_size]);
        known.insert("model.vlm_att_projector.weight".into(), vec![q.att_feat_size, mm]);
        known.insert("model.vlm_cross_attn.linear1.weight".into(), vec![q.cross_attn_ffn_dim, 2 * mm]);
    }
    known
}

impl Bunny {
    /// Builds the module tree from any weight source (checkpoint, or training variables).
    pub fn new(src: &dyn WeightSource, config: BunnyConfig) -> Result<Self> {
        let root = Vb::root(src);
        let vision = SiglipVision::new(&root.pp(VISION_PREFIX), &config.vision_config)?;
        let model = root.pp("model");
        let prompt = match (config.model_type, &config.qformer_config) {
            (ModelType::QAdapt, Some(q)) => Some(PromptModule::new(&model, config.mm_hidden_size, q)?),
            (ModelType::QAdapt, None) => {
                return Err(Error::Unsupported("Q-Adapt config without qformer_config".into()))
            }
            (ModelType::Bunny, _) => None,
        };
        let mm_projector = Projector::new(&model.pp("mm_projector"), config.mm_hidden_size, config.hidden_size)?;
        let llm = Phi::new(&root, &config)?;
        Ok(Self { config, vision, prompt, mm_projector, llm })
    }

    /// Loads a hub model directory (config.json + safetensors) computing in `dtype` on `device`,
    /// with an adapter directory merged on load when given (see [`crate::adapter`]).
    /// Keys the model does not use are tolerated when known extras, and logged otherwise.
    pub fn load(dir: &Path, adapter: Option<&Path>, device: &Device, dtype: DType) -> Result<Self> {
        let config = BunnyConfig::from_file(&dir.join("config.json"))?;
        let ck = Checkpoint::open(dir, device, dtype)?;
        let model = match adapter {
            Some(a) => {
                let src = AdaptedSource::open(&ck, a, device, dtype)?;
                let (n_lora, n_full) = src.counts();
                tracing::info!(n_lora, n_full, adapter = %a.display(), "merged adapter");
                Self::new(&src, config)?
            }
            None => Self::new(&ck, config)?,
        };
        let layers_used = model.config.vision_config.layers_used();
        let unknown: Vec<String> = ck.unused_keys().into_iter().filter(|k| !is_known_extra(k, layers_used)).collect();
        if !unknown.is_empty() {
            tracing::warn!(count = unknown.len(), first = %unknown[0], "checkpoint tensors not used by the model");
        }
        Ok(model)
    }

    /// Is this a Q-Adapt model (does it run the prompt module)?
    pub fn is_qadapt(&self) -> bool {
        self.prompt.is_some()
    }

    /// pixel_values [B, 3, S, S] (+ the question for Q-Adapt) → features at every stage.
    /// A Q-Adapt model always runs its prompt module: no question is an error (DESIGN §7.7).
    pub fn image_features<O: Ops>(
        &self,
        o: &mut O,
        pixels: &O::T,
        text: Option<QFormerText<'_, O::T>>,
    ) -> Result<ImageFeatures<O::T>> {
        let vision = self.vision.forward(o, pixels)?;
        let (qformer_output, fused) = match (&self.prompt, text) {
            (Some(p), Some(t)) => {
                let out = p.forward(o, &vision, t.input_ids, t.attention_mask)?;
                (Some(out.qformer_output), Some(out.fused))
            }
            (Some(_), None) => {
                return Err(Error::Input("a Q-Adapt model needs the question for its prompt module".into()))
            }
            (None, _) => (None, None),
        };
        let projected = self.mm_projector.forward(o, fused.as_ref().unwrap_or(&vision))?;
        Ok(ImageFeatures { vision, qformer_output, fused, projected })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loader::ShapeOnly;

    /// Parameter count of the real shapes, from the config alone, against a closed-form count.
    #[test]
    fn real_qadapt_shapes_from_config() {
        let cfg = BunnyConfig::from_json(include_str!("../../../configs/qadapt-3b.json")).unwrap();
        let src = ShapeOnly::new(dims_from_config(&cfg));
        let m = Bunny::new(&src, cfg.clone()).unwrap();
        let n: usize = src.requested().iter().map(|(_, s)| s.iter().product::<usize>()).sum();
        // Closed form: phi-2 (no lm_head bias), SigLIP so400m minus its last layer, head and post-LN,
        // the mlp2x_gelu connector, and the prompt module with a bert-base Q-Former.
        let (d, v, f, l) = (2560usize, 50295usize, 10240usize, 32usize);
        let phi = 2 * v * d + l * (2 * d + 4 * (d * d + d) + 2 * d * f + f + d) + 2 * d;
        let (vd, vf, vl) = (1152usize, 4304usize, 26usize);
        let siglip = vd * 3 * 14 * 14 + vd + 729 * vd + vl * (4 * vd + 4 * (vd * vd + vd) + 2 * vd * vf + vf + vd);
        let conn = vd * d + d + d * d + d;
        let (q, qf, att) = (768usize, 3072usize, 1408usize);
        let bert_att = |kv: usize| q * q + q + 2 * (kv * q + q) + q * q + q + 2 * q;
        let ffn = q * qf + qf + qf * q + q + 2 * q;
        let qformer = 30523 * q + 512 * q + 2 * q + 12 * (bert_att(q) + 2 * ffn) + 6 * bert_att(att);
        let prompt = vd * att
            + att
            + 2 * att
            + 32 * q
            + qformer
            + q * vd
            + vd
            + (3 * vd * vd + 3 * vd + vd * vd + vd)
            + (2 * vd * 2048 + 2048)
            + (2048 + 1)
            + 2 * 2 * vd
            + 2 * vd;
        assert_eq!(n, phi + siglip + conn + prompt);
        assert_eq!(m.vision.layers.len(), 26);
        assert_eq!(m.prompt.as_ref().unwrap().num_query, 32);
        println!("Q-Adapt at real shapes: {:.3} B parameters ({} tensors)", n as f64 / 1e9, src.requested().len());
    }
}
