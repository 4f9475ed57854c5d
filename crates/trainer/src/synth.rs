//! `qadapt-train synth`: a synthetic EIQA dataset in Q-Instruct format, the embedded default that
//! needs no download. Each image is drawn procedurally (gradient, stripes, shapes) and then degraded
//! by one known distortion at a graded strength; its quality label follows from the strength.
//!
//! Writes `images/*.png`, `train.json` / `test.json` (held-out images), `labels.csv`
//! (`image,mos,split,distortion,strength`) and `qbench.json` (the held-out images' yes-or-no, what and
//! how questions as Q-Bench A1 rows, for `eval --qbench`). Every row carries `task`
//! (explanation | answering).

use std::io::Cursor;
use std::path::Path;

use anyhow::Context;
use image::{Rgb, RgbImage};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

/// Distortions, with the noun the texts use.
pub const DISTORTIONS: [&str; 6] = ["blur", "noise", "compression", "over-exposure", "under-exposure", "colour cast"];
/// Quality words by strength 0..=4 (0: pristine).
pub const LEVEL_BY_STRENGTH: [&str; 5] = ["excellent", "good", "fair", "poor", "bad"];
const GRADE: [&str; 5] = ["no", "slight", "moderate", "strong", "severe"];

/// A clean scene: a vertical gradient with stripes and one or two flat shapes. Exposure and colour
/// balance are held near neutral (grey level 110–140, chroma within ±12) so that every distortion,
/// at every strength, moves the image out of the clean range: the labels follow from the pixels.
fn draw_base(rng: &mut StdRng, w: u32, h: u32) -> RgbImage {
    fn colour(rng: &mut StdRng, lo: f32, hi: f32) -> [f32; 3] {
        let g = rng.random_range(lo..hi);
        std::array::from_fn(|_| g + rng.random_range(-12.0..12.0f32))
    }
    let (c0, c1) = (colour(rng, 110.0, 140.0), colour(rng, 110.0, 140.0));
    // Fine stripes give every image texture that blur and compression visibly destroy.
    let freq = rng.random_range(0.8..1.6f32);
    let amp = rng.random_range(18.0..30.0f32);
    let mut img = RgbImage::from_fn(w, h, |x, y| {
        let t = y as f32 / h as f32;
        let stripe = amp * ((x as f32 * freq).sin());
        Rgb(std::array::from_fn(|c| (c0[c] * (1.0 - t) + c1[c] * t + stripe).clamp(0.0, 255.0) as u8))
    });
    for _ in 0..rng.random_range(1..3) {
        let col = Rgb(colour(rng, 80.0, 170.0).map(|v| v.clamp(0.0, 255.0) as u8));
        let (cx, cy) = (rng.random_range(0..w) as i64, rng.random_range(0..h) as i64);
        let r = rng.random_range(4..(w.min(h) / 3).max(5)) as i64;
        let square = rng.random::<bool>();
        for y in (cy - r).max(0)..(cy + r).min(h as i64) {
            for x in (cx - r).max(0)..(cx + r).min(w as i64) {
                if square || (x - cx).pow(2) + (y - cy).pow(2) <= r * r {
                    img.put_pixel(x as u32, y as u32, col);
                }
            }
        }
    }
    img
}

fn distort(img: &RgbImage, kind: usize, s: usize, rng: &mut StdRng) -> anyhow::Result<RgbImage> {
    let sf = s as f32;
    let map = |img: &RgbImage, f: &dyn Fn(usize, f32) -> f32| {
        let mut out = img.clone();
        for p in out.pixels_mut() {
            for c in 0..3 {
                p.0[c] = f(c, p.0[c] as f32).clamp(0.0, 255.0) as u8;
            }
        }
        out
    };
    Ok(match (kind, s) {
        (_, 0) => img.clone(),
        (0, _) => image::imageops::blur(img, 0.5 * sf),
        (1, _) => {
            let mut out = img.clone();
            for p in out.pixels_mut() {
                for c in 0..3 {
                    let n = models::train_source::normal(rng) as f32 * 15.0 * sf;
                    p.0[c] = (p.0[c] as f32 + n).clamp(0.0, 255.0) as u8;
                }
            }
            out
        }
        (2, _) => {
            let mut bytes = Vec::new();
            let q = [90u8, 25, 10, 5, 2][s];
            image::codecs::jpeg::JpegEncoder::new_with_quality(Cursor::new(&mut bytes), q).encode_image(img)?;
            image::load_from_memory(&bytes)?.to_rgb8()
        }
        (3, _) => map(img, &|_, v| v + 22.0 * sf),
        (4, _) => map(img, &|_, v| v * (1.0 - 0.18 * sf)),
        _ => {
            let ch = rng.random_range(0..3);
            map(img, &move |c, v| if c == ch { v + 25.0 * sf } else { v - 6.0 * sf })
        }
    })
}

