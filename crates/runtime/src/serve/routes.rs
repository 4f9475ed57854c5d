//! The HTTP routes (axum) and how their answers are written: the handlers parse and check a request
//! completely (a stream's 200 is sent only once its job is queued), put a job on the bounded queue
//! (full → 503 with `Retry-After`), and wait for its events; a handler dropped with its connection
//! closes the job's channel, which the inference thread reads as "cancel".

use std::sync::atomic::Ordering;
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use base64::Engine as _;
use image::RgbImage;
use qadapt_core::TextTokenizer;
use serde_json::{json, Value};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};
use tracing::Instrument;

use super::metrics::{Health, Metrics};
use super::openai::{self, finish_reason, logprobs_json, usage};
use super::scheduler::{Event, Failure, Job, Work};
use super::{ApiError, Config};

/// What every handler shares.
#[derive(Clone)]
pub(crate) struct App {
    pub tx: SyncSender<Job>,
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    pub cfg: Arc<Config>,
    pub info: Arc<Value>,
    pub tokenizer: Arc<TextTokenizer>,
    /// Rows one image adds to the prompt, and the decoder's positions.
    pub image_tokens: usize,
    pub max_positions: usize,
}

/// The router: every route behind the request-id layer.
pub(crate) fn router(app: App) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/v1/models", get(models))
        .route("/v1/score", post(score))
        .route("/v1/chat/completions", post(chat))
        .fallback(|req: Request| async move {
            let (m, p) = (req.method().clone(), req.uri().path().to_string());
            ApiError::new(404, format!("no route {m} {p}"))
        })
        .method_not_allowed_fallback(|req: Request| async move {
            ApiError::new(405, format!("method {} not allowed on {}", req.method(), req.uri().path()))
        })
        .layer(axum::middleware::from_fn_with_state(app.clone(), request_id))
        .with_state(app)
}

