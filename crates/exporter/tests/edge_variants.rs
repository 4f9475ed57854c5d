//! The edge variants of an export: weight-only int4 / int8 (`--quantize`) and f16 graphs that cannot
//! overflow. Packing is checked against ONNX Runtime's own `MatMulNBits` through a dequantization
//! written here from the op's description; quantized fixtures are served by the runtime; an f16
//! export of a checkpoint whose attention scores pass f16's range stays finite and close to f32.
//!
//! Needs `ORT_DYLIB_PATH` (`.ci/run` fetches it).

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use exporter::graph::{FloatType, Graph};
use exporter::quant::Quant;
use exporter::write::{write_model, Dim, Io};
use models::ops::{Ops, Param};
use qadapt_core::sampling::GenerateOptions;
use runtime_ort::{Ep, Runtime};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn ort_env() -> &'static ort::environment::Environment {
    assert!(std::env::var_os("ORT_DYLIB_PATH").is_some(), "set ORT_DYLIB_PATH (see .ci/run)");
    exporter::verify::environment(None).unwrap()
}

/// W [N, K] from `MatMulNBits`' B [N, k_blocks, block·bits/8] and scales [N·k_blocks], read as the
/// contrib-op documentation states it (first value in the low nibble, zero point 2^(bits−1)).
fn dequantize(b: &[u8], scales: &[f32], n: usize, k: usize, bits: u8, block: usize) -> Vec<f32> {
    let kb = k.div_ceil(block);
    let per_byte = 8 / bits as usize;
    let blob = block / per_byte;
    let mut w = Vec::with_capacity(n * k);
    for r in 0..n {
        for c in 0..k {
            let (blk, i) = (c / block, c % block);
            let byte = b[(r * kb + blk) * blob + i / per_byte];
            let shift = (i % per_byte) * bits as usize;
            let stored = (byte >> shift) & (((1u16 << bits) - 1) as u8);
            w.push((i32::from(stored) - (1 << (bits - 1))) as f32 * scales[r * kb + blk]);
        }
    }
    w
}

/// One quantized linear, written as a graph and run by ONNX Runtime, against `x · deq(W)ᵀ`.
#[test]
fn matmul_nbits_reads_the_packing_as_the_spec_states() {
    let env = ort_env();
    let dir = tempfile::tempdir().unwrap();
    // K = 80 is not a multiple of any block: the padding of the last block is exercised.
    let (rows, k, n) = (3usize, 80usize, 12usize);
    let w: Vec<f32> = (0..n * k).map(|i| ((i * 7919 % 211) as f32 - 105.0) / 97.0).collect();
    let x: Vec<f32> = (0..rows * k).map(|i| ((i * 104729 % 53) as f32 - 26.0) / 13.0).collect();
    for (bits, block) in [(4u8, 16usize), (4, 32), (4, 64), (8, 16), (8, 32), (8, 128)] {
        // accuracy_level 1: fp32 arithmetic, so the op's result is the dequantized product.
        let q = Quant { bits, block_size: block, accuracy_level: 1, lm_head: true, vision: false };
        let mut g = Graph::new(FloatType::F32);
        g.quant = Some(q);
        let xin = g.input("x", 2);
        let wt = Tensor::from_vec(w.clone(), (n, k), &Device::Cpu).unwrap();
        let wp = g.param(&Param::new("layer.weight", wt)).unwrap();
        let y = g.linear(&xin, &wp, None).unwrap();
        g.output(&y, "y");
        assert!(g.nodes.iter().any(|nd| nd.op_type == "MatMulNBits" && nd.domain == "com.microsoft"));
        let path = dir.path().join(format!("q{bits}_{block}.onnx"));
        write_model(
            &g,
            &exporter::weights::InMemory,
            &[Io::new(
                "x",
                exporter::onnx_pb::tensor_proto::DataType::Float,
                vec![Dim::Sym("rows"), Dim::Fixed(k as i64)],
            )],
            &[Io::new(
                "y",
                exporter::onnx_pb::tensor_proto::DataType::Float,
                vec![Dim::Sym("rows"), Dim::Fixed(n as i64)],
            )],
            &path,
            false,
            "test",
            || {},
        )
        .unwrap();
        let mut s = ort::session::Session::builder(env).unwrap().commit_from_file(&path).unwrap();
        let out =
            s.run(vec![("x", runtime_ort::floats(vec![rows as i64, k as i64], x.clone(), false).unwrap())]).unwrap();
        let got = runtime_ort::out_f32(&out["y"]).unwrap();
        let deq = dequantize(&q.pack(&w, n, k), &q.scales(&w, n, k), n, k, bits, block);
        let mut worst = 0f32;
        for r in 0..rows {
            for c in 0..n {
                let want: f32 = (0..k).map(|j| x[r * k + j] * deq[c * k + j]).sum();
                worst = worst.max((got[r * n + c] - want).abs() / want.abs().max(1.0));
            }
        }
        assert!(worst < 1e-4, "int{bits} block {block}: ORT differs from the spec's dequantization by {worst:e}");
        // And the dequantized weights are the originals within half a quantization step.
        let step_max = q.scales(&w, n, k).into_iter().fold(0f32, f32::max);
        let err = w.iter().zip(&deq).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(err <= step_max / 2.0 + 1e-6, "int{bits} block {block}: weight error {err} > {step_max}/2");
    }
}

