//! `qadapt-run serve`: an HTTP JSON API over one [`Runtime`].
//!
//! - `POST /v1/chat/completions`: OpenAI-style; the image is a base64 data URL in an `image_url`
//!   content part; `"stream": true` answers with server-sent events.
//! - `POST /v1/score`: `{"image": data URL or base64}` → the Q-Align score and level probabilities.
//! - `GET /health`, `GET /metrics` (Prometheus text).
//!
//! HTTP threads parse and check requests and put jobs on a bounded queue (full → 503). One
//! inference thread owns the sessions and batches continuously: chat requests join the running
//! decode batch between steps (up to `max_batch` rows; prefilled together, their caches joined to
//! the running one on the device) and leave it when they finish or their client goes away; score
//! requests run as one batch between steps. Shutdown (see [`Server::shutdown`]) stops accepting,
//! finishes what is queued, then returns.

use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use image::RgbImage;
use qadapt_core::sampling::{AnswerJson, SamplingParams};
use serde_json::{json, Value};
use tiny_http::{Header, Method, Request, Response};

use std::collections::HashMap;

use crate::{GenerateOptions, RunError, Running, Runtime};

/// Limits and sizes of the server.
#[derive(Debug, Clone)]
pub struct Config {
    /// Jobs waiting for the inference thread; one more gets 503.
    pub max_queue: usize,
    /// Jobs run as one batch at most.
    pub max_batch: usize,
    /// Decoded image bytes per request.
    pub max_image_bytes: usize,
    /// Question tokens per request.
    pub max_prompt_tokens: usize,
    /// Largest `max_tokens` a request may ask for (also the default).
    pub max_new_tokens: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self { max_queue: 64, max_batch: 8, max_image_bytes: 16 << 20, max_prompt_tokens: 512, max_new_tokens: 512 }
    }
}

/// What a job asks the inference thread.
enum Work {
    Score,
    Chat { question: String, opts: GenerateOptions },
}

/// Events of one job back to its HTTP thread.
enum Event {
    Text(String),
    Done(AnswerJson),
    Failed(RunError),
}

struct Job {
    image: RgbImage,
    work: Work,
    events: mpsc::Sender<Event>,
    /// Set when the client of a stream went away: its row stops generating.
    cancel: Arc<AtomicBool>,
}

/// Counters behind `/metrics`.
#[derive(Default)]
struct Metrics {
    requests: Mutex<std::collections::BTreeMap<(String, u16), u64>>,
    queued: AtomicU64,
    batches: AtomicU64,
    batched_jobs: AtomicU64,
    tokens: AtomicU64,
    busy_us: AtomicU64,
    cancelled: AtomicU64,
    /// Requests admitted into a batch that was already decoding.
    joined: AtomicU64,
}

impl Metrics {
    fn count(&self, path: &str, code: u16) {
        if let Ok(mut m) = self.requests.lock() {
            *m.entry((path.to_string(), code)).or_default() += 1;
        }
    }

    fn render(&self) -> String {
        let mut s = String::from("# TYPE qadapt_requests_total counter\n");
        if let Ok(m) = self.requests.lock() {
            for ((p, c), n) in m.iter() {
                s += &format!("qadapt_requests_total{{path=\"{p}\",code=\"{c}\"}} {n}\n");
            }
        }
        s += &format!("# TYPE qadapt_queue_depth gauge\nqadapt_queue_depth {}\n", self.queued.load(Ordering::Relaxed));
        s += &format!("# TYPE qadapt_batches_total counter\nqadapt_batches_total {}\n", self.batches.load(Ordering::Relaxed));
        s += &format!("# TYPE qadapt_batched_jobs_total counter\nqadapt_batched_jobs_total {}\n", self.batched_jobs.load(Ordering::Relaxed));
        s += &format!("# TYPE qadapt_generated_tokens_total counter\nqadapt_generated_tokens_total {}\n", self.tokens.load(Ordering::Relaxed));
        s += &format!("# TYPE qadapt_inference_seconds_total counter\nqadapt_inference_seconds_total {:.6}\n", self.busy_us.load(Ordering::Relaxed) as f64 / 1e6);
        s += &format!("# TYPE qadapt_cancelled_streams_total counter\nqadapt_cancelled_streams_total {}\n", self.cancelled.load(Ordering::Relaxed));
        s += &format!("# TYPE qadapt_joined_running_total counter\nqadapt_joined_running_total {}\n", self.joined.load(Ordering::Relaxed));
        s
    }
}

