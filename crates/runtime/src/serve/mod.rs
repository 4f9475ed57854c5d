//! `qadapt-run serve`: an HTTP JSON API over one [`Runtime`], built for the open network.
//!
//! - `POST /v1/chat/completions`: OpenAI chat (typed, validated; multi-turn through the training
//!   template; the image a base64 data URL in the first user turn; `"stream": true` answers with
//!   server-sent events; `logprobs` / `top_logprobs`; `usage` with prompt and completion tokens).
//! - `POST /v1/score`: `{"image": data URL or base64}` → the Q-Align score and level probabilities.
//! - `GET /v1/models`, `GET /health` (the process and its inference thread), `GET /ready` (would a
//!   request be taken now: thread alive, queue not full, not draining), `GET /metrics` (Prometheus).
//!
//! Layers, outside in: the accept loop caps open connections (one over the cap gets 503 +
//! `Retry-After` and is closed before its request is read); hyper reads headers within
//! `header_timeout` and `max_header_bytes`; the router ([`routes`]) gives each request an id, reads
//! the body within `body_timeout` and the size limit, checks everything, and queues a job on a
//! bounded queue (full → 503 + `Retry-After`); one inference thread ([`scheduler`]) batches
//! continuously. Shutdown (see [`Server::shutdown`]) stops accepting, answers `/ready` 503,
//! finishes what is in flight, then returns.
//!
//! hyper (through axum) rather than a thread-per-connection server: a slow client then costs a
//! parked task, not a thread, and the timeouts and limits above are hyper's own.

mod metrics;
mod openai;
mod routes;
mod scheduler;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use qadapt_core::image::ImageLimits;
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use self::metrics::{Health, Metrics};
use crate::{RunError, Runtime};

/// Limits and sizes of the server.
#[derive(Debug, Clone)]
pub struct Config {
    /// Jobs waiting for the inference thread; one more gets 503.
    pub max_queue: usize,
    /// Rows decoding together at most (requests join and leave the batch between steps).
    pub max_batch: usize,
    /// Decoded image bytes per request.
    pub max_image_bytes: usize,
    /// Pixels and sides of an image, checked from its header before decoding.
    pub image_limits: ImageLimits,
    /// Text tokens of a conversation.
    pub max_prompt_tokens: usize,
    /// Text bytes of a conversation, checked before tokenizing.
    pub max_prompt_bytes: usize,
    /// Largest `max_tokens` a request may ask for (also the default).
    pub max_new_tokens: usize,
    /// Open connections at most; one more is answered 503 and closed.
    pub max_connections: usize,
    /// Time a client has to send a request's headers (also an idle keep-alive connection's limit).
    pub header_timeout: Duration,
    /// Time a client has to send a request's body.
    pub body_timeout: Duration,
    /// Largest request head (request line and headers) in bytes; hyper's floor is 8192.
    pub max_header_bytes: usize,
    /// A request not answered within this ends its generation and is answered 504.
    pub request_timeout: Option<Duration>,
    /// Threads of the HTTP side (parsing, image decoding; inference has its own thread).
    pub http_threads: usize,
    /// The model id of `/v1/models` and the answers.
    pub model_name: String,
    /// Tests only: faults to inject into the inference thread.
    #[doc(hidden)]
    pub faults: Faults,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            max_queue: 64,
            max_batch: 8,
            max_image_bytes: 16 << 20,
            image_limits: ImageLimits::default(),
            max_prompt_tokens: 512,
            max_prompt_bytes: 16 << 10,
            max_new_tokens: 512,
            max_connections: 256,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            max_header_bytes: 16 << 10,
            request_timeout: Some(Duration::from_secs(300)),
            http_threads: 2,
            model_name: "qadapt".into(),
            faults: Faults::default(),
        }
    }
}

/// Faults the tests inject into the inference thread (never set by the binary).
#[doc(hidden)]
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// A chat whose question is exactly this panics the thread while being admitted.
    pub panic_on_question: Option<String>,
    /// A pause before each decoding step: a tiny test model then decodes as slowly as a real one,
    /// so deadlines and departures land mid-answer whatever the machine's speed.
    pub step_delay: Duration,
}

impl Config {
    /// Largest request body: the image as base64 (4/3 of its bytes) and the text, with room for
    /// the JSON around them.
    fn body_limit(&self) -> usize {
        self.max_image_bytes / 3 * 4 + 4 * self.max_prompt_bytes + (64 << 10)
    }
}

/// An error answer: status and OpenAI-style body `{"error": {message, type, param, code}}`.
#[derive(Debug)]
pub(crate) struct ApiError {
    status: u16,
    message: String,
    param: Option<String>,
}

impl ApiError {
    fn new(status: u16, message: impl Into<String>) -> Self {
        Self { status, message: message.into(), param: None }
    }

    fn bad(message: impl Into<String>) -> Self {
        Self::new(400, message)
    }

    fn param(mut self, p: &str) -> Self {
        self.param = Some(p.to_string());
        self
    }

