//! `config.json` as Bunny writes it (DESIGN §2), with the `vision_config` / `qformer_config` extension
//! used for other sizes. Absent fields take the values of the real Bunny-3B / Q-Adapt model; unknown
//! fields are ignored. Dimensions that the weights also carry are re-checked against the tensors by the
//! loader, so a config that disagrees with its checkpoint is an error, never a silent mis-shape.

use serde::{Deserialize, Serialize};
use std::path::Path;

use crate::{Error, Result};

/// Which composition of the model a directory holds (`model_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ModelType {
    /// Plain Bunny: SigLIP → connector → phi-2.
    #[serde(rename = "bunny-phi")]
    Bunny,
    /// Q-Adapt: Bunny with the instruction-adaptive visual prompt module before the connector.
    #[serde(rename = "bunny-qformer-phi_v3_bib")]
    QAdapt,
}

impl ModelType {
    /// The `model_type` string of config.json.
    pub fn as_str(self) -> &'static str {
        match self {
            ModelType::Bunny => "bunny-phi",
            ModelType::QAdapt => "bunny-qformer-phi_v3_bib",
        }
    }
}

/// The SigLIP tower. The real Bunny config has none: its sizes are implied by `mm_vision_tower`
/// ([`VisionConfig::so400m`]). When given, the sizes are required; `layer_norm_eps`, `hidden_act`,
/// `image_mean` and `image_std` default to HF's `SiglipVisionConfig` / `SiglipImageProcessor`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    /// Full SigLIP depth; Bunny runs the first `num_hidden_layers - 1` (second-to-last layer output).
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub image_size: usize,
    pub patch_size: usize,
    #[serde(default = "hf::siglip_layer_norm_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "hf::siglip_hidden_act")]
    pub hidden_act: String,
    #[serde(default = "hf::siglip_image_mean_std")]
    pub image_mean: [f32; 3],
    #[serde(default = "hf::siglip_image_mean_std")]
    pub image_std: [f32; 3],
}

/// The tower whose sizes a config without `vision_config` implies.
pub const SO400M_TOWER: &str = "google/siglip-so400m-patch14-384";

/// HF's defaults for the optional keys (PhiConfig, SiglipVisionConfig), never the 3B model's.
mod hf {
    pub fn partial_rotary_factor() -> f64 {
        0.5
    }
    pub fn rope_theta() -> f64 {
        10000.0
    }
    pub fn layer_norm_eps() -> f64 {
        1e-5
    }
    pub fn hidden_act() -> String {
        "gelu_new".into()
    }
    pub fn max_position_embeddings() -> usize {
        2048
    }
    pub fn bos_token_id() -> u32 {
        1
    }
    pub fn eos_token_id() -> u32 {
        2
    }
    pub fn siglip_layer_norm_eps() -> f64 {
        1e-6
    }
    pub fn siglip_hidden_act() -> String {
        "gelu_pytorch_tanh".into()
    }
    pub fn siglip_image_mean_std() -> [f32; 3] {
        [0.5; 3]
    }
}

impl VisionConfig {
    /// google/siglip-so400m-patch14-384, the tower every released Bunny / Q-Adapt uses.
    pub fn so400m() -> Self {
        Self {
            hidden_size: 1152,
            intermediate_size: 4304,
            num_hidden_layers: 27,
            num_attention_heads: 16,
            image_size: 384,
            patch_size: 14,
            layer_norm_eps: 1e-6,
            hidden_act: "gelu_pytorch_tanh".into(),
            image_mean: [0.5; 3],
            image_std: [0.5; 3],
        }
    }
}

impl VisionConfig {
    /// Visual tokens per image: ⌊image_size / patch_size⌋².
    pub fn num_patches(&self) -> usize {
        let side = self.image_size / self.patch_size;
        side * side
    }
    /// Encoder layers actually run (Bunny takes the second-to-last layer's output).
    pub fn layers_used(&self) -> usize {
        self.num_hidden_layers.saturating_sub(1)
    }
}

