//! The Q-Bench A1 protocol, shared by both evaluators (`qadapt-train eval` on candle and
//! `qadapt-run eval` on ONNX Runtime) so that they ask the same prompt and read answers the same way:
//!
//! - the prompt is the question, the options as `A. …` lines and the letter instruction;
//! - a generated answer names an option by its letter (`"B"`, `"B."`, `"B. Blurry"`) or, as
//!   Q-Bench's own scripts accept, by the option's content (the answer is that option, or contains
//!   exactly one option's words); an answer that names none is *unmatched* and counts as wrong;
//! - by likelihood, the option whose letter answer (`"A."`, …) the model finds likeliest is chosen;
//! - every tally carries its chance level: the mean over its rows of 1 / (number of options).

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The instruction after the options, as Q-Bench (and LLaVA's multiple-choice data) words it.
pub const INSTRUCTION: &str = "Answer with the option's letter from the given choices directly.";

/// Option letters in listing order.
pub const LETTERS: [&str; 8] = ["A", "B", "C", "D", "E", "F", "G", "H"];

/// A Q-Bench A1 row. `type` and `concern` are ints in the released files, names in some copies.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QBenchRow {
    /// Image path relative to the images folder.
    pub img_path: String,
    /// The question, without the options.
    pub question: String,
    /// The options, listed as `A. …`, `B. …` in the prompt.
    pub candidates: Vec<String>,
    /// The right option's text.
    pub correct_ans: String,
    /// Question type: 0 yes-or-no, 1 what, 2 how (or a name).
    #[serde(default, rename = "type")]
    pub kind: Option<serde_json::Value>,
    /// Concern: 0 distortion, 1 other, 2 in-context distortion, 3 in-context other (or a name).
    #[serde(default)]
    pub concern: Option<serde_json::Value>,
}

impl QBenchRow {
    /// The prompt this row is asked with.
    pub fn prompt(&self) -> String {
        prompt(&self.question, &self.candidates)
    }

    /// The option letters, each as the answer text `"A."` the likelihood choice scores.
    pub fn letter_answers(&self) -> Vec<String> {
        LETTERS.iter().take(self.candidates.len()).map(|l| format!("{l}.")).collect()
    }

    /// The index of the right option.
    pub fn answer_index(&self) -> Option<usize> {
        self.candidates.iter().position(|c| c == &self.correct_ans)
    }

    /// The question type's name (`yes-or-no`, `what`, `how`).
    pub fn type_name(&self) -> String {
        label(&self.kind, &["yes-or-no", "what", "how"])
    }

    /// The concern's name.
    pub fn concern_name(&self) -> String {
        label(&self.concern, &["distortion", "other", "in-context distortion", "in-context other"])
    }
}

/// Reads a Q-Bench A1 JSON file (a list of rows); checks that each has 2–8 options and that its
/// answer is one of them.
pub fn read(path: &Path) -> Result<Vec<QBenchRow>> {
    let bad = |msg: String| Error::Input { path: path.to_path_buf(), msg };
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let rows: Vec<QBenchRow> = crate::from_json(&bytes)
        .map_err(|(_, m)| bad(format!("{m} (want a list of {{img_path, question, candidates, correct_ans}})")))?;
    for (i, r) in rows.iter().enumerate() {
        if !(2..=LETTERS.len()).contains(&r.candidates.len()) {
            return Err(bad(format!("row {i}: {} candidates (Q-Bench rows have 2 to 8)", r.candidates.len())));
        }
        if r.answer_index().is_none() {
            return Err(bad(format!("row {i}: correct_ans {:?} is not one of its candidates", r.correct_ans)));
        }
    }
    Ok(rows)
}

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
pub fn prompt(question: &str, candidates: &[String]) -> String {
    let listing: String = candidates.iter().zip(LETTERS).map(|(c, l)| format!("{l}. {c}\n")).collect();
    format!("{question}\n{listing}{INSTRUCTION}")
}

/// Whether a prompt lists options in the Q-Bench format; returns them.
pub fn listed_options(prompt: &str) -> Option<Vec<String>> {
    if !prompt.contains(INSTRUCTION) {
        return None;
    }
    let opts: Vec<String> = prompt
        .lines()
        .skip_while(|l| !l.starts_with("A. "))
        .zip(LETTERS)
        .map_while(|(line, letter)| line.strip_prefix(&format!("{letter}. ")).map(str::to_string))
        .collect();
    (opts.len() >= 2).then_some(opts)
}

