//! [`Runtime`]: the five graphs of an export (vision, embed, decoder; `cache_join` / `cache_select`
//! for continuous batching) on one execution provider, and what is computed with them — image
//! features, prefill, batched decoding and the Q-Align score (option likelihoods: `choices.rs`; fixed-shape
//! steps for CUDA graphs: `replay.rs`).

use std::path::Path;
use std::sync::{Arc, Mutex};

use image::RgbImage;
use ort::memory::{AllocationDevice, AllocatorType, MemoryInfo, MemoryType};
use ort::session::Session;
use ort::value::{DynTensor, DynValue};
use qadapt_core::image::{pixel_values, PreprocessConfig};
use qadapt_core::sampling::{quality_score, AnswerJson, GenerateOptions, LevelProbs, LEVELS};
use qadapt_core::template::{self, PromptIds};
use qadapt_core::{QFormerTokenizer, TextTokenizer};

use crate::{
    candidates, dispatch, environment, float_value, int_value, ints, ort_err, out_f32, Ep, Manifest, Placement, Result,
    RunError,
};

/// The KV cache of a batch after `len` positions: each layer's key and value as the decoder
/// returned them, left where the execution provider computed them (device memory on CUDA), so a
/// decoding step copies only the new token's embedding in and its logits out.
///
/// Standard exports grow it by concatenation (a step returns new tensors; rows are left-padded).
/// Fused exports hold one buffer of `slots` positions per row that every step writes in place
/// (row `r` in slots `0..len − pad[r]`, right-padded): a cache grown from another shares its
/// buffers, so continuations of one prefill must run one after the other (as `choices` does).
pub struct Cache {
    pub(crate) kv: Arc<Mutex<Vec<DynValue>>>,
    pub(crate) len: usize,
    /// Per row (its length is the batch size), `len` minus the row's own length. Standard: left
    /// padding, the first `pad[r]` positions masked out, positions counted from the first real
    /// token. Fused: the slots after the row's end.
    pub(crate) pad: Vec<usize>,
    /// Fused exports: positions each row's buffer holds; 0 for a cache that grows.
    pub(crate) slots: usize,
}

impl Cache {
    /// A cache made of `kv`.
    pub(crate) fn new(kv: Vec<DynValue>, len: usize, pad: Vec<usize>, slots: usize) -> Self {
        Self { kv: Arc::new(Mutex::new(kv)), len, pad, slots }
    }

    /// The cached tensors, locked for one step.
    pub(crate) fn tensors(&self) -> Result<std::sync::MutexGuard<'_, Vec<DynValue>>> {
        self.kv.lock().map_err(|_| RunError::Ort("a KV cache was poisoned by a failed step".into()))
    }

    /// Cached positions (padding included).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Positions each row's in-place buffer holds (fused exports), or 0.
    pub fn slots(&self) -> usize {
        self.slots
    }

    /// Host addresses of the cached tensors' data (CPU caches): a fused decode step leaves them
    /// unchanged, a standard one replaces every tensor.
    pub fn addresses(&self) -> Result<Vec<usize>> {
        self.tensors()?
            .iter()
            .map(|v| match v.try_extract_tensor::<f32>() {
                Ok((_, d)) => Ok(d.as_ptr() as usize),
                Err(_) => Ok(v.try_extract_tensor::<half::f16>().map_err(ort_err("cache"))?.1.as_ptr() as usize),
            })
            .collect()
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// One row of a mixed batch: an image, its question and its generation settings.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// Set by another thread when nobody reads this row any more: the row stops at the next step.
    pub cancel: Option<&'a std::sync::atomic::AtomicBool>,
    /// The image.
    pub image: &'a RgbImage,
    /// The question asked of it (the last user turn).
    pub question: &'a str,
    /// Completed `(user, assistant)` turns before `question`, oldest first; the first user turn
    /// carries the image, and the Q-Former reads it (as training does). Empty for one question.
    pub history: &'a [(String, String)],
    /// This row's generation settings.
    pub opts: GenerateOptions,
}

