//! `qadapt-train plan`: the peak memory a training step will need, by part, before any weight is
//! read. The activations come from running the model's own forward pass on the memory interpreter
//! ([`models::meter::Meter`]), with the step's loss as `step::batch_loss` computes it.

use std::path::Path;

use anyhow::Context;
use candle_core::{DType, Tensor};
use models::bunny::dims_from_config;
use models::loader::{ShapeOnly, WeightSource};
use models::meter::{Meter, Shaped};
use models::ops::{Lora, Param};
use models::train_source::{LoraSpec, PEFT_PREFIX};
use models::{Bunny, Ops, QFormerText};
use qadapt_core::config::{BunnyConfig, ModelType};

use crate::modules::{Modules, Stage};

/// What a plan is asked about: a stage's shapes and settings.
#[derive(Debug, Clone)]
pub struct PlanInput {
    pub stage: Stage,
    pub modules: Modules,
    pub dtype: DType,
    pub batch_size: usize,
    /// Tokens per sample, image tokens included (the batch is padded to its longest sample).
    pub max_length: usize,
    /// Answer tokens per sample (the rows the loss reads); `None`: every text token.
    pub answer_tokens: Option<usize>,
    /// Q-Former question tokens per sample (stage 2).
    pub qformer_tokens: usize,
    pub gradient_checkpointing: bool,
    pub lora: Option<LoraSpec>,
    pub unfreeze_qformer: bool,
}

/// Expected peak memory of a training step, by part, in bytes.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Plan {
    /// Frozen weights in the compute dtype.
    pub weights: usize,
    /// Trainable tensors: f32 master copy, gradient and AdamW's two moments.
    pub trainable: usize,
    /// Activations kept from the forward to the backward pass, plus gradients live at its peak.
    pub activations: usize,
    /// Of `activations`: kept between the passes.
    pub activations_kept: usize,
    /// The process itself and the batch: code, libraries, thread stacks, tokenizer, decoded pixels.
    pub workspace: usize,
    /// Parameter counts: frozen and trainable.
    pub frozen_params: usize,
    pub trainable_params: usize,
}

impl Plan {
    /// The sum of the parts.
    pub fn peak(&self) -> usize {
        self.weights + self.trainable + self.activations + self.workspace
    }
}

/// What a process running the trainer holds besides the model: code, libraries, thread stacks, the
/// tokenizer and the encoded data. Measured once the model is built (`RUST_LOG=trainer=debug`):
/// 13 MB at tiny shapes, 40 MB at bench-small shapes beyond the weights.
const PROCESS_BYTES: usize = 32 << 20;

/// A weightless source that also hands out LoRA factors (as [`models::train_source::TrainSource`]
/// would, under the same PEFT keys) so that the forward pass sees the adapted linears.
struct PlanSource {
    shapes: ShapeOnly,
    lora: Option<LoraSpec>,
}

impl WeightSource for PlanSource {
    fn shape(&self, key: &str) -> Option<Vec<usize>> {
        self.shapes.shape(key)
    }
    fn get(&self, key: &str, expected: &[usize]) -> models::Result<Tensor> {
        self.shapes.get(key, expected)
    }
    fn lora(&self, weight_key: &str, in_dim: usize, out_dim: usize) -> models::Result<Option<Lora>> {
        let Some(spec) = self.lora.as_ref().filter(|s| s.applies(weight_key)) else { return Ok(None) };
        let stem = weight_key.trim_end_matches(".weight");
        let a = format!("{PEFT_PREFIX}{stem}.lora_A.weight");
        let b = format!("{PEFT_PREFIX}{stem}.lora_B.weight");
        Ok(Some(Lora {
            a: Param::new(a.clone(), self.shapes.get(&a, &[spec.r, in_dim])?),
            b: Param::new(b.clone(), self.shapes.get(&b, &[out_dim, spec.r])?),
            scale: spec.scale(),
            dropout: spec.dropout,
        }))
    }
}

/// Reads a config: a config JSON file or a model directory holding `config.json`.
pub fn read_config(path: &Path) -> anyhow::Result<BunnyConfig> {
    let file = if path.is_dir() { path.join("config.json") } else { path.to_path_buf() };
    BunnyConfig::from_file(&file).with_context(|| format!("--config {}", file.display()))
}

