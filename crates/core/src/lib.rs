//! Candle-free pieces of qadapt shared by the trainer, the exporter and the ONNX runtime:
//! the model config, tokenizers, the Bunny prompt template, image preprocessing, and the
//! sampling / Q-Align scoring maths. Nothing here knows about tensors of a framework.

pub mod config;
pub mod error;
pub mod files;
pub mod image;
pub mod metrics;
pub mod sampling;
pub mod template;
pub mod tokenizer;

pub use config::{BunnyConfig, ModelType, QFormerConfig, VisionConfig};
pub use error::{Error, Result};
pub use template::{PromptIds, IMAGE_TOKEN};
pub use tokenizer::{QFormerTokenizer, TextTokenizer};
