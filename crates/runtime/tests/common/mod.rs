//! Helpers of the runtime's integration tests: fixture exports, the binary, JSON output.
#![allow(dead_code)]

pub mod http;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The HF parity fixtures (`tests/fixtures/*`).
pub const CASES: [&str; 4] = ["bunny_f32_bpe", "qadapt_f32_sharded", "qadapt_f16", "bunny_bf16_sharded"];

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// The `qadapt-run` binary.
pub fn run() -> Command {
    assert!(
        std::env::var_os("ORT_DYLIB_PATH").is_some(),
        "set ORT_DYLIB_PATH to libonnxruntime.so.1.31.1 (see .ci/run)"
    );
    Command::new(env!("CARGO_BIN_EXE_qadapt-run"))
}

/// Exports a fixture's checkpoint (f32) into `out`.
pub fn export(case: &str, out: &Path) {
    export_variant(case, out, false);
}

/// Exports a fixture's checkpoint (f32, standard or `--fused` graphs) into `out`.
pub fn export_variant(case: &str, out: &Path, fused: bool) {
    let opts = exporter::ExportOptions {
        model: fixtures().join(case).join("model"),
        stage1: None,
        stage2: None,
        out: out.to_path_buf(),
        ft: exporter::FloatType::F32,
        external_data: false,
        verify: false,
        ort_lib: None,
        tolerance: 1e-4,
        quant: None,
        fused,
    };
    exporter::export(&opts, |_, _, _| {}).unwrap();
}

/// A fixture exported (f32) into a fresh temporary directory: the directory's guard and the export.
pub fn exported(case: &str) -> (tempfile::TempDir, PathBuf) {
    exported_variant(case, false)
}

/// [`exported`], standard or `--fused` graphs.
pub fn exported_variant(case: &str, fused: bool) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join(case);
    export_variant(case, &dir, fused);
    (tmp, dir)
}

/// Stdout as JSON, after checking the exit status.
pub fn ok(o: Output, what: &str) -> serde_json::Value {
    assert!(o.status.success(), "{what}: {}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{what}: {e}: {}", String::from_utf8_lossy(&o.stdout)))
}

/// A fixture's expected.json.
pub fn expected(case: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join(case).join("expected.json")).unwrap()).unwrap()
}

/// `n` distinct images (the fixture images, mirrored and brightened) written as PNGs into `dir`.
pub fn images(dir: &Path, n: usize) -> Vec<PathBuf> {
    std::fs::create_dir_all(dir).unwrap();
    let base: Vec<image::RgbImage> =
        CASES.iter().map(|c| image::open(fixtures().join(c).join("image.png")).unwrap().to_rgb8()).collect();
    (0..n)
        .map(|i| {
            let mut img = base[i % base.len()].clone();
            if (i / base.len()) % 2 == 1 {
                img = image::imageops::flip_horizontal(&img);
            }
            let lift = (i / (2 * base.len())) as u8 * 40;
            img.pixels_mut().for_each(|p| p.0 = p.0.map(|v| v.saturating_add(lift)));
            let p = dir.join(format!("img{i:02}.png"));
            img.save(&p).unwrap();
            p
        })
        .collect()
}
