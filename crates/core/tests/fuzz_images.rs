//! A bounded fuzz run over image decoding and preprocessing (proptest; CI runs it every time):
//! mutated JPEG / PNG / WebP files — bytes flipped, cut, spliced, header sizes rewritten — never
//! panic, never decode past the limits, and whatever decodes preprocesses to the model's square.

use proptest::prelude::*;
use qadapt_core::image::{decode_image, square_resized, DecodeError, ImageLimits, PreprocessConfig};

fn seeds() -> Vec<Vec<u8>> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests");
    [
        "bad-inputs/ok-64x48.jpg",
        "bad-inputs/jpeg-cmyk.jpg",
        "bad-inputs/png-100000x1.png",
        "bad-inputs/jpeg-60000x60000.jpg",
        "bad-inputs/webp-16383x16383.webp",
        "fixtures/preprocess/coffee_lossless.webp",
        "fixtures/preprocess/tiny_20x13.png",
        "fixtures/preprocess/rgba.png",
    ]
    .iter()
    .map(|f| std::fs::read(dir.join(f)).unwrap_or_else(|e| panic!("{f}: {e}")))
    .collect()
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip(usize, u8),
    Truncate(usize),
    Insert(usize, Vec<u8>),
    /// Overwrite 4 bytes (a size or dimension field, when it lands on one) with a big-endian value.
    Word(usize, u32),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 1..=255u8).prop_map(|(i, x)| Mutation::Flip(i, x)),
        any::<usize>().prop_map(Mutation::Truncate),
        (any::<usize>(), prop::collection::vec(any::<u8>(), 1..16)).prop_map(|(i, v)| Mutation::Insert(i, v)),
        (any::<usize>(), prop_oneof![Just(0u32), Just(1), Just(0xFFFF), Just(60000), Just(u32::MAX), any::<u32>()])
            .prop_map(|(i, w)| Mutation::Word(i, w)),
    ]
}

fn apply(mut b: Vec<u8>, muts: &[Mutation]) -> Vec<u8> {
    for m in muts {
        if b.is_empty() {
            break;
        }
        let n = b.len();
        match m {
            Mutation::Flip(i, x) => b[i % n] ^= x,
            Mutation::Truncate(i) => b.truncate(i % n),
            Mutation::Insert(i, v) => {
                let at = i % n;
                b.splice(at..at, v.iter().copied());
            }
            Mutation::Word(i, w) => {
                let at = i % n;
                for (k, byte) in w.to_be_bytes().into_iter().enumerate() {
                    if let Some(slot) = b.get_mut(at + k) {
                        *slot = byte;
                    }
                }
            }
        }
    }
    b
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn mutated_images_decode_within_limits_or_fail_cleanly(seed in 0usize..8, muts in prop::collection::vec(mutation(), 1..4)) {
        let seeds = seeds();
        let bytes = apply(seeds[seed % seeds.len()].clone(), &muts);
        let limits = ImageLimits { max_pixels: 1 << 20, max_side: 4096 };
        match decode_image(&bytes, &limits) {
            Ok(img) => {
                let (w, h) = img.dimensions();
                prop_assert!(w >= 1 && h >= 1 && w <= 4096 && h <= 4096 && (w as u64 * h as u64) <= 1 << 20, "{w}×{h}");
                let cfg = PreprocessConfig { image_size: 24, mean: [0.5; 3], std: [0.5; 3] };
                prop_assert_eq!(square_resized(&img, &cfg).dimensions(), (24, 24));
            }
            Err(DecodeError::TooLarge { width, height, .. }) => prop_assert!(limits.check(width, height).is_err()),
            Err(DecodeError::Invalid(msg)) => prop_assert!(!msg.is_empty()),
        }
    }
}
