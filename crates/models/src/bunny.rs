//! The composed model: SigLIP → (Q-Adapt prompt module) → connector → phi-2, chosen by `model_type`.

use std::path::Path;

use candle_core::{DType, Device};
use qadapt_core::{BunnyConfig, ModelType};

use crate::adapter::AdaptedSource;
use crate::loader::{is_known_extra, Checkpoint, Vb, WeightSource};
use crate::ops::Ops;
use crate::phi::{KvPair, Phi};
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

impl Bunny {
    /// Builds the module tree from any weight source (checkpoint, or training variables).
    pub fn new(src: &dyn WeightSource, config: BunnyConfig) -> Result<Self> {
        let root = Vb::root(src);
        let vision = SiglipVision::new(&root.pp(VISION_PREFIX), &config.vision_config)?;
        let model = root.pp("model");
        let prompt = match (config.model_type, &config.qformer_config) {
            (ModelType::QAdapt, Some(q)) => Some(PromptModule::new(&model, config.mm_hidden_size, q)?),
            (ModelType::QAdapt, None) => return Err(Error::Unsupported("Q-Adapt config without qformer_config".into())),
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
    pub fn image_features<O: Ops>(&self, o: &mut O, pixels: &O::T, text: Option<QFormerText<'_, O::T>>) -> Result<ImageFeatures<O::T>> {
        let vision = self.vision.forward(o, pixels)?;
        let (qformer_output, fused) = match (&self.prompt, text) {
            (Some(p), Some(t)) => {
                let out = p.forward(o, &vision, t.input_ids, t.attention_mask)?;
                (Some(out.qformer_output), Some(out.fused))
            }
            (Some(_), None) => return Err(Error::Input("a Q-Adapt model needs the question for its prompt module".into())),
            (None, _) => (None, None),
        };
        let projected = self.mm_projector.forward(o, fused.as_ref().unwrap_or(&vision))?;
        Ok(ImageFeatures { vision, qformer_output, fused, projected })
    }

    /// One decoder step; see [`Phi::forward`].
    pub fn decode<O: Ops>(
        &self,
        o: &mut O,
        embeds: &O::T,
        mask2d: &O::T,
        position_ids: &O::T,
        past: Option<&[KvPair<O::T>]>,
    ) -> Result<(O::T, Vec<KvPair<O::T>>)> {
        self.llm.forward(o, embeds, mask2d, position_ids, past)
    }
}
