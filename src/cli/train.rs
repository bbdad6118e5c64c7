//! `lora-studio train`: a training run from a config file, a preset, flags and `--set key=value`, shown as a
//! progress bar or, with `--json`, as one JSON event per line. Ctrl-C stops as the GUI's Stop does: it saves.

use crate::schema;
use crate::train::config::TrainConfig;
use crate::train::engine::{Engine, StartOptions};
use crate::train::events::{Command, Event, Phase};
use crate::train::kohya::{self, Skipped};
use crate::train::presets;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// A training config (TOML); see `docs/` or a preset for the keys.
    #[arg(long)]
    config: Option<PathBuf>,
    /// A kohya_ss GUI config (.json) or an sd-scripts config (.toml), imported over the preset and under
    /// --config; what it sets that lora-studio cannot do is listed before the run.
    #[arg(long, value_name = "FILE")]
    kohya_config: Option<PathBuf>,
    /// A preset by name (sd15-6gb, sd15-8gb, sd15-12gb, cpu-demo, or one of yours) or a preset file.
    #[arg(long)]
    preset: Option<String>,
    /// Set one key, e.g. `--set training.steps=200 --set optimizer.schedule=cosine`. Applied last.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Continue the run saved in this state folder (OUTPUT/state); its config is the base, flags change it.
    #[arg(long)]
    resume: Option<PathBuf>,
    /// One JSON object per event per line on stdout instead of the progress bar.
    #[arg(long)]
    json: bool,
    /// The base checkpoint (.safetensors file or diffusers folder).
    #[arg(long)]
    model: Option<PathBuf>,
    /// The dataset folder.
    #[arg(long)]
    dataset: Option<PathBuf>,
    /// Regularization (prior-preservation) images: pictures of the class without your concept, with captions
    /// (`dataset.regularization_folder`). Each epoch uses as many of them as dataset images, as kohya does.
    #[arg(long, value_name = "PATH")]
    reg_folder: Option<PathBuf>,
    /// Repeats of each regularization image not in a kohya `N_name` folder (`dataset.regularization_repeats`).
    #[arg(long, value_name = "N", value_parser = schema::flag::<u32>(&schema::REGULARIZATION_REPEATS))]
    reg_repeats: Option<u32>,
    /// Weight of the regularization images' loss against the dataset's (`dataset.prior_loss_weight`; usually 1).
    #[arg(long, value_name = "W", value_parser = schema::flag::<f64>(&schema::PRIOR_LOSS_WEIGHT))]
    prior_loss_weight: Option<f64>,
    /// The output folder.
    #[arg(long)]
    output: Option<PathBuf>,
    /// The LoRA's name (the output file is NAME.safetensors).
    #[arg(long)]
    name: Option<String>,
    /// Total optimizer steps (`training.steps`; 0 lets the epochs decide).
    #[arg(long, value_parser = schema::flag::<u64>(&schema::STEPS))]
    steps: Option<u64>,
    /// Base training resolution in pixels, a multiple of 8 (`dataset.resolution`: 512 for SD 1.5).
    #[arg(long, value_parser = schema::flag::<u32>(&schema::RESOLUTION))]
    resolution: Option<u32>,
    /// Images per step (`training.batch_size`; usually 1-4).
    #[arg(long, value_parser = schema::flag::<u32>(&schema::BATCH_SIZE))]
    batch_size: Option<u32>,
    /// Adapter rank (`network.rank`; usually 4-64).
    #[arg(long, value_parser = schema::flag::<u32>(&schema::RANK))]
    rank: Option<u32>,
    /// Adapter alpha, scaling its effect by alpha / rank (`network.alpha`).
    #[arg(long, value_parser = schema::flag::<f64>(&schema::ALPHA))]
    alpha: Option<f64>,
    /// Learning rate (`optimizer.lr`; usually 1e-4).
    #[arg(long, value_parser = schema::flag::<f64>(&schema::LR))]
    lr: Option<f64>,
    /// The optimizer (`optimizer.kind`): adam_w, adamw_8bit (a quarter of the state memory), adafactor, prodigy
    /// (set --lr 1) or lion (a learning rate 3-10x below AdamW's).
    #[arg(long, value_name = "KIND")]
    optimizer: Option<String>,
    /// Seed of the noise, timesteps and data order (`training.seed`): the same seed repeats a run.
    #[arg(long, value_parser = schema::flag::<u64>(&schema::SEED))]
    seed: Option<u64>,
    /// Save the LoRA and the state every N steps.
    #[arg(long, value_parser = schema::flag::<u64>(&schema::SAVE_EVERY_N_STEPS))]
    save_every: Option<u64>,
    /// Make the sample prompts every N steps.
    #[arg(long, value_parser = schema::flag::<u64>(&schema::SAMPLE_EVERY_N_STEPS))]
    sample_every: Option<u64>,
    /// A sample prompt (repeatable); replaces the config's prompts.
    #[arg(long)]
    sample_prompt: Vec<String>,
    /// Stop after N steps of this run, exactly as Ctrl-C or the GUI's Stop would (save, leave state/).
    #[arg(long, value_parser = schema::flag::<u64>(&schema::STEPS))]
    stop_after: Option<u64>,
}

