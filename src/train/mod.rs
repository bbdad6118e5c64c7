//! Training: configuration, data plan, latent cache, optimizers, learning-rate schedules and the loss (the
//! engine builds on these).

pub mod cache;
pub mod config;
pub mod data;
pub mod lr;
pub mod optim;
pub mod step;
