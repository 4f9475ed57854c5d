//! `--verify`: every written graph runs through ONNX Runtime (CPU) on random inputs and is compared
//! with the candle interpreter running the same forward pass.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use models::{Bunny, Candle, QFormerText};
use ort::session::Session;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::graph::FloatType;
use crate::{ExportError, Result};

/// ONNX Runtime for verification (the runtime's process-wide environment): `lib`, else
/// `ORT_DYLIB_PATH`.
pub fn environment(lib: Option<&Path>) -> Result<&'static ort::environment::Environment> {
    if lib.is_none() && std::env::var_os("ORT_DYLIB_PATH").is_none() {
        return Err(ExportError::Ort(
            "--verify needs ONNX Runtime: pass --ort-lib PATH/libonnxruntime.so or set ORT_DYLIB_PATH (or --no-verify)"
                .into(),
        ));
    }
    runtime_ort::environment(lib).map_err(|e| ExportError::Ort(e.to_string()))
}

/// One graph input: floats (sent in the export type) or int64.
enum Input {
    F(Tensor),
    I(Vec<usize>, Vec<i64>),
}

fn ort_err(what: &str) -> impl Fn(ort::Error) -> ExportError + '_ {
    move |e| ExportError::Ort(format!("{what}: {e}"))
}

fn run_err(e: runtime_ort::RunError) -> ExportError {
    ExportError::Ort(e.to_string())
}

fn to_ort(x: &Input, ft: FloatType) -> Result<ort::session::SessionInputValue<'static>> {
    match x {
        Input::F(t) => {
            let shape: Vec<i64> = t.dims().iter().map(|&d| d as i64).collect();
            let v = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
            runtime_ort::floats(shape, v, ft == FloatType::F16).map_err(run_err)
        }
        Input::I(shape, v) => runtime_ort::ints(shape.iter().map(|&d| d as i64).collect(), v.clone()).map_err(run_err),
    }
}

/// Runs `graph` and returns the named outputs as f32.
fn run_ort(
    env: &ort::environment::Environment,
    graph: &Path,
    inputs: &[(&str, &Input)],
    outputs: &[&str],
    ft: FloatType,
) -> Result<Vec<Vec<f32>>> {
    let what = graph.display().to_string();
    let mut session = Session::builder(env).map_err(ort_err(&what))?.commit_from_file(graph).map_err(ort_err(&what))?;
    let mut feed = Vec::with_capacity(inputs.len());
    for (name, x) in inputs {
        feed.push((std::borrow::Cow::Owned(name.to_string()), to_ort(x, ft)?));
    }
    let out = session.run(feed).map_err(ort_err(&what))?;
    let mut res = Vec::new();
    for name in outputs {
        let v = out.get(*name).ok_or_else(|| ExportError::Ort(format!("{what}: no output {name}")))?;
        let data = runtime_ort::out_f32(v).map_err(run_err)?;
        res.push(data);
    }
    Ok(res)
}

/// `max |a − b| / max |b|`.
pub fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    if a.len() != b.len() {
        return f32::INFINITY;
    }
    let diff = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
    let scale = b.iter().map(|y| y.abs()).fold(0.0f32, f32::max).max(1e-6);
    diff / scale
}

fn flat(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?)
}

/// The worst relative error of one graph, per output.
pub type Report = Vec<(String, f32)>;