fn export(model: &Path, out: &Path, extra: &[&str]) -> serde_json::Value {
    let o = Command::new(env!("CARGO_BIN_EXE_qadapt-export"))
        .args(["--model", model.to_str().unwrap(), "--out", out.to_str().unwrap(), "--json"])
        .args(extra)
        .output()
        .unwrap();
    assert!(o.status.success(), "export {extra:?} failed: {}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

fn count_nodes(graph: &Path, op: &str) -> usize {
    use prost::Message;
    let m = exporter::onnx_pb::ModelProto::decode(std::fs::read(graph).unwrap().as_slice()).unwrap();
    m.graph.unwrap().node.iter().filter(|n| n.op_type == op).count()
}

/// Greedy ids of the fixture image and question, and the Q-Align score.
fn answer(dir: &Path) -> (Vec<u32>, f32) {
    let mut rt = Runtime::open(dir, Ep::Cpu, 0, false, None).unwrap();
    let img = image::open(fixtures().join("qadapt_f32_sharded/image.png")).unwrap().to_rgb8();
    let opts = GenerateOptions { max_new_tokens: 8, ..Default::default() };
    let ids = rt.generate(&img, "How is the quality of this image?", &opts, |_| {}).unwrap().token_ids;
    (ids, rt.score(&img).unwrap().0)
}

#[test]
fn int4_and_int8_exports_report_accuracy_and_serve() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixtures().join("qadapt_f32_sharded/model");
    let f32_dir = tmp.path().join("f32");
    let s = export(&model, &f32_dir, &[]);
    assert!(s["quant"].is_null());
    let (ids32, score32) = answer(&f32_dir);
    let dec_bytes = |d: &Path| std::fs::metadata(d.join("decoder.onnx")).unwrap().len();
    for (bits, extra) in [
        (8u8, vec!["--quantize", "int8"]),
        (4, vec!["--quantize", "int4"]),
        (4, vec!["--quantize", "int4", "--keep-lm-head", "--block-size", "16", "--quantize-vision"]),
        (4, vec!["--fused", "--quantize", "int4"]),
        (8, vec!["--fused", "--quantize", "int8"]),
    ] {
        let dir = tmp.path().join(extra.join("_"));
        let s = export(&model, &dir, &extra);
        let r = &s["quant"];
        let bound = exporter::verify::QuantBounds::of(bits);
        let cos = r["logit_cosine_mean"].as_f64().unwrap() as f32;
        let agree = r["top1_agreement"].as_f64().unwrap() as f32;
        println!("{extra:?}: cosine {cos:.5}, agreement {agree:.3}, vision {:?}", r["vision_cosine"]);
        assert!(cos >= bound.logit_cosine_mean && agree >= bound.top1_agreement, "{extra:?}: {r}");
        assert_eq!(r["positions"], 96);
        let keep = extra.contains(&"--keep-lm-head");
        let fused = extra.contains(&"--fused");
        // Six linears per phi layer (q, k, v, dense, fc1, fc2; four when q, k and v are packed into
        // one), two layers, and lm_head unless kept.
        let want = if fused { 8 } else { 12 } + usize::from(!keep);
        assert_eq!(count_nodes(&dir.join("decoder.onnx"), "MatMulNBits"), want, "{extra:?}");
        assert_eq!(r["vision_cosine"].is_null(), !extra.contains(&"--quantize-vision"));
        assert!(dec_bytes(&dir) < dec_bytes(&f32_dir), "{extra:?}: the quantized decoder is not smaller");
        let m: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("qadapt.json")).unwrap()).unwrap();
        assert_eq!(m["quantization"]["bits"], bits);
        assert_eq!(m["quantization"]["lm_head"], !keep);
        assert_eq!(m["variant"], if fused { "fused" } else { "standard" });
        // The runtime serves it without flags; on a random tiny model the answer may differ from
        // the f32 export's, but it is a full answer and a valid score.
        let (ids, score) = answer(&dir);
        assert_eq!(ids.len(), ids32.len().max(ids.len()).min(8));
        assert!((1.0..=5.0).contains(&score), "score {score}");
        println!("  ids {ids:?} (f32 {ids32:?}), score {score:.4} (f32 {score32:.4})");
    }
    // Settings the op cannot take fail before anything is written.
    for (bad, why) in
        [(vec!["--quantize", "int4", "--block-size", "24"], "power of two"), (vec!["--block-size", "32"], "--quantize")]
    {
        let out = tmp.path().join("bad");
        let o = Command::new(env!("CARGO_BIN_EXE_qadapt-export"))
            .args(["--model", model.to_str().unwrap(), "--out", out.to_str().unwrap()])
            .args(&bad)
            .output()
            .unwrap();
        assert!(!o.status.success());
        assert!(String::from_utf8_lossy(&o.stderr).contains(why), "{bad:?}: {}", String::from_utf8_lossy(&o.stderr));
        assert!(!out.exists());
    }
}