/// A running server.
pub struct Server {
    http: Arc<tiny_http::Server>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
    worker: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    /// Binds `addr` (port 0: any free port) and starts serving `rt`.
    pub fn start(rt: Runtime, addr: &str, cfg: Config) -> crate::Result<Self> {
        let http = Arc::new(tiny_http::Server::http(addr).map_err(|e| RunError::Input(format!("cannot listen on {addr}: {e}")))?);
        let stop = Arc::new(AtomicBool::new(false));
        let metrics = Arc::new(Metrics::default());
        let (tx, rx) = mpsc::sync_channel::<Job>(cfg.max_queue);
        let info = Arc::new(json!({"status": "ok", "model_type": rt.manifest.model_type, "dtype": rt.manifest.dtype, "ep": rt.ep}));
        let tokenizer = Arc::clone(&rt.tokenizer);
        let worker = {
            let (m, max_batch) = (Arc::clone(&metrics), cfg.max_batch);
            std::thread::Builder::new().name("qadapt-infer".into()).spawn(move || infer_loop(rt, rx, max_batch, &m)).map_err(|e| RunError::Input(format!("starting the inference thread: {e}")))?
        };
        // Enough HTTP threads that a full queue is reached (and answered 503) before they run out.
        let n = cfg.max_queue + cfg.max_batch + 4;
        let cfg = Arc::new(cfg);
        let mut threads = Vec::with_capacity(n);
        for i in 0..n {
            let (http, stop, tx, metrics, cfg, info, tok) = (Arc::clone(&http), Arc::clone(&stop), tx.clone(), Arc::clone(&metrics), Arc::clone(&cfg), Arc::clone(&info), Arc::clone(&tokenizer));
            let t = std::thread::Builder::new().name(format!("qadapt-http-{i}")).spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    match http.recv_timeout(Duration::from_millis(50)) {
                        Ok(Some(req)) => handle(req, &tx, &metrics, &cfg, &info, &tok),
                        Ok(None) => {}
                        Err(_) => break,
                    }
                }
            });
            threads.push(t.map_err(|e| RunError::Input(format!("starting HTTP threads: {e}")))?);
        }
        Ok(Self { http, stop, threads, worker: Some(worker) })
    }

    /// The bound address.
    pub fn addr(&self) -> Option<std::net::SocketAddr> {
        self.http.server_addr().to_ip()
    }

    /// A flag that, once set, makes [`Server::wait`] shut down (for signal handlers).
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.stop)
    }

    /// Stops accepting and waits for queued and running jobs to finish.
    pub fn shutdown(self) {
        self.stop.store(true, Ordering::SeqCst);
        self.wait();
    }

    /// Serves until the stop flag is set, then drains: in-flight requests are answered, the
    /// inference thread ends once no HTTP thread can queue more.
    pub fn wait(mut self) {
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        self.http.unblock();
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

/// The inference thread. Chat requests decode in one [`Running`] batch that they join as soon
/// as there is room (up to `max_batch` rows; joining needs the export's cache graphs, else a batch
/// admits only while it is empty) and leave when they finish; score requests run as one batch
/// between decoding steps. Ends when every sender is gone and nothing is left to do.
fn infer_loop(mut rt: Runtime, rx: Receiver<Job>, max_batch: usize, m: &Metrics) {
    let max_batch = max_batch.max(1);
    let mut run: Running<u64> = Running::default();
    let mut live: HashMap<u64, Job> = HashMap::new();
    let mut pending: Vec<Job> = Vec::new();
    let mut next_id = 0u64;
    loop {
        if run.is_empty() && pending.is_empty() {
            match rx.recv() {
                Ok(j) => pending.push(j),
                Err(_) => break,
            }
            m.queued.fetch_sub(1, Ordering::Relaxed);
        }
        while run.len() + pending.len() < max_batch {
            match rx.try_recv() {
                Ok(j) => pending.push(j),
                Err(_) => break,
            }
            m.queued.fetch_sub(1, Ordering::Relaxed);
        }
        let (scores, chats): (Vec<Job>, Vec<Job>) = pending.drain(..).partition(|j| matches!(j.work, Work::Score));
        pending = chats;
        if !scores.is_empty() {
            let t0 = Instant::now();
            run_scores(&mut rt, scores, m);
            m.busy_us.fetch_add(t0.elapsed().as_micros() as u64, Ordering::Relaxed);
        }
        if !pending.is_empty() && (run.is_empty() || rt.can_regroup()) {
            let t0 = Instant::now();
            let joining = !run.is_empty();
            let mut ids = Vec::new();
            for job in pending.drain(..) {
                // A question too long for the model fails alone, not the batch it would join.
                if let Work::Chat { question, .. } = &job.work {
                    if let Err(e) = rt.check_question(question) {
                        let _ = job.events.send(Event::Failed(e));
                        continue;
                    }
                }
                next_id += 1;
                ids.push(next_id);
                live.insert(next_id, job);
            }
            let reqs: Vec<(u64, crate::Request)> = ids
                .iter()
                .filter_map(|id| match &live[id].work {
                    Work::Chat { question, opts } => Some((*id, crate::Request { image: &live[id].image, question, opts: *opts, cancel: None })),
                    Work::Score => None,
                })
                .collect();
            if !reqs.is_empty() {
                m.batches.fetch_add(1, Ordering::Relaxed);
                m.batched_jobs.fetch_add(reqs.len() as u64, Ordering::Relaxed);
                if joining {
                    m.joined.fetch_add(reqs.len() as u64, Ordering::Relaxed);
                }
                if let Err(e) = run.admit(&mut rt, reqs) {
                    // Nothing was added; the rows already decoding go on.
                    for id in ids {
                        if let Some(job) = live.remove(&id) {
                            let _ = job.events.send(Event::Failed(copy_err(&e)));
                        }
                    }
                }
            }
            m.busy_us.fetch_add(t0.elapsed().as_micros() as u64, Ordering::Relaxed);
        }
        if !run.is_empty() {
            let t0 = Instant::now();
            let res = run.step(
                &mut rt,
                |id, text| {
                    if let Some(j) = live.get(id) {
                        let _ = j.events.send(Event::Text(text.to_string()));
                    }
                },
                |id| live.get(id).is_some_and(|j| j.cancel.load(Ordering::Relaxed)),
            );
            match res {
                Ok(done) => {
                    for (id, a) in done {
                        if let Some(job) = live.remove(&id) {
                            m.tokens.fetch_add(a.token_ids.len() as u64, Ordering::Relaxed);
                            let _ = job.events.send(Event::Done(a));
                        }
                    }
                }
                Err(e) => {
                    // A failed step loses the batch: every row in it gets the error.
                    run = Running::default();
                    for (_, job) in live.drain() {
                        let _ = job.events.send(Event::Failed(copy_err(&e)));
                    }
                }
            }
            m.busy_us.fetch_add(t0.elapsed().as_micros() as u64, Ordering::Relaxed);
        }
    }
}

/// RunError is not Clone: a copy with the same message, its class kept.
fn copy_err(e: &RunError) -> RunError {
    match e {
        RunError::Input(m) => RunError::Input(m.clone()),
        other => RunError::Ort(other.to_string()),
    }
}

fn run_scores(rt: &mut Runtime, group: Vec<Job>, m: &Metrics) {
    m.batches.fetch_add(1, Ordering::Relaxed);
    m.batched_jobs.fetch_add(group.len() as u64, Ordering::Relaxed);
    let imgs: Vec<&RgbImage> = group.iter().map(|j| &j.image).collect();
    match rt.score_batch_json(&imgs) {
        Ok(answers) => {
            for (job, a) in group.iter().zip(answers) {
                let _ = job.events.send(Event::Done(a));
            }
        }
        Err(e) => {
            for job in &group {
                let _ = job.events.send(Event::Failed(copy_err(&e)));
            }
        }
    }
}

/// An error answer: status and OpenAI-style body.
struct HttpError(u16, String);

impl From<RunError> for HttpError {
    fn from(e: RunError) -> Self {
        match e {
            RunError::Input(_) | RunError::Core(_) => HttpError(400, e.to_string()),
            _ => HttpError(500, e.to_string()),
        }
    }
}

fn json_response(code: u16, body: &Value) -> Response<std::io::Cursor<Vec<u8>>> {
    let ct = Header::from_bytes(&b"Content-Type"[..], &b"application/json"[..]).expect("static header");
    Response::from_string(body.to_string()).with_status_code(code).with_header(ct)
}

fn handle(mut req: Request, tx: &SyncSender<Job>, m: &Metrics, cfg: &Config, info: &Value, tok: &qadapt_core::TextTokenizer) {
    let path = req.url().split('?').next().unwrap_or("").to_string();
    let method = req.method().clone();
    let known = ["/health", "/metrics", "/v1/score", "/v1/chat/completions"];
    let label = if known.contains(&path.as_str()) { path.as_str() } else { "other" };
    let result: Result<Option<Response<std::io::Cursor<Vec<u8>>>>, HttpError> = match (method, path.as_str()) {
        (Method::Get, "/health") => Ok(Some(json_response(200, info))),
        (Method::Get, "/metrics") => {
            let ct = Header::from_bytes(&b"Content-Type"[..], &b"text/plain; version=0.0.4"[..]).expect("static header");
            Ok(Some(Response::from_string(m.render()).with_header(ct)))
        }
        (Method::Post, "/v1/score") => read_json(&mut req, cfg).and_then(|body| {
            let image = decode_image(body.get("image").and_then(Value::as_str).ok_or(HttpError(400, "\"image\" (a data URL or base64) is required".into()))?, cfg)?;
            let (rx, _) = submit(tx, m, image, Work::Score)?;
            match rx.recv() {
                Ok(Event::Done(a)) => Ok(Some(json_response(200, &json!(a)))),
                Ok(Event::Failed(e)) => Err(e.into()),
                _ => Err(HttpError(500, "the inference thread stopped".into())),
            }
        }),
        (Method::Post, "/v1/chat/completions") => match read_json(&mut req, cfg).and_then(|body| chat_request(&body, cfg, tok)) {
            Err(e) => Err(e),
            Ok((image, question, opts, stream)) => match submit(tx, m, image, Work::Chat { question, opts }) {
                Err(e) => Err(e),
                Ok((rx, cancel)) if stream => {
                    m.count(label, 200);
                    if !stream_sse(req, rx, opts.max_new_tokens) {
                        cancel.store(true, Ordering::Relaxed);
                        m.cancelled.fetch_add(1, Ordering::Relaxed);
                    }
                    return;
                }
                Ok((rx, _)) => collect_chat(rx, opts.max_new_tokens).map(|v| Some(json_response(200, &v))),
            },
        },
        (_, p) if known.contains(&p) => Err(HttpError(405, format!("method not allowed on {p}"))),
        (_, p) => Err(HttpError(404, format!("no route {p}"))),
    };
    let resp = match result {
        Ok(Some(r)) => r,
        Ok(None) => return,
        Err(HttpError(code, msg)) => {
            let kind = match code {
                503 => "overloaded",
                500 => "server_error",
                _ => "invalid_request_error",
            };
            json_response(code, &json!({"error": {"message": msg, "type": kind, "code": code}}))
        }
    };
    m.count(label, resp.status_code().0);
    let _ = req.respond(resp);
}

fn read_json(req: &mut Request, cfg: &Config) -> Result<Value, HttpError> {
    // Base64 grows bytes by 4/3; leave room for the rest of the JSON.
    let limit = cfg.max_image_bytes / 3 * 4 + (64 << 10);
    if req.body_length().is_some_and(|n| n > limit) {
        return Err(HttpError(413, format!("request body over {limit} bytes")));
    }
    let mut body = Vec::new();
    req.as_reader().take(limit as u64 + 1).read_to_end(&mut body).map_err(|e| HttpError(400, format!("reading the body: {e}")))?;
    if body.len() > limit {
        return Err(HttpError(413, format!("request body over {limit} bytes")));
    }
    serde_json::from_slice(&body).map_err(|e| HttpError(400, format!("invalid JSON: {e}")))
}

fn decode_image(s: &str, cfg: &Config) -> Result<RgbImage, HttpError> {
    let b64 = match s.strip_prefix("data:") {
        Some(rest) => rest.split_once(";base64,").map(|(_, d)| d).ok_or(HttpError(400, "image data URL must be base64 (data:image/…;base64,…)".into()))?,
        None => s,
    };
    let bytes = base64::engine::general_purpose::STANDARD.decode(b64.trim()).map_err(|e| HttpError(400, format!("image: invalid base64: {e}")))?;
    if bytes.len() > cfg.max_image_bytes {
        return Err(HttpError(413, format!("image is {} bytes; the limit is {}", bytes.len(), cfg.max_image_bytes)));
    }
    qadapt_core::image::decode_image(&bytes).map_err(|e| HttpError(400, format!("image: {e}")))
}

/// The last user message's text and image, and the sampling settings of a chat request.
fn chat_request(body: &Value, cfg: &Config, tok: &qadapt_core::TextTokenizer) -> Result<(RgbImage, String, GenerateOptions, bool), HttpError> {
    let bad = |m: &str| HttpError(400, m.to_string());
    let msgs = body.get("messages").and_then(Value::as_array).ok_or(bad("\"messages\" (an array) is required"))?;
    let user = msgs.iter().rev().find(|m| m.get("role").and_then(Value::as_str) == Some("user")).ok_or(bad("no user message"))?;
    let (mut text, mut image) = (String::new(), None);
    match user.get("content") {
        Some(Value::String(s)) => text.push_str(s),
        Some(Value::Array(parts)) => {
            for p in parts {
                match p.get("type").and_then(Value::as_str) {
                    Some("text") => text.push_str(p.get("text").and_then(Value::as_str).unwrap_or("")),
                    Some("image_url") => {
                        let url = p.get("image_url").and_then(|u| u.get("url").or(Some(u))).and_then(Value::as_str).ok_or(bad("image_url.url must be a string"))?;
                        if image.is_some() {
                            return Err(bad("one image per request"));
                        }
                        image = Some(decode_image(url, cfg)?);
                    }
                    _ => return Err(bad("content parts must be of type text or image_url")),
                }
            }
        }
        _ => return Err(bad("the user message has no content")),
    }
    let image = image.ok_or(bad("the user message needs an image_url part (a base64 data URL)"))?;
    if text.trim().is_empty() {
        return Err(bad("the user message has no text"));
    }
    let n = tok.encode(&text).map_err(|e| HttpError(400, e.to_string()))?.len();
    if n > cfg.max_prompt_tokens {
        return Err(HttpError(400, format!("the question is {n} tokens; the limit is {}", cfg.max_prompt_tokens)));
    }
    let num = |k: &str| body.get(k).and_then(Value::as_f64);
    let max_tokens = body.get("max_tokens").or(body.get("max_completion_tokens")).and_then(Value::as_u64).map_or(cfg.max_new_tokens, |v| v as usize);
    if max_tokens > cfg.max_new_tokens {
        return Err(HttpError(400, format!("max_tokens {max_tokens} is over the limit {}", cfg.max_new_tokens)));
    }
    let sampling = SamplingParams {
        temperature: num("temperature").map(|v| v as f32),
        top_k: body.get("top_k").and_then(Value::as_u64).map(|v| v as usize),
        top_p: num("top_p").map(|v| v as f32),
        seed: body.get("seed").and_then(Value::as_u64).unwrap_or(0),
        repetition_penalty: num("repetition_penalty").map(|v| v as f32),
    };
    // The sampler checks the values; fail here with a 400 rather than in the batch.
    qadapt_core::sampling::Sampler::new(sampling).map_err(|e| HttpError(400, e.to_string()))?;
    let stream = body.get("stream").and_then(Value::as_bool).unwrap_or(false);
    Ok((image, text, GenerateOptions { max_new_tokens: max_tokens, sampling }, stream))
}

fn submit(tx: &SyncSender<Job>, m: &Metrics, image: RgbImage, work: Work) -> Result<(Receiver<Event>, Arc<AtomicBool>), HttpError> {
    let (etx, erx) = mpsc::channel();
    let cancel = Arc::new(AtomicBool::new(false));
    m.queued.fetch_add(1, Ordering::Relaxed);
    match tx.try_send(Job { image, work, events: etx, cancel: Arc::clone(&cancel) }) {
        Ok(()) => Ok((erx, cancel)),
        Err(e) => {
            m.queued.fetch_sub(1, Ordering::Relaxed);
            Err(match e {
                TrySendError::Full(_) => HttpError(503, "the queue is full; retry later".into()),
                TrySendError::Disconnected(_) => HttpError(503, "shutting down".into()),
            })
        }
    }
}

fn created() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn completion_id() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!("chatcmpl-{}-{}", created(), N.fetch_add(1, Ordering::Relaxed))
}

