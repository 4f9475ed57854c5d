//! A memory interpreter: runs a forward pass on shapes alone and tells how many bytes of activations
//! a training step keeps, as the candle interpreter ([`crate::ops::Candle`]) would allocate them.
//!
//! Each op below repeats the tensor allocations of its candle implementation on the CPU (a reshape
//! of a contiguous tensor is a view, a broadcast op a new tensor, LayerNorm in f32 one op, a product
//! with a frozen weight or a constant one op of the activation alone, …). Candle's autograd keeps
//! every tensor that a recorded op took as an argument until the backward pass ends, so the activations kept are the storages of every argument of a recorded op
//! (one that depends on a trainable weight). The backward pass is then simulated in reverse creation
//! order (a valid topological order, as candle's own), each node's gradient allocated when its first
//! consumer is differentiated and freed when the node itself is, to find the peak of live gradients.
//! Checkpointed blocks keep only their packed inputs and outputs; one block's recomputation (its own
//! activations and gradients) is live while its op is differentiated.
//!
//! Because the model's own forward runs on it, the estimate follows the model as it changes; the
//! trainer's `plan` reports it and `bench/plan_check.sh` measures how close it is.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use candle_core::DType;

use crate::ops::{Block, Ops, Param};
use crate::{Error, Result};

/// A value of the memory interpreter: its shape and where its bytes live.
#[derive(Debug, Clone)]
pub struct Shaped {
    /// The dims.
    pub dims: Vec<usize>,
    dtype: DType,
    node: usize,
    /// Whether the layout is contiguous (candle copies non-contiguous operands of a matmul).
    contiguous: bool,
}

impl Shaped {
    fn elems(&self) -> usize {
        self.dims.iter().product()
    }
}

#[derive(Debug, Clone)]
struct Node {
    /// Bytes of the storage this node allocated (0 for a view or a weight).
    bytes: usize,
    /// Logical size: what its gradient takes.
    size: usize,
    /// The node owning the storage (itself unless a view).
    storage: usize,
    args: Vec<usize>,
    /// Depends on a trainable weight: candle records the op and keeps its arguments.
    tracked: bool,
    /// A trainable weight (its gradient is counted with the optimizer state, not here).
    param: bool,
    /// Extra bytes live while this node is differentiated (a checkpointed block's recomputation).
    backward_extra: usize,
    /// An integer tensor: candle computes no gradient for it.
    int: bool,
    /// A product (mul, div, matmul): an operand's gradient is computed from the other operand.
    product: bool,
    /// A constant the op holds (kept with it) without taking it as an operand.
    holds: Option<usize>,
}

/// The memory interpreter (see the module docs).
#[derive(Clone)]
pub struct Meter {
    /// Compute dtype of activations.
    pub dtype: DType,
    /// Whether checkpointable blocks are checkpointed.
    pub checkpointing: bool,
    trainable: Arc<dyn Fn(&str) -> bool + Send + Sync>,
    /// A checkpointed block's unrecorded forward: weights are detached.
    quiet: bool,
    /// Whether a trainable weight was used (a block that trains needs a backward pass).
    used_trainable: bool,
    nodes: Vec<Node>,
}

impl std::fmt::Debug for Meter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Meter").field("dtype", &self.dtype).field("nodes", &self.nodes.len()).finish()
    }
}

/// What a forward and backward pass keep alive, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ActivationBytes {
    /// Activations kept from the forward pass to the backward pass.
    pub kept: usize,
    /// The most bytes live on top of `kept` during the backward pass (gradients of activations,
    /// one checkpointed block's recomputation).
    pub backward: usize,
}

impl Meter {
    /// A meter computing in `dtype`; weights whose key `trainable` accepts train.
    pub fn new(dtype: DType, checkpointing: bool, trainable: impl Fn(&str) -> bool + Send + Sync + 'static) -> Self {
        Self {
            dtype,
            checkpointing,
            trainable: Arc::new(trainable),
            quiet: false,
            used_trainable: false,
            nodes: Vec::new(),
        }
    }

    /// An input of the pass (pixels, ids, masks): no gradient.
    pub fn input(&mut self, dims: &[usize], dtype: DType) -> Shaped {
        self.node(&[], dims.to_vec(), dtype, None, false)
    }

