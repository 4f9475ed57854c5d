//! `metrics.jsonl`: one line per optimizer step, appended as training goes (a kill loses at most
//! the line being written) and cut back to the checkpoint on resume.

use std::path::Path;

use anyhow::Context;
use serde::{Deserialize, Serialize};

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Metric {
    pub step: usize,
    pub epoch: f64,
    pub loss: f32,
    pub lr: f64,
    pub grad_norm: f64,
    pub samples_per_s: f64,
    /// Peak resident memory of the training process so far, in MB (Linux; absent elsewhere and in
    /// runs written before it was logged).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_rss_mb: Option<f64>,
}

/// Peak resident memory of this process so far (`VmHWM` of `/proc/self/status`), in MB; `None`
/// where the kernel does not report it.
pub fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb = status.lines().find_map(|l| l.strip_prefix("VmHWM:"))?.trim().trim_end_matches("kB").trim();
    Some(kb.parse::<f64>().ok()? / 1024.0)
}

/// Reads the metrics of `path` (none if it does not exist).
pub fn read(path: &Path) -> anyhow::Result<Vec<Metric>> {
    if !path.exists() {
        return Ok(Vec::new());
    }
    let text = std::fs::read_to_string(path)?;
    // A kill can leave a half-written last line: keep what parses.
    Ok(text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect())
}

/// Replaces `path` with `m`.
pub fn write(path: &Path, m: &[Metric]) -> anyhow::Result<()> {
    let mut s = String::new();
    for x in m {
        s.push_str(&serde_json::to_string(x)?);
        s.push('\n');
    }
    std::fs::write(path, s).with_context(|| format!("writing {}", path.display()))
}

/// Appends one line to `path`.
pub fn append(path: &Path, m: &Metric) -> anyhow::Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().append(true).create(true).open(path)?;
    writeln!(f, "{}", serde_json::to_string(m)?)?;
    Ok(())
}
