//! The loss curve PNG written at the end of a run.

use std::path::Path;

use qadapt_plot::{moving_average, Chart, Mark, Series, DARK, LIGHT};

/// Draws loss against step (raw, and a 10-step moving average) into `path`; `stage` names the
/// chart. Nothing is written for a run without steps.
pub fn loss_curve(points: &[(f64, f64)], stage: &str, path: &Path) -> anyhow::Result<()> {
    if points.is_empty() {
        return Ok(());
    }
    let chart = Chart {
        title: format!("{stage}: training loss"),
        x_label: "optimizer step".into(),
        y_label: "loss".into(),
        integer_x: true,
        series: vec![
            Series { label: "loss".into(), points: points.to_vec(), mark: Mark::Line, color: LIGHT },
            Series {
                label: "mean of the last 10 steps".into(),
                points: moving_average(points, 10),
                mark: Mark::BoldLine,
                color: DARK,
            },
        ],
        size: (800, 480),
    };
    Ok(chart.write_png(path)?)
}
