//! The trainer end to end on a tiny model: synth → init → stage 1 → stage 2 → merge → infer, the
//! trainable / frozen split of each stage, and kill -9 + `--resume` giving the uninterrupted losses.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use common::{bin, ok, s};

/// Data and a random base model in `dir`.
fn setup(dir: &Path) -> (PathBuf, PathBuf) {
    common::synth_and_init(dir, 24)
}

fn stage1_args<'a>(base: &'a Path, data: &'a Path, out: &'a Path) -> Vec<String> {
    [
        "stage1",
        "--model",
        s(base),
        "--data",
        s(&data.join("train.json")),
        "--images",
        s(data),
        "--out",
        s(out),
        "--task",
        "all",
        "--lora-r",
        "4",
        "--lora-alpha",
        "8",
        "--batch-size",
        "4",
        "--lr",
        "2e-3",
        "--connector-lr",
        "2e-3",
        "--seed",
        "3",
    ]
    .iter()
    .map(|x| x.to_string())
    .collect()
}

fn losses(run: &Path) -> Vec<(u64, String)> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["step"].as_u64().unwrap(), v["loss"].to_string())
        })
        .collect()
}

fn load(p: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(p, &Device::Cpu).unwrap()
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

#[test]
fn pipeline_trains_the_right_weights_and_merges_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let (data, base) = setup(tmp.path());
    let run1 = tmp.path().join("run1");
    let mut a = stage1_args(&base, &data, &run1);
    a.extend(["--max-steps", "8"].map(String::from));
    ok(bin().args(&a).output().unwrap(), "stage1");
    for f in [
        "final/adapter_model.safetensors",
        "final/non_lora_trainables.safetensors",
        "metrics.jsonl",
        "loss.png",
        "summary.json",
        "checkpoint-8/optimizer.safetensors",
    ] {
        assert!(run1.join(f).exists(), "stage 1 did not write {f}");
    }
    // The loss plot draws both curves (raw in light blue, its moving average in dark blue) and
    // their legend.
    let png = image::open(run1.join("loss.png")).expect("loss.png is a PNG").to_rgb8();
    assert_eq!(png.dimensions(), (800, 480));
    // Over 8 steps the average covers most of the raw line; each legend swatch is 21 × 3 pixels.
    for (c, what, min) in [([160u8, 190, 230], "raw loss", 70), ([20, 60, 160], "moving average", 500)] {
        let n = png.pixels().filter(|p| p.0 == c).count();
        assert!(n > min, "loss.png: {what} curve has {n} pixels of its colour (want > {min})");
    }
    // LoRA B starts at zero: non-zero B after training proves the adapter (vision included) trained.
    let lora = load(&run1.join("final/adapter_model.safetensors"));
    let vision_b = lora
        .iter()
        .filter(|(k, _)| k.contains("vision_tower") && k.ends_with("lora_B.weight"))
        .map(|(_, t)| max_abs(t))
        .fold(0f32, f32::max);
    let llm_b = lora
        .iter()
        .filter(|(k, _)| k.contains("model.layers.") && k.ends_with("lora_B.weight"))
        .map(|(_, t)| max_abs(t))
        .fold(0f32, f32::max);
    assert!(vision_b > 0.0 && llm_b > 0.0, "LoRA B stayed zero: vision {vision_b}, llm {llm_b}");
    let full1 = load(&run1.join("final/non_lora_trainables.safetensors"));
    assert!(
        full1.keys().all(|k| k.starts_with("model.mm_projector.")),
        "stage 1 trained more than the connector: {:?}",
        full1.keys()
    );

    let run2 = tmp.path().join("run2");
    ok(
        bin()
            .args([
                "stage2",
                "--model",
                s(&base),
                "--stage1",
                s(&run1),
                "--data",
                s(&data.join("train.json")),
                "--images",
                s(&data),
                "--out",
                s(&run2),
            ])
            .args(["--max-steps", "4", "--batch-size", "4", "--lr", "2e-3"])
            .output()
            .unwrap(),
        "stage2",
    );
    let full2 = load(&run2.join("final/non_lora_trainables.safetensors"));
    assert!(!run2.join("final/adapter_model.safetensors").exists(), "stage 2 must not train LoRA");
    for k in full2.keys() {
        let ok_key = k.starts_with("model.mm_projector.")
            || (k.starts_with("model.vlm_")
                && (!k.starts_with("model.vlm_att_encoder.") || k.contains(".crossattention.")));
        assert!(ok_key, "stage 2 trained a frozen weight: {k}");
    }
    assert!(
        full2.keys().any(|k| k.contains(".crossattention."))
            && full2.keys().any(|k| k.starts_with("model.vlm_cross_attn."))
    );

    // Merged directory == base with the adapters applied on load.
    let merged = tmp.path().join("merged");
    ok(
        bin()
            .args(["merge", "--model", s(&base), "--stage1", s(&run1), "--stage2", s(&run2), "--out", s(&merged)])
            .output()
            .unwrap(),
        "merge",
    );
    let img = data.join("images/img_00000.png");
    let score = |model: &Path| -> serde_json::Value {
        let out = ok(
            bin().args(["infer", "--model", s(model), "--image", s(&img), "--score", "--json"]).output().unwrap(),
            "infer",
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    // The stage-1-only view (base + final adapter) must equal merging stage 1 alone.
    let merged1 = tmp.path().join("merged1");
    ok(
        bin().args(["merge", "--model", s(&base), "--stage1", s(&run1), "--out", s(&merged1)]).output().unwrap(),
        "merge stage 1",
    );
    let unmerged = ok(
        bin()
            .args([
                "infer",
                "--model",
                s(&base),
                "--adapter",
                s(&run1.join("final")),
                "--image",
                s(&img),
                "--score",
                "--json",
            ])
            .output()
            .unwrap(),
        "infer with adapter",
    );
    let unmerged: serde_json::Value = serde_json::from_slice(&unmerged.stdout).unwrap();
    let m1 = score(&merged1);
    let (a, b) = (m1["score"].as_f64().unwrap(), unmerged["score"].as_f64().unwrap());
    assert!((a - b).abs() < 1e-5, "merged {a} vs unmerged {b}");
    // Two stages merged == stage 1 merged, with stage 2's trainables (prompt module, connector)
    // swapped in on load; and stage 2 changed the score.
    let staged = ok(
        bin()
            .args([
                "infer",
                "--model",
                s(&merged1),
                "--adapter",
                s(&run2.join("final")),
                "--image",
                s(&img),
                "--score",
                "--json",
            ])
            .output()
            .unwrap(),
        "infer stage-1 merge with the stage-2 trainables",
    );
    let staged: serde_json::Value = serde_json::from_slice(&staged.stdout).unwrap();
    let m2 = score(&merged)["score"].as_f64().unwrap();
    let s2 = staged["score"].as_f64().unwrap();
    assert!((m2 - s2).abs() < 1e-5, "merged two stages {m2} vs stage-1 merge + stage-2 trainables {s2}");
    assert!((m2 - a).abs() > 1e-6, "stage 2 left the score at stage 1's {a}");
}

#[test]
fn kill_and_resume_reproduces_the_losses() {
    let tmp = tempfile::tempdir().unwrap();
    let (data, base) = setup(tmp.path());
    let steps = ["--max-steps", "30", "--epochs", "5", "--save-every", "2"].map(String::from);

    let straight = tmp.path().join("straight");
    let mut a = stage1_args(&base, &data, &straight);
    a.extend(steps.clone());
    ok(bin().args(&a).output().unwrap(), "uninterrupted run");

    let killed = tmp.path().join("killed");
    let mut a = stage1_args(&base, &data, &killed);
    a.extend(steps);
    let mut child = bin().args(&a).stderr(std::process::Stdio::null()).spawn().unwrap();
    let t0 = Instant::now();
    while !killed.join("checkpoint-2").exists() {
        assert!(t0.elapsed() < Duration::from_secs(120), "no checkpoint appeared");
        std::thread::sleep(Duration::from_millis(1));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(!killed.join("final").exists(), "the run finished before it could be killed; make it longer");
    ok(bin().args(["stage1", "--resume", s(&killed)]).output().unwrap(), "resume");
    let stale: Vec<_> = std::fs::read_dir(&killed)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
        .collect();
    assert!(stale.is_empty(), "temporary checkpoint directories left behind: {stale:?}");
    let (x, y) = (losses(&straight), losses(&killed));
    assert_eq!(x.len(), 30);
    assert_eq!(x, y, "losses after kill -9 + resume differ from the uninterrupted run");
}

#[test]
fn bad_training_inputs_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let (data, base) = setup(tmp.path());
    let bad = tmp.path().join("bad.json");
    std::fs::write(&bad, "[{\"image\": \"x.png\", \"conversations\": [{\"from\": \"gpt\", \"value\": \"hi\"}]}")
        .unwrap();
    let out = bin()
        .args([
            "stage1",
            "--model",
            s(&base),
            "--data",
            s(&bad),
            "--images",
            s(&data),
            "--out",
            s(&tmp.path().join("r")),
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("bad.json"), "{err}");
    let out = bin().args(["stage1", "--resume", s(&tmp.path().join("nothing"))]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("nothing"), "{err}");
}

#[test]
fn qformer_init_loads_lavis_and_hf_names() {
    let tmp = tempfile::tempdir().unwrap();
    let (data, base) = setup(tmp.path());
    let run1 = tmp.path().join("run1");
    let mut a = stage1_args(&base, &data, &run1);
    a.extend(["--max-steps", "1"].map(String::from));
    ok(bin().args(&a).output().unwrap(), "stage1");
    // Tiny config: Q-Former hidden 32, att_feat 32, 4 queries.
    let q = Tensor::randn(0f32, 1.0, (32, 32), &Device::Cpu).unwrap();
    let tokens = Tensor::randn(0f32, 1.0, (1, 4, 32), &Device::Cpu).unwrap();
    for (name, qkey) in [
        ("lavis", "Qformer.bert.encoder.layer.0.crossattention.self.query.weight"),
        ("hf", "qformer.encoder.layer.0.crossattention.attention.query.weight"),
    ] {
        let init = tmp.path().join(format!("{name}.safetensors"));
        let t: HashMap<String, Tensor> =
            [(qkey.to_string(), q.clone()), ("query_tokens".to_string(), tokens.clone())].into();
        candle_core::safetensors::save(&t, &init).unwrap();
        let run2 = tmp.path().join(format!("run2-{name}"));
        ok(
            bin()
                .args([
                    "stage2",
                    "--model",
                    s(&base),
                    "--stage1",
                    s(&run1),
                    "--data",
                    s(&data.join("train.json")),
                    "--images",
                    s(&data),
                    "--out",
                    s(&run2),
                ])
                .args([
                    "--max-steps",
                    "1",
                    "--batch-size",
                    "2",
                    "--lr",
                    "1e-12",
                    "--connector-lr",
                    "1e-12",
                    "--qformer-init",
                    s(&init),
                ])
                .output()
                .unwrap(),
            "stage2 --qformer-init",
        );
        let got = load(&run2.join("final/non_lora_trainables.safetensors"));
        let d1 = max_abs(
            &(&got["model.vlm_att_encoder.bert.encoder.layer.0.crossattention.self.query.weight"] - &q).unwrap(),
        );
        let d2 = max_abs(&(&got["model.vlm_att_query"] - &tokens).unwrap());
        assert!(d1 < 1e-6 && d2 < 1e-6, "{name}: --qformer-init not applied ({d1}, {d2})");
    }
}

/// `--gradient-checkpointing` recomputes each SigLIP and phi layer in the backward pass from its
/// saved inputs, with the dropout masks of the forward pass (LoRA dropout 0.05 here): the losses,
/// gradient norms and trained weights of stage 1 equal the plain run's bit for bit.
#[test]
fn gradient_checkpointing_changes_no_bit() {
    let tmp = tempfile::tempdir().unwrap();
    let (data, base) = setup(tmp.path());
    let run = |name: &str, extra: &[&str]| -> PathBuf {
        let out = tmp.path().join(name);
        let mut a = stage1_args(&base, &data, &out);
        a.extend(["--max-steps", "4", "--lora-dropout", "0.05"].iter().chain(extra).map(|x| x.to_string()));
        ok(bin().args(&a).output().unwrap(), name);
        out
    };
    let plain = run("plain", &[]);
    let ckpt = run("checkpointed", &["--gradient-checkpointing"]);
    let metrics = |r: &Path| -> Vec<(String, String)> {
        std::fs::read_to_string(r.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                (v["loss"].to_string(), v["grad_norm"].to_string())
            })
            .collect()
    };
    let (a, b) = (metrics(&plain), metrics(&ckpt));
    assert_eq!(a.len(), 4);
    // The trainer logs its own peak memory, per step and in the summary.
    for r in [&plain, &ckpt] {
        let summary: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(r.join("summary.json")).unwrap()).unwrap();
        let peak = summary["peak_rss_mb"].as_f64().unwrap_or(0.0);
        assert!(peak > 1.0, "{}: peak_rss_mb {peak}", r.display());
        let last = std::fs::read_to_string(r.join("metrics.jsonl")).unwrap();
        let last: serde_json::Value = serde_json::from_str(last.lines().last().unwrap()).unwrap();
        assert!(last["peak_rss_mb"].as_f64().is_some_and(|m| m > 1.0 && m <= peak), "{last}");
    }
    assert_eq!(a, b, "losses / gradient norms differ with gradient checkpointing");
    // Identical gradients give identical updates: every trained tensor equal bit for bit.
    for f in ["final/adapter_model.safetensors", "final/non_lora_trainables.safetensors"] {
        let (x, y) = (load(&plain.join(f)), load(&ckpt.join(f)));
        assert!(!x.is_empty(), "{f} holds nothing");
        assert_eq!(x.len(), y.len(), "{f}");
        for (k, t) in &x {
            let d = max_abs(&(t - &y[k]).unwrap());
            assert_eq!(d, 0.0, "{f} {k} differs by {d}");
        }
    }
}

/// `plan` against the peak RSS a run measures: tiny shapes, batch 32, LoRA r32, plain and with
/// gradient checkpointing; the plan is asked about the run's longest step. Within 15 % (at bench-small
/// shapes `bench/plan_check.sh` measures 0.88–0.95).
#[test]
fn plan_is_within_15_percent_of_the_measured_peak() {
    let tmp = tempfile::tempdir().unwrap();
    let (data, base) = common::synth_and_init(tmp.path(), 64);
    for ck in [false, true] {
        let out = tmp.path().join(if ck { "ck" } else { "plain" });
        let mut a: Vec<String> = [
            "stage1",
            "--model",
            s(&base),
            "--data",
            s(&data.join("train.json")),
            "--images",
            s(&data),
            "--out",
            s(&out),
            "--task",
            "all",
            "--lora-r",
            "32",
            "--lora-alpha",
            "64",
            "--batch-size",
            "32",
            "--max-steps",
            "2",
            "--max-length",
            "256",
        ]
        .iter()
        .map(|x| x.to_string())
        .collect();
        if ck {
            a.push("--gradient-checkpointing".into());
        }
        ok(bin().args(&a).output().unwrap(), "stage1");
        let steps: Vec<serde_json::Value> = std::fs::read_to_string(out.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let longest =
            steps.iter().max_by_key(|m| (m["seq_len"].as_u64().unwrap(), m["loss_rows"].as_u64().unwrap())).unwrap();
        let measured = steps.iter().map(|m| m["peak_rss_mb"].as_f64().unwrap()).fold(0.0, f64::max) * 1048576.0;
        let (len, rows) = (longest["seq_len"].as_u64().unwrap(), longest["loss_rows"].as_u64().unwrap());
        let mut p = vec![
            "plan".to_string(),
            "--config".into(),
            s(&base).into(),
            "--stage".into(),
            "1".into(),
            "--batch-size".into(),
            "32".into(),
            "--max-length".into(),
            len.to_string(),
            "--answer-tokens".into(),
            rows.div_ceil(32).to_string(),
            "--lora-r".into(),
            "32".into(),
            "--json".into(),
        ];
        if ck {
            p.push("--gradient-checkpointing".into());
        }
        let o = ok(bin().args(&p).output().unwrap(), "plan");
        let plan: serde_json::Value = serde_json::from_slice(o.stdout.split(|&b| b == b'\n').next().unwrap()).unwrap();
        let planned = plan["peak"].as_f64().unwrap();
        let ratio = planned / measured;
        println!("checkpointing {ck}: plan {planned:.0} B, measured {measured:.0} B, ratio {ratio:.3}");
        assert!((0.85..=1.15).contains(&ratio), "checkpointing {ck}: plan / measured peak = {ratio:.3}");
        assert!(plan["activations_kept"].as_f64().unwrap() > 0.0);
        // The plan counts the parameters the trainer trains.
        let summary: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
        assert_eq!(plan["trainable_params"], summary["trainable_params"]);
    }
}