/// A copy of a fixture with its attention's q and k projections scaled by `factor`: scores grow by
/// its square.
fn scaled_attention_copy(case: &str, dir: &Path, factor: f32) -> PathBuf {
    let src = fixtures().join(case).join("model");
    let out = dir.join(format!("{case}-x{factor}"));
    std::fs::create_dir_all(&out).unwrap();
    for e in std::fs::read_dir(&src).unwrap() {
        let p = e.unwrap().path();
        if p.is_file() && p.extension().is_none_or(|x| x != "safetensors") {
            std::fs::copy(&p, out.join(p.file_name().unwrap())).unwrap();
        }
    }
    let t = candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    let scaled: std::collections::HashMap<String, Tensor> = t
        .into_iter()
        .map(|(k, v)| {
            let attn = k.contains("self_attn.q_proj") || k.contains("self_attn.k_proj");
            let v = if attn && k.starts_with("model.layers.") { (v * factor as f64).unwrap() } else { v };
            (k, v)
        })
        .collect();
    candle_core::safetensors::save(&scaled, out.join("model.safetensors")).unwrap();
    out
}

/// Decoder logits of a short prompt with `interp`, the model's weights in `dtype`.
fn logits(model_dir: &Path, dtype: DType, naive_f16: bool) -> Vec<f32> {
    let dev = Device::Cpu;
    let ck = models::loader::Checkpoint::open(model_dir, &dev, dtype).unwrap();
    let cfg = qadapt_core::BunnyConfig::from_file(&model_dir.join("config.json")).unwrap();
    let m = models::Bunny::new(&ck, cfg).unwrap();
    // `training` keeps the composite attention (scores in the compute type): the naive f16 path.
    let mut o = if naive_f16 {
        models::Candle::training(dev.clone(), dtype, 0)
    } else {
        models::Candle::new(dev.clone(), dtype)
    };
    let l = 12usize;
    let ids = Tensor::from_vec((0..l as i64).map(|i| (i * 37 + 5) % 400).collect::<Vec<_>>(), (1, l), &dev).unwrap();
    let e = m.llm.embed(&mut o, &ids).unwrap();
    let mask = Tensor::ones((1, l), DType::I64, &dev).unwrap();
    let pos = Tensor::arange(0i64, l as i64, &dev).unwrap().unsqueeze(0).unwrap();
    let (y, _) = m.llm.forward(&mut o, &e, &mask, &pos, None, None).unwrap();
    y.flatten_all().unwrap().to_dtype(DType::F32).unwrap().to_vec1().unwrap()
}