fn words(s: &str) -> Vec<String> {
    s.to_lowercase()
        .split(|c: char| !c.is_alphanumeric() && c != '-')
        .filter(|w| !w.is_empty())
        .map(str::to_string)
        .collect()
}

/// The option a generated answer names: its leading letter (`"B"`, `"B."`, `"B. text"`), else the
/// option whose text it is, else the one option whose words it contains (none when it contains
/// several or none).
pub fn parse_choice(answer: &str, candidates: &[String]) -> Option<usize> {
    let a = answer.trim();
    let first = a.chars().next()?;
    let rest = a[first.len_utf8()..].chars().next();
    if first.is_ascii_uppercase() && rest.is_none_or(|c| !c.is_alphanumeric()) {
        let i = (first as u8 - b'A') as usize;
        if i < candidates.len() {
            return Some(i);
        }
    }
    let aw = words(a);
    if let Some(i) = candidates.iter().position(|c| words(c) == aw) {
        return Some(i);
    }
    let contains = |c: &String| {
        let cw = words(c);
        !cw.is_empty() && aw.windows(cw.len()).any(|w| w == cw.as_slice())
    };
    let hits: Vec<usize> = (0..candidates.len()).filter(|&i| contains(&candidates[i])).collect();
    (hits.len() == 1).then(|| hits[0])
}

/// The index of the least loss, the first winning ties: how both evaluators (and `--choices`) pick
/// an option by likelihood.
pub fn best_choice(losses: &[f64]) -> usize {
    (0..losses.len()).fold(0, |b, i| if losses[i] < losses[b] { i } else { b })
}

/// How a Q-Bench answer is chosen (DESIGN §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ChooseBy {
    /// Greedy generation; the option the answer names ([`parse_choice`]) is the choice.
    Generate,
    /// The option whose letter answer (`"A."`, …) has the lowest loss: generation constrained to the options.
    Likelihood,
}

impl ChooseBy {
    /// Both ways, in the order reports list them.
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

/// Correct out of total, with the answers that named no option and the chance level.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Tally {
    /// Right answers.
    pub correct: usize,
    /// Questions asked.
    pub total: usize,
    /// `correct / total`.
    pub accuracy: f64,
    /// Answers that named no option (counted wrong).
    pub unmatched: usize,
    /// Expected accuracy of a uniform guess: the mean of 1 / options.
    pub chance: f64,
    #[serde(skip)]
    chance_sum: f64,
}

impl Tally {
    /// Counts one answer over `options` options.
    pub fn add(&mut self, ok: bool, matched: bool, options: usize) {
        self.total += 1;
        self.correct += usize::from(ok);
        self.unmatched += usize::from(!matched);
        self.chance_sum += 1.0 / options.max(1) as f64;
        self.accuracy = self.correct as f64 / self.total as f64;
        self.chance = self.chance_sum / self.total as f64;
    }
}

/// One answered row.
#[derive(Debug, Clone, Serialize)]
pub struct Answer {
    /// The row's image path.
    pub img_path: String,
    /// The row's question.
    pub question: String,
    /// The generated text, or the chosen letter answer (by likelihood).
    pub answer: String,
    /// The option it names, if any.
    pub choice: Option<String>,
    /// Whether that is the right one.
    pub correct: bool,
}

/// Q-Bench accuracies of one way of choosing.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// How the answers were chosen.
    pub by: ChooseBy,
    /// Every question.
    pub overall: Tally,
    /// Per question type.
    pub by_type: BTreeMap<String, Tally>,
    /// Per concern.
    pub by_concern: BTreeMap<String, Tally>,
    /// Rows whose image could not be read or whose prompt does not fit the model (not counted).
    pub failed: Vec<String>,
    /// Every answered row.
    #[serde(skip)]
    pub answers: Vec<Answer>,
}

impl Report {
    /// An empty report.
    pub fn new(by: ChooseBy) -> Self {
        Self {
            by,
            overall: Tally::default(),
            by_type: BTreeMap::new(),
            by_concern: BTreeMap::new(),
            failed: Vec::new(),
            answers: Vec::new(),
        }
    }

