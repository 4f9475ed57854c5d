//! The subcommands' glue: arguments → library config → run → a short report on stderr.

use anyhow::Context;
use models::train_source::LoraSpec;

use crate::args::{EvalArgs, InitArgs, MergeArgs, SynthArgs, TrainArgs};
use crate::data::Task;
use crate::train::{Stage, TrainConfig};

/// `stage1` / `stage2`.
pub fn train(a: &TrainArgs, stage: Stage) -> anyhow::Result<()> {
    let (cfg, resume) = match &a.resume {
        Some(run) => {
            let p = run.join("train_config.json");
            let text = std::fs::read_to_string(&p)
                .with_context(|| format!("--resume {}: reading train_config.json", run.display()))?;
            let cfg: TrainConfig = serde_json::from_str(&text).with_context(|| format!("{}: invalid", p.display()))?;
            anyhow::ensure!(
                cfg.stage == stage,
                "--resume {}: that run is {:?}, not {stage:?}",
                run.display(),
                cfg.stage
            );
            (cfg, true)
        }
        None => {
            let (Some(model), Some(images), Some(out)) = (a.model.clone(), a.images.clone(), a.out.clone()) else {
                anyhow::bail!("--model, --data, --images and --out are required without --resume");
            };
            let llm_scope = "model.layers.".to_string();
            let mut scopes = vec![llm_scope];
            if !a.no_vision_lora {
                scopes.push(format!("{}.encoder.layers.", models::bunny::VISION_PREFIX));
            }
            let lora = LoraSpec {
                r: a.lora_r,
                alpha: a.lora_alpha,
                dropout: a.lora_dropout,
                targets: a.lora_targets.clone(),
                scopes,
            };
            let cfg = TrainConfig {
                stage,
                model,
                stage1: a.stage1.clone(),
                data: a.data.clone(),
                images,
                out,
                task: a.task.unwrap_or(if stage == Stage::Stage1 { Task::Explanation } else { Task::All }),
                lora: (stage == Stage::Stage1).then_some(lora),
                lr: a.lr,
                connector_lr: a.connector_lr,
                weight_decay: a.weight_decay,
                warmup_ratio: a.warmup_ratio,
                max_grad_norm: a.max_grad_norm,
                epochs: a.epochs,
                max_steps: a.max_steps,
                batch_size: a.batch_size,
                grad_accum: a.grad_accum,
                max_length: a.max_length,
                seed: a.seed,
                save_every: a.save_every,
                unfreeze_qformer: a.unfreeze_qformer,
                qformer_init: a.qformer_init.clone(),
                device: a.device.clone(),
                dtype: a.dtype,
                random_weights: a.random_weights,
            };
            (cfg, false)
        }
    };
    let s = crate::train::run(&cfg, resume)?;
    eprintln!(
        "{:?} done: {} steps, {} samples in {:.1} s ({:.2} samples/s); loss {:.4} → {:.4} (mean of last 10: {:.4}); {} trainable parameters; adapter in {}",
        s.stage, s.steps, s.samples, s.seconds, s.samples_per_s, s.first_loss, s.final_loss, s.mean_last10_loss, s.trainable_params, s.adapter_dir.display()
    );
    Ok(())
}

/// `merge`.
pub fn merge(a: &MergeArgs) -> anyhow::Result<()> {
    let (n, shards) = crate::merge::run(
        &a.model,
        &a.stage1,
        a.stage2.as_deref(),
        &a.out,
        a.dtype.map(|d| d.candle()),
        a.shard_mib << 20,
    )?;
    eprintln!("merged {n} tensors into {} ({shards} shard(s))", a.out.display());
    Ok(())
}

/// `init`.
pub fn init(a: &InitArgs) -> anyhow::Result<()> {
    let opts = crate::init::InitOptions {
        config: a.config.clone(),
        out: a.out.clone(),
        seed: a.seed,
        tokenizer: a.tokenizer.clone(),
        data: a.data.clone(),
        bpe_vocab: a.bpe_vocab,
        dtype: a.dtype.candle(),
        shard_bytes: a.shard_mib << 20,
    };
    let (n, params, shards) = crate::init::run(&opts)?;
    eprintln!("wrote {} with {n} tensors, {:.3} M parameters, {shards} shard(s)", a.out.display(), params as f64 / 1e6);
    Ok(())
}

/// `synth`.
pub fn synth(a: &SynthArgs) -> anyhow::Result<()> {
    let (train, test) = crate::synth::generate(&a.out, a.n, a.size, a.seed, a.test_fraction)?;
    eprintln!("wrote {} images, {train} training and {test} held-out conversations to {}", a.n, a.out.display());
    Ok(())
}

/// `eval`.
pub fn eval(a: &EvalArgs) -> anyhow::Result<()> {
    let split = Some(a.split.as_str()).filter(|s| *s != "all");
    let r = crate::eval::run(&a.model, a.adapter.as_deref(), &a.data, &a.images, a.labels.as_deref(), split, a.limit)?;
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
        return Ok(());
    }
    for (k, e) in &r.answering {
        println!("{k:<16} {:>4}/{:<4} accuracy {:.3} (chance {:.3})", e.correct, e.total, e.accuracy, e.chance);
    }
    println!("overall accuracy {:.3}", r.overall_accuracy);
    if let (Some(s), Some(p)) = (r.srocc, r.plcc) {
        println!("score vs mos over {} images: SROCC {s:.3}, PLCC {p:.3}", r.scored_images);
    }
    Ok(())
}