/// Gives each request an id (the client's `x-request-id` when it is short and printable), logs
/// the request with it, returns it as `x-request-id` and counts the answer by route and status.
async fn request_id(State(app): State<App>, mut req: Request, next: Next) -> Response {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|s| !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_string)
        .unwrap_or_else(|| format!("{:x}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)));
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let route = ["/health", "/ready", "/metrics", "/v1/models", "/v1/score", "/v1/chat/completions"]
        .into_iter()
        .find(|r| *r == path)
        .unwrap_or("other");
    req.extensions_mut().insert(RequestId(id.clone()));
    let t0 = Instant::now();
    let span = tracing::info_span!("request", id = %id);
    let mut resp = next.run(req).instrument(span).await;
    let code = resp.status().as_u16();
    app.metrics.count(route, code);
    if route != "/health" && route != "/ready" && route != "/metrics" {
        tracing::info!(request_id = %id, %method, %path, status = code, ms = t0.elapsed().as_millis() as u64, "request");
    }
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    resp
}

#[derive(Clone)]
struct RequestId(String);

async fn health(State(app): State<App>) -> Response {
    let mut info = (*app.info).clone();
    let alive = app.health.alive();
    info["inference_thread"] = json!(if alive { "alive" } else { "dead" });
    info["seconds_since_inference_loop"] = json!(app.health.since_beat());
    if !alive {
        info["status"] = json!("error");
    }
    json_response(if alive { 200 } else { 503 }, &info)
}

/// 200 only when a request sent now would be taken: model loaded (it is, once the server runs),
/// inference thread alive, queue not full, not draining.
async fn ready(State(app): State<App>) -> Response {
    let queued = app.metrics.queued.load(Ordering::Relaxed) as usize;
    let mut why = Vec::new();
    if !app.health.alive() {
        why.push("the inference thread is not running".to_string());
    }
    if app.health.draining.load(Ordering::SeqCst) {
        why.push("shutting down".to_string());
    }
    if queued >= app.cfg.max_queue {
        why.push(format!("the queue is full ({queued} of {})", app.cfg.max_queue));
    }
    let body = json!({"ready": why.is_empty(), "queued": queued, "max_queue": app.cfg.max_queue, "reasons": why});
    let mut r = json_response(if why.is_empty() { 200 } else { 503 }, &body);
    if !why.is_empty() {
        r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    r
}

async fn metrics(State(app): State<App>) -> Response {
    let text = app.metrics.render() + &app.health.render();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

async fn models(State(app): State<App>) -> Response {
    json_response(
        200,
        &json!({"object": "list", "data": [{"id": app.cfg.model_name, "object": "model", "created": 0, "owned_by": "qadapt"}]}),
    )
}

async fn score(State(app): State<App>, req: Request) -> Result<Response, ApiError> {
    let id = request_id_of(&req);
    let body = read_body(&app, req).await?;
    #[derive(serde::Deserialize)]
    struct ScoreRequest {
        image: String,
    }
    let r: ScoreRequest = qadapt_core::from_json(&body).map_err(ApiError::from_json)?;
    let image = decode_image(&app, r.image).await?;
    let (mut rx, deadline) = submit(&app, id, image, Work::Score)?;
    match wait(&mut rx, deadline).await? {
        Event::Done(a) => Ok(json_response(200, &json!(a))),
        Event::Failed(f) => Err(f.into()),
        Event::Text(_) => Err(ApiError::new(500, "unexpected text for a score")),
    }
}

async fn chat(State(app): State<App>, req: Request) -> Result<Response, ApiError> {
    let id = request_id_of(&req);
    let body = read_body(&app, req).await?;
    let c = openai::parse_chat(&body, &app.cfg)?;
    let prompt_tokens = check_prompt(&app, &c.history, &c.question)?;
    let image = decode_image(&app, c.image).await?;
    let (max, logprobs, stream, include_usage) =
        (c.opts.max_new_tokens, c.opts.logprobs.is_some(), c.stream, c.include_usage);
    let (mut rx, deadline) =
        submit(&app, id, image, Work::Chat { history: c.history, question: c.question, opts: c.opts })?;
    if stream {
        return Ok(sse(rx, deadline, max, prompt_tokens, include_usage));
    }
    // The answer's text arrives piece by piece; the whole answer comes with Done.
    loop {
        match wait(&mut rx, deadline).await? {
            Event::Text(_) => {}
            Event::Done(a) => {
                let mut choice = json!({"index": 0, "message": {"role": "assistant", "content": a.answer}, "finish_reason": finish_reason(&a, max), "logprobs": null});
                if logprobs {
                    choice["logprobs"] = logprobs_json(a.logprobs.as_deref().unwrap_or_default());
                }
                return Ok(json_response(
                    200,
                    &json!({
                        "id": completion_id(), "object": "chat.completion", "created": created(), "model": app.cfg.model_name,
                        "choices": [choice], "usage": usage(prompt_tokens, &a), "token_ids": a.token_ids,
                    }),
                ));
            }
            Event::Failed(f) => return Err(f.into()),
        }
    }
}

fn request_id_of(req: &Request) -> String {
    req.extensions().get::<RequestId>().map_or_else(String::new, |r| r.0.clone())
}

/// The body, within the size limit and the body timeout (a client that sends slowly is cut off).
async fn read_body(app: &App, req: Request) -> Result<Bytes, ApiError> {
    let limit = app.cfg.body_limit();
    if let Some(n) =
        req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|s| s.parse::<u64>().ok())
    {
        if n > limit as u64 {
            return Err(ApiError::new(413, format!("request body is {n} bytes; the limit is {limit}")));
        }
    }
    match tokio::time::timeout(app.cfg.body_timeout, axum::body::to_bytes(req.into_body(), limit)).await {
        Err(_) => Err(ApiError::new(408, format!("the request body did not arrive within {:?}", app.cfg.body_timeout))),
        Ok(Err(e)) if is_length_limit(&e) => Err(ApiError::new(413, format!("request body over {limit} bytes"))),
        Ok(Err(e)) => Err(ApiError::bad(format!("reading the body: {e}"))),
        Ok(Ok(b)) => Ok(b),
    }
}

fn is_length_limit(e: &axum::Error) -> bool {
    let mut src: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = src {
        if s.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        src = s.source();
    }
    false
}

/// Base64 (or a data URL) → pixels, within the byte and pixel limits; decoding runs off the
/// async threads.
async fn decode_image(app: &App, s: String) -> Result<RgbImage, ApiError> {
    let (max_bytes, limits) = (app.cfg.max_image_bytes, app.cfg.image_limits);
    let work = move || {
        let b64 = match s.strip_prefix("data:") {
            Some(rest) => rest
                .split_once(";base64,")
                .map(|(_, d)| d)
                .ok_or_else(|| ApiError::bad("image: a data URL must be base64 (data:image/…;base64,…)"))?,
            None => s.as_str(),
        };
        let b64 = b64.trim();
        if b64.len() / 4 * 3 > max_bytes + 3 {
            return Err(ApiError::new(
                413,
                format!("image is about {} bytes; the limit is {max_bytes}", b64.len() / 4 * 3),
            ));
        }
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|e| ApiError::bad(format!("image: invalid base64: {e}")))?;
        if bytes.len() > max_bytes {
            return Err(ApiError::new(413, format!("image is {} bytes; the limit is {max_bytes}", bytes.len())));
        }
        qadapt_core::image::decode_image(&bytes, &limits).map_err(|e| match e {
            qadapt_core::image::DecodeError::TooLarge { .. } => ApiError::new(413, format!("image: {e}")),
            qadapt_core::image::DecodeError::Invalid(_) => ApiError::bad(format!("image: {e}")),
        })
    };
    tokio::task::spawn_blocking(work).await.map_err(|e| ApiError::new(500, format!("decoding the image: {e}")))?
}

/// Checks the conversation against the token limit and the model's positions before anything is
/// queued; returns the prompt's length with the image.
fn check_prompt(app: &App, history: &[(String, String)], question: &str) -> Result<usize, ApiError> {
    let tok = &app.tokenizer;
    let count = |s: &str| tok.encode(s).map(|v| v.len()).map_err(|e| ApiError::bad(e.to_string()));
    let mut n = count(question)?;
    for (u, a) in history {
        n += count(u)? + count(a)?;
    }
    if n > app.cfg.max_prompt_tokens {
        return Err(ApiError::bad(format!("the question is {n} tokens; the limit is {}", app.cfg.max_prompt_tokens))
            .param("messages"));
    }
    let ids = qadapt_core::template::tokenize_chat(tok, history, question)
        .map_err(|e| ApiError::bad(e.to_string()).param("messages"))?;
    ids.fits(app.image_tokens, app.max_positions, "max_positions").map_err(|m| ApiError::bad(m).param("messages"))
}

/// Queues a job; a full queue is 503 with `Retry-After`.
fn submit(
    app: &App,
    id: String,
    image: RgbImage,
    work: Work,
) -> Result<(UnboundedReceiver<Event>, Option<Instant>), ApiError> {
    let (tx, rx) = unbounded_channel();
    let deadline = app.cfg.request_timeout.map(|d| Instant::now() + d);
    app.metrics.queued.fetch_add(1, Ordering::Relaxed);
    match app.tx.try_send(Job { id, image, work, events: tx, deadline }) {
        Ok(()) => Ok((rx, deadline)),
        Err(e) => {
            app.metrics.queued.fetch_sub(1, Ordering::Relaxed);
            Err(match e {
                TrySendError::Full(_) => ApiError::new(503, "the queue is full; retry later"),
                TrySendError::Disconnected(_) => ApiError::new(503, "shutting down"),
            })
        }
    }
}

/// The next event; the inference thread ends a row at its deadline, this is the backstop (a
/// prefill that outlives it): past the deadline and a grace second, the answer is 504.
async fn wait(rx: &mut UnboundedReceiver<Event>, deadline: Option<Instant>) -> Result<Event, ApiError> {
    let next = rx.recv();
    let ev = match deadline {
        Some(d) => {
            tokio::time::timeout_at((d + Duration::from_secs(1)).into(), next).await.map_err(|_| Failure::TimedOut)?
        }
        None => next.await,
    };
    ev.ok_or_else(|| ApiError::new(500, "the inference thread stopped"))
}

fn created() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn completion_id() -> String {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    format!("chatcmpl-{}-{}", created(), N.fetch_add(1, Ordering::Relaxed))
}

/// A chat answer as server-sent events: a role chunk, one chunk per piece of text, the finish
/// chunk (and a usage chunk when asked), `[DONE]`. A failure mid-stream (the 200 is sent) is an
/// error event. The body owns the event channel: when the client goes away hyper drops it, and
/// the inference thread stops the row at its next step.
fn sse(
    rx: UnboundedReceiver<Event>,
    deadline: Option<Instant>,
    max: usize,
    prompt_tokens: usize,
    include_usage: bool,
) -> Response {
    let id = completion_id();
    let chunk = move |delta: Value, finish: Option<&str>| json!({"id": id, "object": "chat.completion.chunk", "created": created(), "model": "qadapt", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]});
    let data = |v: &Value| Bytes::from(format!("data: {v}\n\n"));
    let first = data(&chunk(json!({"role": "assistant", "content": ""}), None));
    // State: (receiver, queued bytes to send next, finished).
    let stream = futures_util::stream::unfold((rx, vec![first], false), move |(mut rx, mut out, done)| {
        let chunk = chunk.clone();
        async move {
            loop {
                if !out.is_empty() {
                    let b = out.remove(0);
                    return Some((Ok::<Bytes, std::convert::Infallible>(b), (rx, out, done)));
                }
                if done {
                    return None;
                }
                let ev = wait(&mut rx, deadline).await;
                let finished = !matches!(ev, Ok(Event::Text(_)));
                match ev {
                    Ok(Event::Text(t)) => out.push(data(&chunk(json!({"content": t}), None))),
                    Ok(Event::Done(a)) => {
                        let mut c = chunk(json!({}), Some(finish_reason(&a, max)));
                        if let Some(lp) = &a.logprobs {
                            c["choices"][0]["logprobs"] = logprobs_json(lp);
                        }
                        out.push(data(&c));
                        if include_usage {
                            let mut u = chunk(json!({}), None);
                            u["choices"] = json!([]);
                            u["usage"] = usage(prompt_tokens, &a);
                            out.push(data(&u));
                        }
                    }
                    Ok(Event::Failed(f)) => out.push(data(&ApiError::from(f).body())),
                    Err(e) => out.push(data(&e.body())),
                }
                if finished {
                    out.push(Bytes::from_static(b"data: [DONE]\n\n"));
                    return Some((Ok(out.remove(0)), (rx, out, true)));
                }
            }
        }
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|e| ApiError::new(500, e.to_string()).into_response())
}

pub(crate) fn json_response(code: u16, body: &Value) -> Response {
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
}

impl From<Failure> for ApiError {
    fn from(f: Failure) -> Self {
        match f {
            Failure::Bad(m) => ApiError::bad(m),
            Failure::Internal(m) => ApiError::new(500, m),
            Failure::TimedOut => {
                ApiError::new(504, "the request took longer than --request-timeout; its generation was stopped")
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = json_response(self.status, &self.body());
        if self.status == 503 {
            r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        r
    }
}
