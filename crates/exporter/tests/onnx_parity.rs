//! Exports of every HF parity fixture, run through ONNX Runtime (CPU) by the runtime's greedy loop,
//! reproduce the HF image features, logits, greedy ids and Q-Align score; the f16 export stays within
//! its stated tolerance; broken inputs fail clearly and leave no export directory behind.
//!
//! Needs `ORT_DYLIB_PATH` (`.ci/run` fetches libonnxruntime from the PyPI wheel); without it the
//! tests fail saying so rather than skipping.

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{Device, IndexOp, Tensor};
use qadapt_core::sampling::quality_score;
use qadapt_core::template::SCORE_QUESTION;
use qadapt_core::QFormerTokenizer;
use runtime_ort::{Ep, Runtime};

const CASES: [&str; 4] = ["bunny_f32_bpe", "qadapt_f32_sharded", "qadapt_f16", "bunny_bf16_sharded"];

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn export_bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_qadapt-export"))
}

fn export(case: &str, out: &Path, extra: &[&str]) {
    let model = fixtures().join(case).join("model");
    let o = export_bin()
        .args(["--model", model.to_str().unwrap(), "--out", out.to_str().unwrap()])
        .args(extra)
        .output()
        .unwrap();
    assert!(o.status.success(), "export of {case} failed: {}", String::from_utf8_lossy(&o.stderr));
    println!("{}", String::from_utf8_lossy(&o.stdout).trim_end());
}

/// The export opened by the runtime (CPU provider); the tests feed it HF's own pixel values and
/// prompt ids through its lower-level entry points.
fn open(dir: &Path) -> Runtime {
    assert!(
        std::env::var_os("ORT_DYLIB_PATH").is_some(),
        "set ORT_DYLIB_PATH to libonnxruntime.so.1.31.1 (see .ci/run)"
    );
    Runtime::open(dir, Ep::Cpu, 0, false, None).unwrap()
}

fn pixels(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_dtype(candle_core::DType::F32).unwrap().to_vec1().unwrap()
}

fn rel(a: &[f32], b: &Tensor) -> f32 {
    let b: Vec<f32> = b.flatten_all().unwrap().to_dtype(candle_core::DType::F32).unwrap().to_vec1().unwrap();
    exporter::verify::rel_err(a, &b)
}

fn argmax(v: &[f32]) -> u32 {
    v.iter().enumerate().fold((0, f32::MIN), |(bi, bv), (i, &x)| if x > bv { (i, x) } else { (bi, bv) }).0 as u32
}

/// Runs one case through ORT; returns (max rel err of features and logits, |Δscore|).
fn run_case(case: &str, dir: &Path) -> (f32, f32) {
    let fx = fixtures().join(case);
    let exp_json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fx.join("expected.json")).unwrap()).unwrap();
    let exp = candle_core::safetensors::load(fx.join("expected.safetensors"), &Device::Cpu).unwrap();
    let ids = |k: &str| exp[k].flatten_all().unwrap().to_vec1::<i64>().unwrap();
    let mut m = open(dir);
    let qtok = QFormerTokenizer::from_dir(dir, 256).ok().filter(|_| dir.join("qformer").is_dir());
    let mut worst = 0f32;
    let mut score_err = 0f32;
    for p in ["ask", "score"] {
        let question = if p == "ask" { exp_json["questions"]["ask"].as_str().unwrap() } else { SCORE_QUESTION };
        let q = qtok.as_ref().map(|t| {
            t.encode(&qadapt_core::template::qformer_text(question))
                .unwrap()
                .into_iter()
                .map(i64::from)
                .collect::<Vec<_>>()
        });
        if let Some(q) = &q {
            assert_eq!(q, &ids(&format!("{p}.qformer_input_ids")), "{case} {p}: Q-Former ids");
        }
        let rows = q.map(|q| vec![q]);
        let feats = m.features_from_pixels(pixels(&exp["pixel_values"]), rows.as_deref()).unwrap();
        let e_feat = rel(&feats, &exp[&format!("{p}.image_features")]);
        let (logits, mut past) = m.prefill_ids(&ids(&format!("{p}.input_ids")), &feats).unwrap();
        let e_logits = rel(&logits, &exp[&format!("{p}.logits")]);
        println!("{case:<22} {p:<6} image_features {e_feat:.1e}  logits {e_logits:.1e}");
        worst = worst.max(e_feat).max(e_logits);
        if p == "score" {
            let lv = m.manifest.tokens.levels.map(|i| logits[i as usize]);
            let (score, _) = quality_score(lv);
            score_err = (score - exp_json["score"].as_f64().unwrap() as f32).abs();
        } else {
            // Greedy from the prefill, one token per step through the cache.
            let max_new = exp_json["max_new_tokens"].as_u64().unwrap() as usize;
            let mut got = Vec::new();
            let mut logits = logits;
            for _ in 0..max_new {
                let next = argmax(&logits);
                if next == m.manifest.tokens.eos {
                    break;
                }
                got.push(next as i64);
                (logits, past) = m.next_logits(&[next], &past).unwrap();
            }
            assert_eq!(got, ids("ask.greedy_ids"), "{case}: greedy ids through ONNX Runtime");
        }
    }
    (worst, score_err)
}

