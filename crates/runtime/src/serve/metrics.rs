//! The counters behind `GET /metrics` (Prometheus text format) and the inference thread's health.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

/// Counters of the server; every field is one Prometheus series.
#[derive(Default)]
pub(crate) struct Metrics {
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    /// Jobs queued for the inference thread (gauge).
    pub queued: AtomicU64,
    pub batches: AtomicU64,
    pub batched_jobs: AtomicU64,
    pub tokens: AtomicU64,
    pub busy_us: AtomicU64,
    /// Rows stopped because their client went away (streaming or not).
    pub cancelled: AtomicU64,
    /// Queued jobs dropped before they ran: their client had gone.
    pub dropped: AtomicU64,
    /// Rows and queued jobs ended by `--request-timeout` (answered 504).
    pub timeouts: AtomicU64,
    /// Requests admitted into a batch that was already decoding.
    pub joined: AtomicU64,
    /// Panics caught in the inference thread (their batch answered 500).
    pub panics: AtomicU64,
    /// Connections refused at the cap (answered 503 before reading the request).
    pub shed: AtomicU64,
    /// Connections open now (gauge).
    pub connections: AtomicU64,
}

impl Metrics {
    /// Counts one answered request by route and status.
    pub fn count(&self, route: &'static str, code: u16) {
        if let Ok(mut m) = self.requests.lock() {
            *m.entry((route, code)).or_default() += 1;
        }
    }

    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut s = String::from("# TYPE qadapt_requests_total counter\n");
        if let Ok(m) = self.requests.lock() {
            for ((p, c), n) in m.iter() {
                s += &format!("qadapt_requests_total{{path=\"{p}\",code=\"{c}\"}} {n}\n");
            }
        }
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let series: [(&str, &str, String); 12] = [
            ("qadapt_queue_depth", "gauge", get(&self.queued).to_string()),
            ("qadapt_open_connections", "gauge", get(&self.connections).to_string()),
            ("qadapt_batches_total", "counter", get(&self.batches).to_string()),
            ("qadapt_batched_jobs_total", "counter", get(&self.batched_jobs).to_string()),
            ("qadapt_generated_tokens_total", "counter", get(&self.tokens).to_string()),
            ("qadapt_inference_seconds_total", "counter", format!("{:.6}", get(&self.busy_us) as f64 / 1e6)),
            ("qadapt_cancelled_requests_total", "counter", get(&self.cancelled).to_string()),
            ("qadapt_dropped_queued_total", "counter", get(&self.dropped).to_string()),
            ("qadapt_timeouts_total", "counter", get(&self.timeouts).to_string()),
            ("qadapt_joined_running_total", "counter", get(&self.joined).to_string()),
            ("qadapt_inference_panics_total", "counter", get(&self.panics).to_string()),
            ("qadapt_shed_connections_total", "counter", get(&self.shed).to_string()),
        ];
        for (name, kind, v) in &series {
            s += &format!("# TYPE {name} {kind}\n{name} {v}\n");
        }
        s
    }
}

/// What `/health` and `/ready` read: whether the inference thread lives and when it last looped.
pub(crate) struct Health {
    start: Instant,
    alive: AtomicBool,
    beat_ms: AtomicU64,
    /// Set once shutdown began: `/ready` answers 503 so a balancer stops sending.
    pub draining: AtomicBool,
}

impl Default for Health {
    fn default() -> Self {
        Self {
            start: Instant::now(),
            alive: AtomicBool::new(true),
            beat_ms: AtomicU64::new(0),
            draining: AtomicBool::new(false),
        }
    }
}

impl Health {
    pub fn alive(&self) -> bool {
        self.alive.load(Ordering::SeqCst)
    }

    /// Called by the inference thread each time round its loop (and at least once a second idle).
    pub fn beat(&self) {
        self.beat_ms.store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// Seconds since the inference thread last looped (a long batch step shows here).
    pub fn since_beat(&self) -> f64 {
        (self.start.elapsed().as_millis() as u64).saturating_sub(self.beat_ms.load(Ordering::Relaxed)) as f64 / 1e3
    }

    pub fn render(&self) -> String {
        format!("# TYPE qadapt_inference_thread_up gauge\nqadapt_inference_thread_up {}\n", u8::from(self.alive()))
    }
}

/// Marks the inference thread dead when it ends, however it ends (a panic that escaped included).
pub(crate) struct AliveGuard<'a>(pub &'a Health);

impl Drop for AliveGuard<'_> {
    fn drop(&mut self) {
        self.0.alive.store(false, Ordering::SeqCst);
    }
}