/// The prompt module of Q-Adapt: the BERT Q-Former ("V-T generator") and the T-V prompter.
/// Defaults: bert-base as InstructBLIP uses it, and the official Q-Adapt constants.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct QFormerConfig {
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    /// Layers with `layer % cross_attention_freq == 0` cross-attend to the image.
    pub cross_attention_freq: usize,
    pub num_query: usize,
    /// Width of the projected visual features the Q-Former attends to (EVA width in InstructBLIP).
    pub att_feat_size: usize,
    /// BERT LayerNorm eps.
    pub layer_norm_eps: f64,
    pub hidden_act: String,
    /// eps of `vlm_att_ln`.
    pub att_ln_eps: f64,
    pub cross_attn_ffn_dim: usize,
    pub cross_attn_num_heads: usize,
    /// The `0.1` of `F + 0.1·P`.
    pub prompt_scale: f64,
    pub dec_token_id: u32,
    pub max_text_length: usize,
    pub truncation_side: String,
}

impl Default for QFormerConfig {
    fn default() -> Self {
        Self {
            hidden_size: 768,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            intermediate_size: 3072,
            vocab_size: 30523,
            max_position_embeddings: 512,
            cross_attention_freq: 2,
            num_query: 32,
            att_feat_size: 1408,
            layer_norm_eps: 1e-12,
            hidden_act: "gelu".into(),
            att_ln_eps: 1e-5,
            cross_attn_ffn_dim: 2048,
            cross_attn_num_heads: 1,
            prompt_scale: 0.1,
            dec_token_id: 30522,
            max_text_length: 256,
            truncation_side: "left".into(),
        }
    }
}

/// Bunny's `config.json`: phi-2 fields at the top level, multimodal fields beside them.
///
/// Required (an error names the missing key): `model_type`, the phi sizes (`vocab_size`,
/// `hidden_size`, `num_hidden_layers`, `num_attention_heads`, `intermediate_size`), `mm_hidden_size`,
/// `mm_projector_type`, `mm_vision_tower` and `image_aspect_ratio` — every released Bunny config has
/// them, and a guess would only fail later as a weight-shape mismatch or a silently different
/// preprocessing. The others take HF `PhiConfig`'s defaults, as transformers would.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BunnyConfig {
    pub model_type: ModelType,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    #[serde(default = "hf::partial_rotary_factor")]
    pub partial_rotary_factor: f64,
    #[serde(default = "hf::rope_theta")]
    pub rope_theta: f64,
    #[serde(default = "hf::layer_norm_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "hf::hidden_act")]
    pub hidden_act: String,
    #[serde(default = "hf::max_position_embeddings")]
    pub max_position_embeddings: usize,
    #[serde(default = "hf::bos_token_id")]
    pub bos_token_id: u32,
    #[serde(default = "hf::eos_token_id")]
    pub eos_token_id: u32,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    pub mm_hidden_size: usize,
    pub mm_projector_type: String,
    pub mm_vision_tower: String,
    pub image_aspect_ratio: String,
    /// transformers ≥ 5 moves `partial_rotary_factor` / `rope_theta` here; honoured when present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_parameters: Option<RopeParameters>,
    /// Absent in the real configs: filled from `mm_vision_tower` before parsing.
    pub vision_config: VisionConfig,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qformer_config: Option<QFormerConfig>,
}

/// The nested rope block of transformers 5.x configs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct RopeParameters {
    pub partial_rotary_factor: Option<f64>,
    pub rope_theta: Option<f64>,
}

