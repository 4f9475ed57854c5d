//! One error type for the candle-free layer; each variant names the file or input at fault.

use std::path::{Path, PathBuf};

/// Errors of config parsing, tokenization, prompt building and image loading.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    #[error("{path}: bad config: {msg}")]
    Config { path: PathBuf, msg: String },
    #[error("tokenizer {path}: {msg}")]
    Tokenizer { path: PathBuf, msg: String },
    #[error("image {path}: {msg}")]
    Image { path: PathBuf, msg: String },
    #[error("prompt: {0}")]
    Prompt(String),
    /// An IQA labels CSV is unreadable or lacks a column.
    #[error("labels {path}: {msg}")]
    Labels { path: PathBuf, msg: String },
    /// An evaluation input (a Q-Bench file) is unreadable or malformed.
    #[error("{path}: {msg}")]
    Input { path: PathBuf, msg: String },
    /// A sampling setting out of its range (temperature, top-k, top-p, repetition penalty).
    #[error("sampling: {0}")]
    Sampling(String),
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Error::Io { path: path.to_path_buf(), err: source }
    }
}
