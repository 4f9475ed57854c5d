//! Hub checkpoints as they ship: `model.safetensors`, or shards named by `model.safetensors.index.json`;
//! f32 / f16 / bf16 weights. Files are memory-mapped and each tensor is materialised once, already in
//! the compute dtype, when a constructor asks for it by key — never a second copy of the whole file.
//!
//! Constructors receive a [`Vb`] scoped to their prefix and name only their children, so full keys
//! emerge from the module tree and no translation table exists. Every requested key is recorded; the
//! keys nobody asked for are compared with a short list of known extras (see [`is_known_extra`]).

use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;
use safetensors::tensor::TensorInfo;
use safetensors::SafeTensors;

use crate::ops::Param;
use crate::{Error, Result};

/// Where weights come from: a checkpoint on disk, an adapter over it, fresh random values, or
/// (in training) variables. Constructors state the shape they expect; the source checks it.
pub trait WeightSource {
    /// Shape of a stored tensor, if the source has one (used where dims come from the weights).
    fn shape(&self, key: &str) -> Option<Vec<usize>>;
    /// The tensor under `key` in the compute dtype. Errors name the key: absent, or not `expected`.
    fn get(&self, key: &str, expected: &[usize]) -> Result<Tensor>;
    /// A LoRA adapter for the linear layer whose weight is `weight_key` ([out, in]), if this source
    /// attaches one (training does; loading for inference merges adapters instead).
    fn lora(&self, _weight_key: &str, _in_dim: usize, _out_dim: usize) -> Result<Option<crate::ops::Lora>> {
        Ok(None)
    }
}

/// The safetensors files of one model directory, memory-mapped.
pub struct Checkpoint {
    files: Vec<(PathBuf, Mmap, usize)>,
    index: HashMap<String, (usize, TensorInfo)>,
    used: RefCell<BTreeSet<String>>,
    device: Device,
    dtype: DType,
}

impl Checkpoint {
    /// Opens `dir/model.safetensors` or the shards of `dir/model.safetensors.index.json`.
    /// Tensors are cast to `dtype` and placed on `device` when loaded.
    pub fn open(dir: &Path, device: &Device, dtype: DType) -> Result<Self> {
        let index_path = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let (paths, weight_map) = if index_path.exists() {
            let text = std::fs::read_to_string(&index_path).map_err(|e| Error::io(&index_path, e))?;
            let json: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| Error::Checkpoint { path: index_path.clone(), msg: format!("invalid JSON: {e}") })?;
            let map = json.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| Error::Checkpoint {
                path: index_path.clone(),
                msg: "no \"weight_map\" object".into(),
            })?;
            let mut files: Vec<String> = Vec::new();
            let mut weight_map = HashMap::new();
            for (key, file) in map {
                let file = file.as_str().ok_or_else(|| Error::Checkpoint {
                    path: index_path.clone(),
                    msg: format!("weight_map entry for {key} is not a file name"),
                })?;
                if !files.iter().any(|f| f == file) {
                    files.push(file.to_string());
                }
                weight_map.insert(key.clone(), file.to_string());
            }
            files.sort();
            (files.into_iter().map(|f| dir.join(f)).collect::<Vec<_>>(), Some(weight_map))
        } else if single.exists() {
            (vec![single], None)
        } else {
            return Err(Error::Checkpoint {
                path: dir.to_path_buf(),
                msg: "no model.safetensors and no model.safetensors.index.json".into(),
            });
        };

        let mut files = Vec::with_capacity(paths.len());
        let mut index = HashMap::new();
        for (fi, path) in paths.iter().enumerate() {
            if !path.exists() {
                return Err(Error::Checkpoint {
                    path: path.clone(),
                    msg: "shard named in model.safetensors.index.json is missing".into(),
                });
            }
            let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
            // SAFETY: the map is read-only; a checkpoint modified while we run is outside our contract.
            let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
            let (n, meta) = SafeTensors::read_metadata(&mmap).map_err(|e| Error::Checkpoint {
                path: path.clone(),
                msg: format!("not a valid safetensors file (truncated or corrupt?): {e}"),
            })?;
            for (key, info) in meta.tensors() {
                index.insert(key, (fi, info.clone()));
            }
            files.push((path.clone(), mmap, 8 + n));
        }
        if let Some(wm) = weight_map {
            for (key, file) in wm {
                match index.get(&key) {
                    Some((fi, _)) if files[*fi].0.file_name().and_then(|f| f.to_str()) == Some(file.as_str()) => {}
                    _ => {
                        return Err(Error::Checkpoint {
                            path: dir.join(&file),
                            msg: format!("the index places {key} in this shard, but it is not there"),
                        })
                    }
                }
            }
        }
        Ok(Self { files, index, used: RefCell::new(BTreeSet::new()), device: device.clone(), dtype })
    }

    /// All keys in the checkpoint.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(|k| k.as_str())
    }

    /// Keys present in the files that no constructor asked for.
    pub fn unused_keys(&self) -> Vec<String> {
        let used = self.used.borrow();
        let mut v: Vec<String> = self.index.keys().filter(|k| !used.contains(*k)).cloned().collect();
        v.sort();
        v
    }

    /// Stored dtype of a tensor (e.g. to report what a checkpoint holds).
    pub fn stored_dtype(&self, key: &str) -> Option<safetensors::Dtype> {
        self.index.get(key).map(|(_, i)| i.dtype)
    }
}

impl WeightSource for Checkpoint {
    fn shape(&self, key: &str) -> Option<Vec<usize>> {
        self.index.get(key).map(|(_, i)| i.shape.clone())
    }

