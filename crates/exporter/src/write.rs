//! Serialises a recorded [`Graph`] as an ONNX model file. Weights are loaded from the source and
//! converted one tensor at a time (see [`crate::weights`]); with external data they stream to
//! `<graph>.onnx.data` and never sit in memory together, which keeps a 3B export's peak memory
//! below the size of its output.

use std::io::Write;
use std::path::Path;

use candle_core::{DType, Tensor};
use models::loader::WeightSource;
use prost::Message;

use crate::graph::{FloatType, Graph, InitData, MS_DOMAIN};
use crate::onnx_pb::tensor_proto::{DataLocation, DataType};
use crate::onnx_pb::tensor_shape_proto::{dimension, Dimension};
use crate::onnx_pb::type_proto::{self, Value as TypeValue};
use crate::onnx_pb::{
    GraphProto, ModelProto, OperatorSetIdProto, StringStringEntryProto, TensorProto, TensorShapeProto, TypeProto,
    ValueInfoProto,
};
use crate::{ExportError, Result};

/// The opset every graph targets (LayerNormalization needs 17).
pub const OPSET: i64 = 17;
/// IR version that goes with opset 17.
const IR_VERSION: i64 = 8;
/// Tensors smaller than this stay inline even with external data.
const INLINE_BYTES: usize = 1024;

/// A symbolic or fixed dimension of a graph input or output.
#[derive(Debug, Clone)]
pub enum Dim {
    Sym(&'static str),
    Fixed(i64),
}

/// A graph input or output declaration.
#[derive(Debug, Clone)]
pub struct Io {
    pub name: String,
    pub dtype: DataType,
    pub dims: Vec<Dim>,
}

impl Io {
    /// Declares `name` of element type `dtype` and shape `dims`.
    pub fn new(name: impl Into<String>, dtype: DataType, dims: Vec<Dim>) -> Self {
        Self { name: name.into(), dtype, dims }
    }

    fn proto(&self) -> ValueInfoProto {
        let dim = self
            .dims
            .iter()
            .map(|d| Dimension {
                value: Some(match d {
                    Dim::Sym(s) => dimension::Value::DimParam(s.to_string()),
                    Dim::Fixed(v) => dimension::Value::DimValue(*v),
                }),
                ..Default::default()
            })
            .collect();
        ValueInfoProto {
            name: self.name.clone(),
            r#type: Some(TypeProto {
                value: Some(TypeValue::TensorType(type_proto::Tensor {
                    elem_type: self.dtype as i32,
                    shape: Some(TensorShapeProto { dim }),
                })),
                ..Default::default()
            }),
            ..Default::default()
        }
    }
}

/// The last weight loaded for a `MatMulNBits`: its packed blocks and its scales are two
/// initializers made from one tensor, written one after the other.
type Loaded = Option<(String, Tensor)>;

/// Bytes of one initializer in the export type.
fn encode(
    data: &InitData,
    ft: FloatType,
    src: &dyn WeightSource,
    last: &mut Loaded,
) -> Result<(DataType, Vec<i64>, Vec<u8>)> {
    match data {
        InitData::Raw { dtype, dims, bytes } => Ok((*dtype, dims.clone(), bytes.clone())),
        InitData::Weight { w, transpose } => {
            let t = w.load(src)?;
            let t = if *transpose { t.t()?.contiguous()? } else { t };
            let dims = t.dims().iter().map(|&d| d as i64).collect();
            let bytes = match ft {
                FloatType::F32 => t
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?
                    .iter()
                    .flat_map(|x| x.to_le_bytes())
                    .collect(),
                FloatType::F16 => t
                    .to_dtype(DType::F16)?
                    .flatten_all()?
                    .to_vec1::<half::f16>()?
                    .iter()
                    .flat_map(|x| x.to_le_bytes())
                    .collect(),
            };
            Ok((ft.onnx(), dims, bytes))
        }
        InitData::Quantized { w, q, scales } => {
            let t = match last.take() {
                Some((key, t)) if key == w.key() => t,
                _ => w.load(src)?,
            };
            let (n, k) = t.dims2()?;
            let v = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            let kb = q.k_blocks(k) as i64;
            if *scales {
                Ok((ft.onnx(), vec![n as i64 * kb], ft.encode(&q.scales(&v, n, k))))
            } else {
                *last = Some((w.key().to_string(), t));
                Ok((DataType::Uint8, vec![n as i64, kb, q.blob_bytes() as i64], q.pack(&v, n, k)))
            }
        }
    }
}