/// An opened export directory.
pub struct Runtime {
    /// The export's `qadapt.json`.
    pub manifest: Manifest,
    /// Shared so the decoding loop can read it while the sessions run.
    pub tokenizer: Arc<TextTokenizer>,
    /// The Q-Former's WordPiece tokenizer (Q-Adapt exports).
    pub qformer_tokenizer: Option<QFormerTokenizer>,
    /// Image preprocessing from the manifest.
    pub preprocess: PreprocessConfig,
    /// The execution provider the sessions run on.
    pub ep: &'static str,
    /// With `--ep auto`: the providers tried before it, and why each failed.
    pub skipped: Vec<String>,
    vision: Session,
    embed: Session,
    pub(crate) decoder: Session,
    pub(crate) cache_join: Option<Session>,
    pub(crate) cache_select: Option<Session>,
    pub(crate) f16: bool,
    /// The `fused` variant: caches are in-place buffers, batches right-padded (see [`Cache`]).
    pub(crate) fused: bool,
    /// The decoder reads `position_ids` (a fused graph with the rotary inside its attention op
    /// does not).
    pub(crate) positions_input: bool,
    /// The decoder takes `num_logits_to_keep` (exports since 2026-11-26): a prefill then computes
    /// the lm_head for its last position only.
    keep_input: bool,
    /// Where the decoder leaves the cache (the EP's device) and the logits (host).
    pub(crate) kv_mem: MemoryInfo<'static>,
    pub(crate) host_mem: MemoryInfo<'static>,
    /// The decoder session replays CUDA graphs: every run names its graph (see [`crate::replay`]).
    pub(crate) cuda_graph: bool,
    /// Pooled caches and fixed-shape decode steps (`--cuda-graph`, or [`Placement::fixed_steps`]).
    pub(crate) replay: Option<Replay>,
}

/// The pooled buffers and fixed step inputs of fixed-shape decode steps (run by `crate::replay`).
#[derive(Default)]
pub(crate) struct Replay {
    pub(crate) sets: Vec<Set>,
    /// Steps run on a pooled set so far.
    pub(crate) steps: usize,
}

/// One batch size's cache buffers and the step inputs and output bound with them.
pub(crate) struct Set {
    pub(crate) rows: usize,
    pub(crate) kv: Arc<Mutex<Vec<DynValue>>>,
    pub(crate) embeds: DynTensor,
    pub(crate) mask: DynTensor,
    pub(crate) positions: Option<DynTensor>,
    pub(crate) logits_positions: DynTensor,
    pub(crate) logits: DynTensor,
}

impl Runtime {
    /// Opens `dir` (qadapt.json, the graphs, the tokenizers) on `ep` with default placement.
    pub fn open(dir: &Path, ep: Ep, device_id: i32, fp16: bool, ort_lib: Option<&Path>) -> Result<Self> {
        Self::open_with(dir, &Placement { ep, device_id, fp16, ..Default::default() }, ort_lib)
    }

