//! A training run as the GUI sees it: the engine handle, and everything its events told so far (phase,
//! progress, loss and learning-rate curves, samples as textures, saved files, the log). Drawn in the Training
//! workspace (progress, curves, log) and the Samples workspace (the image grid).

use super::widgets::{bytes, duration};
use crate::train::config::TrainConfig;
use crate::train::events::{Command, Event, Phase, Plan, StepStats};
use crate::train::record::SampleInfo;
use crate::train::{Engine, StartOptions};
use egui::{Color32, RichText, Ui};
use egui_plot::{Line, Plot, PlotPoints, Points};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Log lines kept (older ones are dropped).
const LOG_MAX: usize = 2000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogLevel {
    Info,
    Warning,
}

pub struct SampleImage {
    /// How it was made (a past run of an older version may not have saved it).
    pub info: Option<SampleInfo>,
    pub path: PathBuf,
    pub texture: egui::TextureHandle,
}

/// A texture of an image the engine made.
pub fn texture(ctx: &egui::Context, name: String, image: &image::RgbImage) -> egui::TextureHandle {
    let size = [image.width() as usize, image.height() as usize];
    let color = egui::ColorImage::from_rgb(size, image.as_raw());
    ctx.load_texture(name, color, egui::TextureOptions::LINEAR)
}

pub struct SavedFile {
    pub step: u64,
    pub path: PathBuf,
    pub final_file: bool,
}

pub struct Run {
    engine: Engine,
    pub config: TrainConfig,
    pub phase: Phase,
    /// (phase, done, total) of the phase under way, when it reports progress.
    pub phase_progress: Option<(Phase, usize, usize)>,
    pub plan: Option<Plan>,
    pub last: Option<StepStats>,
    /// (step, loss) and (step, lr) of every step.
    pub losses: Vec<[f64; 2]>,
    pub lrs: Vec<[f64; 2]>,
    pub peak_memory: Option<u64>,
    /// (step, prompt index) → image.
    pub samples: BTreeMap<(u64, usize), SampleImage>,
    /// Prompt index → the image drawn without the LoRA.
    pub baseline: BTreeMap<usize, SampleImage>,
    pub saved: Vec<SavedFile>,
    pub log: Vec<(LogLevel, String)>,
    pub paused: bool,
    /// Stop was sent; the engine is saving.
    pub stopping: bool,
    pub finished: Option<FinishedRun>,
    pub failed: Option<(String, String)>,
}

pub struct FinishedRun {
    pub step: u64,
    pub stopped: bool,
    pub lora: Option<PathBuf>,
}

impl Run {
    /// A new run of `config`, or (with `resume`, a state folder) the continuation of a saved one.
    pub fn start(ctx: &egui::Context, config: TrainConfig, resume: Option<PathBuf>) -> Run {
        let repaint = ctx.clone();
        let engine = Engine::start(
            config.clone(),
            StartOptions {
                resume,
                ..Default::default()
            },
            std::sync::Arc::new(move || repaint.request_repaint()),
        );
        Run {
            engine,
            config,
            phase: Phase::Loading,
            phase_progress: None,
            plan: None,
            last: None,
            losses: Vec::new(),
            lrs: Vec::new(),
            peak_memory: None,
            samples: BTreeMap::new(),
            baseline: BTreeMap::new(),
            saved: Vec::new(),
            log: Vec::new(),
            paused: false,
            stopping: false,
            finished: None,
            failed: None,
        }
    }

    /// True until the run's terminal event arrived.
    pub fn is_active(&self) -> bool {
        self.finished.is_none() && self.failed.is_none()
    }

    pub fn send(&mut self, command: Command) {
        if command == Command::Stop {
            self.stopping = true;
            self.paused = false;
        }
        self.engine.send(command);
    }

    /// Applies the events that arrived since the last frame; returns how many there were.
    pub fn poll(&mut self, ctx: &egui::Context) -> usize {
        let events: Vec<Event> = self.engine.events().try_iter().collect();
        let n = events.len();
        for e in events {
            self.apply(ctx, e);
        }
        if self.is_active() && self.engine.is_done() && self.engine.events().is_empty() {
            // The thread ended without a terminal event (it panicked).
            self.failed = Some((
                "The training thread ended unexpectedly.".into(),
                "This is a bug in lora-studio; the log above shows how far it got.".into(),
            ));
        }
        n
    }

