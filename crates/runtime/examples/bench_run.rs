//! Times the runtime's generation loop: image → first token (TTFT) and decode ms/token at batch
//! `B`, greedy, as `bench/cpu_run.sh` and `bench/gpu.sh` report it. Prints one JSON line.
//!
//!   bench_run EXPORT IMAGE QUESTION NEW_TOKENS REPS BATCH [cpu|cpu-fixed|cuda|cuda-graph|tensorrt]

use std::time::Instant;

use runtime::{Ep, GenerateOptions, Placement, Runtime};

fn main() -> anyhow::Result<()> {
    let a: Vec<String> = std::env::args().collect();
    anyhow::ensure!(
        a.len() >= 7,
        "usage: bench_run EXPORT IMAGE QUESTION NEW_TOKENS REPS BATCH [cpu|cpu-fixed|cuda|cuda-graph|tensorrt]"
    );
    let (new, reps, batch): (usize, usize, usize) = (a[4].parse()?, a[5].parse()?, a[6].parse()?);
    // `cuda-graph`: CUDA with decode steps replayed as CUDA graphs; `cpu-fixed`: the same
    // fixed-shape steps run eagerly on the CPU (what the graphs cost without their launch savings).
    let mode = a.get(7).map(String::as_str);
    let ep = match mode {
        Some("cuda" | "cuda-graph") => Ep::Cuda,
        Some("tensorrt") => Ep::Tensorrt,
        _ => Ep::Cpu,
    };
    let t_open = Instant::now();
    let mut rt = Runtime::open_with(
        std::path::Path::new(&a[1]),
        &Placement {
            ep,
            max_batch: batch,
            cuda_graph: mode == Some("cuda-graph"),
            fixed_steps: mode == Some("cpu-fixed"),
            ..Default::default()
        },
        None,
    )?;
    let open_s = t_open.elapsed().as_secs_f64();
    let img = qadapt_core::image::load_image(std::path::Path::new(&a[2]))?;
    if let Ok(path) = std::env::var("QADAPT_BENCH_DUMP") {
        // The exact inputs, so that a peer runs the same graphs on the same numbers.
        use qadapt_core::template;
        let p = template::tokenize_prompt(&rt.tokenizer, &template::prompt(&template::user_turn(&a[3]), None))?;
        let q = match &rt.qformer_tokenizer {
            Some(t) => Some(t.encode(&template::qformer_text(&a[3]))?),
            None => None,
        };
        let px = qadapt_core::image::pixel_values(&img, &rt.preprocess);
        let m = &rt.manifest;
        let dump = serde_json::json!({"prompt_ids": p.ids, "image_pos": p.image_pos, "qformer_ids": q, "pixel_values": px,
            "image_size": m.image.size, "layers": m.decoder.layers, "heads": m.decoder.heads, "head_dim": m.decoder.head_dim, "eos": m.tokens.eos, "f16": m.dtype == "f16"});
        std::fs::write(&path, dump.to_string())?;
    }
    let imgs: Vec<&image::RgbImage> = (0..batch).map(|_| &img).collect();
    let run = |rt: &mut Runtime, n: usize| -> anyhow::Result<(f64, Vec<u32>)> {
        let t = Instant::now();
        let out =
            rt.generate_batch(&imgs, &a[3], &GenerateOptions { max_new_tokens: n, ..Default::default() }, |_, _| {})?;
        Ok((t.elapsed().as_secs_f64() * 1e3, out[0].token_ids.clone()))
    };
    let t_pre = Instant::now();
    let _ = qadapt_core::image::pixel_values(&img, &rt.preprocess);
    let preprocess_ms = t_pre.elapsed().as_secs_f64() * 1e3;
    run(&mut rt, 2)?; // warm-up: first runs allocate arenas (and build TensorRT engines)
    let (mut ttft, mut full, mut vision) = (Vec::new(), Vec::new(), Vec::new());
    let mut ids = Vec::new();
    for _ in 0..reps {
        // The image graph alone: TTFT minus this is the decoder's prefill (what a text-only peer does).
        let t = Instant::now();
        rt.image_features(&imgs, &a[3])?;
        vision.push(t.elapsed().as_secs_f64() * 1e3);
        ttft.push(run(&mut rt, 1)?.0);
        let (ms, i) = run(&mut rt, new)?;
        full.push(ms);
        ids = i;
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (t1, tn, tv) = (med(&mut ttft), med(&mut full), med(&mut vision));
    let prompt_tokens = {
        use qadapt_core::template;
        let p = template::tokenize_prompt(&rt.tokenizer, &template::prompt(&template::user_turn(&a[3]), None))?;
        p.spliced_len(rt.manifest.image.tokens)
    };
    let steps = ids.len().saturating_sub(1).max(1);
    println!(
        "{}",
        serde_json::json!({"ep": rt.ep, "batch": batch, "ttft_ms": t1, "decode_ms_per_token": (tn - t1) / steps as f64, "tokens": ids.len(), "ids": ids, "open_s": open_s, "preprocess_ms": preprocess_ms, "vision_ms": tv, "prompt_tokens": prompt_tokens, "fixed_steps": rt.fixed_steps_run()})
    );
    Ok(())
}
