//! HTTP helpers of the server tests: a server on a fixture export, request bodies, a real client.

use std::io::{BufRead, BufReader};
use std::path::Path;

use base64::Engine as _;
use runtime::serve::{Config, Server};
use runtime::{Ep, Runtime};
use serde_json::{json, Value};

pub fn data_url(p: &Path) -> String {
    format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(std::fs::read(p).unwrap()))
}

pub fn start(dir: &Path, cfg: Config) -> (Server, String) {
    let rt = Runtime::open(dir, Ep::Cpu, 0, false, None).unwrap();
    let server = Server::start(rt, "127.0.0.1:0", cfg).unwrap();
    let url = format!("http://{}", server.addr().unwrap());
    (server, url)
}

pub fn chat(question: &str, image: &str, max_tokens: usize, stream: bool) -> Value {
    json!({
        "model": "qadapt",
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": question}]}],
        "max_tokens": max_tokens,
        "stream": stream,
    })
}

/// (status, body) of a POST, error statuses included.
pub fn post(url: &str, body: &Value) -> (u16, Value) {
    match ureq::post(url).send_json(body.clone()) {
        Ok(r) => (r.status(), r.into_json().unwrap()),
        Err(ureq::Error::Status(code, r)) => (code, r.into_json().unwrap_or(Value::Null)),
        Err(e) => panic!("{url}: {e}"),
    }
}

/// The streamed text and the number of `data:` events before `[DONE]`.
pub fn stream(url: &str, body: &Value) -> (String, usize) {
    let r = ureq::post(url).send_json(body.clone()).unwrap();
    assert_eq!(r.header("content-type"), Some("text/event-stream"));
    let (mut text, mut events, mut done) = (String::new(), 0, false);
    for line in BufReader::new(r.into_reader()).lines() {
        let line = line.unwrap();
        let Some(data) = line.strip_prefix("data: ") else { continue };
        if data == "[DONE]" {
            done = true;
            break;
        }
        let v: Value = serde_json::from_str(data).unwrap();
        assert!(v.get("error").is_none(), "{v}");
        text += v["choices"][0]["delta"]["content"].as_str().unwrap_or("");
        events += 1;
    }
    assert!(done, "the stream ended without [DONE]");
    (text, events)
}

pub fn metric(url: &str, name: &str) -> f64 {
    let m = ureq::get(&format!("{url}/metrics")).call().unwrap().into_string().unwrap();
    m.lines().find_map(|l| l.strip_prefix(&format!("{name} "))).unwrap_or("0").parse().unwrap()
}
