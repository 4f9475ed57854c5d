//! Image preprocessing as Bunny does it with PIL (DESIGN §3, §7.8): RGB, expand to a square filled
//! with the mean colour, bicubic resize, /255, normalise.
//!
//! The resize reproduces Pillow's `ImagingResample` for 8-bit images: separable two-pass (horizontal,
//! then vertical) convolution with the a = −0.5 cubic kernel widened by the scale when shrinking
//! (antialiasing), coefficients in 22-bit fixed point, and an 8-bit intermediate image. Doing the same
//! integer arithmetic is what makes the output equal PIL's, not merely close. JPEGs are decoded by
//! libjpeg-turbo, Pillow's own decoder, so photos match PIL from the file onwards.

use std::path::Path;

use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, RgbImage};

use crate::{Error, Result};

/// Decodes JPEG / PNG / WebP (format sniffed from the bytes) and applies the EXIF orientation.
pub fn load_image(path: &Path) -> Result<RgbImage> {
    let bad = |msg: String| Error::Image { path: path.to_path_buf(), msg };
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    decode_image(&bytes).map_err(bad)
}

/// Like [`load_image`] for bytes already in memory (e.g. an upload); the error is a plain message.
pub fn decode_image(bytes: &[u8]) -> std::result::Result<RgbImage, String> {
    let reader = ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| format!("cannot read: {e}"))?;
    if reader.format().is_none() {
        return Err("not a JPEG, PNG or WebP image".into());
    }
    let is_jpeg = reader.format() == Some(ImageFormat::Jpeg);
    let mut decoder = reader.into_decoder().map_err(|e| format!("cannot decode: {e}"))?;
    let orientation = decoder.orientation().map_err(|e| format!("bad EXIF orientation: {e}"))?;
    let mut img = match is_jpeg.then(|| decode_jpeg_libjpeg(bytes)).flatten() {
        Some(rgb) => DynamicImage::ImageRgb8(rgb),
        None => DynamicImage::from_decoder(decoder).map_err(|e| format!("cannot decode: {e}"))?,
    };
    img.apply_orientation(orientation);
    // PIL's convert('RGB') drops alpha without compositing and replicates grey; to_rgb8 does the same.
    Ok(img.to_rgb8())
}

/// JPEG pixels through libjpeg-turbo (islow IDCT, fancy upsampling), as Pillow decodes them; other
/// JPEG decoders differ by a few grey levels. `None` when libjpeg cannot give RGB (e.g. CMYK, corrupt
/// data): the caller then falls back to the `image` crate, which reports the error.
fn decode_jpeg_libjpeg(bytes: &[u8]) -> Option<RgbImage> {
    // libjpeg reports fatal errors by unwinding out of its error handler.
    std::panic::catch_unwind(|| -> Option<RgbImage> {
        let mut d = mozjpeg::Decompress::new_mem(bytes).ok()?.rgb().ok()?;
        let (w, h) = (d.width() as u32, d.height() as u32);
        let px: Vec<[u8; 3]> = d.read_scanlines().ok()?;
        d.finish().ok()?;
        RgbImage::from_raw(w, h, px.into_iter().flatten().collect())
    })
    .ok()
    .flatten()
}

/// Bunny's `expand2square`: centre on a square canvas of the longer side filled with `fill`;
/// the offset uses floor division, as Python's `//` does.
pub fn expand_to_square(img: &RgbImage, fill: [u8; 3]) -> RgbImage {
    let (w, h) = img.dimensions();
    if w == h {
        return img.clone();
    }
    let side = w.max(h);
    let mut out = RgbImage::from_pixel(side, side, image::Rgb(fill));
    let (dx, dy) = if w > h { (0, (w - h) / 2) } else { ((h - w) / 2, 0) };
    image::imageops::replace(&mut out, img, dx as i64, dy as i64);
    out
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

/// One resampling pass along rows (`horizontal`) or columns, on interleaved RGB u8.
fn pass(src: &[u8], w: usize, h: usize, out_len: usize, horizontal: bool) -> Vec<u8> {
    let coeffs = coefficients(if horizontal { w } else { h }, out_len);
    let (ow, oh) = if horizontal { (out_len, h) } else { (w, out_len) };
    let mut out = vec![0u8; ow * oh * 3];
    for y in 0..oh {
        for x in 0..ow {
            let (start, k) = &coeffs[if horizontal { x } else { y }];
            for c in 0..3 {
                let mut acc: i64 = 1 << (PRECISION_BITS - 1);
                for (i, &kv) in k.iter().enumerate() {
                    let (sx, sy) = if horizontal { (start + i, y) } else { (x, start + i) };
                    acc += src[(sy * w + sx) * 3 + c] as i64 * kv as i64;
                }
                out[(y * ow + x) * 3 + c] = clip8(acc);
            }
        }
    }
    out
}

/// PIL `Image.resize((w, h), BICUBIC)` for RGB images.
pub fn resize_bicubic(img: &RgbImage, width: u32, height: u32) -> RgbImage {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let mut buf = img.as_raw().clone();
    let mut cur_w = w;
    if width as usize != w {
        buf = pass(&buf, w, h, width as usize, true);
        cur_w = width as usize;
    }
    if height as usize != h {
        buf = pass(&buf, cur_w, h, height as usize, false);
    }
    RgbImage::from_raw(width, height, buf).expect("buffer size matches the requested dimensions")
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

/// The square, resized RGB image the model sees, before normalisation.
pub fn square_resized(img: &RgbImage, cfg: &PreprocessConfig) -> RgbImage {
    let sq = expand_to_square(img, cfg.fill());
    resize_bicubic(&sq, cfg.image_size, cfg.image_size)
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
        assert!(decode_image(b"definitely not an image").is_err());
    }
}
