//! qadapt-run: answers and scores image quality with the graphs of `qadapt-export` on ONNX Runtime
//! (CPU, CUDA or TensorRT execution provider). Never depends on candle.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use qadapt_core::image::load_image;
use qadapt_core::sampling::{score_line, SamplingParams};
use runtime::{Ep, GenerateOptions, Runtime};

/// Answer questions about image quality, or score it, with an exported Q-Adapt / Bunny model.
#[derive(Debug, Parser)]
#[command(name = "qadapt-run", version, about)]
struct Cli {
    /// Export directory written by qadapt-export.
    #[arg(long)]
    model: PathBuf,
    /// Image file (JPEG, PNG, WebP; EXIF orientation honoured).
    #[arg(long)]
    image: PathBuf,
    /// The question; the answer streams to stdout.
    #[arg(long, required_unless_present = "score")]
    ask: Option<String>,
    /// Print the Q-Align 1–5 quality score and the level probabilities instead.
    #[arg(long)]
    score: bool,
    /// Print `{answer, token_ids, score, level_probs}` as JSON.
    #[arg(long)]
    json: bool,
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    /// Sampling temperature; greedy when absent or 0.
    #[arg(long)]
    temperature: Option<f32>,
    #[arg(long)]
    top_k: Option<usize>,
    #[arg(long)]
    top_p: Option<f32>,
    /// Same seed, same text.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// HF repetition penalty over the tokens generated so far (1 = none).
    #[arg(long)]
    repetition_penalty: Option<f32>,
    /// Execution provider; `auto` picks TensorRT, else CUDA, else CPU, and says which.
    #[arg(long, value_enum, default_value_t = Ep::Cpu)]
    ep: Ep,
    /// GPU index for the CUDA / TensorRT providers.
    #[arg(long, default_value_t = 0)]
    device_id: i32,
    /// Let TensorRT build fp16 engines.
    #[arg(long)]
    fp16: bool,
    /// libonnxruntime.so to load (default: ORT_DYLIB_PATH).
    #[arg(long)]
    ort_lib: Option<PathBuf>,
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let img = load_image(&cli.image)?;
    let mut rt = Runtime::open(&cli.model, cli.ep, cli.device_id, cli.fp16, cli.ort_lib.as_deref()).with_context(|| format!("opening {}", cli.model.display()))?;
    if cli.ep == Ep::Auto {
        eprintln!("execution provider: {}", rt.ep);
    }
    let mut out = std::io::stdout().lock();
    if cli.score {
        let res = rt.score_json(&img)?;
        if cli.json {
            writeln!(out, "{}", serde_json::to_string(&res)?)?;
        } else {
            writeln!(out, "{}", score_line(&res))?;
        }
        return Ok(());
    }
    let question = cli.ask.as_deref().context("--ask is required unless --score is given")?;
    let opts = GenerateOptions {
        max_new_tokens: cli.max_new_tokens,
        sampling: SamplingParams { temperature: cli.temperature, top_k: cli.top_k, top_p: cli.top_p, seed: cli.seed, repetition_penalty: cli.repetition_penalty },
    };
    let stream = !cli.json;
    let res = rt.generate(&img, question, &opts, |piece| {
        if stream {
            let _ = write!(std::io::stdout(), "{piece}").and_then(|_| std::io::stdout().flush());
        }
    })?;
    if cli.json {
        writeln!(out, "{}", serde_json::to_string(&res)?)?;
    } else {
        writeln!(out)?;
    }
    Ok(())
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
