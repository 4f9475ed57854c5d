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

/// The fixed-shape decode steps of `--cuda-graph`, run eagerly on the CPU (`Placement::fixed_steps`):
/// cache buffers from a pool (one set per batch size, `max_positions` slots), step inputs overwritten
/// in place, an attention mask as wide as the buffer. Answers, scores and option likelihoods equal
/// the default path's; the one-token steps really ran on the pool; a later request of the same
/// size runs on the same buffers and inputs (what a captured CUDA graph needs); continuous batching
/// (caches regrouped off the pool) falls back to eager steps and answers the same.
#[test]
fn fixed_shape_steps_answer_as_eager_steps_on_pooled_buffers() {
    for fx in ["bunny_f32_bpe", "qadapt_f32_sharded"] {
        let (_tmp, dir) = exported_variant(fx, true);
        let mut eager = Runtime::open(&dir, Ep::Cpu, 0, false, None).unwrap();
        let place = runtime::Placement { fixed_steps: true, ..Default::default() };
        let mut fixed = Runtime::open_with(&dir, &place, None).unwrap();
        assert_eq!((fixed.fixed_steps_run(), fixed.fixed_step_addresses().len()), (0, 0));
        let img = qadapt_core::image::load_image(&fixtures().join(format!("{fx}/image.png"))).unwrap();
        let opts = |n| GenerateOptions { max_new_tokens: n, ..Default::default() };
        let q = "Describe the quality of this image in detail: sharpness, noise and colour.";

        let want = eager.generate(&img, q, &opts(12), |_| {}).unwrap().token_ids;
        assert_eq!(fixed.generate(&img, q, &opts(12), |_| {}).unwrap().token_ids, want, "{fx}");
        // Every token after the prefill's first came from a fixed-shape step (an answer shorter
        // than the budget ended at <|endoftext|>, which a step sampled too).
        let steps = want.len() + usize::from(want.len() < 12) - 1;
        assert_eq!(fixed.fixed_steps_run(), steps, "{fx}");
        let addresses = fixed.fixed_step_addresses();
        assert!(!addresses.is_empty());
        // Logits, not only greedy ids: 8 steps on both paths from the same prefill.
        use qadapt_core::template::{prompt, tokenize_prompt, user_turn};
        let p = tokenize_prompt(&eager.tokenizer, &prompt(&user_turn(q), None)).unwrap();
        let mut ids: Vec<i64> = p.ids.iter().map(|&i| i64::from(i)).collect();
        ids.insert(p.image_pos.unwrap_or(0), -200);
        let feats = eager.image_features(&[&img], q).unwrap();
        let (mut le, mut ce) = eager.prefill_ids(&ids, &feats).unwrap();
        let (mut lf, mut cf) = fixed.prefill_ids(&ids, &feats).unwrap();
        let before = fixed.fixed_steps_run();
        for step in 0..8 {
            let worst = le.iter().zip(&lf).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(worst < 1e-5, "{fx}: step {step}: logits differ by {worst}");
            let next = (0..le.len()).fold(0, |b, i| if le[i] > le[b] { i } else { b }) as u32;
            (le, ce) = eager.next_logits(&[next], &ce).unwrap();
            (lf, cf) = fixed.next_logits(&[next], &cf).unwrap();
        }
        assert_eq!(fixed.fixed_steps_run() - before, 8);
        drop((ce, cf));

        // Two rows: a second pooled set; then one row again, on the first set's buffers.
        let batch = |rt: &mut Runtime| -> Vec<Vec<u32>> {
            let out = rt.generate_batch(&[&img, &img], q, &opts(6), |_, _| {}).unwrap();
            out.into_iter().map(|a| a.token_ids).collect()
        };
        assert_eq!(batch(&mut fixed), batch(&mut eager), "{fx}");
        let two_sets = fixed.fixed_step_addresses();
        assert!(two_sets.len() > addresses.len(), "the two-row batch has its own set");
        assert_eq!(two_sets[..addresses.len()], addresses[..], "{fx}: a pooled set's inputs moved");
        let before = fixed.fixed_steps_run();
        assert_eq!(fixed.generate(&img, q, &opts(12), |_| {}).unwrap().token_ids, want, "{fx}");
        assert_eq!(fixed.fixed_steps_run() - before, steps);
        // No third set: the one-row request reused the first set's buffers.
        assert_eq!(fixed.fixed_step_addresses(), two_sets, "{fx}");

        // Prefill-only and option scoring run eagerly on pooled buffers.
        let (s_eager, s_fixed) = (eager.score(&img).unwrap().0, fixed.score(&img).unwrap().0);
        assert!((s_eager - s_fixed).abs() < 1e-5, "{fx}: score {s_eager} vs {s_fixed}");
        let opts_ab = ["good", "poor quality"];
        let (c_eager, c_fixed) = (
            eager.choices(&img, "How is it?", &opts_ab).unwrap(),
            fixed.choices(&img, "How is it?", &opts_ab).unwrap(),
        );
        for (a, b) in c_eager.iter().zip(&c_fixed) {
            assert!((a.log_prob - b.log_prob).abs() < 1e-5, "{fx}: {} {} vs {}", a.option, a.log_prob, b.log_prob);
        }

        // Continuous batching regroups caches off the pool: those steps run eagerly, same answers.
        let qs = [(q, 10), ("Sharp?", 3), ("Is the exposure right?", 6)];
        let req =
            |i: usize| Request { image: &img, question: qs[i].0, history: &[], opts: opts(qs[i].1), cancel: None };
        let reqs: Vec<Request> = (0..3).map(req).collect();
        let ids = |rt: &mut Runtime| -> Vec<Vec<u32>> {
            rt.generate_mixed(&reqs, |_, _| {}).unwrap().into_iter().map(|a| a.token_ids).collect()
        };
        assert_eq!(ids(&mut fixed), ids(&mut eager), "{fx}");
        println!("{fx}: {} fixed-shape steps, answers equal to the eager path's", fixed.fixed_steps_run());
    }
}
