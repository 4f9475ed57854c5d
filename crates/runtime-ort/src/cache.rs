//! What the runtime does with a batch's KV cache ([`Cache`]) besides the standard decoder step:
//! empty caches, the `cache_join` / `cache_select` graphs that let rows join and leave a running
//! batch without the cache leaving the device, and the fused export's in-place step.
//!
//! Standard exports grow the cache by concatenation: every step returns new tensors, and rows of
//! one batch are left-padded. Fused exports hold each row's keys and values in its own slots of
//! one preallocated buffer per layer, which the decoder reads as `past_*` and writes as `present_*`
//! through IO binding, so a step writes the new positions in place and copies no cache. ONNX
//! Runtime's `GroupQueryAttention` takes a row's keys as the first `seqlens_k + 1` slots of its
//! buffer (`seqlens_k` = the row's `attention_mask` sum − 1), so there rows are right-padded: row
//! `r` occupies slots `0..len − pad[r]`, and a step appends at its own end.

use ort::value::{DynValue, Tensor};

use crate::{float_value, int_value, ort_err, out_f32, Cache, Result, RunError, Runtime};

impl Runtime {
    /// An empty cache for a batch of `batch` rows.
    pub(crate) fn empty_cache(&self, pad: Vec<usize>) -> Result<Cache> {
        let d = &self.manifest.decoder;
        let shape = vec![pad.len() as i64, d.heads as i64, 0, d.head_dim as i64];
        let kv = (0..2 * d.layers).map(|_| float_value(shape.clone(), Vec::new(), self.f16)).collect::<Result<_>>()?;
        Ok(Cache::new(kv, 0, pad, 0))
    }

    /// Whether this export can admit rows into a running batch and drop finished ones.
    pub fn can_regroup(&self) -> bool {
        self.cache_join.is_some() && self.cache_select.is_some()
    }

    /// Runs a cache graph: the named caches in, `kv.*` out on the cache's device.
    fn cache_op(
        &mut self,
        join: bool,
        feeds: Vec<(String, &DynValue)>,
        extra: Vec<(&str, DynValue)>,
    ) -> Result<Vec<DynValue>> {
        let layers = self.manifest.decoder.layers;
        let e = |w: &'static str| ort_err(format!("cache {w}"));
        let session = if join { self.cache_join.as_mut() } else { self.cache_select.as_mut() };
        let session =
            session.ok_or_else(|| RunError::Input("this export has no cache graphs (re-export it)".into()))?;
        let mut bind = session.create_binding().map_err(e("binding"))?;
        for (name, v) in feeds {
            bind.bind_input(name, v).map_err(e("input"))?;
        }
        for (name, v) in &extra {
            bind.bind_input(*name, v).map_err(e("input"))?;
        }
        for i in 0..layers {
            for p in ["key", "value"] {
                bind.bind_output_to_device(format!("kv.{i}.{p}"), &self.kv_mem).map_err(e("output"))?;
            }
        }
        let mut out = session.run_binding(&bind).map_err(e("run"))?;
        let mut kv = Vec::with_capacity(2 * layers);
        for i in 0..layers {
            for p in ["key", "value"] {
                kv.push(out.remove(format!("kv.{i}.{p}")).ok_or_else(|| RunError::Ort("cache output missing".into()))?);
            }
        }
        Ok(kv)
    }

    /// The rows of `a`, then those of `b`, in one cache; the shorter is left-padded (masked).
    /// Fused exports: the rows keep their slots; the shorter buffers are padded at their end.
    pub(crate) fn join(&mut self, a: &Cache, b: &Cache) -> Result<Cache> {
        let (ka, kb) = (a.tensors()?, b.tensors()?);
        let feeds = ka
            .iter()
            .enumerate()
            .map(|(j, v)| (kv_name("a", j), v))
            .chain(kb.iter().enumerate().map(|(j, v)| (kv_name("b", j), v)))
            .collect();
        let kv = self.cache_op(true, feeds, Vec::new())?;
        let len = a.len.max(b.len);
        let pad =
            a.pad.iter().map(|p| p + len - a.len).chain(b.pad.iter().map(|p| p + len - b.len)).collect::<Vec<_>>();
        Ok(Cache::new(kv, len, pad, a.slots.max(b.slots)))
    }

    /// The cache of the rows `keep` of `c`, without the padding they all share (the batch gets
    /// shorter when its longest prompt leaves).
    pub(crate) fn select(&mut self, c: &Cache, keep: &[usize]) -> Result<Cache> {
        let kc = c.tensors()?;
        let feeds = kc.iter().enumerate().map(|(j, v)| (kv_name("in", j), v)).collect();
        let shared = keep.iter().map(|&r| c.pad[r]).min().unwrap_or(0);
        let rows = int_value(vec![keep.len() as i64], keep.iter().map(|&r| r as i64).collect())?;
        let mut extra = vec![("rows", rows)];
        // A fused cache's rows all start at slot 0: nothing to cut.
        if !self.fused {
            extra.push(("start", int_value(vec![], vec![shared as i64])?));
        }
        let kv = self.cache_op(false, feeds, extra)?;
        Ok(Cache::new(kv, c.len - shared, keep.iter().map(|&r| c.pad[r] - shared).collect(), c.slots))
    }

    /// An empty fused cache of `rows` rows with `slots` positions each, in the decoder's memory.
    pub(crate) fn empty_slots(&self, rows: usize, slots: usize) -> Result<Cache> {
        let d = &self.manifest.decoder;
        let shape = [rows, d.heads, slots, d.cache_head_dim()];
        let host = self.kv_mem == self.host_mem;
        let alloc = self.decoder_allocator()?;
        // Slots past a row's end are never read; host buffers are zeroed all the same, so that no
        // uninitialised memory is ever multiplied by a zero attention weight. Device buffers are
        // left as allocated (the CUDA kernels read each row's own length only).
        fn buffer<T: ort::value::PrimitiveTensorElementType + std::fmt::Debug + Copy>(
            alloc: &ort::memory::Allocator,
            shape: [usize; 4],
            zero: Option<T>,
        ) -> Result<DynValue> {
            let mut t = Tensor::<T>::new(alloc, shape).map_err(ort_err("cache buffer"))?;
            if let Some(z) = zero {
                t.extract_tensor_mut().1.fill(z);
            }
            Ok(t.into_dyn())
        }
        let mut kv = Vec::with_capacity(2 * d.layers);
        for _ in 0..2 * d.layers {
            kv.push(if self.f16 {
                buffer(&alloc, shape, host.then_some(half::f16::ZERO))?
            } else {
                buffer(&alloc, shape, host.then_some(0f32))?
            });
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
        if let Some(i) = self.fixed_set(cache, s, new, all) {
            return self.step_fixed(i, embeds, cache);
        }
        let d = &self.manifest.decoder;
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
        let out = self.run_decoder(&bind, -1)?;
        drop(kv);
        let logits = out_f32(out.get("logits").ok_or_else(|| RunError::Ort("decoder output logits missing".into()))?)?;
        let pad = ends.iter().map(|&end| total - end).collect();
        Ok((logits, Cache { kv: cache.kv.clone(), len: total, pad, slots: cache.slots }))
    }
}

/// The name of cache value `j` (layer `j / 2`, key then value) under `prefix`.
fn kv_name(prefix: &str, j: usize) -> String {
    format!("{prefix}.{}.{}", j / 2, if j.is_multiple_of(2) { "key" } else { "value" })
}
