//! Which stage of progressive tuning a run is, and which parts of the model it trains: vision LoRA,
//! LLM LoRA, connector, prompt module (`--train`, and the stages of `ablate`'s recipes).

use serde::{Deserialize, Serialize};

/// Which stage of progressive instruction tuning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    /// LoRA on the LLM and the vision encoder, connector trainable.
    Stage1,
    /// Stage-1 LoRA merged and frozen; prompt module and connector trainable.
    Stage2,
}

impl Stage {
    /// "stage 1" or "stage 2", for titles.
    pub fn title(self) -> &'static str {
        match self {
            Stage::Stage1 => "stage 1",
            Stage::Stage2 => "stage 2",
        }
    }
}

/// The parts of the model a stage trains (Table 8 of the paper names the same four). Everything
/// else is frozen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Modules {
    /// LoRA on the SigLIP encoder layers.
    pub vision_lora: bool,
    /// LoRA on the phi decoder layers.
    pub llm_lora: bool,
    /// The MLP connector (`model.mm_projector.*`), trained in full.
    pub connector: bool,
    /// The instruction-adaptive prompt module (`model.vlm_*`: Q-Former cross-attention, T-V prompter,
    /// gate); training it makes the model Q-Adapt.
    pub prompt: bool,
}

impl Modules {
    /// The names `--train` takes, in this order.
    pub const NAMES: [&'static str; 4] = ["vision-lora", "llm-lora", "connector", "prompt"];

    /// What a stage trains by default: stage 1 LoRA (vision unless `no_vision_lora`) + connector;
    /// stage 2 prompt module + connector.
    pub fn of_stage(stage: Stage, no_vision_lora: bool) -> Self {
        match stage {
            Stage::Stage1 => Modules { vision_lora: !no_vision_lora, llm_lora: true, connector: true, prompt: false },
            Stage::Stage2 => Modules { vision_lora: false, llm_lora: false, connector: true, prompt: true },
        }
    }

    /// Parses names of [`Modules::NAMES`].
    pub fn parse<S: AsRef<str>>(names: &[S]) -> Result<Self, String> {
        let mut m = Modules::default();
        for n in names {
            match n.as_ref().trim() {
                "vision-lora" => m.vision_lora = true,
                "llm-lora" => m.llm_lora = true,
                "connector" => m.connector = true,
                "prompt" => m.prompt = true,
                other => {
                    return Err(format!("unknown module {other:?} (expected {})", Modules::NAMES.join(", ")));
                }
            }
        }
        if m == Modules::default() {
            return Err("no module to train".into());
        }
        Ok(m)
    }

    /// The names of the trained modules.
    pub fn names(self) -> Vec<&'static str> {
        let on = [self.vision_lora, self.llm_lora, self.connector, self.prompt];
        Modules::NAMES.into_iter().zip(on).filter(|(_, b)| *b).map(|(n, _)| n).collect()
    }

    /// Whether any LoRA is trained.
    pub fn lora(self) -> bool {
        self.vision_lora || self.llm_lora
    }

    /// The layer scopes LoRA goes into.
    pub fn lora_scopes(self) -> Vec<String> {
        let mut scopes = Vec::new();
        if self.llm_lora {
            scopes.push("model.layers.".to_string());
        }
        if self.vision_lora {
            scopes.push(format!("{}.encoder.layers.", models::bunny::VISION_PREFIX));
        }
        scopes
    }

    /// Whether a weight (not a LoRA factor) trains.
    pub(crate) fn trains(self, key: &str, unfreeze_qformer: bool) -> bool {
        if key.starts_with("model.mm_projector.") {
            return self.connector;
        }
        if !self.prompt {
            return false;
        }
        if let Some(rest) = key.strip_prefix("model.vlm_att_encoder.bert.") {
            // The official recipe trains only the Q-Former's cross-attention ("freeze_part").
            return unfreeze_qformer || rest.contains(".crossattention.");
        }
        key.starts_with("model.vlm_")
    }
}
