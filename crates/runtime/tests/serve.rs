//! `qadapt-run serve` through a real HTTP client (ureq): answers equal HF's on the fixture export,
//! streaming equals the whole answer, 32 concurrent clients with mixed questions all get their own
//! answer (and are batched), a full queue answers 503, limits answer 4xx, a client that goes away
//! stops its generation, and shutdown drains in-flight work.

mod common;

use std::io::{BufRead, BufReader};
use std::sync::Arc;

use base64::Engine as _;
use common::http::{chat, data_url, metric, post, start, stream};
use common::{expected, exported, fixtures, images};
use runtime::serve::Config;
use serde_json::{json, Value};

const CASE: &str = "qadapt_f32_sharded";

#[test]
fn serves_hf_answers_streams_batches_and_limits() {
    let (tmp, dir) = exported(CASE);
    let exp = expected(CASE);
    let img = data_url(&fixtures().join(CASE).join("image.png"));
    let (server, url) = start(&dir, Config { max_image_bytes: 64 << 10, max_new_tokens: 64, ..Config::default() });

    let health: Value = ureq::get(&format!("{url}/health")).call().unwrap().into_json().unwrap();
    assert_eq!(health["status"], "ok");
    assert_eq!(health["ep"], "cpu");

    // The answer and the score equal HF transformers'.
    let q = exp["questions"]["ask"].as_str().unwrap();
    let max_new = exp["max_new_tokens"].as_u64().unwrap() as usize;
    let (code, r) = post(&format!("{url}/v1/chat/completions"), &chat(q, &img, max_new, false));
    assert_eq!(code, 200, "{r}");
    assert_eq!(r["token_ids"], exp["greedy_ids"], "chat ids vs HF");
    assert_eq!(r["object"], "chat.completion");
    assert_eq!(r["choices"][0]["finish_reason"], "stop");
    let whole = r["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    let (code, s) = post(&format!("{url}/v1/score"), &json!({"image": img}));
    assert_eq!(code, 200, "{s}");
    let (ours, hf) = (s["score"].as_f64().unwrap(), exp["score"].as_f64().unwrap());
    assert!((ours - hf).abs() < 1e-4, "score {ours} vs HF {hf}");

    // Streaming gives the same text, in more than one event.
    let (text, events) = stream(&format!("{url}/v1/chat/completions"), &chat(q, &img, max_new, true));
    assert_eq!(text, whole);
    assert!(events >= 2, "{events} events");

    // 32 concurrent clients over 8 images and two questions of different lengths: each gets the
    // answer a lone request gets (mixed prompts share a batch, left-padded).
    const QS: [&str; 2] = ["Is it blurry?", "Describe the quality of this photo in a few words, please."];
    let pics: Vec<String> = images(&tmp.path().join("imgs"), 8).iter().map(|p| data_url(p)).collect();
    let lone: Vec<(Value, Value, Value)> = pics
        .iter()
        .map(|p| {
            let chat_ids =
                |q: &str| post(&format!("{url}/v1/chat/completions"), &chat(q, p, 8, false)).1["token_ids"].clone();
            (
                chat_ids(QS[0]),
                chat_ids(QS[1]),
                post(&format!("{url}/v1/score"), &json!({"image": p})).1["score"].clone(),
            )
        })
        .collect();
    let (batches0, jobs0) = (metric(&url, "qadapt_batches_total"), metric(&url, "qadapt_batched_jobs_total"));
    let (pics, lone, base) = (Arc::new(pics), Arc::new(lone), Arc::new(url.clone()));
    let clients: Vec<_> = (0..32)
        .map(|i| {
            let (pics, lone, base) = (Arc::clone(&pics), Arc::clone(&lone), Arc::clone(&base));
            std::thread::spawn(move || {
                let k = i % 8;
                if i % 4 != 3 {
                    let q = (i / 8) % 2;
                    let (code, r) = post(&format!("{base}/v1/chat/completions"), &chat(QS[q], &pics[k], 8, false));
                    assert_eq!(code, 200, "client {i}: {r}");
                    let want = if q == 0 { &lone[k].0 } else { &lone[k].1 };
                    assert_eq!(&r["token_ids"], want, "client {i}: chat differs from a lone request");
                } else {
                    let (code, r) = post(&format!("{base}/v1/score"), &json!({"image": pics[k]}));
                    assert_eq!(code, 200, "client {i}: {r}");
                    let (a, b) = (r["score"].as_f64().unwrap(), lone[k].2.as_f64().unwrap());
                    assert!((a - b).abs() < 1e-5, "client {i}: score {a} vs lone {b}");
                }
            })
        })
        .collect();
    for c in clients {
        c.join().unwrap();
    }
    let (batches, jobs) =
        (metric(&url, "qadapt_batches_total") - batches0, metric(&url, "qadapt_batched_jobs_total") - jobs0);
    println!("32 concurrent clients: {jobs} jobs in {batches} batches");
    assert_eq!(jobs, 32.0);
    assert!(batches < jobs, "no two requests shared a batch");

    // Limits and bad requests: a clear 4xx each.
    let big =
        format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(vec![0u8; 70 << 10]));
    let corrupt = format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(b"\x89PNG\r\n\x1a\n broken")
    );
    let chat_url = format!("{url}/v1/chat/completions");
    let cases: Vec<(Value, u16, &str)> = vec![
        (chat("q", &big, 8, false), 413, "limit"),
        (chat("q", &img, 65, false), 400, "max_tokens"),
        (chat(&"very ".repeat(600), &img, 8, false), 400, "tokens"),
        (chat("q", &corrupt, 8, false), 400, "image"),
        (chat("q", "data:image/png;base64,@@@", 8, false), 400, "base64"),
        (json!({"messages": [{"role": "user", "content": "no image here"}]}), 400, "image_url"),
        (json!({"prompt": "hi"}), 400, "messages"),
        (
            json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": img}}, {"type": "text", "text": "q"}]}], "temperature": -1.0}),
            400,
            "temperature",
        ),
    ];
    for (body, want, needle) in cases {
        let (code, r) = post(&chat_url, &body);
        let msg = r["error"]["message"].as_str().unwrap_or("").to_string();
        println!("{code} {msg}");
        assert_eq!(code, want, "{needle}: {r}");
        assert!(msg.contains(needle), "{msg} does not mention {needle}");
    }
    let raw = ureq::post(&chat_url).set("Content-Type", "application/json").send_string("{not json");
    assert!(matches!(raw, Err(ureq::Error::Status(400, _))));
    assert!(matches!(ureq::get(&format!("{url}/nope")).call(), Err(ureq::Error::Status(404, _))));
    assert!(matches!(ureq::get(&chat_url).call(), Err(ureq::Error::Status(405, _))));
    let metrics = ureq::get(&format!("{url}/metrics")).call().unwrap().into_string().unwrap();
    assert!(metrics.contains("qadapt_requests_total{path=\"/v1/chat/completions\",code=\"413\"} 1"), "{metrics}");

    // Shutdown while answers stream: once each stream has begun (its first event read), shut down;
    // every stream still ends with [DONE] and the text a lone request gets; then no listener.
    let (tx, rx) = std::sync::mpsc::channel();
    let streams: Vec<_> = pics
        .iter()
        .take(4)
        .map(|p| {
            let (s_url, p, tx) = (chat_url.clone(), p.clone(), tx.clone());
            std::thread::spawn(move || {
                let r = ureq::post(&s_url).send_json(chat("Describe the image in detail.", &p, 64, true)).unwrap();
                let mut lines = BufReader::new(r.into_reader()).lines();
                let first = lines.next().unwrap().unwrap();
                assert!(first.starts_with("data: "), "{first}");
                tx.send(()).unwrap();
                let (mut text, mut done) = (String::new(), false);
                for line in lines {
                    let line = line.unwrap();
                    match line.strip_prefix("data: ") {
                        Some("[DONE]") => done = true,
                        Some(d) => {
                            text += serde_json::from_str::<Value>(d).unwrap()["choices"][0]["delta"]["content"]
                                .as_str()
                                .unwrap_or("")
                        }
                        None => {}
                    }
                }
                assert!(done, "a stream cut by the shutdown");
                text
            })
        })
        .collect();
    for _ in 0..4 {
        rx.recv().unwrap();
    }
    server.shutdown();
    let texts: Vec<String> = streams.into_iter().map(|t| t.join().unwrap()).collect();
    println!("4 streams through shutdown: {:?} chars", texts.iter().map(String::len).collect::<Vec<_>>());
    assert!(ureq::get(&format!("{url}/health")).call().is_err(), "still answering after shutdown");
    // The drained answers are the ones a fresh server gives.
    let (server, url) = start(&dir, Config::default());
    for (p, t) in pics.iter().take(4).zip(&texts) {
        let (_, r) = post(&format!("{url}/v1/chat/completions"), &chat("Describe the image in detail.", p, 64, false));
        assert_eq!(r["choices"][0]["message"]["content"].as_str().unwrap(), t);
    }
    server.shutdown();
}