    fn fresh(&self, quiet: bool) -> Meter {
        Meter { quiet, checkpointing: false, used_trainable: false, nodes: Vec::new(), ..self.clone() }
    }

    /// A new tensor computed from `args` (or a view of `view_of`).
    fn node(
        &mut self,
        args: &[&Shaped],
        dims: Vec<usize>,
        dtype: DType,
        view_of: Option<&Shaped>,
        contiguous: bool,
    ) -> Shaped {
        let id = self.nodes.len();
        let size: usize = dims.iter().product::<usize>() * dtype.size_in_bytes();
        let tracked = args.iter().any(|a| self.nodes[a.node].tracked);
        let (storage, bytes) = match view_of {
            Some(v) => (self.nodes[v.node].storage, 0),
            None => (id, size),
        };
        self.nodes.push(Node {
            bytes,
            size,
            storage,
            args: args.iter().map(|a| a.node).collect(),
            tracked,
            param: false,
            backward_extra: 0,
            int: dtype.is_int(),
            product: false,
            holds: None,
        });
        Shaped { dims, dtype, node: id, contiguous }
    }

    /// A new contiguous tensor of `dims` in `x`'s dtype computed from `args`.
    fn new_like(&mut self, args: &[&Shaped], dims: Vec<usize>, dtype: DType) -> Shaped {
        self.node(args, dims, dtype, None, true)
    }

    fn view(&mut self, x: &Shaped, dims: Vec<usize>, contiguous: bool) -> Shaped {
        self.node(&[x], dims, x.dtype, Some(x), contiguous)
    }

    fn contiguous(&mut self, x: &Shaped) -> Shaped {
        if x.contiguous {
            x.clone()
        } else {
            self.new_like(&[x], x.dims.clone(), x.dtype)
        }
    }

    fn cast(&mut self, x: &Shaped, dtype: DType) -> Shaped {
        if x.dtype == dtype {
            x.clone()
        } else {
            self.new_like(&[x], x.dims.clone(), dtype)
        }
    }

    fn unary(&mut self, x: &Shaped) -> Shaped {
        self.new_like(&[x], x.dims.clone(), x.dtype)
    }

    /// An element-wise op with numpy broadcasting. Candle's `broadcast_*` first views each operand
    /// at the output's shape where its own differs (a node of its own), so that operand's gradient is
    /// output-sized.
    fn broadcast(&mut self, a: &Shaped, b: &Shaped) -> Result<Shaped> {
        self.elementwise(a, b, false)
    }

    /// [`Meter::broadcast`] for a product or a quotient.
    fn product(&mut self, a: &Shaped, b: &Shaped) -> Result<Shaped> {
        self.elementwise(a, b, true)
    }

    fn elementwise(&mut self, a: &Shaped, b: &Shaped, product: bool) -> Result<Shaped> {
        let n = a.dims.len().max(b.dims.len());
        let pad = |d: &[usize]| std::iter::repeat_n(1, n - d.len()).chain(d.iter().copied()).collect::<Vec<_>>();
        let (da, db) = (pad(&a.dims), pad(&b.dims));
        let dims = da
            .iter()
            .zip(&db)
            .map(|(&x, &y)| match (x, y) {
                (x, y) if x == y || y == 1 => Ok(x),
                (1, y) => Ok(y),
                _ => Err(Error::Input(format!("meter: cannot broadcast {:?} with {:?}", a.dims, b.dims))),
            })
            .collect::<Result<Vec<_>>>()?;
        let (ta, tb) = (self.nodes[a.node].tracked, self.nodes[b.node].tracked);
        if ta != tb {
            // One recorded operand of the output's shape and a constant: one op of the recorded
            // operand alone, as the candle interpreter trains on the CPU (`crate::frozen`).
            let (x, c) = if ta { (a, b) } else { (b, a) };
            if x.dims == dims {
                let y = self.new_like(&[x], dims, x.dtype);
                self.nodes[y.node].holds = Some(c.node);
                return Ok(y);
            }
        }
        let a = if a.dims == dims { a.clone() } else { self.view(a, dims.clone(), false) };
        let b = if b.dims == dims { b.clone() } else { self.view(b, dims.clone(), false) };
        let y = self.new_like(&[&a, &b], dims, a.dtype);
        self.nodes[y.node].product = product;
        Ok(y)
    }

