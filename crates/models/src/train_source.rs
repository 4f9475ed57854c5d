//! Weight sources for training: which tensors become trainable variables (f32 master copies), where
//! LoRA adapters attach, and random initialisation for weights a checkpoint does not have.

use std::cell::RefCell;
use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::loader::WeightSource;
use crate::ops::Lora;
use crate::Result;

/// PEFT's key prefix for adapter tensors.
pub const PEFT_PREFIX: &str = "base_model.model.";

/// Where LoRA goes and how big it is.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LoraSpec {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f32,
    /// Last path segments of the targeted linears, e.g. `q_proj`, `fc1`.
    pub targets: Vec<String>,
    /// Key prefixes of the towers that get adapters, e.g. `model.layers.` and the vision prefix.
    pub scopes: Vec<String>,
}

impl LoraSpec {
    /// Does the linear with weight `weight_key` get an adapter?
    pub fn applies(&self, weight_key: &str) -> bool {
        let Some(stem) = weight_key.strip_suffix(".weight") else { return false };
        let last = stem.rsplit('.').next().unwrap_or(stem);
        self.scopes.iter().any(|s| stem.starts_with(s.as_str())) && self.targets.iter().any(|t| t == last)
    }
    /// `alpha / r`.
    pub fn scale(&self) -> f64 {
        self.alpha / self.r as f64
    }
}

/// How a freshly initialised weight starts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    Zeros,
    Ones,
    Normal(f64),
}

/// Initial value of a weight, by its name: LayerNorm weights 1, biases 0, embedding tables and
/// query tokens N(0, 0.5²), SigLIP positions N(0, 1/width), other weights N(0, 1/fan_in) (fan_in = product of all dims but the first).
/// Fan-in scaling keeps activations and logits O(1) at any width, so a random model is a usable
/// frozen base for LoRA (with HF's N(0, 0.02²) a frozen tiny lm_head caps every logit near 1).
pub fn init_rule(key: &str, shape: &[usize]) -> Init {
    let lower = key.to_ascii_lowercase();
    let is_norm = lower.contains("norm") || key.contains("vlm_att_ln");
    let is_table = ["embed_tokens.weight", "word_embeddings.weight", "position_embeddings.weight", "vlm_att_query"]
        .iter()
        .any(|s| key.ends_with(s));
    if key.ends_with(".bias") {
        Init::Zeros
    } else if is_norm && key.ends_with(".weight") {
        Init::Ones
    } else if key.ends_with("position_embedding.weight") {
        // SigLIP's own init (1/√width): larger positions would drown the patch content.
        Init::Normal(1.0 / (*shape.last().unwrap_or(&1) as f64).sqrt())
    } else if is_table {
        Init::Normal(0.5)
    } else {
        Init::Normal(1.0 / (shape.iter().skip(1).product::<usize>().max(1) as f64).sqrt())
    }
}

/// [`init_rule`] drawn on the CPU from a seeded RNG (reproducible across machines).
pub fn init_tensor(key: &str, shape: &[usize], rng: &mut StdRng, device: &Device) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let data: Vec<f32> = match init_rule(key, shape) {
        Init::Zeros => vec![0.0; n],
        Init::Ones => vec![1.0; n],
        Init::Normal(std) => (0..n).map(|_| (normal(rng) * std) as f32).collect(),
    };
    Ok(Tensor::from_vec(data, shape, device)?)
}

/// A source with no files at all: every weight is drawn by [`init_rule`] on the device itself (fast
/// on a GPU), in `dtype`. For benchmarks and from-scratch runs at any size.
pub struct RandomSource {
    pub device: Device,
    pub dtype: DType,
    /// Dims the model reads from weights (see `bunny::dims_from_config`).
    pub known: HashMap<String, Vec<usize>>,
}

impl WeightSource for RandomSource {
    fn shape(&self, key: &str) -> Option<Vec<usize>> {
        self.known.get(key).cloned()
    }

    fn get(&self, key: &str, expected: &[usize]) -> Result<Tensor> {
        let t = match init_rule(key, expected) {
            Init::Zeros => Tensor::zeros(expected, self.dtype, &self.device)?,
            Init::Ones => Tensor::ones(expected, self.dtype, &self.device)?,
            Init::Normal(std) => Tensor::randn(0f32, std as f32, expected, &self.device)?.to_dtype(self.dtype)?,
        };
        Ok(t)
    }
}

/// A standard normal sample (Box–Muller; rand's distributions live in another crate).
pub fn normal(rng: &mut StdRng) -> f64 {
    let u1: f64 = rng.random::<f64>().max(1e-300);
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// A source for training: frozen tensors pass through from `base`; keys selected by `trainable`
/// become [`Var`]s in f32 (the master copy; the forward sees them cast to the compute dtype); LoRA
/// adapters attach per `lora`. `init` overrides starting values (resume, `--qformer-init`), and keys
/// that neither has are randomly initialised when `random_missing` allows it.
pub struct TrainSource<'a> {
    base: &'a dyn WeightSource,
    trainable: Box<dyn Fn(&str) -> bool + 'a>,
    lora: Option<LoraSpec>,
    init: HashMap<String, Tensor>,
    random_missing: Box<dyn Fn(&str) -> bool + 'a>,
    /// Shapes of keys the base may lack, answered from the config (see [`TrainSource::with_shapes`]).
    shapes: HashMap<String, Vec<usize>>,
    vars: RefCell<Vec<(String, Var)>>,
    randomised: RefCell<Vec<String>>,
    /// Frozen tensors the base lacks (drawn at random, or restored from a checkpoint that saved
    /// such a draw): the model needs them saved beside the trainables, since the base does not hold them.
    frozen_new: RefCell<Vec<(String, Tensor)>>,
    rng: RefCell<StdRng>,
    device: Device,
    dtype: DType,
}

