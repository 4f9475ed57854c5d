//! The subcommands' glue: arguments → library config → run → a short report on stderr.

use anyhow::Context;

use crate::args::{AblateArgs, EvalArgs, InitArgs, MergeArgs, PlanArgs, SynthArgs, TrainArgs};
use crate::data::Task;
use crate::train::{Modules, Stage, TrainConfig};

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
            if stage == Stage::Stage2 && a.stage1.is_none() {
                anyhow::bail!("stage 2 needs --stage1 RUN1 (the stage-1 LoRA is merged and frozen)");
            }
            let modules = match &a.train {
                Some(list) => Modules::parse(list).map_err(|e| anyhow::anyhow!("--train: {e}"))?,
                None => Modules::of_stage(stage, a.no_vision_lora),
            };
            let cfg = TrainConfig {
                stage,
                model,
                stage1: a.stage1.clone(),
                data: a.data.clone(),
                images,
                out,
                task: a.task.unwrap_or(if stage == Stage::Stage1 { Task::Explanation } else { Task::All }),
                lora: a.settings.lora(modules),
                lr: a.settings.lr,
                connector_lr: a.settings.connector_lr,
                weight_decay: a.settings.weight_decay,
                warmup_ratio: a.settings.warmup_ratio,
                max_grad_norm: a.settings.max_grad_norm,
                epochs: a.epochs,
                max_steps: a.max_steps,
                batch_size: a.settings.batch_size,
                grad_accum: a.settings.grad_accum,
                max_length: a.settings.max_length,
                seed: a.seed,
                save_every: a.save_every,
                unfreeze_qformer: a.unfreeze_qformer,
                qformer_init: a.qformer_init.clone(),
                device: a.settings.device.clone(),
                dtype: a.settings.dtype,
                random_weights: a.random_weights,
                modules: Some(modules),
                gradient_checkpointing: a.settings.gradient_checkpointing,
            };
            (cfg, false)
        }
    };
    let s = crate::train::run(&cfg, resume)?;
    eprintln!(
        "{:?} done: {} steps, {} samples in {:.1} s ({:.2} samples/s); loss {:.4} → {:.4} (mean of last 10: {:.4}); {} trainable parameters; peak RSS {}; adapter in {}",
        s.stage, s.steps, s.samples, s.seconds, s.samples_per_s, s.first_loss, s.final_loss, s.mean_last10_loss, s.trainable_params,
        s.peak_rss_mb.map_or("unknown".to_string(), |m| format!("{m:.0} MB")), s.adapter_dir.display()
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
    let inputs = crate::eval::EvalInputs {
        data: a.data.as_deref(),
        qbench: a.qbench.as_deref(),
        images: &a.images,
        labels: a.labels.as_deref(),
        split,
        limit: a.limit,
    };
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_style(
        indicatif::ProgressStyle::with_template("eval {spinner} {pos} questions and images {elapsed}")
            .map_err(|e| anyhow::anyhow!("{e}"))?,
    );
    let r = crate::eval::run(&a.model, a.adapter.as_deref(), &inputs, || bar.inc(1))?;
    bar.finish_and_clear();
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
        return Ok(());
    }
    for (k, e) in &r.answering {
        println!("{k:<16} {:>4}/{:<4} accuracy {:.3} (chance {:.3})", e.correct, e.total, e.accuracy, e.chance);
    }
    if !r.answering.is_empty() {
        println!("overall accuracy {:.3} ({} option answers named no option)", r.overall.accuracy, r.overall.unmatched);
    }
    if !r.qbench.is_empty() {
        print!("{}", qadapt_core::qbench::markdown(&r.qbench));
        for f in &r.qbench[0].failed {
            eprintln!("skipped {f}");
        }
    }
    if let (Some(s), Some(p)) = (r.srocc, r.plcc) {
        println!("score vs mos over {} images: SROCC {s:.3}, PLCC {p:.3}", r.scored_images);
    }
    Ok(())
}

