//! Training: configuration, optimizers and learning-rate schedules (the engine builds on these).

pub mod config;
pub mod data;
pub mod lr;
pub mod optim;
pub mod step;
