//! File-system helpers (shared with the exporter; they live in `qadapt_core::files`).

use std::path::Path;

pub use qadapt_core::files::{copy_tokenizers, copy_tree, TOKENIZER_FILES};

/// [`qadapt_core::files::write_dir_atomic`] with `anyhow` errors, as the trainer's commands use.
pub fn write_dir_atomic(dir: &Path, fill: impl FnOnce(&Path) -> anyhow::Result<()>) -> anyhow::Result<()> {
    qadapt_core::files::write_dir_atomic(dir, fill)
}