    fn apply(&mut self, ctx: &egui::Context, event: Event) {
        match event {
            Event::Phase { phase } => {
                self.phase = phase;
                self.phase_progress = None;
            }
            Event::PhaseProgress { phase, done, total } => {
                self.phase_progress = Some((phase, done, total));
            }
            Event::Plan(plan) => self.plan = Some(plan),
            Event::Progress(stats) => {
                self.losses.push([stats.step as f64, stats.loss]);
                self.lrs.push([stats.step as f64, stats.lr]);
                if let Some(p) = stats.memory_peak.or(stats.memory_used) {
                    self.peak_memory = Some(self.peak_memory.unwrap_or(0).max(p));
                }
                self.last = Some(stats);
            }
            Event::Sample { info, path, image } => {
                let texture = texture(ctx, format!("sample-{}", path.display()), &image);
                let (step, index, baseline) = (info.step, info.prompt_index, info.baseline);
                let sample = SampleImage {
                    info: Some(info),
                    path,
                    texture,
                };
                if baseline {
                    self.baseline.insert(index, sample);
                } else {
                    self.samples.insert((step, index), sample);
                }
            }
            Event::Saved {
                step,
                path,
                final_file,
            } => {
                self.log(
                    LogLevel::Info,
                    format!("Saved {} (step {step})", path.display()),
                );
                self.saved.push(SavedFile {
                    step,
                    path,
                    final_file,
                });
            }
            Event::StateSaved { step, path } => self.log(
                LogLevel::Info,
                format!(
                    "Saved the training state at step {step} to {}",
                    path.display()
                ),
            ),
            Event::Paused => {
                self.paused = true;
                self.log(LogLevel::Info, "Paused.".into());
            }
            Event::Resumed => {
                self.paused = false;
                self.log(LogLevel::Info, "Resumed.".into());
            }
            Event::Warning { message } => self.log(LogLevel::Warning, message),
            Event::Log { message } => self.log(LogLevel::Info, message),
            Event::Finished {
                step,
                stopped,
                lora,
                ..
            } => {
                self.phase = Phase::Finished;
                self.paused = false;
                self.log(
                    LogLevel::Info,
                    if stopped {
                        format!("Stopped at step {step}.")
                    } else {
                        format!("Finished after {step} steps.")
                    },
                );
                self.finished = Some(FinishedRun {
                    step,
                    stopped,
                    lora,
                });
            }
            Event::Failed { message, hint } => {
                self.phase = Phase::Failed;
                self.paused = false;
                self.log(LogLevel::Warning, format!("Failed: {message}"));
                self.failed = Some((message, hint));
            }
        }
    }

    fn log(&mut self, level: LogLevel, text: String) {
        self.log.push((level, text));
        if self.log.len() > LOG_MAX {
            self.log.drain(..self.log.len() - LOG_MAX);
        }
    }

    /// Steps of the run (from the plan, else the last progress, else the config).
    pub fn total_steps(&self) -> u64 {
        self.last
            .as_ref()
            .map(|s| s.total_steps)
            .or(self.plan.as_ref().map(|p| p.total_steps))
            .unwrap_or(self.config.training.steps)
    }

    pub fn output_dir(&self) -> PathBuf {
        self.plan.as_ref().map_or_else(
            || self.config.saving.output_dir.clone(),
            |p| p.output_dir.clone(),
        )
    }

    /// Steps that have samples, in order.
    pub fn sample_steps(&self) -> Vec<u64> {
        let mut steps: Vec<u64> = self.samples.keys().map(|(s, _)| *s).collect();
        steps.dedup();
        steps
    }

    /// The number of prompt columns (the config's prompts, or more if the engine sent more).
    pub fn prompt_count(&self) -> usize {
        let seen = (self.samples.keys().map(|(_, i)| i + 1))
            .chain(self.baseline.keys().map(|i| i + 1))
            .max()
            .unwrap_or(0);
        seen.max(self.config.sampling.prompts.len())
    }

