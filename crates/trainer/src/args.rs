//! Command-line arguments (clap derive); doc comments are the help text.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// qadapt-train: train and run Bunny / Q-Adapt with candle.
#[derive(Debug, Parser)]
#[command(name = "qadapt-train", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Answer a question about an image (or score its quality) with the candle model.
    Infer(InferArgs),
}

/// Compute dtype of activations and weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Dtype {
    F32,
    F16,
    Bf16,
}

impl Dtype {
    pub fn candle(self) -> candle_core::DType {
        match self {
            Dtype::F32 => candle_core::DType::F32,
            Dtype::F16 => candle_core::DType::F16,
            Dtype::Bf16 => candle_core::DType::BF16,
        }
    }
}

#[derive(Debug, Args)]
pub struct InferArgs {
    /// HF model directory (config.json, safetensors, tokenizer files), as the hub ships it.
    #[arg(long)]
    pub model: PathBuf,
    /// Adapter directory to merge on load (adapter_model.safetensors / non_lora_trainables.safetensors).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Image file (JPEG, PNG or WebP).
    #[arg(long)]
    pub image: PathBuf,
    /// The question. Not needed with --score.
    #[arg(long, required_unless_present = "score")]
    pub ask: Option<String>,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    /// Sampling temperature; greedy when absent or 0.
    #[arg(long)]
    pub temperature: Option<f32>,
    /// Keep the k likeliest tokens when sampling.
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Nucleus sampling mass.
    #[arg(long)]
    pub top_p: Option<f32>,
    /// RNG seed: the same seed gives the same text.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Compute the Q-Align 1–5 quality score instead of generating.
    #[arg(long)]
    pub score: bool,
    /// Print one JSON object: {"answer", "token_ids", "score", "level_probs"}.
    #[arg(long)]
    pub json: bool,
    /// cpu or cuda.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Compute dtype (f32 on CPU; bf16 or f16 on CUDA).
    #[arg(long, value_enum, default_value_t = Dtype::F32)]
    pub dtype: Dtype,
}
