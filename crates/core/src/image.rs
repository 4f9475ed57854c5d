//! Image preprocessing as Bunny does it with PIL (DESIGN §3, §7.8): RGB, expand to a square filled
//! with the mean colour, bicubic resize, /255, normalise.
//!
//! The resize reproduces Pillow's `ImagingResample` for 8-bit images: separable two-pass (horizontal,
//! then vertical) convolution with the a = −0.5 cubic kernel widened by the scale when shrinking
//! (antialiasing), coefficients in 22-bit fixed point, and an 8-bit intermediate image. Doing the same
//! integer arithmetic is what makes the output equal PIL's, not merely close. JPEGs are decoded by
//! libjpeg-turbo, Pillow's own decoder, so photos match PIL from the file onwards.
//!
//! Untrusted images are bounded twice: [`ImageLimits`] are checked against the header before any
//! pixel is decoded (a 700-byte JPEG may claim 60000×60000), and the square canvas Bunny pads to is
//! never allocated: the passes read it virtually (see [`square_resized`]), so memory stays
//! O(input + output) even for a 16384×1 strip.

use std::path::Path;

use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, RgbImage};

use crate::{Error, Result};

/// The largest image accepted, checked from the header before decoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageLimits {
    /// Width × height.
    pub max_pixels: u64,
    /// Width and height each.
    pub max_side: u32,
}

impl Default for ImageLimits {
    /// 64 Mpx and 16384 per side: any camera's photo passes, a decompression bomb does not.
    fn default() -> Self {
        Self { max_pixels: 1 << 26, max_side: 16384 }
    }
}

impl ImageLimits {
    /// Refuses `width × height` when over a limit.
    pub fn check(&self, width: u32, height: u32) -> std::result::Result<(), DecodeError> {
        let too_large = |why: String| Err(DecodeError::TooLarge { width, height, why });
        if width == 0 || height == 0 {
            return Err(DecodeError::Invalid(format!("the header says {width}×{height} pixels")));
        }
        if width.max(height) > self.max_side {
            return too_large(format!("a side over the limit of {} pixels", self.max_side));
        }
        if u64::from(width) * u64::from(height) > self.max_pixels {
            return too_large(format!("over the limit of {} pixels", self.max_pixels));
        }
        Ok(())
    }
}

/// Why bytes did not give an image.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The header announces more pixels than [`ImageLimits`] allow; nothing was decoded.
    #[error("{width}×{height} pixels is {why}")]
    TooLarge {
        /// Width from the header.
        width: u32,
        /// Height from the header.
        height: u32,
        /// Which limit.
        why: String,
    },
    /// Not an image of a supported format, or damaged.
    #[error("{0}")]
    Invalid(String),
}

/// Decodes JPEG / PNG / WebP (format sniffed from the bytes) within the default [`ImageLimits`] and
/// applies the EXIF orientation.
pub fn load_image(path: &Path) -> Result<RgbImage> {
    load_image_within(path, &ImageLimits::default())
}

/// [`load_image`] within `limits`.
pub fn load_image_within(path: &Path, limits: &ImageLimits) -> Result<RgbImage> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    decode_image(&bytes, limits).map_err(|e| Error::Image { path: path.to_path_buf(), msg: e.to_string() })
}

/// Like [`load_image`] for bytes already in memory (e.g. an upload).
pub fn decode_image(bytes: &[u8], limits: &ImageLimits) -> std::result::Result<RgbImage, DecodeError> {
    let bad = |what: &str, e: &dyn std::fmt::Display| DecodeError::Invalid(format!("{what}: {e}"));
    let mut reader =
        ImageReader::new(std::io::Cursor::new(bytes)).with_guessed_format().map_err(|e| bad("cannot read", &e))?;
    let Some(format) = reader.format() else {
        return Err(DecodeError::Invalid("not a JPEG, PNG or WebP image".into()));
    };
    // The header is checked below against our limits; this only bounds what a decoder may
    // allocate beyond the pixels (16-bit RGBA is 8 bytes a pixel).
    let mut l = image::Limits::default();
    l.max_alloc = Some(limits.max_pixels.saturating_mul(8).saturating_add(64 << 20));
    reader.limits(l);
    let mut decoder = reader.into_decoder().map_err(|e| bad("cannot decode", &e))?;
    let (w, h) = decoder.dimensions();
    limits.check(w, h)?;
    if format == ImageFormat::Jpeg && !jpeg_has_end(bytes) {
        // libjpeg pads a cut file with grey and only warns; PIL refuses it ("image file is
        // truncated"), and so do we.
        return Err(DecodeError::Invalid("truncated JPEG: no end-of-image marker after the last scan".into()));
    }
    let orientation = decoder.orientation().map_err(|e| bad("bad EXIF orientation", &e))?;
    let mut img = match (format == ImageFormat::Jpeg).then(|| decode_jpeg_libjpeg(bytes, limits)).flatten() {
        Some(rgb) => DynamicImage::ImageRgb8(rgb),
        None => DynamicImage::from_decoder(decoder).map_err(|e| bad("cannot decode", &e))?,
    };
    img.apply_orientation(orientation);
    // PIL's convert('RGB') drops alpha without compositing and replicates grey; into_rgb8 does the same
    // (and keeps an RGB image as it is, without a copy).
    Ok(img.into_rgb8())
}

