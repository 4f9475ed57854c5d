//! qadapt-export: merges LoRA and writes the ONNX graphs (vision, embed, decoder) plus qadapt.json.
//!
//! Not built yet: the graph builder (the second interpreter of `models::ops::Ops`) lands with the
//! export issue. Until then this binary says so and exits non-zero rather than pretending.

use clap::Parser;

/// Export a (LoRA-merged) Bunny / Q-Adapt model to ONNX.
#[derive(Debug, Parser)]
#[command(name = "qadapt-export", version, about)]
struct Cli {
    /// HF model directory.
    #[arg(long)]
    model: std::path::PathBuf,
    /// Output directory.
    #[arg(long)]
    out: std::path::PathBuf,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    eprintln!(
        "error: ONNX export of {} to {} is not implemented yet (tracked by the qadapt-export issue)",
        cli.model.display(),
        cli.out.display()
    );
    std::process::ExitCode::from(2)
}