fn finish_reason(a: &AnswerJson, max: usize) -> &'static str {
    if a.token_ids.len() >= max {
        "length"
    } else {
        "stop"
    }
}

fn collect_chat(rx: Receiver<Event>, max: usize) -> Result<Value, HttpError> {
    for ev in rx {
        match ev {
            Event::Text(_) => {}
            Event::Done(a) => {
                return Ok(json!({
                    "id": completion_id(), "object": "chat.completion", "created": created(), "model": "qadapt",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": a.answer}, "finish_reason": finish_reason(&a, max)}],
                    "usage": {"completion_tokens": a.token_ids.len()},
                    "token_ids": a.token_ids,
                }))
            }
            Event::Failed(e) => return Err(e.into()),
        }
    }
    Err(HttpError(500, "the inference thread stopped".into()))
}

/// Streams a chat answer as server-sent events, one chunk per piece of text, flushed as it comes
/// (written by hand: tiny_http's chunked writer buffers 8 KiB). Returns false when the client went
/// away before the end.
fn stream_sse(req: Request, rx: Receiver<Event>, max: usize) -> bool {
    let mut w = req.into_writer();
    let id = completion_id();
    let chunk = |delta: Value, finish: Option<&str>| {
        json!({"id": id, "object": "chat.completion.chunk", "created": created(), "model": "qadapt",
               "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
    };
    let send = |w: &mut Box<dyn Write + Send>, data: &str| -> std::io::Result<()> {
        let ev = format!("data: {data}\n\n");
        write!(w, "{:x}\r\n{ev}\r\n", ev.len())?;
        w.flush()
    };
    let head = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n";
    if w.write_all(head.as_bytes()).is_err() {
        return false;
    }
    let _ = send(&mut w, &chunk(json!({"role": "assistant", "content": ""}), None).to_string());
    for ev in rx {
        let r = match ev {
            Event::Text(t) => send(&mut w, &chunk(json!({"content": t}), None).to_string()),
            Event::Done(a) => {
                let _ = send(&mut w, &chunk(json!({}), Some(finish_reason(&a, max))).to_string());
                break;
            }
            Event::Failed(e) => {
                let _ = send(&mut w, &json!({"error": {"message": e.to_string()}}).to_string());
                break;
            }
        };
        if r.is_err() {
            return false;
        }
    }
    let _ = send(&mut w, "[DONE]");
    let _ = w.write_all(b"0\r\n\r\n").and_then(|_| w.flush());
    true
}