    /// Opens `dir` on the providers of `place`.
    pub fn open_with(dir: &Path, place: &Placement, ort_lib: Option<&Path>) -> Result<Self> {
        let bad = |msg: String| RunError::Export { path: dir.to_path_buf(), msg };
        if !dir.is_dir() {
            return Err(bad("export directory not found".into()));
        }
        let mpath = dir.join("qadapt.json");
        let text = std::fs::read_to_string(&mpath).map_err(|e| RunError::Export {
            path: mpath.clone(),
            msg: format!("{e} (not a qadapt-export directory?)"),
        })?;
        let manifest = Manifest::parse(&text).map_err(|msg| RunError::Export { path: mpath.clone(), msg })?;
        if place.cuda_graph && place.ep != Ep::Cuda {
            return Err(RunError::Ep {
                ep: place.ep.name().into(),
                msg: "--cuda-graph needs the CUDA provider (--ep cuda): CUDA graphs are a feature of ONNX Runtime's \
                      CUDA execution provider"
                    .into(),
            });
        }
        if (place.cuda_graph || place.fixed_steps) && !manifest.fused() {
            return Err(RunError::Export {
                path: mpath.clone(),
                msg: "--cuda-graph needs a --fused export (variant \"fused\"): the standard graphs' cache grows \
                      every step, so no decode step has fixed shapes"
                    .into(),
            });
        }
        let env = environment(ort_lib)?;
        let cache = place.trt_cache.clone().unwrap_or_else(|| dir.join("trt-cache"));
        let open = |ep: Ep, file: &str| -> Result<Session> {
            let path = dir.join(file);
            if !path.is_file() {
                return Err(RunError::Export { path, msg: "graph missing".into() });
            }
            let b = Session::builder(env).map_err(ort_err(file))?;
            let mut b = b
                .with_execution_providers(dispatch(ep, place, file, &manifest, &cache))
                .map_err(|e| RunError::Ep { ep: ep.name().into(), msg: ep_reason(&e.to_string()) })?;
            b.commit_from_file(&path).map_err(ort_err(path.display()))
        };
        // `auto` takes the first provider whose registration succeeds: a GPU build of
        // libonnxruntime on a machine without the CUDA libraries falls back instead of failing.
        let mut skipped = Vec::new();
        let mut opened = None;
        for ep in candidates(place.ep) {
            let g = &manifest.graphs;
            match (|| Ok::<_, RunError>((open(ep, &g.vision)?, open(ep, &g.embed)?, open(ep, &g.decoder)?)))() {
                Ok(s) => {
                    opened = Some((ep, s));
                    break;
                }
                Err(e @ RunError::Ep { .. }) if place.ep == Ep::Auto => skipped.push(e.to_string()),
                Err(e) => return Err(e),
            }
        }
        let (chosen, (vision, embed, decoder)) =
            opened.ok_or_else(|| RunError::Ep { ep: "auto".into(), msg: skipped.join("; ") })?;
        let optional = |file: &Option<String>| file.as_deref().map(|f| open(chosen, f)).transpose();
        let (cache_join, cache_select) =
            (optional(&manifest.graphs.cache_join)?, optional(&manifest.graphs.cache_select)?);
        let tokenizer = Arc::new(TextTokenizer::from_dir(dir)?);
        let qformer_tokenizer = match &manifest.qformer {
            Some(q) => Some(QFormerTokenizer::from_dir(dir, q.max_text_length)?),
            None => None,
        };
        let preprocess =
            PreprocessConfig { image_size: manifest.image.size, mean: manifest.image.mean, std: manifest.image.std };
        let mem = |dev, id| {
            MemoryInfo::new(dev, id, AllocatorType::Device, MemoryType::Default).map_err(ort_err("memory info"))
        };
        let host_mem = mem(AllocationDevice::CPU, 0)?;
        let kv_mem = if chosen == Ep::Cpu {
            mem(AllocationDevice::CPU, 0)?
        } else {
            mem(AllocationDevice::CUDA, place.device_id)?
        };
        if let (Some(q), Ep::Tensorrt) = (&manifest.quantization, chosen) {
            tracing::warn!(
                bits = q.bits,
                "this export's linears are MatMulNBits, which TensorRT has no kernel for: ONNX Runtime runs them \
                 outside TensorRT; use --ep cuda for quantized exports"
            );
        }
        let f16 = manifest.dtype == "f16";
        let keep_input = decoder.inputs().iter().any(|i| i.name() == "num_logits_to_keep");
        let positions_input = decoder.inputs().iter().any(|i| i.name() == "position_ids");
        let fused = manifest.fused();
        // A manifest that names the wrong variant would bind inputs the graph does not have.
        if fused != decoder.inputs().iter().any(|i| i.name() == "logits_positions") {
            return Err(RunError::Export {
                path: dir.join(&manifest.graphs.decoder),
                msg: format!(
                    "qadapt.json says variant {:?}, but this decoder is the {} graph",
                    manifest.variant.as_deref().unwrap_or("standard"),
                    if fused { "standard" } else { "fused" }
                ),
            });
        }
        Ok(Self {
            manifest,
            tokenizer,
            qformer_tokenizer,
            preprocess,
            ep: chosen.name(),
            skipped,
            vision,
            embed,
            decoder,
            cache_join,
            cache_select,
            f16,
            fused,
            positions_input,
            keep_input,
            kv_mem,
            host_mem,
            cuda_graph: place.cuda_graph,
            replay: (place.cuda_graph || place.fixed_steps).then(Replay::default),
        })
    }

