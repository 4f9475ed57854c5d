//! `qadapt-train ablate` end to end on a tiny plan: three recipes × two seeds on a small synthetic
//! set, then Table 8's rows once, with the results checked in the JSON, the run directories, a rerun that skips, a resumed
//! run, and the errors a user meets first.

mod common;

use std::path::Path;

use common::{bin, ok, s};
use serde_json::Value;

fn ablate(data: &Path, base: &Path, out: &Path, test: &str, recipes: &str, seeds: &str) -> std::process::Output {
    bin()
        .args(["ablate", "--model", s(base), "--data", s(&data.join("train.json")), "--images", s(data)])
        .args(["--test", s(&data.join(test)), "--labels", s(&data.join("labels.csv")), "--out", s(out)])
        .args(["--recipes", recipes, "--seeds", seeds, "--max-steps", "4", "--batch-size", "2"])
        .args(["--lora-r", "4", "--lora-alpha", "8", "--lr", "1e-3", "--eval-limit", "12", "--max-length", "256"])
        .output()
        .unwrap()
}

fn rows(out: &Path) -> Vec<Value> {
    serde_json::from_str(&std::fs::read_to_string(out.join("ablation.json")).unwrap()).unwrap()
}

fn model_type(dir: &Path) -> String {
    let c: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    c["model_type"].as_str().unwrap().to_string()
}

