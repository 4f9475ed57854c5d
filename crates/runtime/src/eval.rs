//! `qadapt-run eval`: Q-Bench A1 accuracy (overall, per question type and per concern) and IQA
//! correlation (SROCC / PLCC of the Q-Align score against mean opinion scores, with a scatter plot).
//! An image that cannot be read is counted and skipped, not fatal.

use std::collections::BTreeMap;
use std::path::Path;

use image::RgbImage;
use qadapt_core::image::load_image;
use qadapt_core::metrics::{pearson, spearman};
use serde::{Deserialize, Serialize};

use crate::{GenerateOptions, Request, Result, RunError, Runtime};

/// How a Q-Bench answer is chosen (DESIGN §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChooseBy {
    /// Greedy generation; the answer's option letter (or the option's text) is the choice.
    Generate,
    /// The option whose letter answer (`"A."`, …) has the lowest loss: generation constrained to the options.
    Likelihood,
}

impl ChooseBy {
    /// Both ways, in the order `--by` lists them.
    pub const ALL: [ChooseBy; 2] = [ChooseBy::Generate, ChooseBy::Likelihood];

    /// The name `--by` takes.
    pub fn name(self) -> &'static str {
        match self {
            ChooseBy::Generate => "generate",
            ChooseBy::Likelihood => "likelihood",
        }
    }
}

impl std::str::FromStr for ChooseBy {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        ChooseBy::ALL
            .into_iter()
            .find(|b| b.name() == s)
            .ok_or_else(|| format!("unknown --by {s:?} (expected generate or likelihood)"))
    }
}

/// A Q-Bench A1 row. `type` and `concern` are ints in the released files, names in some copies.
#[derive(Debug, Clone, Deserialize)]
pub struct QBenchRow {
    /// Image path relative to `--images`.
    pub img_path: String,
    /// The question, without the options.
    pub question: String,
    /// The options, listed as `A. …`, `B. …` in the prompt.
    pub candidates: Vec<String>,
    /// The right option's text.
    pub correct_ans: String,
    #[serde(default, rename = "type")]
    /// Question type: 0 yes-or-no, 1 what, 2 how (or a name).
    pub kind: Option<serde_json::Value>,
    #[serde(default)]
    /// Concern: 0 distortion, 1 other, 2 in-context distortion, 3 in-context other (or a name).
    pub concern: Option<serde_json::Value>,
}

/// Correct out of total.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Tally {
    /// Right answers.
    pub correct: usize,
    /// Questions asked.
    pub total: usize,
    /// `correct / total`.
    pub accuracy: f64,
}

impl Tally {
    fn add(&mut self, ok: bool) {
        self.total += 1;
        self.correct += usize::from(ok);
        self.accuracy = self.correct as f64 / self.total as f64;
    }
}

/// What `eval --qbench` reports.
#[derive(Debug, Clone, Default, Serialize)]
pub struct QBenchReport {
    /// Every question.
    pub overall: Tally,
    /// Per question type.
    pub by_type: BTreeMap<String, Tally>,
    /// Per concern.
    pub by_concern: BTreeMap<String, Tally>,
    /// Rows whose image could not be read or whose prompt does not fit the model (not counted in
    /// the accuracies).
    pub failed: Vec<String>,
    /// Every answered row, for `--out`.
    #[serde(skip)]
    pub answers: Vec<QBenchAnswer>,
}

/// One answered Q-Bench row.
#[derive(Debug, Clone, Serialize)]
pub struct QBenchAnswer {
    /// The row's image path.
    pub img_path: String,
    /// The row's question.
    pub question: String,
    /// The generated text, or the chosen letter answer (`--by likelihood`).
    pub answer: String,
    /// The option it names, if any.
    pub choice: Option<String>,
    /// Whether that is the right one.
    pub correct: bool,
}

impl QBenchReport {
    /// The report as a Markdown table: overall, then per question type and per concern.
    pub fn markdown(&self) -> String {
        let mut out = String::from("| Q-Bench A1 | correct | total | accuracy |\n|---|---:|---:|---:|\n");
        let o = &self.overall;
        out += &format!("| **overall** | {} | {} | **{:.4}** |\n", o.correct, o.total, o.accuracy);
        let rows = self.by_type.iter().map(|(k, t)| (format!("type: {k}"), t));
        for (k, t) in rows.chain(self.by_concern.iter().map(|(k, t)| (format!("concern: {k}"), t))) {
            out += &format!("| {k} | {} | {} | {:.4} |\n", t.correct, t.total, t.accuracy);
        }
        out
    }
}

