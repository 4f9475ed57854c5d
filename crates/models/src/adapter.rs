//! Adapters applied at load time, in PEFT's on-disk layout (what `qadapt-train` writes and what Bunny's
//! own LoRA runs save):
//!
//! - `adapter_config.json` (`r`, `lora_alpha`, optional `use_rslora`) and `adapter_model.safetensors`
//!   with `base_model.model.<key without .weight>.lora_A.weight` [r, in] and `….lora_B.weight` [out, r];
//! - optionally `non_lora_trainables.safetensors`: full tensors (connector, prompt module) that replace
//!   the base ones, keys with or without the `base_model.model.` prefix.
//!
//! [`AdaptedSource`] wraps the base checkpoint and serves `W + scale·B·A` for adapted weights, so every
//! module sees plain merged linears and no forward pass knows adapters exist.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use crate::loader::WeightSource;
use crate::{Error, Result};

const PEFT_PREFIX: &str = "base_model.model.";

#[derive(Debug, Deserialize)]
struct AdapterConfig {
    r: usize,
    lora_alpha: f64,
    #[serde(default)]
    use_rslora: bool,
}

/// A base checkpoint with a LoRA adapter (and replacement tensors) merged on load.
pub struct AdaptedSource<'a> {
    base: &'a dyn WeightSource,
    /// base key (`….weight`) → (A [r, in], B [out, r])
    lora: HashMap<String, (Tensor, Tensor)>,
    replace: HashMap<String, Tensor>,
    scale: f64,
    dtype: DType,
}

fn adapter_err(path: &Path, msg: impl std::fmt::Display) -> Error {
    Error::Checkpoint { path: path.to_path_buf(), msg: msg.to_string() }
}

fn load_all(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load(path, device)
        .map_err(|e| adapter_err(path, format!("not a valid safetensors file: {e}")))
}

impl<'a> AdaptedSource<'a> {
    /// Reads an adapter directory written by `qadapt-train` or PEFT.
    pub fn open(base: &'a dyn WeightSource, dir: &Path, device: &Device, dtype: DType) -> Result<Self> {
        if !dir.is_dir() {
            return Err(adapter_err(dir, "adapter directory not found"));
        }
        let cfg_path = dir.join("adapter_config.json");
        let model_path = dir.join("adapter_model.safetensors");
        let full_path: PathBuf = dir.join("non_lora_trainables.safetensors");
        let mut lora = HashMap::new();
        let mut scale = 1.0;
        if model_path.exists() {
            let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
            let cfg: AdapterConfig = serde_json::from_str(&text)
                .map_err(|e| adapter_err(&cfg_path, format!("invalid adapter config: {e}")))?;
            if cfg.r == 0 {
                return Err(adapter_err(&cfg_path, "r must be ≥ 1"));
            }
            scale = if cfg.use_rslora { cfg.lora_alpha / (cfg.r as f64).sqrt() } else { cfg.lora_alpha / cfg.r as f64 };
            let mut tensors = load_all(&model_path, device)?;
            let a_keys: Vec<String> = tensors.keys().filter(|k| k.ends_with(".lora_A.weight")).cloned().collect();
            for a_key in a_keys {
                let stem = a_key.trim_end_matches(".lora_A.weight");
                let b_key = format!("{stem}.lora_B.weight");
                let a = tensors.remove(&a_key).ok_or_else(|| adapter_err(&model_path, format!("missing {a_key}")))?;
                let b = tensors
                    .remove(&b_key)
                    .ok_or_else(|| adapter_err(&model_path, format!("{a_key} has no matching {b_key}")))?;
                let base_key = format!("{}.weight", stem.strip_prefix(PEFT_PREFIX).unwrap_or(stem));
                lora.insert(base_key, (a.to_dtype(DType::F32)?, b.to_dtype(DType::F32)?));
            }
            if let Some(k) = tensors.keys().next() {
                return Err(adapter_err(
                    &model_path,
                    format!("unexpected tensor {k} (only lora_A / lora_B pairs belong here)"),
                ));
            }
        } else if !full_path.exists() {
            return Err(adapter_err(
                dir,
                "neither adapter_model.safetensors nor non_lora_trainables.safetensors is present",
            ));
        }
        let mut replace = HashMap::new();
        if full_path.exists() {
            for (k, t) in load_all(&full_path, device)? {
                replace.insert(k.strip_prefix(PEFT_PREFIX).unwrap_or(&k).to_string(), t);
            }
        }
        let src = Self { base, lora, replace, scale, dtype };
        src.check()?;
        Ok(src)
    }

    /// Every adapted key must exist in the base with a compatible shape, and every replaced key the
    /// base has must keep its shape.
    fn check(&self) -> Result<()> {
        for (key, (a, b)) in &self.lora {
            let found = self
                .base
                .shape(key)
                .ok_or_else(|| Error::MissingKey { key: format!("{key} (targeted by the adapter)") })?;
            let (r, din) = a.dims2()?;
            let (dout, rb) = b.dims2()?;
            if rb != r || found != [dout, din] {
                return Err(Error::ShapeMismatch {
                    key: format!("{key} (LoRA B·A)"),
                    expected: found,
                    found: vec![dout, din],
                });
            }
        }
        // A stage-2 run also carries prompt-module tensors a plain base lacks: those are added.
        for (key, t) in &self.replace {
            if let Some(found) = self.base.shape(key) {
                if found != t.dims() {
                    return Err(Error::ShapeMismatch { key: key.clone(), expected: found, found: t.dims().to_vec() });
                }
            }
        }
        Ok(())
    }

    /// Number of LoRA-adapted weights and of replaced tensors.
    pub fn counts(&self) -> (usize, usize) {
        (self.lora.len(), self.replace.len())
    }
}

impl WeightSource for AdaptedSource<'_> {
    fn shape(&self, key: &str) -> Option<Vec<usize>> {
        self.base.shape(key).or_else(|| self.replace.get(key).map(|t| t.dims().to_vec()))
    }

    fn get(&self, key: &str, expected: &[usize]) -> Result<Tensor> {
        if let Some(t) = self.replace.get(key) {
            if self.base.shape(key).is_some() {
                // Mark the base tensor as used without keeping it: the replacement wins.
                drop(self.base.get(key, expected)?);
            } else if t.dims() != expected {
                return Err(Error::ShapeMismatch {
                    key: format!("{key} (added by the adapter)"),
                    expected: expected.to_vec(),
                    found: t.dims().to_vec(),
                });
            }
            return Ok(t.to_dtype(self.dtype)?);
        }
        let w = self.base.get(key, expected)?;
        match self.lora.get(key) {
            None => Ok(w),
            Some((a, b)) => {
                // Merge in f32, then back to the compute dtype.
                let delta = (b.matmul(a)? * self.scale)?;
                Ok((w.to_dtype(DType::F32)? + delta)?.to_dtype(self.dtype)?)
            }
        }
    }
}

/// The adapter directory of a `qadapt-train` run: `RUN/final` when there is one, else `run` itself
/// (a checkpoint or a PEFT adapter directory given directly).
pub fn adapter_dir(run: &Path) -> PathBuf {
    let f = run.join("final");
    if f.is_dir() {
        f
    } else {
        run.to_path_buf()
    }
}
