//! `qadapt-train infer`.

use std::io::Write;

use anyhow::Context;
use models::{Engine, GenerateOptions};
use qadapt_core::image::load_image;
use qadapt_core::sampling::{score_output, SamplingParams};

use crate::args::InferArgs;

/// Runs one question (or the quality score) and prints the result.
pub fn run(args: &InferArgs) -> anyhow::Result<()> {
    let device = crate::device(&args.device)?;
    let img = load_image(&args.image)?;
    let engine = Engine::load(&args.model, args.adapter.as_deref(), &device, args.dtype.candle())
        .with_context(|| format!("loading model {}", args.model.display()))?;
    let mut out = std::io::stdout().lock();
    if args.score {
        writeln!(out, "{}", score_output(&engine.score_json(&img)?, args.json))?;
        return Ok(());
    }
    let question = args.ask.as_deref().context("--ask is required unless --score is given")?;
    let opts = GenerateOptions {
        max_new_tokens: args.max_new_tokens,
        sampling: SamplingParams {
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
            seed: args.seed,
            repetition_penalty: args.repetition_penalty,
        },
        logprobs: None,
    };
    let stream = !args.json;
    let res = engine.generate(&img, question, &opts, |piece| {
        if stream {
            // A closed stdout must not abort generation midway; the final write reports it.
            let _ = write!(std::io::stdout(), "{piece}").and_then(|_| std::io::stdout().flush());
        }
    })?;
    if args.json {
        writeln!(out, "{}", serde_json::to_string(&res)?)?;
    } else {
        writeln!(out)?;
    }
    Ok(())
}
