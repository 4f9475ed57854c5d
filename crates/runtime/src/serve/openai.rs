//! The OpenAI chat-completions types the server reads and writes, and their validation: a request
//! is a typed struct (a wrong type is a 400 naming the field), every limit is checked before the
//! job is queued — and so before a stream's 200 — and parameters we do not support are refused by
//! name rather than ignored.

use qadapt_core::sampling::{AnswerJson, SamplingParams, TokenLogprob};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::{ApiError, Config};
use crate::GenerateOptions;

/// `POST /v1/chat/completions` as far as we read it; other fields land in `other` and are refused
/// when they ask for something we would otherwise silently not do.
#[derive(Debug, Deserialize)]
pub(crate) struct ChatRequest {
    pub messages: Vec<Message>,
    pub max_tokens: Option<u64>,
    pub max_completion_tokens: Option<u64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    /// Extension (not OpenAI): top-k sampling.
    pub top_k: Option<u64>,
    pub seed: Option<u64>,
    /// Extension (not OpenAI): HF's repetition penalty.
    pub repetition_penalty: Option<f32>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub logprobs: bool,
    pub top_logprobs: Option<u64>,
    pub n: Option<u64>,
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

#[derive(Debug, Deserialize)]
pub(crate) struct Message {
    pub role: Role,
    #[serde(default)]
    pub content: Option<Content>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Role {
    System,
    Developer,
    User,
    Assistant,
    Tool,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::Developer => "developer",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(crate) enum Part {
    Text { text: String },
    ImageUrl { image_url: ImageUrl },
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum ImageUrl {
    Object { url: String },
    Plain(String),
}

/// Fields we refuse when present (and not null): each would change the answer's meaning.
const UNSUPPORTED: [&str; 12] = [
    "tools",
    "tool_choice",
    "functions",
    "function_call",
    "response_format",
    "stop",
    "logit_bias",
    "presence_penalty",
    "frequency_penalty",
    "audio",
    "prediction",
    "parallel_tool_calls",
];

/// A chat request checked and reduced to what the inference thread needs.
pub(crate) struct Chat {
    /// The data URL or base64 of the one image.
    pub image: String,
    pub history: Vec<(String, String)>,
    pub question: String,
    pub opts: GenerateOptions,
    pub stream: bool,
    pub include_usage: bool,
}

/// Parses a chat body: the JSON's shape (serde, the path of a wrong field named), then the
/// conversation's (user and assistant turns alternating, one image in the first user turn), then
/// the settings' ranges.
pub(crate) fn parse_chat(body: &[u8], cfg: &Config) -> Result<Chat, ApiError> {
    let req: ChatRequest = qadapt_core::from_json(body).map_err(ApiError::from_json)?;
    for f in UNSUPPORTED {
        if req.other.get(f).is_some_and(|v| !v.is_null()) {
            return Err(ApiError::bad(format!("{f} is not supported by this server")).param(f));
        }
    }
    if req.n.is_some_and(|n| n != 1) {
        return Err(ApiError::bad("n: only one choice per request is supported (n = 1)").param("n"));
    }
    let (image, history, question) = conversation(&req.messages)?;
    let text_bytes = question.len() + history.iter().map(|(u, a)| u.len() + a.len()).sum::<usize>();
    if text_bytes > cfg.max_prompt_bytes {
        return Err(ApiError::bad(format!(
            "the messages' text is {text_bytes} bytes; the limit is {}",
            cfg.max_prompt_bytes
        ))
        .param("messages"));
    }
    let max_tokens = req.max_completion_tokens.or(req.max_tokens).map_or(cfg.max_new_tokens as u64, |v| v);
    let max_name = if req.max_completion_tokens.is_some() { "max_completion_tokens" } else { "max_tokens" };
    if max_tokens == 0 || max_tokens > cfg.max_new_tokens as u64 {
        return Err(ApiError::bad(format!(
            "{max_name} {max_tokens} is not between 1 and the limit {}",
            cfg.max_new_tokens
        ))
        .param(max_name));
    }
    let top_logprobs = match (req.logprobs, req.top_logprobs) {
        (_, Some(k)) if k > 20 => {
            return Err(ApiError::bad(format!("top_logprobs {k} is over 20")).param("top_logprobs"))
        }
        (false, Some(_)) => return Err(ApiError::bad("top_logprobs needs logprobs: true").param("top_logprobs")),
        (true, k) => Some(k.unwrap_or(0) as usize),
        (false, None) => None,
    };
    let sampling = SamplingParams {
        temperature: req.temperature,
        top_k: req.top_k.map(|k| k.min(u32::MAX as u64) as usize),
        top_p: req.top_p,
        seed: req.seed.unwrap_or(0),
        repetition_penalty: req.repetition_penalty,
    };
    // The sampler checks the ranges; fail here with a 400 rather than in the batch.
    qadapt_core::sampling::Sampler::new(sampling).map_err(|e| {
        let msg = e.to_string();
        let field = ["temperature", "top-p", "top-k", "repetition penalty"]
            .into_iter()
            .find(|f| msg.contains(f))
            .unwrap_or("sampling");
        ApiError::bad(msg).param(&field.replace(['-', ' '], "_"))
    })?;
    Ok(Chat {
        image,
        history,
        question,
        opts: GenerateOptions { max_new_tokens: max_tokens as usize, sampling, logprobs: top_logprobs },
        stream: req.stream,
        include_usage: req.stream_options.is_some_and(|o| o.include_usage),
    })
}

/// A conversation taken apart: the image, the completed (user, assistant) turns, the last question.
type Conversation = (String, Vec<(String, String)>, String);

/// The image, the completed turns and the last question of `messages`.
fn conversation(messages: &[Message]) -> Result<Conversation, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::bad("messages: at least one user message is required").param("messages"));
    }
    let mut image = None;
    let mut turns: Vec<String> = Vec::with_capacity(messages.len());
    for (i, m) in messages.iter().enumerate() {
        let field = format!("messages[{i}]");
        let want = if i % 2 == 0 { Role::User } else { Role::Assistant };
        if m.role != want {
            let why = match m.role {
                Role::System | Role::Developer => {
                    "the system prompt is the model's own and cannot be replaced".to_string()
                }
                Role::Tool => "tools are not supported".to_string(),
                _ => format!(
                    "expected {} (user and assistant turns alternate, starting and ending with the user)",
                    want.name()
                ),
            };
            return Err(ApiError::bad(format!("{field}: role {}: {why}", m.role.name())).param(&field));
        }
        let mut text = String::new();
        match &m.content {
            Some(Content::Text(s)) => text.push_str(s),
            Some(Content::Parts(parts)) => {
                for p in parts {
                    match p {
                        Part::Text { text: t } => text.push_str(t),
                        Part::ImageUrl { image_url } if i == 0 && image.is_none() => {
                            image = Some(match image_url {
                                ImageUrl::Object { url } | ImageUrl::Plain(url) => url.clone(),
                            })
                        }
                        Part::ImageUrl { .. } => {
                            return Err(ApiError::bad(format!(
                                "{field}: one image per conversation, in the first user message"
                            ))
                            .param(&field))
                        }
                    }
                }
            }
            None => {}
        }
        if text.trim().is_empty() {
            return Err(ApiError::bad(format!("{field}: the message has no text")).param(&field));
        }
        turns.push(text);
    }
    if turns.len().is_multiple_of(2) {
        return Err(ApiError::bad("messages: the last message must be the user's").param("messages"));
    }
    let image = image.ok_or_else(|| {
        ApiError::bad("messages[0]: the first user message needs an image_url part (a base64 data URL)")
            .param("messages[0]")
    })?;
    let question = turns.pop().unwrap_or_default();
    let history = turns
        .chunks(2)
        .enumerate()
        .map(|(k, p)| (if k == 0 { qadapt_core::template::user_turn(&p[0]) } else { p[0].clone() }, p[1].clone()))
        .collect();
    Ok((image, history, question))
}

/// `finish_reason` of an answer.
pub(crate) fn finish_reason(a: &AnswerJson, max: usize) -> &'static str {
    if a.token_ids.len() >= max {
        "length"
    } else {
        "stop"
    }
}

