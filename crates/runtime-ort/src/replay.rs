//! Fixed-shape decode steps, what ONNX Runtime's CUDA graphs (`--cuda-graph`) need: a captured step
//! is replayed on the very device addresses and shapes it was captured with. On a fused export:
//! - cache buffers come from a pool, one set per batch size with `max_positions` slots per row,
//!   reused by the next prefill of that size, so that a graph captured on them stays valid;
//! - each pooled set has its own step inputs (embeddings, an attention mask as wide as the buffer,
//!   positions) and logits output, allocated once in the provider's memory and overwritten in place
//!   before each step (a mask of the buffer's width gives every step the same shapes; the attention
//!   op reads each row's length from the mask's sum, so the result is the same as a mask that grows);
//! - a set's index is its `gpu_graph_id`. Every other decoder run (prefills, option scoring, steps on
//!   caches that continuous batching regrouped) runs eagerly, `gpu_graph_id` −1.
//!
//! With the CUDA graph off ([`crate::Placement::fixed_steps`]) the same steps run eagerly on any
//! provider: that is how this path is tested on CPU.

use std::sync::Arc;

use ort::memory::Allocator;
use ort::session::{IoBinding, RunOptions, SessionOutputs};
use ort::value::{DynTensor, Tensor};

use crate::model::{Cache, Set};
use crate::{ort_err, Result, RunError, Runtime};

/// At most this many pooled buffer sets, so at most this many captured graphs.
const MAX_SETS: usize = 8;

/// Run options naming the CUDA graph of a run (−1: none).
pub(crate) fn graph_options(id: i64) -> Result<RunOptions> {
    let mut o = RunOptions::new().map_err(ort_err("run options"))?;
    o.set("gpu_graph_id", id.to_string()).map_err(ort_err("run options"))?;
    Ok(o)
}

impl Runtime {
    /// Runs the decoder on `bind`; with CUDA graphs on, as graph `id` (−1: eagerly).
    pub(crate) fn run_decoder<'b>(&'b mut self, bind: &'b IoBinding, id: i64) -> Result<SessionOutputs<'b>> {
        let e = ort_err("decoder run");
        if self.cuda_graph {
            let o = graph_options(id)?;
            self.decoder.run_binding_with_options(bind, &o).map_err(e)
        } else {
            self.decoder.run_binding(bind).map_err(e)
        }
    }

    /// An allocator of the decoder's memory (the provider's device, or the host).
    pub(crate) fn decoder_allocator(&self) -> Result<Allocator> {
        if self.kv_mem == self.host_mem {
            Ok(Allocator::default())
        } else {
            Allocator::new(&self.decoder, self.kv_mem.clone()).map_err(ort_err("cache allocator"))
        }
    }

    /// A free pooled cache of `rows` rows (allocated if the pool has room), or `None`: then the
    /// caller allocates one that steps eagerly.
    pub(crate) fn pooled_slots(&mut self, rows: usize) -> Result<Option<Cache>> {
        let slots = self.manifest.decoder.max_positions;
        let Some(replay) = &self.replay else { return Ok(None) };
        // A set is free when no cache but the pool's own handle holds its buffers.
        if let Some(s) = replay.sets.iter().find(|s| s.rows == rows && Arc::strong_count(&s.kv) == 1) {
            return Ok(Some(Cache { kv: s.kv.clone(), len: 0, pad: vec![0; rows], slots }));
        }
        if replay.sets.len() >= MAX_SETS {
            return Ok(None);
        }
        let cache = self.empty_slots(rows, slots)?;
        let d = &self.manifest.decoder;
        let alloc = self.decoder_allocator()?;
        let ints = |shape: [usize; 2]| -> Result<DynTensor> {
            Ok(Tensor::<i64>::new(&alloc, shape).map_err(ort_err("step input"))?.upcast())
        };
        let floats = |shape: [usize; 3]| -> Result<DynTensor> {
            Ok(if self.f16 {
                Tensor::<half::f16>::new(&alloc, shape).map_err(ort_err("step input"))?.upcast()
            } else {
                Tensor::<f32>::new(&alloc, shape).map_err(ort_err("step input"))?.upcast()
            })
        };
        let mut set = Set {
            rows,
            kv: cache.kv.clone(),
            embeds: floats([rows, 1, d.hidden_size])?,
            mask: ints([rows, slots])?,
            positions: if self.positions_input { Some(ints([rows, 1])?) } else { None },
            logits_positions: ints([rows, 1])?,
            logits: floats([rows, 1, d.vocab_size])?,
        };
        // Every step keeps the logits of its only new position.
        let host = self.kv_mem == self.host_mem;
        write_ints(&mut set.logits_positions, vec![0; rows], [rows, 1], host)?;
        if let Some(r) = self.replay.as_mut() {
            r.sets.push(set);
        }
        Ok(Some(cache))
    }

    /// The pooled set a one-token step of every row on `cache` runs on, if any.
    pub(crate) fn fixed_set(&self, cache: &Cache, s: usize, new: &[usize], all: bool) -> Option<usize> {
        let replay = self.replay.as_ref()?;
        if s != 1 || all || new.iter().any(|&n| n != 1) {
            return None;
        }
        replay.sets.iter().position(|set| set.rows == new.len() && Arc::ptr_eq(&set.kv, &cache.kv))
    }

    /// A one-token step of every row on pooled set `i`: the step's inputs are written into the set's
    /// tensors and the step runs as CUDA graph `i` (or eagerly, see the module docs).
    pub(crate) fn step_fixed(&mut self, i: usize, embeds: Vec<f32>, cache: &Cache) -> Result<(Vec<f32>, Cache)> {
        let mut replay = self.replay.take().ok_or_else(|| RunError::Input("no fixed-shape steps".into()))?;
        let out = self.run_fixed(&mut replay.sets[i], i as i64, embeds, cache);
        replay.steps += usize::from(out.is_ok());
        self.replay = Some(replay);
        out
    }

