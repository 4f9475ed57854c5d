//! Next-token choice (greedy, or temperature / top-k / top-p with a seeded RNG) and the Q-Align
//! 1–5 quality score (DESIGN §5). Plain `f32` slices in, so every backend shares them.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::tokenizer::TextTokenizer;
use crate::{Error, Result};

/// The five rating words and their scores, best first.
pub const LEVELS: [(&str, f32); 5] = [("excellent", 5.0), ("good", 4.0), ("fair", 3.0), ("poor", 2.0), ("bad", 1.0)];

/// First BPE token of `" excellent"`, `" good"`, … — what Q-Align reads the logits of.
pub fn level_token_ids(tok: &TextTokenizer) -> Result<[u32; 5]> {
    let mut ids = [0u32; 5];
    for (slot, (word, _)) in ids.iter_mut().zip(LEVELS) {
        *slot = *tok
            .encode(&format!(" {word}"))?
            .first()
            .ok_or_else(|| Error::Prompt(format!("the tokenizer gives no token for \" {word}\"")))?;
    }
    Ok(ids)
}

/// Probabilities of the five levels, in `LEVELS` order.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LevelProbs {
    pub excellent: f32,
    pub good: f32,
    pub fair: f32,
    pub poor: f32,
    pub bad: f32,
}

impl LevelProbs {
    /// As an array in `LEVELS` order.
    pub fn to_array(self) -> [f32; 5] {
        [self.excellent, self.good, self.fair, self.poor, self.bad]
    }
}

/// Q-Align: softmax over the five level logits, score = Σ pᵢ·[5,4,3,2,1].
pub fn quality_score(level_logits: [f32; 5]) -> (f32, LevelProbs) {
    let max = level_logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exp: Vec<f64> = level_logits.iter().map(|&l| ((l - max) as f64).exp()).collect();
    let sum: f64 = exp.iter().sum();
    let p: Vec<f32> = exp.iter().map(|e| (e / sum) as f32).collect();
    let score = p.iter().zip(LEVELS).map(|(p, (_, s))| p * s).sum();
    (score, LevelProbs { excellent: p[0], good: p[1], fair: p[2], poor: p[3], bad: p[4] })
}

/// What `--json` prints: `{"answer", "token_ids", "score", "level_probs"}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AnswerJson {
    pub answer: String,
    pub token_ids: Vec<u32>,
    pub score: Option<f32>,
    pub level_probs: Option<LevelProbs>,
    /// Each answer token's log-probability (and the likeliest alternatives), when asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<Vec<TokenLogprob>>,
}

/// One generated token's log-probability under the model (log-softmax of its raw logits over the
/// full vocabulary, before temperature and penalties), with the `top` likeliest tokens there.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenLogprob {
    /// The token's id.
    pub id: u32,
    /// The token's text (bytes of a split character are replaced by U+FFFD).
    pub token: String,
    /// Its log-probability.
    pub logprob: f32,
    /// The likeliest tokens at this step, most likely first: (id, text, log-probability).
    pub top: Vec<(u32, String, f32)>,
}

/// The smallest temperature accepted: below it softmax(logits / T) overflows to NaN; use 0 (greedy).
pub const MIN_TEMPERATURE: f32 = 1e-3;

/// Sampling settings; greedy when `temperature` is `None` or 0.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct SamplingParams {
    pub temperature: Option<f32>,
    pub top_k: Option<usize>,
    pub top_p: Option<f32>,
    pub seed: u64,
    /// HF's repetition penalty (> 0; 1 = none): logits of every token already generated are divided
    /// by it when positive and multiplied by it when negative. The prompt is not penalised: Bunny
    /// generates from `inputs_embeds`, so HF's logits processors see only the new tokens.
    pub repetition_penalty: Option<f32>,
}

/// Generation settings, one type for the candle engine, the ONNX runtime and the server.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GenerateOptions {
    /// Most tokens generated (fewer when the model's positions run out first).
    pub max_new_tokens: usize,
    /// Greedy or sampled, and the repetition penalty.
    pub sampling: SamplingParams,
    /// `Some(n)`: each answer token's log-probability with the `n` likeliest alternatives.
    pub logprobs: Option<usize>,
}

impl Default for GenerateOptions {
    /// 256 new tokens, greedy, no log-probabilities (the command lines' defaults).
    fn default() -> Self {
        Self { max_new_tokens: 256, sampling: SamplingParams::default(), logprobs: None }
    }
}

