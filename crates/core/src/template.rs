//! The Bunny conversation template (conv `bunny`) and the chunk-wise tokenization around `<image>`
//! that decides where the visual features are spliced (DESIGN §3, §7.1).

use crate::tokenizer::TextTokenizer;
use crate::{Error, Result};

/// The image placeholder of user turns.
pub const IMAGE_TOKEN: &str = "<image>";

/// The system line of conv `bunny`.
pub const SYSTEM: &str = "A chat between a curious user and an artificial intelligence assistant. \
The assistant gives helpful, detailed, and polite answers to the user's questions.";

/// The question of the Q-Align quality score (DESIGN §5).
pub const SCORE_QUESTION: &str = "How would you rate the quality of this image?";
/// What the assistant turn begins with when scoring.
pub const SCORE_ANSWER_PREFIX: &str = "The quality of the image is";

/// The user turn for a question typed on the command line: the image first, as Bunny's data has it.
pub fn user_turn(question: &str) -> String {
    if question.contains(IMAGE_TOKEN) {
        question.to_string()
    } else {
        format!("{IMAGE_TOKEN}\n{question}")
    }
}

/// One round of dialogue, ending where the assistant speaks next:
/// `"{SYSTEM} USER: {user} ASSISTANT:"`, plus `" {prefix}"` when the answer is begun for it.
pub fn prompt(user: &str, answer_prefix: Option<&str>) -> String {
    let mut p = format!("{SYSTEM} USER: {user} ASSISTANT:");
    if let Some(a) = answer_prefix {
        p.push(' ');
        p.push_str(a);
    }
    p
}

/// A multi-turn conversation rendered as Bunny trains on it: each assistant answer is followed by
/// `<|endoftext|>`. Returns the text pieces with a flag telling whether the piece is a training target.
pub fn conversation(turns: &[(String, String)]) -> Vec<(String, bool)> {
    let mut out = Vec::with_capacity(turns.len() * 2);
    for (i, (user, answer)) in turns.iter().enumerate() {
        let head =
            if i == 0 { format!("{SYSTEM} USER: {user} ASSISTANT:") } else { format!(" USER: {user} ASSISTANT:") };
        out.push((head, false));
        out.push((format!(" {answer}{}", crate::tokenizer::END_OF_TEXT), true));
    }
    out
}

/// The prompt of a multi-turn chat, rendered as [`conversation`] renders training data: the
/// completed `(user, assistant)` turns of `history` (the first user turn carries the image, see
/// [`user_turn`]), then `question` as the next user turn, ending where the assistant speaks.
pub fn chat_prompt(history: &[(String, String)], question: &str) -> String {
    let mut p: String = conversation(history).into_iter().map(|(t, _)| t).collect();
    let user = if history.is_empty() { user_turn(question) } else { question.to_string() };
    if p.is_empty() {
        p = prompt(&user, None);
    } else {
        p += &format!(" USER: {user} ASSISTANT:");
    }
    p
}

/// [`chat_prompt`] tokenized piece by piece as training tokenizes a conversation (the first round
/// around `<image>`, then each later piece on its own), so a chat's prompt has exactly the ids its
/// history had in training.
pub fn tokenize_chat(tok: &TextTokenizer, history: &[(String, String)], question: &str) -> Result<PromptIds> {
    if history.is_empty() {
        return tokenize_prompt(tok, &chat_prompt(history, question));
    }
    let mut pieces = conversation(history).into_iter().map(|(t, _)| t);
    let mut out = tokenize_prompt(tok, &pieces.next().unwrap_or_default())?;
    for p in pieces.chain(std::iter::once(format!(" USER: {question} ASSISTANT:"))) {
        out.ids.extend(tok.encode(&p)?);
    }
    Ok(out)
}

/// The text the Q-Former reads: the question with `<image>` and every newline deleted (DESIGN §7.2).
pub fn qformer_text(question: &str) -> String {
    question.replace(IMAGE_TOKEN, "").replace('\n', "")
}

/// Prompt ids with the position where the image features go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptIds {
    /// Text token ids, without a placeholder for the image.
    pub ids: Vec<u32>,
    /// Index into `ids` before which the image features are spliced (`None`: text-only prompt).
    pub image_pos: Option<usize>,
}

impl PromptIds {
    /// Sequence length once `n_image` feature rows are spliced in.
    pub fn spliced_len(&self, n_image: usize) -> usize {
        self.ids.len() + if self.image_pos.is_some() { n_image } else { 0 }
    }

    /// The spliced length, when it leaves room for one new token within `max_positions`; else the
    /// message every caller reports, naming the setting (`field`) that set the limit.
    pub fn fits(&self, n_image: usize, max_positions: usize, field: &str) -> std::result::Result<usize, String> {
        let len = self.spliced_len(n_image);
        if len >= max_positions {
            return Err(format!(
                "the prompt is {len} tokens with the image; the model takes at most {max_positions} ({field})"
            ));
        }
        Ok(len)
    }

    /// The ids in Bunny's `tokenizer_image_token` form, with `-200` where the image goes.
    pub fn with_placeholder(&self) -> Vec<i64> {
        let mut v: Vec<i64> = self.ids.iter().map(|&i| i as i64).collect();
        if let Some(p) = self.image_pos {
            v.insert(p, -200);
        }
        v
    }
}

/// Bunny's `tokenizer_image_token`: tokenizes the chunks around `<image>` separately (so the first
/// chunk ends in a lone space token and the second starts with a newline token) and records the join.
pub fn tokenize_prompt(tok: &TextTokenizer, prompt: &str) -> Result<PromptIds> {
    let chunks: Vec<&str> = prompt.split(IMAGE_TOKEN).collect();
    match chunks.as_slice() {
        [text] => Ok(PromptIds { ids: tok.encode(text)?, image_pos: None }),
        [before, after] => {
            let mut ids = tok.encode(before)?;
            let pos = ids.len();
            ids.extend(tok.encode(after)?);
            Ok(PromptIds { ids, image_pos: Some(pos) })
        }
        _ => Err(Error::Prompt(format!(
            "the prompt has {} `<image>` placeholders; one image per prompt is supported",
            chunks.len() - 1
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qformer_text_deletes_image_and_newlines() {
        assert_eq!(qformer_text("<image>\nA photo.\nIs it blurry?"), "A photo.Is it blurry?");
    }

    #[test]
    fn chat_prompt_continues_the_training_rendering() {
        assert_eq!(chat_prompt(&[], "Q?"), prompt(&user_turn("Q?"), None));
        let history = [(user_turn("Describe it."), "It is blurry.".to_string())];
        let p = chat_prompt(&history, "Why?");
        assert!(
            p.ends_with("USER: <image>\nDescribe it. ASSISTANT: It is blurry.<|endoftext|> USER: Why? ASSISTANT:"),
            "{p}"
        );
        assert_eq!(p.matches(IMAGE_TOKEN).count(), 1);
    }

    #[test]
    fn prompt_matches_conv_bunny() {
        let p = prompt(&user_turn("Q?"), None);
        assert!(p.ends_with("questions. USER: <image>\nQ? ASSISTANT:"), "{p}");
        let s = prompt(&user_turn(SCORE_QUESTION), Some(SCORE_ANSWER_PREFIX));
        assert!(s.ends_with("image? ASSISTANT: The quality of the image is"), "{s}");
    }
}