    fn run_fixed(&mut self, set: &mut Set, id: i64, embeds: Vec<f32>, cache: &Cache) -> Result<(Vec<f32>, Cache)> {
        let d = &self.manifest.decoder;
        let (b, slots, hidden) = (set.rows, cache.slots, d.hidden_size);
        let ends: Vec<usize> = cache.pad.iter().map(|&p| cache.len - p + 1).collect();
        let total = ends.iter().copied().max().unwrap_or(0);
        if total > slots || embeds.len() != b * hidden {
            return Err(RunError::Input(format!(
                "{total} positions do not fit the cache's {slots} slots (or a malformed step)"
            )));
        }
        let host = self.kv_mem == self.host_mem;
        write_floats(&mut set.embeds, embeds, [b, 1, hidden], self.f16, host)?;
        let mask: Vec<i64> = ends.iter().flat_map(|&end| (0..slots).map(move |j| i64::from(j < end))).collect();
        write_ints(&mut set.mask, mask, [b, slots], host)?;
        if let Some(p) = set.positions.as_mut() {
            write_ints(p, ends.iter().map(|&end| end as i64 - 1).collect(), [b, 1], host)?;
        }
        let e = |w: &'static str| ort_err(format!("decoder {w}"));
        let mut bind = self.decoder.create_binding().map_err(e("binding"))?;
        bind.bind_input("inputs_embeds", &set.embeds).map_err(e("inputs_embeds"))?;
        bind.bind_input("attention_mask", &set.mask).map_err(e("attention_mask"))?;
        if let Some(p) = &set.positions {
            bind.bind_input("position_ids", p).map_err(e("position_ids"))?;
        }
        bind.bind_input("logits_positions", &set.logits_positions).map_err(e("logits_positions"))?;
        let mut kv = cache.tensors()?;
        for (j, v) in kv.iter_mut().enumerate() {
            let (layer, part) = (j / 2, if j % 2 == 0 { "key" } else { "value" });
            bind.bind_input(format!("past_key_values.{layer}.{part}"), &*v).map_err(e("past"))?;
            bind.bind_output(format!("present.{layer}.{part}"), &mut *v).map_err(e("present"))?;
        }
        bind.bind_output("logits", &mut set.logits).map_err(e("logits"))?;
        drop(self.run_decoder(&bind, id)?);
        drop(bind);
        drop(kv);
        let logits = if host {
            read_floats(&set.logits)?
        } else {
            read_floats(&set.logits.to(ort::memory::AllocationDevice::CPU, 0).map_err(e("logits to host"))?)?
        };
        let pad = ends.iter().map(|&end| total - end).collect();
        Ok((logits, Cache { kv: cache.kv.clone(), len: total, pad, slots }))
    }

    /// Decode steps run with fixed shapes on pooled buffers so far (as CUDA graphs with
    /// `--cuda-graph`); 0 without fixed-shape steps.
    pub fn fixed_steps_run(&self) -> usize {
        self.replay.as_ref().map_or(0, |r| r.steps)
    }

    /// Data addresses of the pooled step inputs and logits of every set (CPU): fixed-shape steps
    /// overwrite them in place.
    pub fn fixed_step_addresses(&self) -> Vec<usize> {
        let Some(replay) = self.replay.as_ref() else { return Vec::new() };
        let mut out = Vec::new();
        for s in &replay.sets {
            let inputs = [&s.embeds, &s.mask, &s.logits_positions, &s.logits].into_iter().chain(s.positions.as_ref());
            out.extend(inputs.map(|t| t.data_ptr() as usize));
        }
        out
    }
}

/// A float tensor (f32 or f16) on the host, as f32.
fn read_floats(v: &DynTensor) -> Result<Vec<f32>> {
    match v.try_extract_tensor::<f32>() {
        Ok((_, d)) => Ok(d.to_vec()),
        Err(_) => {
            Ok(v.try_extract_tensor::<half::f16>().map_err(ort_err("logits"))?.1.iter().map(|x| x.to_f32()).collect())
        }
    }
}

/// Overwrites `dst` (f32 or f16, `shape`) with `v`, in place on the host or by a copy to the device.
fn write_floats(dst: &mut DynTensor, v: Vec<f32>, shape: [usize; 3], f16: bool, host: bool) -> Result<()> {
    let e = ort_err("step input");
    match (host, f16) {
        (true, false) => dst.try_extract_tensor_mut::<f32>().map_err(e)?.1.copy_from_slice(&v),
        (true, true) => {
            for (o, x) in dst.try_extract_tensor_mut::<half::f16>().map_err(e)?.1.iter_mut().zip(v) {
                *o = half::f16::from_f32(x);
            }
        }
        (false, false) => Tensor::from_array((shape, v)).map_err(&e)?.upcast().copy_into(dst).map_err(e)?,
        (false, true) => {
            let v: Vec<half::f16> = v.into_iter().map(half::f16::from_f32).collect();
            Tensor::from_array((shape, v)).map_err(&e)?.upcast().copy_into(dst).map_err(e)?
        }
    }
    Ok(())
}

/// Overwrites the int64 tensor `dst` (`shape`) with `v`.
fn write_ints(dst: &mut DynTensor, v: Vec<i64>, shape: [usize; 2], host: bool) -> Result<()> {
    let e = ort_err("step input");
    if host {
        dst.try_extract_tensor_mut::<i64>().map_err(e)?.1.copy_from_slice(&v);
    } else {
        Tensor::from_array((shape, v)).map_err(&e)?.upcast().copy_into(dst).map_err(e)?;
    }
    Ok(())
}
