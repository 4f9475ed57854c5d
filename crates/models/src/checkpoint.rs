//! Gradient checkpointing for the candle interpreter. A checkpointed [`Block`](crate::ops::Block)
//! runs unrecorded (parameters detached), so the autograd graph keeps only the block's inputs, not
//! its intermediate activations. Its outputs come out of one custom op whose backward pass runs the
//! block again, recorded, from the saved inputs and back-propagates the incoming gradient through it:
//! the inputs' gradients go back into the main pass, the parameters' gradients into
//! [`SideGrads`](crate::ops::SideGrads), which the trainer adds to what `backward()` returns.
//!
//! The recomputation starts from the dropout RNG state the forward pass had, so both passes draw the
//! same masks and run the same ops on the same values: losses and gradients equal an uncheckpointed
//! run's bit for bit (tested below per parameter, and end to end by the trainer).

use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Storage, Tensor, Var};
use rand::rngs::StdRng;

use crate::ops::{Candle, SideGrads};
use crate::Result;

/// A block's forward pass as the candle interpreter runs it: `(interpreter, inputs, ctx) → outputs`.
pub(crate) type BlockFn = Arc<dyn Fn(&mut Candle, &[Tensor], &[Tensor]) -> Result<Vec<Tensor>> + Send + Sync>;

impl Candle {
    /// Runs `f` checkpointed (see the module docs); without `checkpointing`, just runs it.
    pub(crate) fn checkpointed(&mut self, f: BlockFn, inputs: &[Tensor], ctx: &[Tensor]) -> Result<Vec<Tensor>> {
        let Some(side) = self.checkpointing.clone() else { return f(self, inputs, ctx) };
        let rng = self.dropout_rng.clone();
        let used = Arc::new(Mutex::new(Vec::new()));
        let mut quiet = Candle { quiet: true, checkpointing: None, used: Some(used.clone()), ..self.clone() };
        let detached: Vec<Tensor> = inputs.iter().map(Tensor::detach).collect();
        let ctx: Vec<Tensor> = ctx.iter().map(Tensor::detach).collect();
        let outs = f(&mut quiet, &detached, &ctx)?;
        // The main pass draws on as if the block had been recorded.
        self.dropout_rng = quiet.dropout_rng;
        let trains =
            used.lock().map_err(|_| crate::Error::Input("checkpoint poisoned".into()))?.iter().any(Tensor::is_variable);
        // Packed last first, like the outputs in the backward pass (see `Recompute::backward`): the
        // main pass then adds a block input's gradients in the plain pass's order.
        let reversed: Vec<Tensor> = inputs.iter().rev().cloned().collect();
        let mut packed = pack(&reversed)?;
        if !packed.track_op() {
            if !trains {
                // Nothing before or inside the block trains: no backward reaches it.
                return Ok(outs);
            }
            // Frozen inputs into a block that trains (the first SigLIP layer): a leaf, so that the
            // backward pass reaches the block.
            packed = Var::from_tensor(&packed)?.as_tensor().clone();
        }
        let out_shapes: Vec<Shape> = outs.iter().map(|t| t.shape().clone()).collect();
        let op = Recompute {
            f,
            ctx,
            rng,
            template: Candle { dropout_rng: None, checkpointing: None, quiet: false, used: None, ..self.clone() },
            in_shapes: reversed.iter().map(|t| t.shape().clone()).collect(),
            out: Mutex::new(Some(pack(&outs)?)),
            side,
        };
        let y = packed.apply_op1(op)?;
        unpack(&y, &out_shapes)
    }
}

/// Tensors flattened and concatenated into one 1-D tensor.
fn pack(ts: &[Tensor]) -> candle_core::Result<Tensor> {
    let flat = ts.iter().map(Tensor::flatten_all).collect::<candle_core::Result<Vec<_>>>()?;
    Tensor::cat(&flat, 0)
}

/// The inverse of [`pack`].
fn unpack(t: &Tensor, shapes: &[Shape]) -> Result<Vec<Tensor>> {
    let mut at = 0;
    let mut out = Vec::with_capacity(shapes.len());
    for s in shapes {
        let n = s.elem_count();
        out.push(t.narrow(0, at, n)?.reshape(s)?);
        at += n;
    }
    Ok(out)
}

/// The op joining a checkpointed block's packed inputs to its packed outputs.
struct Recompute {
    f: BlockFn,
    ctx: Vec<Tensor>,
    /// The dropout RNG as the block's forward pass found it.
    rng: Option<StdRng>,
    /// Device and dtype of the recomputation.
    template: Candle,
    /// Shapes of the inputs, last first (as packed).
    in_shapes: Vec<Shape>,
    /// The outputs computed unrecorded, handed over once by the op's forward.
    out: Mutex<Option<Tensor>>,
    side: SideGrads,
}

