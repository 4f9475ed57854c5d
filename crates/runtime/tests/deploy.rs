//! The fleet files ask `qadapt-run` only for what it has: every flag the Kubernetes Deployment and the
//! Containerfile pass to `serve` is one `qadapt-run serve` accepts, and the ConfigMap's execution
//! provider is one it knows. (Schemas and consistency of the manifests: tools/check_deploy.py in CI.)

mod common;

use std::path::PathBuf;

fn deploy() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../deploy")
}

/// `--flag` names in `text` (`--max-queue=$(X)`, `"--model"`).
fn flags(text: &str) -> Vec<String> {
    let mut out: Vec<String> = text
        .split(|c: char| c.is_whitespace() || c == '"' || c == ',' || c == '[' || c == ']')
        .filter_map(|w| w.strip_prefix("--"))
        .map(|w| w.split('=').next().unwrap_or(w).to_string())
        .filter(|w| !w.is_empty())
        .collect();
    out.sort();
    out.dedup();
    out
}

#[test]
fn manifests_pass_only_flags_serve_accepts() {
    let help = common::run().args(["serve", "--help"]).output().unwrap();
    assert!(help.status.success());
    let help = String::from_utf8_lossy(&help.stdout).to_string();
    let dep = std::fs::read_to_string(deploy().join("k8s/deployment.yaml")).unwrap();
    // The container's arguments: the `- --…` lines of the Deployment, the CMD of the Containerfile.
    let args: String = dep.lines().filter(|l| l.trim_start().starts_with("- --")).collect::<Vec<_>>().join("\n");
    let cmd: String = std::fs::read_to_string(deploy().join("Containerfile"))
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("CMD "))
        .collect();
    let asked = [flags(&args), flags(&cmd)].concat();
    assert!(asked.len() >= 8, "flags found: {asked:?}");
    for f in &asked {
        assert!(help.contains(&format!("--{f} ")) || help.contains(&format!("--{f}\n")), "serve has no --{f}:\n{help}");
    }
    let cm = std::fs::read_to_string(deploy().join("k8s/configmap.yaml")).unwrap();
    let ep = cm.lines().find_map(|l| l.trim().strip_prefix("QADAPT_EP:")).unwrap().trim().trim_matches('"');
    assert!(ep.parse::<runtime::Ep>().is_ok(), "QADAPT_EP {ep:?} is not an execution provider");
}