    /// A request body [`qadapt_core::from_json`] refused: 400 with the field as `param`.
    fn from_json((field, message): (Option<String>, String)) -> Self {
        Self { status: 400, message, param: field }
    }

    fn body(&self) -> Value {
        let kind = match self.status {
            503 => "overloaded",
            504 => "timeout",
            500 => "server_error",
            _ => "invalid_request_error",
        };
        json!({"error": {"message": self.message, "type": kind, "param": self.param, "code": self.status}})
    }
}

/// A running server.
pub struct Server {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    http: Option<std::thread::JoinHandle<()>>,
    worker: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    /// Binds `addr` (port 0: any free port) and starts serving `rt`.
    pub fn start(rt: Runtime, addr: &str, cfg: Config) -> crate::Result<Self> {
        let listener =
            std::net::TcpListener::bind(addr).map_err(|e| RunError::Input(format!("cannot listen on {addr}: {e}")))?;
        listener.set_nonblocking(true).map_err(|e| RunError::Input(format!("{addr}: {e}")))?;
        let bound = listener.local_addr().map_err(|e| RunError::Input(format!("{addr}: {e}")))?;
        let tokio = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(cfg.http_threads.max(1))
            .thread_name("qadapt-http")
            .enable_all()
            .build()
            .map_err(|e| RunError::Input(format!("starting the HTTP runtime: {e}")))?;
        let (metrics, health) = (Arc::new(Metrics::default()), Arc::new(Health::default()));
        let (tx, rx) = std::sync::mpsc::sync_channel(cfg.max_queue);
        let info = Arc::new(
            json!({"status": "ok", "model_type": rt.manifest.model_type, "dtype": rt.manifest.dtype, "ep": rt.ep}),
        );
        let app = routes::App {
            tx,
            metrics: Arc::clone(&metrics),
            health: Arc::clone(&health),
            cfg: Arc::new(cfg.clone()),
            info,
            tokenizer: Arc::clone(&rt.tokenizer),
            image_tokens: rt.manifest.image.tokens,
            max_positions: rt.manifest.decoder.max_positions,
        };
        let worker = {
            let (m, h) = (Arc::clone(&metrics), Arc::clone(&health));
            let lc = scheduler::LoopConfig { max_batch: cfg.max_batch, faults: cfg.faults.clone() };
            std::thread::Builder::new()
                .name("qadapt-infer".into())
                .spawn(move || scheduler::infer_loop(rt, rx, lc, &m, &h))
                .map_err(|e| RunError::Input(format!("starting the inference thread: {e}")))?
        };
        let stop = Arc::new(AtomicBool::new(false));
        let http = {
            let stop = Arc::clone(&stop);
            std::thread::Builder::new()
                .name("qadapt-accept".into())
                .spawn(move || {
                    tokio.block_on(async move {
                        match tokio::net::TcpListener::from_std(listener) {
                            Ok(l) => accept_loop(l, app, cfg, stop, metrics, health).await,
                            Err(e) => tracing::error!("listening: {e}"),
                        }
                    });
                    // Tasks still parked (shed connections) end with the runtime.
                    tokio.shutdown_timeout(Duration::from_secs(1));
                })
                .map_err(|e| RunError::Input(format!("starting the HTTP thread: {e}")))?
        };
        Ok(Self { addr: bound, stop, http: Some(http), worker: Some(worker) })
    }

    /// The bound address.
    pub fn addr(&self) -> Option<SocketAddr> {
        Some(self.addr)
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
    /// inference thread ends once no handler can queue more.
    pub fn wait(mut self) {
        if let Some(h) = self.http.take() {
            let _ = h.join();
        }
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

/// Accepts connections until `stop`, then drains them (each finishes the request it is in).
async fn accept_loop(
    listener: tokio::net::TcpListener,
    app: routes::App,
    cfg: Config,
    stop: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(cfg.max_connections.max(1)));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(cfg.header_timeout).max_buf_size(cfg.max_header_bytes.max(8192));
    let service = hyper_util::service::TowerToHyperService::new(routes::router(app));
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    while !stop.load(Ordering::SeqCst) {
        let (sock, _peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = tick.tick() => continue,
        };
        let _ = sock.set_nodelay(true);
        let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
            Metrics::add(&metrics.shed, 1);
            tokio::spawn(shed(sock));
            continue;
        };
        let conn = graceful.watch(http.serve_connection(TokioIo::new(sock), service.clone()));
        let m = Arc::clone(&metrics);
        Metrics::add(&m.connections, 1);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!("connection: {e}");
            }
            m.connections.fetch_sub(1, Ordering::Relaxed);
            drop(permit);
        });
    }
    health.draining.store(true, Ordering::SeqCst);
    drop(listener);
    drop(service);
    graceful.shutdown().await;
}

/// The answer of a connection over the cap, written without reading its request.
async fn shed(mut sock: TcpStream) {
    let body = ApiError::new(503, "too many open connections; retry later").body().to_string();
    let head = format!("HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
    let write = async {
        sock.write_all(head.as_bytes()).await?;
        sock.write_all(body.as_bytes()).await?;
        sock.shutdown().await
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), write).await;
}
