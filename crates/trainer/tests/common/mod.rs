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

/// `configs/tiny-qadapt.json`: the tiny Q-Adapt the trainer's tests train.
pub fn config() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../configs/tiny-qadapt.json")
}

/// `synth` of `n` images into `dir/data`, then `init` of the tiny Q-Adapt (tokenizers trained on that
/// data) into `dir/base`; returns (data, base).
pub fn synth_and_init(dir: &Path, n: usize) -> (std::path::PathBuf, std::path::PathBuf) {
    let (data, base) = (dir.join("data"), dir.join("base"));
    ok(bin().args(["synth", "--out", s(&data), "--n", &n.to_string(), "--size", "32"]).output().unwrap(), "synth");
    ok(
        bin()
            .args(["init", "--config", s(&config()), "--out", s(&base), "--data", s(&data.join("train.json"))])
            .output()
            .unwrap(),
        "init",
    );
    (data, base)
}
