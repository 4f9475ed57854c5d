#![warn(missing_docs)]
//! The toolchain's charts: training-loss curves (`qadapt-train`) and predicted score against MOS
//! (`qadapt-run eval --plot`), drawn by plotters into an RGB buffer and written as PNG. The font is
//! embedded (DejaVu Sans, `assets/`), so a chart renders the same on a machine without fonts.

use std::path::{Path, PathBuf};

use plotters::prelude::*;

const FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

/// Why a chart could not be written.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    /// Nothing to draw.
    #[error("{0}: no points to plot")]
    Empty(PathBuf),
    /// plotters failed (font, layout).
    #[error("plotting {path}: {msg}")]
    Draw {
        /// The chart's file.
        path: PathBuf,
        /// plotters' reason.
        msg: String,
    },
    /// The PNG could not be written.
    #[error("writing {path}: {source}")]
    Write {
        /// The chart's file.
        path: PathBuf,
        /// The encoder's or file system's reason.
        source: image::ImageError,
    },
}

/// How a series is drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mark {
    /// A thin line through the points.
    Line,
    /// A thick line through the points (the series to read).
    BoldLine,
    /// A filled dot at each point.
    Dots,
}

/// One named series of `(x, y)` points.
#[derive(Debug, Clone)]
pub struct Series {
    /// Its legend entry.
    pub label: String,
    /// The points, in drawing order.
    pub points: Vec<(f64, f64)>,
    /// How it is drawn.
    pub mark: Mark,
    /// Its colour, `[r, g, b]`.
    pub color: [u8; 3],
}

/// A chart: title, axis names and series. The legend is drawn when any series has a label.
#[derive(Debug, Clone)]
pub struct Chart {
    /// The caption above the plot.
    pub title: String,
    /// The x-axis name.
    pub x_label: String,
    /// The y-axis name.
    pub y_label: String,
    /// Label the x axis with integers (steps, counts) instead of decimals.
    pub integer_x: bool,
    /// What is drawn, in order (later series on top).
    pub series: Vec<Series>,
    /// Width and height in pixels.
    pub size: (u32, u32),
}

/// The light blue of raw values and the dark blue of what to read (averages, points).
pub const LIGHT: [u8; 3] = [160, 190, 230];
/// See [`LIGHT`].
pub const DARK: [u8; 3] = [20, 60, 160];

/// `(lo, hi)` of `v` widened by 5 % (and to a non-empty range when every value is equal).
fn padded_range(v: impl Iterator<Item = f64>) -> std::ops::Range<f64> {
    let (lo, hi) = v.filter(|x| x.is_finite()).fold((f64::MAX, f64::MIN), |(a, b), x| (a.min(x), b.max(x)));
    let pad = ((hi - lo) * 0.05).max(1e-3);
    (lo - pad)..(hi + pad)
}

/// A tick value with as few digits as tell ticks apart: `200`, not `200.0`; `0.25`, not `0.2500`.
fn tick(x: f64, integer: bool) -> String {
    if integer || (x.fract() == 0.0 && x.abs() < 1e15) {
        format!("{x:.0}")
    } else {
        let s = format!("{x:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

impl Chart {
    /// Draws the chart and writes it to `path` as PNG (through a temporary file, so a reader never
    /// sees half a picture).
    pub fn write_png(&self, path: &Path) -> Result<(), PlotError> {
        let draw = |e: &dyn std::fmt::Display| PlotError::Draw { path: path.to_path_buf(), msg: e.to_string() };
        let all = || self.series.iter().flat_map(|s| s.points.iter().copied());
        if all().next().is_none() {
            return Err(PlotError::Empty(path.to_path_buf()));
        }
        plotters::style::register_font("sans-serif", FontStyle::Normal, FONT)
            .map_err(|_| draw(&"cannot load the embedded font"))?;
        let (w, h) = self.size;
        let mut buf = vec![255u8; (w as usize) * (h as usize) * 3];
        {
            let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
            let (xr, yr) = (padded_range(all().map(|p| p.0)), padded_range(all().map(|p| p.1)));
            let mut chart = ChartBuilder::on(&root)
                .caption(&self.title, ("sans-serif", 20))
                .margin(12)
                .x_label_area_size(40)
                .y_label_area_size(60)
                .build_cartesian_2d(xr, yr)
                .map_err(|e| draw(&e))?;
            let integer_x = self.integer_x;
            chart
                .configure_mesh()
                .x_desc(self.x_label.as_str())
                .y_desc(self.y_label.as_str())
                .x_label_formatter(&|x| tick(*x, integer_x))
                .y_label_formatter(&|y| tick(*y, false))
                .draw()
                .map_err(|e| draw(&e))?;
            for s in &self.series {
                let c = RGBColor(s.color[0], s.color[1], s.color[2]);
                let anno = match s.mark {
                    Mark::Line => chart.draw_series(LineSeries::new(s.points.iter().copied(), c)),
                    Mark::BoldLine => chart.draw_series(LineSeries::new(s.points.iter().copied(), c.stroke_width(2))),
                    Mark::Dots => chart.draw_series(s.points.iter().map(|&p| Circle::new(p, 3, c.mix(0.6).filled()))),
                }
                .map_err(|e| draw(&e))?;
                if !s.label.is_empty() {
                    anno.label(s.label.as_str())
                        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(3)));
                }
            }
            if self.series.iter().any(|s| !s.label.is_empty()) {
                chart
                    .configure_series_labels()
                    .position(SeriesLabelPosition::UpperRight)
                    .background_style(WHITE.mix(0.85))
                    .border_style(BLACK)
                    .label_font(("sans-serif", 14))
                    .draw()
                    .map_err(|e| draw(&e))?;
            }
            root.present().map_err(|e| draw(&e))?;
        }
        let img = image::RgbImage::from_raw(w, h, buf).ok_or_else(|| draw(&"buffer size"))?;
        let name = path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
        let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
        let write = |source| PlotError::Write { path: path.to_path_buf(), source };
        img.save_with_format(&tmp, image::ImageFormat::Png).map_err(write)?;
        std::fs::rename(&tmp, path).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            write(image::ImageError::IoError(e))
        })
    }
}

