//! Exports of every HF parity fixture, run through ONNX Runtime (CPU) by a minimal greedy loop,
//! reproduce the HF image features, logits, greedy ids and Q-Align score; the f16 export stays within
//! its stated tolerance; broken inputs fail clearly and leave no export directory behind.
//!
//! Needs `ORT_DYLIB_PATH` (`.ci/run` fetches libonnxruntime from the PyPI wheel); without it the
//! tests fail saying so rather than skipping.

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{Device, IndexOp, Tensor};
use ort::session::{Session, SessionInputValue};
use ort::value::Tensor as OrtTensor;
use qadapt_core::sampling::quality_score;
use qadapt_core::template::SCORE_QUESTION;
use qadapt_core::QFormerTokenizer;

const CASES: [&str; 4] = ["bunny_f32_bpe", "qadapt_f32_sharded", "qadapt_f16", "bunny_bf16_sharded"];

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn export_bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_qadapt-export"))
}

/// ONNX Runtime allows one environment per process: the tests share it.
fn env() -> &'static ort::environment::Environment {
    static ENV: std::sync::OnceLock<ort::environment::Environment> = std::sync::OnceLock::new();
    ENV.get_or_init(|| {
        assert!(std::env::var_os("ORT_DYLIB_PATH").is_some(), "set ORT_DYLIB_PATH to libonnxruntime.so.1.31.1 (see .ci/run)");
        ort::init().build().expect("ONNX Runtime")
    })
}

fn export(case: &str, out: &Path, extra: &[&str]) {
    let model = fixtures().join(case).join("model");
    let o = export_bin().args(["--model", model.to_str().unwrap(), "--out", out.to_str().unwrap()]).args(extra).output().unwrap();
    assert!(o.status.success(), "export of {case} failed: {}", String::from_utf8_lossy(&o.stderr));
    println!("{}", String::from_utf8_lossy(&o.stdout).trim_end());
}

/// One layer's cached (key, value), flattened.
type Kv = (Vec<f32>, Vec<f32>);

/// The three graphs and what the loop needs from qadapt.json.
struct Exported {
    vision: Session,
    embed: Session,
    decoder: Session,
    f16: bool,
    layers: usize,
    heads: usize,
    head_dim: usize,
    hidden: usize,
    eos: u32,
    levels: [u32; 5],
}

fn floats(shape: Vec<i64>, v: Vec<f32>, f16: bool) -> SessionInputValue<'static> {
    if f16 {
        OrtTensor::from_array((shape, v.into_iter().map(half::f16::from_f32).collect::<Vec<_>>())).unwrap().into_dyn().into()
    } else {
        OrtTensor::from_array((shape, v)).unwrap().into_dyn().into()
    }
}

fn ints(shape: Vec<i64>, v: Vec<i64>) -> SessionInputValue<'static> {
    OrtTensor::from_array((shape, v)).unwrap().into_dyn().into()
}

fn out_f32(v: &ort::value::DynValue) -> Vec<f32> {
    match v.try_extract_tensor::<f32>() {
        Ok((_, d)) => d.to_vec(),
        Err(_) => v.try_extract_tensor::<half::f16>().unwrap().1.iter().map(|x| x.to_f32()).collect(),
    }
}