/// `ablate`.
pub fn ablate(a: &AblateArgs) -> anyhow::Result<()> {
    use crate::ablate::{self, AblateConfig, Budget};
    let custom = match &a.recipe_file {
        Some(p) => ablate::read_recipes(p)?,
        None => Vec::new(),
    };
    let cfg = AblateConfig {
        model: a.model.clone(),
        data: a.data.clone(),
        test: a.test.clone(),
        images: a.images.clone(),
        test_images: a.test_images.clone().unwrap_or_else(|| a.images.clone()),
        labels: a.labels.clone(),
        split: Some(a.split.clone()).filter(|s| s != "all"),
        out: a.out.clone(),
        recipes: ablate::select(&a.recipes, &custom)?,
        seeds: a.seeds.clone(),
        budget: a.max_steps.map_or(Budget::Epochs(a.epochs), Budget::Steps),
        settings: a.settings.clone(),
        eval_limit: a.eval_limit,
    };
    let rows = ablate::run(&cfg)?;
    let out = cfg.out.join("ablation.md");
    print!("{}", std::fs::read_to_string(&out).with_context(|| format!("reading {}", out.display()))?);
    eprintln!("{} runs; results in {} (ablation.json, ablation.md, ablation.png)", rows.len(), cfg.out.display());
    Ok(())
}

/// `plan`: one table (or JSON line) per stage.
pub fn plan(a: &PlanArgs) -> anyhow::Result<()> {
    let config = crate::plan::read_config(&a.config)?;
    let st = &a.settings;
    let stages = match a.stage {
        Some(1) => vec![Stage::Stage1],
        Some(_) => vec![Stage::Stage2],
        None => vec![Stage::Stage1, Stage::Stage2],
    };
    let gb = |b: usize| b as f64 / 1e9;
    for stage in stages {
        let modules = Modules::of_stage(stage, a.no_vision_lora);
        let qformer_tokens =
            a.qformer_tokens.unwrap_or_else(|| config.qformer_config.clone().unwrap_or_default().max_text_length);
        let input = crate::plan::PlanInput {
            stage,
            modules,
            dtype: st.dtype.candle(),
            batch_size: st.batch_size,
            max_length: st.max_length,
            answer_tokens: a.answer_tokens,
            qformer_tokens,
            gradient_checkpointing: st.gradient_checkpointing,
            lora: st.lora(modules),
            unfreeze_qformer: a.unfreeze_qformer,
        };
        let p = crate::plan::plan(&config, &input).with_context(|| format!("planning {}", stage.title()))?;
        if a.json {
            let mut v = serde_json::to_value(p)?;
            v["stage"] = stage.title().into();
            v["peak"] = p.peak().into();
            println!("{v}");
            continue;
        }
        let answers = a.answer_tokens.map_or("every text token".to_string(), |n| n.to_string());
        println!(
            "{} ({}): {}, batch {}, {} tokens per sample (answers: {answers}), checkpointing {}",
            stage.title(),
            modules.names().join(" + "),
            st.dtype.name(),
            st.batch_size,
            st.max_length,
            if st.gradient_checkpointing { "on" } else { "off" },
        );
        println!("  weights            {:8.3} GB  {} frozen parameters", gb(p.weights), p.frozen_params);
        println!(
            "  LoRA + optimizer   {:8.3} GB  {} trainable: f32 weight, gradient, AdamW m and v",
            gb(p.trainable),
            p.trainable_params
        );
        println!(
            "  activations        {:8.3} GB  {:.3} GB kept for the backward pass + its gradients",
            gb(p.activations),
            gb(p.activations_kept)
        );
        println!("  workspace          {:8.3} GB  process, libraries, the batch's pixels", gb(p.workspace));
        println!("  peak               {:8.3} GB", gb(p.peak()));
    }
    Ok(())
}