#[test]
fn exports_of_every_fixture_match_hf_through_onnx_runtime() {
    let tmp = tempfile::tempdir().unwrap();
    println!("{:<22} {:<6} max rel err vs HF (tol 1e-4)", "case", "prompt");
    for case in CASES {
        let dir = tmp.path().join(case);
        export(case, &dir, &[]);
        let (worst, dscore) = run_case(case, &dir);
        println!("{case:<22} greedy ids equal, |Δscore| {dscore:.1e}");
        assert!(worst < 1e-4, "{case}: max rel err {worst} vs HF");
        assert!(dscore < 1e-4, "{case}: score differs from HF by {dscore}");
    }
}

#[test]
fn f16_and_external_data_exports_stay_within_tolerance() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("f16");
    export("qadapt_f32_sharded", &dir, &["--dtype", "f16", "--external-data"]);
    assert!(dir.join("decoder.onnx.data").is_file(), "external data file");
    let fx = fixtures().join("qadapt_f32_sharded");
    let exp = candle_core::safetensors::load(fx.join("expected.safetensors"), &Device::Cpu).unwrap();
    let mut m = open(&dir);
    assert_eq!(m.manifest.dtype, "f16");
    let qtok = QFormerTokenizer::from_dir(&dir, 256).unwrap();
    let q: Vec<i64> =
        qtok.encode(&qadapt_core::template::qformer_text(SCORE_QUESTION)).unwrap().into_iter().map(i64::from).collect();
    let feats = m.features_from_pixels(pixels(&exp["pixel_values"]), Some(std::slice::from_ref(&q))).unwrap();
    let e_feat = rel(&feats, &exp["score.image_features"]);
    let ids = exp["score.input_ids"].flatten_all().unwrap().to_vec1::<i64>().unwrap();
    let (logits, _) = m.prefill_ids(&ids, &feats).unwrap();
    let e_logits = rel(&logits, &exp["score.logits"]);
    println!("f16 export vs HF f32: image_features {e_feat:.1e}, logits {e_logits:.1e} (tolerance 2e-2)");
    assert!(e_feat < 2e-2 && e_logits < 2e-2);
    // Greedy decoding through the f16 cache (kept as ONNX Runtime f16 values between steps) gives
    // HF's f32 ids: the fixture's smallest greedy margin (0.53) is far above f16's error.
    let exp_json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fx.join("expected.json")).unwrap()).unwrap();
    let ask = exp_json["questions"]["ask"].as_str().unwrap();
    let q: Vec<i64> =
        qtok.encode(&qadapt_core::template::qformer_text(ask)).unwrap().into_iter().map(i64::from).collect();
    let feats = m.features_from_pixels(pixels(&exp["pixel_values"]), Some(&[q])).unwrap();
    let ids = exp["ask.input_ids"].flatten_all().unwrap().to_vec1::<i64>().unwrap();
    let (mut logits, mut cache) = m.prefill_ids(&ids, &feats).unwrap();
    let mut got = Vec::new();
    for _ in 0..exp_json["max_new_tokens"].as_u64().unwrap() {
        let next = argmax(&logits);
        if next == m.manifest.tokens.eos {
            break;
        }
        got.push(i64::from(next));
        (logits, cache) = m.next_logits(&[next], &cache).unwrap();
    }
    assert_eq!(got, exp["ask.greedy_ids"].flatten_all().unwrap().to_vec1::<i64>().unwrap(), "f16 greedy ids");
    println!("f16 export: greedy ids through the f16 cache equal HF's ({} tokens)", got.len());

    // Continuous batching on f16 caches: a request admitted after the first has decoded 3 tokens
    // (caches joined, the shorter left-padded) and both answers equal lone runs.
    let img = qadapt_core::image::load_image(&fx.join("image.png")).unwrap();
    let opts = runtime_ort::GenerateOptions { max_new_tokens: 12, ..Default::default() };
    let qs = [ask, "Is it sharp?"];
    let lone: Vec<Vec<u32>> = qs.iter().map(|q| m.generate(&img, q, &opts, |_| {}).unwrap().token_ids).collect();
    let req = |q| runtime_ort::Request { image: &img, question: q, history: &[], opts, cancel: None };
    let mut run = runtime_ort::Running::default();
    run.admit(&mut m, vec![(0usize, req(qs[0]))]).unwrap();
    let mut answers: Vec<Option<Vec<u32>>> = vec![None, None];
    for step in 0.. {
        if step == 3 {
            run.admit(&mut m, vec![(1usize, req(qs[1]))]).unwrap();
        }
        for (r, a) in run.step(&mut m, |_, _| {}, |_| false).unwrap() {
            answers[r] = Some(a.token_ids);
        }
        if run.is_empty() && step >= 3 {
            break;
        }
    }
    assert_eq!(answers[0].as_ref(), Some(&lone[0]), "the running row changed when another joined");
    assert_eq!(answers[1].as_ref(), Some(&lone[1]), "the joined row differs from a lone run");
    println!(
        "f16 export: a request joining a running batch answers as alone ({} and {} tokens)",
        lone[0].len(),
        lone[1].len()
    );
}