/// The mean of each point's `window` last values (itself included): the curve to read on a noisy
/// loss.
pub fn moving_average(points: &[(f64, f64)], window: usize) -> Vec<(f64, f64)> {
    let window = window.max(1);
    (0..points.len())
        .map(|i| {
            let win = &points[(i + 1).saturating_sub(window)..=i];
            (points[i].0, win.iter().map(|p| p.1).sum::<f64>() / win.len() as f64)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(img: &image::RgbImage, c: [u8; 3]) -> usize {
        img.pixels().filter(|p| p.0 == c).count()
    }

    #[test]
    fn ticks_are_short() {
        assert_eq!(tick(200.0, true), "200");
        assert_eq!(tick(200.0, false), "200");
        assert_eq!(tick(0.25, false), "0.25");
        assert_eq!(tick(2.5000001, false), "2.5");
        assert_eq!(tick(37.6, true), "38");
    }

    #[test]
    fn moving_average_of_the_last_window_values() {
        let p: Vec<(f64, f64)> = [4.0, 2.0, 6.0, 0.0].iter().enumerate().map(|(i, &y)| (i as f64, y)).collect();
        assert_eq!(moving_average(&p, 2), vec![(0.0, 4.0), (1.0, 3.0), (2.0, 4.0), (3.0, 3.0)]);
        assert_eq!(moving_average(&p, 10)[3], (3.0, 3.0));
    }

    /// The PNG has the chart's size, each series is drawn in its colour, and the legend adds its
    /// swatches: a chart with labels has more of each colour than the same chart without them.
    #[test]
    fn series_and_legend_are_drawn() {
        let dir = std::env::temp_dir().join(format!("qadapt-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let pts: Vec<(f64, f64)> = (0..50).map(|i| (i as f64, (50 - i) as f64 / 10.0)).collect();
        let mut chart = Chart {
            title: "stage 1 loss".into(),
            x_label: "step".into(),
            y_label: "loss".into(),
            integer_x: true,
            series: vec![
                Series { label: "loss".into(), points: pts.clone(), mark: Mark::Line, color: LIGHT },
                Series {
                    label: "mean of 10".into(),
                    points: moving_average(&pts, 10),
                    mark: Mark::BoldLine,
                    color: DARK,
                },
            ],
            size: (400, 300),
        };
        let p = dir.join("a.png");
        chart.write_png(&p).expect("plot");
        let with = image::open(&p).expect("png").to_rgb8();
        assert_eq!(with.dimensions(), (400, 300));
        for s in &mut chart.series {
            s.label.clear();
        }
        chart.write_png(&p).expect("plot");
        let without = image::open(&p).expect("png").to_rgb8();
        for c in [LIGHT, DARK] {
            assert!(count(&without, c) > 50, "series colour {c:?} barely drawn");
            assert!(count(&with, c) > count(&without, c) + 20, "no legend swatch for {c:?}");
        }
        let empty = Chart { series: vec![], ..chart };
        assert!(matches!(empty.write_png(&dir.join("e.png")), Err(PlotError::Empty(_))));
        assert!(!dir.join("e.png").exists());
        std::fs::remove_dir_all(&dir).ok();
    }
}
