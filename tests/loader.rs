//! Loader behaviour on edited copies of a fixture checkpoint: a missing tensor is an error naming it,
//! unknown extra tensors are tolerated, and a weight stored in another dtype still loads.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use models::{Bunny, Engine};
use qadapt_core::image::load_image;
use qadapt_tests::fixtures;

/// A copy of `bunny_f32_bpe/model` whose single safetensors file is rewritten by `edit`.
fn edited_copy(edit: impl FnOnce(&mut HashMap<String, Tensor>)) -> tempfile::TempDir {
    let src = fixtures().join("bunny_f32_bpe").join("model");
    let tmp = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), tmp.path().join(e.file_name())).unwrap();
    }
    let path = tmp.path().join("model.safetensors");
    let mut t = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    edit(&mut t);
    candle_core::safetensors::save(&t, &path).unwrap();
    tmp
}

fn logits(dir: &Path) -> Tensor {
    let e = Engine::load(dir, None, &Device::Cpu, DType::F32).unwrap();
    let img = load_image(&fixtures().join("bunny_f32_bpe").join("image.png")).unwrap();
    Tensor::new(e.first_step_logits(&img, "Is it sharp?", None).unwrap(), &Device::Cpu).unwrap()
}

#[test]
fn missing_tensor_is_named() {
    let dir = edited_copy(|t| {
        t.remove("model.final_layernorm.weight");
    });
    let e = Bunny::load(dir.path(), None, &Device::Cpu, DType::F32).unwrap_err().to_string();
    assert_eq!(e, "missing tensor model.final_layernorm.weight");
}

#[test]
fn unknown_extras_are_tolerated_and_mixed_dtypes_load() {
    let base = logits(&fixtures().join("bunny_f32_bpe").join("model"));
    let dir = edited_copy(|t| {
        t.insert("model.some_future_module.weight".into(), Tensor::ones(3, DType::F32, &Device::Cpu).unwrap());
        // The same values stored as f64 must load to the same f32 weights.
        let w = t["model.final_layernorm.weight"].to_dtype(DType::F64).unwrap();
        t.insert("model.final_layernorm.weight".into(), w);
    });
    let got = logits(dir.path());
    let diff = (got - base).unwrap().abs().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    assert_eq!(diff, 0.0);
}
