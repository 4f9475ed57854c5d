//! Command-line arguments (clap derive); doc comments are the help text.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::data::Task;
pub use crate::Dtype;

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
    /// Stage 1: LoRA on the LLM and the vision encoder, connector trainable (explanation data).
    Stage1(TrainArgs),
    /// Stage 2: stage-1 LoRA merged and frozen; prompt module and connector trained (all data).
    Stage2(TrainArgs),
    /// Merge base + stage-1 LoRA (+ stage-2 modules) into an HF-format model directory.
    Merge(MergeArgs),
    /// Write a random-initialised model directory in the hub layout for a config.
    Init(InitArgs),
    /// Generate the synthetic EIQA dataset (images with known distortions, Q-Instruct JSON).
    Synth(SynthArgs),
    /// Answer accuracy on held-out conversations and SROCC / PLCC of the score against labels.
    Eval(EvalArgs),
    /// Expected peak memory of a training step, by part, per stage, before reading any weight
    /// (takes the same settings as stage1 / stage2).
    Plan(PlanArgs),
    /// Compare tuning recipes (the paper's joint / two-stage / progressive and its Table 8 rows) at
    /// equal budgets over several seeds: ablation.json, ablation.md and ablation.png.
    Ablate(AblateArgs),
}

#[derive(Debug, Args)]
pub struct InferArgs {
    /// HF model directory (config.json, safetensors, tokenizer files), as the hub ships it.
    #[arg(long)]
    pub model: PathBuf,
    /// Adapter directory to merge on load (a training run's `final/`, or PEFT files).
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
    /// HF repetition penalty over the tokens generated so far (1 = none).
    #[arg(long)]
    pub repetition_penalty: Option<f32>,
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
    #[arg(long, default_value = "f32", value_parser = dtype_parser())]
    pub dtype: Dtype,
}

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Base model directory (hub layout).
    #[arg(long, required_unless_present = "resume")]
    pub model: Option<PathBuf>,
    /// Stage-1 run directory (stage 2 only): its LoRA is merged and frozen.
    #[arg(long)]
    pub stage1: Option<PathBuf>,
    /// Training data: LLaVA / Q-Instruct JSON files, comma-separated.
    #[arg(long, value_delimiter = ',', required_unless_present = "resume")]
    pub data: Vec<PathBuf>,
    /// Folder the data's image paths are relative to.
    #[arg(long, required_unless_present = "resume")]
    pub images: Option<PathBuf>,
    /// Run directory: checkpoints, final adapter, metrics.jsonl, loss.png.
    #[arg(long, required_unless_present = "resume")]
    pub out: Option<PathBuf>,
    /// Continue the run in this directory from its latest checkpoint (its saved settings apply).
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Data subset: explanation (stage 1's default), answering, or all (stage 2's default).
    #[arg(long, value_parser = task_parser())]
    pub task: Option<Task>,
    /// Leave the vision encoder without LoRA.
    #[arg(long, conflicts_with = "train")]
    pub no_vision_lora: bool,
    /// The modules this stage trains, comma-separated: vision-lora, llm-lora, connector, prompt
    /// (default: stage 1 vision-lora,llm-lora,connector; stage 2 prompt,connector).
    #[arg(long, value_delimiter = ',')]
    pub train: Option<Vec<String>>,
    /// Passes over the data.
    #[arg(long, default_value_t = 1)]
    pub epochs: usize,
    /// Stop after this many optimizer steps.
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// Seed of data order, LoRA init and dropout.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Write a checkpoint every N steps (and always at the end).
    #[arg(long, default_value_t = 0)]
    pub save_every: usize,
    /// Stage 2: train the whole Q-Former, not only its cross-attention.
    #[arg(long)]
    pub unfreeze_qformer: bool,
    /// Stage 2: InstructBLIP Q-Former weights (safetensors: LAVIS or HF names).
    #[arg(long)]
    pub qformer_init: Option<PathBuf>,
    /// Draw all base weights at random on the device instead of reading them (the model directory
    /// then needs only config.json and tokenizer files): for benchmarks at real shapes.
    #[arg(long)]
    pub random_weights: bool,
    /// Optimizer, LoRA and compute settings.
    #[command(flatten)]
    pub settings: TrainSettings,
}

