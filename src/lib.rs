//! lora-studio: train LoRA adapters for image-generation models. The engine lives here; `main.rs` puts the GUI
//! (`app`) or the headless CLI (`cli`) in front of it.

pub mod app;
pub mod cli;
pub mod dataset;
pub mod device;
pub mod fsutil;
pub mod lora;
pub mod model;
pub mod sample;
pub mod schema;
pub mod train;
pub mod words;
