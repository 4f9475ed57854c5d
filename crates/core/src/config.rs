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

/// The SigLIP tower. Defaults: google/siglip-so400m-patch14-384, implied by `mm_vision_tower`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct VisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    /// Full SigLIP depth; Bunny runs the first `num_hidden_layers - 1` (second-to-last layer output).
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub layer_norm_eps: f64,
    pub hidden_act: String,
    pub image_mean: [f32; 3],
    pub image_std: [f32; 3],
}

impl Default for VisionConfig {
    fn default() -> Self {
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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct BunnyConfig {
    pub model_type: ModelType,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub partial_rotary_factor: f64,
    pub rope_theta: f64,
    pub layer_norm_eps: f64,
    pub hidden_act: String,
    pub max_position_embeddings: usize,
    pub bos_token_id: u32,
    pub eos_token_id: u32,
    pub pad_token_id: Option<u32>,
    pub mm_hidden_size: usize,
    pub mm_projector_type: String,
    pub mm_vision_tower: String,
    pub image_aspect_ratio: String,
    /// transformers ≥ 5 moves `partial_rotary_factor` / `rope_theta` here; honoured when present.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rope_parameters: Option<RopeParameters>,
    pub vision_config: VisionConfig,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub qformer_config: Option<QFormerConfig>,
}

/// The nested rope block of transformers 5.x configs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct RopeParameters {
    pub partial_rotary_factor: Option<f64>,
    pub rope_theta: Option<f64>,
}

impl Default for BunnyConfig {
    fn default() -> Self {
        Self {
            model_type: ModelType::Bunny,
            vocab_size: 50295,
            hidden_size: 2560,
            num_hidden_layers: 32,
            num_attention_heads: 32,
            intermediate_size: 10240,
            partial_rotary_factor: 0.4,
            rope_theta: 10000.0,
            layer_norm_eps: 1e-5,
            hidden_act: "gelu_new".into(),
            max_position_embeddings: 2048,
            bos_token_id: 50256,
            eos_token_id: 50256,
            pad_token_id: None,
            mm_hidden_size: 1152,
            mm_projector_type: "mlp2x_gelu".into(),
            mm_vision_tower: "google/siglip-so400m-patch14-384".into(),
            image_aspect_ratio: "pad".into(),
            rope_parameters: None,
            vision_config: VisionConfig::default(),
            qformer_config: None,
        }
    }
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

    /// Parses and validates config JSON text.
    pub fn from_json(text: &str) -> Result<Self> {
        let mut cfg: BunnyConfig = serde_json::from_str(text)
            .map_err(|e| Error::Config { path: Default::default(), msg: format!("invalid JSON: {e}") })?;
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

    #[test]
    fn real_defaults_give_so400m_and_phi2_shapes() {
        let c = BunnyConfig::from_json(r#"{"model_type":"bunny-qformer-phi_v3_bib"}"#).unwrap();
        assert_eq!(c.head_dim(), 80);
        assert_eq!(c.rotary_dims(), 32);
        assert_eq!(c.vision_config.num_patches(), 729);
        assert_eq!(c.vision_config.layers_used(), 26);
        assert_eq!(c.qformer_config.unwrap().num_query, 32);
    }

    #[test]
    fn nested_rope_parameters_win() {
        let c = BunnyConfig::from_json(
            r#"{"model_type":"bunny-phi","rope_parameters":{"partial_rotary_factor":0.5,"rope_theta":500.0}}"#,
        )
        .unwrap();
        assert_eq!(c.rotary_dims(), 40);
        assert_eq!(c.rope_theta, 500.0);
    }

    #[test]
    fn qformer_text_length_is_clamped_to_its_position_table() {
        let c = BunnyConfig::from_json(r#"{"model_type":"bunny-qformer-phi_v3_bib","qformer_config":{"max_position_embeddings":64,"max_text_length":256}}"#).unwrap();
        assert_eq!(c.qformer_config.unwrap().max_text_length, 64);
    }

    #[test]
    fn bad_json_and_unknown_model_type_are_errors() {
        assert!(BunnyConfig::from_json("{").is_err());
        let e = BunnyConfig::from_json(r#"{"model_type":"llava"}"#).unwrap_err().to_string();
        assert!(e.contains("llava"), "{e}");
    }
}
