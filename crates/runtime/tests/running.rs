//! `runtime::Running`, the batch that rows join and leave, on a fixture export: a row that leaves
//! takes the padding only it needed with it, and the rows that go on answer as lone runs; an export
//! without the cache graphs still batches (finished rows idle) and refuses to admit mid-way.

mod common;

use common::{exported, exported_variant, fixtures};
use runtime::{Ep, GenerateOptions, Request, Running, Runtime};

#[test]
fn a_leaving_row_takes_the_shared_padding_with_it() {
    let (_tmp, dir) = exported("bunny_f32_bpe"); // its greedy answers never reach <|endoftext|>
    let mut rt = Runtime::open(&dir, Ep::Cpu, 0, false, None).unwrap();
    let img = qadapt_core::image::load_image(&fixtures().join("bunny_f32_bpe/image.png")).unwrap();
    let long_q = "Describe the quality of this image in detail: sharpness, noise, exposure and colour.";
    let short_q = "Sharp?";
    let opts = |n| GenerateOptions { max_new_tokens: n, ..Default::default() };
    let lone_short = rt.generate(&img, short_q, &opts(12), |_| {}).unwrap().token_ids;
    let lone_long = rt.generate(&img, long_q, &opts(3), |_| {}).unwrap().token_ids;
    let mut run = Running::default();
    run.admit(
        &mut rt,
        vec![
            ("long", Request { image: &img, question: long_q, history: &[], opts: opts(3), cancel: None }),
            ("short", Request { image: &img, question: short_q, history: &[], opts: opts(12), cancel: None }),
        ],
    )
    .unwrap();
    let len_of = |q: &str| -> usize {
        use qadapt_core::template::{prompt, tokenize_prompt, user_turn};
        tokenize_prompt(&rt.tokenizer, &prompt(&user_turn(q), None)).unwrap().spliced_len(rt.manifest.image.tokens)
    };
    let (long_len, short_len) = (len_of(long_q), len_of(short_q));
    assert!(long_len > short_len);
    // The short row is left-padded to the long prompt's length.
    assert_eq!(run.cache_len(), long_len);
    let mut answers = std::collections::HashMap::new();
    let mut steps = 0;
    while !run.is_empty() {
        for (tag, a) in run.step(&mut rt, |_, _| {}, |_| false).unwrap() {
            answers.insert(tag, (steps, a.token_ids));
        }
        steps += 1;
        if answers.contains_key("long") && !answers.contains_key("short") {
            // Only the short row is left: its cache holds its own prompt and tokens, no padding.
            assert_eq!(run.cache_len(), short_len + steps, "the padding only the long row needed stayed");
        }
    }
    assert_eq!(answers["long"].1, lone_long);
    assert_eq!(answers["short"].1, lone_short, "the row that went on answered differently after the trim");
    println!("long prompt {long_len}, short {short_len} positions: after the long row left (step {}), the short row's cache lost its padding and it answered as alone", answers["long"].0 + 1);
}

/// An export from before the cache graphs: a batch cannot regroup, so finished rows idle until the
/// last one stops, and every answer is still the lone one.
#[test]
fn exports_without_cache_graphs_still_batch() {
    let (_tmp, dir) = exported("bunny_f32_bpe");
    let manifest = dir.join("qadapt.json");
    let mut m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&manifest).unwrap()).unwrap();
    for g in ["cache_join", "cache_select"] {
        std::fs::remove_file(dir.join(m["graphs"][g].as_str().unwrap())).unwrap();
        m["graphs"].as_object_mut().unwrap().remove(g);
    }
    std::fs::write(&manifest, m.to_string()).unwrap();
    let mut rt = Runtime::open(&dir, Ep::Cpu, 0, false, None).unwrap();
    assert!(!rt.can_regroup());
    let img = qadapt_core::image::load_image(&fixtures().join("bunny_f32_bpe/image.png")).unwrap();
    let opts = |n| GenerateOptions { max_new_tokens: n, ..Default::default() };
    let qs = [("Describe the quality of this image in detail.", 3), ("Sharp?", 9)];
    let lone: Vec<Vec<u32>> =
        qs.iter().map(|&(q, n)| rt.generate(&img, q, &opts(n), |_| {}).unwrap().token_ids).collect();
    let reqs: Vec<Request> = qs
        .iter()
        .map(|&(q, n)| Request { image: &img, question: q, history: &[], opts: opts(n), cancel: None })
        .collect();
    let got: Vec<Vec<u32>> = rt.generate_mixed(&reqs, |_, _| {}).unwrap().into_iter().map(|a| a.token_ids).collect();
    assert_eq!(got, lone);
    // A running batch of such an export admits nothing more.
    let mut run = Running::default();
    run.admit(&mut rt, vec![(0, reqs[0])]).unwrap();
    let err = run.admit(&mut rt, vec![(1, reqs[1])]).unwrap_err().to_string();
    assert!(err.contains("re-export"), "{err}");
}

/// A fused export's batch: rows live in their own slots of in-place buffers (right-padded). A row
/// admitted while another decodes (its buffers joined, the shorter grown at its end) and rows that
/// leave early (their slots gathered away) all answer as lone runs.
#[test]
fn fused_rows_join_leave_and_answer_as_alone() {
    let (_tmp, dir) = exported_variant("bunny_f32_bpe", true);
    let mut rt = Runtime::open(&dir, Ep::Cpu, 0, false, None).unwrap();
    assert_eq!(rt.manifest.variant.as_deref(), Some("fused"));
    let img = qadapt_core::image::load_image(&fixtures().join("bunny_f32_bpe/image.png")).unwrap();
    let opts = |n| GenerateOptions { max_new_tokens: n, ..Default::default() };
    let qs = [
        ("Describe the quality of this image in detail: sharpness, noise and colour.", 20),
        ("Sharp?", 4),
        ("Is the exposure right?", 9),
    ];
    let lone: Vec<Vec<u32>> =
        qs.iter().map(|&(q, n)| rt.generate(&img, q, &opts(n), |_| {}).unwrap().token_ids).collect();
    let req = |i: usize| Request { image: &img, question: qs[i].0, history: &[], opts: opts(qs[i].1), cancel: None };
    // Two rows of different prompt lengths prefilled together (right-padded), one more after 3 steps.
    let mut run = Running::default();
    run.admit(&mut rt, vec![(0, req(0)), (1, req(1))]).unwrap();
    let mut answers = std::collections::HashMap::new();
    let mut steps = 0;
    while !run.is_empty() {
        if steps == 3 {
            run.admit(&mut rt, vec![(2, req(2))]).unwrap();
        }
        for (tag, a) in run.step(&mut rt, |_, _| {}, |_| false).unwrap() {
            answers.insert(tag, a.token_ids);
        }
        steps += 1;
    }
    for (i, l) in lone.iter().enumerate() {
        assert_eq!(&answers[&i], l, "row {i} answered differently in the fused batch");
    }
    // The whole batch through generate_mixed too.
    let reqs: Vec<Request> = (0..3).map(req).collect();
    let got: Vec<Vec<u32>> = rt.generate_mixed(&reqs, |_, _| {}).unwrap().into_iter().map(|a| a.token_ids).collect();
    assert_eq!(got, lone);
    println!("fused batch: 3 rows (one admitted mid-decode, two leaving early) answered as lone runs");
}
