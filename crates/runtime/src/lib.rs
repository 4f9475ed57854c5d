//! The edge runtime: an export directory of `qadapt-export` run on ONNX Runtime — image features,
//! prompt splicing, a decoder loop with KV cache, sampling and the Q-Align score. Tokenization,
//! template, preprocessing and sampling come from `qadapt-core`, the same code the candle engine uses,
//! so both give the same ids for the same model. Never depends on candle.

use std::path::{Path, PathBuf};

use image::RgbImage;
use ort::ep::ExecutionProvider;
use ort::session::{Session, SessionInputValue};
use ort::value::{DynValue, Tensor};
use qadapt_core::image::{pixel_values, PreprocessConfig};
use qadapt_core::sampling::{decode_loop, quality_score, AnswerJson, LevelProbs, Sampler, SamplingParams, LEVELS};
use qadapt_core::template::{self, PromptIds};
use qadapt_core::{QFormerTokenizer, TextTokenizer};
use serde::Deserialize;

/// Errors of the runtime; each names the file, library or input at fault.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{path}: {msg}")]
    Export { path: PathBuf, msg: String },
    #[error("ONNX Runtime: {0}")]
    Ort(String),
    #[error("execution provider {ep}: {msg}")]
    Ep { ep: String, msg: String },
    #[error("bad input: {0}")]
    Input(String),
    #[error(transparent)]
    Core(#[from] qadapt_core::Error),
}

/// Result alias of the runtime.
pub type Result<T> = std::result::Result<T, RunError>;

fn ort_err(what: impl std::fmt::Display) -> impl Fn(ort::Error) -> RunError {
    move |e| RunError::Ort(format!("{what}: {e}"))
}

/// The parts of `qadapt.json` the runtime reads.
#[derive(Debug, Clone, Deserialize)]
pub struct Manifest {
    pub dtype: String,
    pub graphs: Graphs,
    pub image: ImageSpec,
    pub decoder: DecoderSpec,
    pub tokens: TokenSpec,
    pub qformer: Option<QFormerSpec>,
}

/// Graph file names.
#[derive(Debug, Clone, Deserialize)]
pub struct Graphs {
    pub vision: String,
    pub embed: String,
    pub decoder: String,
}

/// Preprocessing and the number of image tokens.
#[derive(Debug, Clone, Deserialize)]
pub struct ImageSpec {
    pub size: u32,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    pub tokens: usize,
}

/// Decoder shapes.
#[derive(Debug, Clone, Deserialize)]
pub struct DecoderSpec {
    pub layers: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub hidden_size: usize,
    pub vocab_size: usize,
    pub max_positions: usize,
}

/// Special and level-word token ids.
#[derive(Debug, Clone, Deserialize)]
pub struct TokenSpec {
    pub eos: u32,
    pub levels: [u32; 5],
}

/// Present for Q-Adapt exports.
#[derive(Debug, Clone, Deserialize)]
pub struct QFormerSpec {
    pub max_text_length: usize,
}

/// Where the graphs run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Ep {
    Cpu,
    Cuda,
    Tensorrt,
    /// TensorRT, else CUDA, else CPU: the first this libonnxruntime provides.
    Auto,
}

/// Generation settings.
#[derive(Debug, Clone, Copy)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
}

/// ONNX Runtime allows one environment per process.
static ENV: std::sync::OnceLock<ort::environment::Environment> = std::sync::OnceLock::new();

/// Loads ONNX Runtime once per process (a second environment is refused): `lib`, else
/// `ORT_DYLIB_PATH`. The exporter's verification shares it.
pub fn environment(lib: Option<&Path>) -> Result<&'static ort::environment::Environment> {
    if let Some(env) = ENV.get() {
        return Ok(env);
    }
    let builder = match lib {
        Some(p) => ort::init_from(p).map_err(|e| RunError::Ort(format!("loading {}: {e}", p.display())))?,
        None => {
            if std::env::var_os("ORT_DYLIB_PATH").is_none() {
                return Err(RunError::Ort("libonnxruntime not found: pass --ort-lib PATH/libonnxruntime.so or set ORT_DYLIB_PATH".into()));
            }
            ort::init()
        }
    };
    let env = builder.with_name("qadapt-run").build().map_err(ort_err("starting"))?;
    Ok(ENV.get_or_init(|| env))
}

