//! The recipes `ablate` compares: the built-in ones (the paper's Tables 8 and 9), custom ones read
//! from JSON, and how `--recipes` names them.

use std::path::Path;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

use crate::data::Task;
use crate::train::Modules;

/// One stage of a recipe.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StagePlan {
    /// The data it trains on.
    pub task: Task,
    /// What it trains.
    pub modules: Modules,
    /// Its part of the recipe's step budget, relative to the other stages'.
    pub share: f64,
}

/// A named plan of stages, with the paper's Q-bench-A1 (dev) accuracy where it reports one.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Recipe {
    pub name: String,
    pub about: String,
    pub stages: Vec<StagePlan>,
    /// Q-bench-A1 dev accuracy (%) of Bunny-3B on Q-Instruct, from Table 8 or 9.
    pub paper: Option<f64>,
}

impl Recipe {
    /// The stages in one line: `explanation: vision-lora+llm-lora+connector → all: prompt+connector`.
    pub fn describe(&self) -> String {
        let stage = |s: &StagePlan| format!("{}: {}", s.task.name(), s.modules.names().join("+"));
        self.stages.iter().map(stage).collect::<Vec<_>>().join(" → ")
    }
}

const VLC: Modules = Modules { vision_lora: true, llm_lora: true, connector: true, prompt: false };
const PC: Modules = Modules { vision_lora: false, llm_lora: false, connector: true, prompt: true };

fn recipe(name: &str, about: &str, stages: &[(Task, Modules)], paper: f64) -> Recipe {
    Recipe {
        name: name.into(),
        about: about.into(),
        stages: stages.iter().map(|&(task, modules)| StagePlan { task, modules, share: 1.0 }).collect(),
        paper: Some(paper),
    }
}

/// The built-in recipes: the three of Table 9, then the rows of Table 8 (Q-Instruct) that differ
/// from them. Table 8's stage-2 rows all start from its first stage-1 row.
pub fn builtin() -> Vec<Recipe> {
    use Task::{All, Answering, Explanation};
    let s1 = (Explanation, VLC);
    let m = |v, l, c, p| Modules { vision_lora: v, llm_lora: l, connector: c, prompt: p };
    vec![
        recipe("joint", "one LoRA stage on both tasks (Table 9; Table 8 row 3)", &[(All, VLC)], 69.57),
        recipe(
            "two-stage",
            "explanation with the connector only, then both tasks with connector + LLM LoRA (Table 9)",
            &[(Explanation, m(false, false, true, false)), (All, m(false, true, true, false))],
            68.28,
        ),
        recipe(
            "progressive",
            "Q-Adapt: stage 1 LoRA on explanation, stage 2 prompt module on both",
            &[s1, (All, PC)],
            77.19,
        ),
        recipe("t8-s1-explanation", "stage 1 alone, explanation (Table 8 row 1)", &[s1], 73.51),
        recipe("t8-s1-perception", "stage 1 alone, answering (Table 8 row 2)", &[(Answering, VLC)], 67.96),
        recipe(
            "t8-s1-prompt",
            "stage 1 alone, both tasks, prompt module too (Table 8 row 4)",
            &[(All, m(true, true, true, true))],
            71.30,
        ),
        recipe("t8-s2-explanation", "stage 2 on explanation only (Table 8 row 6)", &[s1, (Explanation, PC)], 70.10),
        recipe("t8-s2-perception", "stage 2 on answering only (Table 8 row 7)", &[s1, (Answering, PC)], 75.59),
        recipe(
            "t8-s2-no-connector",
            "stage 2 without the connector (Table 8 row 8)",
            &[s1, (All, m(false, false, false, true))],
            74.85,
        ),
        recipe(
            "t8-s2-llm-lora",
            "stage 2 with LLM LoRA too (Table 8 row 9)",
            &[s1, (All, m(false, true, true, true))],
            74.45,
        ),
    ]
}

/// Names that mean another recipe: Table 8's third row is joint tuning.
const ALIASES: [(&str, &str); 2] = [("t8-s1-both", "joint"), ("t8-s2-both", "progressive")];

/// Groups `--recipes` accepts besides single names.
const GROUPS: [(&str, &[&str]); 3] = [
    ("main", &["joint", "two-stage", "progressive"]),
    (
        "table8",
        &[
            "t8-s1-explanation",
            "t8-s1-perception",
            "t8-s1-prompt",
            "progressive",
            "t8-s2-explanation",
            "t8-s2-perception",
            "t8-s2-no-connector",
            "t8-s2-llm-lora",
        ],
    ),
    ("all", &[]),
];

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StageFile {
    task: String,
    train: Vec<String>,
    #[serde(default = "one")]
    share: f64,
}

