//! `qadapt-train ablate`: the paper's comparison of tuning recipes (Tables 8 and 9) as one
//! reproducible command. A recipe is a list of stages, each naming the data it trains on (the
//! explanation task, the answering task, or both) and the modules it trains (vision LoRA, LLM LoRA,
//! connector, prompt module). Every (recipe, seed) runs in its own directory, its stages chained
//! (each stage's result is merged into a full model the next stage starts from, so LoRA of an
//! earlier stage is merged and frozen), and is then evaluated on held-out data.
//!
//! Equal budgets: every recipe gets the same number of optimizer steps (`--max-steps`, or
//! `--epochs` passes over *all* the training samples, converted to steps), split across its stages
//! by their `share` (equal shares unless a custom recipe says otherwise). A stage on a subset of
//! the data therefore makes more passes over that subset: the comparison holds compute fixed.
//!
//! Recipes that never train the prompt module run as plain Bunny (the prompt module of a Q-Adapt
//! base is dropped): the paper's joint and two-stage baselines have none.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use candle_core::{DType, Device};
use models::loader::{Checkpoint, WeightSource};
use qadapt_core::{BunnyConfig, ModelType};
use serde::{Deserialize, Serialize};

use crate::data::{self, Task};
use crate::eval::{EvalInputs, EvalReport};
use crate::files::{copy_tokenizers, write_dir_atomic};
use crate::train::{Stage, TrainConfig};

mod recipes;

pub use recipes::{builtin, read_recipes, select, Recipe, StagePlan};

/// Steps of each stage: `total` split by shares (cumulative rounding, so they add up to `total`),
/// at least one each.
pub fn split_steps(total: usize, shares: &[f64]) -> Vec<usize> {
    let sum: f64 = shares.iter().sum();
    let mut acc = 0.0;
    let mut done = 0usize;
    shares
        .iter()
        .map(|s| {
            acc += s;
            let upto = ((total as f64) * acc / sum).round() as usize;
            let n = upto.saturating_sub(done).max(1);
            done += n;
            n
        })
        .collect()
}

pub use crate::args::TrainSettings as Settings;

/// The budget of every recipe.
#[derive(Debug, Clone, Copy)]
pub enum Budget {
    Steps(usize),
    /// Passes over all the training samples.
    Epochs(usize),
}

/// Everything `ablate` runs.
#[derive(Debug, Clone)]
pub struct AblateConfig {
    pub model: PathBuf,
    pub data: Vec<PathBuf>,
    /// Held-out conversations (LLaVA format) or Q-Bench A1 rows.
    pub test: PathBuf,
    pub images: PathBuf,
    /// Folder of the held-out set's and the labels' images.
    pub test_images: PathBuf,
    pub labels: Option<PathBuf>,
    pub split: Option<String>,
    pub out: PathBuf,
    pub recipes: Vec<Recipe>,
    pub seeds: Vec<u64>,
    pub budget: Budget,
    pub settings: Settings,
    /// Ask at most this many held-out questions.
    pub eval_limit: Option<usize>,
}

/// One (recipe, seed) result: a row of `ablation.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Row {
    pub recipe: String,
    pub seed: u64,
    /// Held-out accuracy (Q-Bench: by generation).
    pub accuracy: f64,
    pub accuracy_by_type: BTreeMap<String, f64>,
    /// Accuracy of a uniform guess on the same questions.
    pub chance: f64,
    /// Q-Bench test sets: accuracy when the likeliest option letter is the answer.
    pub accuracy_likelihood: Option<f64>,
    /// Answers to option questions that named no option.
    pub unmatched: usize,
    pub srocc: Option<f64>,
    pub plcc: Option<f64>,
    pub steps: usize,
    pub train_seconds: f64,
}

/// Whether the test file holds Q-Bench rows (`candidates`) rather than conversations.
fn is_qbench(path: &Path) -> anyhow::Result<bool> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading --test {}", path.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("--test {}: not JSON", path.display()))?;
    let first =
        v.as_array().and_then(|a| a.first()).context(format!("--test {}: not a non-empty list", path.display()))?;
    Ok(first.get("candidates").is_some())
}

