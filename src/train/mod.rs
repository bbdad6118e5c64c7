//! Training: configuration and presets, the data plan, latent cache, optimizers, learning-rate schedules, the
//! loss, the resumable state, and the engine that runs them on its own thread.

pub mod cache;
pub mod config;
pub mod data;
pub mod engine;
pub mod events;
pub mod failure;
#[cfg(feature = "cuda")]
pub mod graph;
mod inputs;
pub mod kohya;
pub mod lr;
pub mod optim;
pub mod plan;
pub mod presets;
pub mod record;
mod run;
pub mod state;
pub mod step;

pub use engine::{Engine, StartOptions};
pub use events::{Command, Event, Phase};
pub use failure::Failure;
pub use run::compute_dtype;