fn dispatch(ep: Ep, device_id: i32, fp16: bool, cache: Option<&Path>) -> Result<(Vec<ort::ep::ExecutionProviderDispatch>, &'static str)> {
    let trt = || {
        let mut t = ort::ep::TensorRT::default().with_device_id(device_id).with_fp16(fp16);
        if let Some(c) = cache {
            t = t.with_engine_cache(true).with_engine_cache_path(c.display());
        }
        t
    };
    let cuda = || ort::ep::CUDA::default().with_device_id(device_id);
    let available = |r: ort::Result<bool>| r.unwrap_or(false);
    Ok(match ep {
        Ep::Cpu => (vec![], "cpu"),
        Ep::Cuda => (vec![cuda().build().error_on_failure()], "cuda"),
        Ep::Tensorrt => (vec![trt().build().error_on_failure()], "tensorrt"),
        Ep::Auto => {
            if available(<ort::ep::TensorRT as ExecutionProvider>::is_available()) {
                (vec![trt().build().error_on_failure()], "tensorrt")
            } else if available(<ort::ep::CUDA as ExecutionProvider>::is_available()) {
                (vec![cuda().build().error_on_failure()], "cuda")
            } else {
                (vec![], "cpu")
            }
        }
    })
}

/// An opened export directory.
pub struct Runtime {
    pub manifest: Manifest,
    /// Shared so the decoding loop can read it while the sessions run.
    pub tokenizer: std::sync::Arc<TextTokenizer>,
    pub qformer_tokenizer: Option<QFormerTokenizer>,
    pub preprocess: PreprocessConfig,
    /// The execution provider the sessions run on.
    pub ep: &'static str,
    vision: Session,
    embed: Session,
    decoder: Session,
    f16: bool,
}

/// One layer's cached key and value, flattened [B, H, P, Dh].
type Kv = (Vec<f32>, Vec<f32>);

/// What a prefill leaves: the last position's logits, the cache and the sequence length.
struct Prefill {
    logits: Vec<f32>,
    past: Vec<Kv>,
    len: usize,
}

/// A float input of `shape`, sent as f16 when `f16` (the graphs' float type).
pub fn floats(shape: Vec<i64>, v: Vec<f32>, f16: bool) -> Result<SessionInputValue<'static>> {
    let t: DynValue = if f16 {
        Tensor::from_array((shape, v.into_iter().map(half::f16::from_f32).collect::<Vec<_>>())).map_err(ort_err("input"))?.into_dyn()
    } else {
        Tensor::from_array((shape, v)).map_err(ort_err("input"))?.into_dyn()
    };
    Ok(t.into())
}

/// An int64 input of `shape`.
pub fn ints(shape: Vec<i64>, v: Vec<i64>) -> Result<SessionInputValue<'static>> {
    Ok(Tensor::from_array((shape, v)).map_err(ort_err("input"))?.into_dyn().into())
}

/// A float output (f32 or f16) as f32.
pub fn out_f32(v: &DynValue) -> Result<Vec<f32>> {
    match v.try_extract_tensor::<f32>() {
        Ok((_, d)) => Ok(d.to_vec()),
        Err(_) => Ok(v.try_extract_tensor::<half::f16>().map_err(ort_err("output"))?.1.iter().map(|x| x.to_f32()).collect()),
    }
}

