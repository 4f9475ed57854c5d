//! File-system helpers (shared with the exporter; they live in `qadapt_core::files`).

pub use qadapt_core::files::{copy_tokenizers, copy_tree, write_dir_atomic, TOKENIZER_FILES};