/// OpenAI's `logprobs.content` entries.
pub(crate) fn logprobs_json(lp: &[TokenLogprob]) -> Value {
    let entry = |t: &str, l: f32| json!({"token": t, "logprob": l, "bytes": t.as_bytes()});
    json!({"content": lp.iter().map(|t| {
        let mut e = entry(&t.token, t.logprob);
        e["top_logprobs"] = t.top.iter().map(|(_, s, l)| entry(s, *l)).collect();
        e
    }).collect::<Vec<_>>()})
}

/// `usage` of an answer to a prompt of `prompt_tokens` (the image's rows included).
pub(crate) fn usage(prompt_tokens: usize, a: &AnswerJson) -> Value {
    let n = a.token_ids.len();
    json!({"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: Value) -> Result<Chat, ApiError> {
        parse_chat(
            v.to_string().as_bytes(),
            &Config { max_new_tokens: 64, max_prompt_bytes: 1000, ..Config::default() },
        )
    }

    fn user(text: &str) -> Value {
        json!({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}, {"type": "text", "text": text}]})
    }

    #[test]
    fn wrong_types_and_unsupported_fields_name_the_field() {
        let cases = [
            (json!({"messages": [user("q")], "max_tokens": "10"}), "max_tokens"),
            (json!({"messages": [user("q")], "temperature": "hot"}), "temperature"),
            (json!({"messages": [user("q")], "temperature": 1e-40}), "temperature"),
            (json!({"messages": [user("q")], "n": 2}), "n"),
            (json!({"messages": [user("q")], "tools": [{"type": "function"}]}), "tools"),
            (json!({"messages": [user("q")], "max_tokens": 0}), "max_tokens"),
            (json!({"messages": [user("q")], "max_tokens": 65}), "max_tokens"),
            (json!({"messages": [user("q")], "top_logprobs": 3}), "top_logprobs"),
            (json!({"messages": [{"role": "system", "content": "be nice"}, user("q")]}), "messages[0]"),
            (json!({"messages": [{"role": "user", "content": 5}]}), "messages[0].content"),
            (json!({"messages": [user("q"), {"role": "assistant", "content": "a"}]}), "messages"),
            (json!({"messages": [user(&"x".repeat(1001))]}), "messages"),
            (json!({"messages": "hi"}), "messages"),
        ];
        for (body, field) in cases {
            let e = parse(body.clone()).err().unwrap_or_else(|| panic!("accepted {body}"));
            assert_eq!(e.status, 400);
            assert_eq!(e.param.as_deref(), Some(field), "{body}: {}", e.message);
            assert!(e.message.contains(field), "{}", e.message);
        }
    }

    #[test]
    fn multi_turn_keeps_the_image_in_the_first_turn() {
        let c = parse(json!({"messages": [user("Describe it."), {"role": "assistant", "content": "Blurry."}, {"role": "user", "content": "Why?"}], "logprobs": true, "top_logprobs": 2})).unwrap();
        assert_eq!(c.history, vec![("<image>\nDescribe it.".to_string(), "Blurry.".to_string())]);
        assert_eq!(c.question, "Why?");
        assert_eq!(c.opts.logprobs, Some(2));
        assert_eq!(c.opts.max_new_tokens, 64);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 2000, failure_persistence: None, ..Default::default() })]

        /// Any JSON in a request's place, or a valid request with fields replaced by any JSON:
        /// parsed or refused with a 4xx naming something, never a panic.
        #[test]
        fn any_json_parses_or_is_a_400(v in qadapt_core::testing::json_value(), m in qadapt_core::testing::mutated(
            json!({"messages": [user("q"), {"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}], "max_tokens": 8, "temperature": 0.5, "logprobs": true, "top_logprobs": 2}),
            &["/messages", "/messages/0", "/messages/0/content", "/messages/0/content/0", "/messages/0/content/0/image_url", "/messages/1/role", "/messages/2/content", "/max_tokens", "/temperature", "/top_logprobs", "/logprobs"],
        )) {
            for body in [v, m] {
                match parse(body) {
                    Ok(c) => proptest::prop_assert!(c.opts.max_new_tokens >= 1 && c.opts.max_new_tokens <= 64),
                    Err(e) => proptest::prop_assert!(e.status == 400 && !e.message.is_empty()),
                }
            }
        }
    }
}