impl Exported {
    fn open(env: &ort::environment::Environment, dir: &Path) -> Self {
        let j: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("qadapt.json")).unwrap()).unwrap();
        let open = |f: &str| Session::builder(env).unwrap().commit_from_file(dir.join(f)).unwrap();
        let d = &j["decoder"];
        let u = |v: &serde_json::Value| v.as_u64().unwrap() as usize;
        let levels: Vec<u32> = j["tokens"]["levels"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        Exported {
            vision: open("vision.onnx"),
            embed: open("embed.onnx"),
            decoder: open("decoder.onnx"),
            f16: j["dtype"] == "f16",
            layers: u(&d["layers"]),
            heads: u(&d["heads"]),
            head_dim: u(&d["head_dim"]),
            hidden: u(&d["hidden_size"]),
            eos: j["tokens"]["eos"].as_u64().unwrap() as u32,
            levels: levels.try_into().unwrap(),
        }
    }

    fn image_features(&mut self, pixels: &Tensor, qformer: Option<Vec<i64>>) -> Vec<f32> {
        let shape: Vec<i64> = pixels.dims().iter().map(|&d| d as i64).collect();
        let mut feed = vec![("pixel_values".to_string(), floats(shape, pixels.flatten_all().unwrap().to_vec1().unwrap(), self.f16))];
        if let Some(ids) = qformer {
            let t = ids.len() as i64;
            feed.push(("qformer_attention_mask".into(), ints(vec![1, t], vec![1; ids.len()])));
            feed.push(("qformer_input_ids".into(), ints(vec![1, t], ids)));
        }
        let out = self.vision.run(feed).unwrap();
        out_f32(&out["image_features"])
    }

    fn embed(&mut self, ids: &[i64]) -> Vec<f32> {
        let out = self.embed.run(vec![("input_ids".to_string(), ints(vec![1, ids.len() as i64], ids.to_vec()))]).unwrap();
        out_f32(&out["inputs_embeds"])
    }

    /// One decoder step over `embeds` (rows of `hidden`) after `past`; returns the last row's logits.
    fn step(&mut self, embeds: Vec<f32>, past: &mut [Kv], past_len: usize) -> Vec<f32> {
        let s = embeds.len() / self.hidden;
        let total = past_len + s;
        let mut feed = vec![
            ("inputs_embeds".to_string(), floats(vec![1, s as i64, self.hidden as i64], embeds, self.f16)),
            ("attention_mask".to_string(), ints(vec![1, total as i64], vec![1; total])),
            ("position_ids".to_string(), ints(vec![1, s as i64], (past_len as i64..total as i64).collect())),
        ];
        let kv_shape = vec![1, self.heads as i64, past_len as i64, self.head_dim as i64];
        for (i, (k, v)) in past.iter().enumerate() {
            feed.push((format!("past_key_values.{i}.key"), floats(kv_shape.clone(), k.clone(), self.f16)));
            feed.push((format!("past_key_values.{i}.value"), floats(kv_shape.clone(), v.clone(), self.f16)));
        }
        let out = self.decoder.run(feed).unwrap();
        for (i, kv) in past.iter_mut().enumerate() {
            *kv = (out_f32(&out[format!("present.{i}.key").as_str()]), out_f32(&out[format!("present.{i}.value").as_str()]));
        }
        let logits = out_f32(&out["logits"]);
        let v = logits.len() / s;
        logits[(s - 1) * v..].to_vec()
    }

    /// Prefill of a prompt (`-200` marks the image) → last logits and the cache.
    fn prefill(&mut self, input_ids: &[i64], feats: &[f32]) -> (Vec<f32>, Vec<Kv>, usize) {
        let at = input_ids.iter().position(|&i| i == -200).expect("prompt without the image placeholder");
        let mut embeds = self.embed(&input_ids[..at]);
        embeds.extend_from_slice(feats);
        embeds.extend(self.embed(&input_ids[at + 1..]));
        let len = embeds.len() / self.hidden;
        let mut past = vec![(Vec::new(), Vec::new()); self.layers];
        let logits = self.step(embeds, &mut past, 0);
        (logits, past, len)
    }
}

fn rel(a: &[f32], b: &Tensor) -> f32 {
    let b: Vec<f32> = b.flatten_all().unwrap().to_dtype(candle_core::DType::F32).unwrap().to_vec1().unwrap();
    exporter::verify::rel_err(a, &b)
}

fn argmax(v: &[f32]) -> u32 {
    v.iter().enumerate().fold((0, f32::MIN), |(bi, bv), (i, &x)| if x > bv { (i, x) } else { (bi, bv) }).0 as u32
}