/// Picks next tokens from logits; owns the RNG so that one seed gives one text.
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// Tokens the repetition penalty applies to (prompt and answer so far), when one is set.
    seen: std::collections::HashSet<u32>,
}

impl Sampler {
    /// Checks the parameters and seeds the RNG.
    pub fn new(params: SamplingParams) -> Result<Self> {
        if let Some(t) = params.temperature {
            if !(t == 0.0 || (t >= MIN_TEMPERATURE && t.is_finite())) {
                return Err(Error::Sampling(format!(
                    "temperature must be 0 (greedy) or between {MIN_TEMPERATURE} and any finite value, got {t}"
                )));
            }
        }
        if let Some(p) = params.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(Error::Sampling(format!("top-p must be in (0, 1], got {p}")));
            }
        }
        if params.top_k == Some(0) {
            return Err(Error::Sampling("top-k must be ≥ 1".into()));
        }
        if let Some(r) = params.repetition_penalty {
            if !(r > 0.0 && r.is_finite()) {
                return Err(Error::Sampling(format!("repetition penalty must be > 0, got {r}")));
            }
        }
        Ok(Self { params, rng: StdRng::seed_from_u64(params.seed), seen: Default::default() })
    }

    /// Records tokens the repetition penalty applies to ([`Sampler::next`] adds each chosen token).
    pub fn observe(&mut self, ids: &[u32]) {
        if self.params.repetition_penalty.is_some() {
            self.seen.extend(ids.iter().copied());
        }
    }

    /// The next token id for one row of logits, after the repetition penalty.
    pub fn next(&mut self, logits: &[f32]) -> u32 {
        let id = match self.params.repetition_penalty {
            Some(r) if r != 1.0 && !self.seen.is_empty() => {
                let mut l = logits.to_vec();
                for &i in &self.seen {
                    if let Some(v) = l.get_mut(i as usize) {
                        *v = if *v > 0.0 { *v / r } else { *v * r };
                    }
                }
                self.pick(&l)
            }
            _ => self.pick(logits),
        };
        self.observe(&[id]);
        id
    }

    /// Temperature, top-k and top-p over one row of logits (the full padded vocabulary).
    fn pick(&mut self, logits: &[f32]) -> u32 {
        let t = match self.params.temperature {
            Some(t) if t > 0.0 => t,
            _ => return argmax(logits),
        };
        let mut cand: Vec<(u32, f32)> = logits.iter().enumerate().map(|(i, &l)| (i as u32, l / t)).collect();
        cand.sort_by(|a, b| b.1.total_cmp(&a.1));
        if let Some(k) = self.params.top_k {
            cand.truncate(k.max(1));
        }
        let max = cand[0].1;
        let mut probs: Vec<f64> = cand.iter().map(|&(_, l)| ((l - max) as f64).exp()).collect();
        let sum: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= sum);
        if let Some(top_p) = self.params.top_p {
            // Keep the smallest prefix whose mass reaches top_p (always at least one token).
            let mut acc = 0.0;
            let keep = probs.iter().position(|p| {
                acc += p;
                acc >= top_p as f64
            });
            let keep = keep.map_or(probs.len(), |i| i + 1);
            probs.truncate(keep);
            let s: f64 = probs.iter().sum();
            probs.iter_mut().for_each(|p| *p /= s);
        }
        let mut u: f64 = self.rng.random();
        for (i, p) in probs.iter().enumerate() {
            if u < *p {
                return cand[i].0;
            }
            u -= p;
        }
        cand[probs.len() - 1].0
    }
}

/// One sequence's decoding state: the tokens chosen so far and how much of their text was handed
/// out. The single-sequence loop ([`decode_loop`]) and the runtime's batched loop both drive it, so
/// a row of a batch stops and streams exactly as a lone sequence does.
pub struct Decoding {
    ids: Vec<u32>,
    shown: usize,
    budget: usize,
    done: bool,
    /// `Some(n)`: record each token's log-probability and the `n` likeliest alternatives.
    top_logprobs: Option<usize>,
    logprobs: Vec<TokenLogprob>,
}

impl Decoding {
    /// A sequence that may grow by at most `budget` tokens.
    pub fn new(budget: usize) -> Self {
        Self { ids: Vec::new(), shown: 0, budget, done: budget == 0, top_logprobs: None, logprobs: Vec::new() }
    }

