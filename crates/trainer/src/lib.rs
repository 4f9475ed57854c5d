//! `qadapt-train`: progressive instruction tuning of Bunny / Q-Adapt with candle (stage 1: LoRA on the
//! LLM and the vision encoder + connector; stage 2: prompt module + connector over the merged model),
//! plus `infer`, `init`, `merge`, `eval`, the synthetic EIQA dataset (`synth`) and the recipe
//! comparison of the paper's Tables 8–9 (`ablate`).

pub mod ablate;
pub mod args;
pub mod checkpoint;
pub mod cli;
pub mod data;
pub mod eval;
pub mod files;
pub mod infer;
pub mod init;
pub mod merge;
pub mod metrics;
pub mod modules;
pub mod optim;
pub mod plan;
pub mod plot;
pub mod shards;
pub mod step;
pub mod synth;
pub mod train;

/// Compute dtype of activations and weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    F32,
    F16,
    Bf16,
}

impl Dtype {
    /// Every dtype, in the order `--dtype` lists them.
    pub const ALL: [Dtype; 3] = [Dtype::F32, Dtype::F16, Dtype::Bf16];

    /// The name `--dtype` takes.
    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::F16 => "f16",
            Dtype::Bf16 => "bf16",
        }
    }

    /// candle's dtype.
    pub fn candle(self) -> candle_core::DType {
        match self {
            Dtype::F32 => candle_core::DType::F32,
            Dtype::F16 => candle_core::DType::F16,
            Dtype::Bf16 => candle_core::DType::BF16,
        }
    }
}

impl std::str::FromStr for Dtype {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Dtype::ALL
            .into_iter()
            .find(|d| d.name() == s)
            .ok_or_else(|| format!("unknown dtype {s:?} (expected f32, f16 or bf16)"))
    }
}

/// Picks the candle device named on the command line.
pub fn device(name: &str) -> anyhow::Result<candle_core::Device> {
    match name {
        "cpu" => Ok(candle_core::Device::Cpu),
        "cuda" => {
            if !candle_core::utils::cuda_is_available() {
                anyhow::bail!(
                    "--device cuda: this binary was built without the `cuda` feature (cargo build --features cuda)"
                );
            }
            Ok(candle_core::Device::new_cuda(0)?)
        }
        other => anyhow::bail!("unknown --device {other:?} (expected cpu or cuda)"),
    }
}
