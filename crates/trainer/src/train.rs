//! Progressive instruction tuning: the stage-1 and stage-2 training loops, checkpoints and resume.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::{DType, Tensor, Var};
use models::adapter::AdaptedSource;
use models::loader::{Checkpoint, WeightSource};
use models::train_source::{LoraSpec, RandomSource, TrainSource};
use models::{Bunny, Candle};
use qadapt_core::image::PreprocessConfig;
use qadapt_core::{BunnyConfig, ModelType, QFormerTokenizer, TextTokenizer};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use crate::checkpoint::{clear_half_written, latest_checkpoint, load_trainables, qformer_init_map, save_trainables};
use crate::data::{self, Encoded, Task};
use crate::files::write_dir_atomic;
use crate::metrics::{self, Metric};
use crate::optim::{clip_global_norm, cosine_with_warmup, AdamW, Group};
use crate::step::batch_loss;

pub use crate::modules::{Modules, Stage};

/// Everything a run depends on; saved as `train_config.json` so `--resume` needs nothing else.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainConfig {
    pub stage: Stage,
    pub model: PathBuf,
    pub stage1: Option<PathBuf>,
    pub data: Vec<PathBuf>,
    pub images: PathBuf,
    pub out: PathBuf,
    pub task: Task,
    pub lora: Option<LoraSpec>,
    pub lr: f64,
    pub connector_lr: f64,
    pub weight_decay: f64,
    pub warmup_ratio: f64,
    pub max_grad_norm: f64,
    pub epochs: usize,
    pub max_steps: Option<usize>,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub max_length: usize,
    pub seed: u64,
    pub save_every: usize,
    pub unfreeze_qformer: bool,
    pub qformer_init: Option<PathBuf>,
    pub device: String,
    pub dtype: crate::Dtype,
    /// Ignore the model's weights (there may be none): draw every base weight at random on the
    /// device. For benchmarks at real shapes without writing a checkpoint first.
    #[serde(default)]
    pub random_weights: bool,
    /// What trains; absent in configs written before `--train` existed: the stage's default.
    #[serde(default)]
    pub modules: Option<Modules>,
    /// Recompute each SigLIP and phi layer in the backward pass instead of keeping its activations.
    #[serde(default)]
    pub gradient_checkpointing: bool,
}

impl TrainConfig {
    /// The modules this run trains.
    pub fn modules(&self) -> Modules {
        self.modules.unwrap_or_else(|| {
            let vision = self.lora.as_ref().is_some_and(|l| l.scopes.iter().any(|s| s.contains("vision")));
            Modules::of_stage(self.stage, !vision)
        })
    }
}

/// Progress saved with each checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps done.
    pub step: usize,
    pub total_steps: usize,
    /// The data order and dropout masks are functions of (seed, step): this is the RNG state.
    pub seed: u64,
    pub samples: usize,
}

/// What a finished run reports.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub stage: Stage,
    pub steps: usize,
    pub samples: usize,
    pub trainable_params: usize,
    pub first_loss: f32,
    pub final_loss: f32,
    pub mean_last10_loss: f32,
    pub samples_per_s: f64,
    pub seconds: f64,
    /// Median wall time of an optimizer step after the first two (warm-up), in ms.
    pub step_ms_median: f64,
    /// Mean text tokens per sample and image tokens per sample (the sequence is their sum).
    pub mean_text_tokens: f64,
    pub image_tokens: usize,
    /// Peak resident memory of the process at the end of the run, in MB (Linux).
    pub peak_rss_mb: Option<f64>,
    pub truncated_samples: usize,
    pub randomly_initialised: usize,
    pub adapter_dir: PathBuf,
}

pub use models::adapter::adapter_dir;

fn group_of(key: &str) -> &'static str {
    if key.contains(".lora_") {
        "lora"
    } else if key.starts_with("model.mm_projector.") {
        "connector"
    } else {
        "prompt"
    }
}

/// Runs a stage to the end (or resumes one); returns the summary it also prints and saves.
pub fn run(cfg: &TrainConfig, resume: bool) -> anyhow::Result<Summary> {
    run_observed(cfg, resume, None)
}