    /// Also records each token's log-probability with the `top` likeliest alternatives
    /// ([`AnswerJson::logprobs`]).
    pub fn with_logprobs(mut self, top: usize) -> Self {
        self.top_logprobs = Some(top);
        self
    }

    /// Whether the sequence has stopped (end of text or budget spent).
    pub fn done(&self) -> bool {
        self.done
    }

    /// Ends the sequence now (its reader went away); [`Decoding::finish`] still returns what it has.
    pub fn stop(&mut self) {
        self.done = true;
    }

    /// Picks the next token from `logits` and hands new text to `on_text` (only once it is valid
    /// UTF-8: byte-level BPE may split a character). Returns the token when the model must be
    /// stepped with it, `None` once the sequence has stopped.
    pub fn advance(
        &mut self,
        sampler: &mut Sampler,
        tokenizer: &TextTokenizer,
        eos: u32,
        logits: &[f32],
        mut on_text: impl FnMut(&str),
    ) -> Result<Option<u32>> {
        if self.done {
            return Ok(None);
        }
        let next = sampler.next(logits);
        if next == eos {
            self.done = true;
            return Ok(None);
        }
        self.ids.push(next);
        if let Some(n) = self.top_logprobs {
            self.logprobs.push(token_logprob(tokenizer, logits, next, n)?);
        }
        let text = tokenizer.decode(&self.ids)?;
        if !text.ends_with('\u{FFFD}') && text.len() > self.shown {
            on_text(&text[self.shown..]);
            self.shown = text.len();
        }
        self.done = self.ids.len() >= self.budget;
        Ok(if self.done { None } else { Some(next) })
    }

    /// The answer, flushing any text not yet handed out.
    pub fn finish(self, tokenizer: &TextTokenizer, mut on_text: impl FnMut(&str)) -> Result<AnswerJson> {
        let answer = tokenizer.decode(&self.ids)?;
        if answer.len() > self.shown {
            on_text(&answer[self.shown..]);
        }
        let logprobs = self.top_logprobs.map(|_| self.logprobs);
        Ok(AnswerJson { answer, token_ids: self.ids, score: None, level_probs: None, logprobs })
    }
}