fn one() -> f64 {
    1.0
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RecipeFile {
    name: String,
    #[serde(default)]
    about: String,
    stages: Vec<StageFile>,
    #[serde(default)]
    paper: Option<f64>,
}

/// Reads custom recipes: one JSON object or a list of them,
/// `{"name", "about"?, "stages": [{"task", "train": [modules], "share"?}], "paper"?}`.
pub fn read_recipes(path: &Path) -> anyhow::Result<Vec<Recipe>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading --recipe-file {}", path.display()))?;
    // A list or one object, told by the first character, so that an error names the field at fault
    // (`[1].stages[0].train`) rather than failing both shapes at once.
    let list = bytes.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[');
    let files = if list {
        qadapt_core::from_json::<Vec<RecipeFile>>(&bytes)
    } else {
        qadapt_core::from_json::<RecipeFile>(&bytes).map(|r| vec![r])
    }
    .map_err(|(_, msg)| anyhow::anyhow!("{}: not a recipe or a list of recipes: {msg}", path.display()))?;
    files
        .into_iter()
        .map(|f| {
            let bad = |m: String| anyhow::anyhow!("{}: recipe {:?}: {m}", path.display(), f.name);
            anyhow::ensure!(!f.name.is_empty() && !f.name.contains('/'), bad("a name without '/' is required".into()));
            anyhow::ensure!(!f.stages.is_empty(), bad("no stages".into()));
            let stages = f
                .stages
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    let task = s.task.parse::<Task>().map_err(|e| bad(format!("stage {}: {e}", i + 1)))?;
                    let modules = Modules::parse(&s.train).map_err(|e| bad(format!("stage {}: {e}", i + 1)))?;
                    anyhow::ensure!(
                        s.share.is_finite() && s.share > 0.0,
                        bad(format!("stage {}: share must be > 0", i + 1))
                    );
                    Ok(StagePlan { task, modules, share: s.share })
                })
                .collect::<anyhow::Result<_>>()?;
            Ok(Recipe { name: f.name.clone(), about: f.about.clone(), stages, paper: f.paper })
        })
        .collect()
}

/// The recipes `--recipes` names (single names, aliases, `main`, `table8`, `all`), custom ones
/// included, each once in the order named.
pub fn select(names: &[String], custom: &[Recipe]) -> anyhow::Result<Vec<Recipe>> {
    let mut known = builtin();
    known.extend(custom.iter().cloned());
    let mut out: Vec<Recipe> = Vec::new();
    let mut push = |r: &Recipe| {
        if !out.iter().any(|o| o.name == r.name) {
            out.push(r.clone());
        }
    };
    for n in names {
        let n = ALIASES.iter().find(|(a, _)| a == n).map_or(n.as_str(), |(_, to)| to);
        if n == "all" {
            known.iter().for_each(&mut push);
        } else if let Some((_, members)) = GROUPS.iter().find(|(g, _)| *g == n) {
            members.iter().filter_map(|m| known.iter().find(|r| r.name == *m)).for_each(&mut push);
        } else if let Some(r) = known.iter().find(|r| r.name == n) {
            push(r);
        } else {
            let names: Vec<&str> = known.iter().map(|r| r.name.as_str()).collect();
            bail!("unknown recipe {n:?}; known: {}, groups main, table8, all", names.join(", "));
        }
    }
    anyhow::ensure!(!out.is_empty(), "--recipes names no recipe");
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recipes_resolve_by_name_group_and_alias() {
        let names = |v: &[&str]| -> Vec<String> {
            select(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>(), &[])
                .unwrap()
                .into_iter()
                .map(|r| r.name)
                .collect()
        };
        assert_eq!(names(&["main"]), ["joint", "two-stage", "progressive"]);
        assert_eq!(names(&["t8-s1-both", "joint"]), ["joint"]);
        assert_eq!(names(&["all"]).len(), builtin().len());
        assert_eq!(names(&["table8"]).len(), 8);
        let err = select(&["jiont".to_string()], &[]).unwrap_err().to_string();
        assert!(err.contains("unknown recipe \"jiont\"") && err.contains("progressive"), "{err}");
        let p = builtin().into_iter().find(|r| r.name == "progressive").unwrap();
        assert_eq!(p.describe(), "explanation: vision-lora+llm-lora+connector → all: connector+prompt");
    }

    #[test]
    fn custom_recipes_are_checked() {
        let dir = std::env::temp_dir().join(format!("qadapt-recipes-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("r.json");
        std::fs::write(
            &p,
            r#"{"name": "mine", "stages": [{"task": "all", "train": ["connector", "prompt"], "share": 2}]}"#,
        )
        .unwrap();
        let r = read_recipes(&p).unwrap();
        assert_eq!(r[0].stages[0].share, 2.0);
        assert!(r[0].stages[0].modules.prompt && !r[0].stages[0].modules.lora());
        std::fs::write(&p, r#"[{"name": "x", "stages": [{"task": "some", "train": ["connector"]}]}]"#).unwrap();
        assert!(read_recipes(&p).unwrap_err().to_string().contains("unknown task \"some\""));
        std::fs::write(&p, r#"{"name": "x", "stages": [{"task": "all", "train": ["gpu"]}]}"#).unwrap();
        assert!(read_recipes(&p).unwrap_err().to_string().contains("unknown module \"gpu\""));
        std::fs::write(&p, r#"{"name": "x", "stages": [{"task": "all", "train": "connector"}]}"#).unwrap();
        assert!(read_recipes(&p).unwrap_err().to_string().contains("stages[0].train"));
        std::fs::write(&p, r#"[{"name": "x", "stages": [{"task": "all", "train": "connector"}]}]"#).unwrap();
        assert!(read_recipes(&p).unwrap_err().to_string().contains("[0].stages[0].train"));
        std::fs::remove_dir_all(&dir).ok();
    }
}
