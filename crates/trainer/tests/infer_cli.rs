//! `qadapt-train infer` end to end on the HF fixtures, and its errors on broken inputs.

mod common;

use std::path::Path;
use std::process::Output;

use common::{bin, copy_tree, fixtures, s, CASES};

fn infer(args: &[&str]) -> Output {
    bin().arg("infer").args(args).output().expect("run qadapt-train")
}

fn expected(case: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join(case).join("expected.json")).unwrap()).unwrap()
}

#[test]
fn json_reproduces_hf_greedy_ids_and_score() {
    for case in CASES {
        let dir = fixtures().join(case);
        let exp = expected(case);
        let (model, image) = (dir.join("model"), dir.join("image.png"));
        let q = exp["questions"]["ask"].as_str().unwrap();
        let out = infer(&["--model", s(&model), "--image", s(&image), "--ask", q, "--max-new-tokens", "12", "--json"]);
        assert!(out.status.success(), "{case}: {}", String::from_utf8_lossy(&out.stderr));
        let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(got["token_ids"], exp["greedy_ids"], "{case}: greedy ids");
        assert_eq!(got["answer"], exp["answer"], "{case}: answer text");
        assert!(got["score"].is_null() && got["level_probs"].is_null());

        let out = infer(&["--model", s(&model), "--image", s(&image), "--score", "--json"]);
        assert!(out.status.success(), "{case}: {}", String::from_utf8_lossy(&out.stderr));
        let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let (a, b) = (got["score"].as_f64().unwrap(), exp["score"].as_f64().unwrap());
        assert!((a - b).abs() < 1e-4, "{case}: score {a} vs HF {b}");
        let probs = &got["level_probs"];
        for (i, w) in ["excellent", "good", "fair", "poor", "bad"].iter().enumerate() {
            let (p, q) = (probs[w].as_f64().unwrap(), exp["level_probs"][i].as_f64().unwrap());
            assert!((p - q).abs() < 1e-4, "{case}: p({w}) {p} vs {q}");
        }
        println!("{case}: greedy ids identical, score {a:.6} (HF {b:.6})");
    }
}

#[test]
fn same_seed_same_sample() {
    let dir = fixtures().join("bunny_f32_bpe");
    let (model, image) = (dir.join("model"), dir.join("image.png"));
    let run = |seed: &str| {
        let out = infer(&[
            "--model",
            s(&model),
            "--image",
            s(&image),
            "--ask",
            "Is it sharp?",
            "--max-new-tokens",
            "16",
            "--temperature",
            "1.5",
            "--top-p",
            "0.95",
            "--seed",
            seed,
            "--json",
        ]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["token_ids"].clone()
    };
    let (a, b, c) = (run("1"), run("1"), run("2"));
    assert_eq!(a, b);
    assert_ne!(a, c, "different seeds gave the same 16 sampled tokens");
}

/// Runs infer on a broken copy of a fixture and checks: non-zero exit, one line on stderr, and
/// that line names every `needle`.
fn expect_error(
    case: &str,
    image: Option<&Path>,
    ask: &str,
    extra: &[&str],
    needles: &[&str],
    breakit: impl FnOnce(&Path),
) {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    copy_tree(&fixtures().join(case).join("model"), &model).unwrap();
    breakit(&model);
    let default_image = fixtures().join(case).join("image.png");
    let image = image.unwrap_or(&default_image);
    let mut args = vec!["--model", s(&model), "--image", s(image), "--ask", ask];
    args.extend_from_slice(extra);
    let out = infer(&args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{needles:?}: exit 0");
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err}");
    for n in needles {
        assert!(err.contains(n), "error {err:?} does not name {n:?}");
    }
    println!("{}", err.trim_end());
}

#[test]
fn broken_model_dirs_give_one_line_errors() {
    expect_error("qadapt_f32_sharded", None, "q", &[], &["model-00002-of-00003.safetensors", "missing"], |m| {
        std::fs::remove_file(m.join("model-00002-of-00003.safetensors")).unwrap();
    });
    expect_error("bunny_f32_bpe", None, "q", &[], &["model.safetensors", "truncated or corrupt"], |m| {
        let p = m.join("model.safetensors");
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    });
    expect_error("bunny_f32_bpe", None, "q", &[], &["config.json", "invalid JSON"], |m| {
        std::fs::write(m.join("config.json"), "{ \"model_type\": ").unwrap();
    });
    expect_error("bunny_f32_bpe", None, "q", &[], &["model.layers.0.mlp.fc1.weight", "[150, 80]", "[160, 80]"], |m| {
        let p = m.join("config.json");
        let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        cfg["intermediate_size"] = 150.into();
        std::fs::write(&p, cfg.to_string()).unwrap();
    });
    expect_error("bunny_f32_bpe", None, "q", &[], &["model.safetensors", "no model.safetensors"], |m| {
        std::fs::remove_file(m.join("model.safetensors")).unwrap();
    });
    expect_error("qadapt_f32_sharded", None, "q", &[], &["qformer"], |m| {
        std::fs::remove_dir_all(m.join("qformer")).unwrap();
    });
}

#[test]
fn bad_inputs_give_one_line_errors() {
    let nothing = |_: &Path| {};
    expect_error(
        "bunny_f32_bpe",
        Some(Path::new("/nonexistent/img.png")),
        "q",
        &[],
        &["/nonexistent/img.png"],
        nothing,
    );
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("corrupt.jpg");
    std::fs::write(&bad, b"\xff\xd8\xff\xe0 this is not a jpeg").unwrap();
    expect_error("bunny_f32_bpe", Some(&bad), "q", &[], &["corrupt.jpg"], nothing);
    let long = "Is the image blurry? ".repeat(200);
    expect_error("bunny_f32_bpe", None, &long, &[], &["prompt", "512"], nothing);
    expect_error("bunny_f32_bpe", None, "q", &["--device", "tpu"], &["tpu"], nothing);
    expect_error(
        "bunny_f32_bpe",
        None,
        "q",
        &["--adapter", "/nonexistent/adapter"],
        &["/nonexistent/adapter"],
        nothing,
    );
}

/// The committed broken safetensors (`tests/bad-inputs/st-*`) in a model's place: one line naming
/// the file, nothing allocated for a header that claims 2^60 bytes; and the image bombs of the
/// corpus are refused from their headers here too.
#[test]
fn the_bad_input_corpus_gives_one_line_errors() {
    let corpus = fixtures().join("../bad-inputs");
    for f in [
        "st-huge-header-len.safetensors",
        "st-header-not-json.safetensors",
        "st-offsets-past-end.safetensors",
        "st-short.safetensors",
        "st-bad-dtype.safetensors",
    ] {
        let src = corpus.join(f);
        expect_error("bunny_f32_bpe", None, "q", &[], &["model.safetensors"], |m| {
            std::fs::copy(&src, m.join("model.safetensors")).unwrap();
        });
    }
    for (f, needle) in [
        ("png-100000x1.png", "100000×1 pixels"),
        ("jpeg-60000x60000.jpg", "60000×60000 pixels"),
        ("png-20000x20000-1bit.png", "over the limit"),
    ] {
        expect_error("bunny_f32_bpe", Some(&corpus.join(f)), "q", &[], &[f, needle], |_| {});
    }
}