    /// Image features [B·N·D] of a batch of images asked the same question (the Q-Former reads it).
    pub fn image_features(&mut self, imgs: &[&RgbImage], question: &str) -> Result<Vec<f32>> {
        self.image_features_each(imgs, &vec![question; imgs.len()])
    }

    /// Image features [B·N·D] of a batch of images, each asked its own question.
    pub fn image_features_each(&mut self, imgs: &[&RgbImage], questions: &[&str]) -> Result<Vec<f32>> {
        let mut px = Vec::new();
        for img in imgs {
            px.extend(pixel_values(img, &self.preprocess));
        }
        let ids = match &self.qformer_tokenizer {
            Some(qt) => Some(
                questions
                    .iter()
                    .map(|q| Ok(qt.encode(&template::qformer_text(q))?.into_iter().map(i64::from).collect()))
                    .collect::<Result<Vec<Vec<i64>>>>()?,
            ),
            None => None,
        };
        self.features_from_pixels(px, ids.as_deref())
    }

    /// Image features [B·N·D] from preprocessed pixel values [B, 3, S, S] and, for Q-Adapt exports,
    /// the Q-Former ids of each image's question (one row shared by the batch, or one per image;
    /// rows of different lengths are right-padded and masked).
    pub fn features_from_pixels(&mut self, px: Vec<f32>, qformer_ids: Option<&[Vec<i64>]>) -> Result<Vec<f32>> {
        let s = self.preprocess.image_size as i64;
        let b = px.len() / (3 * (s * s) as usize);
        let mut feed = vec![("pixel_values".to_string(), crate::floats(vec![b as i64, 3, s, s], px, self.f16)?)];
        if self.qformer_tokenizer.is_some() {
            let rows = qformer_ids.filter(|r| r.len() == 1 || r.len() == b).ok_or_else(|| {
                RunError::Input(format!("this export needs the Q-Former ids of the question: one row or {b}"))
            })?;
            let t = rows.iter().map(Vec::len).max().unwrap_or(0);
            let (mut ids, mut mask) = (Vec::with_capacity(b * t), Vec::with_capacity(b * t));
            for r in 0..b {
                let row = &rows[r % rows.len()];
                ids.extend(row.iter().copied().chain(std::iter::repeat_n(0, t - row.len())));
                mask.extend((0..t).map(|j| i64::from(j < row.len())));
            }
            feed.push(("qformer_attention_mask".into(), ints(vec![b as i64, t as i64], mask)?));
            feed.push(("qformer_input_ids".into(), ints(vec![b as i64, t as i64], ids)?));
        }
        let out = self.vision.run(feed).map_err(ort_err("vision"))?;
        out_f32(out.get("image_features").ok_or_else(|| RunError::Ort("vision output image_features missing".into()))?)
    }

    /// Embeddings [B·L·D] of `ids` laid out [B, L].
    pub(crate) fn embed(&mut self, ids: &[u32], b: usize) -> Result<Vec<f32>> {
        let v: Vec<i64> = ids.iter().map(|&i| i64::from(i)).collect();
        let shape = vec![b as i64, (v.len() / b) as i64];
        let out = self.embed.run(vec![("input_ids".to_string(), ints(shape, v)?)]).map_err(ort_err("embed"))?;
        out_f32(out.get("inputs_embeds").ok_or_else(|| RunError::Ort("embed output inputs_embeds missing".into()))?)
    }