/// A queue of one with a batch of one: of 16 simultaneous requests, some get 503 and the rest
/// their answer.
#[test]
fn a_full_queue_answers_503() {
    let (_tmp, dir) = exported(CASE);
    let img = Arc::new(data_url(&fixtures().join(CASE).join("image.png")));
    let (server, url) = start(&dir, Config { max_queue: 1, max_batch: 1, ..Config::default() });
    let url = Arc::new(format!("{url}/v1/chat/completions"));
    let clients: Vec<_> = (0..16)
        .map(|_| {
            let (url, img) = (Arc::clone(&url), Arc::clone(&img));
            std::thread::spawn(move || post(&url, &chat("Describe the image.", &img, 48, false)))
        })
        .collect();
    let codes: Vec<u16> = clients
        .into_iter()
        .map(|c| c.join().unwrap())
        .map(|(code, r)| {
            if code == 503 {
                assert!(r["error"]["message"].as_str().unwrap().contains("queue is full"), "{r}");
            }
            code
        })
        .collect();
    let busy = codes.iter().filter(|&&c| c == 503).count();
    println!("16 requests, queue 1: {busy} × 503, {} × 200", codes.iter().filter(|&&c| c == 200).count());
    assert!(busy >= 1, "no 503 with a queue of one");
    assert!(codes.iter().all(|&c| c == 200 || c == 503), "{codes:?}");
    assert!(codes.contains(&200));
    server.shutdown();
}

