//! [`Running`]: a decode batch that requests join and leave between steps (continuous batching).
//!
//! New requests are prefilled together (their prompts left-padded to one length) and their cache
//! joined to the running one by `cache_join.onnx`; a finished or cancelled row leaves through
//! `cache_select.onnx`. Both run on the execution provider, so the cache never leaves the device.
//! Without those graphs (older exports) the batch admits nothing once started and finished rows
//! idle until the last one stops.

use std::sync::Arc;

use image::RgbImage;
use qadapt_core::sampling::{AnswerJson, Decoding, GenerateOptions, Sampler};

use crate::{Cache, Request, Result, RunError, Runtime};

struct Row<T> {
    tag: T,
    sampler: Sampler,
    seq: Decoding,
}

/// A running decode batch; `T` tags each row for its caller.
pub struct Running<T> {
    /// `None`: a row that finished while the export cannot drop rows (it idles).
    slots: Vec<Option<Row<T>>>,
    cache: Option<Cache>,
    /// The logits [B·V] each slot samples its next token from.
    logits: Vec<f32>,
}

impl<T> Default for Running<T> {
    fn default() -> Self {
        Self { slots: Vec::new(), cache: None, logits: Vec::new() }
    }
}

impl<T> Running<T> {
    /// Whether no row is decoding.
    pub fn is_empty(&self) -> bool {
        self.slots.iter().all(Option::is_none)
    }

    /// Rows decoding.
    pub fn len(&self) -> usize {
        self.slots.iter().flatten().count()
    }

    /// Positions in the batch's cache, padding included (0 when nothing decodes).
    pub fn cache_len(&self) -> usize {
        self.cache.as_ref().map_or(0, Cache::len)
    }

    /// Prefills `reqs` together and adds them to the batch. Rows already decoding go on from
    /// where they were; the cache of the shorter side is left-padded.
    pub fn admit(&mut self, rt: &mut Runtime, reqs: Vec<(T, Request)>) -> Result<()> {
        if reqs.is_empty() {
            return Ok(());
        }
        if !self.is_empty() && !rt.can_regroup() {
            return Err(RunError::Input(
                "this export has no cache graphs: a running batch cannot admit requests (re-export it)".into(),
            ));
        }
        let prompts = reqs.iter().map(|(_, r)| rt.request_prompt(r)).collect::<Result<Vec<_>>>()?;
        let samplers = reqs.iter().map(|(_, r)| Ok(Sampler::new(r.opts.sampling)?)).collect::<Result<Vec<_>>>()?;
        let imgs: Vec<_> = reqs.iter().map(|(_, r)| r.image).collect();
        // The Q-Former reads the first user turn, as training does.
        let questions: Vec<&str> =
            reqs.iter().map(|(_, r)| r.history.first().map_or(r.question, |(u, _)| u.as_str())).collect();
        let feats = rt.image_features_each(&imgs, &questions)?;
        // A fused export's buffers hold each row's prompt and answer budget.
        let room = reqs.iter().map(|(_, r)| r.opts.max_new_tokens).max().unwrap_or(0);
        let (logits, cache) = rt.prefill_rows(&prompts.iter().collect::<Vec<_>>(), &feats, room)?;
        let (n_img, max_pos) = (rt.manifest.image.tokens, rt.manifest.decoder.max_positions);
        match self.cache.take().filter(|_| !self.is_empty()) {
            None => {
                self.slots.clear();
                self.cache = Some(cache);
                self.logits = logits;
            }
            Some(old) => {
                self.cache = Some(rt.join(&old, &cache)?);
                self.logits.extend(logits);
            }
        }
        for (((tag, r), sampler), p) in reqs.into_iter().zip(samplers).zip(&prompts) {
            // Positions are the row's own (padding is not counted), so its room is its own too.
            let room = max_pos - p.spliced_len(n_img);
            let seq = Decoding::new(r.opts.max_new_tokens.min(room));
            let seq = match r.opts.logprobs {
                Some(n) => seq.with_logprobs(n),
                None => seq,
            };
            self.slots.push(Some(Row { tag, sampler, seq }));
        }
        Ok(())
    }