/// What every training stage shares: LoRA shape, optimizer, batch and compute settings (`stage1`,
/// `stage2` and every stage `ablate` runs).
#[derive(Debug, Clone, Args)]
pub struct TrainSettings {
    /// LoRA rank.
    #[arg(long, default_value_t = 128)]
    pub lora_r: usize,
    /// LoRA alpha (scale = alpha / r).
    #[arg(long, default_value_t = 256.0)]
    pub lora_alpha: f64,
    /// LoRA dropout.
    #[arg(long, default_value_t = 0.05)]
    pub lora_dropout: f32,
    /// Linear layers that get LoRA, by name (phi-2: q_proj k_proj v_proj dense fc1 fc2; SigLIP: out_proj too).
    #[arg(long, value_delimiter = ',', default_value = "q_proj,k_proj,v_proj,dense,fc1,fc2,out_proj")]
    pub lora_targets: Vec<String>,
    /// Learning rate of LoRA (stage 1) or the prompt module (stage 2).
    #[arg(long, default_value_t = 2e-4)]
    pub lr: f64,
    /// Learning rate of the connector.
    #[arg(long, default_value_t = 2e-5)]
    pub connector_lr: f64,
    /// AdamW weight decay.
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// Share of steps spent warming the learning rate up.
    #[arg(long, default_value_t = 0.03)]
    pub warmup_ratio: f64,
    /// Global gradient-norm clip (0: off).
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    /// Samples per micro-batch.
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    /// Longest sequence (text + image tokens); longer samples are truncated with a warning.
    #[arg(long, default_value_t = 2048)]
    pub max_length: usize,
    /// cpu or cuda.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Compute dtype (trainable weights keep f32 master copies).
    #[arg(long, default_value = "f32", value_parser = dtype_parser())]
    pub dtype: Dtype,
    /// Keep only each SigLIP and phi layer's inputs in the forward pass and recompute the layer in
    /// the backward pass (same dropout masks): less activation memory, one more forward per step.
    #[arg(long)]
    pub gradient_checkpointing: bool,
}

impl TrainSettings {
    /// The LoRA a stage training `modules` attaches (none when it trains no LoRA).
    pub fn lora(&self, modules: crate::modules::Modules) -> Option<models::train_source::LoraSpec> {
        modules.lora().then(|| models::train_source::LoraSpec {
            r: self.lora_r,
            alpha: self.lora_alpha,
            dropout: self.lora_dropout,
            targets: self.lora_targets.clone(),
            scopes: modules.lora_scopes(),
        })
    }
}

#[derive(Debug, Args)]
pub struct PlanArgs {
    /// A model config: a config JSON file (`configs/*.json`) or a model directory.
    #[arg(long)]
    pub config: PathBuf,
    /// Plan only this stage (1 or 2); both by default.
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=2))]
    pub stage: Option<u8>,
    /// Answer tokens per sample, the rows the loss reads (default: every text token).
    #[arg(long)]
    pub answer_tokens: Option<usize>,
    /// Stage 2: Q-Former question tokens per sample (default: the config's max_text_length).
    #[arg(long)]
    pub qformer_tokens: Option<usize>,
    /// Leave the vision encoder without LoRA.
    #[arg(long)]
    pub no_vision_lora: bool,
    /// Stage 2: train the whole Q-Former, not only its cross-attention.
    #[arg(long)]
    pub unfreeze_qformer: bool,
    /// Print JSON (one object per stage, one per line) instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub settings: TrainSettings,
}

#[derive(Debug, Args)]
pub struct MergeArgs {
    /// Base model directory.
    #[arg(long)]
    pub model: PathBuf,
    /// Stage-1 run directory.
    #[arg(long)]
    pub stage1: PathBuf,
    /// Stage-2 run directory.
    #[arg(long)]
    pub stage2: Option<PathBuf>,
    /// Output directory (HF layout).
    #[arg(long)]
    pub out: PathBuf,
    /// Stored dtype of the output (default: the base's).
    #[arg(long, value_parser = dtype_parser())]
    pub dtype: Option<Dtype>,
    /// Largest shard in MiB.
    #[arg(long, default_value_t = 2048)]
    pub shard_mib: usize,
}

#[derive(Debug, Args)]
pub struct InitArgs {
    /// A Bunny / Q-Adapt config.json (any size).
    #[arg(long)]
    pub config: PathBuf,
    /// Output model directory.
    #[arg(long)]
    pub out: PathBuf,
    /// Seed of the random weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Copy the tokenizer files (and qformer/) from this directory.
    #[arg(long, conflicts_with = "data")]
    pub tokenizer: Option<PathBuf>,
    /// Train a small byte-level BPE (and a Q-Former WordPiece) on these JSON files instead.
    #[arg(long, value_delimiter = ',')]
    pub data: Vec<PathBuf>,
    /// Vocabulary size of the trained BPE.
    #[arg(long, default_value_t = 1000)]
    pub bpe_vocab: usize,
    /// Stored dtype of the weights.
    #[arg(long, default_value = "f32", value_parser = dtype_parser())]
    pub dtype: Dtype,
    /// Largest shard in MiB.
    #[arg(long, default_value_t = 2048)]
    pub shard_mib: usize,
}