    /// Reduces the last dim to 1 (a mean, a max, a sum).
    fn reduce_last(&mut self, x: &Shaped) -> Shaped {
        let mut dims = x.dims.clone();
        if let Some(l) = dims.last_mut() {
            *l = 1;
        }
        self.new_like(&[x], dims, x.dtype)
    }

    /// Activations kept for the backward pass, after a forward pass.
    fn kept(&self) -> usize {
        let mut storages = HashSet::new();
        for n in self.nodes.iter().filter(|n| n.tracked && !n.param) {
            storages.insert(n.storage);
            for &a in n.args.iter().chain(&n.holds) {
                storages.insert(self.nodes[a].storage);
            }
        }
        storages.iter().map(|&s| self.nodes[s].bytes).sum()
    }

    /// The most gradient bytes live at once when the backward pass starts from `roots`.
    ///
    /// Candle differentiates a recorded op with respect to every float argument, recorded or not,
    /// and only recorded nodes are ever taken out of its gradient store: the gradients of biases
    /// viewed at a broadcast shape, of LayerNorm weights, masks and dropout masks stay there until
    /// the backward pass ends. Where such an operand is a factor of a product, its gradient is
    /// computed from the other, recorded, factor, so it is recorded too: it keeps the product's
    /// incoming gradient (and its own unsummed copy) alive as well.
    fn backward_peak(&self, roots: &[usize]) -> usize {
        let mut live: HashMap<usize, usize> = roots.iter().map(|&r| (r, self.nodes[r].size)).collect();
        let mut stuck = HashSet::new();
        let mut now: usize = live.values().sum();
        let mut peak = now;
        let Some(&last) = roots.iter().max() else { return 0 };
        for id in (0..=last).rev() {
            let Some(g) = live.remove(&id) else { continue };
            let node = &self.nodes[id];
            let mut transient = 0;
            let mut holds_grad = false;
            let mut seen = HashSet::new();
            for &a in node.args.iter().filter(|&&a| seen.insert(a)) {
                let arg = &self.nodes[a];
                if arg.int || (arg.param && arg.tracked) {
                    // No gradient; or a trainable weight's, counted with the optimizer state.
                    continue;
                }
                if !arg.tracked {
                    if stuck.insert(a) {
                        now += if node.product { 2 * arg.size } else { arg.size };
                    }
                    holds_grad |= node.product;
                    continue;
                }
                match live.entry(a) {
                    std::collections::hash_map::Entry::Occupied(_) => transient = transient.max(arg.size),
                    std::collections::hash_map::Entry::Vacant(e) => {
                        e.insert(arg.size);
                        now += arg.size;
                    }
                }
            }
            // The op's own temporaries: about one tensor of its output's size.
            peak = peak.max(now + transient + node.size + node.backward_extra);
            if !holds_grad {
                now -= g;
            }
        }
        let stuck_bytes: usize = stuck.iter().map(|&a| self.nodes[a].size).sum(); // one copy each
        tracing::debug!(peak, stuck_bytes, stuck_tensors = stuck.len(), end = now, "meter: backward pass");
        peak
    }

    /// What a forward pass ending in `loss` keeps and the backward pass adds (see the module docs).
    pub fn activations(&self, loss: &Shaped) -> ActivationBytes {
        ActivationBytes { kept: self.kept(), backward: self.backward_peak(&[loss.node]) }
    }

    /// Candle's `cross_entropy` on `logits` [N, V] (log-softmax, gather, mean): the loss.
    pub fn cross_entropy(&mut self, logits: &Shaped) -> Shaped {
        let logits = self.cast(logits, DType::F32);
        let max = self.reduce_last(&logits);
        let shifted = self.new_like(&[&logits, &max], logits.dims.clone(), DType::F32);
        let exp = self.unary(&shifted);
        let sum = self.reduce_last(&exp);
        let log = self.unary(&sum);
        let logp = self.new_like(&[&shifted, &log], logits.dims.clone(), DType::F32);
        let picked = self.reduce_last(&logp);
        self.new_like(&[&picked], vec![], DType::F32)
    }