/// The prompt's last-position logits (the fixture image, one question).
fn last_logits(rt: &mut Runtime, img: &image::RgbImage) -> Vec<f32> {
    use qadapt_core::template;
    let q = "Describe the image.";
    let feats = rt.image_features(&[img], q).unwrap();
    let p = template::tokenize_prompt(&rt.tokenizer, &template::prompt(&template::user_turn(q), None)).unwrap();
    let split = p.image_pos.unwrap();
    let ids: Vec<i64> = p.ids[..split]
        .iter()
        .map(|&i| i64::from(i))
        .chain([-200])
        .chain(p.ids[split..].iter().map(|&i| i64::from(i)))
        .collect();
    rt.prefill_ids(&ids, &feats).unwrap().0
}

const FACTOR: f32 = 400.0;

#[test]
fn f16_exports_survive_attention_scores_beyond_f16() {
    let tmp = tempfile::tempdir().unwrap();
    // q and k scaled: the products grow FACTOR²-fold, past 65,504 (proved below by the naive f16 path).
    let model = scaled_attention_copy("bunny_f32_bpe", tmp.path(), FACTOR);
    let naive = logits(&model, DType::F16, true);
    assert!(
        naive.iter().any(|x| !x.is_finite()),
        "the fixture does not overflow f16: q·k stays within 65,504 with scores in f16"
    );
    let want = logits(&model, DType::F32, false);
    let safe = logits(&model, DType::F16, false);
    let rel = exporter::verify::rel_err(&safe, &want);
    assert!(rel < 2e-2, "candle f16 with f32 scores: max relative error {rel:e}");
    // The f16 export is verified by the exporter against candle (f16, f32 scores) and must stay
    // finite; here it is also checked against the f32 model through the runtime.
    let f16_dir = tmp.path().join("f16");
    export(&model, &f16_dir, &["--dtype", "f16"]);
    let f32_dir = tmp.path().join("f32");
    export(&model, &f32_dir, &[]);
    let img = image::open(fixtures().join("bunny_f32_bpe/image.png")).unwrap().to_rgb8();
    let mut a = Runtime::open(&f16_dir, Ep::Cpu, 0, false, None).unwrap();
    let mut b = Runtime::open(&f32_dir, Ep::Cpu, 0, false, None).unwrap();
    let (la, lb) = (last_logits(&mut a, &img), last_logits(&mut b, &img));
    assert!(la.iter().all(|x| x.is_finite()), "f16 export logits are not finite");
    let rel = exporter::verify::rel_err(&la, &lb);
    println!("f16 export vs f32 export, prefill logits: max relative error {rel:.2e}");
    assert!(rel < 2e-2, "f16 export vs f32: max relative error {rel:e}");
    // The fused f16 graph: its GroupQueryAttention takes q and k in f16 and must not overflow either.
    let fused_dir = tmp.path().join("f16-fused");
    export(&model, &fused_dir, &["--dtype", "f16", "--fused"]);
    let mut c = Runtime::open(&fused_dir, Ep::Cpu, 0, false, None).unwrap();
    let lc = last_logits(&mut c, &img);
    assert!(lc.iter().all(|x| x.is_finite()), "fused f16 export logits are not finite");
    let rel = exporter::verify::rel_err(&lc, &lb);
    println!("fused f16 export vs f32 export, prefill logits: max relative error {rel:.2e}");
    assert!(rel < 2e-2, "fused f16 export vs f32: max relative error {rel:e}");
}
