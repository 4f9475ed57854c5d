//! Inference in candle: prompt building, image-feature splicing, the KV-cached generation loop and
//! Q-Align scoring. The ONNX runtime mirrors this loop with the same `qadapt-core` pieces.

use std::path::Path;

use candle_core::{DType, Device, IndexOp, Tensor};
use image::RgbImage;
use qadapt_core::image::{pixel_values, PreprocessConfig};
use qadapt_core::qbench::{self, ChooseBy, QBenchRow};
use qadapt_core::sampling::{
    decode_loop, level_token_ids, log_prob, quality_score, AnswerJson, GenerateOptions, LevelProbs, Sampler, LEVELS,
};
use qadapt_core::template::{self, PromptIds};
use qadapt_core::{QFormerTokenizer, TextTokenizer};

use crate::bunny::{Bunny, ImageFeatures, QFormerText};
use crate::ops::Candle;
use crate::phi::KvPair;
use crate::{Error, Result};

/// A loaded model with its tokenizers and preprocessing, ready to answer.
pub struct Engine {
    pub model: Bunny,
    pub tokenizer: TextTokenizer,
    pub qformer_tokenizer: Option<QFormerTokenizer>,
    pub preprocess: PreprocessConfig,
    /// First tokens of the five Q-Align level words, fixed by the tokenizer.
    level_ids: [u32; 5],
    ops: Candle,
}

