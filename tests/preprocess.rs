//! Preprocessing parity with PIL + the HF SigLIP image processor, on photos and edge cases.

use image::RgbImage;
use qadapt_core::image::{load_image, square_resized, PreprocessConfig};
use qadapt_tests::fixtures;

fn max_diff(a: &RgbImage, b: &RgbImage) -> u8 {
    assert_eq!(a.dimensions(), b.dimensions());
    a.as_raw().iter().zip(b.as_raw()).map(|(x, y)| x.abs_diff(*y)).max().unwrap_or(0)
}

#[test]
fn matches_pil_within_one_grey_level() {
    let dir = fixtures().join("preprocess");
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
    let cfg = PreprocessConfig { image_size: 384, mean: [0.5; 3], std: [0.5; 3] };
    let mut rows = Vec::new();
    for c in cases["cases"].as_array().unwrap() {
        let input = c["input"].as_str().unwrap();
        let expected = load_image(&dir.join(c["expected"].as_str().unwrap())).unwrap();
        let img = load_image(&dir.join(input)).unwrap();
        assert_eq!(
            img.dimensions(),
            (c["width"].as_u64().unwrap() as u32, c["height"].as_u64().unwrap() as u32),
            "{input}: size after EXIF"
        );
        let d = max_diff(&square_resized(&img, &cfg), &expected);
        // Resize alone, from PIL's own decode of the JPEG: must be exact.
        let resize_only = c["decoded"]
            .as_str()
            .map(|dec| max_diff(&square_resized(&load_image(&dir.join(dec)).unwrap(), &cfg), &expected));
        rows.push((input.to_string(), d, resize_only));
    }
    for (input, d, r) in &rows {
        println!(
            "{input:<28} max diff {d} grey levels{}",
            r.map(|r| format!(" (resize of PIL's decode: {r})")).unwrap_or_default()
        );
    }
    for (input, d, r) in &rows {
        assert!(*d <= 1, "{input}: {d} grey levels from PIL");
        if let Some(r) = r {
            assert_eq!(*r, 0, "{input}: resize of PIL's decode differs");
        }
    }
    println!("preprocess: {} images within 1 grey level of PIL", rows.len());
}

#[test]
fn unreadable_image_is_a_clear_error() {
    let tmp = std::env::temp_dir().join(format!("qadapt-bad-{}.jpg", std::process::id()));
    std::fs::write(&tmp, b"\xff\xd8\xff\xe0 truncated").unwrap();
    let e = load_image(&tmp).unwrap_err().to_string();
    assert!(e.contains(tmp.to_str().unwrap()), "{e}");
    let missing = load_image(std::path::Path::new("/nonexistent/x.png")).unwrap_err().to_string();
    assert!(missing.contains("/nonexistent/x.png"), "{missing}");
    std::fs::remove_file(tmp).ok();
}