#[test]
fn bad_inputs_fail_clearly_and_leave_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("never");
    let run = |args: &[&str]| {
        let o = export_bin().args(args).output().unwrap();
        assert!(!o.status.success(), "{args:?} succeeded");
        String::from_utf8_lossy(&o.stderr).to_string()
    };
    let o = out.to_str().unwrap();
    let err = run(&["--model", "/nonexistent/model", "--out", o]);
    assert!(err.contains("/nonexistent/model") && err.contains("not found"), "{err}");
    let err = run(&["--model", fixtures().join("bunny_f32_bpe/model").to_str().unwrap(), "--out", o, "--opset", "13"]);
    assert!(err.contains("--opset 13"), "{err}");
    let err = run(&[
        "--model",
        fixtures().join("bunny_f32_bpe/model").to_str().unwrap(),
        "--out",
        o,
        "--ort-lib",
        "/nonexistent/libonnxruntime.so",
    ]);
    assert!(err.contains("/nonexistent/libonnxruntime.so"), "{err}");
    // A tolerance no graph can meet: verification fails and the directory never appears.
    let err =
        run(&["--model", fixtures().join("bunny_f32_bpe/model").to_str().unwrap(), "--out", o, "--tolerance", "0"]);
    assert!(err.contains("verification failed") && err.contains("decoder.onnx"), "{err}");
    assert!(!out.exists(), "a failed export left {}", out.display());
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().collect();
    assert!(leftovers.is_empty(), "temporary directories left: {leftovers:?}");
}