/// [`run`], calling `on_step` after each optimizer step instead of drawing its own progress bar
/// (`ablate` draws one over the whole plan).
pub fn run_observed(cfg: &TrainConfig, resume: bool, on_step: Option<&dyn Fn()>) -> anyhow::Result<Summary> {
    anyhow::ensure!(cfg.batch_size > 0 && cfg.grad_accum > 0, "--batch-size and --grad-accum must be ≥ 1");
    let device = crate::device(&cfg.device)?;
    let dtype = cfg.dtype.candle();
    let setup = Setup::load(cfg)?;
    let data = Data::encode(cfg, &setup)?;
    let ckpt = if resume { latest_checkpoint(&cfg.out) } else { None };
    if resume && ckpt.is_none() {
        bail!("--resume {}: no checkpoint-N directory to resume from", cfg.out.display());
    }
    let trainee = Trainee::build(cfg, &setup.config, ckpt.as_ref().map(|c| c.1.as_path()), &device, dtype)?;
    let sched = Schedule::new(cfg, data.encoded.len());
    let mut opt = AdamW::new(cfg.weight_decay);
    let start = match &ckpt {
        Some((n, dir)) => {
            clear_half_written(&cfg.out)?;
            opt.load(&dir.join("optimizer.safetensors"), &device)?;
            tracing::info!(step = n, "resumed from {}", dir.display());
            *n
        }
        None => 0,
    };
    let mut metrics = open_run_dir(cfg, start, ckpt.is_some())?;

    let t0 = Instant::now();
    let ctx = Loop { cfg, setup: &setup, data: &data, trainee: &trainee, sched, device: &device, dtype, on_step };
    let samples_done = ctx.steps(start, &mut opt, &mut metrics)?;
    let final_dir = save_final(cfg, &setup.config, &trainee)?;
    let points: Vec<(f64, f64)> = metrics.iter().map(|m| (m.step as f64, m.loss as f64)).collect();
    crate::plot::loss_curve(&points, cfg.stage.title(), &cfg.out.join("loss.png"))?;

    let summary =
        summarize(cfg, &setup, &data, &trainee, &sched, &metrics, samples_done, t0.elapsed().as_secs_f64(), final_dir);
    std::fs::write(cfg.out.join("summary.json"), serde_json::to_string_pretty(&summary)?)?;
    Ok(summary)
}

/// What a run reads before its data: the config (stage 2 makes Bunny Q-Adapt), tokenizers and
/// image preprocessing.
struct Setup {
    config: BunnyConfig,
    tok: TextTokenizer,
    qtok: Option<QFormerTokenizer>,
    pre: PreprocessConfig,
    /// Visual tokens per image.
    n_img: usize,
}

impl Setup {
    fn load(cfg: &TrainConfig) -> anyhow::Result<Self> {
        let mut config = BunnyConfig::from_file(&cfg.model.join("config.json"))?;
        if cfg.modules().prompt && config.model_type == ModelType::Bunny {
            // Training the prompt module turns Bunny into Q-Adapt; without a qformer_config the
            // official sizes apply.
            config.model_type = ModelType::QAdapt;
            config.qformer_config.get_or_insert_with(Default::default);
        }
        let tok = TextTokenizer::from_dir(&cfg.model)?;
        let qtok = match &config.qformer_config {
            Some(q) if config.model_type == ModelType::QAdapt => {
                Some(QFormerTokenizer::from_dir(&cfg.model, q.max_text_length)?)
            }
            _ => None,
        };
        let v = &config.vision_config;
        let pre = PreprocessConfig { image_size: v.image_size as u32, mean: v.image_mean, std: v.image_std };
        let n_img = v.num_patches();
        Ok(Self { config, tok, qtok, pre, n_img })
    }
}

/// The run's samples of its task, tokenized once.
struct Data {
    encoded: Vec<Encoded>,
    truncated: usize,
}

