//! The `qadapt-run` command line: one image (`--ask`, `--score`, `--choices`), `batch`, `eval` and
//! `serve`, each a thin layer of flags over the library.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use crate::eval::ChooseBy;
use crate::{Ep, GenerateOptions, Placement, Runtime};
use anyhow::Context;
use clap::builder::TypedValueParser as _;
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use qadapt_core::image::{load_image_within, ImageLimits};
use qadapt_core::sampling::{score_output, SamplingParams};

/// The subcommands (`qadapt-run batch|eval|serve …`).
#[derive(Debug, Parser)]
#[command(name = "qadapt-run", version, about = "Batch, evaluate or serve an exported Q-Adapt / Bunny model.")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// One question (or the score) over a directory or JSONL list of images → results.jsonl.
    Batch(BatchArgs),
    /// Q-Bench A1 accuracy, or SROCC / PLCC against IQA labels.
    Eval(EvalArgs),
    /// HTTP API: /v1/chat/completions, /v1/score, /health, /metrics.
    Serve(ServeArgs),
}

/// Where the model is and where it runs.
#[derive(Debug, Args)]
struct ModelArgs {
    /// Export directory written by qadapt-export.
    #[arg(long)]
    model: PathBuf,
    /// Execution provider; `auto` picks TensorRT, else CUDA, else CPU, and says which.
    #[arg(long, default_value = "cpu", value_parser = ep_parser())]
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
    /// TensorRT engine and timing cache directory (default: EXPORT/trt-cache).
    #[arg(long)]
    trt_cache: Option<PathBuf>,
    /// Replay decode steps as CUDA graphs (needs --ep cuda and a --fused export): one-token steps
    /// run on pooled cache buffers of max_positions slots per batch size, at fixed addresses.
    #[arg(long)]
    cuda_graph: bool,
}

impl ModelArgs {
    fn open(&self, max_batch: usize) -> anyhow::Result<Runtime> {
        let place = Placement {
            ep: self.ep,
            device_id: self.device_id,
            fp16: self.fp16,
            max_batch,
            trt_cache: self.trt_cache.clone(),
            cuda_graph: self.cuda_graph,
            fixed_steps: false,
        };
        let rt = Runtime::open_with(&self.model, &place, self.ort_lib.as_deref())
            .with_context(|| format!("opening {}", self.model.display()))?;
        if self.ep == Ep::Auto {
            eprintln!("execution provider: {}", rt.ep);
            for s in &rt.skipped {
                eprintln!("  skipped {s}");
            }
        }
        Ok(rt)
    }
}

/// `--ep`: the library's provider names, each with its help line.
fn ep_parser() -> impl clap::builder::TypedValueParser<Value = Ep> {
    let values = Ep::ALL.map(|e| clap::builder::PossibleValue::new(e.name()).help(e.help()));
    clap::builder::PossibleValuesParser::new(values).try_map(|s| s.parse::<Ep>())
}

/// `--by`: how a Q-Bench answer is chosen.
fn by_parser() -> impl clap::builder::TypedValueParser<Value = ChooseBy> {
    let help = |b: ChooseBy| match b {
        ChooseBy::Generate => "greedy generation; the answer's option letter (or the option's text) is the choice",
        ChooseBy::Likelihood => "the option whose letter answer has the lowest loss",
    };
    let values = ChooseBy::ALL.map(|b| clap::builder::PossibleValue::new(b.name()).help(help(b)));
    clap::builder::PossibleValuesParser::new(values).try_map(|s| s.parse::<ChooseBy>())
}

/// The largest image accepted, checked from its header before decoding.
#[derive(Debug, Args)]
struct ImageArgs {
    /// Refuse images of more pixels (width × height) than this.
    #[arg(long, default_value_t = ImageLimits::default().max_pixels)]
    max_image_pixels: u64,
    /// Refuse images wider or taller than this.
    #[arg(long, default_value_t = ImageLimits::default().max_side)]
    max_image_side: u32,
}

impl ImageArgs {
    fn limits(&self) -> ImageLimits {
        ImageLimits { max_pixels: self.max_image_pixels, max_side: self.max_image_side }
    }
}

