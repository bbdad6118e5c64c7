//! Networks and their weights: checkpoint loading, the adapter-ready layers, the UNet, the text encoder and VAE.

pub mod weights;
pub mod adapters;
pub mod layers;
pub mod recompute;
pub mod unet;
