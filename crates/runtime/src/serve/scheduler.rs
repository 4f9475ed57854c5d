//! The inference thread: one [`Runtime`], one continuously batched decode ([`Running`]), and the
//! bookkeeping that keeps it honest — jobs whose client left are dropped before they run and
//! stopped at the next step while they run, a per-request deadline ends a row with 504, and a panic
//! answers its batch 500 and leaves the thread serving.

use std::collections::{HashMap, HashSet};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use image::RgbImage;
use qadapt_core::sampling::AnswerJson;
use tokio::sync::mpsc::UnboundedSender;

use super::metrics::{AliveGuard, Health, Metrics};
use crate::{GenerateOptions, Request, RunError, Running, Runtime};

/// What a job asks the inference thread.
pub(crate) enum Work {
    Score,
    Chat {
        /// Completed (user, assistant) turns; the first user turn carries the image.
        history: Vec<(String, String)>,
        question: String,
        opts: GenerateOptions,
    },
}

/// Why a job failed, which decides its HTTP status.
#[derive(Debug, Clone)]
pub(crate) enum Failure {
    /// The request cannot be served as asked (400).
    Bad(String),
    /// The server failed (500).
    Internal(String),
    /// `--request-timeout` passed before the answer was complete (504).
    TimedOut,
}

impl From<&RunError> for Failure {
    fn from(e: &RunError) -> Self {
        match e {
            RunError::Input(_) | RunError::Core(_) => Failure::Bad(e.to_string()),
            _ => Failure::Internal(e.to_string()),
        }
    }
}

/// Events of one job back to its HTTP handler.
pub(crate) enum Event {
    Text(String),
    Done(AnswerJson),
    Failed(Failure),
}

/// One request on its way through the queue.
pub(crate) struct Job {
    /// The request id, for the logs.
    pub id: String,
    pub image: RgbImage,
    pub work: Work,
    /// Closed when the handler is gone (its client disconnected): the job is dropped or stopped.
    pub events: UnboundedSender<Event>,
    pub deadline: Option<Instant>,
}

impl Job {
    fn gone(&self) -> bool {
        self.events.is_closed()
    }

    fn expired(&self, now: Instant) -> bool {
        self.deadline.is_some_and(|d| now >= d)
    }

    fn send(&self, ev: Event) {
        let _ = self.events.send(ev);
    }
}

/// Settings of the loop.
pub(crate) struct LoopConfig {
    pub max_batch: usize,
    pub faults: super::Faults,
}

/// Runs until every sender of `rx` is gone and nothing is left to do.
pub(crate) fn infer_loop(mut rt: Runtime, rx: Receiver<Job>, cfg: LoopConfig, m: &Metrics, health: &Health) {
    let _alive = AliveGuard(health);
    let mut st = State { run: Running::default(), live: HashMap::new(), pending: Vec::new(), next_id: 0 };
    let max_batch = cfg.max_batch.max(1);
    loop {
        health.beat();
        if st.run.is_empty() && st.pending.is_empty() {
            match rx.recv_timeout(Duration::from_secs(1)) {
                Ok(j) => st.pending.push(j),
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => break,
            }
            m.queued.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        }
        while st.run.len() + st.pending.len() < max_batch {
            match rx.try_recv() {
                Ok(j) => st.pending.push(j),
                Err(_) => break,
            }
            m.queued.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        }
        let t0 = Instant::now();
        if let Err(panic) = catch_unwind(AssertUnwindSafe(|| st.iterate(&mut rt, &cfg, m))) {
            let msg = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            tracing::error!(panic = %msg, rows = st.live.len() + st.pending.len(), "the inference thread panicked; its batch is answered 500 and serving goes on");
            Metrics::add(&m.panics, 1);
            let f = Failure::Internal(format!("internal error (the batch this request was in failed: {msg})"));
            for (_, job) in st.live.drain() {
                job.send(Event::Failed(f.clone()));
            }
            for job in st.pending.drain(..) {
                job.send(Event::Failed(f.clone()));
            }
            st.run = Running::default();
        }
        Metrics::add(&m.busy_us, t0.elapsed().as_micros() as u64);
    }
}

struct State {
    run: Running<u64>,
    live: HashMap<u64, Job>,
    pending: Vec<Job>,
    next_id: u64,
}

