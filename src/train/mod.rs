//! Training: configuration, data plan, latent cache, optimizers, learning-rate schedules, the loss and the
//! resumable state — the pieces the training engine is built from.

pub mod cache;
pub mod config;
pub mod data;
pub mod lr;
pub mod optim;
pub mod state;
pub mod step;
