//! Networks and their weights: checkpoint loading, the adapter-ready layers, the UNet, the text encoder and VAE.

pub mod adapters;
pub mod attention;
pub mod checkpoint;
#[cfg(feature = "cuda")]
pub mod fused;
mod handoff;
pub mod layers;
pub mod recompute;
pub mod text_encoder;
pub mod tokenizer;
pub mod unet;
pub mod vae;
pub mod weights;