/// Runs one case through ORT; returns (max rel err of features and logits, |Δscore|).
fn run_case(env: &ort::environment::Environment, case: &str, dir: &Path) -> (f32, f32) {
    let fx = fixtures().join(case);
    let exp_json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fx.join("expected.json")).unwrap()).unwrap();
    let exp = candle_core::safetensors::load(fx.join("expected.safetensors"), &Device::Cpu).unwrap();
    let ids = |k: &str| exp[k].flatten_all().unwrap().to_vec1::<i64>().unwrap();
    let mut m = Exported::open(env, dir);
    let qtok = QFormerTokenizer::from_dir(dir, 256).ok().filter(|_| dir.join("qformer").is_dir());
    let mut worst = 0f32;
    let mut score_err = 0f32;
    for p in ["ask", "score"] {
        let question = if p == "ask" { exp_json["questions"]["ask"].as_str().unwrap() } else { SCORE_QUESTION };
        let q = qtok.as_ref().map(|t| t.encode(&qadapt_core::template::qformer_text(question)).unwrap().into_iter().map(i64::from).collect::<Vec<_>>());
        if let Some(q) = &q {
            assert_eq!(q, &ids(&format!("{p}.qformer_input_ids")), "{case} {p}: Q-Former ids");
        }
        let feats = m.image_features(&exp["pixel_values"], q);
        let e_feat = rel(&feats, &exp[&format!("{p}.image_features")]);
        let (logits, mut past, mut len) = m.prefill(&ids(&format!("{p}.input_ids")), &feats);
        let e_logits = rel(&logits, &exp[&format!("{p}.logits")]);
        println!("{case:<22} {p:<6} image_features {e_feat:.1e}  logits {e_logits:.1e}");
        worst = worst.max(e_feat).max(e_logits);
        if p == "score" {
            let lv = m.levels.map(|i| logits[i as usize]);
            let (score, _) = quality_score(lv);
            score_err = (score - exp_json["score"].as_f64().unwrap() as f32).abs();
        } else {
            // Greedy from the prefill, one token per step through the cache.
            let max_new = exp_json["max_new_tokens"].as_u64().unwrap() as usize;
            let mut got = Vec::new();
            let mut logits = logits;
            for _ in 0..max_new {
                let next = argmax(&logits);
                if next == m.eos {
                    break;
                }
                got.push(next as i64);
                let e = m.embed(&[next as i64]);
                logits = m.step(e, &mut past, len);
                len += 1;
            }
            assert_eq!(got, ids("ask.greedy_ids"), "{case}: greedy ids through ONNX Runtime");
        }
    }
    (worst, score_err)
}

#[test]
fn exports_of_every_fixture_match_hf_through_onnx_runtime() {
    let env = env();
    let tmp = tempfile::tempdir().unwrap();
    println!("{:<22} {:<6} max rel err vs HF (tol 1e-4)", "case", "prompt");
    for case in CASES {
        let dir = tmp.path().join(case);
        export(case, &dir, &[]);
        let (worst, dscore) = run_case(env, case, &dir);
        println!("{case:<22} greedy ids equal, |Δscore| {dscore:.1e}");
        assert!(worst < 1e-4, "{case}: max rel err {worst} vs HF");
        assert!(dscore < 1e-4, "{case}: score differs from HF by {dscore}");
    }
}