#[derive(Debug, Args)]
pub struct SynthArgs {
    /// Output folder (images/, train.json, test.json, labels.csv).
    #[arg(long)]
    pub out: PathBuf,
    /// Number of images.
    #[arg(long, default_value_t = 400)]
    pub n: usize,
    /// Long side of the images in pixels (use the model's image size; the short side is 3/4 of it).
    #[arg(long, default_value_t = 32)]
    pub size: u32,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Share of images held out in test.json.
    #[arg(long, default_value_t = 0.2)]
    pub test_fraction: f64,
}

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Model directory.
    #[arg(long)]
    pub model: PathBuf,
    /// Adapter directory merged on load.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Held-out conversations (Q-Instruct JSON); the answering ones are asked.
    #[arg(long, required_unless_present_any = ["qbench", "labels"])]
    pub data: Option<PathBuf>,
    /// Q-Bench A1 JSON (a list of {img_path, question, candidates, correct_ans, type, concern}):
    /// accuracy by generation and by likelihood, as `qadapt-run eval --qbench` reports it.
    #[arg(long)]
    pub qbench: Option<PathBuf>,
    /// Folder the image paths are relative to.
    #[arg(long)]
    pub images: PathBuf,
    /// Labels CSV whose header names an image column (`image`, `image_name`, `img_path` or
    /// `filename`) and a score column (`mos`, `score` or `dmos`): its images are scored and
    /// correlated with the score.
    #[arg(long)]
    pub labels: Option<PathBuf>,
    /// Score only the label rows whose `split` column equals this (`all`: every row).
    #[arg(long, default_value = "test")]
    pub split: String,
    /// Ask at most this many questions of each set.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct AblateArgs {
    /// Base model directory (hub layout). A Q-Adapt base runs as plain Bunny in recipes that never
    /// train the prompt module.
    #[arg(long)]
    pub model: PathBuf,
    /// Training data: LLaVA / Q-Instruct JSON files, comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    pub data: Vec<PathBuf>,
    /// Held-out set: LLaVA-format conversations (their short answers are asked) or Q-Bench A1 rows
    /// (asked by generation and by likelihood).
    #[arg(long)]
    pub test: PathBuf,
    /// Folder the image paths are relative to.
    #[arg(long)]
    pub images: PathBuf,
    /// Folder the held-out set's and the labels' image paths are relative to (default: --images).
    #[arg(long)]
    pub test_images: Option<PathBuf>,
    /// Labels CSV (image and mos columns): SROCC / PLCC of each model's score.
    #[arg(long)]
    pub labels: Option<PathBuf>,
    /// Score only the label rows whose `split` column equals this (`all`: every row).
    #[arg(long, default_value = "test")]
    pub split: String,
    /// Output directory: one run directory per (recipe, seed), and the results.
    #[arg(long)]
    pub out: PathBuf,
    /// Recipes, comma-separated: names (joint, two-stage, progressive, t8-…), groups (main, table8,
    /// all) or names from --recipe-file.
    #[arg(long, value_delimiter = ',', default_value = "all")]
    pub recipes: Vec<String>,
    /// Custom recipes: a JSON object or list, {"name", "stages": [{"task", "train": [modules],
    /// "share"}], "paper"}.
    #[arg(long)]
    pub recipe_file: Option<PathBuf>,
    /// Seeds, comma-separated: each recipe runs once per seed.
    #[arg(long, value_delimiter = ',', default_value = "1,2,3")]
    pub seeds: Vec<u64>,
    /// Optimizer steps per recipe, split across its stages.
    #[arg(long, conflicts_with = "epochs")]
    pub max_steps: Option<usize>,
    /// Budget in passes over all the training samples, converted to steps (when --max-steps is unset).
    #[arg(long, default_value_t = 1)]
    pub epochs: usize,
    /// Ask at most this many held-out questions per run.
    #[arg(long)]
    pub eval_limit: Option<usize>,
    /// Optimizer, LoRA and compute settings of every stage.
    #[command(flatten)]
    pub settings: TrainSettings,
}

/// `--task`: the data subsets of [`Task`].
fn task_parser() -> impl clap::builder::TypedValueParser<Value = Task> {
    use clap::builder::TypedValueParser as _;
    clap::builder::PossibleValuesParser::new(Task::ALL.map(Task::name)).try_map(|s| s.parse::<Task>())
}

/// `--dtype`: f32, f16 or bf16.
fn dtype_parser() -> impl clap::builder::TypedValueParser<Value = Dtype> {
    use clap::builder::TypedValueParser as _;
    clap::builder::PossibleValuesParser::new(Dtype::ALL.map(Dtype::name)).try_map(|s| s.parse::<Dtype>())
}
