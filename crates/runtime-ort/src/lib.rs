#![warn(missing_docs)]
//! The ONNX Runtime side of qadapt: an export directory of `qadapt-export` opened as sessions on the
//! CPU, CUDA or TensorRT execution provider ([`Runtime`]): image features, prompt splicing, a batched
//! decoder loop with the KV cache kept where the provider computes (IO binding), sampling, the
//! Q-Align score and option likelihoods, and the continuous batch that rows join and leave
//! ([`Running`]). Tokenization, template, preprocessing and sampling come from `qadapt-core`, the
//! same code the candle engine uses. No HTTP, no plots, no candle: the exporter links this crate to
//! verify its graphs, the `runtime` app builds its commands and server on it.

mod cache;
mod choices;
mod manifest;
mod model;
mod replay;
mod running;

pub use choices::Choice;
pub use manifest::{trt_profiles, DecoderSpec, Graphs, ImageSpec, Manifest, QFormerSpec, TokenSpec, FORMAT};
pub use model::{Cache, Request, Runtime};
pub use qadapt_core::sampling::GenerateOptions;
pub use running::Running;

use std::path::{Path, PathBuf};

use ort::ep::ExecutionProvider;
use ort::session::SessionInputValue;
use ort::value::{DynValue, Tensor};

/// Errors of the runtime; each names the file, library or input at fault.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A file of the export directory is missing or invalid.
    #[error("{path}: {msg}")]
    Export {
        /// The file or directory.
        path: PathBuf,
        /// What is wrong with it.
        msg: String,
    },
    /// ONNX Runtime failed (loading the library, a session, a run).
    #[error("ONNX Runtime: {0}")]
    Ort(String),
    /// An execution provider could not be registered.
    #[error("execution provider {ep}: {msg}")]
    Ep {
        /// The provider.
        ep: String,
        /// ONNX Runtime's reason, which names a missing library.
        msg: String,
    },
    /// The caller's input (image, prompt, option, file) is unusable.
    #[error("bad input: {0}")]
    Input(String),
    /// Tokenization, template or sampling settings.
    #[error(transparent)]
    Core(#[from] qadapt_core::Error),
}

/// Result alias of the runtime.
pub type Result<T> = std::result::Result<T, RunError>;

fn ort_err(what: impl std::fmt::Display) -> impl Fn(ort::Error) -> RunError {
    move |e| RunError::Ort(format!("{what}: {e}"))
}

/// Where the graphs run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ep {
    /// The CPU provider (every libonnxruntime has it).
    Cpu,
    /// The CUDA provider (onnxruntime-gpu).
    Cuda,
    /// The TensorRT provider (onnxruntime-gpu with TensorRT 10 libraries).
    Tensorrt,
    /// TensorRT, else CUDA, else CPU: the first that registers (built into this libonnxruntime
    /// and its libraries found).
    Auto,
}

/// ONNX Runtime allows one environment per process.
static ENV: std::sync::OnceLock<ort::environment::Environment> = std::sync::OnceLock::new();

/// Loads ONNX Runtime once per process (a second environment is refused): `lib`, else
/// `ORT_DYLIB_PATH`. The exporter's verification shares it.
pub fn environment(lib: Option<&Path>) -> Result<&'static ort::environment::Environment> {
    if let Some(env) = ENV.get() {
        return Ok(env);
    }
    let builder = match lib {
        Some(p) => ort::init_from(p).map_err(|e| RunError::Ort(format!("loading {}: {e}", p.display())))?,
        None => {
            if std::env::var_os("ORT_DYLIB_PATH").is_none() {
                return Err(RunError::Ort(
                    "libonnxruntime not found: pass --ort-lib PATH/libonnxruntime.so or set ORT_DYLIB_PATH".into(),
                ));
            }
            ort::init()
        }
    };
    let env = builder.with_name("qadapt-run").build().map_err(ort_err("starting"))?;
    Ok(ENV.get_or_init(|| env))
}

/// Where the sessions of an export run: the provider, its device and what TensorRT needs.
#[derive(Debug, Clone)]
pub struct Placement {
    /// The execution provider asked for.
    pub ep: Ep,
    /// GPU index for the CUDA / TensorRT providers.
    pub device_id: i32,
    /// Let TensorRT build fp16 engines.
    pub fp16: bool,
    /// The largest batch the TensorRT profiles cover.
    pub max_batch: usize,
    /// TensorRT engine and timing cache (default: `EXPORT/trt-cache`).
    pub trt_cache: Option<PathBuf>,
    /// Replay decode steps as CUDA graphs (CUDA provider, fused exports; see the `replay` module).
    pub cuda_graph: bool,
    /// The fixed-shape decode steps of `cuda_graph`, run eagerly: on any provider, so that the
    /// path is testable without a GPU. Implied by `cuda_graph`.
    pub fixed_steps: bool,
}

impl Default for Placement {
    fn default() -> Self {
        Self {
            ep: Ep::Cpu,
            device_id: 0,
            fp16: false,
            max_batch: 8,
            trt_cache: None,
            cuda_graph: false,
            fixed_steps: false,
        }
    }
}