impl Data {
    fn encode(cfg: &TrainConfig, setup: &Setup) -> anyhow::Result<Self> {
        let samples = data::load(&cfg.data, &cfg.images)?;
        let samples: Vec<_> = samples.into_iter().filter(|s| cfg.task == Task::All || s.task == cfg.task).collect();
        anyhow::ensure!(!samples.is_empty(), "no samples of task {:?} in {:?}", cfg.task, cfg.data);
        let encoded: Vec<Encoded> = samples
            .iter()
            .map(|s| data::encode(s, &setup.tok, setup.n_img, cfg.max_length))
            .collect::<anyhow::Result<_>>()?;
        let truncated = encoded.iter().filter(|e| e.truncated).count();
        if truncated > 0 {
            tracing::warn!(truncated, max_length = cfg.max_length, "samples truncated to --max-length");
        }
        Ok(Self { encoded, truncated })
    }
}

/// The model as this stage trains it: which weights train (in which optimizer group), which are
/// frozen, where LoRA goes.
struct Trainee {
    model: Bunny,
    vars: Vec<(String, Var)>,
    groups: Vec<Group>,
    lora: Option<LoraSpec>,
    randomised: usize,
    trainable_params: usize,
    /// Randomly initialised frozen tensors, saved beside the trainables.
    frozen_new: Vec<(String, Var)>,
}

impl Trainee {
    /// What a checkpoint or `final/` holds: the trainables and the frozen tensors drawn here.
    fn saved(&self) -> Vec<(String, Var)> {
        self.vars.iter().chain(&self.frozen_new).cloned().collect()
    }
}

impl Trainee {
    /// `resume_from`: a checkpoint whose trainables replace the initial ones.
    fn build(
        cfg: &TrainConfig,
        config: &BunnyConfig,
        resume_from: Option<&Path>,
        device: &candle_core::Device,
        dtype: DType,
    ) -> anyhow::Result<Self> {
        let random;
        let ck;
        let plain: &dyn WeightSource = if cfg.random_weights {
            random = RandomSource { device: device.clone(), dtype, known: models::bunny::dims_from_config(config) };
            &random
        } else {
            ck = Checkpoint::open(&cfg.model, device, dtype)?;
            &ck
        };
        let adapted;
        // A stage-1 run under this one is merged and frozen.
        let base: &dyn WeightSource = match &cfg.stage1 {
            Some(run1) => {
                adapted = AdaptedSource::open(plain, &adapter_dir(run1), device, dtype)?;
                &adapted
            }
            None => plain,
        };
        let mut init = HashMap::new();
        if let Some(q) = &cfg.qformer_init {
            init.extend(qformer_init_map(q, device)?);
        }
        if let Some(dir) = resume_from {
            init.extend(load_trainables(dir, device)?);
        }
        let modules = cfg.modules();
        let unfreeze = cfg.unfreeze_qformer;
        let trainable = move |k: &str| modules.trains(k, unfreeze);
        let lora = match (&cfg.lora, modules.lora()) {
            (Some(spec), true) => Some(spec.clone()),
            (None, true) => bail!("modules {:?} include LoRA but the run has no LoRA settings", modules.names()),
            (_, false) => None,
        };
        let src = TrainSource::new(base, trainable, lora.clone(), device, dtype, cfg.seed)
            .with_init(init)
            .with_random_missing(move |k| modules.prompt && k.starts_with("model.vlm_"))
            .with_shapes(models::bunny::dims_from_config(config));
        let model = Bunny::new(&src, config.clone())?;
        tracing::debug!(
            rss_mb = metrics::rss_mb(),
            peak_rss_mb = metrics::peak_rss_mb(),
            live_mb = metrics::live_mb(),
            "model built"
        );
        let vars = src.vars();
        let randomised = src.randomised();
        if !randomised.is_empty() && resume_from.is_none() {
            tracing::info!(count = randomised.len(), first = %randomised[0], "randomly initialised (not in the checkpoint)");
        }
        let trainable_params: usize = vars.iter().map(|(_, v)| v.as_tensor().elem_count()).sum();
        let mut groups: Vec<Group> = Vec::new();
        for (k, var) in vars.iter().cloned() {
            let name = group_of(&k);
            let lr = if name == "connector" { cfg.connector_lr } else { cfg.lr };
            match groups.iter_mut().find(|g| g.name == name) {
                Some(g) => g.vars.push((k, var)),
                None => groups.push(Group { name, lr, vars: vec![(k, var)] }),
            }
        }
        // Frozen tensors drawn at random (a prompt module new to the base) are saved with the
        // trainables: nothing else holds them.
        let frozen_new = src
            .frozen_new()
            .into_iter()
            .map(|(k, t)| Ok((k, Var::from_tensor(&t)?)))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self { model, vars, groups, lora, randomised: randomised.len(), trainable_params, frozen_new })
    }
}