impl Engine {
    /// Loads model (with an optional adapter merged), tokenizers and preprocessing settings from a
    /// hub model directory.
    pub fn load(dir: &Path, adapter: Option<&Path>, device: &Device, dtype: DType) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::Checkpoint { path: dir.to_path_buf(), msg: "model directory not found".into() });
        }
        let model = Bunny::load(dir, adapter, device, dtype)?;
        let tokenizer = TextTokenizer::from_dir(dir)?;
        let qformer_tokenizer = match &model.config.qformer_config {
            Some(q) if model.is_qadapt() => Some(QFormerTokenizer::from_dir(dir, q.max_text_length)?),
            _ => None,
        };
        let v = &model.config.vision_config;
        let preprocess = PreprocessConfig { image_size: v.image_size as u32, mean: v.image_mean, std: v.image_std };
        let level_ids = level_token_ids(&tokenizer)?;
        Ok(Self { model, tokenizer, qformer_tokenizer, preprocess, level_ids, ops: Candle::new(device.clone(), dtype) })
    }

    fn device(&self) -> &Device {
        &self.ops.device
    }

    /// pixel_values [1, 3, S, S] of an image.
    pub fn pixel_values(&self, img: &RgbImage) -> Result<Tensor> {
        let s = self.preprocess.image_size as usize;
        let px = pixel_values(img, &self.preprocess);
        Ok(Tensor::from_vec(px, (1, 3, s, s), self.device())?.to_dtype(self.ops.dtype)?)
    }

    /// The Q-Former's ids and mask [1, T] for a question (Q-Adapt only).
    pub fn qformer_inputs(&self, question: &str) -> Result<Option<(Tensor, Tensor)>> {
        let Some(qt) = &self.qformer_tokenizer else { return Ok(None) };
        let ids: Vec<i64> = qt.encode(&template::qformer_text(question))?.into_iter().map(i64::from).collect();
        let n = ids.len();
        let ids = Tensor::from_vec(ids, (1, n), self.device())?;
        let mask = Tensor::ones((1, n), DType::I64, self.device())?;
        Ok(Some((ids, mask)))
    }

    /// All stages of the visual features for an image and the question it is asked with.
    pub fn image_features(&self, pixels: &Tensor, question: &str) -> Result<ImageFeatures<Tensor>> {
        let q = self.qformer_inputs(question)?;
        let text = q.as_ref().map(|(ids, mask)| QFormerText { input_ids: ids, attention_mask: mask });
        self.model.image_features(&mut self.ops.clone(), pixels, text)
    }

    /// Prompt ids of a question, `answer_prefix` begun in the assistant turn.
    pub fn prompt_ids(&self, question: &str, answer_prefix: Option<&str>) -> Result<PromptIds> {
        let text = template::prompt(&template::user_turn(question), answer_prefix);
        Ok(template::tokenize_prompt(&self.tokenizer, &text)?)
    }

    /// Text embeddings with the image features spliced in at the `<image>` position → [1, L, D].
    pub fn splice(&self, prompt: &PromptIds, image: &Tensor) -> Result<Tensor> {
        let mut o = self.ops.clone();
        let embed = |o: &mut Candle, ids: &[u32]| -> Result<Tensor> {
            let t = Tensor::new(ids, self.device())?.unsqueeze(0)?;
            self.model.llm.embed(o, &t)
        };
        let mut parts = Vec::new();
        let split = prompt.image_pos.unwrap_or(prompt.ids.len());
        if split > 0 {
            parts.push(embed(&mut o, &prompt.ids[..split])?);
        }
        if prompt.image_pos.is_some() {
            parts.push(image.clone());
        }
        if split < prompt.ids.len() {
            parts.push(embed(&mut o, &prompt.ids[split..])?);
        }
        Ok(Tensor::cat(&parts, 1)?)
    }

    fn check_length(&self, len: usize) -> Result<()> {
        let max = self.model.config.max_position_embeddings;
        if len >= max {
            return Err(Error::Input(format!(
                "the prompt is {len} tokens with the image; the model takes at most {max} (max_position_embeddings)"
            )));
        }
        Ok(())
    }

    /// Logits [V] of the first generated position for a question (and answer prefix).
    pub fn first_step_logits(&self, img: &RgbImage, question: &str, answer_prefix: Option<&str>) -> Result<Vec<f32>> {
        let pixels = self.pixel_values(img)?;
        let feats = self.image_features(&pixels, question)?;
        let prompt = self.prompt_ids(question, answer_prefix)?;
        let embeds = self.splice(&prompt, &feats.projected)?;
        let (logits, _) = self.prefill(&embeds)?;
        Ok(logits)
    }

    fn prefill(&self, embeds: &Tensor) -> Result<(Vec<f32>, Vec<KvPair<Tensor>>)> {
        let len = embeds.dim(1)?;
        self.check_length(len)?;
        let mask = Tensor::ones((1, len), DType::I64, self.device())?;
        let pos = Tensor::arange(0i64, len as i64, self.device())?.unsqueeze(0)?;
        let (logits, present) = self.model.llm.forward(&mut self.ops.clone(), embeds, &mask, &pos, None, None)?;
        let last = logits.i((0, len - 1))?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        Ok((last, present))
    }

    /// Answers a question about an image; `on_text` receives the answer text as it grows.
    pub fn generate(
        &self,
        img: &RgbImage,
        question: &str,
        opts: &GenerateOptions,
        mut on_text: impl FnMut(&str),
    ) -> Result<AnswerJson> {
        let mut sampler = Sampler::new(opts.sampling)?;
        let pixels = self.pixel_values(img)?;
        let feats = self.image_features(&pixels, question)?;
        let prompt = self.prompt_ids(question, None)?;
        let embeds = self.splice(&prompt, &feats.projected)?;
        let mut len = embeds.dim(1)?;
        let (logits, mut past) = self.prefill(&embeds)?;
        let budget = opts.max_new_tokens.min(self.model.config.max_position_embeddings - len);
        let step = |next: u32| -> Result<Vec<f32>> {
            let t = Tensor::new(&[next], self.device())?.unsqueeze(0)?;
            let e = self.model.llm.embed(&mut self.ops.clone(), &t)?;
            let mask = Tensor::ones((1, len + 1), DType::I64, self.device())?;
            let pos = Tensor::new(&[len as i64], self.device())?.unsqueeze(0)?;
            let (l, present) = self.model.llm.forward(&mut self.ops.clone(), &e, &mask, &pos, Some(&past), None)?;
            past = present;
            len += 1;
            Ok(l.i((0, 0))?.to_dtype(DType::F32)?.to_vec1::<f32>()?)
        };
        decode_loop(
            &mut sampler,
            &self.tokenizer,
            self.model.config.eos_token_id,
            budget,
            opts.logprobs,
            logits,
            step,
            &mut on_text,
        )
    }

    /// The loss (mean negative log-likelihood per token) of each option as the whole answer
    /// (` option<|endoftext|>`): what `qadapt-run`'s `choices` computes, so both choose alike.
    pub fn option_losses(&self, img: &RgbImage, question: &str, options: &[&str]) -> Result<Vec<f64>> {
        let pixels = self.pixel_values(img)?;
        let feats = self.image_features(&pixels, question)?;
        let prompt = self.prompt_ids(question, None)?;
        let embeds = self.splice(&prompt, &feats.projected)?;
        let len = embeds.dim(1)?;
        let (first, past) = self.prefill(&embeds)?;
        let mut out = Vec::with_capacity(options.len());
        for opt in options {
            let ids = self.tokenizer.encode(&format!(" {opt}{}", qadapt_core::tokenizer::END_OF_TEXT))?;
            self.check_length(len + ids.len())?;
            let mut lp = log_prob(&first, ids[0]);
            if ids.len() > 1 {
                let k = ids.len() - 1;
                let t = Tensor::new(&ids[..k], self.device())?.unsqueeze(0)?;
                let e = self.model.llm.embed(&mut self.ops.clone(), &t)?;
                let mask = Tensor::ones((1, len + k), DType::I64, self.device())?;
                let pos = Tensor::arange(len as i64, (len + k) as i64, self.device())?.unsqueeze(0)?;
                let (l, _) = self.model.llm.forward(&mut self.ops.clone(), &e, &mask, &pos, Some(&past), None)?;
                let rows = l.i(0)?.to_dtype(DType::F32)?.to_vec2::<f32>()?;
                lp += ids[1..].iter().zip(&rows).map(|(&id, row)| log_prob(row, id)).sum::<f64>();
            }
            out.push(-lp / ids.len() as f64);
        }
        Ok(out)
    }

    /// Q-Bench A1 by generation and by likelihood, with the protocol of `qadapt_core::qbench` that
    /// `qadapt-run eval` follows too; images under `images`. A row whose image cannot be read is
    /// listed in `failed`, not counted. `tick` after each row.
    pub fn qbench(&self, rows: &[QBenchRow], images: &Path, tick: &mut dyn FnMut()) -> Result<Vec<qbench::Report>> {
        let (mut gen, mut lik) = (qbench::Report::new(ChooseBy::Generate), qbench::Report::new(ChooseBy::Likelihood));
        let opts = GenerateOptions { max_new_tokens: 16, ..Default::default() };
        for row in rows {
            let path = images.join(&row.img_path);
            let img = match qadapt_core::image::load_image(&path) {
                Ok(img) => img,
                Err(e) => {
                    gen.failed.push(format!("{}: {e}", path.display()));
                    lik.failed.push(format!("{}: {e}", path.display()));
                    tick();
                    continue;
                }
            };
            let prompt = row.prompt();
            let out = self.generate(&img, &prompt, &opts, |_| {})?;
            let pick = qbench::parse_choice(&out.answer, &row.candidates);
            gen.add(row, out.answer, pick);
            let letters = row.letter_answers();
            let refs: Vec<&str> = letters.iter().map(String::as_str).collect();
            let losses = self.option_losses(&img, &prompt, &refs)?;
            let best = qbench::best_choice(&losses);
            lik.add(row, letters[best].clone(), Some(best));
            tick();
        }
        Ok(vec![gen, lik])
    }

    /// The Q-Align 1–5 score with its level probabilities (DESIGN §5).
    pub fn score(&self, img: &RgbImage) -> Result<(f32, LevelProbs)> {
        let logits = self.first_step_logits(img, template::SCORE_QUESTION, Some(template::SCORE_ANSWER_PREFIX))?;
        let level_logits = self.level_ids.map(|id| logits[id as usize]);
        Ok(quality_score(level_logits))
    }

    /// [`Engine::score`] as the `--json` object: the likeliest level word is the answer.
    pub fn score_json(&self, img: &RgbImage) -> Result<AnswerJson> {
        let (score, probs) = self.score(img)?;
        let arr = probs.to_array();
        let best = (0..5).fold(0, |b, i| if arr[i] > arr[b] { i } else { b });
        Ok(AnswerJson {
            answer: LEVELS[best].0.to_string(),
            token_ids: vec![self.level_ids[best]],
            score: Some(score),
            level_probs: Some(probs),
            logprobs: None,
        })
    }
}