#[test]
fn a_tiny_plan_runs_resumes_and_reports() {
    let tmp = tempfile::tempdir().unwrap();
    let (data, base) = common::synth_and_init(tmp.path(), 30);
    let out = tmp.path().join("ablation");

    let o = ok(ablate(&data, &base, &out, "test.json", "main", "1,2"), "ablate");
    let table = String::from_utf8_lossy(&o.stdout).to_string();
    println!("{table}");
    let got = rows(&out);
    assert_eq!(got.len(), 6, "3 recipes × 2 seeds");
    for (i, r) in got.iter().enumerate() {
        assert_eq!(r["recipe"], ["joint", "two-stage", "progressive"][i / 2]);
        assert_eq!(r["seed"], [1, 2][i % 2]);
        assert_eq!(r["steps"], 4, "equal budgets");
        let acc = r["accuracy"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&acc), "{r}");
        let types: Vec<&str> = r["accuracy_by_type"].as_object().unwrap().keys().map(String::as_str).collect();
        assert!(
            !types.is_empty() && types.iter().all(|t| ["yes/no", "what/how", "multiple-choice"].contains(t)),
            "{r}"
        );
        assert!(r["chance"].as_f64().unwrap() > 0.0 && r["srocc"].is_f64() && r["plcc"].is_f64(), "{r}");
        assert!(r["train_seconds"].as_f64().unwrap() > 0.0);
    }
    // Every recipe has a row in the table, with an interval over its two seeds and the paper's figure.
    for (name, paper) in [("joint", "69.57"), ("two-stage", "68.28"), ("progressive", "77.19")] {
        let line =
            table.lines().find(|l| l.starts_with(&format!("| {name} |"))).unwrap_or_else(|| panic!("{name}: {table}"));
        assert!(line.contains(" ± ") && line.contains(paper), "{line}");
    }
    assert!(image::open(out.join("ablation.png")).is_ok());

    // Stages as the recipes define them: two-stage's first stage trains the connector alone,
    // progressive's second the prompt module (its model is Q-Adapt), joint never (plain Bunny).
    let run = |recipe: &str, seed: u64| out.join(recipe).join(format!("seed-{seed}"));
    let final_of = |stage: &Path| stage.join("final");
    assert!(!final_of(&run("two-stage", 1).join("stage-1")).join("adapter_model.safetensors").exists());
    assert!(final_of(&run("two-stage", 1).join("stage-2")).join("adapter_model.safetensors").exists());
    assert_eq!(model_type(&run("joint", 1).join("model-1")), "bunny-phi");
    assert_eq!(model_type(&run("two-stage", 1).join("model-2")), "bunny-phi");
    assert_eq!(model_type(&run("progressive", 1).join("model-2")), "bunny-qformer-phi_v3_bib");
    for recipe in ["joint", "two-stage", "progressive"] {
        let stages = if recipe == "joint" { vec![4] } else { vec![2, 2] };
        for (i, n) in stages.iter().enumerate() {
            let summary: Value = serde_json::from_str(
                &std::fs::read_to_string(run(recipe, 1).join(format!("stage-{}", i + 1)).join("summary.json")).unwrap(),
            )
            .unwrap();
            assert_eq!(summary["steps"], *n, "{recipe} stage {}: the budget split evenly", i + 1);
        }
    }

    // A rerun skips finished runs: the same rows, no training.
    let t = std::time::Instant::now();
    ok(ablate(&data, &base, &out, "test.json", "main", "1,2"), "rerun");
    assert_eq!(rows(&out), got);
    println!("rerun: {:.1} s", t.elapsed().as_secs_f64());

    // An interrupted run (its last stage half done, nothing evaluated) resumes to the same result.
    let p2 = run("progressive", 2);
    std::fs::remove_file(p2.join("result.json")).unwrap();
    std::fs::remove_dir_all(p2.join("model-2")).unwrap();
    let stage2 = p2.join("stage-2");
    for f in ["summary.json", "final"] {
        let p = stage2.join(f);
        if p.is_dir() {
            std::fs::remove_dir_all(p).unwrap();
        } else {
            std::fs::remove_file(p).unwrap();
        }
    }
    std::fs::remove_dir_all(stage2.join("checkpoint-2")).unwrap();
    assert!(stage2.join("checkpoint-1").is_dir(), "a checkpoint to resume from");
    ok(ablate(&data, &base, &out, "test.json", "main", "1,2"), "resume");
    let again = rows(&out);
    assert_eq!(again[5]["accuracy"], got[5]["accuracy"], "resumed run: {} vs {}", again[5], got[5]);
    assert_eq!(again[5]["srocc"], got[5]["srocc"]);

    // A Q-Bench test set is asked by generation and by likelihood.
    let qb = tmp.path().join("qbench-run");
    ok(ablate(&data, &base, &qb, "qbench.json", "joint", "1"), "ablate on Q-Bench rows");
    let r = &rows(&qb)[0];
    assert!(r["accuracy_likelihood"].is_f64(), "{r}");
    assert!(r["accuracy_by_type"].as_object().unwrap().contains_key("yes-or-no"), "{r}");

    // Every Table 8 row runs, each stage training what its recipe says.
    let t8 = tmp.path().join("table8");
    ok(ablate(&data, &base, &t8, "test.json", "table8", "1"), "ablate table8");
    let names: Vec<String> = rows(&t8).iter().map(|r| r["recipe"].as_str().unwrap().to_string()).collect();
    assert_eq!(
        names,
        [
            "t8-s1-explanation",
            "t8-s1-perception",
            "t8-s1-prompt",
            "progressive",
            "t8-s2-explanation",
            "t8-s2-perception",
            "t8-s2-no-connector",
            "t8-s2-llm-lora"
        ]
    );
    let trained = |recipe: &str, stage: usize| -> Value {
        let p = t8.join(recipe).join("seed-1").join(format!("stage-{stage}")).join("train_config.json");
        serde_json::from_str::<Value>(&std::fs::read_to_string(p).unwrap()).unwrap()
    };
    assert_eq!(trained("t8-s1-perception", 1)["task"], "answering");
    assert_eq!(trained("t8-s2-no-connector", 2)["modules"]["connector"], false);
    assert_eq!(trained("t8-s2-llm-lora", 2)["modules"]["llm_lora"], true);
    assert_eq!(trained("t8-s1-prompt", 1)["modules"]["prompt"], true);
    assert_eq!(model_type(&t8.join("t8-s1-prompt/seed-1/model-1")), "bunny-qformer-phi_v3_bib");

    // Errors: an unknown recipe, and data without the task a recipe needs.
    let e = ablate(&data, &base, &tmp.path().join("e1"), "test.json", "progresive", "1");
    let err = String::from_utf8_lossy(&e.stderr);
    assert!(!e.status.success() && err.contains("unknown recipe \"progresive\""), "{err}");
    let train: Vec<Value> = serde_json::from_str(&std::fs::read_to_string(data.join("train.json")).unwrap()).unwrap();
    let answering: Vec<&Value> = train.iter().filter(|r| r["task"] == "answering").collect();
    let only = tmp.path().join("only-answering");
    std::fs::create_dir_all(&only).unwrap();
    std::fs::write(only.join("train.json"), serde_json::to_string(&answering).unwrap()).unwrap();
    let e = bin()
        .args(["ablate", "--model", s(&base), "--data", s(&only.join("train.json")), "--images", s(&data)])
        .args(["--test", s(&data.join("test.json")), "--out", s(&tmp.path().join("e2")), "--recipes", "progressive"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&e.stderr);
    assert!(!e.status.success() && err.contains("trains on the explanation task"), "{err}");
}