    /// One decoder pass over `embeds` [B, S, D] after the cached positions. Returns the logits
    /// [B·V] of the last position, or [B·S·V] of every position when `all`, and the grown cache.
    /// `cache` is only read, so several continuations can start from one prefill.
    pub(crate) fn step(&mut self, embeds: Vec<f32>, cache: &Cache, all: bool) -> Result<(Vec<f32>, Cache)> {
        let d = &self.manifest.decoder;
        let b = cache.pad.len();
        let s = embeds.len() / (b * d.hidden_size);
        let total = cache.len + s;
        let e = |w: &'static str| ort_err(format!("decoder {w}"));
        let mut bind = self.decoder.create_binding().map_err(e("binding"))?;
        bind.bind_input(
            "inputs_embeds",
            &float_value(vec![b as i64, s as i64, d.hidden_size as i64], embeds, self.f16)?,
        )
        .map_err(e("inputs_embeds"))?;
        // A left-padded row masks its padding and counts positions from its first real token (the
        // padding's own positions are clamped to 0: masked, they are never read).
        let mask: Vec<i64> = cache.pad.iter().flat_map(|&p| (0..total).map(move |j| i64::from(j >= p))).collect();
        bind.bind_input("attention_mask", &int_value(vec![b as i64, total as i64], mask)?)
            .map_err(e("attention_mask"))?;
        let pos: Vec<i64> =
            cache.pad.iter().flat_map(|&p| (cache.len..total).map(move |j| j.saturating_sub(p) as i64)).collect();
        bind.bind_input("position_ids", &int_value(vec![b as i64, s as i64], pos)?).map_err(e("position_ids"))?;
        let kept = if all { s } else { 1 };
        if self.keep_input {
            bind.bind_input("num_logits_to_keep", &int_value(vec![], vec![kept as i64])?)
                .map_err(e("num_logits_to_keep"))?;
        }
        for (i, pair) in cache.tensors()?.chunks(2).enumerate() {
            bind.bind_input(format!("past_key_values.{i}.key"), &pair[0]).map_err(e("past"))?;
            bind.bind_input(format!("past_key_values.{i}.value"), &pair[1]).map_err(e("past"))?;
        }
        bind.bind_output_to_device("logits", &self.host_mem).map_err(e("logits"))?;
        for i in 0..d.layers {
            bind.bind_output_to_device(format!("present.{i}.key"), &self.kv_mem).map_err(e("present"))?;
            bind.bind_output_to_device(format!("present.{i}.value"), &self.kv_mem).map_err(e("present"))?;
        }
        let layers = d.layers;
        let mut out = self.decoder.run_binding(&bind).map_err(e("run"))?;
        let mut kv = Vec::with_capacity(2 * layers);
        for i in 0..layers {
            for name in [format!("present.{i}.key"), format!("present.{i}.value")] {
                kv.push(out.remove(&name).ok_or_else(|| RunError::Ort(format!("decoder output {name} missing")))?);
            }
        }
        let logits = out.get("logits").ok_or_else(|| RunError::Ort("decoder output logits missing".into()))?;
        // Logits are [B, kept, V]; an older export returns all S rows: copy out only those read.
        let rows = if self.keep_input { kept } else { s };
        let logits = if all || rows == 1 { out_f32(logits)? } else { last_rows(logits, b, rows)? };
        Ok((logits, Cache::new(kv, total, cache.pad.clone(), 0)))
    }

    /// Whether `question` fits the model with its image (the error [`Runtime::generate_mixed`]
    /// would give for its whole batch): batch callers set such a row aside first.
    pub fn check_question(&self, question: &str) -> Result<()> {
        self.prompt(question, None).map(|_| ())
    }

    /// The tokenized prompt of a question (and answer prefix), checked against the positions.
    pub(crate) fn prompt(&self, question: &str, prefix: Option<&str>) -> Result<PromptIds> {
        self.check_prompt(&template::prompt(&template::user_turn(question), prefix))
    }

    /// The tokenized prompt of a request (its history and question), checked against the positions.
    pub fn request_prompt(&self, r: &Request) -> Result<PromptIds> {
        self.check_len(template::tokenize_chat(&self.tokenizer, r.history, r.question)?)
    }

