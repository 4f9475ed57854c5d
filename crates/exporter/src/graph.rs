//! The second interpreter of [`models::ops::Ops`]: instead of computing, it records every op as ONNX
//! nodes (opset 17, standard domain only), so that the exported graphs are the very forward passes
//! that train and run in candle.
//!
//! Weights stay [`Weight`]s (usually placeholders, see [`crate::weights`]) until the model is written
//! ([`crate::write`]): a `param` is only registered as an initializer when an op consumes it, and a
//! weight consumed by `linear` is stored transposed ([in, out]) so that the graph needs no Transpose
//! node in front of every MatMul.

use std::collections::HashMap;

use crate::onnx_pb::{attribute_proto::AttributeType, tensor_proto::DataType, AttributeProto, NodeProto};
use crate::quant::Quant;
use crate::weights::Weight;

/// ONNX Runtime's contrib-op domain.
pub const MS_DOMAIN: &str = "com.microsoft";

/// The float type activations and weights are exported in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FloatType {
    F32,
    F16,
}

impl FloatType {
    /// The ONNX element type.
    pub fn onnx(self) -> DataType {
        match self {
            FloatType::F32 => DataType::Float,
            FloatType::F16 => DataType::Float16,
        }
    }
    /// Little-endian bytes of `v` in this type.
    pub fn encode(self, v: &[f32]) -> Vec<u8> {
        match self {
            FloatType::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            FloatType::F16 => v.iter().flat_map(|x| half::f16::from_f32(*x).to_le_bytes()).collect(),
        }
    }
    /// The most negative bias a masked attention score gets. f16 uses half its minimum so that a
    /// score plus the bias cannot round to −∞ (a fully masked row would then become NaN).
    pub fn mask_min(self) -> f32 {
        match self {
            FloatType::F32 => f32::MIN,
            FloatType::F16 => half::f16::MIN.to_f32() / 2.0,
        }
    }
}

/// A value in the graph: its name and rank (ranks are static even where dims are not).
#[derive(Debug, Clone)]
pub struct V {
    pub name: String,
    pub rank: usize,
    /// A weight not yet registered as an initializer (see the module docs).
    pub(crate) param: Option<Weight>,
}

/// What an initializer holds until it is written.
#[derive(Debug, Clone)]
pub enum InitData {
    /// A checkpoint weight, converted to the export type when written (transposed if asked).
    Weight { w: Weight, transpose: bool },
    /// A small constant already encoded.
    Raw { dtype: DataType, dims: Vec<i64>, bytes: Vec<u8> },
    /// One input of a `MatMulNBits` made from a torch-layout weight [N, K]: the packed blocks
    /// (`scales: false`) or their scales. Quantized when written, one tensor at a time.
    Quantized { w: Weight, q: Quant, scales: bool },
}

/// A named initializer.
#[derive(Debug, Clone)]
pub struct Init {
    pub name: String,
    pub data: InitData,
}

/// What the layers of a `--fused` graph share (the ops themselves are recorded by
/// [`crate::fused`]).
#[derive(Debug, Clone)]
pub struct Fused {
    /// Rows of the rotary tables: the longest cache buffer the graph accepts.
    pub max_positions: usize,
    /// Whether the graph reads `position_ids` (rotary applied before the attention op).
    pub uses_positions: bool,
    pub(crate) ctx: Option<Ctx>,
}

impl Fused {
    /// A fused decoder whose caches hold at most `max_positions`.
    pub fn new(max_positions: usize) -> Self {
        Self { max_positions, uses_positions: false, ctx: None }
    }
}

/// Per-step values derived once from the graph inputs.
#[derive(Debug, Clone)]
pub(crate) struct Ctx {
    /// int32 [B]: each row's keys after this step, minus one.
    pub(crate) seqlens_k: String,
    /// int32 scalar: the longest row's.
    pub(crate) total: String,
    pub(crate) rotary: Rotary,
}

#[derive(Debug, Clone)]
pub(crate) enum Rotary {
    /// `cos_cache` / `sin_cache` initializers [max_positions, rotary/2] for the op.
    Inside {
        cos: String,
        sin: String,
    },
    /// Tables [B, S, 1, rotary] from `position_ids`, applied to q and k before the op.
    Outside {
        cos: V,
        sin: V,
    },
    None,
}

/// Records a forward pass as ONNX nodes.
#[derive(Debug)]
pub struct Graph {
    pub ft: FloatType,
    /// Linears with a weight become `MatMulNBits` (see [`crate::quant`]).
    pub quant: Option<Quant>,
    /// Set for the `--fused` decoder: attention, GELU and residual LayerNorms become ONNX Runtime
    /// contrib ops (see [`crate::fused`]).
    pub fused: Option<Fused>,
    pub nodes: Vec<NodeProto>,
    pub inits: Vec<Init>,
    registered: HashMap<String, usize>,
    counter: usize,
}

