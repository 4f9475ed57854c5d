//! qadapt-run: the ONNX Runtime binary for edge GPU servers. It depends on `qadapt-core` (tokenizers,
//! template, preprocessing, sampling) and never on candle.
//!
//! Not built yet: the ONNX Runtime session loop lands with the runtime issue. Until then this binary
//! says so and exits non-zero rather than pretending.

use clap::Parser;

/// Answer questions about image quality with exported ONNX graphs.
#[derive(Debug, Parser)]
#[command(name = "qadapt-run", version, about)]
struct Cli {
    /// Export directory written by qadapt-export.
    #[arg(long)]
    model: std::path::PathBuf,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // Touch the shared crate so the dependency is real: the preprocessing defaults the runtime will use.
    let pre = qadapt_core::image::PreprocessConfig { image_size: 384, mean: [0.5; 3], std: [0.5; 3] };
    eprintln!(
        "error: the ONNX runtime for {} is not implemented yet (tracked by the qadapt-run issue; it will preprocess at {}px)",
        cli.model.display(),
        pre.image_size
    );
    std::process::ExitCode::from(2)
}