/// JPEG pixels through libjpeg-turbo (islow IDCT, fancy upsampling), as Pillow decodes them; other
/// JPEG decoders differ by a few grey levels. `None` when libjpeg cannot give RGB (e.g. CMYK, corrupt
/// data): the caller then falls back to the `image` crate, which reports the error.
fn decode_jpeg_libjpeg(bytes: &[u8], limits: &ImageLimits) -> Option<RgbImage> {
    // libjpeg reports fatal errors by unwinding out of its error handler.
    std::panic::catch_unwind(|| -> Option<RgbImage> {
        let header = mozjpeg::Decompress::new_mem(bytes).ok()?;
        // libjpeg reads the same SOF the caller checked; checked again before any scanline.
        limits.check(header.width() as u32, header.height() as u32).ok()?;
        let mut d = header.rgb().ok()?;
        let (w, h) = (d.width() as u32, d.height() as u32);
        let px: Vec<[u8; 3]> = d.read_scanlines().ok()?;
        d.finish().ok()?;
        RgbImage::from_raw(w, h, px.into_iter().flatten().collect())
    })
    .ok()
    .flatten()
}

/// Whether an end-of-image marker (FF D9) follows the last start-of-scan (FF DA): entropy-coded
/// data never holds FF D9 (a data FF is stuffed as FF 00), so its absence means the file was cut.
fn jpeg_has_end(bytes: &[u8]) -> bool {
    let last_scan = bytes.windows(2).rposition(|w| w == [0xFF, 0xDA]);
    last_scan.is_some_and(|i| bytes[i..].windows(2).any(|w| w == [0xFF, 0xD9]))
}

/// Bunny's `expand2square`: centre on a square canvas of the longer side filled with `fill`;
/// the offset uses floor division, as Python's `//` does. [`square_resized`] reads this canvas
/// without allocating it; this is its reference.
pub fn expand_to_square(img: &RgbImage, fill: [u8; 3]) -> RgbImage {
    let (w, h) = img.dimensions();
    if w == h {
        return img.clone();
    }
    let side = w.max(h);
    let mut out = RgbImage::from_pixel(side, side, image::Rgb(fill));
    let (dx, dy) = square_offset(w, h);
    image::imageops::replace(&mut out, img, dx as i64, dy as i64);
    out
}

/// Where a `w × h` image sits on its square canvas.
fn square_offset(w: u32, h: u32) -> (u32, u32) {
    if w > h {
        (0, (w - h) / 2)
    } else {
        ((h - w) / 2, 0)
    }
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Per output pixel: first input index and fixed-point weights (Pillow's `precompute_coeffs` followed
/// by `normalize_coeffs_8bpc`).
fn coefficients(in_size: usize, out_size: usize) -> Vec<(usize, Vec<i32>)> {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = 2.0 * filterscale;
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            // C `(int)` casts truncate toward zero; `as` does too.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let w: Vec<f64> = (xmin..xmax).map(|x| bicubic((x as f64 - center + 0.5) / filterscale)).collect();
            let sum: f64 = w.iter().sum();
            let fixed = w
                .iter()
                .map(|&k| {
                    let k = if sum != 0.0 { k / sum } else { k };
                    let v = k * (1u32 << PRECISION_BITS) as f64;
                    (if v < 0.0 { v - 0.5 } else { v + 0.5 }) as i32
                })
                .collect();
            (xmin, fixed)
        })
        .collect()
}

fn clip8(v: i64) -> u8 {
    if v >= (1i64 << PRECISION_BITS << 8) {
        255
    } else if v <= 0 {
        0
    } else {
        (v >> PRECISION_BITS) as u8
    }
}

