//! Helpers shared by the trainer's CLI tests.
#![allow(dead_code, unused_imports)] // each test binary uses a subset

use std::path::Path;
use std::process::{Command, Output};

pub use qadapt_tests::{fixtures, CASES};
pub use trainer::files::copy_tree;

/// The `qadapt-train` binary under test.
pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_qadapt-train"))
}

/// `out`, after asserting that the command succeeded (its stderr otherwise).
pub fn ok(out: Output, what: &str) -> Output {
    assert!(out.status.success(), "{what} failed: {}", String::from_utf8_lossy(&out.stderr));
    out
}

/// A path as a command-line argument.
pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}
