//! Training data: LLaVA / Q-Instruct JSON (DESIGN §4), the task split, and tokenization with Bunny's
//! label masking (loss only on answer tokens and the closing `<|endoftext|>`).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use qadapt_core::template::{self, PromptIds};
use qadapt_core::TextTokenizer;
use serde::Deserialize;

/// Labels of positions that carry no loss (torch's `ignore_index`).
pub const IGNORE: i64 = -100;

/// Which half of the data a sample belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    /// Free-text quality explanations (stage 1's data).
    Explanation,
    /// Short answers: yes/no, what/how, multiple choice.
    Answering,
    /// Both.
    All,
}

impl Task {
    /// Every subset, in the order `--task` lists them.
    pub const ALL: [Task; 3] = [Task::Explanation, Task::Answering, Task::All];

    /// The name `--task` takes (and `train_config.json` stores).
    pub fn name(self) -> &'static str {
        match self {
            Task::Explanation => "explanation",
            Task::Answering => "answering",
            Task::All => "all",
        }
    }
}

impl std::str::FromStr for Task {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Task::ALL
            .into_iter()
            .find(|t| t.name() == s)
            .ok_or_else(|| format!("unknown task {s:?} (expected explanation, answering or all)"))
    }
}

#[derive(Debug, Deserialize)]
struct Turn {
    from: String,
    value: String,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum ImageField {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
struct Row {
    #[serde(default)]
    id: Option<serde_json::Value>,
    image: Option<ImageField>,
    conversations: Vec<Turn>,
    #[serde(default)]
    task: Option<Task>,
}

/// One conversation about one image.
#[derive(Debug, Clone)]
pub struct Sample {
    pub id: String,
    pub image: PathBuf,
    /// (user, assistant) rounds; the first user turn holds `<image>`.
    pub turns: Vec<(String, String)>,
    pub task: Task,
}

/// The documented heuristic when a row has no `task` field: a sample is an explanation when every
/// answer is free text of at least 12 words that is not a bare option letter; otherwise answering.
pub fn classify(turns: &[(String, String)]) -> Task {
    let long = turns.iter().all(|(_, a)| a.split_whitespace().count() >= 12);
    if long {
        Task::Explanation
    } else {
        Task::Answering
    }
}

/// Reads one or more JSON files; image paths are relative to `images`.
pub fn load(files: &[PathBuf], images: &Path) -> anyhow::Result<Vec<Sample>> {
    let mut out = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        let rows: Vec<Row> = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a LLaVA / Q-Instruct JSON list", file.display()))?;
        for (i, row) in rows.into_iter().enumerate() {
            let at = || format!("{} row {i}", file.display());
            let image = match row.image {
                Some(ImageField::One(p)) => p,
                Some(ImageField::Many(v)) if v.len() == 1 => v.into_iter().next().unwrap_or_default(),
                Some(ImageField::Many(v)) => {
                    bail!("{}: {} images in one sample; one image per sample is supported", at(), v.len())
                }
                None => bail!("{}: no \"image\"", at()),
            };
            let mut turns = Vec::new();
            let mut it = row.conversations.into_iter();
            while let Some(h) = it.next() {
                let Some(g) = it.next() else { bail!("{}: a human turn without an answer", at()) };
                if h.from != "human" || g.from != "gpt" {
                    bail!("{}: turns must alternate human / gpt, found {} / {}", at(), h.from, g.from);
                }
                turns.push((h.value, g.value));
            }
            if turns.is_empty() {
                bail!("{}: empty conversation", at());
            }
            let first = &mut turns[0].0;
            if !first.contains(template::IMAGE_TOKEN) {
                *first = template::user_turn(first);
            }
            let task = row.task.unwrap_or_else(|| classify(&turns));
            let id = row
                .id
                .map(|v| v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string()))
                .unwrap_or_else(|| format!("{i}"));
            out.push(Sample { id, image: images.join(image), turns, task });
        }
    }
    Ok(out)
}

/// A tokenized sample.
#[derive(Debug, Clone)]
pub struct Encoded {
    /// Text ids (the image is not among them).
    pub prompt: PromptIds,
    /// One label per text id: the id itself on answer tokens, [`IGNORE`] elsewhere.
    pub labels: Vec<i64>,
    /// What the Q-Former reads: the first question without `<image>` and newlines.
    pub qformer_text: String,
    pub image: PathBuf,
    /// Whether `max_length` cut the sample.
    pub truncated: bool,
}

/// Tokenizes chunk by chunk as Bunny does, masks everything but the answers, and truncates so that
/// text plus `n_image` feature rows fit `max_length`.
pub fn encode(s: &Sample, tok: &TextTokenizer, n_image: usize, max_length: usize) -> anyhow::Result<Encoded> {
    let mut ids = Vec::new();
    let mut labels = Vec::new();
    let mut image_pos = None;
    for (i, (text, target)) in template::conversation(&s.turns).into_iter().enumerate() {
        let part = if i == 0 {
            template::tokenize_prompt(tok, &text)?
        } else {
            PromptIds { ids: tok.encode(&text)?, image_pos: None }
        };
        if let Some(p) = part.image_pos {
            image_pos = Some(ids.len() + p);
        }
        labels.extend(part.ids.iter().map(|&t| if target { t as i64 } else { IGNORE }));
        ids.extend(part.ids);
    }
    let budget = max_length.saturating_sub(if image_pos.is_some() { n_image } else { 0 });
    let truncated = ids.len() > budget;
    if truncated {
        ids.truncate(budget);
        labels.truncate(budget);
    }
    if let Some(p) = image_pos {
        if p > ids.len() {
            bail!("sample {}: --max-length {max_length} cuts the prompt before the image", s.id);
        }
    }
    Ok(Encoded {
        prompt: PromptIds { ids, image_pos },
        labels,
        qformer_text: template::qformer_text(&s.turns[0].0),
        image: s.image.clone(),
        truncated,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A served chat (`template::tokenize_chat`) has exactly the ids its history had in training.
    #[test]
    fn a_chat_prompt_has_the_training_ids_of_its_history() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/qadapt_f32_sharded/model");
        let tok = TextTokenizer::from_dir(&dir).unwrap();
        let turns = vec![
            (
                template::user_turn("Describe the quality of this photo."),
                "It is blurry, and the sky is blown out.".to_string(),
            ),
            ("Is the sky over-exposed?".to_string(), "Yes.".to_string()),
            ("Rate it: excellent, good, fair, poor or bad?".to_string(), "Poor".to_string()),
        ];
        let s = Sample { id: "x".into(), image: "x.png".into(), turns: turns.clone(), task: Task::Answering };
        let trained = encode(&s, &tok, 4, 4096).unwrap().prompt;
        let chat = template::tokenize_chat(&tok, &turns[..2], &turns[2].0).unwrap();
        assert_eq!(chat.image_pos, trained.image_pos);
        let answer = tok.encode(" Poor<|endoftext|>").unwrap();
        assert_eq!([chat.ids.as_slice(), &answer].concat(), trained.ids);
    }

    #[test]
    fn heuristic_split() {
        let long = "The image is slightly blurred and the colours look washed out, so the quality is fair.".to_string();
        assert_eq!(classify(&[("q".into(), long)]), Task::Explanation);
        assert_eq!(classify(&[("q".into(), "Yes".into())]), Task::Answering);
        assert_eq!(classify(&[("q".into(), "B.".into())]), Task::Answering);
    }
}