/// Optimizer steps and their learning-rate schedule.
#[derive(Debug, Clone, Copy)]
struct Schedule {
    /// Samples per optimizer step (batch × accumulation).
    per_step: usize,
    total: usize,
    warmup: usize,
}

impl Schedule {
    fn new(cfg: &TrainConfig, samples: usize) -> Self {
        let per_step = cfg.batch_size * cfg.grad_accum;
        let steps_per_epoch = samples.div_ceil(per_step);
        let total = cfg.max_steps.unwrap_or(usize::MAX).min(cfg.epochs * steps_per_epoch).max(1);
        let warmup = (cfg.warmup_ratio * total as f64).ceil() as usize;
        Self { per_step, total, warmup }
    }
}

/// Creates the run directory with its `train_config.json`, and `metrics.jsonl` cut back to `start`
/// when resuming (emptied otherwise); returns the metrics kept.
fn open_run_dir(cfg: &TrainConfig, start: usize, resuming: bool) -> anyhow::Result<Vec<Metric>> {
    std::fs::create_dir_all(&cfg.out).with_context(|| format!("creating {}", cfg.out.display()))?;
    std::fs::write(cfg.out.join("train_config.json"), serde_json::to_string_pretty(cfg)?)?;
    let path = cfg.out.join("metrics.jsonl");
    let kept: Vec<Metric> =
        if resuming { metrics::read(&path)?.into_iter().filter(|m| m.step <= start).collect() } else { Vec::new() };
    metrics::write(&path, &kept)?;
    Ok(kept)
}

/// Everything the step loop reads.
struct Loop<'a> {
    cfg: &'a TrainConfig,
    setup: &'a Setup,
    data: &'a Data,
    trainee: &'a Trainee,
    sched: Schedule,
    device: &'a candle_core::Device,
    dtype: DType,
    on_step: Option<&'a dyn Fn()>,
}

