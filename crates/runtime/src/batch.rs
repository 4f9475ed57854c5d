//! `qadapt-run batch`: one question (or the score) over many images, a JSON line per image.
//! Images go through the vision graph and the decoder `batch_size` at a time; the output is
//! appended and flushed batch by batch, so a stopped run resumes where it left off (rows already in
//! the output are skipped), and an image that cannot be read becomes an error row, never an abort.

use std::collections::HashSet;
use std::io::{BufRead, Write};
use std::path::Path;

use image::RgbImage;
use qadapt_core::image::load_image;
use serde::{Deserialize, Serialize};

use crate::{GenerateOptions, Request, Result, RunError, Runtime};

/// What each image is asked.
#[derive(Debug, Clone)]
pub enum Task {
    /// Generate an answer with these settings to this question.
    Ask(GenerateOptions, String),
    /// The Q-Align score.
    Score,
}

/// One input row: an image, and optionally its own question (else the job's).
#[derive(Debug, Clone, Deserialize)]
pub struct Row {
    /// Image path (made absolute against the JSONL file's directory).
    pub image: String,
    /// This row's question; the job's `--ask` when absent.
    #[serde(default)]
    pub question: Option<String>,
}

/// One output line.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    /// The input row's image: the key a resumed run skips by.
    pub image: String,
    /// The question asked (absent for scores).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub question: Option<String>,
    #[serde(flatten)]
    /// The answer, or the error.
    pub result: Outcome,
}

/// An answer or the reason there is none.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Outcome {
    /// The image or its batch failed.
    Error {
        /// Why.
        error: String,
    },
    /// What `--json` prints for one image.
    Answer(qadapt_core::sampling::AnswerJson),
}

/// What a run did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    /// Rows in the input.
    pub total: usize,
    /// Rows found in the output already.
    pub skipped: usize,
    /// Rows answered in this run.
    pub answered: usize,
    /// Rows whose image could not be read (or whose batch failed) in this run.
    pub failed: usize,
    /// Wall time of this run.
    pub seconds: f64,
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> RunError + '_ {
    move |e| RunError::Input(format!("{}: {e}", path.display()))
}

const IMAGE_EXTS: [&str; 5] = ["jpg", "jpeg", "png", "webp", "bmp"];

/// The rows of `input`: a directory's image files (sorted by name), or a JSONL file of
/// `{"image": path, "question"?: …}` with paths relative to the file's directory.
pub fn read_rows(input: &Path) -> Result<Vec<Row>> {
    if input.is_dir() {
        let mut names: Vec<String> = std::fs::read_dir(input)
            .map_err(io(input))?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| {
                p.is_file()
                    && p.extension()
                        .and_then(|x| x.to_str())
                        .is_some_and(|x| IMAGE_EXTS.contains(&x.to_ascii_lowercase().as_str()))
            })
            .map(|p| p.display().to_string())
            .collect();
        names.sort();
        return Ok(names.into_iter().map(|image| Row { image, question: None }).collect());
    }
    let text = std::fs::read_to_string(input).map_err(io(input))?;
    let base = input.parent().unwrap_or(Path::new("."));
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let mut row: Row = serde_json::from_str(line).map_err(|e| {
            RunError::Input(format!("{} line {}: {e} (want {{\"image\": path}})", input.display(), i + 1))
        })?;
        let p = Path::new(&row.image);
        if p.is_relative() {
            row.image = base.join(p).display().to_string();
        }
        rows.push(row);
    }
    Ok(rows)
}

/// The images already in `out` (lines that do not parse, e.g. one cut short by a kill, are not).
pub fn done_rows(out: &Path) -> Result<HashSet<String>> {
    let f = match std::fs::File::open(out) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(HashSet::new()),
        Err(e) => return Err(io(out)(e)),
    };
    let mut done = HashSet::new();
    for line in std::io::BufReader::new(f).lines() {
        if let Ok(r) = serde_json::from_str::<Record>(&line.map_err(io(out))?) {
            done.insert(r.image);
        }
    }
    Ok(done)
}