    fn get(&self, key: &str, expected: &[usize]) -> Result<Tensor> {
        let (fi, info) = self.index.get(key).ok_or_else(|| Error::MissingKey { key: key.to_string() })?;
        if info.shape != expected {
            return Err(Error::ShapeMismatch {
                key: key.to_string(),
                expected: expected.to_vec(),
                found: info.shape.clone(),
            });
        }
        let (path, mmap, start) = &self.files[*fi];
        let bytes = &mmap[start + info.data_offsets.0..start + info.data_offsets.1];
        let dt = DType::try_from(info.dtype)
            .map_err(|e| Error::Checkpoint { path: path.clone(), msg: format!("{key}: {e}") })?;
        let t = Tensor::from_raw_buffer(bytes, dt, &info.shape, &self.device)?;
        // The tensor now owns its data: let the kernel drop the mapped file pages, so that loading
        // never holds the checkpoint twice (file cache + tensors). The map is read-only and shared,
        // so pages touched again later are simply re-read from the file.
        #[cfg(unix)]
        // SAFETY: MADV_DONTNEED on a read-only shared file mapping only discards clean page-cache
        // pages of this process's view; no Rust reference into the range outlives this call.
        unsafe {
            let _ = mmap.unchecked_advise_range(
                memmap2::UncheckedAdvice::DontNeed,
                start + info.data_offsets.0,
                bytes.len(),
            );
        }
        self.used.borrow_mut().insert(key.to_string());
        // Integer buffers (position_ids) keep their type; floating weights go to the compute dtype.
        Ok(if dt.is_float() { t.to_dtype(self.dtype)? } else { t })
    }
}

/// Extras the real checkpoints carry that Bunny never runs (DESIGN §7.10): SigLIP's `post_layernorm`
/// and pooling `head`, vision layers past the second-to-last, and BERT's `position_ids` buffer.
pub fn is_known_extra(key: &str, vision_layers_used: usize) -> bool {
    const VISION: &str = "model.vision_tower.vision_tower.vision_model.";
    if let Some(rest) = key.strip_prefix(VISION) {
        if rest.starts_with("post_layernorm.") || rest.starts_with("head.") {
            return true;
        }
        if let Some(n) = rest.strip_prefix("encoder.layers.").and_then(|r| r.split('.').next()) {
            return n.parse::<usize>().is_ok_and(|i| i >= vision_layers_used);
        }
    }
    key.ends_with("embeddings.position_ids")
}

/// A weight source scoped to a key prefix, as candle's `VarBuilder::pp`.
#[derive(Clone)]
pub struct Vb<'a> {
    src: &'a dyn WeightSource,
    prefix: String,
}

impl<'a> Vb<'a> {
    /// The root scope of a source.
    pub fn root(src: &'a dyn WeightSource) -> Self {
        Self { src, prefix: String::new() }
    }

    /// A child scope: `pp("layers").pp(3)` → `layers.3.`.
    pub fn pp(&self, name: impl std::fmt::Display) -> Self {
        let prefix = if self.prefix.is_empty() { name.to_string() } else { format!("{}.{name}", self.prefix) };
        Self { src: self.src, prefix }
    }

    /// The full key of a child.
    pub fn key(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    /// Shape of a child tensor, if stored.
    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.src.shape(&self.key(name))
    }

    /// Shape of a child tensor, or an error naming its full key.
    pub fn require_shape(&self, name: &str) -> Result<Vec<usize>> {
        let key = self.key(name);
        self.src.shape(&key).ok_or(Error::MissingKey { key })
    }

    /// A child tensor whose shape must be `shape`.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Param> {
        let key = self.key(name);
        let t = self.src.get(&key, shape)?;
        Ok(Param::new(key, t))
    }

    /// The LoRA adapter the source attaches to this scope's linear layer (`{scope}.weight`), if any.
    pub fn lora(&self, in_dim: usize, out_dim: usize) -> Result<Option<crate::ops::Lora>> {
        self.src.lora(&self.key("weight"), in_dim, out_dim)
    }

    /// A child tensor that may be absent (e.g. an optional bias): present only if the source has it.
    pub fn get_opt(&self, name: &str, shape: &[usize]) -> Result<Option<Param>> {
        if self.shape(name).is_none() {
            return Ok(None);
        }
        self.get(name, shape).map(Some)
    }
}

/// A source that has no data: every weight is a zero of the requested shape, broadcast from a
/// scalar (no memory). It records what the model asks for, so a config alone yields the exact
/// parameter list — names, shapes, count — of the model it describes, at any size.
pub struct ShapeOnly {
    /// Answers for the dims the model reads from the weights (e.g. the Q-Former's query count).
    pub known: HashMap<String, Vec<usize>>,
    requested: RefCell<Vec<(String, Vec<usize>)>>,
}

impl ShapeOnly {
    /// A source whose `shape` answers from `known`.
    pub fn new(known: HashMap<String, Vec<usize>>) -> Self {
        Self { known, requested: RefCell::new(Vec::new()) }
    }

    /// Every (key, shape) requested so far, in request order.
    pub fn requested(&self) -> Vec<(String, Vec<usize>)> {
        self.requested.borrow().clone()
    }
}

impl WeightSource for ShapeOnly {
    fn shape(&self, key: &str) -> Option<Vec<usize>> {
        self.known.get(key).cloned()
    }

    fn get(&self, key: &str, expected: &[usize]) -> Result<Tensor> {
        self.requested.borrow_mut().push((key.to_string(), expected.to_vec()));
        Ok(Tensor::zeros((), DType::F32, &Device::Cpu)?.broadcast_as(expected)?)
    }
}