/// Generation settings.
#[derive(Debug, Args)]
struct GenArgs {
    /// Most tokens generated (fewer when the model's positions run out first).
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    /// Sampling temperature; greedy when absent or 0 (otherwise at least 0.001).
    #[arg(long)]
    temperature: Option<f32>,
    /// Sample from the K likeliest tokens only (with --temperature).
    #[arg(long)]
    top_k: Option<usize>,
    /// Sample from the smallest set of tokens whose probability reaches P (with --temperature).
    #[arg(long)]
    top_p: Option<f32>,
    /// Same seed, same text.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// HF repetition penalty over the tokens generated so far (1 = none).
    #[arg(long)]
    repetition_penalty: Option<f32>,
}

impl GenArgs {
    fn options(&self) -> GenerateOptions {
        GenerateOptions {
            logprobs: None,
            max_new_tokens: self.max_new_tokens,
            sampling: SamplingParams {
                temperature: self.temperature,
                top_k: self.top_k,
                top_p: self.top_p,
                seed: self.seed,
                repetition_penalty: self.repetition_penalty,
            },
        }
    }
}

/// Answer questions about image quality, or score it, with an exported Q-Adapt / Bunny model.
/// `--ask` streams the answer, `--score` prints the score, `--choices` ranks options.
#[derive(Debug, Parser)]
#[command(name = "qadapt-run", version, about, after_help = "Subcommands: qadapt-run batch | eval | serve --help")]
struct OneArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Image file (JPEG, PNG, WebP; EXIF orientation honoured).
    #[arg(long)]
    image: PathBuf,
    /// The question; the answer streams to stdout.
    #[arg(long, required_unless_present = "score")]
    ask: Option<String>,
    /// Print the Q-Align 1–5 quality score and the level probabilities instead.
    #[arg(long, conflicts_with = "choices")]
    score: bool,
    /// Multiple choice by likelihood: options separated by `|`, each scored as the answer to --ask.
    #[arg(long)]
    choices: Option<String>,
    /// Print `{answer, token_ids, score, level_probs}` (or the choices) as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    gen: GenArgs,
    #[command(flatten)]
    image_limits: ImageArgs,
}

#[derive(Debug, Args)]
struct BatchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// A directory of images, or a JSONL file of {"image": path, "question"?: text}.
    #[arg(long)]
    images: PathBuf,
    /// The question asked of every image (a JSONL row's own question wins).
    #[arg(long, required_unless_present = "score")]
    ask: Option<String>,
    /// Score every image instead.
    #[arg(long, conflicts_with = "ask")]
    score: bool,
    /// Results, one JSON line per image; rows already there are skipped.
    #[arg(long)]
    out: PathBuf,
    /// Images per batch through the vision graph and the decoder.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    #[command(flatten)]
    gen: GenArgs,
}

#[derive(Debug, Args)]
struct EvalArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Q-Bench A1 JSON (a list of {img_path, question, candidates, correct_ans, type, concern}).
    #[arg(long, conflicts_with = "iqa", required_unless_present = "iqa")]
    qbench: Option<PathBuf>,
    /// IQA labels CSV with `image` and `mos` columns.
    #[arg(long)]
    iqa: Option<PathBuf>,
    /// Directory the rows' image paths are relative to.
    #[arg(long)]
    images: PathBuf,
    /// How Q-Bench answers are chosen: each way given is reported, side by side.
    #[arg(long, value_delimiter = ',', default_value = "generate,likelihood", value_parser = by_parser())]
    by: Vec<ChooseBy>,
    /// IQA: keep only rows whose `split` column equals this.
    #[arg(long)]
    split: Option<String>,
    /// IQA: scatter plot of predicted score against MOS.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Rows per batch (IQA scores; Q-Bench generation).
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Evaluate the first N rows only.
    #[arg(long)]
    limit: Option<usize>,
    /// Q-Bench: every row's answer and choice as JSON lines.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Address to listen on (0.0.0.0: every interface).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on (0: any free port; the address is printed).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Requests waiting for inference; one more gets 503.
    #[arg(long, default_value_t = 64)]
    max_queue: usize,
    /// Rows decoding together at most: requests join the running batch between steps and leave
    /// it when done.
    #[arg(long, default_value_t = 8)]
    max_batch: usize,
    /// Largest image a request may carry, in bytes.
    #[arg(long, default_value_t = 16 << 20)]
    max_image_bytes: usize,
    #[command(flatten)]
    image_limits: ImageArgs,
    /// Largest conversation text, in tokens.
    #[arg(long, default_value_t = 512)]
    max_prompt_tokens: usize,
    /// Largest conversation text, in bytes (checked before tokenizing).
    #[arg(long, default_value_t = 16 << 10)]
    max_prompt_bytes: usize,
    /// Largest max_tokens a request may ask for (and the default).
    #[arg(long, default_value_t = 512)]
    max_new_tokens: usize,
    /// Open connections at most; one more is answered 503 with Retry-After and closed.
    #[arg(long, default_value_t = 256)]
    max_connections: usize,
    /// Seconds a client has to send its request headers (and an idle keep-alive connection lives).
    #[arg(long, default_value_t = 10.0)]
    header_timeout: f64,
    /// Seconds a client has to send its request body.
    #[arg(long, default_value_t = 30.0)]
    body_timeout: f64,
    /// Seconds a request may take in all; its generation then stops and it is answered 504 (0: no limit).
    #[arg(long, default_value_t = 300.0)]
    request_timeout: f64,
    /// Threads for HTTP and image decoding (inference has its own).
    #[arg(long, default_value_t = 2)]
    http_threads: usize,
}

