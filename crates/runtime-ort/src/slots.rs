//! Decoding on a `fused` export: each row's keys and values live in its own slots of one
//! preallocated buffer per layer, which the decoder reads as `past_*` and writes as `present_*`
//! through IO binding, so a step writes the new positions in place and copies no cache.
//!
//! ONNX Runtime's `GroupQueryAttention` takes a row's keys as the first `seqlens_k + 1` slots of
//! its buffer (`seqlens_k` = the row's `attention_mask` sum − 1), so rows are right-padded: row `r`
//! occupies slots `0..len − pad[r]`, and a step appends at its own end.

use ort::memory::Allocator;
use ort::value::{DynValue, Tensor};

use crate::{int_value, ort_err, out_f32, Cache, Result, RunError, Runtime};

impl Runtime {
    /// An empty fused cache of `rows` rows with `slots` positions each, in the decoder's memory.
    pub(crate) fn empty_slots(&self, rows: usize, slots: usize) -> Result<Cache> {
        let d = &self.manifest.decoder;
        let shape = [rows, d.heads, slots, d.cache_head_dim()];
        let alloc = if self.kv_mem == self.host_mem {
            Allocator::default()
        } else {
            Allocator::new(&self.decoder, self.kv_mem.clone()).map_err(ort_err("cache allocator"))?
        };
        let host = self.kv_mem == self.host_mem;
        let mut kv = Vec::with_capacity(2 * d.layers);
        for _ in 0..2 * d.layers {
            // Slots past a row's end are never read; host buffers are zeroed all the same, so that
            // no uninitialised memory is ever multiplied by a zero attention weight.
            let v: DynValue = if self.f16 {
                let mut t = Tensor::<half::f16>::new(&alloc, shape).map_err(ort_err("cache buffer"))?;
                if host {
                    t.extract_tensor_mut().1.fill(half::f16::ZERO);
                }
                t.into_dyn()
            } else {
                let mut t = Tensor::<f32>::new(&alloc, shape).map_err(ort_err("cache buffer"))?;
                if host {
                    t.extract_tensor_mut().1.fill(0.0);
                }
                t.into_dyn()
            };
            kv.push(v);
        }
        Ok(Cache::new(kv, 0, vec![0; rows], slots))
    }

    /// One fused decoder pass: `embeds` [B, S, D] holds `new[r]` new positions of row `r` (the rest
    /// padding), appended at the row's end in `cache`'s buffers. Returns the logits [B·V] of each
    /// row's last new position, or [B·S·V] of every position when `all` (one row only), and the
    /// cache after the step, which shares `cache`'s buffers.
    pub(crate) fn step_fused(
        &mut self,
        embeds: Vec<f32>,
        cache: &Cache,
        new: &[usize],
        all: bool,
    ) -> Result<(Vec<f32>, Cache)> {
        let d = &self.manifest.decoder;
        let b = new.len();
        if b == 0 || b != cache.pad.len() || new.contains(&0) {
            return Err(RunError::Input(format!("a fused step of {b} rows on a cache of {}", cache.pad.len())));
        }
        let s = embeds.len() / (b * d.hidden_size);
        let ends: Vec<usize> = (0..b).map(|r| cache.len - cache.pad[r] + new[r]).collect();
        let total = ends.iter().copied().max().unwrap_or(0);
        // The op would write past the buffer: refuse before running it.
        if total > cache.slots || s < new.iter().copied().max().unwrap_or(0) || (all && b > 1) {
            return Err(RunError::Input(format!(
                "{total} positions do not fit the cache's {} slots (or a malformed step of {s} positions)",
                cache.slots
            )));
        }
        let e = |w: &'static str| ort_err(format!("decoder {w}"));
        let mut bind = self.decoder.create_binding().map_err(e("binding"))?;
        let f16 = self.f16;
        bind.bind_input(
            "inputs_embeds",
            &crate::float_value(vec![b as i64, s as i64, d.hidden_size as i64], embeds, f16)?,
        )
        .map_err(e("inputs_embeds"))?;
        let mask: Vec<i64> = ends.iter().flat_map(|&end| (0..total).map(move |j| i64::from(j < end))).collect();
        bind.bind_input("attention_mask", &int_value(vec![b as i64, total as i64], mask)?)
            .map_err(e("attention_mask"))?;
        if self.positions_input {
            // A row's padding repeats its last position (never read).
            let pos: Vec<i64> = ends
                .iter()
                .zip(new)
                .flat_map(|(&end, &n)| (0..s).map(move |j| (end - n + j.min(n - 1)) as i64))
                .collect();
            bind.bind_input("position_ids", &int_value(vec![b as i64, s as i64], pos)?).map_err(e("position_ids"))?;
        }
        let at: Vec<i64> = if all { (0..s as i64).collect() } else { new.iter().map(|&n| n as i64 - 1).collect() };
        let kept = if all { s } else { 1 };
        bind.bind_input("logits_positions", &int_value(vec![b as i64, kept as i64], at)?)
            .map_err(e("logits_positions"))?;
        let mut kv = cache.tensors()?;
        for (j, v) in kv.iter_mut().enumerate() {
            let (layer, part) = (j / 2, if j % 2 == 0 { "key" } else { "value" });
            bind.bind_input(format!("past_key_values.{layer}.{part}"), &*v).map_err(e("past"))?;
            // The same memory as the output: the op writes the new positions in place.
            bind.bind_output(format!("present.{layer}.{part}"), &mut *v).map_err(e("present"))?;
        }
        bind.bind_output_to_device("logits", &self.host_mem).map_err(e("logits"))?;
        let out = self.decoder.run_binding(&bind).map_err(e("run"))?;
        drop(kv);
        let logits = out_f32(out.get("logits").ok_or_else(|| RunError::Ort("decoder output logits missing".into()))?)?;
        let pad = ends.iter().map(|&end| total - end).collect();
        Ok((logits, Cache { kv: cache.kv.clone(), len: total, pad, slots: cache.slots }))
    }
}