impl Loop<'_> {
    /// Sample indices of `epoch` in training order: a shuffle seeded by (seed, epoch), so a resumed
    /// run sees the order an uninterrupted one would.
    fn order_of_epoch(&self, epoch: usize) -> Vec<usize> {
        let mut idx: Vec<usize> = (0..self.data.encoded.len()).collect();
        idx.shuffle(&mut rand::rngs::StdRng::seed_from_u64(self.cfg.seed.wrapping_add(epoch as u64)));
        idx
    }

    /// Runs the optimizer steps `start..total`, appending each step's metrics and writing a
    /// checkpoint every `save_every` steps and at the end; returns the samples seen.
    fn steps(&self, start: usize, opt: &mut AdamW, metrics: &mut Vec<Metric>) -> anyhow::Result<usize> {
        let (cfg, sched, encoded) = (self.cfg, self.sched, &self.data.encoded);
        let metrics_path = cfg.out.join("metrics.jsonl");
        let bar = match self.on_step {
            Some(_) => indicatif::ProgressBar::hidden(),
            None => indicatif::ProgressBar::new(sched.total as u64),
        }
        .with_position(start as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg} ({eta})")
                .map_err(|e| anyhow::anyhow!("{e}"))?
                .progress_chars("=> "),
        );
        bar.set_prefix(format!("{:?}", cfg.stage).to_lowercase());
        let mut samples_done = 0usize;
        let mut epoch_cache: Option<(usize, Vec<usize>)> = None;
        for step in start..sched.total {
            let ts = Instant::now();
            let seed = cfg.seed.wrapping_mul(1_000_003).wrapping_add(step as u64);
            let mut o = Candle::training(self.device.clone(), self.dtype, seed);
            o.checkpointing = cfg.gradient_checkpointing.then(models::SideGrads::default);
            let mut grads: HashMap<String, Tensor> = HashMap::new();
            let mut loss_sum = 0f32;
            // The largest micro-batch's padded length and loss rows: what `plan` needs to match.
            let (mut seq_len, mut loss_rows) = (0usize, 0usize);
            for micro in 0..cfg.grad_accum {
                let first = (step * cfg.grad_accum + micro) * cfg.batch_size;
                let items: Vec<&Encoded> = (first..first + cfg.batch_size)
                    .map(|g| {
                        let (epoch, i) = (g / encoded.len(), g % encoded.len());
                        if epoch_cache.as_ref().map(|c| c.0) != Some(epoch) {
                            epoch_cache = Some((epoch, self.order_of_epoch(epoch)));
                        }
                        &encoded[epoch_cache.as_ref().map(|c| c.1[i]).unwrap_or(i)]
                    })
                    .collect();
                let tf = Instant::now();
                let (loss, rows, len) =
                    batch_loss(&self.trainee.model, &mut o, &self.setup.pre, self.setup.qtok.as_ref(), &items)?;
                loss_sum += loss.to_scalar::<f32>()?;
                (seq_len, loss_rows) = (seq_len.max(len), loss_rows.max(rows));
                let tb = Instant::now();
                let (rss_forward, live_forward) = (metrics::rss_mb(), metrics::live_mb());
                let g = (loss / cfg.grad_accum as f64)?.backward()?;
                tracing::debug!(
                    forward_ms = (tb - tf).as_secs_f64() * 1e3,
                    backward_ms = tb.elapsed().as_secs_f64() * 1e3,
                    rss_mb_after_forward = rss_forward,
                    live_mb_after_forward = live_forward,
                    rss_mb_after_backward = metrics::rss_mb(),
                    grad_store_mb = g
                        .get_ids()
                        .filter_map(|id| g.get_id(*id))
                        .map(|t| (t.elem_count() * t.dtype().size_in_bytes()) as f64 / 1048576.0)
                        .sum::<f64>(),
                    grad_store_tensors = g.get_ids().count(),
                    peak_rss_mb = metrics::peak_rss_mb(),
                    live_mb = metrics::live_mb(),
                    peak_live_mb = metrics::peak_live_mb(),
                    "micro-batch"
                );
                for (k, var) in &self.trainee.vars {
                    // Parameters inside checkpointed layers get their gradients on the side.
                    let side = o.checkpointing.as_ref().and_then(|s| s.take(var.as_tensor()));
                    let gr = match (g.get(var.as_tensor()), side) {
                        (Some(a), Some(b)) => Some((a + b)?),
                        (a, b) => a.cloned().or(b),
                    };
                    if let Some(gr) = gr {
                        let gr = gr.to_dtype(DType::F32)?;
                        let acc = match grads.remove(k) {
                            Some(a) => (a + gr)?,
                            None => gr,
                        };
                        grads.insert(k.clone(), acc);
                    }
                }
                samples_done += items.len();
            }
            let to = Instant::now();
            let grad_norm = clip_global_norm(&mut grads, cfg.max_grad_norm)?;
            let mult = cosine_with_warmup(step, sched.total, sched.warmup);
            opt.step(&self.trainee.groups, &grads, mult)?;
            tracing::debug!(
                optimizer_ms = to.elapsed().as_secs_f64() * 1e3,
                rss_mb = metrics::rss_mb(),
                peak_rss_mb = metrics::peak_rss_mb(),
                "step"
            );
            let loss = loss_sum / cfg.grad_accum as f32;
            anyhow::ensure!(loss.is_finite(), "loss became {loss} at step {}", step + 1);
            let sps = sched.per_step as f64 / ts.elapsed().as_secs_f64();
            let m = Metric {
                step: step + 1,
                epoch: ((step + 1) * sched.per_step) as f64 / encoded.len() as f64,
                loss,
                lr: cfg.lr * mult,
                grad_norm,
                samples_per_s: sps,
                peak_rss_mb: metrics::peak_rss_mb(),
                seq_len: Some(seq_len),
                loss_rows: Some(loss_rows),
            };
            metrics::append(&metrics_path, &m)?;
            metrics.push(m);
            bar.set_message(format!("loss {loss:.4} lr {:.2e} {sps:.1} samples/s", cfg.lr * mult));
            bar.inc(1);
            if let Some(f) = self.on_step {
                f();
            }
            let done = step + 1;
            if (cfg.save_every > 0 && done % cfg.save_every == 0) || done == sched.total {
                self.checkpoint(done, opt)?;
            }
        }
        bar.finish_and_clear();
        Ok(samples_done)
    }

    /// `checkpoint-{done}`: trainables, optimizer state and progress, written atomically.
    fn checkpoint(&self, done: usize, opt: &AdamW) -> anyhow::Result<()> {
        let (cfg, t) = (self.cfg, self.trainee);
        let state = TrainerState {
            step: done,
            total_steps: self.sched.total,
            seed: cfg.seed,
            samples: done * self.sched.per_step,
        };
        write_dir_atomic(&cfg.out.join(format!("checkpoint-{done}")), |tmp| {
            save_trainables(tmp, &t.saved(), t.lora.as_ref())?;
            opt.save(&tmp.join("optimizer.safetensors"))?;
            std::fs::write(tmp.join("trainer_state.json"), serde_json::to_string_pretty(&state)?)?;
            Ok(())
        })
    }
}