fn bar(len: u64, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    let style = ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {per_sec} eta {eta} {msg}")
        .map(|s| s.progress_chars("=> "));
    if let Ok(s) = style {
        pb.set_style(s);
    }
    pb.set_prefix(what.to_string());
    pb
}

fn one(a: OneArgs) -> anyhow::Result<()> {
    let img = load_image_within(&a.image, &a.image_limits.limits())?;
    let mut rt = a.model.open(1)?;
    let mut out = std::io::stdout().lock();
    if a.score {
        writeln!(out, "{}", score_output(&rt.score_json(&img)?, a.json))?;
        return Ok(());
    }
    let question = a.ask.as_deref().context("--ask is required unless --score is given")?;
    if let Some(list) = &a.choices {
        let options: Vec<&str> = list.split('|').map(str::trim).filter(|s| !s.is_empty()).collect();
        anyhow::ensure!(options.len() >= 2, "--choices needs at least two options separated by |, got {list:?}");
        let res = rt.choices(&img, question, &options)?;
        let best = Runtime::best_choice(&res);
        if a.json {
            writeln!(out, "{}", serde_json::json!({"answer": res[best].option, "choices": res}))?;
        } else {
            for (i, c) in res.iter().enumerate() {
                writeln!(
                    out,
                    "{} {:<24} log-prob {:>9.4}  loss {:.4}  ({} tokens)",
                    if i == best { "*" } else { " " },
                    c.option,
                    c.log_prob,
                    c.loss,
                    c.tokens
                )?;
            }
        }
        return Ok(());
    }
    let stream = !a.json;
    let res = rt.generate(&img, question, &a.gen.options(), |piece| {
        if stream {
            let _ = write!(std::io::stdout(), "{piece}").and_then(|_| std::io::stdout().flush());
        }
    })?;
    if a.json {
        writeln!(out, "{}", serde_json::to_string(&res)?)?;
    } else {
        writeln!(out)?;
    }
    Ok(())
}

fn batch(a: BatchArgs) -> anyhow::Result<()> {
    use crate::batch;
    let rows = batch::read_rows(&a.images)?;
    anyhow::ensure!(!rows.is_empty(), "{}: no images", a.images.display());
    let task = match &a.ask {
        Some(q) => batch::Task::Ask(a.gen.options(), q.clone()),
        None => batch::Task::Score,
    };
    let mut rt = a.model.open(a.batch_size)?;
    let pb = bar(rows.len() as u64, "batch");
    let sum = batch::run(&mut rt, &rows, &task, a.batch_size, &a.out, |s| {
        pb.set_position((s.skipped + s.answered + s.failed) as u64);
        pb.set_message(format!("{} failed", s.failed));
    })?;
    pb.finish_and_clear();
    eprintln!(
        "{} images: {} answered, {} failed, {} already in {} ({:.1} s, {:.2} images/s)",
        sum.total,
        sum.answered,
        sum.failed,
        sum.skipped,
        a.out.display(),
        sum.seconds,
        (sum.answered + sum.failed) as f64 / sum.seconds.max(1e-9)
    );
    Ok(())
}

