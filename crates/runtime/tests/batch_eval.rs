//! `--choices`, `batch` and `eval` of `qadapt-run` on fixture exports (CPU provider), each checked
//! against an independent path: option log-probabilities against the candle engine, batched rows
//! against one-image runs, evaluation figures against per-image CLI runs.

mod common;

use std::path::Path;

use common::{exported, fixtures, images, ok, run};
use serde_json::Value;

fn log_softmax_at(logits: &[f32], id: u32) -> f64 {
    let m = logits.iter().fold(f32::MIN, |a, &b| a.max(b)) as f64;
    let lse = m + logits.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
    logits[id as usize] as f64 - lse
}

/// Each option's log-probability equals the candle engine's, computed token by token from the
/// logits after the prompt with the option's prefix as the begun answer; on the standard and the
/// fused export (where each option overwrites the cache slots after the prompt).
#[test]
fn choices_match_the_candle_engine() {
    let case = "qadapt_f32_sharded";
    let fx = fixtures().join(case);
    let img = fx.join("image.png");
    let q = "How is the sharpness?";
    let opts = ["good", "bad quality", "fair"];
    let engine =
        models::Engine::load(&fx.join("model"), None, &candle_core::Device::Cpu, candle_core::DType::F32).unwrap();
    let tok = qadapt_core::TextTokenizer::from_dir(&fx.join("model")).unwrap();
    let picture = qadapt_core::image::load_image(&img).unwrap();
    let eos = common::expected(case)["eos_token_id"].as_u64().unwrap() as u32;
    let mut want = Vec::new();
    for opt in opts {
        let mut ids = tok.encode(&format!(" {opt}")).unwrap();
        ids.push(eos);
        let mut lp = 0.0;
        for k in 0..ids.len() {
            let prefix = (k > 0).then(|| tok.decode(&ids[..k]).unwrap().trim_start().to_string());
            let logits = engine.first_step_logits(&picture, q, prefix.as_deref()).unwrap();
            lp += log_softmax_at(&logits, ids[k]);
        }
        want.push((lp, ids.len()));
    }
    let best =
        (0..opts.len())
            .fold(0, |b, i| if -want[i].0 / (want[i].1 as f64) < -want[b].0 / (want[b].1 as f64) { i } else { b });
    for fused in [false, true] {
        let (_tmp, dir) = common::exported_variant(case, fused);
        let got = ok(
            run()
                .args([
                    "--model",
                    dir.to_str().unwrap(),
                    "--image",
                    img.to_str().unwrap(),
                    "--ask",
                    q,
                    "--choices",
                    &opts.join("|"),
                    "--json",
                ])
                .output()
                .unwrap(),
            "choices",
        );
        for (i, opt) in opts.iter().enumerate() {
            let c = &got["choices"][i];
            let lp = c["log_prob"].as_f64().unwrap();
            println!("fused {fused}: {opt:<12} log-prob {lp:.5} (candle {:.5}), {} tokens", want[i].0, c["tokens"]);
            assert_eq!(c["option"], *opt);
            assert_eq!(c["tokens"].as_u64().unwrap() as usize, want[i].1);
            assert!((lp - want[i].0).abs() < 1e-3, "fused {fused}, {opt}: {lp} vs candle {}", want[i].0);
        }
        assert_eq!(got["answer"], opts[best], "the lowest-loss option is the answer");
    }
    let (_tmp, dir) = exported(case);
    let one = run()
        .args(["--model", dir.to_str().unwrap(), "--image", img.to_str().unwrap(), "--ask", q, "--choices", "good"])
        .output()
        .unwrap();
    assert!(!one.status.success() && String::from_utf8_lossy(&one.stderr).contains("at least two options"));
}

