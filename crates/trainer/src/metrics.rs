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
    /// The step's longest micro-batch, image tokens included (samples are padded to it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq_len: Option<usize>,
    /// The most answer tokens (loss rows) in one of the step's micro-batches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_rows: Option<usize>,
}

/// Peak resident memory of this process so far (`VmHWM` of `/proc/self/status`), in MB; `None`
/// where the kernel does not report it.
pub fn peak_rss_mb() -> Option<f64> {
    status_mb("VmHWM:")
}

/// Resident memory of this process now (`VmRSS`), in MB; `None` where the kernel does not report it.
pub fn rss_mb() -> Option<f64> {
    status_mb("VmRSS:")
}

fn status_mb(field: &str) -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb = status.lines().find_map(|l| l.strip_prefix(field))?.trim().trim_end_matches("kB").trim();
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

/// Makes glibc's allocator keep freed memory for reuse: every block from its one heap (no `mmap` per
/// large block, one arena for all threads), and the heap never trimmed. A training step frees and
/// allocates the same tensor sizes again and again; with glibc's defaults each large tensor is a
/// fresh mapping whose pages the kernel faults in and zeroes on first touch, and freed heap tops go
/// back to the kernel: measured at the bench-small shapes (batch 8), 80 s of 205 s CPU time were
/// spent in the kernel, and the step took 21.7 s instead of 17.1 s. The peak RSS stays that of
/// the peak of live tensors (11.19 vs 11.32 GB). A no-op on other C libraries.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; it is called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// A global allocator that counts the bytes the process holds: the trainer binary installs it
/// (`#[global_allocator]`), so that the peak of live bytes can be told apart from the peak RSS (which
/// also holds what the C allocator keeps after a free).
pub struct CountingAlloc;

static LIVE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
static PEAK: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

impl CountingAlloc {
    fn grew(n: usize) {
        use std::sync::atomic::Ordering::Relaxed;
        let now = LIVE.fetch_add(n, Relaxed) + n;
        PEAK.fetch_max(now, Relaxed);
    }
}

// SAFETY: every call is forwarded unchanged to the system allocator; only counters are updated.
unsafe impl std::alloc::GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        let p = unsafe { std::alloc::System.alloc(layout) };
        if !p.is_null() {
            Self::grew(layout.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        let p = unsafe { std::alloc::System.alloc_zeroed(layout) };
        if !p.is_null() {
            Self::grew(layout.size());
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        unsafe { std::alloc::System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), std::sync::atomic::Ordering::Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { std::alloc::System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_sub(layout.size(), std::sync::atomic::Ordering::Relaxed);
            Self::grew(new_size);
        }
        p
    }
}

/// Peak of the bytes allocated through [`CountingAlloc`] and not yet freed, in MB; `None` when the
/// running binary does not install it.
pub fn peak_live_mb() -> Option<f64> {
    let p = PEAK.load(std::sync::atomic::Ordering::Relaxed);
    (p > 0).then(|| p as f64 / 1048576.0)
}

/// Bytes allocated through [`CountingAlloc`] and not yet freed, in MB (see [`peak_live_mb`]).
pub fn live_mb() -> Option<f64> {
    let p = LIVE.load(std::sync::atomic::Ordering::Relaxed);
    (p > 0).then(|| p as f64 / 1048576.0)
}