/// The binary: `serve --port 0` prints its address, answers, and exits 0 on SIGTERM.
#[test]
fn the_binary_serves_and_stops_on_sigterm() {
    let (_tmp, dir) = exported(CASE);
    let mut child = common::run()
        .args(["serve", "--model", dir.to_str().unwrap(), "--port", "0"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let url = loop {
        let mut line = String::new();
        assert!(err.read_line(&mut line).unwrap() > 0, "serve exited before listening");
        if let Some(u) = line.trim().strip_prefix("listening on ") {
            break u.to_string();
        }
    };
    let h: Value = ureq::get(&format!("{url}/health")).call().unwrap().into_json().unwrap();
    assert_eq!(h["status"], "ok");
    let ok = std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(ok.success());
    let t0 = std::time::Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(t0.elapsed().as_secs() < 20, "serve did not stop on SIGTERM");
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut err, &mut rest).unwrap();
    assert!(status.success(), "exit {status}: {rest}");
    assert!(rest.contains("stopped"), "{rest}");
}

/// A streaming client that goes away stops its row: of the 400 tokens the answer would run to (this
/// fixture never emits `<|endoftext|>`), only the few before the broken write are generated (none
/// when it left before its job ran).
#[test]
fn a_client_that_disconnects_stops_its_generation() {
    let case = "bunny_f32_bpe";
    let (_tmp, dir) = exported(case);
    let img = data_url(&fixtures().join(case).join("image.png"));
    let (server, url) = start(&dir, Config { max_new_tokens: 400, ..Config::default() });
    let chat_url = format!("{url}/v1/chat/completions");
    let q = "Describe the quality of this image.";
    let (_, whole) = post(&chat_url, &chat(q, &img, 400, false));
    assert_eq!(whole["token_ids"].as_array().unwrap().len(), 400, "the fixture must run to max_tokens");
    let before = metric(&url, "qadapt_generated_tokens_total");
    {
        let r = ureq::post(&chat_url).send_json(chat(q, &img, 400, true)).unwrap();
        let mut lines = BufReader::new(r.into_reader()).lines();
        assert!(lines.next().unwrap().unwrap().starts_with("data: "));
    } // the connection closes here
      // The row stops at its next step, or (on a busy machine) the job is dropped before it runs.
    let t0 = std::time::Instant::now();
    while metric(&url, "qadapt_cancelled_requests_total") + metric(&url, "qadapt_dropped_queued_total") == 0.0 {
        assert!(t0.elapsed().as_secs() < 20, "the abandoned job was neither stopped nor dropped");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let used = metric(&url, "qadapt_generated_tokens_total") - before;
    println!("client gone after the first event: {used} of 400 tokens generated");
    assert!(used < 400.0, "the generation ran to the end for nobody");
    server.shutdown();
}

/// A question that passes the HTTP limit but does not fit the model (with its image) is refused
/// alone, by the handler before it reaches the queue: the 11 requests sent with it are answered as a
/// lone request is, and exactly those 11 reach the decode batches.
#[test]
fn a_question_too_long_for_the_model_fails_alone() {
    let (_tmp, dir) = exported(CASE);
    let img = Arc::new(data_url(&fixtures().join(CASE).join("image.png")));
    let (server, url) = start(&dir, Config { max_prompt_tokens: 1000, ..Config::default() });
    let chat_url = Arc::new(format!("{url}/v1/chat/completions"));
    let lone = post(&chat_url, &chat("Is it sharp?", &img, 8, false)).1["token_ids"].clone();
    assert!(!lone.as_array().unwrap().is_empty());
    let jobs0 = metric(&url, "qadapt_batched_jobs_total");
    let long = Arc::new("very ".repeat(200)); // 600 tokens: under the HTTP limit, over the model's 512 positions
    let clients: Vec<_> = (0..12)
        .map(|i| {
            let (u, img, long) = (Arc::clone(&chat_url), Arc::clone(&img), Arc::clone(&long));
            std::thread::spawn(move || {
                post(&u, &chat(if i == 5 { long.as_str() } else { "Is it sharp?" }, &img, 8, false))
            })
        })
        .collect();
    let res: Vec<(u16, Value)> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    for (i, (code, r)) in res.iter().enumerate() {
        if i == 5 {
            assert_eq!(*code, 400, "{r}");
            assert!(r["error"]["message"].as_str().unwrap().contains("max_positions"), "{r}");
            assert_eq!(r["error"]["param"], "messages", "{r}");
        } else {
            assert_eq!(*code, 200, "client {i}: {r}");
            assert_eq!(r["token_ids"], lone, "client {i} answered differently from a lone request");
        }
    }
    let jobs = metric(&url, "qadapt_batched_jobs_total") - jobs0;
    assert_eq!(jobs, 11.0, "the 11 valid requests, and only they, should reach the decode batches");
    server.shutdown();
}

/// Continuous batching: requests that arrive while a long answer decodes join its batch (their
/// caches joined to the running one, left-padded) and every answer, the long one included, is the
/// one a lone request gets.
#[test]
fn requests_join_a_running_batch_and_answer_as_alone() {
    join_a_running_batch(false);
}

/// [`requests_join_a_running_batch_and_answer_as_alone`] on a `--fused` export: rows in their own
/// slots of in-place cache buffers.
#[test]
fn requests_join_a_running_fused_batch_and_answer_as_alone() {
    join_a_running_batch(true);
}

fn join_a_running_batch(fused: bool) {
    let case = "bunny_f32_bpe";
    let (tmp, dir) = common::exported_variant(case, fused);
    let (server, url) = start(&dir, Config { max_new_tokens: 400, ..Config::default() });
    let chat_url = Arc::new(format!("{url}/v1/chat/completions"));
    let long_q = "Describe the quality of this image.";
    let long_img = Arc::new(data_url(&fixtures().join(case).join("image.png")));
    let pics: Vec<String> = images(&tmp.path().join("imgs"), 6).iter().map(|p| data_url(p)).collect();
    let short_q = ["Is it sharp?", "Is the exposure right, or is the sky blown out?"];
    let lone_long = post(&chat_url, &chat(long_q, &long_img, 300, false)).1["token_ids"].clone();
    assert_eq!(lone_long.as_array().unwrap().len(), 300);
    let lone: Vec<Value> = pics
        .iter()
        .enumerate()
        .map(|(i, p)| post(&chat_url, &chat(short_q[i % 2], p, 16, false)).1["token_ids"].clone())
        .collect();
    let (joined0, admitted0) = (metric(&url, "qadapt_joined_running_total"), metric(&url, "qadapt_batched_jobs_total"));
    let (u, img) = (Arc::clone(&chat_url), Arc::clone(&long_img));
    let long = std::thread::spawn(move || post(&u, &chat(long_q, &img, 300, false)));
    // Once the long answer is decoding (admitted), the others arrive.
    let t0 = std::time::Instant::now();
    while metric(&url, "qadapt_batched_jobs_total") == admitted0 {
        assert!(t0.elapsed().as_secs() < 10);
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    let shorts: Vec<_> = pics
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let (u, p) = (Arc::clone(&chat_url), p.clone());
            std::thread::spawn(move || post(&u, &chat(short_q[i % 2], &p, 16, false)))
        })
        .collect();
    for (i, s) in shorts.into_iter().enumerate() {
        let (code, r) = s.join().unwrap();
        assert_eq!(code, 200, "{r}");
        assert_eq!(r["token_ids"], lone[i], "request {i} joined a running batch and answered differently");
    }
    let (code, r) = long.join().unwrap();
    assert_eq!(code, 200, "{r}");
    assert_eq!(r["token_ids"], lone_long, "the long answer changed when others joined its batch");
    let joined = metric(&url, "qadapt_joined_running_total") - joined0;
    println!("{joined} of {} requests joined a running batch; all answers equal lone ones", pics.len());
    assert_eq!(joined, pics.len() as f64, "requests that arrived during a decode did not join it");
    server.shutdown();
}
