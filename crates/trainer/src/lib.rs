//! `qadapt-train`: progressive instruction tuning of Bunny / Q-Adapt with candle (stage 1: LoRA on the
//! LLM and the vision encoder + connector; stage 2: prompt module + connector over the merged model),
//! plus `infer`, `init`, `merge` and the synthetic EIQA dataset (`synth`).

pub mod args;
pub mod cli;
pub mod data;
pub mod eval;
pub mod files;
pub mod infer;
pub mod init;
pub mod merge;
pub mod metrics;
pub mod optim;
pub mod plot;
pub mod shards;
pub mod step;
pub mod synth;
pub mod train;

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