impl BunnyConfig {
    /// Reads and validates `config.json` of a model directory.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json(&text).map_err(|e| match e {
            Error::Config { msg, .. } => Error::Config { path: path.to_path_buf(), msg },
            other => other,
        })
    }

    /// Parses and validates config JSON text. A missing required key or a wrong-typed one is an
    /// error naming it.
    pub fn from_json(text: &str) -> Result<Self> {
        let bad = |msg: String| Error::Config { path: Default::default(), msg };
        let mut raw: serde_json::Value = serde_json::from_str(text).map_err(|e| bad(format!("invalid JSON: {e}")))?;
        let obj = raw.as_object_mut().ok_or_else(|| bad("not a JSON object".into()))?;
        if !obj.contains_key("vision_config") {
            // The real configs name the tower instead of sizing it.
            match obj.get("mm_vision_tower").and_then(|t| t.as_str()) {
                Some(t) if t.trim_end_matches('/').ends_with(SO400M_TOWER) => {
                    let v = serde_json::to_value(VisionConfig::so400m()).map_err(|e| bad(e.to_string()))?;
                    obj.insert("vision_config".into(), v);
                }
                Some(t) => {
                    return Err(bad(format!(
                        "no vision_config, and the sizes of mm_vision_tower {t:?} are not known (only {SO400M_TOWER}): add a vision_config"
                    )))
                }
                None => return Err(bad("missing field `mm_vision_tower`".into())),
            }
        }
        let mut cfg: BunnyConfig = crate::from_json(raw.to_string().as_bytes()).map_err(|(_, msg)| bad(msg))?;
        if let Some(rp) = &cfg.rope_parameters {
            if let Some(f) = rp.partial_rotary_factor {
                cfg.partial_rotary_factor = f;
            }
            if let Some(t) = rp.rope_theta {
                cfg.rope_theta = t;
            }
        }
        if cfg.model_type == ModelType::QAdapt && cfg.qformer_config.is_none() {
            cfg.qformer_config = Some(QFormerConfig::default());
        }
        if let Some(q) = cfg.qformer_config.as_mut() {
            // Text positions are embedded from 0: a longer truncation would index past the table.
            if q.max_text_length > q.max_position_embeddings {
                tracing::warn!(
                    "qformer max_text_length {} exceeds its max_position_embeddings {}: questions are truncated to {}",
                    q.max_text_length,
                    q.max_position_embeddings,
                    q.max_position_embeddings
                );
                q.max_text_length = q.max_position_embeddings;
            }
        }
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::Config { path: Default::default(), msg });
        if self.mm_projector_type != "mlp2x_gelu" {
            return bad(format!("mm_projector_type {:?} is not supported (only mlp2x_gelu)", self.mm_projector_type));
        }
        if self.num_attention_heads == 0 || !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return bad(format!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if !self.rotary_dims().is_multiple_of(2) || self.rotary_dims() > self.head_dim() {
            return bad(format!(
                "partial_rotary_factor {} gives {} rotary dims of a {}-dim head",
                self.partial_rotary_factor,
                self.rotary_dims(),
                self.head_dim()
            ));
        }
        let v = &self.vision_config;
        // 384 / 14 is not whole: the stride-14 convolution drops the remainder (27² = 729 patches).
        if v.patch_size == 0 || v.patch_size > v.image_size {
            return bad(format!("vision patch_size {} does not fit image_size {}", v.patch_size, v.image_size));
        }
        if v.num_attention_heads == 0 || !v.hidden_size.is_multiple_of(v.num_attention_heads) {
            return bad(format!(
                "vision hidden_size {} is not divisible by its heads {}",
                v.hidden_size, v.num_attention_heads
            ));
        }
        if v.num_hidden_layers < 2 {
            return bad("vision num_hidden_layers must be ≥ 2 (Bunny uses the second-to-last layer)".into());
        }
        if let Some(q) = &self.qformer_config {
            if q.num_attention_heads == 0 || q.hidden_size % q.num_attention_heads != 0 {
                return bad(format!(
                    "qformer hidden_size {} is not divisible by its heads {}",
                    q.hidden_size, q.num_attention_heads
                ));
            }
            if q.cross_attention_freq == 0 {
                return bad("qformer cross_attention_freq must be ≥ 1".into());
            }
            if q.cross_attn_num_heads == 0 || !self.mm_hidden_size.is_multiple_of(q.cross_attn_num_heads) {
                return bad(format!(
                    "mm_hidden_size {} is not divisible by cross_attn_num_heads {}",
                    self.mm_hidden_size, q.cross_attn_num_heads
                ));
            }
        }
        Ok(())
    }

    /// Per-head width of phi-2 attention.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Rotated dims per head: `int(partial_rotary_factor · head_dim)` as HF computes it.
    pub fn rotary_dims(&self) -> usize {
        (self.partial_rotary_factor * self.head_dim() as f64) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The keys every released Bunny config has, at the 3B model's values.
    pub(crate) const REAL_3B: &str = r#"{"model_type":"bunny-qformer-phi_v3_bib","vocab_size":50295,"hidden_size":2560,"num_hidden_layers":32,"num_attention_heads":32,"intermediate_size":10240,"partial_rotary_factor":0.4,"mm_hidden_size":1152,"mm_projector_type":"mlp2x_gelu","mm_vision_tower":"google/siglip-so400m-patch14-384","image_aspect_ratio":"pad"}"#;

    fn with(edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) -> Result<BunnyConfig> {
        let mut v: serde_json::Value = serde_json::from_str(REAL_3B).unwrap();
        edit(v.as_object_mut().unwrap());
        BunnyConfig::from_json(&v.to_string())
    }

    #[test]
    fn required_keys_are_named_when_missing_or_wrong() {
        for key in [
            "model_type",
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "mm_hidden_size",
            "mm_projector_type",
            "mm_vision_tower",
            "image_aspect_ratio",
        ] {
            let e = with(|m| drop(m.remove(key))).unwrap_err().to_string();
            assert!(e.contains(&format!("missing field `{key}`")), "{key}: {e}");
        }
        let e = with(|m| drop(m.insert("hidden_size".into(), "big".into()))).unwrap_err().to_string();
        assert!(e.contains("hidden_size: invalid type"), "{e}");
        let e = with(|m| drop(m.insert("vision_config".into(), serde_json::json!({"hidden_size": 8})))).unwrap_err();
        assert!(e.to_string().contains("vision_config: missing field `intermediate_size`"), "{e}");
        let e = with(|m| drop(m.insert("mm_vision_tower".into(), "openai/clip-vit-large-patch14".into()))).unwrap_err();
        assert!(e.to_string().contains("add a vision_config"), "{e}");
    }

    /// Optional keys take HF PhiConfig's defaults, not the 3B model's: a config without
    /// `partial_rotary_factor` rotates half the head, as transformers does.
    #[test]
    fn optional_keys_take_hf_defaults() {
        let c = with(|m| drop(m.remove("partial_rotary_factor"))).unwrap();
        assert_eq!((c.partial_rotary_factor, c.rotary_dims()), (0.5, 40));
        assert_eq!((c.bos_token_id, c.eos_token_id, c.pad_token_id), (1, 2, None));
        assert_eq!((c.rope_theta, c.layer_norm_eps, c.max_position_embeddings), (10000.0, 1e-5, 2048));
        assert_eq!(c.hidden_act, "gelu_new");
        let c = with(|m| {
            m.insert(
                "vision_config".into(),
                serde_json::json!({"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
                    "num_attention_heads": 2, "image_size": 32, "patch_size": 8}),
            );
        })
        .unwrap();
        let v = &c.vision_config;
        assert_eq!((v.layer_norm_eps, v.hidden_act.as_str(), v.image_mean), (1e-6, "gelu_pytorch_tanh", [0.5; 3]));
    }

    #[test]
    fn real_defaults_give_so400m_and_phi2_shapes() {
        let c = BunnyConfig::from_json(REAL_3B).unwrap();
        assert_eq!(c.head_dim(), 80);
        assert_eq!(c.rotary_dims(), 32);
        assert_eq!(c.vision_config.num_patches(), 729);
        assert_eq!(c.vision_config.layers_used(), 26);
        assert_eq!(c.qformer_config.unwrap().num_query, 32);
    }

    #[test]
    fn nested_rope_parameters_win() {
        let c = with(|m| {
            m.insert("rope_parameters".into(), serde_json::json!({"partial_rotary_factor": 0.5, "rope_theta": 500.0}));
        })
        .unwrap();
        assert_eq!(c.rotary_dims(), 40);
        assert_eq!(c.rope_theta, 500.0);
    }

    #[test]
    fn qformer_text_length_is_clamped_to_its_position_table() {
        let c = with(|m| {
            m.insert(
                "qformer_config".into(),
                serde_json::json!({"max_position_embeddings": 64, "max_text_length": 256}),
            );
        })
        .unwrap();
        assert_eq!(c.qformer_config.unwrap().max_text_length, 64);
    }

    #[test]
    fn bad_json_and_unknown_model_type_are_errors() {
        assert!(BunnyConfig::from_json("{").is_err());
        let e = with(|m| drop(m.insert("model_type".into(), "llava".into()))).unwrap_err().to_string();
        assert!(e.contains("llava"), "{e}");
    }
}