/// Horizontal pass over one row (interleaved RGB) with the coefficients of its resize.
fn hrow(src: &[u8], coeffs: &[(usize, Vec<i32>)]) -> Vec<u8> {
    let mut out = vec![0u8; coeffs.len() * 3];
    for (x, (start, k)) in coeffs.iter().enumerate() {
        for c in 0..3 {
            let mut acc: i64 = 1 << (PRECISION_BITS - 1);
            for (i, &kv) in k.iter().enumerate() {
                acc += src[(start + i) * 3 + c] as i64 * kv as i64;
            }
            out[x * 3 + c] = clip8(acc);
        }
    }
    out
}

/// Vertical pass: `rows` (each `w` RGB pixels) resampled to `out_h` rows, concatenated.
fn vpass(rows: &[&[u8]], w: usize, out_h: usize) -> Vec<u8> {
    let coeffs = coefficients(rows.len(), out_h);
    let mut out = vec![0u8; w * out_h * 3];
    for (y, (start, k)) in coeffs.iter().enumerate() {
        for xc in 0..w * 3 {
            let mut acc: i64 = 1 << (PRECISION_BITS - 1);
            for (i, &kv) in k.iter().enumerate() {
                acc += rows[start + i][xc] as i64 * kv as i64;
            }
            out[y * w * 3 + xc] = clip8(acc);
        }
    }
    out
}

/// PIL `Image.resize((w, h), BICUBIC)` for RGB images.
pub fn resize_bicubic(img: &RgbImage, width: u32, height: u32) -> RgbImage {
    let (w, h) = (img.width() as usize, img.height() as usize);
    if w == 0 || h == 0 {
        return RgbImage::new(width, height);
    }
    resample(img.as_raw().chunks_exact(w * 3).collect(), w, width as usize, height as usize)
}

/// PIL's two passes over `rows` (each `in_w` RGB pixels): horizontal, then vertical, each skipped
/// when its size is unchanged.
fn resample(rows: Vec<&[u8]>, in_w: usize, out_w: usize, out_h: usize) -> RgbImage {
    let mid: Vec<Vec<u8>>;
    let rows = if out_w != in_w {
        let coeffs = coefficients(in_w, out_w);
        mid = rows.iter().map(|r| hrow(r, &coeffs)).collect();
        mid.iter().map(Vec::as_slice).collect()
    } else {
        rows
    };
    let buf = if out_h != rows.len() { vpass(&rows, out_w, out_h) } else { rows.concat() };
    RgbImage::from_raw(out_w as u32, out_h as u32, buf).expect("buffer size matches the requested dimensions")
}

/// Settings of the SigLIP image processor.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PreprocessConfig {
    pub image_size: u32,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl PreprocessConfig {
    /// The expand-to-square fill: `int(mean·255)` per channel (127 for mean 0.5).
    pub fn fill(&self) -> [u8; 3] {
        self.mean.map(|m| (m * 255.0) as u8)
    }
}

/// The square, resized RGB image the model sees, before normalisation: [`expand_to_square`] then
/// [`resize_bicubic`], pixel for pixel, without allocating the square. The horizontal pass runs on
/// the image's own rows (a tall image's rows padded as they are read); the canvas's fill rows all
/// resample to one row, computed once; the vertical pass reads each canvas row by reference. Memory
/// is the input, `height × S` intermediate pixels and the output.
pub fn square_resized(img: &RgbImage, cfg: &PreprocessConfig) -> RgbImage {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let (side, s) = (w.max(h), cfg.image_size as usize);
    if w == 0 || h == 0 {
        return RgbImage::from_pixel(s as u32, s as u32, image::Rgb(cfg.fill()));
    }
    if side == s {
        return expand_to_square(img, cfg.fill()); // PIL skips both passes
    }
    let (dx, dy) = square_offset(w as u32, h as u32);
    let (dx, dy) = (dx as usize, dy as usize);
    let fill_row: Vec<u8> = cfg.fill().iter().copied().cycle().take(side * 3).collect();
    // Horizontal pass over the image's rows as canvas rows (a tall image's padded one at a time).
    let coeffs = coefficients(side, s);
    let mut row = fill_row.clone();
    let mid: Vec<Vec<u8>> = img
        .as_raw()
        .chunks_exact(w * 3)
        .map(|r| {
            row[dx * 3..(dx + w) * 3].copy_from_slice(r);
            hrow(&row, &coeffs)
        })
        .collect();
    let fill_mid = hrow(&fill_row, &coeffs);
    let canvas: Vec<&[u8]> = (0..side)
        .map(|y| if (dy..dy + h).contains(&y) { mid[y - dy].as_slice() } else { fill_mid.as_slice() })
        .collect();
    RgbImage::from_raw(s as u32, s as u32, vpass(&canvas, s, s)).expect("buffer size matches the requested dimensions")
}