/// [`TokenLogprob`] of `id` in one row of logits, with the `top` likeliest tokens.
fn token_logprob(tokenizer: &TextTokenizer, logits: &[f32], id: u32, top: usize) -> Result<TokenLogprob> {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
    let lse = max + logits.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln();
    let lp = |i: u32| logits.get(i as usize).map_or(f32::NEG_INFINITY, |&x| (x as f64 - lse) as f32);
    let mut order: Vec<u32> = (0..logits.len() as u32).collect();
    let n = top.min(order.len());
    if n > 0 {
        order.select_nth_unstable_by(n - 1, |&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
    }
    order.truncate(n);
    order.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
    let text = |i: u32| tokenizer.decode(&[i]);
    Ok(TokenLogprob {
        id,
        token: text(id)?,
        logprob: lp(id),
        top: order.into_iter().map(|i| Ok((i, text(i)?, lp(i)))).collect::<Result<_>>()?,
    })
}

/// The decoding loop shared by the candle engine and the ONNX runtime: picks a token from `logits`,
/// stops at `eos` or after `budget` tokens, hands the answer to `on_text` as it grows, and asks
/// `step` for the logits after each new token (not after the last). With `logprobs`, each token's
/// log-probability and its `n` likeliest alternatives are recorded.
#[allow(clippy::too_many_arguments)]
pub fn decode_loop<E: From<Error>>(
    sampler: &mut Sampler,
    tokenizer: &TextTokenizer,
    eos: u32,
    budget: usize,
    logprobs: Option<usize>,
    mut logits: Vec<f32>,
    mut step: impl FnMut(u32) -> std::result::Result<Vec<f32>, E>,
    mut on_text: impl FnMut(&str),
) -> std::result::Result<AnswerJson, E> {
    let mut seq = Decoding::new(budget);
    if let Some(n) = logprobs {
        seq = seq.with_logprobs(n);
    }
    while let Some(next) = seq.advance(sampler, tokenizer, eos, &logits, &mut on_text)? {
        logits = step(next)?;
    }
    Ok(seq.finish(tokenizer, on_text)?)
}

/// Log-softmax of one row of logits at `id`.
pub fn log_prob(logits: &[f32], id: u32) -> f64 {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
    let lse = max + logits.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln();
    logits.get(id as usize).map_or(f64::NEG_INFINITY, |&x| x as f64 - lse)
}

/// What both binaries print for `--score`: the JSON object with `--json`, else [`score_line`].
pub fn score_output(res: &AnswerJson, json: bool) -> String {
    if json {
        serde_json::to_string(res).unwrap_or_default()
    } else {
        score_line(res)
    }
}

/// The `--score` line both binaries print: the score and each level's probability.
pub fn score_line(res: &AnswerJson) -> String {
    let probs = res.level_probs.map(|p| p.to_array()).unwrap_or_default();
    let levels: Vec<String> = LEVELS.iter().zip(probs).map(|((w, _), p)| format!("{w} {p:.3}")).collect();
    format!("score {:.4}  ({})", res.score.unwrap_or(f32::NAN), levels.join(", "))
}

/// Index of the largest logit; the first one wins ties, as torch.argmax does.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repetition_penalty_as_hf() {
        let mut s = Sampler::new(SamplingParams { repetition_penalty: Some(3.0), ..Default::default() }).unwrap();
        s.observe(&[0]);
        // 2.0 / 3 < 1.0: the seen token loses its lead; -1.0 · 3 < -2.0 for negative logits.
        assert_eq!(s.next(&[2.0, 1.0, -5.0]), 1);
        let mut s = Sampler::new(SamplingParams { repetition_penalty: Some(3.0), ..Default::default() }).unwrap();
        s.observe(&[0]);
        assert_eq!(s.next(&[-1.0, -2.0, -9.0]), 1);
        // The chosen token is penalised next time: 1.5 / 3 < 1.0.
        assert_eq!(s.next(&[-9.0, 1.5, 1.0]), 2);
        let mut plain = Sampler::new(SamplingParams::default()).unwrap();
        plain.observe(&[0]);
        assert_eq!(plain.next(&[2.0, 1.0]), 0, "no penalty set: observed tokens are not touched");
    }

    #[test]
    fn score_of_certain_levels() {
        let (s, p) = quality_score([0.0, 0.0, 0.0, 0.0, 0.0]);
        assert!((s - 3.0).abs() < 1e-6 && (p.good - 0.2).abs() < 1e-6);
        let (s, _) = quality_score([100.0, 0.0, 0.0, 0.0, 0.0]);
        assert!((s - 5.0).abs() < 1e-4);
    }

    #[test]
    fn same_seed_same_tokens_and_top_k_one_is_greedy() {
        let logits: Vec<f32> = (0..50).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
        let p =
            SamplingParams { temperature: Some(1.0), top_k: None, top_p: Some(0.9), seed: 7, repetition_penalty: None };
        let a: Vec<u32> = {
            let mut s = Sampler::new(p).unwrap();
            (0..20).map(|_| s.next(&logits)).collect()
        };
        let b: Vec<u32> = {
            let mut s = Sampler::new(p).unwrap();
            (0..20).map(|_| s.next(&logits)).collect()
        };
        assert_eq!(a, b);
        assert!(a.iter().any(|&x| x != a[0]), "sampling at T=1 should vary: {a:?}");
        let mut g = Sampler::new(SamplingParams { top_k: Some(1), ..p }).unwrap();
        assert_eq!(g.next(&logits), argmax(&logits));
    }

    #[test]
    fn bad_params_are_errors() {
        assert!(Sampler::new(SamplingParams { top_p: Some(0.0), ..Default::default() }).is_err());
        assert!(Sampler::new(SamplingParams { temperature: Some(-1.0), ..Default::default() }).is_err());
        // 1e-40 would pass a "≥ 0" check and give NaN probabilities.
        assert!(Sampler::new(SamplingParams { temperature: Some(1e-40), ..Default::default() }).is_err());
        assert!(Sampler::new(SamplingParams { temperature: Some(0.0), ..Default::default() }).is_ok());
        assert!(Sampler::new(SamplingParams { temperature: Some(MIN_TEMPERATURE), ..Default::default() }).is_ok());
        assert!(Sampler::new(SamplingParams { repetition_penalty: Some(0.0), ..Default::default() }).is_err());
    }
}