    /// `text` tokenized, with one image, checked against the positions.
    fn check_prompt(&self, text: &str) -> Result<PromptIds> {
        self.check_len(template::tokenize_prompt(&self.tokenizer, text)?)
    }

    /// `prompt` if it fits the decoder's positions with its image.
    fn check_len(&self, prompt: PromptIds) -> Result<PromptIds> {
        prompt
            .fits(self.manifest.image.tokens, self.manifest.decoder.max_positions, "max_positions")
            .map_err(RunError::Input)?;
        Ok(prompt)
    }

    /// Prefill of one question (and answer prefix) over a batch of images: every row has the same
    /// prompt, so no row is padded. Returns the last position's logits [B·V] and the cache, with
    /// room for `room` more positions per row.
    pub(crate) fn prefill(
        &mut self,
        imgs: &[&RgbImage],
        question: &str,
        prefix: Option<&str>,
        room: usize,
    ) -> Result<(Vec<f32>, Cache)> {
        if imgs.is_empty() {
            return Err(RunError::Input("no images".into()));
        }
        let prompt = self.prompt(question, prefix)?;
        let feats = self.image_features(imgs, question)?;
        self.prefill_rows(&vec![&prompt; imgs.len()], &feats, room)
    }

    /// Prefill of one prompt given as ids with `-200` where the image features [N·D] go (Bunny's
    /// `tokenizer_image_token` form): the last position's logits and the cache (a fused export's
    /// with room up to the model's positions).
    pub fn prefill_ids(&mut self, ids: &[i64], feats: &[f32]) -> Result<(Vec<f32>, Cache)> {
        let image_pos = ids.iter().position(|&i| i == -200);
        let text: Vec<u32> = ids
            .iter()
            .filter(|&&i| i != -200)
            .map(|&i| u32::try_from(i).map_err(|_| RunError::Input(format!("token id {i}"))))
            .collect::<Result<_>>()?;
        let room = self.manifest.decoder.max_positions;
        self.prefill_rows(&[&PromptIds { ids: text, image_pos }], feats, room)
    }

    /// Prefill of one prompt per row, each with its image's features (`feats` = [B·N·D]): shorter
    /// prompts are left-padded (zero embeddings, masked), or right-padded on a fused export, whose
    /// cache buffers get room for `room` positions after the longest prompt (at most the model's).
    /// Returns the last position's logits [B·V] and the cache.
    pub(crate) fn prefill_rows(
        &mut self,
        prompts: &[&PromptIds],
        feats: &[f32],
        room: usize,
    ) -> Result<(Vec<f32>, Cache)> {
        let b = prompts.len();
        let n_img = self.manifest.image.tokens;
        let lens: Vec<usize> = prompts.iter().map(|p| p.spliced_len(n_img)).collect();
        let longest = lens.iter().copied().max().unwrap_or(0);
        let d = self.manifest.decoder.hidden_size;
        let per_image = feats.len() / b;
        let mut embeds = Vec::with_capacity(b * longest * d);
        // Rows of one batch usually share the prompt: its text is embedded once.
        let mut last: Option<(&PromptIds, Vec<f32>, Vec<f32>)> = None;
        for (r, &p) in prompts.iter().enumerate() {
            if last.as_ref().is_none_or(|(q, _, _)| *q != p) {
                let split = p.image_pos.unwrap_or(p.ids.len());
                let before = self.embed(&p.ids[..split], 1)?;
                let after = if split < p.ids.len() { self.embed(&p.ids[split..], 1)? } else { Vec::new() };
                last = Some((p, before, after));
            }
            let Some((_, before, after)) = &last else { unreachable!("set above") };
            let pad = (longest - lens[r]) * d;
            if !self.fused {
                embeds.resize(embeds.len() + pad, 0.0);
            }
            embeds.extend_from_slice(before);
            if p.image_pos.is_some() {
                embeds.extend_from_slice(&feats[r * per_image..(r + 1) * per_image]);
            }
            embeds.extend_from_slice(after);
            if self.fused {
                embeds.resize(embeds.len() + pad, 0.0);
            }
        }
        if self.fused {
            let slots = longest.saturating_add(room).min(self.manifest.decoder.max_positions);
            let empty = match self.pooled_slots(b)? {
                Some(pooled) => pooled,
                None => self.empty_slots(b, slots)?,
            };
            return self.step_fused(embeds, &empty, &lens, false);
        }
        let empty = self.empty_cache(lens.iter().map(|&l| longest - l).collect())?;
        self.step(embeds, &empty, false)
    }