#[test]
fn f16_and_external_data_exports_stay_within_tolerance() {
    let env = env();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("f16");
    export("qadapt_f32_sharded", &dir, &["--dtype", "f16", "--external-data"]);
    assert!(dir.join("decoder.onnx.data").is_file(), "external data file");
    let fx = fixtures().join("qadapt_f32_sharded");
    let exp = candle_core::safetensors::load(fx.join("expected.safetensors"), &Device::Cpu).unwrap();
    let mut m = Exported::open(env, &dir);
    assert!(m.f16);
    let qtok = QFormerTokenizer::from_dir(&dir, 256).unwrap();
    let q: Vec<i64> = qtok.encode(&qadapt_core::template::qformer_text(SCORE_QUESTION)).unwrap().into_iter().map(i64::from).collect();
    let feats = m.image_features(&exp["pixel_values"], Some(q));
    let e_feat = rel(&feats, &exp["score.image_features"]);
    let ids = exp["score.input_ids"].flatten_all().unwrap().to_vec1::<i64>().unwrap();
    let (logits, _, _) = m.prefill(&ids, &feats);
    let e_logits = rel(&logits, &exp["score.logits"]);
    println!("f16 export vs HF f32: image_features {e_feat:.1e}, logits {e_logits:.1e} (tolerance 2e-2)");
    assert!(e_feat < 2e-2 && e_logits < 2e-2);
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
    let err = run(&["--model", fixtures().join("bunny_f32_bpe/model").to_str().unwrap(), "--out", o, "--ort-lib", "/nonexistent/libonnxruntime.so"]);
    assert!(err.contains("/nonexistent/libonnxruntime.so"), "{err}");
    // A tolerance no graph can meet: verification fails and the directory never appears.
    let err = run(&["--model", fixtures().join("bunny_f32_bpe/model").to_str().unwrap(), "--out", o, "--tolerance", "0"]);
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
    let env = env();
    let case = "bunny_f32_bpe";
    let tmp = tempfile::tempdir().unwrap();
    let (run1, run2) = (tmp.path().join("run1/final"), tmp.path().join("run2/final"));
    std::fs::create_dir_all(&run1).unwrap();
    std::fs::create_dir_all(&run2).unwrap();
    std::fs::write(run1.join("adapter_config.json"), r#"{"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"]}"#).unwrap();
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
    let replaced: HashMap<String, Tensor> = [(proj.to_string(), Tensor::randn(0f32, 1.0, shape.as_slice(), &dev).unwrap())].into();
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
    let unmerged = models::train_source::TrainSource::new(&ck, |_| false, Some(spec), &dev, candle_core::DType::F32, 0).with_init(init);
    let reference = models::Bunny::new(&unmerged, cfg).unwrap();
    assert!(reference.llm.layers[0].q_proj.lora.is_some(), "the reference must run the LoRA unmerged");
    let fx = fixtures().join(case);
    let exp = candle_core::safetensors::load(fx.join("expected.safetensors"), &dev).unwrap();
    let px = &exp["pixel_values"];
    let ids = exp["score.input_ids"].flatten_all().unwrap().to_vec1::<i64>().unwrap();
    let mut o = models::Candle::new(dev.clone(), candle_core::DType::F32);
    let feats = reference.image_features(&mut o, px, None).unwrap().projected;
    let at = ids.iter().position(|&i| i == -200).unwrap();
    let mut text = |r: &[i64]| reference.llm.embed(&mut o, &Tensor::new(r, &dev).unwrap().unsqueeze(0).unwrap()).unwrap();
    let embeds = Tensor::cat(&[text(&ids[..at]), feats.clone(), text(&ids[at + 1..])], 1).unwrap();
    let len = embeds.dim(1).unwrap();
    let mask = Tensor::ones((1, len), candle_core::DType::I64, &dev).unwrap();
    let pos = Tensor::arange(0i64, len as i64, &dev).unwrap().unsqueeze(0).unwrap();
    let (want, _) = reference.llm.forward(&mut o, &embeds, &mask, &pos, None).unwrap();
    let want = want.i((0, len - 1)).unwrap();

    let mut m = Exported::open(env, &merged);
    let f = m.image_features(px, None);
    let (got, _, _) = m.prefill(&ids, &f);
    let mut b = Exported::open(env, &base);
    let fb = b.image_features(px, None);
    let (base_logits, _, _) = b.prefill(&ids, &fb);
    let (e_merged, e_base) = (rel(&got, &want), rel(&base_logits, &want));
    println!("stage-1 LoRA + stage-2 connector merged: ORT vs candle with the LoRA unmerged {e_merged:.1e}; base export vs the same {e_base:.1e}");
    assert!(e_merged < 1e-4, "merged export differs from candle with the adapters: {e_merged}");
    assert!(e_base > 1e-2, "the adapters did not change the model ({e_base})");
}
