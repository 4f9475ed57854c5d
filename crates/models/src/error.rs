//! Errors of model loading and running; each names the key, file or input at fault.

use std::path::{Path, PathBuf};

/// Errors of the `models` crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("missing tensor {key}")]
    MissingKey { key: String },
    #[error("tensor {key}: expected shape {expected:?}, found {found:?}")]
    ShapeMismatch { key: String, expected: Vec<usize>, found: Vec<usize> },
    #[error("{path}: {msg}")]
    Checkpoint { path: PathBuf, msg: String },
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    #[error("unsupported: {0}")]
    Unsupported(String),
    #[error("bad input: {0}")]
    Input(String),
    #[error(transparent)]
    Core(#[from] qadapt_core::Error),
    #[error("tensor op: {0}")]
    Candle(#[from] candle_core::Error),
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Error::Io { path: path.to_path_buf(), err: source }
    }
}