    /// The logits [B·V] after one more token per row on top of `cache`, and the grown cache.
    pub fn next_logits(&mut self, tokens: &[u32], cache: &Cache) -> Result<(Vec<f32>, Cache)> {
        let e = self.embed(tokens, tokens.len())?;
        if self.fused {
            return self.step_fused(e, cache, &vec![1; tokens.len()], false);
        }
        self.step(e, cache, false)
    }

    /// The Q-Align 1–5 score with its level probabilities, for each image of a batch.
    pub fn score_batch(&mut self, imgs: &[&RgbImage]) -> Result<Vec<(f32, LevelProbs)>> {
        let logits = self.prefill(imgs, template::SCORE_QUESTION, Some(template::SCORE_ANSWER_PREFIX), 0)?.0;
        let v = logits.len() / imgs.len();
        Ok(logits.chunks(v).map(|row| quality_score(self.manifest.tokens.levels.map(|id| row[id as usize]))).collect())
    }

    /// The Q-Align 1–5 score with its level probabilities.
    pub fn score(&mut self, img: &RgbImage) -> Result<(f32, LevelProbs)> {
        Ok(self.score_batch(&[img])?.remove(0))
    }

    /// [`Runtime::score`] as the `--json` object: the likeliest level word is the answer.
    pub fn score_json(&mut self, img: &RgbImage) -> Result<AnswerJson> {
        Ok(self.score_batch_json(&[img])?.remove(0))
    }

    /// [`Runtime::score_batch`] as `--json` objects.
    pub fn score_batch_json(&mut self, imgs: &[&RgbImage]) -> Result<Vec<AnswerJson>> {
        Ok(self.score_batch(imgs)?.into_iter().map(|(s, p)| self.score_answer(s, p)).collect())
    }

    /// The `--json` object of a score.
    fn score_answer(&self, score: f32, probs: LevelProbs) -> AnswerJson {
        let arr = probs.to_array();
        let best = (0..5).fold(0, |b, i| if arr[i] > arr[b] { i } else { b });
        AnswerJson {
            answer: LEVELS[best].0.to_string(),
            token_ids: vec![self.manifest.tokens.levels[best]],
            score: Some(score),
            level_probs: Some(probs),
            logprobs: None,
        }
    }
}

/// The last position's row of each sequence of a [B, S, V] float output, as f32.
fn last_rows(v: &DynValue, b: usize, s: usize) -> Result<Vec<f32>> {
    fn pick<T: Copy>(d: &[T], b: usize, s: usize, f: impl Fn(T) -> f32) -> Vec<f32> {
        let v = d.len() / (b * s);
        (0..b).flat_map(|r| d[(r * s + s - 1) * v..(r * s + s) * v].iter().map(|&x| f(x))).collect()
    }
    match v.try_extract_tensor::<f32>() {
        Ok((_, d)) => Ok(pick(d, b, s, |x| x)),
        Err(_) => Ok(pick(v.try_extract_tensor::<half::f16>().map_err(ort_err("logits"))?.1, b, s, |x| x.to_f32())),
    }
}

/// ONNX Runtime's registration error without its source location: from "Failed to load library"
/// on, which names the provider library and the dependency that is missing.
fn ep_reason(msg: &str) -> String {
    msg.find("Failed to load library").map_or(msg, |i| &msg[i..]).trim().to_string()
}