    /// One token for every row: returns the rows that finished (end of text, budget, or
    /// `cancelled`), which leave the batch, and steps the decoder for the others. `on_text`
    /// receives (tag, new text) as answers grow.
    pub fn step(
        &mut self,
        rt: &mut Runtime,
        mut on_text: impl FnMut(&T, &str),
        cancelled: impl Fn(&T) -> bool,
    ) -> Result<Vec<(T, AnswerJson)>> {
        let b = self.slots.len();
        let Some(cache) = self.cache.take() else { return Ok(Vec::new()) };
        let v = self.logits.len() / b.max(1);
        let (eos, tok) = (rt.manifest.tokens.eos, Arc::clone(&rt.tokenizer));
        let mut next = vec![eos; b];
        let mut going = Vec::with_capacity(b);
        let mut done = Vec::new();
        for (r, slot) in self.slots.iter_mut().enumerate() {
            let Some(row) = slot else { continue };
            if cancelled(&row.tag) {
                row.seq.stop();
            }
            match row
                .seq
                .advance(&mut row.sampler, &tok, eos, &self.logits[r * v..(r + 1) * v], |s| on_text(&row.tag, s))?
            {
                Some(t) => {
                    next[r] = t;
                    going.push(r);
                }
                None => {
                    if let Some(Row { tag, seq, .. }) = slot.take() {
                        let a = seq.finish(&tok, |s| on_text(&tag, s))?;
                        done.push((tag, a));
                    }
                }
            }
        }
        if going.is_empty() {
            self.slots.clear();
            self.logits.clear();
            return Ok(done);
        }
        let (cache, next) = if going.len() < b && rt.can_regroup() {
            let kept = rt.select(&cache, &going)?;
            let mut slots = std::mem::take(&mut self.slots);
            self.slots = going.iter().map(|&r| slots[r].take()).collect();
            (kept, going.iter().map(|&r| next[r]).collect())
        } else {
            (cache, next)
        };
        let (logits, cache) = rt.next_logits(&next, &cache)?;
        self.logits = logits;
        self.cache = Some(cache);
        Ok(done)
    }
}

/// Generation on [`Runtime`], each call one [`Running`] batch that admits every row at once.
impl Runtime {
    /// Answers one question about each image of a batch (see [`Runtime::generate_mixed`]).
    pub fn generate_batch(
        &mut self,
        imgs: &[&RgbImage],
        question: &str,
        opts: &GenerateOptions,
        on_text: impl FnMut(usize, &str),
    ) -> Result<Vec<AnswerJson>> {
        let reqs: Vec<Request> =
            imgs.iter().map(|&image| Request { image, question, history: &[], opts: *opts, cancel: None }).collect();
        self.generate_mixed(&reqs, on_text)
    }

    /// Answers a batch of requests (each its own image, question and settings) decoding all rows
    /// together (a [`Running`] batch admitting them all at once): shorter prompts are left-padded
    /// and masked; a finished row leaves the batch. Every row samples with its own [`Sampler`], so a
    /// row's text is the one a lone run gives. `on_text` receives (row, new text) as answers grow.
    pub fn generate_mixed(
        &mut self,
        reqs: &[Request],
        mut on_text: impl FnMut(usize, &str),
    ) -> Result<Vec<AnswerJson>> {
        if reqs.is_empty() {
            return Err(RunError::Input("no requests".into()));
        }
        let mut run = Running::default();
        run.admit(self, reqs.iter().copied().enumerate().collect())?;
        let mut out: Vec<Option<AnswerJson>> = vec![None; reqs.len()];
        while !run.is_empty() {
            for (r, a) in run.step(
                self,
                |&r, s| on_text(r, s),
                |&r| reqs[r].cancel.is_some_and(|c| c.load(std::sync::atomic::Ordering::Relaxed)),
            )? {
                out[r] = Some(a);
            }
        }
        out.into_iter().map(|a| a.ok_or_else(|| RunError::Input("a row never finished".into()))).collect()
    }

    /// Answers a question about an image; `on_text` receives the answer as it grows.
    pub fn generate(
        &mut self,
        img: &RgbImage,
        question: &str,
        opts: &GenerateOptions,
        mut on_text: impl FnMut(&str),
    ) -> Result<AnswerJson> {
        let mut out = self.generate_batch(&[img], question, opts, |_, s| on_text(s))?;
        Ok(out.remove(0))
    }
}