/// `final/`: the trainables (and for stage 2 the Q-Adapt config `merge` writes); returns its path.
fn save_final(cfg: &TrainConfig, config: &BunnyConfig, t: &Trainee) -> anyhow::Result<PathBuf> {
    let final_dir = cfg.out.join("final");
    write_dir_atomic(&final_dir, |tmp| {
        save_trainables(tmp, &t.saved(), t.lora.as_ref())?;
        if cfg.modules().prompt {
            // A model whose prompt module trained is Q-Adapt whatever the base was: `merge` writes
            // this config.
            let mut raw: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(cfg.model.join("config.json"))?)?;
            raw["model_type"] = ModelType::QAdapt.as_str().into();
            if raw.get("qformer_config").is_none() {
                raw["qformer_config"] = serde_json::to_value(&config.qformer_config)?;
            }
            std::fs::write(tmp.join("config.json"), serde_json::to_string_pretty(&raw)?)?;
        }
        Ok(())
    })?;
    Ok(final_dir)
}

#[allow(clippy::too_many_arguments)]
fn summarize(
    cfg: &TrainConfig,
    setup: &Setup,
    data: &Data,
    t: &Trainee,
    sched: &Schedule,
    metrics: &[Metric],
    samples: usize,
    seconds: f64,
    adapter_dir: PathBuf,
) -> Summary {
    let mut step_ms: Vec<f64> =
        metrics.iter().skip(2).map(|m| 1000.0 * sched.per_step as f64 / m.samples_per_s).collect();
    step_ms.sort_by(f64::total_cmp);
    let encoded = &data.encoded;
    let last: Vec<f32> = metrics.iter().rev().take(10).map(|m| m.loss).collect();
    Summary {
        stage: cfg.stage,
        steps: sched.total,
        samples,
        trainable_params: t.trainable_params,
        first_loss: metrics.first().map_or(f32::NAN, |m| m.loss),
        final_loss: metrics.last().map_or(f32::NAN, |m| m.loss),
        mean_last10_loss: last.iter().sum::<f32>() / last.len().max(1) as f32,
        samples_per_s: samples as f64 / seconds.max(1e-9),
        seconds,
        step_ms_median: step_ms.get(step_ms.len() / 2).copied().unwrap_or(f64::NAN),
        mean_text_tokens: encoded.iter().map(|e| e.prompt.ids.len()).sum::<usize>() as f64 / encoded.len() as f64,
        image_tokens: setup.n_img,
        peak_rss_mb: metrics::peak_rss_mb(),
        truncated_samples: data.truncated,
        randomly_initialised: t.randomised,
        adapter_dir,
    }
}
