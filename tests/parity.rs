//! Parity with HF transformers on the tiny random checkpoints of `tests/fixtures`: preprocessed
//! pixels, every stage of the image features, first-step logits, greedy ids and the Q-Align score.

use candle_core::{DType, Device, IndexOp, Tensor};
use models::{Engine, GenerateOptions};
use qadapt_core::image::load_image;
use qadapt_core::template::{SCORE_ANSWER_PREFIX, SCORE_QUESTION};
use qadapt_tests::{fixtures, rel_err, Expected, CASES, REL_TOL};

struct Report {
    rows: Vec<(String, String, f32)>,
}

impl Report {
    fn check(&mut self, case: &str, what: &str, ours: &Tensor, reference: &Tensor) {
        let e = rel_err(ours, reference);
        self.rows.push((case.into(), what.into(), e));
    }
}

fn run_case(case: &str, report: &mut Report) {
    let dir = fixtures().join(case);
    let exp = Expected::load(case);
    let engine = Engine::load(&dir.join("model"), None, &Device::Cpu, DType::F32).unwrap();
    let img = load_image(&dir.join("image.png")).unwrap();

    // Our preprocessing against the HF image processor.
    let px = engine.pixel_values(&img).unwrap();
    let grey = (px.clone() - exp.t("pixel_values"))
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
        * 127.5;
    assert!(grey <= 1.0 + 1e-3, "{case}: pixel_values differ by {grey} grey levels");
    report.rows.push((case.into(), "pixel_values (grey levels)".into(), grey));

    // The model on the reference pixels, so each stage is measured on its own.
    let px = exp.t("pixel_values").clone();
    for (p, question, prefix) in [
        ("ask", exp.json["questions"]["ask"].as_str().unwrap(), None),
        ("score", SCORE_QUESTION, Some(SCORE_ANSWER_PREFIX)),
    ] {
        let feats = engine.image_features(&px, question).unwrap();
        if p == "ask" {
            report.check(case, "vision_features", &feats.vision, exp.t("vision_features"));
        }
        if engine.model.is_qadapt() {
            let (ids, _) = engine.qformer_inputs(question).unwrap().unwrap();
            assert_eq!(
                ids.i(0).unwrap().to_vec1::<i64>().unwrap(),
                exp.ids(&format!("{p}.qformer_input_ids")),
                "{case} {p}: Q-Former ids"
            );
            report.check(
                case,
                &format!("{p}.qformer_output"),
                feats.qformer_output.as_ref().unwrap(),
                exp.t(&format!("{p}.qformer_output")),
            );
            report.check(
                case,
                &format!("{p}.fused_features"),
                feats.fused.as_ref().unwrap(),
                exp.t(&format!("{p}.fused_features")),
            );
        }
        report.check(case, &format!("{p}.image_features"), &feats.projected, exp.t(&format!("{p}.image_features")));
        let prompt = engine.prompt_ids(question, prefix).unwrap();
        assert_eq!(prompt.with_placeholder(), exp.ids(&format!("{p}.input_ids")), "{case} {p}: prompt ids");
        let embeds = engine.splice(&prompt, &feats.projected).unwrap();
        let len = embeds.dim(1).unwrap();
        let mask = Tensor::ones((1, len), DType::I64, &Device::Cpu).unwrap();
        let pos = Tensor::arange(0i64, len as i64, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let (logits, _) = engine
            .model
            .llm
            .forward(&mut models::Candle::new(Device::Cpu, DType::F32), &embeds, &mask, &pos, None, None)
            .unwrap();
        report.check(case, &format!("{p}.logits"), &logits.i((0, len - 1)).unwrap(), exp.t(&format!("{p}.logits")));
    }

    // End to end from the image file: greedy ids and score.
    let question = exp.json["questions"]["ask"].as_str().unwrap();
    let max_new = exp.json["max_new_tokens"].as_u64().unwrap() as usize;
    let out = engine
        .generate(&img, question, &GenerateOptions { max_new_tokens: max_new, ..Default::default() }, |_| {})
        .unwrap();
    let want: Vec<u32> = exp.ids("ask.greedy_ids").into_iter().map(|i| i as u32).collect();
    assert_eq!(out.token_ids, want, "{case}: greedy ids");
    let (score, probs) = engine.score(&img).unwrap();
    let want_score = exp.json["score"].as_f64().unwrap() as f32;
    let want_probs: Vec<f32> =
        exp.json["level_probs"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
    let perr = probs.to_array().iter().zip(&want_probs).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    report.rows.push((case.into(), "score (abs)".into(), (score - want_score).abs()));
    report.rows.push((case.into(), "level_probs (abs)".into(), perr));
    assert!((score - want_score).abs() < 1e-4, "{case}: score {score} vs HF {want_score}");
    assert!(perr < 1e-4, "{case}: level probs {probs:?} vs HF {want_probs:?}");
}

#[test]
fn hf_parity_on_every_fixture() {
    let mut report = Report { rows: Vec::new() };
    for case in CASES {
        run_case(case, &mut report);
    }
    println!("{:<22} {:<28} {:>12}", "case", "tensor", "max rel err");
    for (c, w, e) in &report.rows {
        println!("{c:<22} {w:<28} {e:>12.3e}");
    }
    let tensors: Vec<_> = report.rows.iter().filter(|r| !r.1.contains('(')).collect();
    let worst = tensors.iter().map(|r| r.2).fold(0f32, f32::max);
    println!(
        "parity: {} cases, {} tensor comparisons (tolerance {REL_TOL:e} relative), worst {worst:.3e}; greedy ids identical, score within 1e-4",
        CASES.len(),
        tensors.len()
    );
    for (c, w, e) in tensors {
        assert!(*e <= REL_TOL, "{c} {w}: relative error {e:e} > {REL_TOL:e}");
    }
}