/// Bytes the graph's weights take in the export type.
pub fn weight_bytes(g: &Graph) -> u64 {
    let per = match g.ft {
        FloatType::F32 => 4,
        FloatType::F16 => 2,
    };
    g.inits
        .iter()
        .map(|i| match &i.data {
            InitData::Raw { bytes, .. } => bytes.len() as u64,
            InitData::Weight { w, .. } => (w.dims().iter().product::<usize>() * per) as u64,
            InitData::Quantized { w, q, scales } => match w.dims()[..] {
                [n, k] if *scales => (n * q.k_blocks(k) * per) as u64,
                [n, k] => (n * q.k_blocks(k) * q.blob_bytes()) as u64,
                _ => 0,
            },
        })
        .sum()
}

/// Writes `g` to `path` (and its weights to `path` + `.data` when `external`), loading placeholder
/// weights from `src`; `on_tensor` is called after each initializer (for a progress bar). Returns the
/// bytes written.
#[allow(clippy::too_many_arguments)]
pub fn write_model(
    g: &Graph,
    src: &dyn WeightSource,
    inputs: &[Io],
    outputs: &[Io],
    path: &Path,
    external: bool,
    doc: &str,
    mut on_tensor: impl FnMut(),
) -> Result<u64> {
    let file_name = path
        .file_name()
        .and_then(|f| f.to_str())
        .ok_or_else(|| ExportError::Io(format!("bad output path {}", path.display())))?;
    let data_name = format!("{file_name}.data");
    let data_path = path.with_file_name(&data_name);
    let mut data_file = if external {
        Some(std::io::BufWriter::new(
            std::fs::File::create(&data_path)
                .map_err(|e| ExportError::Io(format!("creating {}: {e}", data_path.display())))?,
        ))
    } else {
        None
    };
    let mut offset = 0u64;
    let mut initializer = Vec::with_capacity(g.inits.len());
    let mut last = None;
    for init in &g.inits {
        let (dtype, dims, bytes) = encode(&init.data, g.ft, src, &mut last)?;
        let mut t = TensorProto { name: init.name.clone(), data_type: dtype as i32, dims, ..Default::default() };
        match data_file.as_mut() {
            Some(f) if bytes.len() >= INLINE_BYTES => {
                f.write_all(&bytes).map_err(|e| ExportError::Io(format!("writing {}: {e}", data_path.display())))?;
                t.data_location = DataLocation::External as i32;
                let kv = |k: &str, v: String| StringStringEntryProto { key: k.into(), value: v };
                t.external_data = vec![
                    kv("location", data_name.clone()),
                    kv("offset", offset.to_string()),
                    kv("length", bytes.len().to_string()),
                ];
                offset += bytes.len() as u64;
            }
            _ => t.raw_data = bytes,
        }
        initializer.push(t);
        on_tensor();
    }
    if let Some(mut f) = data_file {
        f.flush().map_err(|e| ExportError::Io(format!("writing {}: {e}", data_path.display())))?;
    }
    let graph = GraphProto {
        name: file_name.trim_end_matches(".onnx").into(),
        node: g.nodes.clone(),
        initializer,
        input: inputs.iter().map(Io::proto).collect(),
        output: outputs.iter().map(Io::proto).collect(),
        doc_string: doc.into(),
        ..Default::default()
    };
    let mut opset_import = vec![OperatorSetIdProto { domain: String::new(), version: OPSET }];
    if g.nodes.iter().any(|n| n.domain == MS_DOMAIN) {
        opset_import.push(OperatorSetIdProto { domain: MS_DOMAIN.into(), version: 1 });
    }
    let model = ModelProto {
        ir_version: IR_VERSION,
        opset_import,
        producer_name: "qadapt-export".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        graph: Some(graph),
        ..Default::default()
    };
    let bytes = model.encode_to_vec();
    std::fs::write(path, &bytes).map_err(|e| ExportError::Io(format!("writing {}: {e}", path.display())))?;
    Ok(bytes.len() as u64 + offset)
}