fn explanation(kind: usize, s: usize) -> String {
    let what = if s == 0 {
        "The image is clean: edges are sharp, there is no visible noise or blocking, and the exposure and colours look natural.".to_string()
    } else {
        let effect = match kind {
            0 => "so edges and fine textures are smeared",
            1 => "so flat areas look grainy and speckled",
            2 => "so blocky compression artifacts cover the image",
            3 => "so bright regions are washed out and lose detail",
            4 => "so the image is dark and shadow details are lost",
            _ => "so the colours are tinted and look unnatural",
        };
        format!("The image shows {} {}, {effect}.", GRADE[s], DISTORTIONS[kind])
    };
    // The verdict comes first, in the words of the Q-Align score prompt, so that it is read from the
    // image rather than inferred from the grade word written before it.
    format!("The quality of the image is {}. {what}", LEVEL_BY_STRENGTH[s])
}

fn cap(s: &str) -> String {
    let mut c = s.chars();
    c.next().map(|f| f.to_uppercase().collect::<String>() + c.as_str()).unwrap_or_default()
}

/// The options listed as Q-Bench lists them (`A. …` lines) and its instruction: the format
/// `qadapt-run eval --qbench` asks in.
fn with_options(question: &str, options: &[&str]) -> String {
    let listing: String = options.iter().zip(LETTERS).map(|(o, l)| format!("{l}. {o}\n")).collect();
    format!("{question}\n{listing}{}", qadapt_core::qbench::INSTRUCTION)
}

const LETTERS: [&str; 5] = ["A", "B", "C", "D", "E"];

/// `n` options: `truth` and `n - 1` others drawn from `order` (which holds them all), listed in
/// the order of `order`, as Q-Bench lists its options (Yes before No, levels from high to low);
/// returns them with the index of the truth. Shuffled listings leave a model of the default size
/// at chance on the letter at the default budget (README, "Q-Bench format"): it must then find the
/// answer's text in the listing and copy the letter before it, which two small layers do not learn
/// from a few thousand examples; in this order the letter follows from the answer and the options.
fn options<'a>(truth: &'a str, order: &[&'a str], n: usize, rng: &mut StdRng) -> (Vec<&'a str>, usize) {
    let mut opts = vec![truth];
    while opts.len() < n.min(order.len()) {
        let o = order[rng.random_range(0..order.len())];
        if !opts.contains(&o) {
            opts.push(o);
        }
    }
    opts.sort_by_key(|o| order.iter().position(|x| x == o));
    let at = opts.iter().position(|o| *o == truth).unwrap_or(0);
    (opts, at)
}

