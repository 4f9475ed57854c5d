//! The server against hostile or broken clients: bombs and corrupt images, wrong-typed fields,
//! slow headers and bodies, too many connections, clients that leave (streaming or not, running or
//! queued), deadlines, a panic in the inference thread; and the OpenAI surface (models, usage,
//! multi-turn, logprobs). After each, the server keeps serving.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::http::{chat, data_url, metric, post, start};
use common::{exported, fixtures};
use runtime::serve::{Config, Faults};
use runtime::{GenerateOptions, Request, Runtime};
use serde_json::{json, Value};

const CASE: &str = "bunny_f32_bpe";

fn bad_inputs() -> std::path::PathBuf {
    fixtures().join("../bad-inputs")
}

/// A raw HTTP/1.1 POST of `body` on a fresh socket (the caller decides when to close it).
fn raw_post(url: &str, path: &str, body: &[u8]) -> TcpStream {
    let mut s = TcpStream::connect(url.trim_start_matches("http://")).unwrap();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
    s.write_all(body).unwrap();
    s
}

/// Status code of whatever the server answers on `s` (0 if it closed without answering).
fn status_of(s: &mut TcpStream) -> (u16, String) {
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf).to_string();
    let code = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (code, text)
}

fn wait_for(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed().as_secs() < secs, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn score_ok(url: &str, img: &str) {
    let (code, r) = post(&format!("{url}/v1/score"), &json!({"image": img}));
    assert_eq!(code, 200, "the server stopped serving: {r}");
}

#[test]
fn bombs_corrupt_images_and_wrong_types_are_4xx_and_the_server_goes_on() {
    let (_tmp, dir) = exported(CASE);
    let img = data_url(&fixtures().join(CASE).join("image.png"));
    let (server, url) = start(&dir, Config { max_new_tokens: 64, max_prompt_tokens: 1000, ..Config::default() });
    let bad = bad_inputs();
    // (file, status): over a limit → 413 before decoding; damaged → 400.
    let files = [
        ("png-100000x1.png", 413),
        ("jpeg-60000x60000.jpg", 413),
        ("png-20000x20000-1bit.png", 413),
        ("png-20000x100.png", 413),
        ("webp-16383x16383.webp", 413),
        ("jpeg-truncated.jpg", 400),
        ("png-truncated.png", 400),
        ("webp-truncated.webp", 400),
        ("png-bad-crc.png", 400),
        ("empty.jpg", 400),
        ("text.png", 400),
        ("gif-1x1.gif", 400),
    ];
    for (f, want) in files {
        let t0 = Instant::now();
        let (code, r) = post(&format!("{url}/v1/score"), &json!({"image": data_url(&bad.join(f))}));
        let msg = r["error"]["message"].as_str().unwrap_or_default().to_string();
        println!("{f:<28} {code} in {:>5} ms: {msg}", t0.elapsed().as_millis());
        assert_eq!(code, want, "{f}: {r}");
        assert!(msg.starts_with("image:"), "{f}: {msg}");
        score_ok(&url, &img);
    }
    // The largest image the limits accept (64 Mpx) is scored, in bounded memory.
    let t0 = Instant::now();
    let (code, r) = post(&format!("{url}/v1/score"), &json!({"image": data_url(&bad.join("png-8000x8000-1bit.png"))}));
    assert_eq!(code, 200, "{r}");
    println!("png-8000x8000-1bit.png (64 Mpx) scored in {} ms", t0.elapsed().as_millis());

    // Wrong types and unsupported parameters: 400 naming the field, before anything runs.
    let chat_url = format!("{url}/v1/chat/completions");
    let with = |k: &str, v: Value| {
        let mut b = chat("Is it sharp?", &img, 8, false);
        b[k] = v;
        b
    };
    let cases = [
        (with("max_tokens", json!("10")), "max_tokens"),
        (with("temperature", json!(1e-40)), "temperature"),
        (with("n", json!(2)), "n"),
        (with("tools", json!([{"type": "function", "function": {"name": "f"}}])), "tools"),
        (with("seed", json!(-1)), "seed"),
        (with("stream", json!("yes")), "stream"),
        (with("top_logprobs", json!(2)), "top_logprobs"),
    ];
    for (body, field) in cases {
        let (code, r) = post(&chat_url, &body);
        assert_eq!(code, 400, "{field}: {r}");
        assert_eq!(r["error"]["param"], field, "{r}");
    }
    // Text over the byte cap is refused before tokenizing; invalid UTF-8 is a 400.
    let (code, r) = post(&chat_url, &chat(&"word ".repeat(5000), &img, 8, false));
    assert_eq!(code, 400, "{r}");
    assert!(r["error"]["message"].as_str().unwrap().contains("bytes"), "{r}");
    let raw = std::fs::read(bad.join("non-utf8-body.json")).unwrap();
    let (code, text) = status_of(&mut raw_post(&url, "/v1/chat/completions", &raw));
    assert_eq!(code, 400, "{text}");
    // A stream that cannot be served gets its 400 before any 200.
    let (code, r) = post(&chat_url, &chat(&"very ".repeat(200), &img, 8, true));
    assert_eq!(code, 400, "{r}");
    assert!(r["error"]["message"].as_str().unwrap().contains("max_positions"), "{r}");
    score_ok(&url, &img);
    server.shutdown();
}

#[test]
fn slow_headers_slow_bodies_big_headers_and_too_many_connections() {
    let (_tmp, dir) = exported(CASE);
    let img = data_url(&fixtures().join(CASE).join("image.png"));
    let cfg = Config {
        header_timeout: Duration::from_millis(800),
        body_timeout: Duration::from_millis(800),
        max_connections: 6,
        ..Config::default()
    };
    let (server, url) = start(&dir, cfg);
    let addr = url.trim_start_matches("http://").to_string();

    // A client that sends its headers a byte at a time is cut off at the header timeout.
    let t0 = Instant::now();
    let mut slow = TcpStream::connect(&addr).unwrap();
    slow.write_all(b"POST /v1/score HTTP/1.1\r\nHo").unwrap();
    let (code, _) = status_of(&mut slow);
    let cut = t0.elapsed();
    println!("slow headers: closed after {} ms (answer {code})", cut.as_millis());
    assert!(cut < Duration::from_secs(5), "a slow-header client held its connection {cut:?}");
    // A body that never completes is answered 408 at the body timeout.
    let mut s = TcpStream::connect(&addr).unwrap();
    s.write_all(b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"image\":").unwrap();
    let (code, text) = status_of(&mut s);
    assert_eq!(code, 408, "{text}");
    // A header section over the limit is refused (431) or the connection closed; never served.
    let mut s = TcpStream::connect(&addr).unwrap();
    let _ = write!(s, "GET /health HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", "a".repeat(64 << 10));
    let (code, _) = status_of(&mut s);
    assert!(code == 431 || code == 0, "a 64 KiB header got {code}");
    // Connections over the cap get 503 + Retry-After without their request being read; the
    // others (silent) are closed at the header timeout. 9 connections at a cap of 6: at least 3 shed
    // (more if an earlier connection still holds its slot). Then the server answers again.
    let socks: Vec<TcpStream> = (0..9).map(|_| TcpStream::connect(&addr).unwrap()).collect();
    let answers: Vec<(u16, String)> = socks.into_iter().map(|mut s| status_of(&mut s)).collect();
    let shed: Vec<&String> = answers.iter().filter(|(c, _)| *c == 503).map(|(_, t)| t).collect();
    println!("9 connections at a cap of 6: {} answered 503, the rest closed at the header timeout", shed.len());
    assert!(shed.len() >= 3, "{answers:?}");
    assert!(answers.iter().all(|(c, _)| *c == 503 || *c == 0), "{answers:?}");
    assert!(shed.iter().all(|t| t.to_ascii_lowercase().contains("retry-after: 1")), "{shed:?}");
    wait_for("the idle connections to close", 10, || ureq::get(&format!("{url}/health")).call().is_ok());
    score_ok(&url, &img);
    assert!(metric(&url, "qadapt_shed_connections_total") >= 1.0);
    server.shutdown();
}

/// Clients that leave cost nothing more: a non-streaming one stops its row at the next step, and
/// queued jobs whose clients left are dropped before they run.
#[test]
fn clients_that_leave_stop_their_rows_and_their_queued_jobs() {
    let (_tmp, dir) = exported(CASE);
    let img = data_url(&fixtures().join(CASE).join("image.png"));
    let slow = Faults { step_delay: Duration::from_millis(10), ..Faults::default() };
    let (server, url) = start(&dir, Config { max_new_tokens: 400, max_batch: 1, faults: slow, ..Config::default() });
    let q = "Describe the quality of this image.";
    let body = |n: usize| serde_json::to_vec(&chat(q, &img, n, false)).unwrap();
    // This fixture never emits <|endoftext|>: a row runs to its max_tokens unless stopped.
    let before = metric(&url, "qadapt_generated_tokens_total");
    let jobs0 = metric(&url, "qadapt_batched_jobs_total");
    let s = raw_post(&url, "/v1/chat/completions", &body(400));
    wait_for("the row to start", 10, || metric(&url, "qadapt_batched_jobs_total") > jobs0);
    // Two more wait in the queue (the batch holds one row); their clients leave too.
    let queued: Vec<TcpStream> = (0..2).map(|_| raw_post(&url, "/v1/chat/completions", &body(400))).collect();
    wait_for("two queued jobs", 10, || metric(&url, "qadapt_queue_depth") >= 2.0);
    drop(queued);
    drop(s);
    wait_for("the rows to end", 30, || {
        metric(&url, "qadapt_cancelled_requests_total") >= 1.0 && metric(&url, "qadapt_dropped_queued_total") >= 2.0
    });
    let used = metric(&url, "qadapt_generated_tokens_total") - before;
    println!("non-streaming client gone mid-answer: {used} of 400 tokens generated; 2 queued jobs dropped unrun");
    assert!(used < 400.0, "the row ran to the end for nobody");
    assert_eq!(metric(&url, "qadapt_batched_jobs_total") - jobs0, 1.0, "a departed client's queued job ran");
    score_ok(&url, &img);
    server.shutdown();
}

/// `--request-timeout` ends a running row and a queued job alike with 504; `/ready` says 503
/// while the queue is full.
#[test]
fn deadlines_answer_504_and_ready_tracks_the_queue() {
    let (_tmp, dir) = exported(CASE);
    let img = Arc::new(data_url(&fixtures().join(CASE).join("image.png")));
    // 20 ms a step: 400 tokens would take 8 s; the deadline is 1.5 s.
    let slow = Faults { step_delay: Duration::from_millis(20), ..Faults::default() };
    let (server, url) = start(
        &dir,
        Config {
            max_new_tokens: 400,
            max_batch: 1,
            max_queue: 1,
            request_timeout: Some(Duration::from_millis(1500)),
            faults: slow,
            ..Config::default()
        },
    );
    assert_eq!(ureq::get(&format!("{url}/ready")).call().unwrap().status(), 200);
    let chat_url = Arc::new(format!("{url}/v1/chat/completions"));
    let (u, i) = (Arc::clone(&chat_url), Arc::clone(&img));
    let jobs0 = metric(&url, "qadapt_batched_jobs_total");
    let t0 = Instant::now();
    let long = std::thread::spawn(move || post(&u, &chat("Describe the quality of this image.", &i, 400, false)));
    wait_for("the long row", 10, || metric(&url, "qadapt_batched_jobs_total") > jobs0);
    // One more fills the queue of one: /ready turns 503 (with Retry-After).
    let (u, i) = (Arc::clone(&chat_url), Arc::clone(&img));
    let queued = std::thread::spawn(move || post(&u, &chat("Is it sharp?", &i, 400, false)));
    wait_for("a full queue", 10, || metric(&url, "qadapt_queue_depth") >= 1.0);
    match ureq::get(&format!("{url}/ready")).call() {
        Err(ureq::Error::Status(503, r)) => assert_eq!(r.header("retry-after"), Some("1")),
        other => panic!("/ready with a full queue: {other:?}"),
    }
    let (code, r) = long.join().unwrap();
    let took = t0.elapsed();
    println!("400-token request with a 1.5 s deadline: {code} after {} ms", took.as_millis());
    assert_eq!(code, 504, "{r}");
    assert!(took < Duration::from_secs(10), "{took:?}");
    // The queued request spent most of its deadline waiting: it is dropped unrun if the deadline
    // passed in the queue, else admitted when the long row leaves and stopped at its deadline — 504
    // either way, far short of its 400 tokens.
    let (code, r) = queued.join().unwrap();
    assert_eq!(code, 504, "{r}");
    assert_eq!(metric(&url, "qadapt_timeouts_total"), 2.0);
    let (ran, tokens) =
        (metric(&url, "qadapt_batched_jobs_total") - jobs0, metric(&url, "qadapt_generated_tokens_total"));
    println!(
        "queued request behind it: 504, {} ({tokens} tokens generated in all)",
        if ran > 1.0 { "admitted and stopped" } else { "dropped unrun" }
    );
    assert!(tokens < 400.0, "{tokens} tokens: a deadline did not stop a row");
    assert_eq!(ureq::get(&format!("{url}/ready")).call().unwrap().status(), 200);
    server.shutdown();
}

/// A panic in the inference thread answers its batch 500; the thread goes on, and /health and
/// /metrics say what happened.
#[test]
fn a_panic_in_the_inference_thread_fails_its_batch_only() {
    let (_tmp, dir) = exported(CASE);
    let img = data_url(&fixtures().join(CASE).join("image.png"));
    let (server, url) = start(
        &dir,
        Config { faults: Faults { panic_on_question: Some("PANIC".into()), ..Faults::default() }, ..Config::default() },
    );
    let chat_url = format!("{url}/v1/chat/completions");
    let (code, r) = post(&chat_url, &chat("PANIC", &img, 4, false));
    assert_eq!(code, 500, "{r}");
    assert!(r["error"]["message"].as_str().unwrap().contains("injected fault"), "{r}");
    assert_eq!(metric(&url, "qadapt_inference_panics_total"), 1.0);
    let h: Value = ureq::get(&format!("{url}/health")).call().unwrap().into_json().unwrap();
    assert_eq!(h["inference_thread"], "alive", "{h}");
    let (code, r) = post(&chat_url, &chat("Is it sharp?", &img, 4, false));
    assert_eq!(code, 200, "after the panic: {r}");
    server.shutdown();
}

/// What the official OpenAI client relies on: /v1/models, `usage` with prompt and total tokens,
/// multi-turn chats through the training template, logprobs; each checked against the runtime.
#[test]
fn openai_surface_models_usage_multi_turn_and_logprobs() {
    let (_tmp, dir) = exported(CASE);
    let path = fixtures().join(CASE).join("image.png");
    let img = data_url(&path);
    let (server, url) = start(&dir, Config::default());
    let models: Value = ureq::get(&format!("{url}/v1/models")).call().unwrap().into_json().unwrap();
    assert_eq!(models["data"][0]["id"], "qadapt", "{models}");
    let chat_url = format!("{url}/v1/chat/completions");

    let (code, r) = post(&chat_url, &chat("Is it sharp?", &img, 6, false));
    assert_eq!(code, 200, "{r}");
    let u = &r["usage"];
    let (p, c) = (u["prompt_tokens"].as_u64().unwrap(), u["completion_tokens"].as_u64().unwrap());
    assert_eq!(c as usize, r["token_ids"].as_array().unwrap().len());
    assert_eq!(u["total_tokens"].as_u64().unwrap(), p + c);

    // Multi-turn: the same ids as the runtime given the same history.
    let first = r["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    let body = json!({"messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": img}}, {"type": "text", "text": "Is it sharp?"}]},
        {"role": "assistant", "content": first},
        {"role": "user", "content": "Why?"},
    ], "max_tokens": 6});
    let (code, r2) = post(&chat_url, &body);
    assert_eq!(code, 200, "{r2}");
    assert!(r2["usage"]["prompt_tokens"].as_u64().unwrap() > p, "the history is not in the prompt");
    let mut rt = Runtime::open(&dir, runtime::Ep::Cpu, 0, false, None).unwrap();
    let picture = qadapt_core::image::load_image(&path).unwrap();
    let history = [(qadapt_core::template::user_turn("Is it sharp?"), first)];
    let want = rt
        .generate_mixed(
            &[Request {
                image: &picture,
                question: "Why?",
                history: &history,
                opts: GenerateOptions { max_new_tokens: 6, ..Default::default() },
                cancel: None,
            }],
            |_, _| {},
        )
        .unwrap();
    assert_eq!(r2["token_ids"], json!(want[0].token_ids), "multi-turn ids differ from the runtime's");

    // Logprobs: greedy picks the likeliest token, so it heads its own top list.
    let mut b = chat("Is it sharp?", &img, 6, false);
    b["logprobs"] = json!(true);
    b["top_logprobs"] = json!(3);
    let (code, r3) = post(&chat_url, &b);
    assert_eq!(code, 200, "{r3}");
    let content = r3["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len(), r3["token_ids"].as_array().unwrap().len());
    for t in content {
        let lp = t["logprob"].as_f64().unwrap();
        let top = t["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3);
        assert!(lp <= 0.0 && (top[0]["logprob"].as_f64().unwrap() - lp).abs() < 1e-6, "{t}");
        assert!(top.windows(2).all(|w| w[0]["logprob"].as_f64() >= w[1]["logprob"].as_f64()), "{t}");
        assert!(top.iter().map(|e| e["logprob"].as_f64().unwrap().exp()).sum::<f64>() <= 1.0 + 1e-6);
    }
    server.shutdown();
}

/// The official `openai` Python client (`tools/openai_check.py`, run by the Python of
/// `scripts/get-openai.sh`) against the server: models, chat, stream, multi-turn, logprobs, and the
/// 400s for `n`, `tools` and a string `max_tokens`, all as the client parses them.
#[test]
fn the_official_openai_client_gets_what_it_expects() {
    let python = std::env::var("QADAPT_OPENAI_PYTHON")
        .expect("set QADAPT_OPENAI_PYTHON=$(bash scripts/get-openai.sh) (see .ci/run)");
    let (_tmp, dir) = exported(CASE);
    let (server, url) = start(&dir, Config::default());
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tools/openai_check.py");
    let out = std::process::Command::new(python)
        .arg(script)
        .arg(&url)
        .arg(fixtures().join(CASE).join("image.png"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the openai client found faults");
    assert!(text.contains("{\"passed\": 8, \"failed\": 0}"), "{text}");
    server.shutdown();
}
