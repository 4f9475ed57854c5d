//! Bunny / Q-Adapt written once over the [`ops::Ops`] trait, with a candle interpreter, the hub
//! checkpoint loader, and the candle inference engine (generation and Q-Align scoring).
//!
//! Module map (bottom-up): [`ops`] → [`nn`] → [`siglip`], [`projector`], [`phi`], [`qformer`],
//! [`prompter`] → [`bunny`] → [`engine`].

pub mod adapter;
pub mod bunny;
mod checkpoint;
pub mod engine;
pub mod error;
mod frozen;
pub mod loader;
mod lora;
pub mod meter;
pub mod nn;
pub mod ops;
pub mod phi;
mod pointwise;
pub mod projector;
pub mod prompter;
pub mod qformer;
mod rope;
pub mod siglip;
mod softmax;
pub mod train_source;

pub use bunny::{Bunny, ImageFeatures, QFormerText};
pub use engine::Engine;
pub use error::{Error, Result};
pub use ops::{Block, Candle, Ops, Param, SideGrads};
pub use qadapt_core::sampling::GenerateOptions;