    /// Counts `row` answered with `answer`, choosing `choice`.
    pub fn add(&mut self, row: &QBenchRow, answer: String, choice: Option<usize>) {
        let ok = choice.is_some() && choice == row.answer_index();
        let (matched, n) = (choice.is_some(), row.candidates.len());
        self.overall.add(ok, matched, n);
        self.by_type.entry(row.type_name()).or_default().add(ok, matched, n);
        self.by_concern.entry(row.concern_name()).or_default().add(ok, matched, n);
        self.answers.push(Answer {
            img_path: row.img_path.clone(),
            question: row.question.clone(),
            answer,
            choice: choice.and_then(|i| row.candidates.get(i).cloned()),
            correct: ok,
        });
    }
}

/// Reports side by side as one Markdown table: a column of accuracies per way of choosing, the
/// unmatched answers of each, and the chance level.
pub fn markdown(reports: &[Report]) -> String {
    let Some(first) = reports.first() else { return String::new() };
    let mut out = String::from("| Q-Bench A1 | questions |");
    for r in reports {
        out += &format!(" {} | unmatched |", r.by.name());
    }
    out += " chance |\n|---|---:|";
    out += &"---:|---:|".repeat(reports.len());
    out += "---:|\n";
    let mut line = |name: String, pick: &dyn Fn(&Report) -> Option<Tally>| {
        let Some(t0) = pick(first) else { return };
        out += &format!("| {name} | {} |", t0.total);
        for r in reports {
            let t = pick(r).unwrap_or_default();
            out += &format!(" {:.4} | {} |", t.accuracy, t.unmatched);
        }
        out += &format!(" {:.4} |\n", t0.chance);
    };
    line("**overall**".into(), &|r| Some(r.overall));
    for k in first.by_type.keys() {
        line(format!("type: {k}"), &|r| r.by_type.get(k).copied());
    }
    for k in first.by_concern.keys() {
        line(format!("concern: {k}"), &|r| r.by_concern.get(k).copied());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn choices_are_read_from_letters_or_content() {
        let yn = c(&["Yes", "No", "Not sure"]);
        assert_eq!(parse_choice("B.", &yn), Some(1));
        assert_eq!(parse_choice(" C. Not sure", &yn), Some(2));
        assert_eq!(parse_choice("A", &yn), Some(0));
        assert_eq!(parse_choice("no.", &yn), Some(1));
        assert_eq!(parse_choice("D.", &yn), None);
        assert_eq!(parse_choice("", &yn), None);
        let what = c(&["blur", "noise", "over-exposure", "none"]);
        // The content, alone or in a sentence, names one option; two named options name none.
        assert_eq!(parse_choice("Noise.", &what), Some(1));
        assert_eq!(parse_choice("The image suffers from over-exposure.", &what), Some(2));
        assert_eq!(parse_choice("blur and noise", &what), None);
        assert_eq!(parse_choice("Blurry", &what), None);
        assert_eq!(
            prompt("Is it sharp?", &yn[..2]),
            "Is it sharp?\nA. Yes\nB. No\nAnswer with the option's letter from the given choices directly."
        );
        assert_eq!(listed_options(&prompt("Is it sharp?", &yn)), Some(yn.clone()));
        assert_eq!(listed_options("Is it sharp?"), None);
        assert_eq!(best_choice(&[0.5, 0.2, 0.2, 0.9]), 1, "the first of equal losses");
    }

    #[test]
    fn tallies_count_unmatched_answers_and_chance() {
        let row = |cands: &[&str], ans: &str, ty: u64| QBenchRow {
            img_path: "a.png".into(),
            question: "q".into(),
            candidates: c(cands),
            correct_ans: ans.into(),
            kind: Some(ty.into()),
            concern: None,
        };
        let mut r = Report::new(ChooseBy::Generate);
        r.add(&row(&["Yes", "No"], "No", 0), "B.".into(), Some(1));
        r.add(&row(&["a", "b", "c", "d"], "c", 1), "x".into(), None);
        r.add(&row(&["a", "b", "c", "d"], "c", 1), "A.".into(), Some(0));
        assert_eq!((r.overall.correct, r.overall.total, r.overall.unmatched), (1, 3, 1));
        assert!((r.overall.chance - (0.5 + 0.25 + 0.25) / 3.0).abs() < 1e-12);
        assert_eq!(r.by_type["yes-or-no"].correct, 1);
        assert_eq!(r.by_type["what"].unmatched, 1);
        assert_eq!(r.answers[2].choice.as_deref(), Some("a"));
        let md = markdown(&[r.clone(), Report { by: ChooseBy::Likelihood, ..r }]);
        assert!(md.contains("| **overall** | 3 | 0.3333 | 1 | 0.3333 | 1 | 0.3333 |"), "{md}");
    }
}