impl Runtime {
    /// Opens `dir` (qadapt.json, the graphs, the tokenizers) on `ep`.
    pub fn open(dir: &Path, ep: Ep, device_id: i32, fp16: bool, ort_lib: Option<&Path>) -> Result<Self> {
        let bad = |msg: String| RunError::Export { path: dir.to_path_buf(), msg };
        if !dir.is_dir() {
            return Err(bad("export directory not found".into()));
        }
        let mpath = dir.join("qadapt.json");
        let text = std::fs::read_to_string(&mpath).map_err(|e| RunError::Export { path: mpath.clone(), msg: format!("{e} (not a qadapt-export directory?)") })?;
        let manifest: Manifest = serde_json::from_str(&text).map_err(|e| RunError::Export { path: mpath.clone(), msg: format!("invalid: {e}") })?;
        let env = environment(ort_lib)?;
        let cache = dir.join("trt-cache");
        let (eps, name) = dispatch(ep, device_id, fp16, Some(&cache))?;
        let open = |file: &str| -> Result<Session> {
            let path = dir.join(file);
            if !path.is_file() {
                return Err(RunError::Export { path, msg: "graph missing".into() });
            }
            let b = Session::builder(env).map_err(ort_err(file))?;
            let b = b.with_execution_providers(&eps).map_err(|e| RunError::Ep { ep: name.into(), msg: e.to_string() })?;
            let mut b = b;
            b.commit_from_file(&path).map_err(ort_err(path.display()))
        };
        let (vision, embed, decoder) = (open(&manifest.graphs.vision)?, open(&manifest.graphs.embed)?, open(&manifest.graphs.decoder)?);
        let tokenizer = std::sync::Arc::new(TextTokenizer::from_dir(dir)?);
        let qformer_tokenizer = match &manifest.qformer {
            Some(q) => Some(QFormerTokenizer::from_dir(dir, q.max_text_length)?),
            None => None,
        };
        let preprocess = PreprocessConfig { image_size: manifest.image.size, mean: manifest.image.mean, std: manifest.image.std };
        let f16 = manifest.dtype == "f16";
        Ok(Self { manifest, tokenizer, qformer_tokenizer, preprocess, ep: name, vision, embed, decoder, f16 })
    }

    /// Image features [N·D] for one image and the question it is asked with.
    pub fn image_features(&mut self, img: &RgbImage, question: &str) -> Result<Vec<f32>> {
        let s = self.preprocess.image_size as i64;
        let px = pixel_values(img, &self.preprocess);
        let mut feed = vec![("pixel_values".to_string(), floats(vec![1, 3, s, s], px, self.f16)?)];
        if let Some(qt) = &self.qformer_tokenizer {
            let ids: Vec<i64> = qt.encode(&template::qformer_text(question))?.into_iter().map(i64::from).collect();
            let t = ids.len() as i64;
            feed.push(("qformer_attention_mask".into(), ints(vec![1, t], vec![1; ids.len()])?));
            feed.push(("qformer_input_ids".into(), ints(vec![1, t], ids)?));
        }
        let out = self.vision.run(feed).map_err(ort_err("vision"))?;
        out_f32(&out["image_features"])
    }

    fn embed(&mut self, ids: &[u32]) -> Result<Vec<f32>> {
        let v: Vec<i64> = ids.iter().map(|&i| i64::from(i)).collect();
        let out = self.embed.run(vec![("input_ids".to_string(), ints(vec![1, v.len() as i64], v)?)]).map_err(ort_err("embed"))?;
        out_f32(&out["inputs_embeds"])
    }