const LETTERS: [&str; 8] = ["A", "B", "C", "D", "E", "F", "G", "H"];

fn label(v: &Option<serde_json::Value>, names: &[&str]) -> String {
    match v {
        Some(serde_json::Value::Number(n)) => {
            n.as_u64().and_then(|i| names.get(i as usize)).map_or_else(|| n.to_string(), |s| s.to_string())
        }
        Some(serde_json::Value::String(s)) => s.clone(),
        _ => "unknown".into(),
    }
}

/// The Q-Bench prompt: the question, the options as `A. …` lines, and the letter instruction.
pub fn qbench_prompt(question: &str, candidates: &[String]) -> String {
    let listing: String = candidates.iter().zip(LETTERS).map(|(c, l)| format!("{l}. {c}\n")).collect();
    format!("{question}\n{listing}Answer with the option's letter from the given choices directly.")
}

/// The option a generated answer names: its leading letter (`"B"`, `"B."`, `"B. text"`), else the
/// option whose text it is.
pub fn parse_choice(answer: &str, candidates: &[String]) -> Option<usize> {
    let a = answer.trim();
    let norm = |s: &str| s.trim().trim_end_matches('.').to_lowercase();
    let first = a.chars().next()?;
    let rest = a[first.len_utf8()..].chars().next();
    if first.is_ascii_uppercase() && rest.is_none_or(|c| !c.is_alphanumeric()) {
        let i = (first as u8 - b'A') as usize;
        if i < candidates.len() {
            return Some(i);
        }
    }
    candidates.iter().position(|c| norm(c) == norm(a))
}

/// Q-Bench A1 accuracy of `rows` with images under `images`; generation runs `batch` rows at a
/// time (their prompts differ: a mixed batch). `tick` after each row.
pub fn qbench(
    rt: &mut Runtime,
    rows: &[QBenchRow],
    images: &Path,
    by: ChooseBy,
    batch: usize,
    mut tick: impl FnMut(),
) -> Result<QBenchReport> {
    let mut rep = QBenchReport::default();
    let opts = GenerateOptions { max_new_tokens: 16, ..Default::default() };
    for chunk in rows.chunks(batch.max(1)) {
        let mut loaded: Vec<(&QBenchRow, RgbImage, String)> = Vec::new();
        for row in chunk {
            let path = images.join(&row.img_path);
            let prompt = qbench_prompt(&row.question, &row.candidates);
            match rt.check_question(&prompt).and_then(|_| Ok(load_image(&path)?)) {
                Ok(img) => loaded.push((row, img, prompt)),
                Err(e) => {
                    rep.failed.push(format!("{}: {e}", path.display()));
                    tick();
                }
            }
        }
        // (answer text, option index) per loaded row.
        let picks: Vec<(String, Option<usize>)> = match by {
            ChooseBy::Generate => {
                let reqs: Vec<Request> = loaded
                    .iter()
                    .map(|(_, img, p)| Request { image: img, question: p, history: &[], opts, cancel: None })
                    .collect();
                if reqs.is_empty() {
                    Vec::new()
                } else {
                    rt.generate_mixed(&reqs, |_, _| {})?
                        .into_iter()
                        .zip(&loaded)
                        .map(|(a, (row, _, _))| {
                            let pick = parse_choice(&a.answer, &row.candidates);
                            (a.answer, pick)
                        })
                        .collect()
                }
            }
            ChooseBy::Likelihood => loaded
                .iter()
                .map(|(row, img, p)| {
                    let letters: Vec<String> =
                        LETTERS.iter().take(row.candidates.len()).map(|l| format!("{l}.")).collect();
                    let refs: Vec<&str> = letters.iter().map(String::as_str).collect();
                    let best = Runtime::best_choice(&rt.choices(img, p, &refs)?);
                    Ok((letters[best].clone(), Some(best)))
                })
                .collect::<Result<_>>()?,
        };
        for ((row, _, _), (answer, got)) in loaded.iter().zip(picks) {
            let want = row.candidates.iter().position(|c| c == &row.correct_ans);
            let ok = want.is_some() && got == want;
            rep.answers.push(QBenchAnswer {
                img_path: row.img_path.clone(),
                question: row.question.clone(),
                answer,
                choice: got.map(|i| row.candidates[i].clone()),
                correct: ok,
            });
            rep.overall.add(ok);
            rep.by_type.entry(label(&row.kind, &["yes-or-no", "what", "how"])).or_default().add(ok);
            rep.by_concern
                .entry(label(&row.concern, &["distortion", "other", "in-context distortion", "in-context other"]))
                .or_default()
                .add(ok);
            tick();
        }
    }
    Ok(rep)
}

