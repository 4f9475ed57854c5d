//! The committed bad-input corpus (`tests/bad-inputs`) through the `qadapt-run` binary under a
//! 3 GiB address-space cap (`ulimit -v`): every image bomb, damaged file and damaged `qadapt.json`
//! is one clear line on stderr and exit 1 — never a panic, an abort or an allocation failure.

mod common;

use std::path::Path;
use std::process::Output;

use common::{exported, fixtures};

/// `qadapt-run ARGS` with its address space capped at 3 GiB.
fn run_capped(args: &[&str]) -> Output {
    let bin = env!("CARGO_BIN_EXE_qadapt-run");
    assert!(std::env::var_os("ORT_DYLIB_PATH").is_some(), "set ORT_DYLIB_PATH (see .ci/run)");
    std::process::Command::new("sh")
        .arg("-c")
        .arg("ulimit -v 3145728 && exec \"$0\" \"$@\"")
        .arg(bin)
        .args(args)
        .output()
        .unwrap()
}

/// Exit 1 with one `error:` line naming `needle`, nothing that smells of a crash.
fn clear_error(o: &Output, what: &str, needle: &str) -> String {
    let err = String::from_utf8_lossy(&o.stderr).trim().to_string();
    assert_eq!(o.status.code(), Some(1), "{what}: exit {:?}: {err}", o.status);
    for bad in ["panicked", "memory allocation", "RUST_BACKTRACE", "Aborted"] {
        assert!(!err.contains(bad), "{what}: {err}");
    }
    let last = err.lines().last().unwrap_or_default().to_string();
    assert!(last.starts_with("error: ") && last.contains(needle), "{what}: {err}");
    last
}

#[test]
fn image_bombs_and_damaged_images_are_clear_errors_under_a_memory_cap() {
    let (_tmp, dir) = exported("bunny_f32_bpe");
    let bad = fixtures().join("../bad-inputs");
    let model = dir.to_str().unwrap();
    let cases = [
        ("png-100000x1.png", "100000×1 pixels is a side over the limit"),
        ("jpeg-60000x60000.jpg", "60000×60000 pixels"),
        ("png-20000x20000-1bit.png", "20000×20000 pixels"),
        ("png-20000x100.png", "20000×100 pixels"),
        ("webp-16383x16383.webp", "16383×16383 pixels is over the limit"),
        ("jpeg-truncated.jpg", "jpeg-truncated.jpg"),
        ("png-truncated.png", "png-truncated.png"),
        ("webp-truncated.webp", "webp-truncated.webp"),
        ("png-bad-crc.png", "png-bad-crc.png"),
        ("empty.jpg", "not a JPEG, PNG or WebP"),
        ("text.png", "not a JPEG, PNG or WebP"),
        ("gif-1x1.gif", "gif-1x1.gif"),
        ("missing.png", "missing.png"),
    ];
    for (f, needle) in cases {
        let path = bad.join(f);
        let t0 = std::time::Instant::now();
        let o = run_capped(&["--model", model, "--image", path.to_str().unwrap(), "--score"]);
        let line = clear_error(&o, f, needle);
        println!("{f:<26} {:>5} ms  {line}", t0.elapsed().as_millis());
    }
    // The limits are the user's to set.
    let o = run_capped(&[
        "--model",
        model,
        "--image",
        bad.join("ok-64x48.jpg").to_str().unwrap(),
        "--score",
        "--max-image-pixels",
        "1000",
    ]);
    clear_error(&o, "--max-image-pixels 1000", "64×48 pixels is over the limit of 1000 pixels");
    // Accepted within the cap: a valid JPEG, a CMYK JPEG, and 2^26 pixels (the largest the defaults take).
    for f in ["ok-64x48.jpg", "jpeg-cmyk.jpg", "png-8192x8192-1bit.png"] {
        let t0 = std::time::Instant::now();
        let o = run_capped(&["--model", model, "--image", bad.join(f).to_str().unwrap(), "--score"]);
        assert!(o.status.success(), "{f}: {}", String::from_utf8_lossy(&o.stderr));
        println!("{f:<26} {:>5} ms  {}", t0.elapsed().as_millis(), String::from_utf8_lossy(&o.stdout).trim());
    }
}