fn quoted(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

impl TrainArgs {
    /// The everyday flags as `--set` assignments (so they go through the same checks).
    fn flag_overrides(&self) -> Vec<String> {
        let path = |p: &PathBuf| quoted(&p.to_string_lossy());
        let mut o = Vec::new();
        let mut put = |key: &str, v: Option<String>| {
            if let Some(v) = v {
                o.push(format!("{key}={v}"));
            }
        };
        put("model.checkpoint", self.model.as_ref().map(path));
        put("dataset.folder", self.dataset.as_ref().map(path));
        put(
            "dataset.regularization_folder",
            self.reg_folder.as_ref().map(path),
        );
        put(
            "dataset.regularization_repeats",
            self.reg_repeats.map(|v| v.to_string()),
        );
        put(
            "dataset.prior_loss_weight",
            self.prior_loss_weight.map(|v| format!("{v:?}")),
        );
        put("saving.output_dir", self.output.as_ref().map(path));
        put("saving.output_name", self.name.as_deref().map(quoted));
        put("training.steps", self.steps.map(|v| v.to_string()));
        put("dataset.resolution", self.resolution.map(|v| v.to_string()));
        put(
            "training.batch_size",
            self.batch_size.map(|v| v.to_string()),
        );
        put("network.rank", self.rank.map(|v| v.to_string()));
        put("network.alpha", self.alpha.map(|v| format!("{v:?}")));
        put("optimizer.lr", self.lr.map(|v| format!("{v:?}")));
        put("optimizer.kind", self.optimizer.as_deref().map(quoted));
        put("training.seed", self.seed.map(|v| v.to_string()));
        put(
            "saving.every_n_steps",
            self.save_every.map(|v| v.to_string()),
        );
        put(
            "sampling.every_n_steps",
            self.sample_every.map(|v| v.to_string()),
        );
        o
    }

    /// Defaults, then the resumed run's config, the preset, the kohya config, the config file, the flags and
    /// `--set`; with the kohya settings that were not applied.
    fn build_config(&self) -> Result<(TrainConfig, Vec<Skipped>), String> {
        let mut layers: Vec<(String, String)> = Vec::new();
        if let Some(dir) = &self.resume {
            let (_, saved) = crate::train::state::saved(dir).map_err(|e| e.to_string())?;
            layers.push((format!("{}", dir.display()), saved.to_toml()));
        }
        if let Some(p) = &self.preset {
            let preset = presets::find(p).map_err(|e| e.0)?;
            layers.push((format!("preset {}", preset.name), preset.layer));
        }
        let mut skipped = Vec::new();
        if let Some(path) = &self.kohya_config {
            let imported = kohya::read(path).map_err(|e| e.0)?;
            layers.push((format!("{} (kohya)", path.display()), imported.layer_text()));
            skipped = imported.skipped;
        }
        if let Some(path) = &self.config {
            let text = crate::fsutil::admit::read_text(path, crate::fsutil::admit::TOML)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            layers.push((path.display().to_string(), text));
        }
        let mut overrides = self.flag_overrides();
        overrides.extend(self.set.iter().cloned());
        let refs: Vec<(&str, &str)> = layers
            .iter()
            .map(|(a, b)| (a.as_str(), b.as_str()))
            .collect();
        let mut config = TrainConfig::build(&refs, &overrides).map_err(|e| e.0)?;
        if !self.sample_prompt.is_empty() {
            let template = config.sampling.prompts.first().cloned().unwrap_or_else(|| {
                crate::train::config::SamplePrompt {
                    width: config.dataset.resolution,
                    height: config.dataset.resolution,
                    ..Default::default()
                }
            });
            config.sampling.prompts = self
                .sample_prompt
                .iter()
                .map(|p| crate::train::config::SamplePrompt {
                    prompt: p.clone(),
                    ..template.clone()
                })
                .collect();
            config.validate().map_err(|e| e.0)?;
        }
        Ok((config, skipped))
    }
}

pub fn run(args: &TrainArgs) -> Result<ExitCode, String> {
    let (config, skipped) = args.build_config()?;
    if args.kohya_config.is_some() {
        eprint!("{}", super::config::not_applied(&skipped));
    }
    let interrupted = Arc::new(AtomicBool::new(false));
    let engine = Engine::start(
        config,
        StartOptions {
            resume: args.resume.clone(),
            stop_after: args.stop_after,
        },
        Arc::new(|| {}),
    );
    {
        let flag = interrupted.clone();
        // A second handler cannot be installed (tests run several commands in one process): ignore that.
        let _ = ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst));
    }
    let mut view = if args.json { None } else { Some(Bar::new()) };
    let mut failed = false;
    let mut stop_sent = false;
    loop {
        if interrupted.load(Ordering::SeqCst) && !stop_sent {
            engine.send(Command::Stop);
            stop_sent = true;
            if let Some(v) = &view {
                v.line("stopping: saving the LoRA and the training state …");
            }
        }
        let event = match engine
            .events()
            .recv_timeout(std::time::Duration::from_millis(200))
        {
            Ok(e) => e,
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => continue,
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                // The engine always ends with a terminal event; a thread that ended without one failed.
                failed = true;
                break;
            }
        };
        failed |= matches!(event, Event::Failed { .. });
        let last = event.is_terminal();
        match &mut view {
            None => println!(
                "{}",
                serde_json::to_string(&event).map_err(|e| e.to_string())?
            ),
            Some(bar) => bar.show(&event),
        }
        if last {
            break;
        }
    }
    engine.join();
    Ok(if failed {
        ExitCode::FAILURE
    } else if stop_sent {
        ExitCode::from(130)
    } else {
        ExitCode::SUCCESS
    })
}

