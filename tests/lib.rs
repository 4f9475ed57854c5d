//! Shared helpers of the fixture tests: where the fixtures are, how to read the expected tensors,
//! and the one error measure every parity check uses.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};

/// The model cases written by `tools/gen_fixtures.py`.
pub const CASES: [&str; 4] = ["bunny_f32_bpe", "qadapt_f32_sharded", "qadapt_f16", "bunny_bf16_sharded"];

/// Relative tolerance of f32 parity: max |ours − HF| / max |HF|.
pub const REL_TOL: f32 = 1e-4;

/// `tests/fixtures`.
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// A case's `expected.json` and `expected.safetensors`.
pub struct Expected {
    pub json: serde_json::Value,
    pub tensors: HashMap<String, Tensor>,
}

impl Expected {
    pub fn load(case: &str) -> Self {
        let dir = fixtures().join(case);
        let json = serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
        let tensors = candle_core::safetensors::load(dir.join("expected.safetensors"), &Device::Cpu).unwrap();
        Self { json, tensors }
    }

    pub fn t(&self, name: &str) -> &Tensor {
        self.tensors.get(name).unwrap_or_else(|| panic!("expected.safetensors lacks {name}"))
    }

    pub fn ids(&self, name: &str) -> Vec<i64> {
        self.t(name).flatten_all().unwrap().to_vec1::<i64>().unwrap()
    }
}

/// max |a − b| / max |b| over all elements (shapes must agree).
pub fn rel_err(ours: &Tensor, reference: &Tensor) -> f32 {
    assert_eq!(ours.dims(), reference.dims(), "shape mismatch");
    let a = ours.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
    let b = reference.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
    let diff = (a - &b).unwrap().abs().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    let scale = b.abs().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap().max(1e-12);
    diff / scale
}
