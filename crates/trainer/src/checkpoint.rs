//! What a run directory holds besides its metrics: the trainable weights of a checkpoint or of
//! `final/` (PEFT layout), finding the latest checkpoint, clearing what a kill left half-written,
//! and the Q-Former weights `--qformer-init` maps in.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use candle_core::{DType, Tensor, Var};
use models::train_source::LoraSpec;

/// Maps InstructBLIP Q-Former weights (LAVIS `Qformer.bert.*`, `query_tokens`, `ln_vision`, or HF
/// `qformer.*`) to Q-Adapt keys.
pub fn qformer_init_map(path: &Path, device: &candle_core::Device) -> anyhow::Result<HashMap<String, Tensor>> {
    let file = if path.is_dir() { path.join("model.safetensors") } else { path.to_path_buf() };
    let raw =
        candle_core::safetensors::load(&file, device).with_context(|| format!("--qformer-init {}", file.display()))?;
    let mut out = HashMap::new();
    for (k, t) in raw {
        let key = if let Some(r) = k.strip_prefix("Qformer.bert.") {
            format!("model.vlm_att_encoder.bert.{r}")
        } else if let Some(r) = k.strip_prefix("qformer.") {
            let r = r
                .replace(".attention.attention.", ".attention.self.")
                .replace(".crossattention.attention.", ".crossattention.self.");
            let r = r.replace("embeddings.layernorm.", "embeddings.LayerNorm.");
            let r = if let Some(x) = r.strip_prefix("layernorm.") { format!("embeddings.LayerNorm.{x}") } else { r };
            format!("model.vlm_att_encoder.bert.{r}")
        } else if k == "query_tokens" {
            "model.vlm_att_query".into()
        } else if let Some(r) = k.strip_prefix("ln_vision.") {
            format!("model.vlm_att_ln.{r}")
        } else {
            continue;
        };
        if key.ends_with("position_ids") {
            continue;
        }
        out.insert(key, t.to_dtype(DType::F32)?);
    }
    anyhow::ensure!(
        !out.is_empty(),
        "--qformer-init {}: no Q-Former tensors (Qformer.bert.*, qformer.*, query_tokens, ln_vision.*)",
        file.display()
    );
    Ok(out)
}

/// The run's `checkpoint-N` of largest N.
pub fn latest_checkpoint(run: &Path) -> Option<(usize, PathBuf)> {
    std::fs::read_dir(run)
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            name.strip_prefix("checkpoint-").and_then(|n| n.parse::<usize>().ok()).map(|n| (n, e.path()))
        })
        .max_by_key(|(n, _)| *n)
}

/// Writes the trainable weights of `vars` in PEFT layout: LoRA to `adapter_model.safetensors` (with
/// its `adapter_config.json`), full tensors to `non_lora_trainables.safetensors`.
pub fn save_trainables(dir: &Path, vars: &[(String, Var)], lora: Option<&LoraSpec>) -> anyhow::Result<()> {
    let (mut lo, mut full): (HashMap<String, Tensor>, HashMap<String, Tensor>) = (HashMap::new(), HashMap::new());
    for (k, v) in vars {
        let t = v.as_tensor().detach().to_dtype(DType::F32)?.to_device(&candle_core::Device::Cpu)?;
        if k.contains(".lora_") {
            lo.insert(k.clone(), t);
        } else {
            full.insert(k.clone(), t);
        }
    }
    if let (Some(spec), false) = (lora, lo.is_empty()) {
        let cfg = serde_json::json!({
            "peft_type": "LORA", "r": spec.r, "lora_alpha": spec.alpha, "lora_dropout": spec.dropout,
            "target_modules": spec.targets, "bias": "none", "use_rslora": false,
        });
        std::fs::write(dir.join("adapter_config.json"), serde_json::to_string_pretty(&cfg)?)?;
        candle_core::safetensors::save(&lo, dir.join("adapter_model.safetensors"))?;
    }
    if !full.is_empty() {
        candle_core::safetensors::save(&full, dir.join("non_lora_trainables.safetensors"))?;
    }
    Ok(())
}

/// Reads what [`save_trainables`] wrote.
pub fn load_trainables(dir: &Path, device: &candle_core::Device) -> anyhow::Result<HashMap<String, Tensor>> {
    let mut init = HashMap::new();
    for f in ["adapter_model.safetensors", "non_lora_trainables.safetensors"] {
        let p = dir.join(f);
        if p.exists() {
            init.extend(
                candle_core::safetensors::load(&p, device).with_context(|| format!("reading {}", p.display()))?,
            );
        }
    }
    Ok(init)
}

/// A kill can leave a checkpoint half-written under its temporary name: clears those.
pub fn clear_half_written(out: &Path) -> anyhow::Result<()> {
    for e in std::fs::read_dir(out)?.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if name.starts_with('.') && (name.contains(".tmp-") || name.contains(".old-")) {
            std::fs::remove_dir_all(e.path()).with_context(|| format!("removing stale {}", e.path().display()))?;
        }
    }
    Ok(())
}
