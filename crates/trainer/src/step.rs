//! One forward pass of a training batch: images through the vision side (batched), image features
//! spliced into each conversation, right padding, and the masked next-token loss.

use anyhow::Context;
use candle_core::{DType, Device, IndexOp, Tensor};
use models::{Bunny, Candle, QFormerText};
use qadapt_core::image::{load_image, pixel_values, PreprocessConfig};
use qadapt_core::QFormerTokenizer;

use crate::data::{Encoded, IGNORE};

/// Pixels of a batch, [B, 3, S, S].
pub fn batch_pixels(items: &[&Encoded], pre: &PreprocessConfig, device: &Device, dtype: DType) -> anyhow::Result<Tensor> {
    let s = pre.image_size as usize;
    let mut data = Vec::with_capacity(items.len() * 3 * s * s);
    for it in items {
        let img = load_image(&it.image).with_context(|| format!("training image {}", it.image.display()))?;
        data.extend(pixel_values(&img, pre));
    }
    Ok(Tensor::from_vec(data, (items.len(), 3, s, s), device)?.to_dtype(dtype)?)
}

/// Q-Former ids and mask [B, T], right-padded with `[PAD]` = 0 and mask 0.
pub fn batch_qformer(items: &[&Encoded], qtok: &QFormerTokenizer, device: &Device) -> anyhow::Result<(Tensor, Tensor)> {
    let enc: Vec<Vec<u32>> = items.iter().map(|it| qtok.encode(&it.qformer_text)).collect::<Result<_, _>>()?;
    let t = enc.iter().map(Vec::len).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(items.len() * t);
    let mut mask = Vec::with_capacity(items.len() * t);
    for e in &enc {
        ids.extend(e.iter().map(|&i| i as i64).chain(std::iter::repeat_n(0, t - e.len())));
        mask.extend(std::iter::repeat_n(1i64, e.len()).chain(std::iter::repeat_n(0, t - e.len())));
    }
    Ok((Tensor::from_vec(ids, (items.len(), t), device)?, Tensor::from_vec(mask, (items.len(), t), device)?))
}

/// Mean cross-entropy over the answer tokens of a batch, and how many tokens it covers.
pub fn batch_loss(
    model: &Bunny,
    o: &mut Candle,
    pre: &PreprocessConfig,
    qtok: Option<&QFormerTokenizer>,
    items: &[&Encoded],
) -> anyhow::Result<(Tensor, usize)> {
    let device = o.device.clone();
    let t0 = std::time::Instant::now();
    let pixels = batch_pixels(items, pre, &device, o.dtype)?;
    let t_px = t0.elapsed();
    let q = match (model.is_qadapt(), qtok) {
        (true, Some(t)) => Some(batch_qformer(items, t, &device)?),
        (true, None) => anyhow::bail!("a Q-Adapt model needs its Q-Former tokenizer"),
        (false, _) => None,
    };
    let text = q.as_ref().map(|(ids, mask)| QFormerText { input_ids: ids, attention_mask: mask });
    let feats = model.image_features(o, &pixels, text)?.projected; // [B, N, D]
    let t_vis = t0.elapsed();
    let n_img = feats.dim(1)?;
    let hidden = feats.dim(2)?;

    // Splice per sample, then pad on the right to the longest.
    let mut rows = Vec::with_capacity(items.len());
    let mut labels: Vec<Vec<i64>> = Vec::with_capacity(items.len());
    for (b, it) in items.iter().enumerate() {
        let ids = &it.prompt.ids;
        let split = it.prompt.image_pos.unwrap_or(ids.len());
        let mut parts = Vec::new();
        let mut lab = Vec::new();
        if split > 0 {
            parts.push(model.llm.embed(o, &Tensor::new(&ids[..split], &device)?.unsqueeze(0)?)?);
            lab.extend_from_slice(&it.labels[..split]);
        }
        if it.prompt.image_pos.is_some() {
            parts.push(feats.i(b..b + 1)?);
            lab.extend(std::iter::repeat_n(IGNORE, n_img));
        }
        if split < ids.len() {
            parts.push(model.llm.embed(o, &Tensor::new(&ids[split..], &device)?.unsqueeze(0)?)?);
            lab.extend_from_slice(&it.labels[split..]);
        }
        rows.push(Tensor::cat(&parts, 1)?);
        labels.push(lab);
    }
    let max_len = labels.iter().map(Vec::len).max().unwrap_or(0);
    let mut mask = Vec::with_capacity(items.len() * max_len);
    for (row, lab) in rows.iter_mut().zip(labels.iter_mut()) {
        let len = lab.len();
        if len < max_len {
            let pad = Tensor::zeros((1, max_len - len, hidden), row.dtype(), &device)?;
            *row = Tensor::cat(&[row.clone(), pad], 1)?;
            lab.extend(std::iter::repeat_n(IGNORE, max_len - len));
        }
        mask.extend(std::iter::repeat_n(1i64, len).chain(std::iter::repeat_n(0, max_len - len)));
    }
    let embeds = Tensor::cat(&rows, 0)?; // [B, L, D]
    let mask = Tensor::from_vec(mask, (items.len(), max_len), &device)?;
    let pos = Tensor::arange(0i64, max_len as i64, &device)?.unsqueeze(0)?.repeat((items.len(), 1))?;
    let t_splice = t0.elapsed();
    let (logits, _) = model.llm.forward(o, &embeds, &mask, &pos, None)?; // [B, L, V]
    let t_llm = t0.elapsed();

    // Next-token targets: position t predicts label t+1.
    let mut rows_idx = Vec::new();
    let mut targets = Vec::new();
    for (b, lab) in labels.iter().enumerate() {
        for t in 0..max_len.saturating_sub(1) {
            if lab[t + 1] != IGNORE {
                rows_idx.push((b * max_len + t) as u32);
                targets.push(lab[t + 1] as u32);
            }
        }
    }
    anyhow::ensure!(!targets.is_empty(), "a batch without answer tokens (were the answers truncated away?)");
    let v = logits.dim(2)?;
    let flat = logits.reshape((items.len() * max_len, v))?;
    let picked = flat.index_select(&Tensor::new(rows_idx.as_slice(), &device)?, 0)?.to_dtype(DType::F32)?;
    let targets = Tensor::new(targets.as_slice(), &device)?;
    let loss = candle_nn::loss::cross_entropy(&picked, &targets)?;
    tracing::trace!(pixels = ?t_px, vision = ?(t_vis - t_px), splice = ?(t_splice - t_vis), llm = ?(t_llm - t_splice), loss = ?(t0.elapsed() - t_llm), "forward");
    Ok((loss, targets.dim(0)?))
}