    /// One decoder step over `embeds` after `past_len` cached positions; the cache is replaced by
    /// the present. Returns the last position's logits.
    fn step(&mut self, embeds: Vec<f32>, past: &mut [Kv], past_len: usize) -> Result<Vec<f32>> {
        let d = &self.manifest.decoder;
        let s = embeds.len() / d.hidden_size;
        let total = past_len + s;
        let kv_shape = vec![1, d.heads as i64, past_len as i64, d.head_dim as i64];
        let mut feed = vec![
            ("inputs_embeds".to_string(), floats(vec![1, s as i64, d.hidden_size as i64], embeds, self.f16)?),
            ("attention_mask".to_string(), ints(vec![1, total as i64], vec![1; total])?),
            ("position_ids".to_string(), ints(vec![1, s as i64], (past_len as i64..total as i64).collect())?),
        ];
        for (i, (k, v)) in past.iter().enumerate() {
            feed.push((format!("past_key_values.{i}.key"), floats(kv_shape.clone(), k.clone(), self.f16)?));
            feed.push((format!("past_key_values.{i}.value"), floats(kv_shape.clone(), v.clone(), self.f16)?));
        }
        let out = self.decoder.run(feed).map_err(ort_err("decoder"))?;
        for (i, kv) in past.iter_mut().enumerate() {
            *kv = (out_f32(&out[format!("present.{i}.key").as_str()])?, out_f32(&out[format!("present.{i}.value").as_str()])?);
        }
        let logits = out_f32(&out["logits"])?;
        let v = logits.len() / s;
        Ok(logits[(s - 1) * v..].to_vec())
    }

    /// Prefill of a question (and answer prefix).
    fn prefill(&mut self, img: &RgbImage, question: &str, prefix: Option<&str>) -> Result<Prefill> {
        let feats = self.image_features(img, question)?;
        let prompt: PromptIds = template::tokenize_prompt(&self.tokenizer, &template::prompt(&template::user_turn(question), prefix))?;
        let len = prompt.spliced_len(self.manifest.image.tokens);
        if len >= self.manifest.decoder.max_positions {
            return Err(RunError::Input(format!(
                "the prompt is {len} tokens with the image; the model takes at most {} (max_positions)",
                self.manifest.decoder.max_positions
            )));
        }
        let split = prompt.image_pos.unwrap_or(prompt.ids.len());
        let mut embeds = self.embed(&prompt.ids[..split])?;
        if prompt.image_pos.is_some() {
            embeds.extend_from_slice(&feats);
        }
        if split < prompt.ids.len() {
            embeds.extend(self.embed(&prompt.ids[split..])?);
        }
        let mut past = vec![(Vec::new(), Vec::new()); self.manifest.decoder.layers];
        let logits = self.step(embeds, &mut past, 0)?;
        Ok(Prefill { logits, past, len })
    }

    /// Answers a question about an image; `on_text` receives the answer as it grows.
    pub fn generate(&mut self, img: &RgbImage, question: &str, opts: &GenerateOptions, mut on_text: impl FnMut(&str)) -> Result<AnswerJson> {
        let mut sampler = Sampler::new(opts.sampling)?;
        let Prefill { logits, mut past, mut len } = self.prefill(img, question, None)?;
        let budget = opts.max_new_tokens.min(self.manifest.decoder.max_positions - len);
        let (eos, tokenizer) = (self.manifest.tokens.eos, std::sync::Arc::clone(&self.tokenizer));
        let step = |next: u32| -> Result<Vec<f32>> {
            let e = self.embed(&[next])?;
            let l = self.step(e, &mut past, len)?;
            len += 1;
            Ok(l)
        };
        decode_loop(&mut sampler, &tokenizer, eos, budget, logits, step, &mut on_text)
    }

    /// The Q-Align 1–5 score with its level probabilities.
    pub fn score(&mut self, img: &RgbImage) -> Result<(f32, LevelProbs)> {
        let logits = self.prefill(img, template::SCORE_QUESTION, Some(template::SCORE_ANSWER_PREFIX))?.logits;
        Ok(quality_score(self.manifest.tokens.levels.map(|id| logits[id as usize])))
    }

    /// [`Runtime::score`] as the `--json` object: the likeliest level word is the answer.
    pub fn score_json(&mut self, img: &RgbImage) -> Result<AnswerJson> {
        let (score, probs) = self.score(img)?;
        let arr = probs.to_array();
        let best = (0..5).fold(0, |b, i| if arr[i] > arr[b] { i } else { b });
        Ok(AnswerJson { answer: LEVELS[best].0.to_string(), token_ids: vec![self.manifest.tokens.levels[best]], score: Some(score), level_probs: Some(probs) })
    }
}
