//! Adapters merged on load: B = 0 is the base model, a random LoRA gives exactly W + (α/r)·B·A,
//! replacement tensors win, and an adapter aimed at a missing weight is an error naming it.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use models::adapter::AdaptedSource;
use models::loader::{Checkpoint, WeightSource};
use models::{Bunny, Engine};
use qadapt_core::image::load_image;
use qadapt_tests::fixtures;

const Q: &str = "model.layers.0.self_attn.q_proj";
const VQ: &str = "model.vision_tower.vision_tower.vision_model.encoder.layers.1.self_attn.v_proj";

fn write_adapter(dir: &Path, zero_b: bool, extra: Option<(&str, Tensor)>) {
    std::fs::write(
        dir.join("adapter_config.json"),
        r#"{"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"]}"#,
    )
    .unwrap();
    let dev = Device::Cpu;
    let mut t = HashMap::new();
    for (key, din, dout) in [(Q, 80, 80), (VQ, 32, 32)] {
        let a = Tensor::randn(0f32, 1.0, (2, din), &dev).unwrap();
        let b = if zero_b {
            Tensor::zeros((dout, 2), DType::F32, &dev).unwrap()
        } else {
            Tensor::randn(0f32, 0.5, (dout, 2), &dev).unwrap()
        };
        t.insert(format!("base_model.model.{key}.lora_A.weight"), a);
        t.insert(format!("base_model.model.{key}.lora_B.weight"), b);
    }
    candle_core::safetensors::save(&t, dir.join("adapter_model.safetensors")).unwrap();
    if let Some((k, v)) = extra {
        let m: HashMap<String, Tensor> = [(k.to_string(), v)].into();
        candle_core::safetensors::save(&m, dir.join("non_lora_trainables.safetensors")).unwrap();
    }
}

fn first_logits(model: &Path, adapter: Option<&Path>) -> Tensor {
    let e = Engine::load(model, adapter, &Device::Cpu, DType::F32).unwrap();
    let img = load_image(&model.parent().unwrap().join("image.png")).unwrap();
    Tensor::new(e.first_step_logits(&img, "Is it sharp?", None).unwrap(), &Device::Cpu).unwrap()
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

#[test]
fn zero_b_is_the_base_model_and_lora_merges_exactly() {
    let model = fixtures().join("qadapt_f32_sharded").join("model");
    let base = first_logits(&model, None);

    let zero = tempfile::tempdir().unwrap();
    write_adapter(zero.path(), true, None);
    let same = first_logits(&model, Some(zero.path()));
    assert_eq!(max_abs(&(same - &base).unwrap()), 0.0, "B = 0 must leave the model unchanged");

    let rand = tempfile::tempdir().unwrap();
    let new_bias = Tensor::zeros(80, DType::F32, &Device::Cpu).unwrap();
    write_adapter(rand.path(), false, Some(("base_model.model.model.mm_projector.2.bias", new_bias)));
    let ck = Checkpoint::open(&model, &Device::Cpu, DType::F32).unwrap();
    let src = AdaptedSource::open(&ck, rand.path(), &Device::Cpu, DType::F32).unwrap();
    assert_eq!(src.counts(), (2, 1));
    let lora = candle_core::safetensors::load(rand.path().join("adapter_model.safetensors"), &Device::Cpu).unwrap();
    for key in [Q, VQ] {
        let shape = ck.shape(&format!("{key}.weight")).unwrap();
        let w = ck.get(&format!("{key}.weight"), &shape).unwrap();
        let (a, b) = (
            &lora[&format!("base_model.model.{key}.lora_A.weight")],
            &lora[&format!("base_model.model.{key}.lora_B.weight")],
        );
        let want = (w + (b.matmul(a).unwrap() * 2.0).unwrap()).unwrap(); // α / r = 4 / 2
        let got = src.get(&format!("{key}.weight"), &shape).unwrap();
        let err = max_abs(&(got - want).unwrap());
        assert!(err < 1e-6, "{key}: merged weight off by {err}");
    }
    let cfg = qadapt_core::BunnyConfig::from_file(&model.join("config.json")).unwrap();
    let m = Bunny::new(&src, cfg).unwrap();
    assert_eq!(max_abs(&m.mm_projector.l2.bias.as_ref().unwrap().t), 0.0, "replacement tensor must win");

    let changed = first_logits(&model, Some(rand.path()));
    assert!(max_abs(&(changed - &base).unwrap()) > 1e-3, "a random LoRA must change the logits");
}

#[test]
fn adapter_on_a_missing_weight_is_an_error() {
    let model = fixtures().join("bunny_f32_bpe").join("model");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("adapter_config.json"), r#"{"r": 1, "lora_alpha": 1}"#).unwrap();
    let t: HashMap<String, Tensor> = [
        (
            "base_model.model.model.nothing.lora_A.weight".to_string(),
            Tensor::zeros((1, 4), DType::F32, &Device::Cpu).unwrap(),
        ),
        (
            "base_model.model.model.nothing.lora_B.weight".to_string(),
            Tensor::zeros((4, 1), DType::F32, &Device::Cpu).unwrap(),
        ),
    ]
    .into();
    candle_core::safetensors::save(&t, dir.path().join("adapter_model.safetensors")).unwrap();
    let e = Engine::load(&model, Some(dir.path()), &Device::Cpu, DType::F32).err().unwrap().to_string();
    assert!(e.contains("model.nothing.weight"), "{e}");
}
