//! ONNX export of Bunny / Q-Adapt: the model's own forward passes (written once over
//! [`models::ops::Ops`]) traced by a graph builder ([`graph::Graph`]) into `vision.onnx`, `embed.onnx`
//! and `decoder.onnx`, plus `qadapt.json` and the tokenizers; then checked against candle through ONNX
//! Runtime ([`verify`]). Module map: [`graph`] → [`export`] (what each graph holds) → [`write`]
//! (protobuf, external data) → [`verify`].

pub mod export;
pub mod fused;
pub mod graph;
#[allow(clippy::all, missing_docs)]
pub mod onnx_pb;
pub mod quant;
pub mod record;
pub mod verify;
pub mod weights;
pub mod write;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use models::adapter::{adapter_dir, AdaptedSource};
use models::loader::{Checkpoint, WeightSource};
use models::Bunny;
use qadapt_core::BunnyConfig;

pub use graph::FloatType;

/// What can go wrong while exporting.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Model(#[from] models::Error),
    #[error(transparent)]
    Core(#[from] qadapt_core::error::Error),
    #[error("{0}")]
    Io(String),
    #[error("ONNX Runtime: {0}")]
    Ort(String),
    #[error("verification failed: {0}")]
    Mismatch(String),
}

impl From<std::io::Error> for ExportError {
    fn from(e: std::io::Error) -> Self {
        ExportError::Io(e.to_string())
    }
}

impl From<candle_core::Error> for ExportError {
    fn from(e: candle_core::Error) -> Self {
        ExportError::Model(models::Error::from(e))
    }
}

/// The exporter's result type.
pub type Result<T> = std::result::Result<T, ExportError>;

/// What to export and how.
#[derive(Debug, Clone)]
pub struct ExportOptions {
    /// HF model directory (base or already merged).
    pub model: PathBuf,
    /// Stage-1 run (or any PEFT adapter directory: `adapter_model.safetensors` [+
    /// `non_lora_trainables.safetensors`]), merged into the weights before tracing.
    pub stage1: Option<PathBuf>,
    /// Stage-2 run (prompt module and connector), applied over stage 1.
    pub stage2: Option<PathBuf>,
    pub out: PathBuf,
    pub ft: FloatType,
    /// Weights to `<graph>.onnx.data` (always for graphs above 128 MiB of weights).
    pub external_data: bool,
    /// Run each graph through ONNX Runtime against candle; fail above `tolerance`.
    pub verify: bool,
    pub ort_lib: Option<PathBuf>,
    pub tolerance: f32,
    /// Weight-only quantization of the linears (`MatMulNBits`); verified by [`verify::quant_report`]
    /// against [`verify::QuantBounds`] instead of `tolerance`.
    pub quant: Option<quant::Quant>,
    /// The contrib-op graph variant ([`fused`]): `GroupQueryAttention` over a cache buffer written
    /// in place, `SkipLayerNormalization`, `FastGelu`.
    pub fused: bool,
}

/// Default verification tolerance (max relative error) per export type.
pub fn default_tolerance(ft: FloatType) -> f32 {
    match ft {
        FloatType::F32 => 1e-4,
        FloatType::F16 => 2e-2,
    }
}

/// One written graph.
#[derive(Debug, Clone, serde::Serialize)]
pub struct GraphSummary {
    pub file: String,
    pub nodes: usize,
    pub initializers: usize,
    pub bytes: u64,
    pub external_data: bool,
    /// Worst relative error against candle over the graph's outputs (when verified).
    pub max_rel_err: Option<f32>,
}

/// What an export did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ExportSummary {
    pub out: PathBuf,
    pub graphs: Vec<GraphSummary>,
    pub verified: bool,
    /// Accuracy of a quantized export against the unquantized model (when verified).
    pub quant: Option<verify::QuantReport>,
}

/// Graphs whose weights exceed this keep them in `<graph>.onnx.data`: protobuf cannot hold 2 GiB, and
/// an inline graph is held twice in memory while encoded (measured: a 1.2 GB inline vision graph took
/// a 3B f16 export's peak RSS to 1.34× its weight bytes).
const EXTERNAL_ABOVE: u64 = 128 * 1024 * 1024;

/// The config of the model an export writes: a stage-2 run carries its own (the prompt module's
/// shape).
fn config(opts: &ExportOptions) -> Result<BunnyConfig> {
    let config_path = match opts.stage2.as_deref().map(adapter_dir) {
        Some(d) if d.join("config.json").is_file() => d.join("config.json"),
        _ => opts.model.join("config.json"),
    };
    Ok(BunnyConfig::from_file(&config_path)?)
}

/// Runs `f` over the weights of the base model with stage 1's LoRA merged and stage 2's tensors over
/// it, as `qadapt-train merge` writes them but per tensor, when asked for.
fn with_weights<R>(opts: &ExportOptions, dtype: DType, f: impl FnOnce(&dyn WeightSource) -> Result<R>) -> Result<R> {
    let dev = Device::Cpu;
    let ck = Checkpoint::open(&opts.model, &dev, dtype)?;
    let s1 = match &opts.stage1 {
        Some(r) => Some(AdaptedSource::open(&ck, &adapter_dir(r), &dev, dtype)?),
        None => None,
    };
    let base: &dyn WeightSource = match &s1 {
        Some(s) => s,
        None => &ck,
    };
    let s2 = match opts.stage2.as_deref().map(adapter_dir) {
        Some(d) => Some(AdaptedSource::open(base, &d, &dev, dtype)?),
        None => None,
    };
    f(match &s2 {
        Some(s) => s,
        None => base,
    })
}