impl<'a> TrainSource<'a> {
    /// See the type's docs. `seed` drives LoRA A and any random initialisation.
    pub fn new(
        base: &'a dyn WeightSource,
        trainable: impl Fn(&str) -> bool + 'a,
        lora: Option<LoraSpec>,
        device: &Device,
        dtype: DType,
        seed: u64,
    ) -> Self {
        Self {
            base,
            trainable: Box::new(trainable),
            lora,
            init: HashMap::new(),
            random_missing: Box::new(|_| false),
            shapes: HashMap::new(),
            vars: RefCell::new(Vec::new()),
            randomised: RefCell::new(Vec::new()),
            frozen_new: RefCell::new(Vec::new()),
            rng: RefCell::new(StdRng::seed_from_u64(seed)),
            device: device.clone(),
            dtype,
        }
    }

    /// Starting values that win over the base (keys as saved: PEFT names for LoRA, plain otherwise).
    pub fn with_init(mut self, init: HashMap<String, Tensor>) -> Self {
        self.init = init;
        self
    }

    /// Keys for which a missing tensor is randomly initialised instead of being an error.
    pub fn with_random_missing(mut self, f: impl Fn(&str) -> bool + 'a) -> Self {
        self.random_missing = Box::new(f);
        self
    }

    /// Shapes for keys that are randomly initialised when missing but that a module reads its
    /// dims from (the prompt module's query count and widths): `bunny::dims_from_config`.
    pub fn with_shapes(mut self, shapes: HashMap<String, Vec<usize>>) -> Self {
        self.shapes = shapes;
        self
    }

    /// The trainable variables created so far, with the keys they are saved under.
    pub fn vars(&self) -> Vec<(String, Var)> {
        self.vars.borrow().clone()
    }

    /// Keys that were randomly initialised because the checkpoint lacked them.
    pub fn randomised(&self) -> Vec<String> {
        self.randomised.borrow().clone()
    }

    /// The frozen tensors the base lacks (in f32), to be saved with the trainables.
    pub fn frozen_new(&self) -> Vec<(String, Tensor)> {
        self.frozen_new.borrow().clone()
    }

    fn make_var(&self, key: &str, value: Tensor) -> Result<Tensor> {
        let var = Var::from_tensor(&value.to_dtype(DType::F32)?)?;
        let t = var.as_tensor().to_dtype(self.dtype)?;
        self.vars.borrow_mut().push((key.to_string(), var));
        Ok(t)
    }
}

impl WeightSource for TrainSource<'_> {
    fn shape(&self, key: &str) -> Option<Vec<usize>> {
        self.init.get(key).map(|t| t.dims().to_vec()).or_else(|| self.base.shape(key)).or_else(|| {
            if (self.random_missing)(key) {
                self.shapes.get(key).cloned()
            } else {
                None
            }
        })
    }

    fn get(&self, key: &str, expected: &[usize]) -> Result<Tensor> {
        let value = match self.init.get(key) {
            Some(t) if t.dims() == expected => t.to_device(&self.device)?,
            Some(t) => {
                return Err(crate::Error::ShapeMismatch {
                    key: key.to_string(),
                    expected: expected.to_vec(),
                    found: t.dims().to_vec(),
                })
            }
            None if self.base.shape(key).is_none() && (self.random_missing)(key) => {
                self.randomised.borrow_mut().push(key.to_string());
                init_tensor(key, expected, &mut self.rng.borrow_mut(), &self.device)?
            }
            None => self.base.get(key, expected)?,
        };
        if (self.trainable)(key) {
            self.make_var(key, value)
        } else {
            // Drawn here, or restored from a checkpoint that saved such a draw: the base lacks it.
            if self.base.shape(key).is_none() {
                self.frozen_new.borrow_mut().push((key.to_string(), value.to_dtype(DType::F32)?));
            }
            Ok(value.to_dtype(self.dtype)?)
        }
    }

    fn lora(&self, weight_key: &str, in_dim: usize, out_dim: usize) -> Result<Option<Lora>> {
        let Some(spec) = &self.lora else { return Ok(None) };
        if !spec.applies(weight_key) {
            return Ok(None);
        }
        let stem = weight_key.trim_end_matches(".weight");
        let (ka, kb) = (format!("{PEFT_PREFIX}{stem}.lora_A.weight"), format!("{PEFT_PREFIX}{stem}.lora_B.weight"));
        // PEFT's init: A ~ kaiming-uniform(a=√5) = U(±1/√in), B = 0, so training starts at the base model.
        let a = match self.init.get(&ka) {
            Some(t) => t.clone(),
            None => {
                let bound = 1.0 / (in_dim as f64).sqrt();
                let mut rng = self.rng.borrow_mut();
                let data: Vec<f32> =
                    (0..spec.r * in_dim).map(|_| ((rng.random::<f64>() * 2.0 - 1.0) * bound) as f32).collect();
                Tensor::from_vec(data, (spec.r, in_dim), &self.device)?
            }
        };
        let b = match self.init.get(&kb) {
            Some(t) => t.clone(),
            None => Tensor::zeros((out_dim, spec.r), DType::F32, &self.device)?,
        };
        let a = crate::ops::Param::new(ka.clone(), self.make_var(&ka, a)?);
        let b = crate::ops::Param::new(kb.clone(), self.make_var(&kb, b)?);
        Ok(Some(Lora { a, b, scale: spec.scale(), dropout: spec.dropout }))
    }
}
