//! qadapt-export: LoRA merged, the model traced into ONNX graphs (vision, embed, decoder), qadapt.json
//! and the tokenizers written, each graph verified against candle through ONNX Runtime.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use exporter::{default_tolerance, export, ExportOptions, FloatType};
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Dtype {
    F32,
    F16,
}

/// Export a Bunny / Q-Adapt model (LoRA merged) to ONNX for qadapt-run.
#[derive(Debug, Parser)]
#[command(name = "qadapt-export", version, about)]
struct Cli {
    /// HF model directory (a hub checkpoint, `qadapt-train init` or `qadapt-train merge` output).
    #[arg(long)]
    model: PathBuf,
    /// Stage-1 run of `qadapt-train` (or a PEFT adapter directory): LoRA merged before tracing.
    #[arg(long, alias = "adapter")]
    stage1: Option<PathBuf>,
    /// Stage-2 run (prompt module and connector), applied over stage 1.
    #[arg(long)]
    stage2: Option<PathBuf>,
    /// Merge LoRA into the base weights before tracing (the only mode: adapters never reach the graphs).
    #[arg(long, default_value_t = true)]
    merge_lora: bool,
    /// Output directory (written under a temporary name, renamed when complete).
    #[arg(long)]
    out: PathBuf,
    /// Weight and activation type of the graphs.
    #[arg(long, value_enum, default_value_t = Dtype::F32)]
    dtype: Dtype,
    /// ONNX opset (17 is what the graphs use; other values are refused).
    #[arg(long, default_value_t = 17)]
    opset: i64,
    /// Weights to `<graph>.onnx.data` for every graph (always done above 128 MiB of weights).
    #[arg(long)]
    external_data: bool,
    /// Skip running the graphs through ONNX Runtime.
    #[arg(long)]
    no_verify: bool,
    /// libonnxruntime.so for verification (default: ORT_DYLIB_PATH).
    #[arg(long)]
    ort_lib: Option<PathBuf>,
    /// Largest max relative error accepted by verification (default 1e-4 for f32, 2e-2 for f16).
    #[arg(long)]
    tolerance: Option<f32>,
    /// Weight-only quantization of every decoder linear (`MatMulNBits`, symmetric, default zero
    /// point): int4 or int8. Runs on the CPU and CUDA providers (not TensorRT).
    #[arg(long, value_enum)]
    quantize: Option<Bits>,
    /// Weights per quantization scale (a power of two, at least 16).
    #[arg(long, default_value_t = 32, requires = "quantize")]
    block_size: usize,
    /// MatMulNBits' accuracy_level: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 activations (the
    /// fastest on CPU; what onnxruntime-genai uses there).
    #[arg(long, default_value_t = 4, requires = "quantize", value_parser = clap::value_parser!(u8).range(0..=4))]
    accuracy_level: u8,
    /// Keep lm_head in the float type.
    #[arg(long, requires = "quantize")]
    keep_lm_head: bool,
    /// Quantize the vision graph's linears too (SigLIP, prompt module, connector).
    #[arg(long, requires = "quantize")]
    quantize_vision: bool,
    /// The contrib-op variant for ONNX Runtime's CPU and CUDA providers: GroupQueryAttention over
    /// a preallocated cache written in place, packed QKV, SkipLayerNormalization, FastGelu. Not
    /// for TensorRT (keep the standard graphs there).
    #[arg(long)]
    fused: bool,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Bits {
    Int4,
    Int8,
}

fn run(cli: Cli) -> anyhow::Result<()> {
    anyhow::ensure!(
        cli.opset == exporter::write::OPSET,
        "--opset {}: the graphs are written for opset {}",
        cli.opset,
        exporter::write::OPSET
    );
    let ft = match cli.dtype {
        Dtype::F32 => FloatType::F32,
        Dtype::F16 => FloatType::F16,
    };
    let opts = ExportOptions {
        model: cli.model,
        stage1: cli.stage1,
        stage2: cli.stage2,
        out: cli.out,
        ft,
        external_data: cli.external_data,
        verify: !cli.no_verify,
        ort_lib: cli.ort_lib,
        tolerance: cli.tolerance.unwrap_or(default_tolerance(ft)),
        quant: cli.quantize.map(|b| exporter::quant::Quant {
            bits: match b {
                Bits::Int4 => 4,
                Bits::Int8 => 8,
            },
            block_size: cli.block_size,
            accuracy_level: cli.accuracy_level,
            lm_head: !cli.keep_lm_head,
            vision: cli.quantize_vision,
        }),
        fused: cli.fused,
    };
    let opts_quant = opts.quant;
    let bar = ProgressBar::new(0).with_style(
        ProgressStyle::with_template("{msg:>12} [{bar:30}] {pos}/{len} tensors")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut current = String::new();
    let summary = export(&opts, |graph, done, total| {
        if current != graph {
            current = graph.to_string();
            bar.set_message(current.clone());
            bar.set_length(total as u64);
        }
        bar.set_position(done as u64);
    })?;
    bar.finish_and_clear();
    if cli.json {
        println!("{}", serde_json::to_string(&summary)?);
        return Ok(());
    }
    println!(
        "exported {} ({}):",
        summary.out.display(),
        if summary.verified { "verified against candle through ONNX Runtime" } else { "not verified" }
    );
    for g in &summary.graphs {
        let err = g.max_rel_err.map(|e| format!("max rel err {e:.1e}")).unwrap_or_default();
        println!(
            "  {:<17} {:>6} nodes {:>5} tensors {:>10.2} MB{} {err}",
            g.file,
            g.nodes,
            g.initializers,
            g.bytes as f64 / 1e6,
            if g.external_data { " (+ .data)" } else { "" }
        );
    }
    if let (Some(r), Some(q)) = (&summary.quant, &opts_quant) {
        let bound = exporter::verify::QuantBounds::of(q.bits);
        println!(
            "  {} accuracy vs the unquantized model over {} positions: logit cosine mean {:.5} (min {:.5}, bound {}), \
             max |Δlogit| {:.3e}, greedy agreement {:.3} (bound {}){}",
            q.name(),
            r.positions,
            r.logit_cosine_mean,
            r.logit_cosine_min,
            bound.logit_cosine_mean,
            r.logit_max_abs_err,
            r.top1_agreement,
            bound.top1_agreement,
            r.vision_cosine.map(|c| format!(", image-feature cosine {c:.5}")).unwrap_or_default()
        );
    }
    Ok(())
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