    /// The text of sample prompt `index` (empty when the config no longer has it).
    pub fn prompt_text(&self, index: usize) -> &str {
        self.config
            .sampling
            .prompts
            .get(index)
            .map_or("", |p| p.prompt.as_str())
    }
}

/// How the curves are drawn (kept between frames by the Training view).
pub struct CurveOptions {
    pub log_scale: bool,
    /// EMA smoothing factor of the smoothed loss line (0 = none, 0.99 = very smooth).
    pub smoothing: f64,
}

impl Default for CurveOptions {
    fn default() -> Self {
        CurveOptions {
            log_scale: false,
            smoothing: 0.9,
        }
    }
}

/// Exponential moving average with bias correction (as TensorBoard smooths).
pub fn ema(points: &[[f64; 2]], factor: f64) -> Vec<[f64; 2]> {
    let mut avg = 0.0;
    let mut weight = 0.0;
    points
        .iter()
        .map(|[x, y]| {
            avg = avg * factor + (1.0 - factor) * y;
            weight = weight * factor + (1.0 - factor);
            [*x, if weight > 0.0 { avg / weight } else { *y }]
        })
        .collect()
}

/// The phase line, the progress bar with step/total, epoch, it/s and ETA, and memory.
pub fn progress(ui: &mut Ui, run: &Run) {
    let phase = if run.paused {
        "Paused".to_owned()
    } else if run.stopping && run.is_active() {
        "Stopping (saving first)".to_owned()
    } else {
        run.phase.label().to_owned()
    };
    ui.horizontal(|ui| {
        ui.label(RichText::new(phase).strong());
        if let Some((p, done, total)) = run.phase_progress
            && p == run.phase
            && total > 0
        {
            ui.add(
                egui::ProgressBar::new(done as f32 / total as f32)
                    .desired_width(220.0)
                    .text(format!("{done}/{total}")),
            );
        }
    });
    let total = run.total_steps();
    let (step, epoch) = run.last.as_ref().map_or((0, 0), |s| (s.step, s.epoch));
    let fraction = if total > 0 {
        step as f32 / total as f32
    } else {
        0.0
    };
    ui.add(
        egui::ProgressBar::new(fraction)
            .desired_width(ui.available_width().min(560.0))
            .text(format!("Step {step} / {total}")),
    );
    if let Some(s) = &run.last {
        let eta = s.eta_s.map_or_else(|| "-".to_owned(), duration);
        ui.label(format!(
            "Epoch {epoch} · {:.2} it/s · ETA {eta} · loss {:.4} · LR {:.2e}",
            s.it_per_s, s.loss, s.lr
        ));
        match (s.memory_used, s.memory_total) {
            (Some(used), Some(total)) => {
                let peak = run.peak_memory.unwrap_or(used);
                ui.horizontal(|ui| {
                    ui.label("Device memory");
                    ui.add(
                        egui::ProgressBar::new(used as f32 / total.max(1) as f32)
                            .desired_width(220.0)
                            .text(format!(
                                "{} now · peak {} · of {}",
                                bytes(used),
                                bytes(peak),
                                bytes(total)
                            )),
                    );
                });
            }
            _ => {
                ui.weak("Device memory: not measured (CPU run)");
            }
        }
    }
}

/// The loss curve (raw points and the smoothed line) and the learning-rate curve of a run.
pub fn curves(ui: &mut Ui, run: &Run, options: &mut CurveOptions) {
    let total = run.total_steps();
    loss_curves(ui, "run", &run.losses, &run.lrs, total, options);
}

