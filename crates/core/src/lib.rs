//! Candle-free pieces of qadapt shared by the trainer, the exporter and the ONNX runtime:
//! the model config, tokenizers, the Bunny prompt template, image preprocessing, and the
//! sampling / Q-Align scoring maths, and the Q-Bench protocol both evaluators follow. Nothing here knows about tensors of a framework.

pub mod config;
pub mod error;
pub mod files;
pub mod image;
pub mod labels;
pub mod manifest;
pub mod metrics;
pub mod qbench;
pub mod sampling;
pub mod template;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod tokenizer;

pub use config::{BunnyConfig, ModelType, QFormerConfig, VisionConfig};
pub use error::{Error, Result};
pub use manifest::Manifest;
pub use template::{PromptIds, IMAGE_TOKEN};
pub use tokenizer::{QFormerTokenizer, TextTokenizer};

/// JSON → `T`, an error naming the field at fault: `(Some("decoder.layers"), "decoder.layers: invalid
/// type: …")`, or `(None, "invalid JSON: …")` when the text itself is broken or a top-level field is
/// missing.
pub fn from_json<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> std::result::Result<T, (Option<String>, String)> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|e| match e.path().to_string().as_str() {
        "." => (None, format!("invalid JSON: {}", e.inner())),
        p => (Some(p.to_string()), format!("{p}: {}", e.inner())),
    })
}