/// `--stage1` (a LoRA on q_proj / v_proj of phi and SigLIP) and `--stage2` (a replaced connector
/// weight) are merged before tracing: the export's logits through ONNX Runtime equal those of candle
/// running the LoRA unmerged, and differ from the base export's.
#[test]
fn stage_runs_are_merged_into_the_export() {
    use std::collections::HashMap;
    let case = "bunny_f32_bpe";
    let tmp = tempfile::tempdir().unwrap();
    let (run1, run2) = (tmp.path().join("run1/final"), tmp.path().join("run2/final"));
    std::fs::create_dir_all(&run1).unwrap();
    std::fs::create_dir_all(&run2).unwrap();
    std::fs::write(
        run1.join("adapter_config.json"),
        r#"{"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"]}"#,
    )
    .unwrap();
    let dev = Device::Cpu;
    let mut lora = HashMap::new();
    let q = "model.layers.0.self_attn.q_proj";
    let vq = "model.vision_tower.vision_tower.vision_model.encoder.layers.1.self_attn.v_proj";
    let model_dir = fixtures().join(case).join("model");
    let cfg = qadapt_core::BunnyConfig::from_file(&model_dir.join("config.json")).unwrap();
    for (key, d) in [(q, cfg.hidden_size), (vq, cfg.vision_config.hidden_size)] {
        lora.insert(format!("base_model.model.{key}.lora_A.weight"), Tensor::randn(0f32, 1.0, (2, d), &dev).unwrap());
        lora.insert(format!("base_model.model.{key}.lora_B.weight"), Tensor::randn(0f32, 0.5, (d, 2), &dev).unwrap());
    }
    candle_core::safetensors::save(&lora, run1.join("adapter_model.safetensors")).unwrap();
    let ck = models::loader::Checkpoint::open(&model_dir, &dev, candle_core::DType::F32).unwrap();
    let proj = "model.mm_projector.2.bias";
    let shape = models::loader::WeightSource::shape(&ck, proj).unwrap();
    let replaced: HashMap<String, Tensor> =
        [(proj.to_string(), Tensor::randn(0f32, 1.0, shape.as_slice(), &dev).unwrap())].into();
    candle_core::safetensors::save(&replaced, run2.join("non_lora_trainables.safetensors")).unwrap();

    let (base, merged) = (tmp.path().join("base"), tmp.path().join("merged"));
    export(case, &base, &[]);
    let r1 = run1.parent().unwrap().to_str().unwrap().to_string();
    let r2 = run2.parent().unwrap().to_str().unwrap().to_string();
    export(case, &merged, &["--stage1", &r1, "--stage2", &r2]);

    // The reference keeps the LoRA unmerged, as training runs it: y = W·x + (α/r)·B·A·x, with the
    // stage-2 tensor as a starting value over the base.
    let spec = models::train_source::LoraSpec {
        r: 2,
        alpha: 4.0,
        dropout: 0.0,
        targets: vec!["q_proj".into(), "v_proj".into()],
        scopes: vec!["model.layers.".into(), models::bunny::VISION_PREFIX.to_string()],
    };
    let mut init = lora.clone();
    init.extend(replaced.clone());
    let unmerged = models::train_source::TrainSource::new(&ck, |_| false, Some(spec), &dev, candle_core::DType::F32, 0)
        .with_init(init);
    let reference = models::Bunny::new(&unmerged, cfg).unwrap();
    assert!(reference.llm.layers[0].q_proj.lora.is_some(), "the reference must run the LoRA unmerged");
    let fx = fixtures().join(case);
    let exp = candle_core::safetensors::load(fx.join("expected.safetensors"), &dev).unwrap();
    let px = &exp["pixel_values"];
    let ids = exp["score.input_ids"].flatten_all().unwrap().to_vec1::<i64>().unwrap();
    let mut o = models::Candle::new(dev.clone(), candle_core::DType::F32);
    let feats = reference.image_features(&mut o, px, None).unwrap().projected;
    let at = ids.iter().position(|&i| i == -200).unwrap();
    let mut text =
        |r: &[i64]| reference.llm.embed(&mut o, &Tensor::new(r, &dev).unwrap().unsqueeze(0).unwrap()).unwrap();
    let embeds = Tensor::cat(&[text(&ids[..at]), feats.clone(), text(&ids[at + 1..])], 1).unwrap();
    let len = embeds.dim(1).unwrap();
    let mask = Tensor::ones((1, len), candle_core::DType::I64, &dev).unwrap();
    let pos = Tensor::arange(0i64, len as i64, &dev).unwrap().unsqueeze(0).unwrap();
    let (want, _) = reference.llm.forward(&mut o, &embeds, &mask, &pos, None, None).unwrap();
    let want = want.i((0, len - 1)).unwrap();

    let mut m = open(&merged);
    let f = m.features_from_pixels(pixels(px), None).unwrap();
    let (got, _) = m.prefill_ids(&ids, &f).unwrap();
    let mut b = open(&base);
    let fb = b.features_from_pixels(pixels(px), None).unwrap();
    let (base_logits, _) = b.prefill_ids(&ids, &fb).unwrap();
    let (e_merged, e_base) = (rel(&got, &want), rel(&base_logits, &want));
    println!("stage-1 LoRA + stage-2 connector merged: ORT vs candle with the LoRA unmerged {e_merged:.1e}; base export vs the same {e_base:.1e}");
    assert!(e_merged < 1e-4, "merged export differs from candle with the adapters: {e_merged}");
    assert!(e_base > 1e-2, "the adapters did not change the model ({e_base})");
}