pub(crate) fn attr_ints(name: &str, v: &[i64]) -> AttributeProto {
    AttributeProto { name: name.into(), r#type: AttributeType::Ints as i32, ints: v.to_vec(), ..Default::default() }
}
pub(crate) fn attr_int(name: &str, v: i64) -> AttributeProto {
    AttributeProto { name: name.into(), r#type: AttributeType::Int as i32, i: v, ..Default::default() }
}
pub(crate) fn attr_float(name: &str, v: f32) -> AttributeProto {
    AttributeProto { name: name.into(), r#type: AttributeType::Float as i32, f: v, ..Default::default() }
}

impl Graph {
    /// An empty graph exporting floats as `ft`.
    pub fn new(ft: FloatType) -> Self {
        Self {
            ft,
            quant: None,
            fused: None,
            nodes: Vec::new(),
            inits: Vec::new(),
            registered: HashMap::new(),
            counter: 0,
        }
    }

    /// A weight as a value, registered as an initializer when an op consumes it.
    pub fn weight(&mut self, w: Weight) -> V {
        V { name: w.key().to_string(), rank: w.dims().len(), param: Some(w) }
    }

    /// A graph input value (its declaration is the writer's business).
    pub fn input(&self, name: &str, rank: usize) -> V {
        V { name: name.into(), rank, param: None }
    }

    pub(crate) fn fresh(&mut self, op: &str) -> String {
        self.counter += 1;
        format!("{op}_{}", self.counter)
    }

    /// The name of `v`, registering it as an initializer first if it is a pending weight.
    pub(crate) fn name(&mut self, v: &V) -> String {
        if let Some(w) = &v.param {
            self.register(w.key(), InitData::Weight { w: w.clone(), transpose: false });
        }
        v.name.clone()
    }

    pub(crate) fn register(&mut self, name: &str, data: InitData) {
        if !self.registered.contains_key(name) {
            self.registered.insert(name.to_string(), self.inits.len());
            self.inits.push(Init { name: name.to_string(), data });
        }
    }

    /// Appends a node with one output; returns the output value.
    pub fn node(&mut self, op: &str, inputs: &[&str], attrs: Vec<AttributeProto>, rank: usize) -> V {
        let out = self.fresh(op);
        self.nodes.push(NodeProto {
            op_type: op.into(),
            name: out.clone(),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![out.clone()],
            attribute: attrs,
            ..Default::default()
        });
        V { name: out, rank, param: None }
    }

    /// Appends a node of ONNX Runtime's `com.microsoft` domain.
    pub fn ms_node(&mut self, op: &str, inputs: &[&str], attrs: Vec<AttributeProto>, rank: usize) -> V {
        let v = self.node(op, inputs, attrs, rank);
        if let Some(n) = self.nodes.last_mut() {
            n.domain = MS_DOMAIN.into();
        }
        v
    }

    /// Appends a node with several outputs (`ranks.len()` of them; a rank of `None` leaves that
    /// optional output unnamed), in `domain`.
    pub fn node_outputs(
        &mut self,
        op: &str,
        domain: &str,
        inputs: &[&str],
        attrs: Vec<AttributeProto>,
        ranks: &[Option<usize>],
    ) -> Vec<Option<V>> {
        let base = self.fresh(op);
        let outs: Vec<Option<V>> = ranks
            .iter()
            .enumerate()
            .map(|(i, r)| r.map(|rank| V { name: format!("{base}:{i}"), rank, param: None }))
            .collect();
        self.nodes.push(NodeProto {
            op_type: op.into(),
            domain: domain.into(),
            name: base,
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outs.iter().map(|o| o.as_ref().map_or(String::new(), |v| v.name.clone())).collect(),
            attribute: attrs,
            ..Default::default()
        });
        outs
    }

    /// Renames `v` as a graph output (an Identity node).
    pub fn output(&mut self, v: &V, name: &str) {
        let input = self.name(v);
        self.nodes.push(NodeProto {
            op_type: "Identity".into(),
            name: format!("out_{name}"),
            input: vec![input],
            output: vec![name.into()],
            ..Default::default()
        });
    }

    /// Declares `v` as a graph output in f32 (a Cast first when exporting f16).
    pub fn output_f32(&mut self, v: &V, name: &str) {
        let x = self.as_f32(v);
        self.output(&x, name);
    }

    /// An int64 constant.
    pub fn ints(&mut self, v: &[i64]) -> String {
        let name =
            format!("const_i64_{}", v.iter().map(|x| x.to_string()).collect::<Vec<_>>().join("_")).replace('-', "m");
        self.register(
            &name,
            InitData::Raw {
                dtype: DataType::Int64,
                dims: vec![v.len() as i64],
                bytes: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            },
        );
        name
    }

    /// An int64 scalar constant.
    pub(crate) fn int_scalar(&mut self, v: i64) -> String {
        let name = format!("const_i64s_{v}");
        self.register(&name, InitData::Raw { dtype: DataType::Int64, dims: vec![], bytes: v.to_le_bytes().to_vec() });
        name
    }

    /// A float constant (scalar when `dims` is empty) in the export type, or in f32 when `f32`.
    pub(crate) fn floats(&mut self, v: &[f32], dims: &[i64], f32_: bool) -> String {
        let ft = if f32_ { FloatType::F32 } else { self.ft };
        self.counter += 1;
        let name = format!("const_f_{}", self.counter);
        self.register(&name, InitData::Raw { dtype: ft.onnx(), dims: dims.to_vec(), bytes: ft.encode(v) });
        name
    }

    pub(crate) fn scalar(&mut self, v: f32) -> String {
        self.floats(&[v], &[], false)
    }

    pub(crate) fn cast(&mut self, x: &str, to: DataType, rank: usize) -> V {
        self.node("Cast", &[x], vec![attr_int("to", to as i64)], rank)
    }

    /// `x` in f32 (a Cast node when exporting f16).
    pub(crate) fn as_f32(&mut self, x: &V) -> V {
        let n = self.name(x);
        match self.ft {
            FloatType::F32 => V { name: n, rank: x.rank, param: None },
            FloatType::F16 => self.cast(&n, DataType::Float, x.rank),
        }
    }

    /// `x` (f32) back in the export type.
    pub(crate) fn back_from_f32(&mut self, x: V) -> V {
        match self.ft {
            FloatType::F32 => x,
            FloatType::F16 => self.cast(&x.name, DataType::Float16, x.rank),
        }
    }

    pub(crate) fn binary(&mut self, op: &str, a: &V, b: &V) -> V {
        let (na, nb) = (self.name(a), self.name(b));
        self.node(op, &[&na, &nb], vec![], a.rank.max(b.rank))
    }

    pub(crate) fn unary(&mut self, op: &str, x: &V) -> V {
        let n = self.name(x);
        self.node(op, &[&n], vec![], x.rank)
    }

    pub(crate) fn unsqueeze(&mut self, x: &V, axes: &[i64]) -> V {
        let (n, a) = (self.name(x), self.ints(axes));
        self.node("Unsqueeze", &[&n, &a], vec![], x.rank + axes.len())
    }

    pub(crate) fn reshape(&mut self, x: &V, shape: &[i64]) -> V {
        let (n, s) = (self.name(x), self.ints(shape));
        self.node("Reshape", &[&n, &s], vec![], shape.len())
    }

    pub(crate) fn permute(&mut self, x: &V, perm: &[i64]) -> V {
        let n = self.name(x);
        self.node("Transpose", &[&n], vec![attr_ints("perm", perm)], x.rank)
    }

    pub(crate) fn slice(&mut self, x: &V, axis: i64, start: i64, end: i64) -> V {
        let n = self.name(x);
        let (s, e, a) = (self.ints(&[start]), self.ints(&[end]), self.ints(&[axis]));
        self.node("Slice", &[&n, &s, &e, &a], vec![], x.rank)
    }

    /// `Shape(x)[i]` as an int64 scalar.
    pub(crate) fn dim(&mut self, x: &V, i: i64) -> V {
        let n = self.name(x);
        let shape = self.node("Shape", &[&n], vec![], 1);
        let idx = self.int_scalar(i);
        self.node("Gather", &[&shape.name, &idx], vec![attr_int("axis", 0)], 0)
    }

    pub(crate) fn concat(&mut self, names: &[&str], axis: i64, rank: usize) -> V {
        self.node("Concat", names, vec![attr_int("axis", axis)], rank)
    }

    pub(crate) fn gelu_tanh_impl(&mut self, x: &V) -> V {
        // 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))
        let x3 = {
            let sq = self.binary("Mul", x, x);
            self.binary("Mul", &sq, x)
        };
        let c = self.scalar(0.044715);
        let cx3 = self.node("Mul", &[&x3.name, &c], vec![], x.rank);
        let inner = self.binary("Add", x, &cx3);
        let k = self.scalar((2.0f64 / std::f64::consts::PI).sqrt() as f32);
        let scaled = self.node("Mul", &[&inner.name, &k], vec![], x.rank);
        let t = self.unary("Tanh", &scaled);
        self.half_x_one_plus(x, &t)
    }

    /// `0.5·x·(1 + t)`.
    pub(crate) fn half_x_one_plus(&mut self, x: &V, t: &V) -> V {
        let one = self.scalar(1.0);
        let onep = self.node("Add", &[&t.name, &one], vec![], x.rank);
        let xt = self.binary("Mul", x, &onep);
        let half = self.scalar(0.5);
        self.node("Mul", &[&xt.name, &half], vec![], x.rank)
    }
}