fn lines(p: &Path) -> Vec<Value> {
    std::fs::read_to_string(p).unwrap().lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

/// Batched rows equal one-image runs; a corrupt image is an error row; a second run resumes.
#[test]
fn batch_equals_single_runs_skips_bad_images_and_resumes() {
    let case = "qadapt_f32_sharded";
    let (tmp, dir) = exported(case);
    let m = dir.to_str().unwrap();
    let imgs_dir = tmp.path().join("imgs");
    let imgs = images(&imgs_dir, 7);
    std::fs::write(imgs_dir.join("img03.png"), b"\x89PNG\r\n\x1a\n broken").unwrap();
    let q = "Is the image blurry?";
    let single = |p: &Path| {
        ok(
            run()
                .args(["--model", m, "--image", p.to_str().unwrap(), "--ask", q, "--json", "--max-new-tokens", "10"])
                .output()
                .unwrap(),
            "single",
        )
    };
    let out = tmp.path().join("r.jsonl");
    let args = |out: &Path| -> Vec<String> {
        [
            "batch",
            "--model",
            m,
            "--images",
            imgs_dir.to_str().unwrap(),
            "--ask",
            q,
            "--max-new-tokens",
            "10",
            "--batch-size",
            "3",
            "--out",
            out.to_str().unwrap(),
        ]
        .map(String::from)
        .to_vec()
    };
    let o = run().args(args(&out)).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("7 images: 6 answered, 1 failed, 0 already"), "{err}");
    let rows = lines(&out);
    assert_eq!(rows.len(), 7);
    for (i, p) in imgs.iter().enumerate() {
        let row = rows
            .iter()
            .find(|r| r["image"] == p.display().to_string())
            .unwrap_or_else(|| panic!("no row for {}", p.display()));
        if i == 3 {
            assert!(row["error"].as_str().unwrap().contains("img03.png"), "{row}");
            continue;
        }
        assert_eq!(row["token_ids"], single(p)["token_ids"], "row {i} differs from a one-image run");
    }
    // Resume: keep two finished rows and a line cut short by a kill.
    let text = std::fs::read_to_string(&out).unwrap();
    let keep: Vec<&str> = text.lines().take(2).collect();
    std::fs::write(&out, format!("{}\n{{\"image\": \"cut", keep.join("\n"))).unwrap();
    let o = run().args(args(&out)).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("7 images: 4 answered, 1 failed, 2 already"), "{err}");
    let again = lines(&out);
    assert_eq!(again.len(), 7, "every image exactly once after the resume");
    let mut names: Vec<String> = again.iter().map(|r| r["image"].as_str().unwrap().to_string()).collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), 7);
    // Scores in batches equal one-image scores.
    let list = tmp.path().join("list.jsonl");
    std::fs::write(
        &list,
        imgs.iter()
            .filter(|p| !p.ends_with("img03.png"))
            .map(|p| format!("{{\"image\": \"{}\"}}\n", p.display()))
            .collect::<String>(),
    )
    .unwrap();
    let sout = tmp.path().join("s.jsonl");
    let o = run()
        .args([
            "batch",
            "--model",
            m,
            "--images",
            list.to_str().unwrap(),
            "--score",
            "--batch-size",
            "4",
            "--out",
            sout.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for row in lines(&sout) {
        let p = row["image"].as_str().unwrap();
        let one = ok(run().args(["--model", m, "--image", p, "--score", "--json"]).output().unwrap(), "score");
        let (a, b) = (row["score"].as_f64().unwrap(), one["score"].as_f64().unwrap());
        assert!((a - b).abs() < 1e-5, "{p}: batch {a} vs single {b}");
    }
    // Rows with their own questions (different lengths) share batches, left-padded: each row still
    // equals a one-image run with its question.
    let long = "very ".repeat(600);
    let questions =
        ["Is it blurry?", "Describe the quality of this photo in a few words, please.", "Noise?", long.as_str()];
    let mixed = tmp.path().join("mixed.jsonl");
    let good: Vec<&std::path::PathBuf> = imgs.iter().filter(|p| !p.ends_with("img03.png")).collect();
    // Row 3 asks a question too long for the model: it fails alone, its batch-mates are answered.
    std::fs::write(
        &mixed,
        good.iter()
            .enumerate()
            .map(|(i, p)| {
                format!("{}\n", serde_json::json!({"image": p, "question": questions[if i == 3 { 3 } else { i % 3 }]}))
            })
            .collect::<String>(),
    )
    .unwrap();
    let mout = tmp.path().join("m.jsonl");
    let o = run()
        .args([
            "batch",
            "--model",
            m,
            "--images",
            mixed.to_str().unwrap(),
            "--ask",
            "unused",
            "--max-new-tokens",
            "10",
            "--batch-size",
            "4",
            "--out",
            mout.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rows = lines(&mout);
    assert_eq!(rows.len(), good.len());
    let too_long: Vec<&Value> = rows.iter().filter(|r| r.get("error").is_some()).collect();
    assert_eq!(too_long.len(), 1, "{rows:?}");
    assert!(too_long[0]["error"].as_str().unwrap().contains("max_positions"), "{}", too_long[0]);
    for row in rows.iter().filter(|r| r.get("error").is_none()) {
        let (p, q) = (row["image"].as_str().unwrap(), row["question"].as_str().unwrap());
        let one = ok(
            run().args(["--model", m, "--image", p, "--ask", q, "--json", "--max-new-tokens", "10"]).output().unwrap(),
            "single",
        );
        assert_eq!(row["token_ids"], one["token_ids"], "{p} / {q}: mixed batch differs from a one-image run");
    }
    println!("mixed-question batches: {} rows equal one-image runs, 1 too-long question failed alone", rows.len() - 1);
    let bad = run()
        .args([
            "batch",
            "--model",
            m,
            "--images",
            "/nonexistent/list.jsonl",
            "--score",
            "--out",
            sout.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("/nonexistent/list.jsonl"));
}

/// Q-Bench accuracy (both ways of choosing) and IQA correlations equal what per-image runs give.
#[test]
fn eval_qbench_and_iqa_agree_with_per_image_runs() {
    let case = "qadapt_f32_sharded";
    let (tmp, dir) = exported(case);
    let m = dir.to_str().unwrap();
    let imgs_dir = tmp.path().join("imgs");
    let imgs = images(&imgs_dir, 8);
    let cands = ["good", "bad", "fair"].map(String::from).to_vec();
    let question = "How is the quality?";
    let prompt = runtime::eval::qbench_prompt(question, &cands);
    // Likelihood: the per-image choice of `--choices "A.|B.|C."`; rows alternate right and wrong.
    let mut rows = Vec::new();
    let (mut want_lik, mut want_gen) = (0, 0);
    for (i, p) in imgs.iter().enumerate() {
        let c = ok(
            run()
                .args([
                    "--model",
                    m,
                    "--image",
                    p.to_str().unwrap(),
                    "--ask",
                    &prompt,
                    "--choices",
                    "A.|B.|C.",
                    "--json",
                ])
                .output()
                .unwrap(),
            "choices",
        );
        let picked = ["A.", "B.", "C."].iter().position(|l| c["answer"] == *l).unwrap();
        let correct = if i % 2 == 0 { picked } else { (picked + 1) % 3 };
        want_lik += usize::from(i % 2 == 0);
        let g = ok(
            run()
                .args([
                    "--model",
                    m,
                    "--image",
                    p.to_str().unwrap(),
                    "--ask",
                    &prompt,
                    "--json",
                    "--max-new-tokens",
                    "16",
                ])
                .output()
                .unwrap(),
            "ask",
        );
        want_gen += usize::from(runtime::eval::parse_choice(g["answer"].as_str().unwrap(), &cands) == Some(correct));
        rows.push(serde_json::json!({"img_path": p.file_name().unwrap().to_str().unwrap(), "question": question, "candidates": cands, "correct_ans": cands[correct], "type": i % 3, "concern": i % 2}));
    }
    rows.push(serde_json::json!({"img_path": "missing.png", "question": question, "candidates": cands, "correct_ans": "good", "type": 0, "concern": 0}));
    let a1 = tmp.path().join("a1.json");
    std::fs::write(&a1, serde_json::to_string(&rows).unwrap()).unwrap();
    let eval = |by: &str| {
        ok(
            run()
                .args([
                    "eval",
                    "--model",
                    m,
                    "--qbench",
                    a1.to_str().unwrap(),
                    "--images",
                    imgs_dir.to_str().unwrap(),
                    "--by",
                    by,
                    "--json",
                ])
                .output()
                .unwrap(),
            by,
        )[0]
        .clone()
    };
    let lik = eval("likelihood");
    println!("likelihood: {}", lik["overall"]);
    assert_eq!(lik["overall"]["total"], 8);
    assert_eq!(lik["overall"]["correct"].as_u64().unwrap() as usize, want_lik);
    assert_eq!(lik["failed"].as_array().unwrap().len(), 1);
    let by_type_total: u64 = lik["by_type"].as_object().unwrap().values().map(|t| t["total"].as_u64().unwrap()).sum();
    assert_eq!(by_type_total, 8);
    assert_eq!(lik["by_type"]["yes-or-no"]["total"], 3);
    assert_eq!(lik["by_concern"]["other"]["total"], 4);
    let gen = eval("generate");
    println!("generate: {}", gen["overall"]);
    assert_eq!(gen["overall"]["correct"].as_u64().unwrap() as usize, want_gen);
    // Batched generation (mixed prompts, 3 rows a batch): each row's answer is the one-image answer.
    let preds = tmp.path().join("preds.jsonl");
    let o = run()
        .args([
            "eval",
            "--model",
            m,
            "--qbench",
            a1.to_str().unwrap(),
            "--images",
            imgs_dir.to_str().unwrap(),
            "--batch-size",
            "3",
            "--by",
            "generate",
            "--out",
            preds.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let answers = lines(&preds);
    assert_eq!(answers.len(), 8);
    for (a, p) in answers.iter().zip(&imgs) {
        assert_eq!(a["img_path"], p.file_name().unwrap().to_str().unwrap());
        let one = ok(
            run()
                .args([
                    "--model",
                    m,
                    "--image",
                    p.to_str().unwrap(),
                    "--ask",
                    &prompt,
                    "--json",
                    "--max-new-tokens",
                    "16",
                ])
                .output()
                .unwrap(),
            "ask",
        );
        assert_eq!(a["answer"], one["answer"], "{}: batched Q-Bench answer differs from a one-image run", p.display());
    }

    // IQA: SROCC / PLCC of the batched scores equal those of per-image `--score` runs.
    let mos = [4.1, 1.2, 3.3, 2.8, 4.9, 1.9, 3.0, 2.2];
    let mut csv = String::from("image,mos,split\n");
    let (mut pred, mut labels) = (Vec::new(), Vec::new());
    for (p, m_) in imgs.iter().zip(mos) {
        csv += &format!("{},{m_},test\n", p.file_name().unwrap().to_str().unwrap());
        pred.push(
            ok(
                run().args(["--model", m, "--image", p.to_str().unwrap(), "--score", "--json"]).output().unwrap(),
                "score",
            )["score"]
                .as_f64()
                .unwrap(),
        );
        labels.push(m_);
    }
    csv += "missing.png,3.0,test\nimg00.png,3.0,train\n";
    let lab = tmp.path().join("labels.csv");
    std::fs::write(&lab, csv).unwrap();
    let png = tmp.path().join("scatter.png");
    let rep = ok(
        run()
            .args([
                "eval",
                "--model",
                m,
                "--iqa",
                lab.to_str().unwrap(),
                "--images",
                imgs_dir.to_str().unwrap(),
                "--split",
                "test",
                "--batch-size",
                "3",
                "--plot",
                png.to_str().unwrap(),
                "--json",
            ])
            .output()
            .unwrap(),
        "iqa",
    );
    let (s, p) = (qadapt_core::metrics::spearman(&pred, &labels), qadapt_core::metrics::pearson(&pred, &labels));
    println!("iqa: SROCC {} (per-image {s:.6}), PLCC {} (per-image {p:.6})", rep["srocc"], rep["plcc"]);
    assert_eq!(rep["scored"], 8);
    assert_eq!(rep["failed"].as_array().unwrap().len(), 1);
    assert!((rep["srocc"].as_f64().unwrap() - s).abs() < 1e-9 && (rep["plcc"].as_f64().unwrap() - p).abs() < 1e-4);
    let plot = image::open(&png).unwrap();
    assert_eq!((plot.width(), plot.height()), (640, 560));
    let bad = run()
        .args(["eval", "--model", m, "--qbench", lab.to_str().unwrap(), "--images", imgs_dir.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("labels.csv"));
}

/// The two evaluators follow one Q-Bench protocol (`qadapt_core::qbench`): the candle engine's
/// (`qadapt-train eval --qbench`) and `qadapt-run eval --qbench` on the export of the same model
/// give the same answers, the same choices and the same accuracies, by generation and by likelihood.
#[test]
fn candle_and_onnx_qbench_evals_agree() {
    let case = "qadapt_f32_sharded";
    let (tmp, dir) = exported(case);
    let fx = fixtures().join(case);
    let imgs_dir = tmp.path().join("imgs");
    let imgs = images(&imgs_dir, 8);
    let engine =
        models::Engine::load(&fx.join("model"), None, &candle_core::Device::Cpu, candle_core::DType::F32).unwrap();
    let yes_no = ["Yes", "No"].map(String::from).to_vec();
    let what = ["blur", "noise", "over-exposure", "none"].map(String::from).to_vec();
    let mut rows: Vec<qadapt_core::qbench::QBenchRow> = imgs
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let (question, candidates) = if i % 2 == 0 {
                ("Is this image blurry?", yes_no.clone())
            } else {
                ("Which distortion is most visible?", what.clone())
            };
            qadapt_core::qbench::QBenchRow {
                img_path: p.file_name().unwrap().to_str().unwrap().into(),
                question: question.into(),
                correct_ans: candidates[0].clone(),
                candidates,
                kind: Some((i % 3).into()),
                concern: Some(0.into()),
            }
        })
        .collect();
    // Right answers: the candle likelihood choice on even rows, another option on odd ones, so that
    // the accuracies are neither 0 nor 1.
    let first = engine.qbench(&rows, &imgs_dir, &mut || {}).unwrap();
    for (i, (row, a)) in rows.iter_mut().zip(&first[1].answers).enumerate() {
        let picked = row.candidates.iter().position(|c| Some(c) == a.choice.as_ref()).unwrap();
        row.correct_ans = row.candidates[if i % 4 < 2 { picked } else { (picked + 1) % row.candidates.len() }].clone();
    }
    let candle = engine.qbench(&rows, &imgs_dir, &mut || {}).unwrap();
    let a1 = tmp.path().join("a1.json");
    std::fs::write(&a1, serde_json::to_string(&rows).unwrap()).unwrap();
    let out = tmp.path().join("answers.jsonl");
    let onnx = ok(
        run()
            .args(["eval", "--model", dir.to_str().unwrap(), "--qbench", a1.to_str().unwrap()])
            .args(["--images", imgs_dir.to_str().unwrap(), "--json", "--out", out.to_str().unwrap()])
            .output()
            .unwrap(),
        "eval",
    );
    let answers = lines(&out);
    assert_eq!(answers.len(), 16, "a line per row and way of choosing");
    for (k, rep) in candle.iter().enumerate() {
        let o = &onnx[k];
        assert_eq!(o["by"], rep.by.name());
        println!(
            "{}: candle {}/{} (unmatched {}), onnx {}/{} (unmatched {}), chance {:.3}",
            rep.by.name(),
            rep.overall.correct,
            rep.overall.total,
            rep.overall.unmatched,
            o["overall"]["correct"],
            o["overall"]["total"],
            o["overall"]["unmatched"],
            rep.overall.chance
        );
        assert_eq!(o["overall"]["total"], 8);
        assert!((o["overall"]["chance"].as_f64().unwrap() - rep.overall.chance).abs() < 1e-12);
        let same = rep
            .answers
            .iter()
            .zip(answers.iter().filter(|a| a["by"] == rep.by.name()))
            .filter(|(c, a)| a["answer"] == c.answer.as_str() && a["choice"] == serde_json::json!(c.choice))
            .count();
        // f32 on both sides: the same greedy text and choices, up to a near-tie flipping one row.
        assert!(same >= 7, "{}: only {same}/8 rows answered alike", rep.by.name());
        let diff = (o["overall"]["correct"].as_i64().unwrap() - rep.overall.correct as i64).abs();
        assert!(diff <= 1, "{}: accuracies differ by {diff} rows", rep.by.name());
    }
    // Likelihood on candle: right on the rows built right, wrong on the others.
    assert_eq!(candle[1].overall.correct, 4);
}
