//! The loss curve PNG written at the end of a run.

use std::path::Path;

use anyhow::Context;
use plotters::prelude::*;

use crate::train::Metric;

const FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

/// Draws loss against step (raw, and a 10-step moving average) into `path`.
pub fn loss_curve(metrics: &[Metric], path: &Path) -> anyhow::Result<()> {
    if metrics.is_empty() {
        return Ok(());
    }
    plotters::style::register_font("sans-serif", FontStyle::Normal, FONT)
        .map_err(|_| anyhow::anyhow!("cannot load the embedded font"))?;
    let (w, h) = (800u32, 480u32);
    let mut buf = vec![255u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        let max_step = metrics.last().map_or(1, |m| m.step).max(1) as f64;
        let (lo, hi) = metrics.iter().fold((f32::MAX, f32::MIN), |(a, b), m| (a.min(m.loss), b.max(m.loss)));
        let pad = ((hi - lo) * 0.05).max(1e-3);
        let mut chart = ChartBuilder::on(&root)
            .caption("training loss", ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(0f64..max_step, (lo - pad) as f64..(hi + pad) as f64)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        chart.configure_mesh().x_desc("step").y_desc("loss").draw().map_err(|e| anyhow::anyhow!("{e}"))?;
        chart
            .draw_series(LineSeries::new(
                metrics.iter().map(|m| (m.step as f64, m.loss as f64)),
                RGBColor(160, 190, 230),
            ))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let avg: Vec<(f64, f64)> = metrics
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let win = &metrics[i.saturating_sub(9)..=i];
                (m.step as f64, win.iter().map(|x| x.loss as f64).sum::<f64>() / win.len() as f64)
            })
            .collect();
        chart
            .draw_series(LineSeries::new(avg, RGBColor(20, 60, 160).stroke_width(2)))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    let img = image::RgbImage::from_raw(w, h, buf).context("plot buffer size")?;
    img.save(path).with_context(|| format!("writing {}", path.display()))
}
