#![warn(missing_docs)]
//! `qadapt-run`'s commands over the ONNX Runtime library [`runtime_ort`]: [`batch`] over many
//! images, [`eval`] on Q-Bench and IQA labels, the HTTP [`serve`]r, and the command line ([`cli`]).
//! The library's types are re-exported, so `runtime::Runtime` is `runtime_ort::Runtime`.

pub mod batch;
pub mod cli;
pub mod eval;
pub mod serve;

pub use runtime_ort::*;