fn eval(a: EvalArgs) -> anyhow::Result<()> {
    use crate::eval;
    let mut rt = a.model.open(a.batch_size)?;
    let limit = a.limit.unwrap_or(usize::MAX);
    if let Some(q) = &a.qbench {
        let rows = eval::read_qbench(q)?;
        let rows = &rows[..rows.len().min(limit)];
        let mut reps = Vec::new();
        for &by in &a.by {
            let pb = bar(rows.len() as u64, &format!("q-bench ({})", by.name()));
            reps.push(eval::qbench(&mut rt, rows, &a.images, by, a.batch_size, || pb.inc(1))?);
            pb.finish_and_clear();
        }
        if a.json {
            println!("{}", serde_json::to_string_pretty(&reps)?);
        } else {
            print!("{}", eval::markdown(&reps));
        }
        for f in reps.first().map(|r| r.failed.as_slice()).unwrap_or_default() {
            eprintln!("skipped {f}");
        }
        if let Some(out) = &a.out {
            // One line per row and way of choosing, each naming its way.
            let mut lines = String::new();
            for r in &reps {
                for ans in &r.answers {
                    let mut v = serde_json::to_value(ans)?;
                    v["by"] = r.by.name().into();
                    lines += &(serde_json::to_string(&v)? + "\n");
                }
            }
            std::fs::write(out, lines).with_context(|| format!("writing {}", out.display()))?;
        }
        return Ok(());
    }
    let labels_path = a.iqa.as_ref().context("--qbench or --iqa is required")?;
    let labels = eval::read_labels(labels_path, a.split.as_deref())?;
    let labels = &labels[..labels.len().min(limit)];
    let pb = bar(labels.len() as u64, "iqa");
    let rep = eval::iqa(&mut rt, labels, &a.images, a.batch_size, |n| pb.inc(n as u64))?;
    pb.finish_and_clear();
    if let Some(p) = &a.plot {
        eval::scatter_png(&rep, p)?;
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rep)?);
    } else {
        println!("scored {} images: SROCC {:.4}  PLCC {:.4}", rep.scored, rep.srocc, rep.plcc);
    }
    for f in &rep.failed {
        eprintln!("skipped {f}");
    }
    Ok(())
}

fn serve(a: ServeArgs) -> anyhow::Result<()> {
    use crate::serve::{Config, Server};
    let secs = |name: &str, v: f64| -> anyhow::Result<std::time::Duration> {
        anyhow::ensure!((0.0..1e9).contains(&v), "--{name} must be a number of seconds ≥ 0, got {v}");
        Ok(std::time::Duration::from_secs_f64(v))
    };
    let cfg = Config {
        max_queue: a.max_queue,
        max_batch: a.max_batch,
        max_image_bytes: a.max_image_bytes,
        image_limits: a.image_limits.limits(),
        max_prompt_tokens: a.max_prompt_tokens,
        max_prompt_bytes: a.max_prompt_bytes,
        max_new_tokens: a.max_new_tokens,
        max_connections: a.max_connections,
        header_timeout: secs("header-timeout", a.header_timeout)?,
        body_timeout: secs("body-timeout", a.body_timeout)?,
        request_timeout: Some(secs("request-timeout", a.request_timeout)?).filter(|d| !d.is_zero()),
        http_threads: a.http_threads,
        ..Config::default()
    };
    // Request logs (one line each, with its id) on stderr; RUST_LOG overrides.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,ort=warn"));
    use std::io::IsTerminal;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
    let rt = a.model.open(a.max_batch)?;
    let server = Server::start(rt, &format!("{}:{}", a.host, a.port), cfg)?;
    let stop = server.stop_flag();
    ctrlc::set_handler(move || stop.store(true, std::sync::atomic::Ordering::SeqCst))
        .context("installing the signal handler")?;
    match server.addr() {
        Some(addr) => eprintln!("listening on http://{addr}"),
        None => eprintln!("listening"),
    }
    server.wait();
    eprintln!("stopped");
    Ok(())
}

/// Parses the command line, runs the command, and turns an error into a message and exit status 1.
pub fn main() -> ExitCode {
    // One image is the flag-only form (`qadapt-run --model … --image … --ask …`); a leading word
    // picks a subcommand.
    let sub = std::env::args().nth(1).is_some_and(|a| ["batch", "eval", "serve", "help"].contains(&a.as_str()));
    let res = if sub {
        match Cli::parse().command {
            Command::Batch(a) => batch(a),
            Command::Eval(a) => eval(a),
            Command::Serve(a) => serve(a),
        }
    } else {
        one(OneArgs::parse())
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
