//! The messages between a front end (GUI or CLI) and the training engine's thread: `Command`s in, `Event`s out.
//! Both front ends consume the same events, so they cannot drift apart; `--json` prints them as they are.

use super::record::SampleInfo;
use serde::Serialize;
use std::path::PathBuf;
use std::sync::Arc;

/// What a front end asks of a running engine. Each is honoured within one training step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Pause,
    Resume,
    /// Save the LoRA and the training state, then end the run.
    Stop,
    /// Generate the sample prompts with the current adapter at the next step boundary.
    SampleNow,
    /// Save the LoRA and the training state at the next step boundary, then go on.
    SaveNow,
}

/// The stages of a run, in order; each is announced when it starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Loading,
    CachingLatents,
    CachingText,
    Training,
    Sampling,
    Saving,
    Finished,
    Failed,
}

impl Phase {
    pub fn label(self) -> &'static str {
        match self {
            Phase::Loading => "Loading the model",
            Phase::CachingLatents => "Caching latents",
            Phase::CachingText => "Caching text embeddings",
            Phase::Training => "Training",
            Phase::Sampling => "Making samples",
            Phase::Saving => "Saving",
            Phase::Finished => "Finished",
            Phase::Failed => "Failed",
        }
    }
}

/// What the run will do, sent once the dataset and model are known.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Plan {
    /// Images of the dataset (regularization images apart).
    pub images: usize,
    /// Regularization images an epoch uses (0 without a regularization folder).
    pub regularization_images: usize,
    /// Image uses per epoch (repeats and regularization images included).
    pub samples_per_epoch: usize,
    /// Of those, the regularization images' uses (as many as the dataset's, or a few more).
    pub regularization_samples_per_epoch: usize,
    /// Buckets as (width, height, image uses per epoch).
    pub buckets: Vec<(u32, u32, usize)>,
    pub steps_per_epoch: usize,
    pub total_steps: u64,
    /// Step the run starts at (above 0 when resuming).
    pub start_step: u64,
    pub output_dir: PathBuf,
    pub lora_file: PathBuf,
    pub device: String,
    /// Compute precision actually used ("bf16", "fp16", "fp32").
    pub precision: String,
}

/// One optimizer step's figures.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StepStats {
    /// Steps done (1-based after the first step).
    pub step: u64,
    pub total_steps: u64,
    pub epoch: u64,
    pub loss: f64,
    pub lr: f64,
    /// Steps per second over the recent steps.
    pub it_per_s: f64,
    pub eta_s: Option<f64>,
    /// Device memory in use now and the total, in bytes (GPU only).
    pub memory_used: Option<u64>,
    pub memory_total: Option<u64>,
    /// Memory-pool high-water mark since the run started, in bytes (GPU only).
    pub memory_peak: Option<u64>,
}

/// A message from the engine. Serialized with an `event` field naming the variant (the CLI's `--json` lines).
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// A phase started.
    Phase {
        phase: Phase,
    },
    /// Progress within a phase other than training (images encoded, prompts sampled …).
    PhaseProgress {
        phase: Phase,
        done: usize,
        total: usize,
    },
    Plan(Plan),
    Progress(StepStats),
    /// One sample image was written (`info.baseline`: drawn without the LoRA, at the start of the run).
    Sample {
        #[serde(flatten)]
        info: SampleInfo,
        path: PathBuf,
        #[serde(skip)]
        image: Arc<image::RgbImage>,
    },
    /// A LoRA file was written (`final_file`: the run's result rather than an intermediate save).
    Saved {
        step: u64,
        path: PathBuf,
        final_file: bool,
    },
    /// The resumable training state was written.
    StateSaved {
        step: u64,
        path: PathBuf,
    },
    Paused,
    Resumed,
    /// Something the user should know that does not stop the run.
    Warning {
        message: String,
    },
    Log {
        message: String,
    },
    /// The run ended: all steps done (`stopped` false) or stopped on request (`stopped` true).
    Finished {
        step: u64,
        stopped: bool,
        lora: Option<PathBuf>,
        state: Option<PathBuf>,
    },
    /// The run ended with an error: what happened and what to change.
    Failed {
        message: String,
        hint: String,
    },
}

impl Event {
    /// True for the last event of a run.
    pub fn is_terminal(&self) -> bool {
        matches!(self, Event::Finished { .. } | Event::Failed { .. })
    }
}