/// `pixel_values` of one image, channel-major `[3, S, S]`: `(v/255 − mean) / std`.
pub fn pixel_values(img: &RgbImage, cfg: &PreprocessConfig) -> Vec<f32> {
    let r = square_resized(img, cfg);
    let s = cfg.image_size as usize;
    let mut out = vec![0f32; 3 * s * s];
    for (i, p) in r.pixels().enumerate() {
        for c in 0..3 {
            // HF rescales in float64 then casts to float32 before normalising.
            let x = (p.0[c] as f64 * (1.0 / 255.0)) as f32;
            out[c * s * s + i] = (x - cfg.mean[c]) / cfg.std[c];
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_weights_sum_to_one_in_fixed_point() {
        for (i, o) in [(900, 384), (20, 384), (384, 384), (45, 30)] {
            for (_, k) in coefficients(i, o) {
                let s: i64 = k.iter().map(|&v| v as i64).sum();
                assert!((s - (1 << PRECISION_BITS)).abs() <= k.len() as i64, "{i}->{o}: {s}");
            }
        }
    }

    #[test]
    fn constant_image_stays_constant_and_square_is_centred() {
        let img = RgbImage::from_pixel(10, 4, image::Rgb([200, 10, 30]));
        let sq = expand_to_square(&img, [127, 127, 127]);
        assert_eq!(sq.dimensions(), (10, 10));
        assert_eq!(sq.get_pixel(0, 2).0, [127, 127, 127]);
        assert_eq!(sq.get_pixel(0, 3).0, [200, 10, 30]);
        assert_eq!(sq.get_pixel(0, 6).0, [200, 10, 30]);
        assert_eq!(sq.get_pixel(0, 7).0, [127, 127, 127]);
        let r = resize_bicubic(&img, 7, 3);
        assert!(r.pixels().all(|p| p.0 == [200, 10, 30]));
    }

    #[test]
    fn garbage_bytes_are_an_error() {
        assert!(matches!(
            decode_image(b"definitely not an image", &ImageLimits::default()),
            Err(DecodeError::Invalid(_))
        ));
    }

    /// The virtual canvas gives the materialised one's pixels exactly: wide, tall, odd offsets,
    /// shrinking and enlarging, and the no-resize case.
    #[test]
    fn square_resized_equals_expand_then_resize() {
        let mut state = 12345u64;
        let mut rnd = || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (state >> 33) as u8
        };
        for (w, h, s) in [
            (900, 600, 384),
            (600, 900, 384),
            (20, 13, 384),
            (13, 20, 384),
            (7, 1, 5),
            (1, 7, 5),
            (1000, 3, 64),
            (3, 1000, 64),
            (384, 200, 384),
            (200, 384, 384),
            (50, 50, 30),
            (31, 17, 16),
        ] {
            let img = RgbImage::from_fn(w, h, |_, _| image::Rgb([rnd(), rnd(), rnd()]));
            let cfg = PreprocessConfig { image_size: s, mean: [0.5, 0.25, 0.75], std: [0.5; 3] };
            let want = resize_bicubic(&expand_to_square(&img, cfg.fill()), s, s);
            assert_eq!(square_resized(&img, &cfg), want, "{w}×{h} → {s}");
        }
    }

    #[test]
    fn limits_refuse_from_the_header() {
        let l = ImageLimits { max_pixels: 100, max_side: 20 };
        assert!(l.check(10, 10).is_ok());
        assert!(matches!(l.check(21, 1), Err(DecodeError::TooLarge { width: 21, height: 1, .. })));
        assert!(matches!(l.check(11, 10), Err(DecodeError::TooLarge { .. })));
        assert!(matches!(l.check(0, 10), Err(DecodeError::Invalid(_))));
        // A PNG of 30×1 is refused before its pixels are decoded; 10×10 passes.
        let png = |w, h| {
            let mut b = Vec::new();
            RgbImage::new(w, h).write_to(&mut std::io::Cursor::new(&mut b), ImageFormat::Png).unwrap();
            b
        };
        let e = decode_image(&png(30, 1), &l).unwrap_err();
        assert_eq!(e.to_string(), "30×1 pixels is a side over the limit of 20 pixels");
        assert_eq!(decode_image(&png(10, 10), &l).unwrap().dimensions(), (10, 10));
    }
}