impl Recompute {
    fn take_out(&self) -> candle_core::Result<Tensor> {
        let mut out = self.out.lock().map_err(|_| candle_core::Error::Msg("checkpoint output poisoned".into()))?;
        out.take().ok_or_else(|| candle_core::Error::Msg("a checkpoint's forward ran twice".into()))
    }

    /// The gradient of the packed inputs from `grad` of the packed outputs: the block run again,
    /// recorded, on leaf copies of the inputs.
    fn backward(&self, arg: &Tensor, grad: &Tensor) -> Result<Tensor> {
        let mut leaves = unpack(&arg.detach(), &self.in_shapes)?
            .iter()
            .map(|t| Ok(Var::from_tensor(&t.contiguous()?)?.as_tensor().clone()))
            .collect::<Result<Vec<_>>>()?;
        leaves.reverse();
        let used = Arc::new(Mutex::new(Vec::new()));
        let mut o = Candle { dropout_rng: self.rng.clone(), used: Some(used.clone()), ..self.template.clone() };
        let mut outs = (self.f)(&mut o, &leaves, &self.ctx)?;
        let mut g = unpack(grad, &outs.iter().map(|t| t.shape().clone()).collect::<Vec<_>>())?;
        // d(Σ y·g)/dy = g exactly: the recorded block receives the very gradient its output got.
        // The outputs are walked last first: a layer's outputs are (x, LayerNorm(x)), and x's
        // gradient must take the next layer's contribution before the LayerNorm's, as the plain
        // backward pass adds them (floating-point sums of three or more terms depend on order).
        outs.reverse();
        g.reverse();
        let grads = (pack(&outs)? * pack(&g)?)?.sum_all()?.backward()?;
        let used = std::mem::take(&mut *used.lock().map_err(|_| crate::Error::Input("checkpoint poisoned".into()))?);
        let mut seen = std::collections::HashSet::new();
        for p in used.iter().filter(|p| p.is_variable() && seen.insert(p.id())) {
            if let Some(g) = grads.get(p) {
                self.side.add(p, g.clone())?;
            }
        }
        let per_input = leaves
            .iter()
            .rev()
            .map(|l| match grads.get(l) {
                Some(g) => Ok(g.clone()),
                None => Ok(l.zeros_like()?),
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(pack(&per_input)?)
    }
}

impl CustomOp1 for Recompute {
    fn name(&self) -> &'static str {
        "gradient-checkpoint"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = self.take_out()?;
        let (storage, layout) = out.storage_and_layout();
        match &*storage {
            Storage::Cpu(s) => Ok((s.try_clone(layout)?, out.shape().clone())),
            _ => Err(candle_core::Error::Msg("checkpoint output not on the CPU".into())),
        }
    }

    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let out = self.take_out()?;
        let (storage, layout) = out.storage_and_layout();
        match &*storage {
            Storage::Cuda(s) => Ok((s.try_clone(layout)?, out.shape().clone())),
            _ => Err(candle_core::Error::Msg("checkpoint output not on the GPU".into())),
        }
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        self.backward(arg, grad).map(Some).map_err(|e| candle_core::Error::Msg(format!("gradient checkpoint: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use candle_core::{DType, Device, Tensor};

    use crate::loader::Checkpoint;
    use crate::ops::{Candle, SideGrads};
    use crate::train_source::{LoraSpec, TrainSource};
    use crate::{Bunny, QFormerText};

    type Run = (f32, Vec<(String, Vec<f32>)>);

    /// The loss and per-parameter gradients of one model over `fixture`, plain and with every layer
    /// checkpointed: the image features (through the prompt module, for a Q-Adapt fixture) and the
    /// LLM's hidden states, weighted into one loss.
    fn gradients(fixture: &str, lora: Option<LoraSpec>) -> (Run, Run) {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures").join(fixture).join("model");
        let dev = Device::Cpu;
        let ck = Checkpoint::open(&dir, &dev, DType::F32).unwrap();
        let trainable = |k: &str| k.starts_with("model.mm_projector") || k.starts_with("model.vlm_");
        let src = TrainSource::new(&ck, trainable, lora, &dev, DType::F32, 7);
        let config = qadapt_core::BunnyConfig::from_file(&dir.join("config.json")).unwrap();
        let model = Bunny::new(&src, config).unwrap();
        let vars = src.vars();
        // LoRA B starts at zero, which would leave A without gradient: give every variable a value.
        for (i, (_, v)) in vars.iter().enumerate() {
            let t = (Tensor::randn(0f32, 0.1, v.shape(), &dev).unwrap() + (i as f64) * 1e-3).unwrap();
            v.set(&t).unwrap();
        }
        let s = model.config.vision_config.image_size;
        let pixels = Tensor::randn(0f32, 1.0, (2, 3, s, s), &dev).unwrap();
        // A question for the prompt module: row 1 padded after 3 tokens.
        let ids =
            Tensor::new(&[[101u32, 7, 9, 12, 102], [101, 5, 102, 0, 0]], &dev).unwrap().to_dtype(DType::I64).unwrap();
        let text_mask = Tensor::new(&[[1i64, 1, 1, 1, 1], [1, 1, 1, 0, 0]], &dev).unwrap();
        let run = |checkpoint: bool| -> Run {
            let mut o = Candle::training(dev.clone(), DType::F32, 11);
            o.checkpointing = checkpoint.then(SideGrads::default);
            let text = model.is_qadapt().then_some(QFormerText { input_ids: &ids, attention_mask: &text_mask });
            let feats = model.image_features(&mut o, &pixels, text).unwrap().projected; // [2, N, D]
            let n = feats.dim(1).unwrap();
            let mask = Tensor::ones((2, n), DType::I64, &dev).unwrap();
            let pos = Tensor::arange(0i64, n as i64, &dev).unwrap().unsqueeze(0).unwrap().repeat((2, 1)).unwrap();
            let (h, _) = model.llm.hidden(&mut o, &feats, &mask, &pos, None).unwrap();
            let w = Tensor::arange(0f32, h.elem_count() as f32, &dev).unwrap().reshape(h.shape()).unwrap();
            let loss = (h * w.sin().unwrap()).unwrap().sum_all().unwrap();
            let g = loss.backward().unwrap();
            let grads = vars
                .iter()
                .map(|(k, v)| {
                    let side = o.checkpointing.as_ref().and_then(|s| s.take(v.as_tensor()));
                    let gr = g.get(v.as_tensor()).cloned().or(side).unwrap_or_else(|| panic!("{k}: no gradient"));
                    (k.clone(), gr.flatten_all().unwrap().to_vec1().unwrap())
                })
                .collect();
            (loss.to_scalar::<f32>().unwrap(), grads)
        };
        (run(false), run(true))
    }

    /// Asserts that checkpointing changes no bit of the loss or of any gradient, except those of
    /// keys starting with one of `reordered`, which must agree within 1e-6 of their largest entry.
    fn assert_checkpointing_changes_no_bit(fixture: &str, lora: Option<LoraSpec>, min_vars: usize, reordered: &[&str]) {
        let ((plain_loss, plain), (ckpt_loss, ckpt)) = gradients(fixture, lora);
        assert_eq!(plain_loss.to_bits(), ckpt_loss.to_bits(), "loss {plain_loss} vs {ckpt_loss}");
        let mut bad = Vec::new();
        for ((k, a), (_, b)) in plain.iter().zip(&ckpt) {
            let d = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
            let scale = a.iter().fold(0f32, |m, x| m.max(x.abs()));
            let close = reordered.iter().any(|p| k.starts_with(p)) && d <= 1e-6 * scale;
            if !close && a.iter().zip(b).any(|(x, y)| x.to_bits() != y.to_bits()) {
                bad.push(format!("{k}: max |Δ| {d:e} (largest entry {scale:e})"));
            }
        }
        assert!(plain.len() >= min_vars, "{} variables", plain.len());
        assert!(bad.is_empty(), "{} of {} gradients differ:\n{}", bad.len(), plain.len(), bad.join("\n"));
    }

    /// Stage 1: LoRA (dropout on) in the vision tower and the LLM, and the connector.
    #[test]
    fn checkpointed_gradients_equal_plain_ones() {
        let lora = LoraSpec {
            r: 4,
            alpha: 8.0,
            dropout: 0.1,
            targets: ["q_proj", "k_proj", "v_proj", "dense", "out_proj", "fc1", "fc2"].map(String::from).to_vec(),
            scopes: vec!["model.layers.".into(), format!("{}.encoder.layers.", crate::bunny::VISION_PREFIX)],
        };
        assert_checkpointing_changes_no_bit("bunny_f32_bpe", Some(lora), 40, &[]);
    }

    /// Stage 2: the prompt module (Q-Former layers checkpointed, the image cross-attended on some)
    /// and the connector train, behind the frozen vision tower and in front of the frozen LLM.
    /// The loss and every gradient inside and after the Q-Former are bit-identical. The image that
    /// the cross-attention layers read gets its gradient terms (key and value side of each such
    /// layer) summed in another order than the plain pass sums them, so the two modules before it
    /// (`vlm_att_projector`, `vlm_att_ln`) agree to rounding (measured: ≤ 5e-10 absolute).
    #[test]
    fn checkpointed_stage2_gradients_equal_plain_ones() {
        assert_checkpointing_changes_no_bit(
            "qadapt_f32_sharded",
            None,
            40,
            &["model.vlm_att_projector.", "model.vlm_att_ln."],
        );
    }
}