    /// `x.index_select(rows)` of `n` rows of a [.., D] tensor: [n, D].
    pub fn select_rows(&mut self, x: &Shaped, n: usize) -> Shaped {
        let d = x.dims.last().copied().unwrap_or(1);
        self.new_like(&[x], vec![n, d], x.dtype)
    }
}

impl Ops for Meter {
    type T = Shaped;

    fn param(&mut self, p: &Param) -> Result<Shaped> {
        let trains = (self.trainable)(&p.key);
        self.used_trainable |= trains;
        let s = self.node(&[], p.dims().to_vec(), self.dtype, None, true);
        // Weights are counted apart; a trainable one is the leaf of a recorded op.
        self.nodes[s.node].bytes = 0;
        self.nodes[s.node].tracked = trains && !self.quiet;
        self.nodes[s.node].param = true;
        Ok(s)
    }
    fn checkpointing(&self) -> bool {
        self.checkpointing
    }
    fn checkpoint<B: Block>(&mut self, block: B, inputs: &[Shaped], ctx: &[Shaped]) -> Result<Vec<Shaped>> {
        if !self.checkpointing {
            return block.forward(self, inputs, ctx);
        }
        let leaves = |m: &mut Meter, xs: &[Shaped], tracked: bool| -> Vec<Shaped> {
            xs.iter()
                .map(|x| {
                    let l = m.input(&x.dims, x.dtype);
                    m.nodes[l.node].tracked = tracked;
                    l
                })
                .collect()
        };
        // The unrecorded forward, which also tells whether the block trains.
        let mut quiet = self.fresh(true);
        let (ins, cs) = (leaves(&mut quiet, inputs, false), leaves(&mut quiet, ctx, false));
        let outs = block.forward(&mut quiet, &ins, &cs)?;
        let inputs_tracked = inputs.iter().any(|x| self.nodes[x.node].tracked);
        if !inputs_tracked && !quiet.used_trainable {
            return Ok(outs.iter().map(|o| self.input(&o.dims, o.dtype)).collect());
        }
        // The recomputation in the backward pass: the block's activations and gradients.
        let mut again = self.fresh(false);
        let (ins, cs) = (leaves(&mut again, inputs, true), leaves(&mut again, ctx, false));
        let outs = block.forward(&mut again, &ins, &cs)?;
        let roots: Vec<usize> = outs.iter().map(|o| o.node).collect();
        // Kept here: the packed inputs (a copy) and the packed outputs (the op's result).
        let in_elems: usize = inputs.iter().map(Shaped::elems).sum();
        let out_elems: usize = outs.iter().map(Shaped::elems).sum();
        // The recomputation's own copies (`checkpoint::Recompute::backward`): the leaves, the packed
        // outputs, the packed incoming gradient and their product, the inputs' gradients packed.
        let copies = (3 * in_elems + 3 * out_elems) * self.dtype.size_in_bytes();
        let extra = again.kept() + again.backward_peak(&roots) + copies;
        let refs: Vec<&Shaped> = inputs.iter().collect();
        // Packing one input is a view of it; several, a copy.
        let mut packed = match inputs {
            [one] => self.view(one, vec![in_elems], true),
            _ => self.new_like(&refs, vec![in_elems], self.dtype),
        };
        self.nodes[packed.node].tracked = true;
        let y = self.new_like(&[&packed], vec![out_elems], self.dtype);
        self.nodes[y.node].backward_extra = extra;
        packed = y;
        Ok(outs.iter().map(|o| self.view(&packed, o.dims.clone(), true)).collect())
    }
    fn linear(&mut self, x: &Shaped, w: &Shaped, b: Option<&Shaped>) -> Result<Shaped> {
        let (Some(&n), Some(_)) = (w.dims.first(), x.dims.last()) else {
            return Err(Error::Input(format!("meter: linear of {:?} by {:?}", x.dims, w.dims)));
        };
        let x2 = if x.contiguous { x.clone() } else { self.contiguous(x) };
        let mut dims = x.dims.clone();
        if let Some(l) = dims.last_mut() {
            *l = n;
        }
        // Training through a frozen weight is one op of x alone (`crate::frozen`).
        let frozen = !self.quiet && self.nodes[x2.node].tracked && !self.nodes[w.node].tracked;
        let y = if frozen { self.new_like(&[&x2], dims, x.dtype) } else { self.new_like(&[&x2, w], dims, x.dtype) };
        Ok(match b {
            Some(b) => self.broadcast(&y, b)?,
            None => y,
        })
    }
    fn lora_linear(
        &mut self,
        x: &Shaped,
        w: &Shaped,
        b: Option<&Shaped>,
        l: &crate::ops::LoraArgs<'_, Shaped>,
    ) -> Result<Shaped> {
        let frozen = |m: &Meter, t: &Shaped| !m.nodes[t.node].tracked;
        if self.dtype != DType::F32 || !frozen(self, w) || !b.is_none_or(|b| frozen(self, b)) {
            return crate::ops::composite_lora_linear(self, x, w, b, l);
        }
        // The candle interpreter's one op (`crate::lora`): it keeps x, its dropout mask as bytes and
        // the adapter; its backward pass holds about two x-sized temporaries besides the gradient.
        let mut dims = x.dims.clone();
        if let (Some(o), Some(&n)) = (dims.last_mut(), w.dims.first()) {
            *o = n;
        }
        let y = self.new_like(&[x, l.a, l.b], dims, x.dtype);
        if l.dropout > 0.0 {
            let mask = self.input(&x.dims, DType::U8);
            self.nodes[y.node].holds = Some(mask.node);
        }
        self.nodes[y.node].backward_extra = 2 * self.nodes[x.node].size;
        Ok(y)
    }
    fn matmul(&mut self, a: &Shaped, b: &Shaped) -> Result<Shaped> {
        let a = self.contiguous(a);
        let b = self.contiguous(b);
        let (Some(&m), Some(&n)) = (a.dims.get(a.dims.len().wrapping_sub(2)), b.dims.last()) else {
            return Err(Error::Input(format!("meter: matmul of {:?} by {:?}", a.dims, b.dims)));
        };
        let mut dims = a.dims.clone();
        let r = dims.len();
        dims[r - 2] = m;
        dims[r - 1] = n;
        let y = self.new_like(&[&a, &b], dims, a.dtype);
        self.nodes[y.node].product = true;
        Ok(y)
    }
    fn add(&mut self, a: &Shaped, b: &Shaped) -> Result<Shaped> {
        self.broadcast(a, b)
    }
    fn sub(&mut self, a: &Shaped, b: &Shaped) -> Result<Shaped> {
        self.broadcast(a, b)
    }
    fn mul(&mut self, a: &Shaped, b: &Shaped) -> Result<Shaped> {
        self.product(a, b)
    }
    fn affine(&mut self, x: &Shaped, _mul: f64, _add: f64) -> Result<Shaped> {
        Ok(self.unary(x))
    }
    fn layer_norm(&mut self, x: &Shaped, w: &Shaped, b: &Shaped, _eps: f64) -> Result<Shaped> {
        if x.dtype == DType::F32 {
            // The candle interpreter's training LayerNorm in f32: one op of x, and of the weight and
            // bias where they train (`crate::pointwise`).
            let mut args = vec![x];
            args.extend([w, b].into_iter().filter(|p| self.nodes[p.node].tracked));
            return Ok(self.new_like(&args, x.dims.clone(), x.dtype));
        }
        // Otherwise candle's ops: statistics in f32, five full-size tensors.
        let xf = self.cast(x, DType::F32);
        let mean = self.reduce_last(&xf);
        let xc = self.broadcast(&xf, &mean)?;
        let sq = self.unary(&xc);
        let var = self.reduce_last(&sq);
        let std = self.unary(&var);
        let y = self.product(&xc, &std)?;
        let y = self.cast(&y, x.dtype);
        let y = self.product(&y, w)?;
        self.broadcast(&y, b)
    }
    fn gelu_tanh(&mut self, x: &Shaped) -> Result<Shaped> {
        Ok(self.unary(x))
    }
    fn gelu_erf(&mut self, x: &Shaped) -> Result<Shaped> {
        Ok(self.unary(x))
    }
    fn relu(&mut self, x: &Shaped) -> Result<Shaped> {
        Ok(self.unary(x))
    }
    fn sigmoid(&mut self, x: &Shaped) -> Result<Shaped> {
        Ok(self.unary(x))
    }
    fn softmax_last(&mut self, x: &Shaped) -> Result<Shaped> {
        // candle_nn's composite softmax (the trainable one): max, x − max, exp, sum, exp / sum.
        let xf = self.cast(x, DType::F32);
        let max = self.reduce_last(&xf);
        let shifted = self.broadcast(&xf, &max)?;
        let e = self.unary(&shifted);
        let sum = self.reduce_last(&e);
        let y = self.product(&e, &sum)?;
        Ok(self.cast(&y, x.dtype))
    }
    fn transpose(&mut self, x: &Shaped, d1: usize, d2: usize) -> Result<Shaped> {
        let mut dims = x.dims.clone();
        if d1.max(d2) >= dims.len() {
            return Err(Error::Input(format!("meter: transpose {d1},{d2} of {dims:?}")));
        }
        dims.swap(d1, d2);
        Ok(self.view(x, dims, d1 == d2))
    }
    fn split_heads(&mut self, x: &Shaped, heads: usize) -> Result<Shaped> {
        let [b, l, hd] = x.dims[..] else { return Err(Error::Input(format!("meter: split_heads of {:?}", x.dims))) };
        let v = self.view(x, vec![b, heads, l, hd / heads.max(1)], false);
        Ok(self.contiguous(&v))
    }
    fn merge_heads(&mut self, x: &Shaped) -> Result<Shaped> {
        let [b, h, l, d] = x.dims[..] else { return Err(Error::Input(format!("meter: merge_heads of {:?}", x.dims))) };
        let t = self.view(x, vec![b, l, h, d], false);
        let c = self.contiguous(&t);
        Ok(self.view(&c, vec![b, l, h * d], true))
    }
    fn narrow(&mut self, x: &Shaped, dim: usize, start: usize, len: Option<usize>) -> Result<Shaped> {
        let mut dims = x.dims.clone();
        let Some(d) = dims.get_mut(dim) else {
            return Err(Error::Input(format!("meter: narrow dim {dim} of {:?}", x.dims)));
        };
        *d = len.unwrap_or(d.saturating_sub(start));
        let contiguous = x.contiguous && x.dims[..dim].iter().all(|&s| s == 1);
        Ok(self.view(x, dims, contiguous))
    }
    fn cat(&mut self, xs: &[Shaped], dim: usize) -> Result<Shaped> {
        let Some(first) = xs.first() else { return Err(Error::Input("meter: cat of nothing".into())) };
        let mut dims = first.dims.clone();
        dims[dim] = xs.iter().map(|x| x.dims.get(dim).copied().unwrap_or(0)).sum();
        let refs: Vec<&Shaped> = xs.iter().collect();
        Ok(self.new_like(&refs, dims, first.dtype))
    }
    fn embedding(&mut self, table: &Shaped, ids: &Shaped) -> Result<Shaped> {
        let d = table.dims.get(1).copied().unwrap_or(0);
        let mut dims = ids.dims.clone();
        dims.push(d);
        Ok(self.new_like(&[table, ids], dims, table.dtype))
    }
    fn patchify(&mut self, pixels: &Shaped, w: &Shaped, b: &Shaped, patch: usize) -> Result<Shaped> {
        let (&[bsz, _, s, _], Some(&d)) = (pixels.dims.as_slice(), w.dims.first()) else {
            return Err(Error::Input(format!("meter: patchify of {:?}", pixels.dims)));
        };
        let g = s / patch.max(1);
        let y = self.new_like(&[pixels, w], vec![bsz, d, g, g], pixels.dtype);
        let y = self.new_like(&[&y, b], y.dims.clone(), y.dtype); // + b as [1, D, 1, 1]
        let t = self.view(&y, vec![bsz, g * g, d], false);
        Ok(self.contiguous(&t))
    }
    fn expand_batch(&mut self, x: &Shaped, like: &Shaped) -> Result<Shaped> {
        let mut dims = x.dims.clone();
        dims[0] = like.dims[0];
        let v = self.view(x, dims, false);
        Ok(self.contiguous(&v))
    }
    fn rope_tables(&mut self, position_ids: &Shaped, rot_dims: usize, _theta: f64) -> Result<(Shaped, Shaped)> {
        let [b, l] = position_ids.dims[..] else {
            return Err(Error::Input(format!("meter: rope tables of {:?}", position_ids.dims)));
        };
        let dims = vec![b, 1, l, rot_dims];
        Ok((self.input(&dims, self.dtype), self.input(&dims, self.dtype)))
    }
    fn rope(&mut self, x: &Shaped, cos: &Shaped, sin: &Shaped, rot_dims: usize) -> Result<Shaped> {
        if x.dtype == DType::F32 {
            // The candle interpreter's training rotary in f32: one op of x (`crate::rope`).
            let y = self.new_like(&[x], x.dims.clone(), x.dtype);
            self.nodes[y.node].holds = Some(cos.node);
            return Ok(y);
        }
        let mut rot = x.dims.clone();
        let d = rot[3];
        rot[3] = rot_dims;
        let xr = self.view(x, rot.clone(), false);
        let mut half = rot.clone();
        half[3] = rot_dims / 2;
        let x2 = self.view(&xr, half.clone(), false);
        let neg = self.new_like(&[&x2], half, x.dtype);
        let rotated = self.new_like(&[&neg, &xr], rot.clone(), x.dtype);
        let a = self.product(&xr, cos)?;
        let b = self.product(&rotated, sin)?;
        let y = self.broadcast(&a, &b)?;
        if rot_dims == d {
            return Ok(y);
        }
        let mut pass = x.dims.clone();
        pass[3] = d - rot_dims;
        let p = self.view(x, pass, false);
        self.cat(&[y, p], 3)
    }
    fn causal_bias(&mut self, mask2d: &Shaped, query_like: &Shaped) -> Result<Shaped> {
        let (&[b, total], Some(&s)) = (mask2d.dims.as_slice(), query_like.dims.get(2)) else {
            return Err(Error::Input(format!("meter: causal bias of {:?}", mask2d.dims)));
        };
        Ok(self.input(&[b, 1, s, total], self.dtype))
    }
    fn padding_bias(&mut self, mask2d: &Shaped, _fill: f64) -> Result<Shaped> {
        let [b, l] = mask2d.dims[..] else {
            return Err(Error::Input(format!("meter: padding bias of {:?}", mask2d.dims)));
        };
        Ok(self.input(&[b, 1, 1, l], self.dtype))
    }
    fn ones_mask(&mut self, like: &Shaped) -> Result<Shaped> {
        Ok(self.input(&like.dims[..2.min(like.dims.len())], DType::I64))
    }
    fn positions_like(&mut self, like: &Shaped) -> Result<Shaped> {
        Ok(self.input(&[1, like.dims.get(1).copied().unwrap_or(0)], DType::I64))
    }
    fn last_positions(&mut self, x: &Shaped, _keep: &Shaped) -> Result<Shaped> {
        Ok(x.clone())
    }
    fn gather_positions(&mut self, x: &Shaped, idx: &Shaped) -> Result<Shaped> {
        let mut dims = idx.dims.clone();
        dims.push(x.dims.last().copied().unwrap_or(0));
        Ok(self.new_like(&[x, idx], dims, x.dtype))
    }
    fn attention(&mut self, q: &Shaped, k: &Shaped, v: &Shaped, bias: Option<&Shaped>, scale: f64) -> Result<Shaped> {
        if self.dtype != DType::F32 {
            return crate::ops::composite_attention(self, q, k, v, bias, scale);
        }
        // The candle interpreter's training softmax in f32: one op keeping its output (`crate::softmax`).
        let kt = self.transpose(k, 2, 3)?;
        let scores = self.matmul(q, &kt)?;
        let probs = self.new_like(&[&scores], scores.dims.clone(), scores.dtype);
        // Its backward holds g ⊙ y, g − Σ, their product and the scaled result: three more.
        self.nodes[probs.node].backward_extra = 2 * self.nodes[probs.node].size;
        self.matmul(&probs, v)
    }
    fn dropout(&mut self, x: &Shaped, p: f32) -> Result<Shaped> {
        if p <= 0.0 {
            return Ok(x.clone());
        }
        let mask = self.input(&x.dims, x.dtype);
        self.product(x, &mask)
    }
}