/// Exports a model; `progress(graph, done, total)` is called per written tensor. The directory
/// appears only complete: it is written under a temporary name and renamed, and a failed
/// verification leaves nothing behind.
pub fn export(opts: &ExportOptions, mut progress: impl FnMut(&str, usize, usize)) -> Result<ExportSummary> {
    if !opts.model.is_dir() {
        return Err(ExportError::Io(format!("model directory {} not found", opts.model.display())));
    }
    // Start ONNX Runtime first: a missing library should fail before minutes of tracing.
    let env = if opts.verify { Some(verify::environment(opts.ort_lib.as_deref())?) } else { None };
    // Weights load in the export type: an f16 export of a 3B model never holds an f32 copy.
    let dtype = match opts.ft {
        FloatType::F32 => DType::F32,
        FloatType::F16 => DType::F16,
    };
    if let Some(q) = &opts.quant {
        q.validate().map_err(|e| ExportError::Io(format!("--quantize: {e}")))?;
    }
    let config = config(opts)?;
    let tokenizer = qadapt_core::TextTokenizer::from_dir(&opts.model)?;
    let level_ids = qadapt_core::sampling::level_token_ids(&tokenizer)?;
    let mut graphs = Vec::new();
    let mut quant_report = None;
    with_weights(opts, dtype, |src| {
        // Traced over placeholders: each weight is loaded when it is written (see `weights`).
        let model = Bunny::new(&weights::Deferred::new(src, dtype), config.clone())?;
        qadapt_core::files::write_dir_atomic(&opts.out, |dir: &Path| -> Result<()> {
            let graphs_to_write = [
                export::vision(&model, opts.ft, opts.quant, opts.fused)?,
                export::embed(&model, opts.ft)?,
                export::decoder(&model, opts.ft, opts.quant, opts.fused)?,
                export::cache_join(&model, opts.ft, opts.fused)?,
                export::cache_select(&model, opts.ft, opts.fused)?,
            ];
            // Quantized graphs differ from the float model by design: their accuracy report decides.
            let mut quantized = Vec::new();
            for traced in graphs_to_write {
                if traced.graph.quant.is_some() {
                    quantized.push(traced.file);
                }
                let total = traced.graph.inits.len();
                let external = opts.external_data || write::weight_bytes(&traced.graph) > EXTERNAL_ABOVE;
                let mut done = 0;
                let bytes = write::write_model(
                    &traced.graph,
                    src,
                    &traced.inputs,
                    &traced.outputs,
                    &dir.join(traced.file),
                    external,
                    "qadapt-export",
                    || {
                        done += 1;
                        progress(traced.file, done, total);
                    },
                )?;
                graphs.push(GraphSummary {
                    file: traced.file.into(),
                    nodes: traced.graph.nodes.len(),
                    initializers: total,
                    bytes,
                    external_data: external,
                    max_rel_err: None,
                });
            }
            qadapt_core::files::copy_tokenizers(&opts.model, dir)?;
            let manifest = export::manifest(&model, &opts.model, opts.ft, opts.quant, opts.fused, level_ids);
            let text =
                serde_json::to_string_pretty(&manifest).map_err(|e| ExportError::Io(format!("qadapt.json: {e}")))?;
            std::fs::write(dir.join("qadapt.json"), text)?;
            if let Some(env) = &env {
                // Verification runs candle on the real weights.
                let model = Bunny::new(src, config.clone())?;
                let mut failures = Vec::new();
                for (file, report) in verify::verify(env, &model, dir, opts.ft, dtype, opts.fused, 0)? {
                    let worst = report.iter().map(|(_, e)| *e).fold(0.0f32, f32::max);
                    for (name, err) in &report {
                        tracing::debug!(graph = %file, output = %name, rel_err = err, "verified");
                        // NaN fails too.
                        if err.is_nan() || (*err > opts.tolerance && !quantized.contains(&file.as_str())) {
                            failures
                                .push(format!("{file} {name}: max relative error {err:.2e} > {:.0e}", opts.tolerance));
                        }
                    }
                    if let Some(g) = graphs.iter_mut().find(|g| g.file == file) {
                        g.max_rel_err = Some(worst);
                    }
                }
                if let Some(q) = opts.quant {
                    let report = verify::quant_report(env, &model, dir, opts.ft, dtype, q.vision, opts.fused)?;
                    if let Some(miss) = verify::QuantBounds::of(q.bits).check(&report) {
                        failures.push(format!("{} export below its accuracy bound: {miss}", q.name()));
                    }
                    quant_report = Some(report);
                }
                if !failures.is_empty() {
                    return Err(ExportError::Mismatch(failures.join("; ")));
                }
            }
            Ok(())
        })
    })?;
    Ok(ExportSummary { out: opts.out.clone(), graphs, verified: opts.verify, quant: quant_report })
}
