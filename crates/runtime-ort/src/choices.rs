//! Multiple choice by likelihood: each option scored as the complete answer, all continuing one
//! prefill.

use image::RgbImage;
use qadapt_core::sampling::log_prob;
use qadapt_core::tokenizer::END_OF_TEXT;

use crate::model::Runtime;
use crate::{Result, RunError};

/// One option of [`Runtime::choices`] with its likelihood as the complete answer.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Choice {
    /// The option text.
    pub option: String,
    /// Σ log p over the option's tokens and the closing `<|endoftext|>`.
    pub log_prob: f64,
    /// Tokens scored (the option's and `<|endoftext|>`).
    pub tokens: usize,
    /// Mean negative log-likelihood per token: the "option loss" the choice is made by.
    pub loss: f64,
}

impl Runtime {
    /// Multiple choice by likelihood: each option scored as the complete answer to `question`
    /// (its tokens as training renders an answer, `" {option}<|endoftext|>"`), all continuing one
    /// prefill. The best option has the lowest loss (mean negative log-likelihood per token).
    pub fn choices(&mut self, img: &RgbImage, question: &str, options: &[&str]) -> Result<Vec<Choice>> {
        if options.is_empty() {
            return Err(RunError::Input("no options to choose from".into()));
        }
        let tokenized = options
            .iter()
            .map(|o| Ok(self.tokenizer.encode(&format!(" {o}{END_OF_TEXT}"))?))
            .collect::<Result<Vec<_>>>()?;
        let room = tokenized.iter().map(Vec::len).max().unwrap_or(0);
        let (first, cache) = self.prefill(&[img], question, None, room)?;
        let mut out = Vec::with_capacity(options.len());
        for (opt, ids) in options.iter().zip(tokenized) {
            if cache.len + ids.len() > self.manifest.decoder.max_positions {
                return Err(RunError::Input(format!("option {opt:?} does not fit in the model's positions")));
            }
            let mut lp = log_prob(&first, ids[0]);
            if ids.len() > 1 {
                let e = self.embed(&ids[..ids.len() - 1], 1)?;
                // On a fused export each option overwrites the slots after the prompt.
                let (logits, _) = if self.fused {
                    self.step_fused(e, &cache, &[ids.len() - 1], true)?
                } else {
                    self.step(e, &cache, true)?
                };
                let v = logits.len() / (ids.len() - 1);
                lp +=
                    ids[1..].iter().enumerate().map(|(i, &id)| log_prob(&logits[i * v..(i + 1) * v], id)).sum::<f64>();
            }
            out.push(Choice { option: opt.to_string(), log_prob: lp, tokens: ids.len(), loss: -lp / ids.len() as f64 });
        }
        Ok(out)
    }

    /// The index of the best choice (lowest loss; the first wins ties).
    pub fn best_choice(choices: &[Choice]) -> usize {
        qadapt_core::qbench::best_choice(&choices.iter().map(|c| c.loss).collect::<Vec<_>>())
    }
}