/// Runs `task` over `rows`, appending to `out`; `tick` is called with the rows finished so far.
pub fn run(
    rt: &mut Runtime,
    rows: &[Row],
    task: &Task,
    batch_size: usize,
    out: &Path,
    mut tick: impl FnMut(&Summary),
) -> Result<Summary> {
    let t0 = std::time::Instant::now();
    let done = done_rows(out)?;
    let mut sum = Summary { total: rows.len(), ..Default::default() };
    let todo: Vec<&Row> = rows.iter().filter(|r| !done.contains(&r.image)).collect();
    sum.skipped = rows.len() - todo.len();
    tick(&sum);
    // A line cut short by a kill is closed so the next record starts on its own line.
    let cut = std::fs::read(out).map(|b| b.last().is_some_and(|&c| c != b'\n')).unwrap_or(false);
    let mut file = std::fs::OpenOptions::new().create(true).append(true).open(out).map_err(io(out))?;
    if cut {
        file.write_all(b"\n").map_err(io(out))?;
    }
    let question_of = |r: &Row| match task {
        Task::Ask(_, q) => Some(r.question.clone().unwrap_or_else(|| q.clone())),
        Task::Score => None,
    };
    // Rows may carry their own questions: a batch mixes them (left-padded prompts).
    let mut i = 0;
    while i < todo.len() {
        let j = (i + batch_size.max(1)).min(todo.len());
        let mut records: Vec<Option<Record>> = vec![None; j - i];
        let mut imgs: Vec<(usize, RgbImage)> = Vec::new();
        for (k, row) in todo[i..j].iter().enumerate() {
            // A row whose question does not fit fails alone, not its batch.
            let fits = question_of(row).map_or(Ok(()), |q| rt.check_question(&q));
            match fits.and_then(|_| Ok(load_image(Path::new(&row.image))?)) {
                Ok(img) => imgs.push((k, img)),
                Err(e) => {
                    records[k] = Some(Record {
                        image: row.image.clone(),
                        question: question_of(row),
                        result: Outcome::Error { error: e.to_string() },
                    })
                }
            }
        }
        if !imgs.is_empty() {
            let questions: Vec<Option<String>> = imgs.iter().map(|(k, _)| question_of(todo[i + k])).collect();
            let answers: Result<Vec<qadapt_core::sampling::AnswerJson>> = match task {
                Task::Ask(opts, _) => {
                    let reqs: Vec<Request> = imgs
                        .iter()
                        .zip(&questions)
                        .map(|((_, image), q)| Request {
                            image,
                            question: q.as_deref().unwrap_or(""),
                            history: &[],
                            opts: *opts,
                            cancel: None,
                        })
                        .collect();
                    rt.generate_mixed(&reqs, |_, _| {})
                }
                Task::Score => {
                    let refs: Vec<&RgbImage> = imgs.iter().map(|(_, im)| im).collect();
                    rt.score_batch_json(&refs)
                }
            };
            match answers {
                Ok(a) => {
                    for (((k, _), ans), q) in imgs.iter().zip(a).zip(questions) {
                        records[*k] = Some(Record {
                            image: todo[i + k].image.clone(),
                            question: q,
                            result: Outcome::Answer(ans),
                        });
                    }
                }
                Err(e) => {
                    for ((k, _), q) in imgs.iter().zip(questions) {
                        records[*k] = Some(Record {
                            image: todo[i + k].image.clone(),
                            question: q,
                            result: Outcome::Error { error: e.to_string() },
                        });
                    }
                }
            }
        }
        let mut buf = String::new();
        for r in records.into_iter().flatten() {
            match r.result {
                Outcome::Error { .. } => sum.failed += 1,
                Outcome::Answer(_) => sum.answered += 1,
            }
            buf.push_str(&serde_json::to_string(&r).map_err(|e| RunError::Input(e.to_string()))?);
            buf.push('\n');
        }
        file.write_all(buf.as_bytes()).and_then(|_| file.flush()).map_err(io(out))?;
        sum.seconds = t0.elapsed().as_secs_f64();
        tick(&sum);
        i = j;
    }
    sum.seconds = t0.elapsed().as_secs_f64();
    Ok(sum)
}