impl State {
    /// One round: drop jobs nobody waits for, run the scores, admit chats, step the batch.
    fn iterate(&mut self, rt: &mut Runtime, cfg: &LoopConfig, m: &Metrics) {
        let now = Instant::now();
        self.pending.retain(|j| {
            if j.gone() {
                tracing::debug!(request_id = %j.id, "dropped from the queue: the client left");
                Metrics::add(&m.dropped, 1);
                false
            } else if j.expired(now) {
                Metrics::add(&m.timeouts, 1);
                j.send(Event::Failed(Failure::TimedOut));
                false
            } else {
                true
            }
        });
        let (scores, chats): (Vec<Job>, Vec<Job>) = self.pending.drain(..).partition(|j| matches!(j.work, Work::Score));
        self.pending = chats;
        if !scores.is_empty() {
            run_scores(rt, scores, m);
        }
        if !self.pending.is_empty() && (self.run.is_empty() || rt.can_regroup()) {
            self.admit(rt, cfg, m);
        }
        if !self.run.is_empty() {
            if !cfg.faults.step_delay.is_zero() {
                std::thread::sleep(cfg.faults.step_delay);
            }
            self.step(rt, m);
        }
    }

    fn admit(&mut self, rt: &mut Runtime, cfg: &LoopConfig, m: &Metrics) {
        let joining = !self.run.is_empty();
        let mut ids = Vec::new();
        for job in self.pending.drain(..) {
            if let Work::Chat { history, question, opts } = &job.work {
                if cfg.faults.panic_on_question.as_deref() == Some(question.as_str()) {
                    self.live.insert(u64::MAX, job);
                    panic!("injected fault");
                }
                // A question too long for the model fails alone, not the batch it would join.
                if let Err(e) =
                    rt.request_prompt(&Request { image: &job.image, question, history, opts: *opts, cancel: None })
                {
                    job.send(Event::Failed(Failure::from(&e)));
                    continue;
                }
            }
            self.next_id += 1;
            ids.push(self.next_id);
            self.live.insert(self.next_id, job);
        }
        let live = &self.live;
        let reqs: Vec<(u64, Request)> = ids
            .iter()
            .filter_map(|id| match &live[id].work {
                Work::Chat { history, question, opts } => {
                    Some((*id, Request { image: &live[id].image, question, history, opts: *opts, cancel: None }))
                }
                Work::Score => None,
            })
            .collect();
        if reqs.is_empty() {
            return;
        }
        Metrics::add(&m.batches, 1);
        Metrics::add(&m.batched_jobs, reqs.len() as u64);
        if joining {
            Metrics::add(&m.joined, reqs.len() as u64);
        }
        if let Err(e) = self.run.admit(rt, reqs) {
            // Nothing was added; the rows already decoding go on.
            for id in ids {
                if let Some(job) = self.live.remove(&id) {
                    job.send(Event::Failed(Failure::from(&e)));
                }
            }
        }
    }

    fn step(&mut self, rt: &mut Runtime, m: &Metrics) {
        let now = Instant::now();
        let expired: HashSet<u64> = self.live.iter().filter(|(_, j)| j.expired(now)).map(|(id, _)| *id).collect();
        let live = &self.live;
        let res = self.run.step(
            rt,
            |id, text| {
                if let Some(j) = live.get(id) {
                    j.send(Event::Text(text.to_string()));
                }
            },
            |id| expired.contains(id) || live.get(id).is_none_or(Job::gone),
        );
        match res {
            Ok(done) => {
                for (id, a) in done {
                    let Some(job) = self.live.remove(&id) else { continue };
                    Metrics::add(&m.tokens, a.token_ids.len() as u64);
                    if expired.contains(&id) {
                        tracing::info!(request_id = %job.id, tokens = a.token_ids.len(), "deadline passed; the row stopped");
                        Metrics::add(&m.timeouts, 1);
                        job.send(Event::Failed(Failure::TimedOut));
                    } else if job.gone() {
                        tracing::info!(request_id = %job.id, tokens = a.token_ids.len(), "client left; the row stopped");
                        Metrics::add(&m.cancelled, 1);
                    } else {
                        job.send(Event::Done(a));
                    }
                }
            }
            Err(e) => {
                // A failed step loses the batch: every row in it gets the error.
                self.run = Running::default();
                for (_, job) in self.live.drain() {
                    job.send(Event::Failed(Failure::from(&e)));
                }
            }
        }
    }
}

fn run_scores(rt: &mut Runtime, group: Vec<Job>, m: &Metrics) {
    Metrics::add(&m.batches, 1);
    Metrics::add(&m.batched_jobs, group.len() as u64);
    let imgs: Vec<&RgbImage> = group.iter().map(|j| &j.image).collect();
    match rt.score_batch_json(&imgs) {
        Ok(answers) => {
            for (job, a) in group.iter().zip(answers) {
                job.send(Event::Done(a));
            }
        }
        Err(e) => {
            for job in &group {
                job.send(Event::Failed(Failure::from(&e)));
            }
        }
    }
}