/// Reads a Q-Bench A1 JSON file (a list of rows).
pub fn read_qbench(path: &Path) -> Result<Vec<QBenchRow>> {
    let text = std::fs::read_to_string(path).map_err(|e| RunError::Input(format!("{}: {e}", path.display())))?;
    serde_json::from_str(&text).map_err(|e| {
        RunError::Input(format!(
            "{}: {e} (want a list of {{img_path, question, candidates, correct_ans}})",
            path.display()
        ))
    })
}

pub use qadapt_core::labels::{read_labels, Label};

/// What `eval --iqa` reports.
#[derive(Debug, Clone, Serialize)]
pub struct IqaReport {
    /// Images scored.
    pub scored: usize,
    /// Spearman rank correlation of score and MOS.
    pub srocc: f64,
    /// Pearson correlation of score and MOS.
    pub plcc: f64,
    /// Images that could not be read, with the reason.
    pub failed: Vec<String>,
    /// (mos, predicted score) of every scored image.
    #[serde(skip)]
    pub points: Vec<(f64, f64)>,
}

/// Scores every labelled image (`batch` at a time) and correlates with the MOS; `tick(n)` after
/// each batch of n.
pub fn iqa(
    rt: &mut Runtime,
    labels: &[Label],
    images: &Path,
    batch: usize,
    mut tick: impl FnMut(usize),
) -> Result<IqaReport> {
    let (mut points, mut failed) = (Vec::new(), Vec::new());
    for chunk in labels.chunks(batch.max(1)) {
        let mut ok: Vec<(f64, RgbImage)> = Vec::new();
        for l in chunk {
            let path = images.join(&l.image);
            match load_image(&path) {
                Ok(img) => ok.push((l.mos, img)),
                Err(e) => failed.push(format!("{}: {e}", path.display())),
            }
        }
        if !ok.is_empty() {
            let refs: Vec<&RgbImage> = ok.iter().map(|(_, i)| i).collect();
            for ((mos, _), (score, _)) in ok.iter().zip(rt.score_batch(&refs)?) {
                points.push((*mos, score as f64));
            }
        }
        tick(chunk.len());
    }
    if points.len() < 3 {
        return Err(RunError::Input(format!(
            "only {} images could be scored; correlations need at least 3",
            points.len()
        )));
    }
    let (mos, pred): (Vec<f64>, Vec<f64>) = points.iter().copied().unzip();
    Ok(IqaReport { scored: points.len(), srocc: spearman(&pred, &mos), plcc: pearson(&pred, &mos), failed, points })
}

/// Draws predicted score against MOS into a PNG at `path`.
pub fn scatter_png(rep: &IqaReport, path: &Path) -> Result<()> {
    use qadapt_plot::{Chart, Mark, Series, DARK};
    Chart {
        title: format!("n = {}   SROCC {:.3}   PLCC {:.3}", rep.scored, rep.srocc, rep.plcc),
        x_label: "MOS".into(),
        y_label: "predicted score (1-5)".into(),
        integer_x: false,
        series: vec![Series { label: String::new(), points: rep.points.clone(), mark: Mark::Dots, color: DARK }],
        size: (640, 560),
    }
    .write_png(path)
    .map_err(|e| RunError::Input(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choices_are_read_from_letters_or_text() {
        let c: Vec<String> = ["Yes", "No", "Not sure"].map(String::from).to_vec();
        assert_eq!(parse_choice("B.", &c), Some(1));
        assert_eq!(parse_choice(" C. Not sure", &c), Some(2));
        assert_eq!(parse_choice("A", &c), Some(0));
        assert_eq!(parse_choice("no.", &c), Some(1));
        assert_eq!(parse_choice("D.", &c), None);
        assert_eq!(parse_choice("Blurry", &c), None);
        assert_eq!(parse_choice("", &c), None);
        assert_eq!(
            qbench_prompt("Is it sharp?", &c[..2]),
            "Is it sharp?\nA. Yes\nB. No\nAnswer with the option's letter from the given choices directly."
        );
    }
}
