//! `qadapt-train eval`: answer accuracy on held-out conversations (by question kind, with chance
//! levels), Q-Bench A1 accuracy (by generation and by likelihood, the protocol of `qadapt-run eval`)
//! and SROCC / PLCC of the Q-Align score against mean-opinion labels.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use candle_core::{DType, Device};
use models::{Engine, GenerateOptions};
use qadapt_core::image::load_image;
use serde::Serialize;

use crate::data::{self, Task};
pub use qadapt_core::metrics::{pearson, spearman};
use qadapt_core::qbench::{self, Tally};

/// What `eval` reports.
#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    /// Held-out conversations' short answers by question kind (`yes/no`, `what/how`,
    /// `multiple-choice`): empty without `--data`.
    /// Each kind's tally: accuracy, chance, and the option answers that named no option.
    pub answering: BTreeMap<String, Tally>,
    /// Every held-out short question.
    pub overall: Tally,
    /// Q-Bench A1 accuracy by generation and by likelihood (with `--qbench`).
    pub qbench: Vec<qbench::Report>,
    pub srocc: Option<f64>,
    pub plcc: Option<f64>,
    pub scored_images: usize,
}

fn norm(s: &str) -> String {
    s.to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-')
        .collect::<String>()
        .trim()
        .to_string()
}

/// A held-out question's kind, with the number of answers a uniform guess picks from (its chance
/// level is one over it). Questions that list options are read by the Q-Bench protocol
/// ([`qbench::parse_choice`]); the free-form kinds' counts are those of the synthetic set (5 quality
/// levels, 7 distortion answers).
fn kind_of(options: Option<&[String]>, a: &str) -> (&'static str, usize) {
    let yes_no = |s: &str| matches!(norm(s).as_str(), "yes" | "no");
    match options {
        Some(o) if o.iter().all(|c| yes_no(c)) => ("yes/no", o.len()),
        Some(o) => ("multiple-choice", o.len()),
        None if yes_no(a) => ("yes/no", 2),
        None if norm(a).starts_with("the quality of the image is") => ("what/how", 5),
        None => ("what/how", 7),
    }
}

/// Whether a generated answer is the reference one: for option questions, the same option; else
/// the same words (the reference may be followed by more).
fn is_correct(options: Option<&[String]>, got: &str, want: &str) -> (bool, bool) {
    match options {
        Some(o) => {
            let (g, w) = (qbench::parse_choice(got, o), qbench::parse_choice(want, o));
            (g.is_some() && g == w, g.is_some())
        }
        None => {
            let (got, want) = (norm(got), norm(want));
            (!want.is_empty() && (got == want || got.starts_with(&format!("{want} "))), true)
        }
    }
}

/// What to evaluate, besides the model.
#[derive(Debug, Clone)]
pub struct EvalInputs<'a> {
    /// Held-out conversations (their answering turns are asked).
    pub data: Option<&'a Path>,
    /// Q-Bench A1 rows.
    pub qbench: Option<&'a Path>,
    /// Folder the image paths are relative to.
    pub images: &'a Path,
    /// Mean-opinion labels to correlate the score with, and the split to keep.
    pub labels: Option<&'a Path>,
    pub split: Option<&'a str>,
    /// Ask at most this many questions of each set.
    pub limit: Option<usize>,
}

/// Evaluates a model (with an optional adapter) on held-out data, Q-Bench rows and labels;
/// `tick` after each question or scored image.
pub fn run(
    model: &Path,
    adapter: Option<&Path>,
    inp: &EvalInputs,
    mut tick: impl FnMut(),
) -> anyhow::Result<EvalReport> {
    let engine = Engine::load(model, adapter, &Device::Cpu, DType::F32)
        .with_context(|| format!("loading {}", model.display()))?;
    let limit = inp.limit.unwrap_or(usize::MAX);
    let mut by_kind: BTreeMap<String, Tally> = BTreeMap::new();
    let mut overall = Tally::default();
    let opts = GenerateOptions { max_new_tokens: 16, ..Default::default() };
    if let Some(data_file) = inp.data {
        let samples = data::load(&[data_file.to_path_buf()], inp.images)?;
        for s in samples.iter().filter(|s| s.task == Task::Answering).take(limit) {
            let (q, a) = &s.turns[0];
            let question = q.replace("<image>\n", "").replace("<image>", "");
            let options = qbench::listed_options(&question);
            let (kind, answers) = kind_of(options.as_deref(), a);
            let img = load_image(&s.image)?;
            let out = engine.generate(&img, &question, &opts, |_| {})?;
            let (ok, matched) = is_correct(options.as_deref(), &out.answer, a);
            by_kind.entry(kind.to_string()).or_default().add(ok, matched, answers);
            overall.add(ok, matched, answers);
            tick();
        }
    }
    let qbench = match inp.qbench {
        Some(path) => {
            let rows = qbench::read(path)?;
            engine.qbench(&rows[..rows.len().min(limit)], inp.images, &mut tick)?
        }
        None => Vec::new(),
    };
    let (mut srocc, mut plcc, mut scored) = (None, None, 0);
    if let Some(lp) = inp.labels {
        let (mut pred, mut mos) = (Vec::new(), Vec::new());
        for l in qadapt_core::labels::read_labels(lp, inp.split)? {
            let img = load_image(&inp.images.join(&l.image))?;
            let (score, _) = engine.score(&img)?;
            pred.push(score as f64);
            mos.push(l.mos);
            tick();
        }
        scored = pred.len();
        if scored > 2 {
            srocc = Some(spearman(&pred, &mos));
            plcc = Some(pearson(&pred, &mos));
        }
    }
    Ok(EvalReport { answering: by_kind, overall, qbench, srocc, plcc, scored_images: scored })
}