/// The base every recipe starts from: the model itself, or, when it is Q-Adapt, the same model as
/// plain Bunny (config `bunny-phi`, prompt-module tensors dropped), written once under `out`.
fn bunny_base(model: &Path, out: &Path) -> anyhow::Result<PathBuf> {
    let config = BunnyConfig::from_file(&model.join("config.json"))?;
    if config.model_type == ModelType::Bunny {
        return Ok(model.to_path_buf());
    }
    let dir = out.join("base-bunny");
    if dir.join("config.json").exists() {
        return Ok(dir);
    }
    let ck = Checkpoint::open(model, &Device::Cpu, DType::F32)?;
    let entries: Vec<(String, Vec<usize>)> = {
        let mut keys: Vec<String> = ck
            .keys()
            .filter(|k| !k.starts_with("model.vlm_") && !k.ends_with("position_ids"))
            .map(str::to_string)
            .collect();
        keys.sort();
        keys.into_iter().filter_map(|k| ck.shape(&k).map(|s| (k, s))).collect()
    };
    let mut raw: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(model.join("config.json"))?)?;
    raw["model_type"] = ModelType::Bunny.as_str().into();
    raw["architectures"] = serde_json::json!(["BunnyPhiForCausalLM"]);
    write_dir_atomic(&dir, |tmp| {
        copy_tokenizers(model, tmp)?;
        std::fs::write(tmp.join("config.json"), serde_json::to_string_pretty(&raw)?)?;
        crate::shards::write_sharded(tmp, &entries, DType::F32, 2 << 30, |k, s| Ok(ck.get(k, s)?))?;
        Ok(())
    })?;
    Ok(dir)
}

/// Runs every (recipe, seed) not yet done, evaluates it, and writes `ablation.json`,
/// `ablation.md` and `ablation.png` under `out`; returns the rows.
pub fn run(cfg: &AblateConfig) -> anyhow::Result<Vec<Row>> {
    let s = &cfg.settings;
    anyhow::ensure!(s.batch_size > 0 && s.grad_accum > 0, "--batch-size and --grad-accum must be ≥ 1");
    anyhow::ensure!(!cfg.seeds.is_empty(), "--seeds names no seed");
    let samples = data::load(&cfg.data, &cfg.images)?;
    let count = |t: Task| samples.iter().filter(|x| t == Task::All || x.task == t).count();
    for r in &cfg.recipes {
        for (i, st) in r.stages.iter().enumerate() {
            anyhow::ensure!(
                count(st.task) > 0,
                "recipe {:?} stage {} trains on the {} task, but {:?} has no such rows (rows name it in \
                 `task`, or are told apart by their answers: DESIGN §4)",
                r.name,
                i + 1,
                st.task.name(),
                cfg.data
            );
        }
    }
    let total = match cfg.budget {
        Budget::Steps(n) => n.max(1),
        Budget::Epochs(e) => e.max(1) * samples.len().div_ceil(s.batch_size * s.grad_accum),
    };
    let qbench_test = is_qbench(&cfg.test)?;
    std::fs::create_dir_all(&cfg.out).with_context(|| format!("creating {}", cfg.out.display()))?;
    let base = bunny_base(&cfg.model, &cfg.out)?;
    let runs = cfg.recipes.len() * cfg.seeds.len();
    let bar = indicatif::ProgressBar::new((runs * total) as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("ablate [{bar:30}] {pos}/{len} steps {msg} ({elapsed}, eta {eta})")
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .progress_chars("=> "),
    );
    let mut rows = Vec::new();
    for r in &cfg.recipes {
        for &seed in &cfg.seeds {
            let dir = cfg.out.join(&r.name).join(format!("seed-{seed}"));
            let result = dir.join("result.json");
            if let Ok(text) = std::fs::read_to_string(&result) {
                if let Ok(row) = serde_json::from_str::<Row>(&text) {
                    tracing::info!(recipe = %r.name, seed, "already done");
                    bar.inc(total as u64);
                    rows.push(row);
                    continue;
                }
            }
            let row = run_one(cfg, r, seed, &base, total, qbench_test, &dir, &bar)?;
            std::fs::write(&result, serde_json::to_string_pretty(&row)?)?;
            rows.push(row);
            write_outputs(cfg, &rows, total)?;
        }
    }
    bar.finish_and_clear();
    write_outputs(cfg, &rows, total)?;
    Ok(rows)
}