/// A stage-2 run carries the prompt module (Q-Former, T-V prompter) that a base converted from plain
/// Bunny lacks: `--stage2` adds those tensors, and the export equals the full checkpoint's.
#[test]
fn stage2_adds_prompt_module_tensors_the_base_lacks() {
    use std::collections::HashMap;
    let case = "qadapt_f32_sharded";
    let fx = fixtures().join(case).join("model");
    let tmp = tempfile::tempdir().unwrap();
    let (base, run2) = (tmp.path().join("base"), tmp.path().join("run2/final"));
    std::fs::create_dir_all(&base).unwrap();
    std::fs::create_dir_all(&run2).unwrap();
    let mut all: HashMap<String, Tensor> = HashMap::new();
    for e in std::fs::read_dir(&fx).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "safetensors") {
            all.extend(candle_core::safetensors::load(&p, &Device::Cpu).unwrap());
        } else if p.is_file() && !p.to_string_lossy().ends_with(".index.json") {
            std::fs::copy(&p, base.join(p.file_name().unwrap())).unwrap();
        }
    }
    let copy_dir = |from: &Path, to: &Path| {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap() {
            let p = e.unwrap().path();
            std::fs::copy(&p, to.join(p.file_name().unwrap())).unwrap();
        }
    };
    copy_dir(&fx.join("qformer"), &base.join("qformer"));
    let (module, rest): (HashMap<_, _>, HashMap<_, _>) =
        all.into_iter().partition(|(k, _)| k.starts_with("model.vlm_"));
    assert!(module.len() > 20, "the fixture has a prompt module");
    candle_core::safetensors::save(&rest, base.join("model.safetensors")).unwrap();
    candle_core::safetensors::save(&module, run2.join("non_lora_trainables.safetensors")).unwrap();
    let (full, staged) = (tmp.path().join("full"), tmp.path().join("staged"));
    export(case, &full, &[]);
    let o = export_bin()
        .args([
            "--model",
            base.to_str().unwrap(),
            "--stage2",
            run2.parent().unwrap().to_str().unwrap(),
            "--out",
            staged.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let exp = candle_core::safetensors::load(fixtures().join(case).join("expected.safetensors"), &Device::Cpu).unwrap();
    let ids = exp["score.input_ids"].flatten_all().unwrap().to_vec1::<i64>().unwrap();
    let qtok = QFormerTokenizer::from_dir(&full, 256).unwrap();
    let q: Vec<i64> =
        qtok.encode(&qadapt_core::template::qformer_text(SCORE_QUESTION)).unwrap().into_iter().map(i64::from).collect();
    let mut logits = Vec::new();
    for dir in [&full, &staged] {
        let mut m = open(dir);
        let f = m.features_from_pixels(pixels(&exp["pixel_values"]), Some(std::slice::from_ref(&q))).unwrap();
        logits.push(m.prefill_ids(&ids, &f).unwrap().0);
    }
    let diff = logits[0].iter().zip(&logits[1]).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    println!("base without the prompt module + --stage2 carrying it: max |Δlogit| vs the full checkpoint {diff:.1e}");
    assert_eq!(diff, 0.0);
    // Without the stage-2 run, the base alone names the first missing prompt-module tensor.
    let o = export_bin()
        .args(["--model", base.to_str().unwrap(), "--out", tmp.path().join("no").to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("model.vlm_"), "{err}");
}

fn graph_of(path: &Path) -> exporter::onnx_pb::GraphProto {
    use prost::Message;
    exporter::onnx_pb::ModelProto::decode(std::fs::read(path).unwrap().as_slice()).unwrap().graph.unwrap()
}

/// `--fused` (GroupQueryAttention over in-place cache buffers, SkipLayerNormalization, FastGelu)
/// reproduces HF on every fixture as the standard graphs do: features, logits within 1e-4, greedy
/// ids through the cache, the score. The fixtures' heads (20) are padded to 24 for the op and
/// their partial rotary (8 of 20) applied before it.
#[test]
fn fused_exports_of_every_fixture_match_hf_through_onnx_runtime() {
    let tmp = tempfile::tempdir().unwrap();
    for case in CASES {
        let dir = tmp.path().join(case);
        export(case, &dir, &["--fused"]);
        let m: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("qadapt.json")).unwrap()).unwrap();
        assert_eq!(m["variant"], "fused");
        let g = graph_of(&dir.join("decoder.onnx"));
        let count = |op: &str| g.node.iter().filter(|n| n.op_type == op).count();
        let layers = m["decoder"]["layers"].as_u64().unwrap() as usize;
        assert_eq!(count("GroupQueryAttention"), layers, "{case}: one attention op per layer");
        assert_eq!(count("SkipLayerNormalization"), layers, "{case}: residual + LayerNorm fused per layer");
        assert_eq!(count("FastGelu"), layers);
        assert_eq!(count("Softmax"), 0, "{case}: no composed attention left");
        // SigLIP's layers (the vision tower runs all but its last): one MultiHeadAttention each.
        let v = graph_of(&dir.join("vision.onnx"));
        let vcount = |op: &str| v.node.iter().filter(|n| n.op_type == op).count();
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(fixtures().join(case).join("model/config.json")).unwrap())
                .unwrap();
        let siglip = cfg["vision_config"]["num_hidden_layers"].as_u64().unwrap() as usize - 1;
        assert_eq!(vcount("MultiHeadAttention"), siglip, "{case}: vision attention ops");
        assert_eq!(vcount("SkipLayerNormalization"), 2 * siglip - 1, "{case}: vision residual LayerNorms");
        let (worst, dscore) = run_case(case, &dir);
        println!("{case:<22} fused: greedy ids equal HF's, max rel err {worst:.1e}, |Δscore| {dscore:.1e}");
        assert!(worst < 1e-4, "{case}: fused max rel err {worst} vs HF");
        assert!(dscore < 1e-4, "{case}: fused score differs from HF by {dscore}");
    }
}

