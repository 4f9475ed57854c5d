//! `qadapt-train merge`: base model ⊕ stage-1 LoRA (merged) ⊕ stage-1 connector ⊕ stage-2 prompt
//! module and connector → an HF-format directory that `infer` and the exporter load like any hub model.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use models::adapter::AdaptedSource;
use models::loader::{Checkpoint, WeightSource};

use crate::files::{copy_tokenizers, write_dir_atomic};
use crate::shards::write_sharded;
use crate::train::adapter_dir;

/// Writes the merged directory; returns (tensors, shards).
pub fn run(
    model: &Path,
    stage1: &Path,
    stage2: Option<&Path>,
    out: &Path,
    dtype: Option<DType>,
    shard_bytes: usize,
) -> anyhow::Result<(usize, usize)> {
    let dev = Device::Cpu;
    let ck = Checkpoint::open(model, &dev, DType::F32)?;
    let src = AdaptedSource::open(&ck, &adapter_dir(stage1), &dev, DType::F32)?;
    let mut stage2_tensors: HashMap<String, Tensor> = HashMap::new();
    let mut config_path: PathBuf = model.join("config.json");
    if let Some(r2) = stage2 {
        let d = adapter_dir(r2);
        let p = d.join("non_lora_trainables.safetensors");
        stage2_tensors =
            candle_core::safetensors::load(&p, &dev).with_context(|| format!("reading {}", p.display()))?;
        if d.join("config.json").exists() {
            config_path = d.join("config.json");
        }
    }
    let mut keys: Vec<String> = ck.keys().map(str::to_string).collect();
    keys.extend(stage2_tensors.keys().filter(|k| ck.shape(k).is_none()).cloned());
    keys.sort();
    let entries: Vec<(String, Vec<usize>)> = keys
        .iter()
        .map(|k| {
            let shape = stage2_tensors.get(k).map(|t| t.dims().to_vec()).or_else(|| ck.shape(k)).unwrap_or_default();
            (k.clone(), shape)
        })
        .collect();
    // Integer buffers (position_ids) cannot take a float dtype: they are dropped (nothing reads them).
    let entries: Vec<_> = entries.into_iter().filter(|(k, _)| !k.ends_with("position_ids")).collect();
    let out_dtype = dtype.unwrap_or_else(|| match ck.stored_dtype(&entries[0].0) {
        Some(safetensors::Dtype::BF16) => DType::BF16,
        Some(safetensors::Dtype::F16) => DType::F16,
        _ => DType::F32,
    });
    let mut shards = 0;
    write_dir_atomic(out, |dir| {
        copy_tokenizers(model, dir)?;
        std::fs::copy(&config_path, dir.join("config.json"))
            .with_context(|| format!("copying {}", config_path.display()))?;
        shards = write_sharded(dir, &entries, out_dtype, shard_bytes, |k, s| match stage2_tensors.get(k) {
            Some(t) => Ok(t.clone()),
            None => Ok(src.get(k, s)?),
        })?;
        Ok(())
    })?;
    Ok((entries.len(), shards))
}