/// Plans one stage of training `config` (see the module docs).
pub fn plan(config: &BunnyConfig, input: &PlanInput) -> anyhow::Result<Plan> {
    let mut config = config.clone();
    if input.modules.prompt && config.model_type == ModelType::Bunny {
        // As the trainer: training the prompt module makes the model Q-Adapt.
        config.model_type = ModelType::QAdapt;
        config.qformer_config.get_or_insert_with(Default::default);
    }
    let src = PlanSource { shapes: ShapeOnly::new(dims_from_config(&config)), lora: input.lora.clone() };
    let model = Bunny::new(&src, config.clone()).context("building the model from the config")?;
    let (modules, unfreeze) = (input.modules, input.unfreeze_qformer);
    let trains = move |key: &str| key.contains(".lora_A.") || key.contains(".lora_B.") || modules.trains(key, unfreeze);
    let (mut frozen, mut trainable) = (0usize, 0usize);
    for (key, dims) in src.shapes.requested() {
        let n: usize = dims.iter().product();
        if trains(&key) {
            trainable += n;
        } else {
            frozen += n;
        }
    }

    let (b, l) = (input.batch_size.max(1), input.max_length);
    let v = &config.vision_config;
    let n_img = v.num_patches();
    anyhow::ensure!(l > n_img, "--max-length {l} leaves no text after the {n_img} image tokens");
    let text = l - n_img;
    let answers = input.answer_tokens.unwrap_or(text).min(text).max(1);
    let mut m = Meter::new(input.dtype, input.gradient_checkpointing, trains);
    let pixels = m.input(&[b, 3, v.image_size, v.image_size], input.dtype);
    let q_ids = m.input(&[b, input.qformer_tokens.max(1)], DType::I64);
    let q_mask = m.input(&[b, input.qformer_tokens.max(1)], DType::I64);
    let q = model.is_qadapt().then_some(QFormerText { input_ids: &q_ids, attention_mask: &q_mask });
    let feats = model.image_features(&mut m, &pixels, q)?.projected; // [B, N, D]
    let d = feats.dims[2];
    // The splice of `step::batch_loss`: text embeddings, image rows and a zero row, picked per position.
    let ids = m.input(&[1, b * text], DType::I64);
    let text_emb = model.llm.embed(&mut m, &ids)?;
    let text_emb = reshape(&mut m, &text_emb, &[b * text, d])?;
    let feats = reshape(&mut m, &feats, &[b * n_img, d])?;
    let zero = m.input(&[1, d], input.dtype);
    let table = Ops::cat(&mut m, &[text_emb, feats, zero], 0)?; // [T + B·N + 1, D]
    let embeds = m.select_rows(&table, b * l);
    let embeds = reshape(&mut m, &embeds, &[b, l, d])?;
    let mask = m.input(&[b, l], DType::I64);
    let pos = m.input(&[b, l], DType::I64);
    let (hidden, _) = model.llm.hidden(&mut m, &embeds, &mask, &pos, None)?;
    let picked = m.select_rows(&hidden, b * answers);
    let logits = model.llm.lm_head.forward(&mut m, &picked)?;
    let loss = m.cross_entropy(&logits);
    let act = m.activations(&loss);

    let bytes = input.dtype.size_in_bytes();
    // f32 master copy, gradient, AdamW's m and v; below f32 the forward also sees a cast copy.
    let per_trainable = 16 + if input.dtype == DType::F32 { 0 } else { bytes };
    let pixels_bytes = b * 3 * v.image_size * v.image_size * 4;
    Ok(Plan {
        weights: frozen * bytes,
        trainable: trainable * per_trainable,
        activations: act.kept + act.backward,
        activations_kept: act.kept,
        workspace: PROCESS_BYTES + pixels_bytes,
        frozen_params: frozen,
        trainable_params: trainable,
    })
}

/// A view with new dims (the meter's reshape of a contiguous tensor).
fn reshape(m: &mut Meter, x: &Shaped, dims: &[usize]) -> anyhow::Result<Shaped> {
    let n: usize = dims.iter().product();
    anyhow::ensure!(n == x.dims.iter().product::<usize>(), "reshape {:?} to {dims:?}", x.dims);
    // A narrow over the whole tensor is a view; splitting the rows is the same storage.
    let mut y = Ops::narrow(m, x, 0, 0, None)?;
    y.dims = dims.to_vec();
    Ok(y)
}
