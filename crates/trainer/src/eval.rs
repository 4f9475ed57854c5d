//! `qadapt-train eval`: answer accuracy on held-out conversations (by question kind, with chance
//! levels) and SROCC / PLCC of the Q-Align score against mean-opinion labels.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use candle_core::{DType, Device};
use models::{Engine, GenerateOptions};
use qadapt_core::image::load_image;
use serde::Serialize;

use crate::data::{self, Task};
pub use qadapt_core::metrics::{pearson, spearman};

/// Accuracy of one question kind.
#[derive(Debug, Clone, Serialize)]
pub struct KindAccuracy {
    pub correct: usize,
    pub total: usize,
    pub accuracy: f64,
    /// Accuracy of a uniform guess over the kind's answers.
    pub chance: f64,
}

/// What `eval` reports.
#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    pub answering: BTreeMap<String, KindAccuracy>,
    pub overall_accuracy: f64,
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

fn kind_of(q: &str, a: &str) -> (&'static str, f64) {
    let a = norm(a);
    if a == "yes" || a == "no" {
        ("yes/no", 0.5)
    } else if q.contains("Answer with the option's letter") {
        ("multiple-choice", 0.25)
    } else if a.starts_with("the quality of the image is") {
        ("rating", 0.2)
    } else {
        ("what", 1.0 / 7.0)
    }
}

/// Evaluates a model (with an optional adapter) on held-out data and labels.
pub fn run(
    model: &Path,
    adapter: Option<&Path>,
    data_file: &Path,
    images: &Path,
    labels: Option<&Path>,
    split: Option<&str>,
    limit: Option<usize>,
) -> anyhow::Result<EvalReport> {
    let engine = Engine::load(model, adapter, &Device::Cpu, DType::F32)
        .with_context(|| format!("loading {}", model.display()))?;
    let samples = data::load(&[data_file.to_path_buf()], images)?;
    let mut by_kind: BTreeMap<String, KindAccuracy> = BTreeMap::new();
    let opts = GenerateOptions { max_new_tokens: 8, ..Default::default() };
    for s in samples.iter().filter(|s| s.task == Task::Answering).take(limit.unwrap_or(usize::MAX)) {
        let (q, a) = &s.turns[0];
        let question = q.replace("<image>\n", "").replace("<image>", "");
        let (kind, chance) = kind_of(&question, a);
        let img = load_image(&s.image)?;
        let out = engine.generate(&img, &question, &opts, |_| {})?;
        let (got, want) = (norm(&out.answer), norm(a));
        let ok = !want.is_empty() && (got == want || got.starts_with(&format!("{want} ")));
        let e = by_kind.entry(kind.to_string()).or_insert(KindAccuracy { correct: 0, total: 0, accuracy: 0.0, chance });
        e.total += 1;
        e.correct += usize::from(ok);
    }
    for e in by_kind.values_mut() {
        e.accuracy = e.correct as f64 / e.total.max(1) as f64;
    }
    let (c, t) = by_kind.values().fold((0, 0), |(c, t), e| (c + e.correct, t + e.total));
    let (mut srocc, mut plcc, mut scored) = (None, None, 0);
    if let Some(lp) = labels {
        let (mut pred, mut mos) = (Vec::new(), Vec::new());
        for l in qadapt_core::labels::read_labels(lp, split)? {
            let img = load_image(&images.join(&l.image))?;
            let (score, _) = engine.score(&img)?;
            pred.push(score as f64);
            mos.push(l.mos);
        }
        scored = pred.len();
        if scored > 2 {
            srocc = Some(spearman(&pred, &mos));
            plcc = Some(pearson(&pred, &mos));
        }
    }
    Ok(EvalReport {
        answering: by_kind,
        overall_accuracy: c as f64 / t.max(1) as f64,
        srocc,
        plcc,
        scored_images: scored,
    })
}
