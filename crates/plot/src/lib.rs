#![warn(missing_docs)]
//! The toolchain's charts: training-loss curves (`qadapt-train`) and predicted score against MOS
//! (`qadapt-run eval --plot`), and the bars of `qadapt-train ablate`, drawn by plotters into an RGB buffer and written as PNG. The font is
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
        save_png(buf, (w, h), path)
    }
}

/// One bar of a [`BarChart`]: a mean with its interval and the values it is the mean of.
#[derive(Debug, Clone)]
pub struct Bar {
    /// The name left of the bar.
    pub label: String,
    /// The bar's length.
    pub mean: f64,
    /// Half-width of the interval drawn around the mean (0: none).
    pub half_width: f64,
    /// The single values, drawn as dots.
    pub values: Vec<f64>,
}

/// Horizontal bars, one per label, top to bottom in order, with interval whiskers and the single
/// values as dots: a comparison of a few named settings.
#[derive(Debug, Clone)]
pub struct BarChart {
    /// The caption above the plot.
    pub title: String,
    /// The value axis' name.
    pub x_label: String,
    /// The bars.
    pub bars: Vec<Bar>,
    /// A value marked by a red vertical line across the bars (chance, a baseline).
    pub reference: Option<f64>,
    /// Width and height in pixels.
    pub size: (u32, u32),
}

impl BarChart {
    /// Draws the chart and writes it to `path` as PNG (atomically, like [`Chart::write_png`]).
    pub fn write_png(&self, path: &Path) -> Result<(), PlotError> {
        let draw = |e: &dyn std::fmt::Display| PlotError::Draw { path: path.to_path_buf(), msg: e.to_string() };
        let n = self.bars.len();
        if n == 0 {
            return Err(PlotError::Empty(path.to_path_buf()));
        }
        plotters::style::register_font("sans-serif", FontStyle::Normal, FONT)
            .map_err(|_| draw(&"cannot load the embedded font"))?;
        let hi = self
            .bars
            .iter()
            .flat_map(|b| b.values.iter().copied().chain([b.mean + b.half_width]))
            .chain(self.reference)
            .filter(|x| x.is_finite())
            .fold(0.0f64, f64::max);
        let (w, h) = self.size;
        let mut buf = vec![255u8; (w as usize) * (h as usize) * 3];
        {
            let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
            // Bar i spans y ∈ [n-1-i, n-i): the first bar on top.
            let mut chart = ChartBuilder::on(&root)
                .caption(&self.title, ("sans-serif", 20))
                .margin(12)
                .x_label_area_size(40)
                .y_label_area_size(170)
                .build_cartesian_2d(0.0..(hi * 1.08).max(1e-3), 0.0..n as f64)
                .map_err(|e| draw(&e))?;
            let labels: Vec<String> = self.bars.iter().map(|b| b.label.clone()).collect();
            chart
                .configure_mesh()
                .disable_y_mesh()
                .x_desc(self.x_label.as_str())
                .x_label_formatter(&|x| tick(*x, false))
                .y_labels(2 * n + 1)
                .y_label_formatter(&|y| {
                    // Only the bar centres (k + 0.5) get a name.
                    let k = (y - 0.5).round();
                    if (y - 0.5 - k).abs() < 1e-6 && k >= 0.0 && (k as usize) < n {
                        labels[n - 1 - k as usize].clone()
                    } else {
                        String::new()
                    }
                })
                .draw()
                .map_err(|e| draw(&e))?;
            let (light, dark) = (RGBColor(LIGHT[0], LIGHT[1], LIGHT[2]), RGBColor(DARK[0], DARK[1], DARK[2]));
            for (i, b) in self.bars.iter().enumerate() {
                let y = (n - 1 - i) as f64;
                chart
                    .draw_series([Rectangle::new([(0.0, y + 0.2), (b.mean.max(0.0), y + 0.8)], light.filled())])
                    .map_err(|e| draw(&e))?;
                if b.half_width > 0.0 {
                    let (lo, hi) = (b.mean - b.half_width, b.mean + b.half_width);
                    let whisker = [(lo, y + 0.5), (hi, y + 0.5)];
                    let caps = [[(lo, y + 0.35), (lo, y + 0.65)], [(hi, y + 0.35), (hi, y + 0.65)]];
                    chart
                        .draw_series(
                            std::iter::once(PathElement::new(whisker.to_vec(), BLACK.stroke_width(2)))
                                .chain(caps.map(|c| PathElement::new(c.to_vec(), BLACK.stroke_width(2)))),
                        )
                        .map_err(|e| draw(&e))?;
                }
                chart
                    .draw_series(b.values.iter().map(|&v| Circle::new((v, y + 0.5), 4, dark.filled())))
                    .map_err(|e| draw(&e))?;
            }
            if let Some(r) = self.reference {
                chart
                    .draw_series([PathElement::new(vec![(r, 0.0), (r, n as f64)], RED.stroke_width(2))])
                    .map_err(|e| draw(&e))?;
            }
            root.present().map_err(|e| draw(&e))?;
        }
        save_png(buf, (w, h), path)
    }
}

/// Writes an RGB buffer as PNG through a temporary file, so a reader never sees half a picture.
fn save_png(buf: Vec<u8>, (w, h): (u32, u32), path: &Path) -> Result<(), PlotError> {
    let img = image::RgbImage::from_raw(w, h, buf)
        .ok_or_else(|| PlotError::Draw { path: path.to_path_buf(), msg: "buffer size".into() })?;
    let name = path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let write = |source| PlotError::Write { path: path.to_path_buf(), source };
    img.save_with_format(&tmp, image::ImageFormat::Png).map_err(write)?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        write(image::ImageError::IoError(e))
    })
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

    #[test]
    fn bars_whiskers_and_dots_are_drawn() {
        let dir = std::env::temp_dir().join(format!("qadapt-plot-bars-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bars.png");
        let bar = |label: &str, values: Vec<f64>| Bar {
            label: label.into(),
            mean: values.iter().sum::<f64>() / values.len() as f64,
            half_width: 0.05,
            values,
        };
        BarChart {
            title: "accuracy".into(),
            x_label: "accuracy".into(),
            bars: vec![bar("joint", vec![0.5, 0.6]), bar("progressive", vec![0.7, 0.8])],
            reference: Some(0.25),
            size: (640, 300),
        }
        .write_png(&path)
        .unwrap();
        let img = image::open(&path).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (640, 300));
        // Bars in the light colour, one dot per value in the dark one.
        assert!(count(&img, LIGHT) > 5000, "bars: {}", count(&img, LIGHT));
        assert!(count(&img, DARK) > 100, "dots: {}", count(&img, DARK));
        assert!(count(&img, [255, 0, 0]) > 100, "the reference line");
        let empty =
            BarChart { title: String::new(), x_label: String::new(), bars: vec![], reference: None, size: (10, 10) };
        assert!(matches!(empty.write_png(&dir.join("e.png")), Err(PlotError::Empty(_))));
        std::fs::remove_dir_all(&dir).ok();
    }
}
