//! One forward pass of a training batch: images through the vision side (batched), image features
//! spliced into each conversation, right padding, and the masked next-token loss.

use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use models::{Bunny, Candle, QFormerText};
use qadapt_core::image::{load_image, pixel_values, PreprocessConfig};
use qadapt_core::QFormerTokenizer;

use crate::data::{Encoded, IGNORE};

/// Pixels of a batch, [B, 3, S, S].
pub fn batch_pixels(
    items: &[&Encoded],
    pre: &PreprocessConfig,
    device: &Device,
    dtype: DType,
) -> anyhow::Result<Tensor> {
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
) -> anyhow::Result<(Tensor, usize, usize)> {
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

    // Splice by gathering: one table holds every text embedding of the batch, every image feature
    // row and a zero row for padding; each position of the right-padded batch picks its row. One
    // embedding call and one gather instead of a handful of small ops per sample.
    let mut text_ids: Vec<u32> = Vec::new();
    let mut picks: Vec<Vec<u32>> = Vec::with_capacity(items.len());
    let mut labels: Vec<Vec<i64>> = Vec::with_capacity(items.len());
    let img_base = items.iter().map(|it| it.prompt.ids.len()).sum::<usize>();
    for (b, it) in items.iter().enumerate() {
        let ids = &it.prompt.ids;
        let split = it.prompt.image_pos.unwrap_or(ids.len());
        let (mut pick, mut lab) = (Vec::new(), Vec::new());
        let mut text = |range: std::ops::Range<usize>, pick: &mut Vec<u32>, lab: &mut Vec<i64>| {
            for t in range {
                pick.push(text_ids.len() as u32);
                text_ids.push(ids[t]);
                lab.push(it.labels[t]);
            }
        };
        text(0..split, &mut pick, &mut lab);
        if it.prompt.image_pos.is_some() {
            pick.extend((0..n_img).map(|j| (img_base + b * n_img + j) as u32));
            lab.extend(std::iter::repeat_n(IGNORE, n_img));
        }
        text(split..ids.len(), &mut pick, &mut lab);
        picks.push(pick);
        labels.push(lab);
    }
    let max_len = labels.iter().map(Vec::len).max().unwrap_or(0);
    let zero_row = (img_base + items.len() * n_img) as u32;
    let mut index = Vec::with_capacity(items.len() * max_len);
    let mut mask = Vec::with_capacity(items.len() * max_len);
    for (pick, lab) in picks.iter().zip(labels.iter_mut()) {
        let len = lab.len();
        index.extend(pick.iter().copied().chain(std::iter::repeat_n(zero_row, max_len - len)));
        lab.extend(std::iter::repeat_n(IGNORE, max_len - len));
        mask.extend(std::iter::repeat_n(1i64, len).chain(std::iter::repeat_n(0, max_len - len)));
    }
    let text_emb = model.llm.embed(o, &Tensor::new(text_ids.as_slice(), &device)?.unsqueeze(0)?)?.squeeze(0)?; // [T, D]
    let table = Tensor::cat(
        &[text_emb, feats.reshape((items.len() * n_img, hidden))?, Tensor::zeros((1, hidden), feats.dtype(), &device)?],
        0,
    )?; // [T + B·N + 1, D]
    let embeds =
        table.index_select(&Tensor::new(index.as_slice(), &device)?, 0)?.reshape((items.len(), max_len, hidden))?; // [B, L, D]
    let mask = Tensor::from_vec(mask, (items.len(), max_len), &device)?;
    let pos = Tensor::arange(0i64, max_len as i64, &device)?.unsqueeze(0)?.repeat((items.len(), 1))?;
    let t_splice = t0.elapsed();
    let (hidden_states, _) = model.llm.hidden(o, &embeds, &mask, &pos, None)?; // [B, L, D]
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
    let flat = hidden_states.reshape((items.len() * max_len, hidden))?;
    let picked = flat.index_select(&Tensor::new(rows_idx.as_slice(), &device)?, 0)?; // [N, D]
    let picked = model.llm.lm_head.forward(o, &picked)?.to_dtype(DType::F32)?; // [N, V]
    let targets = Tensor::new(targets.as_slice(), &device)?;
    let loss = candle_nn::loss::cross_entropy(&picked, &targets)?;
    tracing::trace!(pixels = ?t_px, vision = ?(t_vis - t_px), splice = ?(t_splice - t_vis), llm = ?(t_llm - t_splice), loss = ?(t0.elapsed() - t_llm), "forward");
    Ok((loss, targets.dim(0)?, max_len))
}
