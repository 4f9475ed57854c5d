//! `qadapt-train`: the candle side of qadapt. Today it runs inference (`infer`) on a hub model
//! directory with an optional adapter; the stage-1 / stage-2 trainer lands with its own issue.

pub mod args;
pub mod infer;

/// Picks the candle device named on the command line.
pub fn device(name: &str) -> anyhow::Result<candle_core::Device> {
    match name {
        "cpu" => Ok(candle_core::Device::Cpu),
        "cuda" => {
            if !candle_core::utils::cuda_is_available() {
                anyhow::bail!("--device cuda: this binary was built without the `cuda` feature (cargo build --features cuda)");
            }
            Ok(candle_core::Device::new_cuda(0)?)
        }
        other => anyhow::bail!("unknown --device {other:?} (expected cpu or cuda)"),
    }
}