/// Loss and learning-rate curves of (step, value) points over `total` steps; `id` tells the plots of several
/// workspaces apart.
pub fn loss_curves(
    ui: &mut Ui,
    id: &str,
    losses: &[[f64; 2]],
    lrs: &[[f64; 2]],
    total: u64,
    options: &mut CurveOptions,
) {
    ui.horizontal(|ui| {
        ui.strong("Loss");
        ui.checkbox(&mut options.log_scale, "Log scale")
            .on_hover_text("Show the loss on a logarithmic axis.");
        let l = ui.label("Smoothing");
        ui.add(
            egui::Slider::new(&mut options.smoothing, 0.0..=0.99)
                .fixed_decimals(2)
                .show_value(true),
        )
        .labelled_by(l.id)
        .on_hover_text("How much the smoothed line averages (exponential moving average).");
    });
    let log = options.log_scale;
    let tf = move |p: &[f64; 2]| -> [f64; 2] {
        if log {
            [p[0], p[1].max(1e-12).log10()]
        } else {
            *p
        }
    };
    let raw: Vec<[f64; 2]> = losses.iter().map(tf).collect();
    let smooth: Vec<[f64; 2]> = ema(losses, options.smoothing).iter().map(tf).collect();
    let height = (ui.available_height() - 150.0).clamp(120.0, 520.0);
    Plot::new(format!("{id}-loss-plot"))
        .height(height)
        .x_axis_label("step")
        .include_x(0.0)
        .include_x(total as f64)
        .allow_scroll(false)
        .y_axis_formatter(move |mark, _| {
            if log {
                format!("{:.3}", 10f64.powf(mark.value))
            } else {
                format!("{:.3}", mark.value)
            }
        })
        .label_formatter(move |hover| {
            let p = hover_point(hover);
            let y = if log { 10f64.powf(p.y) } else { p.y };
            Some(format!("step {:.0}\nloss {y:.4}", p.x))
        })
        .show(ui, |plot| {
            plot.points(
                Points::new("loss", PlotPoints::from(raw))
                    .radius(2.5)
                    .color(Color32::from_rgb(120, 150, 200)),
            );
            plot.line(
                Line::new("smoothed", PlotPoints::from(smooth))
                    .width(2.0)
                    .color(Color32::from_rgb(230, 140, 40)),
            );
        });
    ui.strong("Learning rate");
    Plot::new(format!("{id}-lr-plot"))
        .height(90.0)
        .include_x(0.0)
        .include_x(total as f64)
        .include_y(0.0)
        .allow_scroll(false)
        .y_axis_formatter(|mark, _| format!("{:.1e}", mark.value))
        .label_formatter(|hover| {
            let p = hover_point(hover);
            Some(format!("step {:.0}\nLR {:.2e}", p.x, p.y))
        })
        .show(ui, |plot| {
            plot.line(Line::new("lr", PlotPoints::from(lrs.to_vec())).width(1.5));
        });
}

fn hover_point(hover: &egui_plot::HoverPosition<'_>) -> egui_plot::PlotPoint {
    match hover {
        egui_plot::HoverPosition::NearDataPoint { position, .. }
        | egui_plot::HoverPosition::Elsewhere { position } => *position,
    }
}

/// The log lines, newest at the bottom.
pub fn log_panel(ui: &mut Ui, run: &Run) {
    egui::ScrollArea::vertical()
        .id_salt("run-log")
        .auto_shrink([false, true])
        .max_height(ui.available_height())
        .stick_to_bottom(true)
        .show(ui, |ui| {
            for (level, line) in &run.log {
                match level {
                    LogLevel::Info => ui.monospace(line),
                    LogLevel::Warning => ui.colored_label(ui.visuals().warn_fg_color, line),
                };
            }
        });
}

/// A failed run: the message and what to change, in a frame that stands out.
pub fn failure(ui: &mut Ui, message: &str, hint: &str) {
    egui::Frame::new()
        .fill(ui.visuals().error_fg_color.gamma_multiply(0.15))
        .stroke(egui::Stroke::new(1.5, ui.visuals().error_fg_color))
        .inner_margin(10.0)
        .corner_radius(4.0)
        .show(ui, |ui| {
            ui.set_width(ui.available_width());
            ui.label(
                RichText::new("Training failed")
                    .strong()
                    .size(16.0)
                    .color(ui.visuals().error_fg_color),
            );
            ui.label(RichText::new(message).strong());
            if !hint.is_empty() {
                ui.label(hint);
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ema_is_bias_corrected() {
        let pts = [[1.0, 2.0], [2.0, 2.0], [3.0, 2.0]];
        for [_, y] in ema(&pts, 0.9) {
            assert!((y - 2.0).abs() < 1e-12);
        }
        let s = ema(&[[1.0, 0.0], [2.0, 1.0]], 0.5);
        assert!((s[1][1] - 2.0 / 3.0).abs() < 1e-12);
    }
}