/// The terminal view: phase lines, a progress bar while caching and training, saves and warnings as lines.
struct Bar {
    bar: ProgressBar,
}

impl Bar {
    fn new() -> Self {
        let bar = ProgressBar::hidden();
        Bar { bar }
    }

    fn line(&self, text: &str) {
        if self.bar.is_hidden() {
            eprintln!("{text}");
        } else {
            self.bar.println(text);
        }
    }

    fn restart(&mut self, total: u64, template: &str) {
        self.bar.finish_and_clear();
        self.bar = ProgressBar::new(total);
        self.bar.set_style(
            ProgressStyle::with_template(template)
                .expect("a valid template")
                .progress_chars("=> "),
        );
    }

    fn show(&mut self, event: &Event) {
        match event {
            Event::Phase { phase } => {
                if *phase != Phase::Training {
                    self.bar.finish_and_clear();
                }
                self.line(&format!("== {}", phase.label()));
            }
            Event::PhaseProgress { done, total, .. } => {
                if self.bar.length() != Some(*total as u64) || self.bar.is_finished() {
                    self.restart(*total as u64, "  [{bar:30}] {pos}/{len}");
                }
                self.bar.set_position(*done as u64);
            }
            Event::Plan(p) => self.line(&format!(
                "{}{} ({} uses per epoch) in {}, {} steps per epoch, {} steps; device {} ({})\n\
                 output: {}",
                crate::words::count(p.images as u64, "image"),
                match p.regularization_images {
                    0 => String::new(),
                    n => format!(
                        " and {} ({} uses)",
                        crate::words::count(n as u64, "regularization image"),
                        p.regularization_samples_per_epoch
                    ),
                },
                p.samples_per_epoch,
                crate::words::count(p.buckets.len() as u64, "bucket"),
                p.steps_per_epoch,
                p.total_steps,
                p.device,
                p.precision,
                p.lora_file.display()
            )),
            Event::Progress(s) => {
                if self.bar.length() != Some(s.total_steps) || self.bar.is_finished() {
                    self.restart(s.total_steps, "[{bar:30}] {pos}/{len} {msg} eta {eta}");
                }
                let mem = match (s.memory_used, s.memory_total) {
                    (Some(u), Some(t)) => format!(
                        " mem {:.1}/{:.1} GiB",
                        u as f64 / (1u64 << 30) as f64,
                        t as f64 / (1u64 << 30) as f64
                    ),
                    _ => String::new(),
                };
                self.bar.set_message(format!(
                    "epoch {} loss {:.4} lr {:.2e} {:.2} it/s{mem}",
                    s.epoch, s.loss, s.lr, s.it_per_s
                ));
                self.bar.set_position(s.step);
            }
            Event::Sample { info, path, .. } if info.baseline => {
                self.line(&format!("sample without the LoRA: {}", path.display()))
            }
            Event::Sample { info, path, .. } => {
                self.line(&format!("sample at step {}: {}", info.step, path.display()))
            }
            Event::Saved { step, path, .. } => {
                self.line(&format!("saved at step {step}: {}", path.display()))
            }
            Event::StateSaved { .. } | Event::Paused | Event::Resumed => {}
            Event::Warning { message } => self.line(&format!("warning: {message}")),
            Event::Log { message } => self.line(message),
            Event::Finished {
                step,
                stopped,
                lora,
                state,
            } => {
                self.bar.finish_and_clear();
                let what = if *stopped { "stopped" } else { "finished" };
                self.line(&format!("{what} at step {step}"));
                if let Some(l) = lora {
                    self.line(&format!("LoRA: {}", l.display()));
                }
                if let Some(s) = state {
                    self.line(&format!(
                        "to continue: lora-studio train --resume {}",
                        s.display()
                    ));
                }
            }
            Event::Failed { message, hint } => {
                self.bar.finish_and_clear();
                self.line(&format!("error: {message}"));
                if !hint.is_empty() {
                    self.line(hint);
                }
            }
        }
    }
}
