//! Sampling: the noise schedule, reproducible noise and the samplers (DDIM, Euler, Euler ancestral) that step a
//! model function from noise to latents. Independent of the networks: the model is a closure.

pub mod noise;
pub mod pipeline;
pub mod samplers;
pub mod schedule;

pub use noise::{NoiseRng, initial_noise};
pub use samplers::{SampleConfig, Sampler, sample};
pub use schedule::{NoiseSchedule, Prediction};
