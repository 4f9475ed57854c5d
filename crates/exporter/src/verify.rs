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
    let mut session = open_session(env, graph)?;
    run_session(&mut session, graph, inputs, outputs, ft)
}

/// A CPU session of `graph`.
fn open_session(env: &ort::environment::Environment, graph: &Path) -> Result<Session> {
    let what = graph.display().to_string();
    Session::builder(env).map_err(ort_err(&what))?.commit_from_file(graph).map_err(ort_err(&what))
}

/// One run of an opened session of `graph` (see [`run_ort`]).
fn run_session(
    session: &mut Session,
    graph: &Path,
    inputs: &[(&str, &Input)],
    outputs: &[&str],
    ft: FloatType,
) -> Result<Vec<Vec<f32>>> {
    let what = graph.display().to_string();
    // Callers offer what either variant reads; a graph gets the inputs it declares.
    let declared: Vec<String> = session.inputs().iter().map(|i| i.name().to_string()).collect();
    let mut feed = Vec::with_capacity(inputs.len());
    for (name, x) in inputs.iter().filter(|(n, _)| declared.iter().any(|d| d == n)) {
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
#[allow(clippy::too_many_arguments)]
pub fn verify(
    env: &ort::environment::Environment,
    model: &Bunny,
    dir: &Path,
    ft: FloatType,
    dtype: DType,
    fused: bool,
    seed: u64,
) -> Result<Vec<(String, Report)>> {
    let dev = Device::Cpu;
    let mut o = Candle::new(dev.clone(), dtype);
    let mut rng = StdRng::seed_from_u64(seed);
    let c = &model.config;
    let mut all = Vec::new();
    if fused {
        all.push(("decoder.onnx".to_string(), verify_fused_decoder(env, model, dir, ft, dtype, &mut rng)?));
    }

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
    if fused {
        return verify_rest(env, model, dir, ft, dtype, &mut o, &mut rng, all);
    }
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
    let (logits, present) =
        model.llm.forward(&mut o, &embeds, &mask_t, &pos_t, Some(&past), Some(models::phi::Keep::Last(&keep_t)))?;
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
    verify_rest(env, model, dir, ft, dtype, &mut o, &mut rng, all)
}

/// The fused decoder: a right-padded prefill of two rows (5 and 3 positions) into zeroed cache
/// buffers, then one decode step on the buffers it returned; each row's logits against candle
/// running that row alone.
fn verify_fused_decoder(
    env: &ort::environment::Environment,
    model: &Bunny,
    dir: &Path,
    ft: FloatType,
    dtype: DType,
    rng: &mut StdRng,
) -> Result<Report> {
    let dev = Device::Cpu;
    let mut o = Candle::new(dev.clone(), dtype);
    let c = &model.config;
    let (layers, heads, d, vocab) = (c.num_hidden_layers, c.num_attention_heads, c.hidden_size, c.vocab_size);
    let hdp = crate::fused::cache_head_dim(c.head_dim());
    let (lens, s, slots) = ([5usize, 3], 5usize, 8usize);
    let mut randn = |shape: &[usize]| -> Result<Tensor> {
        let v: Vec<f32> =
            (0..shape.iter().product::<usize>()).map(|_| models::train_source::normal(rng) as f32).collect();
        Ok(Tensor::from_vec(v, shape, &dev)?.to_dtype(dtype)?)
    };
    let rows: Vec<Tensor> = lens.iter().map(|&l| randn(&[1, l, d])).collect::<Result<_>>()?;
    let next: Vec<Tensor> = lens.iter().map(|_| randn(&[1, 1, d])).collect::<Result<_>>()?;
    // candle, one row at a time: the prefill's last logits, then the decode step's.
    let (mut want_pre, mut want_dec) = (Vec::new(), Vec::new());
    for (r, &l) in lens.iter().enumerate() {
        let one = Tensor::new(1i64, &dev)?;
        let mask = Tensor::ones((1, l), DType::I64, &dev)?;
        let pos = Tensor::arange(0i64, l as i64, &dev)?.unsqueeze(0)?;
        let (lg, present) =
            model.llm.forward(&mut o, &rows[r], &mask, &pos, None, Some(models::phi::Keep::Last(&one)))?;
        want_pre.extend(flat(&lg)?);
        let mask = Tensor::ones((1, l + 1), DType::I64, &dev)?;
        let pos = Tensor::new(&[[l as i64]], &dev)?;
        let (lg, _) =
            model.llm.forward(&mut o, &next[r], &mask, &pos, Some(&present), Some(models::phi::Keep::Last(&one)))?;
        want_dec.extend(flat(&lg)?);
    }
    // ONNX Runtime: both rows in one right-padded batch.
    let padded: Vec<Tensor> = rows
        .iter()
        .zip(lens)
        .map(|(t, l)| Ok(Tensor::cat(&[t, &Tensor::zeros((1, s - l, d), dtype, &dev)?], 1)?))
        .collect::<Result<_>>()?;
    let embeds = Tensor::cat(&padded, 0)?;
    let mask: Vec<i64> = lens.iter().flat_map(|&l| (0..s).map(move |j| i64::from(j < l))).collect();
    let pos: Vec<i64> = lens.iter().flat_map(|&l| (0..s).map(move |j| j.min(l) as i64)).collect();
    let mut inputs: Vec<(String, Input)> = vec![
        ("inputs_embeds".into(), Input::F(embeds)),
        ("attention_mask".into(), Input::I(vec![2, s], mask)),
        ("position_ids".into(), Input::I(vec![2, s], pos)),
        ("logits_positions".into(), Input::I(vec![2, 1], lens.iter().map(|&l| l as i64 - 1).collect())),
    ];
    let zeros = Tensor::zeros((2, heads, slots, hdp), dtype, &dev)?;
    let mut names = vec!["logits".to_string()];
    for i in 0..layers {
        for p in ["key", "value"] {
            inputs.push((format!("past_key_values.{i}.{p}"), Input::F(zeros.clone())));
            names.push(format!("present.{i}.{p}"));
        }
    }
    let graph = dir.join("decoder.onnx");
    let mut session = open_session(env, &graph)?;
    let mut run = |inputs: &[(String, Input)]| {
        let ins: Vec<(&str, &Input)> = inputs.iter().map(|(n, x)| (n.as_str(), x)).collect();
        let outs: Vec<&str> = names.iter().map(String::as_str).collect();
        run_session(&mut session, &graph, &ins, &outs, ft)
    };
    let mut got = run(&inputs)?;
    let pre = got.remove(0);
    let mut inputs: Vec<(String, Input)> = vec![
        ("inputs_embeds".into(), Input::F(Tensor::cat(&next, 0)?)),
        (
            "attention_mask".into(),
            Input::I(vec![2, s + 1], lens.iter().flat_map(|&l| (0..=s).map(move |j| i64::from(j <= l))).collect()),
        ),
        ("position_ids".into(), Input::I(vec![2, 1], lens.iter().map(|&l| l as i64).collect())),
        ("logits_positions".into(), Input::I(vec![2, 1], vec![0, 0])),
    ];
    for (j, buf) in got.into_iter().enumerate() {
        let t = Tensor::from_vec(buf, (2, heads, slots, hdp), &dev)?.to_dtype(dtype)?;
        inputs.push((format!("past_key_values.{}.{}", j / 2, if j % 2 == 0 { "key" } else { "value" }), Input::F(t)));
    }
    let dec = run(&inputs)?.remove(0);
    if pre.len() != 2 * vocab || dec.len() != 2 * vocab {
        return Err(ExportError::Mismatch(format!("fused decoder logits: {} and {} values", pre.len(), dec.len())));
    }
    Ok(vec![
        ("logits (prefill)".into(), rel_err(&pre, &want_pre)),
        ("logits (decode)".into(), rel_err(&dec, &want_dec)),
    ])
}

/// The embed and vision graphs (see [`verify`]).
#[allow(clippy::too_many_arguments)]
fn verify_rest(
    env: &ort::environment::Environment,
    model: &Bunny,
    dir: &Path,
    ft: FloatType,
    dtype: DType,
    o: &mut Candle,
    rng: &mut StdRng,
    mut all: Vec<(String, Report)>,
) -> Result<Vec<(String, Report)>> {
    let dev = Device::Cpu;
    let c = &model.config;
    let b = 2usize;
    // embed
    let ids: Vec<i64> = (0..b * 5).map(|_| rng.random_range(0..c.vocab_size as i64)).collect();
    let ids_t = Tensor::from_vec(ids.clone(), (b, 5), &dev)?;
    let e = model.llm.embed(o, &ids_t)?;
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
            model.image_features(o, &pixels, Some(QFormerText { input_ids: &ids_t, attention_mask: &mask_t }))?
        }
        _ => model.image_features(o, &pixels, None)?,
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

/// How far a quantized export's logits are from the unquantized model's: what `--quantize` prints,
/// and what it fails on past [`QuantBounds`].
#[derive(Debug, Clone, serde::Serialize)]
pub struct QuantReport {
    /// Positions compared (prompts × length).
    pub positions: usize,
    /// Mean cosine similarity of a position's logits to the reference's.
    pub logit_cosine_mean: f32,
    /// Worst cosine similarity over the positions.
    pub logit_cosine_min: f32,
    /// Largest absolute logit difference.
    pub logit_max_abs_err: f32,
    /// Fraction of positions whose greedy next token equals the reference's (teacher forcing: every
    /// prompt position predicts the next token from the same prefix on both sides).
    pub top1_agreement: f32,
    /// Cosine similarity of the image features, when the vision graph is quantized too.
    pub vision_cosine: Option<f32>,
}

/// The least a quantized export must reach; below, the export fails. The bounds catch a broken
/// export (wrong packing, a scale off by a factor), not a quality level: tiny random fixtures, whose
/// logits are nearly flat, measure int8 0.9998 / 0.94 and int4 0.981 / 0.68 (cosine / agreement),
/// while the same packing with its two nibbles swapped measures cosine 0.017. Documented in the README.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct QuantBounds {
    pub logit_cosine_mean: f32,
    pub top1_agreement: f32,
}

impl QuantBounds {
    /// The bounds of `bits`-bit weights.
    pub fn of(bits: u8) -> Self {
        match bits {
            8 => Self { logit_cosine_mean: 0.995, top1_agreement: 0.85 },
            _ => Self { logit_cosine_mean: 0.95, top1_agreement: 0.5 },
        }
    }

    /// What `report` misses, if anything.
    pub fn check(&self, report: &QuantReport) -> Option<String> {
        let mut misses = Vec::new();
        if report.logit_cosine_mean.is_nan() || report.logit_cosine_mean < self.logit_cosine_mean {
            misses.push(format!("logit cosine {:.4} < {}", report.logit_cosine_mean, self.logit_cosine_mean));
        }
        if report.top1_agreement.is_nan() || report.top1_agreement < self.top1_agreement {
            misses.push(format!("greedy agreement {:.3} < {}", report.top1_agreement, self.top1_agreement));
        }
        if let Some(c) = report.vision_cosine.filter(|c| c.is_nan() || *c < self.logit_cosine_mean) {
            misses.push(format!("image-feature cosine {c:.4} < {}", self.logit_cosine_mean));
        }
        (!misses.is_empty()).then(|| misses.join(", "))
    }
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    (dot / (na * nb).max(1e-30)) as f32
}

fn argmax(v: &[f32]) -> usize {
    v.iter().enumerate().fold(0, |best, (i, x)| if *x > v[best] { i } else { best })
}

/// Runs the quantized decoder of `dir` over `prompts` prompts of `len` seeded random tokens (one
/// prefill, logits of every position) against `model` (unquantized, candle), and the vision graph
/// when it is quantized.
pub fn quant_report(
    env: &ort::environment::Environment,
    model: &Bunny,
    dir: &Path,
    ft: FloatType,
    dtype: DType,
    vision: bool,
    fused: bool,
) -> Result<QuantReport> {
    let dev = Device::Cpu;
    let mut o = Candle::new(dev.clone(), dtype);
    let mut rng = StdRng::seed_from_u64(7);
    let c = &model.config;
    let (b, l) = (4usize, 24usize);
    let (layers, heads, hd, vocab) = (c.num_hidden_layers, c.num_attention_heads, c.head_dim(), c.vocab_size);
    let ids: Vec<i64> = (0..b * l).map(|_| rng.random_range(0..vocab as i64)).collect();
    let ids_t = Tensor::from_vec(ids, (b, l), &dev)?;
    let embeds = model.llm.embed(&mut o, &ids_t)?;
    let mask = vec![1i64; b * l];
    let pos: Vec<i64> = (0..b).flat_map(|_| 0..l as i64).collect();
    let mask_t = Tensor::from_vec(mask.clone(), (b, l), &dev)?;
    let pos_t = Tensor::from_vec(pos.clone(), (b, l), &dev)?;
    let keep_t = Tensor::new(l as i64, &dev)?;
    let (want, _) =
        model.llm.forward(&mut o, &embeds, &mask_t, &pos_t, None, Some(models::phi::Keep::Last(&keep_t)))?;
    let want = flat(&want)?;
    let mut inputs: Vec<(String, Input)> = vec![
        ("inputs_embeds".into(), Input::F(embeds)),
        ("attention_mask".into(), Input::I(vec![b, l], mask)),
        ("position_ids".into(), Input::I(vec![b, l], pos)),
        ("num_logits_to_keep".into(), Input::I(vec![], vec![l as i64])),
        ("logits_positions".into(), Input::I(vec![b, l], (0..b).flat_map(|_| 0..l as i64).collect())),
    ];
    // A fused decoder's cache is a buffer with room for the prompt.
    let (slots, hd) = if fused { (l, crate::fused::cache_head_dim(hd)) } else { (0, hd) };
    let empty = Tensor::zeros((b, heads, slots, hd), dtype, &dev)?;
    for i in 0..layers {
        inputs.push((format!("past_key_values.{i}.key"), Input::F(empty.clone())));
        inputs.push((format!("past_key_values.{i}.value"), Input::F(empty.clone())));
    }
    let ins: Vec<(&str, &Input)> = inputs.iter().map(|(n, x)| (n.as_str(), x)).collect();
    let got = run_ort(env, &dir.join("decoder.onnx"), &ins, &["logits"], ft)?.remove(0);
    if got.len() != want.len() {
        return Err(ExportError::Mismatch(format!("decoder logits: {} values, expected {}", got.len(), want.len())));
    }
    let rows: Vec<(&[f32], &[f32])> = got.chunks(vocab).zip(want.chunks(vocab)).collect();
    let cos: Vec<f32> = rows.iter().map(|(g, w)| cosine(g, w)).collect();
    let agree = rows.iter().filter(|(g, w)| argmax(g) == argmax(w)).count();
    let max_abs = got.iter().zip(&want).map(|(g, w)| (g - w).abs()).fold(0f32, f32::max);
    let vision_cosine = if vision {
        let sz = c.vision_config.image_size;
        let px: Vec<f32> = (0..3 * sz * sz).map(|_| rng.random_range(-1.0..1.0f32)).collect();
        let pixels = Tensor::from_vec(px, (1, 3, sz, sz), &dev)?.to_dtype(dtype)?;
        let mut inputs = vec![("pixel_values".to_string(), Input::F(pixels.clone()))];
        let feats = match (&c.qformer_config, model.is_qadapt()) {
            (Some(q), true) => {
                let qids: Vec<i64> = (0..6).map(|_| rng.random_range(1..q.vocab_size as i64)).collect();
                let (it, mt) = (Tensor::from_vec(qids.clone(), (1, 6), &dev)?, Tensor::ones((1, 6), DType::I64, &dev)?);
                inputs.push(("qformer_input_ids".into(), Input::I(vec![1, 6], qids)));
                inputs.push(("qformer_attention_mask".into(), Input::I(vec![1, 6], vec![1; 6])));
                model.image_features(&mut o, &pixels, Some(QFormerText { input_ids: &it, attention_mask: &mt }))?
            }
            _ => model.image_features(&mut o, &pixels, None)?,
        };
        let ins: Vec<(&str, &Input)> = inputs.iter().map(|(n, x)| (n.as_str(), x)).collect();
        let got = run_ort(env, &dir.join("vision.onnx"), &ins, &["image_features"], ft)?.remove(0);
        Some(cosine(&got, &flat(&feats.projected)?))
    } else {
        None
    };
    Ok(QuantReport {
        positions: rows.len(),
        logit_cosine_mean: cos.iter().sum::<f32>() / cos.len().max(1) as f32,
        logit_cosine_min: cos.iter().copied().fold(f32::INFINITY, f32::min),
        logit_max_abs_err: max_abs,
        top1_agreement: agree as f32 / rows.len().max(1) as f32,
        vision_cosine,
    })
}