/// A fused export's decode steps write into the buffers the prefill allocated: the cache's tensors
/// stay at the same addresses step after step (a standard export's are new tensors every step,
/// which shows the check can fail), and both variants' logits agree at every step.
#[test]
fn the_fused_cache_is_one_buffer_written_in_place() {
    let tmp = tempfile::tempdir().unwrap();
    let case = "bunny_f32_bpe";
    let (std_dir, fused_dir) = (tmp.path().join("standard"), tmp.path().join("fused"));
    export(case, &std_dir, &[]);
    export(case, &fused_dir, &["--fused"]);
    let exp = candle_core::safetensors::load(fixtures().join(case).join("expected.safetensors"), &Device::Cpu).unwrap();
    let ids = exp["ask.input_ids"].flatten_all().unwrap().to_vec1::<i64>().unwrap();
    let (mut s, mut f) = (open(&std_dir), open(&fused_dir));
    let feats = s.features_from_pixels(pixels(&exp["pixel_values"]), None).unwrap();
    let (mut ls, mut cs) = s.prefill_ids(&ids, &feats).unwrap();
    let (mut lf, mut cf) = f.prefill_ids(&ids, &feats).unwrap();
    assert_eq!(cf.slots(), f.manifest.decoder.max_positions);
    let (fused_at, mut std_at) = (cf.addresses().unwrap(), cs.addresses().unwrap());
    for step in 0..6 {
        let err = exporter::verify::rel_err(&lf, &ls);
        assert!(err < 1e-4, "step {step}: fused logits differ from standard by {err}");
        let next = argmax(&ls);
        (ls, cs) = s.next_logits(&[next], &cs).unwrap();
        (lf, cf) = f.next_logits(&[next], &cf).unwrap();
        assert_eq!(cf.addresses().unwrap(), fused_at, "step {step}: the fused cache moved");
        let now = cs.addresses().unwrap();
        assert!(now.iter().all(|a| !std_at.contains(a)), "step {step}: a standard cache tensor was reused");
        std_at = now;
    }
    println!("fused: 6 decode steps wrote into the prefill's {} buffers in place", fused_at.len());
}