/// Rows (conversations) about one image, and its Q-Bench A1 rows (`{img_path, question,
/// candidates, correct_ans, type, concern}`: a yes-or-no, a what and a how question).
///
/// Every short-answer question is asked twice: free-form ("Yes.", "Blur.") and in Q-Bench's
/// option format, answered by the option's letter ("B."). The option rows teach the format the
/// benchmark asks in; the free-form ones teach the content the letters point at. The distortion
/// question is asked over two different option sets, because reading the answer's letter off the
/// listing is the hardest thing a small model learns here (DESIGN §5, "Q-Bench format").
fn rows(image: &str, kind: usize, s: usize, rng: &mut StdRng) -> (Vec<serde_json::Value>, Vec<serde_json::Value>) {
    let row = |task: &str, q: String, a: String| {
        json!({"id": format!("{image}:{task}:{}", q.len()), "image": image, "task": task,
        "conversations": [{"from": "human", "value": format!("<image>\n{q}")}, {"from": "gpt", "value": a}]})
    };
    let qbench = |q: &str, opts: &[&str], at: usize, ty: usize| json!({"img_path": image, "question": q, "candidates": opts, "correct_ans": opts[at], "type": ty, "concern": 0});
    let letter = |at: usize| format!("{}.", LETTERS[at]);
    let main = if s == 0 { "none" } else { DISTORTIONS[kind] };
    let level = LEVEL_BY_STRENGTH[s];
    let mut out = vec![
        row(
            "explanation",
            "Describe the quality of this image and explain your judgement.".into(),
            explanation(kind, s),
        ),
        row(
            "answering",
            "How would you rate the quality of this image?".into(),
            format!("The quality of the image is {level}."),
        ),
    ];
    let mut a1 = Vec::new();
    // Yes/no, free-form and with options in either order: half the time about the real distortion.
    for with_opts in [false, true] {
        let asked = if s > 0 && rng.random::<bool>() { kind } else { rng.random_range(0..DISTORTIONS.len()) };
        let yes = s > 0 && asked == kind;
        let q = format!("Does this image suffer from {}?", DISTORTIONS[asked]);
        if with_opts {
            let (opts, at) = options(if yes { "Yes" } else { "No" }, &["Yes", "No"], 2, rng);
            out.push(row("answering", with_options(&q, &opts), letter(at)));
            a1.push(qbench(&q, &opts, at, 0));
        } else {
            out.push(row("answering", q, if yes { "Yes." } else { "No." }.into()));
        }
    }
    // What: free-form, then over two option sets.
    out.push(row("answering", "What is the main distortion in this image?".into(), format!("{}.", cap(main))));
    let mut pool: Vec<&str> = DISTORTIONS.to_vec();
    pool.push("none");
    let q = "Which distortion is most visible in this image?";
    for i in 0..2 {
        let (opts, at) = options(main, &pool, 4, rng);
        out.push(row("answering", with_options(q, &opts), letter(at)));
        if i == 0 {
            a1.push(qbench(q, &opts, at, 1));
        }
    }
    // How: the quality level over four of the five.
    let (opts, at) = options(level, &LEVEL_BY_STRENGTH, 4, rng);
    let q = "How is the overall quality of this image?";
    out.push(row("answering", with_options(q, &opts), letter(at)));
    a1.push(qbench(q, &opts, at, 2));
    (out, a1)
}

/// Generates `n` images (a `test_fraction` of them held out) under `out`.
/// `size` is the long side in pixels: match the model's image size so that no resize blurs the
/// distortions away.
pub fn generate(out: &Path, n: usize, size: u32, seed: u64, test_fraction: f64) -> anyhow::Result<(usize, usize)> {
    anyhow::ensure!(size >= 8, "--size must be at least 8 pixels");
    let img_dir = out.join("images");
    std::fs::create_dir_all(&img_dir).with_context(|| format!("creating {}", img_dir.display()))?;
    let mut rng = StdRng::seed_from_u64(seed);
    let (mut train, mut test, mut qbench) = (Vec::new(), Vec::new(), Vec::new());
    let mut csv = String::from("image,mos,split,distortion,strength\n");
    let n_test = ((n as f64) * test_fraction).round() as usize;
    for i in 0..n {
        let short = size * 3 / 4;
        let (w, h) = if rng.random::<bool>() { (size, short) } else { (short, size) };
        let base = draw_base(&mut rng, w, h);
        let kind = rng.random_range(0..DISTORTIONS.len());
        let s = rng.random_range(0..5);
        let img = distort(&base, kind, s, &mut rng)?;
        let name = format!("img_{i:05}.png");
        img.save(img_dir.join(&name)).with_context(|| format!("writing {name}"))?;
        let mos = (5.0 - s as f64 + rng.random_range(-0.3..0.3)).clamp(1.0, 5.0);
        let split = if i < n - n_test { "train" } else { "test" };
        let distortion = if s == 0 { "none" } else { DISTORTIONS[kind] };
        csv.push_str(&format!("images/{name},{mos:.3},{split},{distortion},{s}\n"));
        let (r, a1) = rows(&format!("images/{name}"), kind, s, &mut rng);
        if split == "train" {
            train.extend(r)
        } else {
            test.extend(r);
            qbench.extend(a1);
        }
    }
    std::fs::write(out.join("train.json"), serde_json::to_string_pretty(&train)?)?;
    std::fs::write(out.join("test.json"), serde_json::to_string_pretty(&test)?)?;
    std::fs::write(out.join("labels.csv"), csv)?;
    std::fs::write(out.join("qbench.json"), serde_json::to_string_pretty(&qbench)?)?;
    Ok((train.len(), test.len()))
}