impl Ep {
    /// Every provider, in the order `--ep` lists them.
    pub const ALL: [Ep; 4] = [Ep::Cpu, Ep::Cuda, Ep::Tensorrt, Ep::Auto];

    /// What each provider needs, for a command line's help.
    pub fn help(self) -> &'static str {
        match self {
            Ep::Cpu => "the CPU provider (every libonnxruntime has it)",
            Ep::Cuda => "the CUDA provider (onnxruntime-gpu)",
            Ep::Tensorrt => "the TensorRT provider (onnxruntime-gpu with TensorRT 10 libraries)",
            Ep::Auto => "TensorRT, else CUDA, else CPU: the first that registers",
        }
    }

    /// The name `--ep` takes.
    pub fn name(self) -> &'static str {
        match self {
            Ep::Cpu => "cpu",
            Ep::Cuda => "cuda",
            Ep::Tensorrt => "tensorrt",
            Ep::Auto => "auto",
        }
    }

    /// Whether this libonnxruntime was built with the provider (not whether its libraries load).
    fn in_build(self) -> bool {
        let r = match self {
            Ep::Tensorrt => <ort::ep::TensorRT as ExecutionProvider>::is_available(),
            Ep::Cuda => <ort::ep::CUDA as ExecutionProvider>::is_available(),
            Ep::Cpu | Ep::Auto => Ok(true),
        };
        r.unwrap_or(false)
    }
}

impl std::str::FromStr for Ep {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Ep::ALL.into_iter().find(|e| e.name().eq_ignore_ascii_case(s)).ok_or_else(|| {
            format!("unknown execution provider {s:?} (expected one of {})", Ep::ALL.map(Ep::name).join(", "))
        })
    }
}

impl std::fmt::Display for Ep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The providers to try, in order: the one asked for, or for `auto` TensorRT, then CUDA, then the
/// CPU, skipping those the library was built without.
fn candidates(ep: Ep) -> Vec<Ep> {
    match ep {
        Ep::Auto => [Ep::Tensorrt, Ep::Cuda, Ep::Cpu].into_iter().filter(|e| e.in_build()).collect(),
        e => vec![e],
    }
}

/// The provider list of one graph's session on `ep` (a concrete provider, not `auto`). TensorRT gets
/// the graph's optimisation profiles and an engine cache under `cache`.
fn dispatch(ep: Ep, p: &Placement, graph: &str, m: &Manifest, cache: &Path) -> Vec<ort::ep::ExecutionProviderDispatch> {
    match ep {
        Ep::Cpu | Ep::Auto => vec![],
        Ep::Cuda => {
            // Only the decoder replays graphs: the other sessions' shapes change every run.
            let graphs = p.cuda_graph && graph == m.graphs.decoder;
            let cuda = ort::ep::CUDA::default().with_device_id(p.device_id).with_cuda_graph(graphs);
            vec![cuda.build().error_on_failure()]
        }
        Ep::Tensorrt => {
            let mut t = ort::ep::TensorRT::default()
                .with_device_id(p.device_id)
                .with_fp16(p.fp16)
                .with_engine_cache(true)
                .with_engine_cache_path(cache.display())
                .with_timing_cache(true)
                .with_timing_cache_path(cache.display());
            if let Some((min, opt, max)) = trt_profiles(m, graph, p.max_batch) {
                t = t.with_profile_min_shapes(min).with_profile_opt_shapes(opt).with_profile_max_shapes(max);
            }
            vec![t.build().error_on_failure()]
        }
    }
}

/// A float tensor of `shape`, stored as f16 when `f16` (the graphs' float type).
pub fn float_value(shape: Vec<i64>, v: Vec<f32>, f16: bool) -> Result<DynValue> {
    Ok(if f16 {
        Tensor::from_array((shape, v.into_iter().map(half::f16::from_f32).collect::<Vec<_>>()))
            .map_err(ort_err("input"))?
            .into_dyn()
    } else {
        Tensor::from_array((shape, v)).map_err(ort_err("input"))?.into_dyn()
    })
}

/// An int64 tensor of `shape`.
pub fn int_value(shape: Vec<i64>, v: Vec<i64>) -> Result<DynValue> {
    Ok(Tensor::from_array((shape, v)).map_err(ort_err("input"))?.into_dyn())
}

/// [`float_value`] as a session input.
pub fn floats(shape: Vec<i64>, v: Vec<f32>, f16: bool) -> Result<SessionInputValue<'static>> {
    Ok(float_value(shape, v, f16)?.into())
}

/// [`int_value`] as a session input.
pub fn ints(shape: Vec<i64>, v: Vec<i64>) -> Result<SessionInputValue<'static>> {
    Ok(int_value(shape, v)?.into())
}

/// A float output (f32 or f16) as f32.
pub fn out_f32(v: &DynValue) -> Result<Vec<f32>> {
    match v.try_extract_tensor::<f32>() {
        Ok((_, d)) => Ok(d.to_vec()),
        Err(_) => {
            Ok(v.try_extract_tensor::<half::f16>().map_err(ort_err("output"))?.1.iter().map(|x| x.to_f32()).collect())
        }
    }
}