#[allow(clippy::too_many_arguments)]
fn run_one(
    cfg: &AblateConfig,
    r: &Recipe,
    seed: u64,
    base: &Path,
    total: usize,
    qbench_test: bool,
    dir: &Path,
    bar: &indicatif::ProgressBar,
) -> anyhow::Result<Row> {
    let s = &cfg.settings;
    let steps = split_steps(total, &r.stages.iter().map(|x| x.share).collect::<Vec<_>>());
    let mut model = base.to_path_buf();
    let mut train_seconds = 0.0;
    for (i, (st, &n)) in r.stages.iter().zip(&steps).enumerate() {
        let run = dir.join(format!("stage-{}", i + 1));
        let merged = dir.join(format!("model-{}", i + 1));
        bar.set_message(format!("{} seed {seed} stage {}/{}", r.name, i + 1, r.stages.len()));
        let summary_path = run.join("summary.json");
        if !summary_path.exists() {
            let tc = TrainConfig {
                stage: if st.modules.prompt { Stage::Stage2 } else { Stage::Stage1 },
                model: model.clone(),
                stage1: None,
                data: cfg.data.clone(),
                images: cfg.images.clone(),
                out: run.clone(),
                task: st.task,
                lora: s.lora(st.modules),
                lr: s.lr,
                connector_lr: s.connector_lr,
                weight_decay: s.weight_decay,
                warmup_ratio: s.warmup_ratio,
                max_grad_norm: s.max_grad_norm,
                // The step budget rules; enough epochs that it, not the data, ends the stage.
                epochs: n,
                max_steps: Some(n),
                batch_size: s.batch_size,
                grad_accum: s.grad_accum,
                max_length: s.max_length,
                seed,
                save_every: (n / 4).max(1),
                unfreeze_qformer: false,
                qformer_init: None,
                device: s.device.clone(),
                dtype: s.dtype,
                random_weights: false,
                modules: Some(st.modules),
                gradient_checkpointing: s.gradient_checkpointing,
            };
            let resume = crate::checkpoint::latest_checkpoint(&run).is_some();
            let before = bar.position();
            crate::train::run_observed(&tc, resume, Some(&|| bar.inc(1)))
                .with_context(|| format!("recipe {} seed {seed} stage {}", r.name, i + 1))?;
            // A resumed stage reports only its remaining steps: the bar catches up.
            bar.set_position(before + n as u64);
        } else {
            bar.inc(n as u64);
        }
        let summary: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&summary_path)?)?;
        train_seconds += summary["seconds"].as_f64().unwrap_or(0.0);
        if !merged.join("config.json").exists() {
            let final_dir = crate::train::adapter_dir(&run);
            let full = final_dir.join("non_lora_trainables.safetensors").exists().then_some(run.as_path());
            crate::merge::run(&model, &run, full, &merged, Some(DType::F32), 2 << 30)
                .with_context(|| format!("merging {}", run.display()))?;
        }
        model = merged;
    }
    bar.set_message(format!("{} seed {seed}: evaluating", r.name));
    let inputs = EvalInputs {
        data: (!qbench_test).then_some(cfg.test.as_path()),
        qbench: qbench_test.then_some(cfg.test.as_path()),
        images: &cfg.test_images,
        labels: cfg.labels.as_deref(),
        split: cfg.split.as_deref(),
        limit: cfg.eval_limit,
    };
    let rep = crate::eval::run(&model, None, &inputs, || {})?;
    Ok(row_of(r, seed, &rep, total, train_seconds))
}

fn row_of(r: &Recipe, seed: u64, rep: &EvalReport, steps: usize, train_seconds: f64) -> Row {
    let (accuracy, by_type, chance, lik, unmatched) = match rep.qbench.first() {
        Some(g) => (
            g.overall.accuracy,
            g.by_type.iter().map(|(k, t)| (k.clone(), t.accuracy)).collect(),
            g.overall.chance,
            rep.qbench.get(1).map(|l| l.overall.accuracy),
            g.overall.unmatched,
        ),
        None => (
            rep.overall.accuracy,
            rep.answering.iter().map(|(k, a)| (k.clone(), a.accuracy)).collect(),
            rep.overall.chance,
            None,
            rep.overall.unmatched,
        ),
    };
    Row {
        recipe: r.name.clone(),
        seed,
        accuracy,
        accuracy_by_type: by_type,
        chance,
        accuracy_likelihood: lik,
        unmatched,
        srocc: rep.srocc,
        plcc: rep.plcc,
        steps,
        train_seconds,
    }
}

/// Mean and half-width of the 95 % interval (Student's t) of `v`; no interval below two values.
pub fn mean_ci(v: &[f64]) -> (f64, Option<f64>) {
    let n = v.len();
    let mean = v.iter().sum::<f64>() / n.max(1) as f64;
    if n < 2 {
        return (mean, None);
    }
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    // t(0.975, df) for df = 1..=10, then the normal's 1.96 is close enough.
    const T: [f64; 10] = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228];
    let t = T.get(n - 2).copied().unwrap_or(1.96);
    (mean, Some(t * (var / n as f64).sqrt()))
}

fn fmt_ci(v: &[f64]) -> String {
    match mean_ci(v) {
        (m, Some(h)) => format!("{m:.3} ± {h:.3}"),
        (m, None) => format!("{m:.3}"),
    }
}

