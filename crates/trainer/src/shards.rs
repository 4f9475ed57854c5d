//! Streaming safetensors writer: the header is computed from names and shapes alone, then each
//! tensor is produced and written in turn, so a multi-GiB model never sits whole in memory. Writes
//! `model.safetensors`, or `model-0000k-of-0000n.safetensors` + `model.safetensors.index.json`.

use std::io::Write;
use std::path::Path;

use anyhow::Context;
use candle_core::{DType, Tensor};

/// A tensor to write: key and shape (the data comes later, from the producer).
pub type Entry = (String, Vec<usize>);

fn dtype_name(d: DType) -> anyhow::Result<&'static str> {
    Ok(match d {
        DType::F32 => "F32",
        DType::F16 => "F16",
        DType::BF16 => "BF16",
        DType::I64 => "I64",
        other => anyhow::bail!("cannot write {other:?} tensors"),
    })
}

/// Writes `entries` into `dir` in `dtype`, at most `max_shard_bytes` per file (one tensor may exceed
/// it alone). `produce(key, shape)` returns each tensor, in order; its dtype is converted.
pub fn write_sharded(
    dir: &Path,
    entries: &[Entry],
    dtype: DType,
    max_shard_bytes: usize,
    mut produce: impl FnMut(&str, &[usize]) -> anyhow::Result<Tensor>,
) -> anyhow::Result<usize> {
    let size_of = |s: &[usize]| s.iter().product::<usize>() * dtype.size_in_bytes();
    let mut shards: Vec<Vec<&Entry>> = vec![Vec::new()];
    let mut cur = 0usize;
    for e in entries {
        let b = size_of(&e.1);
        if cur > 0 && cur + b > max_shard_bytes {
            shards.push(Vec::new());
            cur = 0;
        }
        shards.last_mut().expect("one shard at least").push(e);
        cur += b;
    }
    let n = shards.len();
    let mut weight_map = serde_json::Map::new();
    let mut total = 0usize;
    for (i, shard) in shards.iter().enumerate() {
        let name = if n == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", i + 1, n)
        };
        let mut header = serde_json::Map::new();
        header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
        let mut off = 0usize;
        for (k, s) in shard.iter().map(|e| (&e.0, &e.1)) {
            let b = size_of(s);
            header.insert(
                k.clone(),
                serde_json::json!({"dtype": dtype_name(dtype)?, "shape": s, "data_offsets": [off, off + b]}),
            );
            off += b;
            weight_map.insert(k.clone(), name.clone().into());
        }
        total += off;
        let mut h = serde_json::to_vec(&header)?;
        while h.len() % 8 != 0 {
            h.push(b' ');
        }
        let path = dir.join(&name);
        let file = std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        let mut w = std::io::BufWriter::with_capacity(1 << 22, file);
        w.write_all(&(h.len() as u64).to_le_bytes())?;
        w.write_all(&h)?;
        for (k, s) in shard.iter().map(|e| (&e.0, &e.1)) {
            let t = produce(k, s)?.to_dtype(dtype)?.to_device(&candle_core::Device::Cpu)?.flatten_all()?;
            anyhow::ensure!(
                t.elem_count() == s.iter().product::<usize>(),
                "{k}: produced {} values for shape {s:?}",
                t.elem_count()
            );
            let bytes: Vec<u8> = match dtype {
                DType::F32 => t.to_vec1::<f32>()?.iter().flat_map(|v| v.to_le_bytes()).collect(),
                DType::F16 => t.to_vec1::<half::f16>()?.iter().flat_map(|v| v.to_le_bytes()).collect(),
                DType::BF16 => t.to_vec1::<half::bf16>()?.iter().flat_map(|v| v.to_le_bytes()).collect(),
                DType::I64 => t.to_vec1::<i64>()?.iter().flat_map(|v| v.to_le_bytes()).collect(),
                other => anyhow::bail!("cannot write {other:?}"),
            };
            w.write_all(&bytes).with_context(|| format!("writing {}", path.display()))?;
        }
        w.flush()?;
    }
    if n > 1 {
        let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        std::fs::write(dir.join("model.safetensors.index.json"), serde_json::to_string_pretty(&index)?)?;
    }
    Ok(n)
}