#[test]
fn damaged_manifests_are_refused_naming_the_field() {
    let (tmp, dir) = exported("bunny_f32_bpe");
    let good: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("qadapt.json")).unwrap()).unwrap();
    let img = fixtures().join("bunny_f32_bpe/image.png");
    type Edit = Box<dyn Fn(&mut serde_json::Value)>;
    let cases: Vec<(&str, Edit, &str)> = vec![
        ("size 0", Box::new(|m| m["image"]["size"] = 0.into()), "image.size: 0"),
        ("newer format", Box::new(|m| m["format"] = 9.into()), "format: 9 is newer"),
        ("no format", Box::new(|m| drop(m.as_object_mut().unwrap().remove("format"))), "format: missing"),
        ("wrong type", Box::new(|m| m["decoder"]["layers"] = "two".into()), "decoder.layers: invalid type"),
        ("no decoder", Box::new(|m| drop(m.as_object_mut().unwrap().remove("decoder"))), "missing field `decoder`"),
        ("eos out of vocab", Box::new(|m| m["tokens"]["eos"] = 10_000_000.into()), "tokens.eos"),
        ("path out of the export", Box::new(|m| m["graphs"]["decoder"] = "../decoder.onnx".into()), "graphs.decoder"),
        ("image tokens too many", Box::new(|m| m["image"]["tokens"] = 1_000_000.into()), "image.tokens"),
        ("unknown variant", Box::new(|m| m["variant"] = "turbo".into()), "variant: \"turbo\""),
        ("variant of a wrong type", Box::new(|m| m["variant"] = 3.into()), "variant: invalid type"),
        ("variant mislabelled", Box::new(|m| m["variant"] = "fused".into()), "this decoder is the standard graph"),
        ("cache head below head", Box::new(|m| m["decoder"]["cache_head_dim"] = 1.into()), "decoder.cache_head_dim"),
    ];
    for (what, patch, needle) in cases {
        let d = tmp.path().join(what.replace(' ', "-"));
        copy_dir(&dir, &d);
        let mut m = good.clone();
        patch(&mut m);
        std::fs::write(d.join("qadapt.json"), m.to_string()).unwrap();
        let o = run_capped(&["--model", d.to_str().unwrap(), "--image", img.to_str().unwrap(), "--score"]);
        let line = clear_error(&o, what, needle);
        assert!(line.contains("qadapt.json"), "{what}: {line}");
        println!("{what:<24} {line}");
    }
    // Not JSON at all, and not UTF-8.
    for (what, bytes) in
        [("truncated", b"{\"format\": 1, \"dtype\"".to_vec()), ("binary", vec![0xff, 0xfe, 0x00, 0x7b])]
    {
        let d = tmp.path().join(what);
        copy_dir(&dir, &d);
        std::fs::write(d.join("qadapt.json"), bytes).unwrap();
        let o = run_capped(&["--model", d.to_str().unwrap(), "--image", img.to_str().unwrap(), "--score"]);
        println!("{what:<24} {}", clear_error(&o, what, "qadapt.json"));
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// `--cuda-graph` where no CUDA graph can run: on the CPU or TensorRT provider, and on a standard
/// export (whose cache grows every step, so no step has fixed shapes) — one clear line, exit 1,
/// before any session opens.
#[test]
fn cuda_graphs_are_refused_where_they_cannot_run() {
    let (_t1, standard) = exported("bunny_f32_bpe");
    let (_t2, fused) = common::exported_variant("bunny_f32_bpe", true);
    let img = fixtures().join("bunny_f32_bpe/image.png");
    let img = img.to_str().unwrap();
    let cases = [
        ("on the CPU", fused.as_path(), "cpu", "--cuda-graph needs the CUDA provider (--ep cuda)"),
        ("on TensorRT", fused.as_path(), "tensorrt", "--cuda-graph needs the CUDA provider (--ep cuda)"),
        ("a standard export", standard.as_path(), "cuda", "--cuda-graph needs a --fused export"),
    ];
    for (what, dir, ep, needle) in cases {
        let o = run_capped(&["--model", dir.to_str().unwrap(), "--image", img, "--score", "--ep", ep, "--cuda-graph"]);
        let line = clear_error(&o, what, needle);
        if ep == "cuda" {
            assert!(line.contains("qadapt.json"), "{what}: {line}");
        }
        println!("{what:<18} {line}");
    }
}