/// Heads of 16 with full rotary fit GroupQueryAttention as they are: the fused graph rotates inside
/// the op (no `position_ids` input, no padded heads) and answers as the standard graphs do.
#[test]
fn rotary_inside_the_attention_op_matches_the_standard_graphs() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    std::fs::create_dir_all(&model).unwrap();
    let src = fixtures().join("bunny_f32_bpe/model");
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), model.join(e.file_name())).unwrap();
        }
    }
    // hidden 80 as 5 heads of 16, all dims rotating: the same weights, another attention.
    let cfg_path = model.join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["num_attention_heads"] = 5.into();
    cfg["num_key_value_heads"] = 5.into();
    cfg["partial_rotary_factor"] = 1.0.into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let run = |extra: &[&str], out: &Path| {
        let o = export_bin()
            .args(["--model", model.to_str().unwrap(), "--out", out.to_str().unwrap()])
            .args(extra)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    let (std_dir, fused_dir) = (tmp.path().join("standard"), tmp.path().join("fused"));
    run(&[], &std_dir);
    run(&["--fused"], &fused_dir);
    let g = graph_of(&fused_dir.join("decoder.onnx"));
    assert!(!g.input.iter().any(|i| i.name == "position_ids"), "the rotary should run inside the op");
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fused_dir.join("qadapt.json")).unwrap()).unwrap();
    assert!(m["decoder"].get("cache_head_dim").is_none(), "heads of 16 need no padding");
    let gqa = g.node.iter().find(|n| n.op_type == "GroupQueryAttention").unwrap();
    assert!(gqa.attribute.iter().any(|a| a.name == "do_rotary" && a.i == 1));
    let exp =
        candle_core::safetensors::load(fixtures().join("bunny_f32_bpe/expected.safetensors"), &Device::Cpu).unwrap();
    let ids = exp["ask.input_ids"].flatten_all().unwrap().to_vec1::<i64>().unwrap();
    let (mut s, mut f) = (open(&std_dir), open(&fused_dir));
    let feats = s.features_from_pixels(pixels(&exp["pixel_values"]), None).unwrap();
    let (mut ls, mut cs) = s.prefill_ids(&ids, &feats).unwrap();
    let (mut lf, mut cf) = f.prefill_ids(&ids, &feats).unwrap();
    let mut tokens = Vec::new();
    for step in 0..8 {
        let err = exporter::verify::rel_err(&lf, &ls);
        assert!(err < 1e-4, "step {step}: rotary-inside logits differ from standard by {err}");
        let (a, b) = (argmax(&ls), argmax(&lf));
        assert_eq!(a, b, "step {step}: greedy tokens differ");
        tokens.push(a);
        (ls, cs) = s.next_logits(&[a], &cs).unwrap();
        (lf, cf) = f.next_logits(&[b], &cf).unwrap();
    }
    println!("rotary inside GroupQueryAttention: 8 greedy tokens {tokens:?} equal the standard graphs'");
}
