//! `qadapt-run eval`: Q-Bench A1 accuracy (overall, per question type and per concern, by generation
//! and by likelihood, with the protocol of `qadapt_core::qbench`) and IQA
//! correlation (SROCC / PLCC of the Q-Align score against mean opinion scores, with a scatter plot).
//! An image that cannot be read is counted and skipped, not fatal.

use std::path::Path;

use image::RgbImage;
use qadapt_core::image::load_image;
use qadapt_core::metrics::{pearson, spearman};
use serde::Serialize;

use crate::{GenerateOptions, Request, Result, RunError, Runtime};

pub use qadapt_core::qbench::{markdown, parse_choice, prompt as qbench_prompt, ChooseBy, QBenchRow, Report};

/// Q-Bench A1 accuracy of `rows` with images under `images`, chosen `by` generation or likelihood
/// (the protocol of [`qadapt_core::qbench`]); generation runs `batch` rows at a time (their prompts
/// differ: a mixed batch). `tick` after each row.
pub fn qbench(
    rt: &mut Runtime,
    rows: &[QBenchRow],
    images: &Path,
    by: ChooseBy,
    batch: usize,
    mut tick: impl FnMut(),
) -> Result<Report> {
    let mut rep = Report::new(by);
    let opts = GenerateOptions { max_new_tokens: 16, ..Default::default() };
    for chunk in rows.chunks(batch.max(1)) {
        let mut loaded: Vec<(&QBenchRow, RgbImage, String)> = Vec::new();
        for row in chunk {
            let path = images.join(&row.img_path);
            let prompt = row.prompt();
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
                    let letters = row.letter_answers();
                    let refs: Vec<&str> = letters.iter().map(String::as_str).collect();
                    let best = Runtime::best_choice(&rt.choices(img, p, &refs)?);
                    Ok((letters[best].clone(), Some(best)))
                })
                .collect::<Result<_>>()?,
        };
        for ((row, _, _), (answer, got)) in loaded.iter().zip(picks) {
            rep.add(row, answer, got);
            tick();
        }
    }
    Ok(rep)
}

/// Reads a Q-Bench A1 JSON file (a list of rows).
pub fn read_qbench(path: &Path) -> Result<Vec<QBenchRow>> {
    qadapt_core::qbench::read(path).map_err(|e| RunError::Input(e.to_string()))
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