/// Runs the three model graphs in `dir` (vision, embed, decoder) against `model` (loaded in `dtype`
/// on the CPU, which runs the candle side in that type too). The two cache graphs compute no model
/// function; the runtime's batching tests check them (a joined batch answers as lone rows do).
pub fn verify(
    env: &ort::environment::Environment,
    model: &Bunny,
    dir: &Path,
    ft: FloatType,
    dtype: DType,
    seed: u64,
) -> Result<Vec<(String, Report)>> {
    let dev = Device::Cpu;
    let mut o = Candle::new(dev.clone(), dtype);
    let mut rng = StdRng::seed_from_u64(seed);
    let c = &model.config;
    let mut all = Vec::new();

    // decoder: batch 2, 3 new positions after 4 cached ones.
    let (b, p, s) = (2usize, 4usize, 3usize);
    let (layers, heads, hd, d) = (c.num_hidden_layers, c.num_attention_heads, c.head_dim(), c.hidden_size);
    // Inputs come from the seeded RNG, so that a failed verification can be reproduced.
    let mut randn = |shape: &[usize]| -> Result<Tensor> {
        let v: Vec<f32> =
            (0..shape.iter().product::<usize>()).map(|_| models::train_source::normal(&mut rng) as f32).collect();
        Ok(Tensor::from_vec(v, shape, &dev)?.to_dtype(dtype)?)
    };
    let embeds = randn(&[b, s, d])?;
    let past: Vec<(Tensor, Tensor)> =
        (0..layers).map(|_| Ok((randn(&[b, heads, p, hd])?, randn(&[b, heads, p, hd])?))).collect::<Result<_>>()?;
    // The second row is left-padded by one position, as a batched runtime does.
    let mask: Vec<i64> = (0..b).flat_map(|r| (0..p + s).map(move |j| i64::from(!(r == 1 && j == 0)))).collect();
    let pos: Vec<i64> = (0..b).flat_map(|_| (p..p + s).map(|x| x as i64)).collect();
    let mask_t = Tensor::from_vec(mask.clone(), (b, p + s), &dev)?;
    let pos_t = Tensor::from_vec(pos.clone(), (b, s), &dev)?;
    // Logits of the last 2 of the 3 positions: the slice is checked too.
    let keep = 2i64;
    let keep_t = Tensor::new(keep, &dev)?;
    let (logits, present) = model.llm.forward(&mut o, &embeds, &mask_t, &pos_t, Some(&past), Some(&keep_t))?;
    let mut inputs: Vec<(String, Input)> = vec![
        ("inputs_embeds".into(), Input::F(embeds)),
        ("attention_mask".into(), Input::I(vec![b, p + s], mask)),
        ("position_ids".into(), Input::I(vec![b, s], pos)),
        ("num_logits_to_keep".into(), Input::I(vec![], vec![keep])),
    ];
    let mut names = vec!["logits".to_string()];
    let mut want = vec![flat(&logits)?];
    for (i, ((pk, pv), (k, v))) in past.into_iter().zip(&present).enumerate() {
        inputs.push((format!("past_key_values.{i}.key"), Input::F(pk)));
        inputs.push((format!("past_key_values.{i}.value"), Input::F(pv)));
        names.push(format!("present.{i}.key"));
        names.push(format!("present.{i}.value"));
        want.push(flat(k)?);
        want.push(flat(v)?);
    }
    all.push(("decoder.onnx".to_string(), compare(env, &dir.join("decoder.onnx"), &inputs, &names, &want, ft)?));

    // embed
    let ids: Vec<i64> = (0..b * 5).map(|_| rng.random_range(0..c.vocab_size as i64)).collect();
    let ids_t = Tensor::from_vec(ids.clone(), (b, 5), &dev)?;
    let e = model.llm.embed(&mut o, &ids_t)?;
    let inputs = vec![("input_ids".to_string(), Input::I(vec![b, 5], ids))];
    all.push((
        "embed.onnx".to_string(),
        compare(env, &dir.join("embed.onnx"), &inputs, &["inputs_embeds".into()], &[flat(&e)?], ft)?,
    ));

    // vision: pixels in the normalised range, a question of 6 tokens with the second row padded.
    let sz = c.vision_config.image_size;
    let px: Vec<f32> = (0..b * 3 * sz * sz).map(|_| rng.random_range(-1.0..1.0f32)).collect();
    let pixels = Tensor::from_vec(px, (b, 3, sz, sz), &dev)?.to_dtype(dtype)?;
    let mut inputs = vec![("pixel_values".to_string(), Input::F(pixels.clone()))];
    let feats = match (&c.qformer_config, model.is_qadapt()) {
        (Some(q), true) => {
            let t = 6;
            let qids: Vec<i64> = (0..b * t).map(|_| rng.random_range(1..q.vocab_size as i64)).collect();
            let qmask: Vec<i64> = (0..b).flat_map(|r| (0..t).map(move |j| i64::from(!(r == 1 && j >= 4)))).collect();
            let (ids_t, mask_t) =
                (Tensor::from_vec(qids.clone(), (b, t), &dev)?, Tensor::from_vec(qmask.clone(), (b, t), &dev)?);
            inputs.push(("qformer_input_ids".into(), Input::I(vec![b, t], qids)));
            inputs.push(("qformer_attention_mask".into(), Input::I(vec![b, t], qmask)));
            model.image_features(&mut o, &pixels, Some(QFormerText { input_ids: &ids_t, attention_mask: &mask_t }))?
        }
        _ => model.image_features(&mut o, &pixels, None)?,
    };
    all.push((
        "vision.onnx".to_string(),
        compare(env, &dir.join("vision.onnx"), &inputs, &["image_features".into()], &[flat(&feats.projected)?], ft)?,
    ));
    Ok(all)
}

fn compare(
    env: &ort::environment::Environment,
    graph: &Path,
    inputs: &[(String, Input)],
    names: &[String],
    want: &[Vec<f32>],
    ft: FloatType,
) -> Result<Report> {
    let ins: Vec<(&str, &Input)> = inputs.iter().map(|(n, x)| (n.as_str(), x)).collect();
    let outs: Vec<&str> = names.iter().map(String::as_str).collect();
    let got = run_ort(env, graph, &ins, &outs, ft)?;
    Ok(names.iter().zip(got.iter().zip(want)).map(|(n, (g, w))| (n.clone(), rel_err(g, w))).collect())
}