/// `ablation.json`, `ablation.md` and the bar chart `ablation.png` of the rows so far.
fn write_outputs(cfg: &AblateConfig, rows: &[Row], total: usize) -> anyhow::Result<()> {
    let write = |name: &str, text: String| {
        let p = cfg.out.join(name);
        let tmp = cfg.out.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text)
            .and_then(|_| std::fs::rename(&tmp, &p))
            .with_context(|| format!("writing {}", p.display()))
    };
    write("ablation.json", serde_json::to_string_pretty(rows)?)?;
    write("ablation.md", markdown(cfg, rows, total))?;
    let bars: Vec<qadapt_plot::Bar> = cfg
        .recipes
        .iter()
        .filter_map(|r| {
            let v: Vec<f64> = rows.iter().filter(|x| x.recipe == r.name).map(|x| x.accuracy).collect();
            (!v.is_empty()).then(|| {
                let (mean, h) = mean_ci(&v);
                qadapt_plot::Bar { label: r.name.clone(), mean, half_width: h.unwrap_or(0.0), values: v }
            })
        })
        .collect();
    let chance = rows.first().map_or(0.0, |r| r.chance);
    let chart = qadapt_plot::BarChart {
        title: format!("held-out accuracy, {} steps per recipe (chance {chance:.3})", total),
        x_label: "accuracy (mean, 95% interval, seeds as dots; red: chance)".into(),
        size: (800, 60 + 44 * bars.len() as u32 + 60),
        bars,
        reference: Some(chance),
    };
    chart.write_png(&cfg.out.join("ablation.png"))?;
    Ok(())
}

/// The table: mean ± 95 % interval over seeds per recipe, per question type, the score's
/// correlations, and the paper's figure beside it.
pub fn markdown(cfg: &AblateConfig, rows: &[Row], total: usize) -> String {
    let types: Vec<String> = {
        let mut t: Vec<String> = rows.iter().flat_map(|r| r.accuracy_by_type.keys().cloned()).collect();
        t.sort();
        t.dedup();
        t
    };
    let s = &cfg.settings;
    let mut out = format!(
        "# Ablation of tuning recipes\n\ntrain: {}; test: {}; {total} optimizer steps per recipe (batch {} × {}), \
         split evenly across a recipe's stages; seeds {:?}; mean ± 95% interval (Student's t) over seeds.\n\n",
        cfg.data.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "),
        cfg.test.display(),
        s.batch_size,
        s.grad_accum,
        cfg.seeds,
    );
    out += "| recipe | stages | seeds | accuracy |";
    for t in &types {
        out += &format!(" {t} |");
    }
    out += " likelihood | SROCC | PLCC | train s | paper (Q-bench A1 dev, %) |\n|---|---|---:|---:|";
    out += &"---:|".repeat(types.len());
    out += "---:|---:|---:|---:|---:|\n";
    for r in &cfg.recipes {
        let mine: Vec<&Row> = rows.iter().filter(|x| x.recipe == r.name).collect();
        if mine.is_empty() {
            continue;
        }
        let col = |f: &dyn Fn(&Row) -> Option<f64>| {
            let v: Vec<f64> = mine.iter().filter_map(|x| f(x)).collect();
            if v.is_empty() {
                "—".to_string()
            } else {
                fmt_ci(&v)
            }
        };
        out += &format!("| {} | {} | {} | **{}** |", r.name, r.describe(), mine.len(), col(&|x| Some(x.accuracy)));
        for t in &types {
            out += &format!(" {} |", col(&|x| x.accuracy_by_type.get(t).copied()));
        }
        let secs = mine.iter().map(|x| x.train_seconds).sum::<f64>() / mine.len() as f64;
        out += &format!(
            " {} | {} | {} | {secs:.1} | {} |\n",
            col(&|x| x.accuracy_likelihood),
            col(&|x| x.srocc),
            col(&|x| x.plcc),
            r.paper.map_or("—".into(), |p| format!("{p:.2}"))
        );
    }
    if let Some(r) = rows.first() {
        out += &format!("\nchance (uniform guess on the same questions): {:.3}\n", r.chance);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_split_by_share_and_add_up() {
        assert_eq!(split_steps(100, &[1.0]), vec![100]);
        assert_eq!(split_steps(101, &[1.0, 1.0]), vec![51, 50]);
        assert_eq!(split_steps(10, &[4.0, 1.0]), vec![8, 2]);
        assert_eq!(split_steps(1, &[1.0, 1.0]), vec![1, 1]);
    }

    #[test]
    fn intervals_follow_student_t() {
        assert_eq!(mean_ci(&[0.5]), (0.5, None));
        let (m, h) = mean_ci(&[0.4, 0.5, 0.6]);
        assert!((m - 0.5).abs() < 1e-12);
        // sd 0.1, n 3: 4.303 · 0.1 / √3.
        assert!((h.unwrap() - 4.303 * 0.1 / 3f64.sqrt()).abs() < 1e-9);
    }
}
