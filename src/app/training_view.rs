//! The Training workspace: configure a run (model, device, preset, settings, sample prompts, output) beside its
//! plan, then start, pause, stop and watch it (phase, progress, loss and learning-rate curves, memory, log).

use super::kohya_import::{Applied, KohyaImport};
use super::plan_view;
use super::resume::{self, ReplaceAnswer, Resumable};
use super::run_view::{self, CurveOptions, Run};
use super::training_form;
use super::training_jobs::{DeviceInfo, JobEvent, Jobs, ModelInfo, Pick};
use super::widgets::{FormErrors, bytes, duration, labeled_text, path_field, recent_menu, si};
use crate::train::Command;
use crate::train::config::TrainConfig;
use crate::train::plan::Preview;
use crate::train::presets::{self, Preset, PresetInfo};
use egui::{RichText, Ui};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const RECENT_MAX: usize = 10;
/// The plan and the model check run once typing pauses this long.
const DEBOUNCE: Duration = Duration::from_millis(400);
pub const DEFAULT_PRESET: &str = "sd15-6gb";

/// Training settings that survive a restart.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainingSettings {
    /// The config being edited, stored as TOML text so that a config from another version falls back to the
    /// defaults instead of losing the whole app state.
    #[serde(with = "config_as_toml")]
    pub config: TrainConfig,
    /// The preset the config started from.
    pub preset: String,
    /// Recently used base checkpoints, most recent first.
    pub recent_models: Vec<String>,
    /// The demo project is open (shows the banner).
    pub demo: bool,
    /// Output folders runs were trained into, most recent first (the Samples workspace lists their runs).
    pub output_dirs: Vec<PathBuf>,
}

impl Default for TrainingSettings {
    fn default() -> Self {
        let mut config = presets::find(DEFAULT_PRESET)
            .and_then(|p| p.config())
            .unwrap_or_default();
        config.saving.output_dir = super::demo::default_output_dir("output");
        TrainingSettings {
            config,
            preset: DEFAULT_PRESET.into(),
            recent_models: Vec::new(),
            demo: false,
            output_dirs: Vec::new(),
        }
    }
}

impl TrainingSettings {
    pub fn remember_model(&mut self, path: &Path) {
        let p = path.to_string_lossy().into_owned();
        self.recent_models.retain(|r| *r != p);
        self.recent_models.insert(0, p);
        self.recent_models.truncate(RECENT_MAX);
    }

    /// Puts `dir` first among the output folders of past runs.
    pub fn remember_output_dir(&mut self, dir: &Path) {
        if self.output_dirs.first().is_some_and(|d| d == dir) {
            return;
        }
        self.output_dirs.retain(|d| d != dir);
        self.output_dirs.insert(0, dir.to_owned());
        self.output_dirs.truncate(RECENT_MAX);
    }
}

mod config_as_toml {
    use crate::train::config::TrainConfig;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(c: &TrainConfig, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&c.to_toml())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<TrainConfig, D::Error> {
        let text = String::deserialize(d)?;
        Ok(TrainConfig::build(&[("saved settings", &text)], &[])
            .unwrap_or_else(|_| super::TrainingSettings::default().config))
    }
}

/// The dataset open in the Dataset workspace, as the training config needs it.
pub struct OpenDataset {
    pub root: PathBuf,
    pub caption_ext: String,
    pub images: usize,
}

struct SavePresetForm {
    name: String,
    title: String,
    message: Option<Result<String, String>>,
}

pub struct TrainingView {
    jobs: Jobs,
    presets: Vec<Preset>,
    preset_problems: Vec<String>,
    device: Option<DeviceInfo>,
    model_generation: u64,
    /// The (checkpoint, vae) the model result is for, and the result.
    model_for: Option<(PathBuf, Option<PathBuf>)>,
    model: Option<Result<ModelInfo, String>>,
    model_checking: bool,
    model_changed_at: Option<Instant>,
    plan_generation: u64,
    plan: Option<Result<Box<Preview>, String>>,
    planning: bool,
    plan_changed_at: Option<Instant>,
    /// Why the config is not valid, in the form's words.
    validation: Option<String>,
    /// Values typed into the form that are not valid (the config keeps the last valid one).
    form_errors: FormErrors,
    save_preset: Option<SavePresetForm>,
    kohya: KohyaImport,
    /// A dataset folder an import named, for the Dataset workspace to open.
    dataset_to_open: Option<PathBuf>,
    pub(super) run: Option<Run>,
    /// A stopped run saved in the output folder, which Resume continues and a new run would replace.
    resumable: Option<Resumable>,
    resumable_generation: u64,
    /// Start was pressed while a saved run would be replaced: ask first.
    confirm_replace: bool,
    confirm_stop: bool,
    curves: CurveOptions,
    /// Steps per second of the last run, for the time estimate of the next plan.
    last_speed: Option<f64>,
    pub(super) status: String,
}

impl TrainingView {
    pub fn new(ctx: &egui::Context) -> Self {
        let jobs = Jobs::new(ctx);
        jobs.device();
        let (presets, preset_problems) = presets::all();
        // The first model check and plan start at once.
        let long_ago = Instant::now()
            .checked_sub(DEBOUNCE)
            .unwrap_or_else(Instant::now);
        TrainingView {
            jobs,
            presets,
            preset_problems,
            device: None,
            model_generation: 0,
            model_for: None,
            model: None,
            model_checking: false,
            model_changed_at: Some(long_ago),
            plan_generation: 0,
            plan: None,
            planning: false,
            plan_changed_at: Some(long_ago),
            validation: None,
            form_errors: FormErrors::default(),
            save_preset: None,
            kohya: KohyaImport::new(ctx),
            dataset_to_open: None,
            run: None,
            resumable: None,
            resumable_generation: 0,
            confirm_replace: false,
            confirm_stop: false,
            curves: CurveOptions::default(),
            last_speed: None,
            status: String::new(),
        }
    }

    pub fn run(&self) -> Option<&Run> {
        self.run.as_ref()
    }

    /// True while a run has not ended.
    pub fn is_running(&self) -> bool {
        self.run.as_ref().is_some_and(Run::is_active)
    }

    pub fn model(&self) -> Option<&Result<ModelInfo, String>> {
        self.model.as_ref()
    }

    pub fn plan(&self) -> Option<&Result<Box<Preview>, String>> {
        self.plan.as_ref()
    }

    pub fn kohya_import(&self) -> &KohyaImport {
        &self.kohya
    }

    /// The dataset folder an imported config names, once: the Dataset workspace opens it.
    pub fn take_dataset_to_open(&mut self) -> Option<PathBuf> {
        self.dataset_to_open.take()
    }

    /// True while the model check or the plan is being computed or waits for typing to pause.
    pub fn is_busy(&self) -> bool {
        self.model_checking
            || self.planning
            || self.model_changed_at.is_some()
            || self.plan_changed_at.is_some()
    }

    fn config_changed(&mut self) {
        self.plan_changed_at = Some(Instant::now());
        // A failure shown for the old settings would be read as one of the new ones.
        if self
            .run
            .as_ref()
            .is_some_and(|r| r.failed.is_some() && !r.is_active())
        {
            self.run = None;
        }
    }

    /// The config was changed outside the form (the dataset workspace's Buckets tab): check it again.
    pub fn settings_replaced(&mut self) {
        self.config_changed();
        self.validation = None;
    }

    /// The settings problem that blocks Start, if any, named by the labels on screen.
    pub fn form_problem(&self) -> Option<&str> {
        self.form_errors.first().or(self.validation.as_deref())
    }

    fn model_changed(&mut self) {
        self.model_changed_at = Some(Instant::now());
        self.config_changed();
    }

    /// Applies the workers' results and starts the debounced checks. Called at the start of every frame.
    pub fn poll(
        &mut self,
        ctx: &egui::Context,
        settings: &mut TrainingSettings,
        dataset: Option<OpenDataset>,
    ) {
        if let Some(d) = dataset
            && (d.root != settings.config.dataset.folder
                || d.caption_ext != settings.config.dataset.caption_extension)
        {
            settings.config.dataset.folder = d.root;
            settings.config.dataset.caption_extension = d.caption_ext;
            self.config_changed();
        }
        for event in self.jobs.events() {
            match event {
                JobEvent::Model { generation, result } if generation == self.model_generation => {
                    self.model_checking = false;
                    if result.is_ok() {
                        settings.remember_model(&settings.config.model.checkpoint.clone());
                    }
                    self.model = Some(result);
                }
                JobEvent::Plan { generation, result } if generation == self.plan_generation => {
                    self.planning = false;
                    self.plan = Some(result.map_err(|e| training_form::on_screen(&e)));
                }
                JobEvent::Resumable { generation, found }
                    if generation == self.resumable_generation =>
                {
                    self.resumable = found.map(|b| *b);
                }
                JobEvent::Model { .. } | JobEvent::Plan { .. } | JobEvent::Resumable { .. } => {}
                JobEvent::Device(d) => self.device = Some(d),
                JobEvent::Picked { purpose, path } => {
                    let Some(path) = path else {
                        self.status =
                            "No file dialog answered; type the path into the field instead.".into();
                        continue;
                    };
                    let c = &mut settings.config;
                    match purpose {
                        Pick::ModelFile | Pick::ModelFolder => {
                            c.model.checkpoint = path;
                            self.model_changed();
                        }
                        Pick::Vae => {
                            c.model.vae = Some(path);
                            self.model_changed();
                        }
                        Pick::OutputFolder => {
                            c.saving.output_dir = path;
                            self.config_changed();
                        }
                        Pick::RegularizationFolder => {
                            c.dataset.regularization_folder = Some(path);
                            self.config_changed();
                        }
                    }
                }
            }
        }
        let preset =
            (self.presets.iter().find(|p| p.name == settings.preset)).or(self.presets.first());
        if let Some(applied) = preset.and_then(|p| self.kohya.poll(p, &settings.config)) {
            self.imported(ctx, settings, applied);
        }
        let c = &settings.config;
        let key = (c.model.checkpoint.clone(), c.model.vae.clone());
        if let Some(t) = self.model_changed_at {
            if t.elapsed() >= DEBOUNCE {
                self.model_changed_at = None;
                if self.model_for.as_ref() != Some(&key) {
                    self.model_generation += 1;
                    self.model_checking = true;
                    self.model_for = Some(key.clone());
                    self.jobs
                        .detect_model(self.model_generation, key.0.clone(), key.1.clone());
                }
            } else {
                ctx.request_repaint_after(DEBOUNCE);
            }
        }
        if let Some(t) = self.plan_changed_at {
            self.validate(&settings.config);
            if t.elapsed() >= DEBOUNCE {
                self.plan_changed_at = None;
                self.start_plan(&settings.config);
            } else {
                ctx.request_repaint_after(DEBOUNCE);
            }
        }
        let mut ended = false;
        if let Some(run) = &mut self.run {
            let was_active = run.is_active();
            run.poll(ctx);
            ended = was_active && !run.is_active();
            if let Some(s) = run.last.as_ref().filter(|s| s.it_per_s > 0.0) {
                self.last_speed = Some(s.it_per_s);
            }
        }
        if ended {
            self.look_for_saved_run(&settings.config);
        }
    }

    fn validate(&mut self, config: &TrainConfig) {
        self.validation =
            (config.validate().err()).map(|e| training_form::on_screen(&e.to_string()));
    }

    /// Checks the output folder for a saved run (off the UI thread).
    fn look_for_saved_run(&mut self, config: &TrainConfig) {
        self.resumable_generation += 1;
        self.jobs
            .resumable(self.resumable_generation, config.clone());
    }

    pub fn resumable(&self) -> Option<&Resumable> {
        self.resumable.as_ref()
    }

    fn start_plan(&mut self, config: &TrainConfig) {
        self.look_for_saved_run(config);
        self.plan_generation += 1;
        if self.validation.is_some() {
            self.planning = false;
            self.plan = None;
            return;
        }
        if config.model.checkpoint.as_os_str().is_empty() {
            self.planning = false;
            self.plan = Some(Err("Choose the base checkpoint to see the plan.".into()));
            return;
        }
        if config.dataset.folder.as_os_str().is_empty() {
            self.planning = false;
            self.plan = Some(Err(
                "Open a dataset in the Dataset workspace to see the plan.".into(),
            ));
            return;
        }
        self.planning = true;
        self.jobs.plan(self.plan_generation, config.clone());
    }

    /// Why Start is not possible now, if it is not.
    fn start_blocker(&self, settings: &TrainingSettings) -> Option<String> {
        let c = &settings.config;
        if self.is_running() {
            return Some("A run is in progress.".into());
        }
        if let Some(v) = self.form_problem() {
            return Some(format!("Fix the settings: {v}"));
        }
        if c.model.checkpoint.as_os_str().is_empty() {
            return Some("Choose the base checkpoint.".into());
        }
        if let Some(Err(e)) = &self.model {
            return Some(format!("The model cannot be used: {e}"));
        }
        if c.dataset.folder.as_os_str().is_empty() {
            return Some("Open a dataset in the Dataset workspace.".into());
        }
        if c.saving.output_dir.as_os_str().is_empty() {
            return Some("Choose an output folder.".into());
        }
        if self.planning || self.plan_changed_at.is_some() {
            return Some("Working out the plan …".into());
        }
        if let Some(Err(e)) = &self.plan {
            return Some(e.clone());
        }
        None
    }

    /// Starts a run of the current settings; when that would replace a saved run, asks first.
    pub fn start(&mut self, ctx: &egui::Context, settings: &TrainingSettings) {
        if let Some(why) = self.start_blocker(settings) {
            self.status = why;
            return;
        }
        if self.resumable.is_some() {
            self.confirm_replace = true;
            return;
        }
        self.start_new(ctx, settings);
    }

    /// Starts a run of the current settings at step 0.
    pub fn start_new(&mut self, ctx: &egui::Context, settings: &TrainingSettings) {
        self.status = format!(
            "Training {} into {}.",
            settings.config.saving.output_name,
            settings.config.saving.output_dir.display()
        );
        self.resumable = None;
        self.run = Some(Run::start(ctx, settings.config.clone(), None));
    }

    /// Continues the saved run of the output folder with the settings it was started with.
    pub fn resume(&mut self, ctx: &egui::Context) {
        let Some(saved) = self.resumable.take() else {
            return;
        };
        self.status = format!(
            "Resuming the run saved in {} at {}.",
            saved.dir.display(),
            saved.progress()
        );
        self.run = Some(Run::start(ctx, saved.config, Some(saved.dir)));
    }

    fn replace_dialog(&mut self, ctx: &egui::Context, settings: &TrainingSettings) {
        let (true, Some(saved)) = (self.confirm_replace, &self.resumable) else {
            self.confirm_replace = false;
            return;
        };
        let Some(answer) = resume::replace_dialog(ctx, saved) else {
            return;
        };
        self.confirm_replace = false;
        match answer {
            ReplaceAnswer::Resume => self.resume(ctx),
            ReplaceAnswer::StartOver => self.start_new(ctx, settings),
            ReplaceAnswer::Cancel => {}
        }
    }

    /// Sends a command to the run (Stop asks first in the UI; this sends it as it is).
    pub fn send(&mut self, command: Command) {
        if let Some(run) = &mut self.run {
            run.send(command);
        }
    }

    fn apply_preset(&mut self, ctx: &egui::Context, settings: &mut TrainingSettings, index: usize) {
        let preset = &self.presets[index];
        match preset.apply_to(&settings.config) {
            Ok(new) => {
                settings.config = new;
                self.form_errors.reset(ctx);
                settings.preset = preset.name.clone();
                self.status = format!("Loaded the preset {}.", preset.info.title);
                self.config_changed();
            }
            Err(e) => self.status = format!("The preset {} is broken: {e}", preset.name),
        }
    }

    /// An imported kohya config replaces the settings, as a preset does.
    fn imported(&mut self, ctx: &egui::Context, settings: &mut TrainingSettings, applied: Applied) {
        settings.config = applied.config;
        self.form_errors.reset(ctx);
        self.validation = None;
        self.dataset_to_open = applied.dataset;
        self.status = "Imported the kohya config.".into();
        self.model_changed();
    }

    /// Draws the workspace.
    pub fn ui(&mut self, ui: &mut Ui, settings: &mut TrainingSettings) {
        egui::Panel::left("training-config")
            .resizable(true)
            .default_size(560.0)
            .min_size(420.0)
            .show(ui, |ui| {
                egui::ScrollArea::vertical()
                    .id_salt("training-config-scroll")
                    .auto_shrink(false)
                    .show(ui, |ui| {
                        let running = self.is_running();
                        ui.add_enabled_ui(!running, |ui| self.configure(ui, settings));
                    });
            });
        egui::CentralPanel::default().show(ui, |ui| {
            self.run_controls(ui, settings);
            ui.separator();
            let show_run = self.run.is_some();
            if show_run {
                self.run_panel(ui);
            } else {
                self.plan_panel(ui, settings);
            }
        });
        self.stop_dialog(ui.ctx());
        self.replace_dialog(ui.ctx(), settings);
    }

    fn configure(&mut self, ui: &mut Ui, settings: &mut TrainingSettings) {
        ui.heading("Configure");
        self.model_section(ui, settings);
        ui.separator();
        self.device_line(ui);
        ui.separator();
        self.preset_section(ui, settings);
        self.kohya
            .ui(ui, &settings.config.dataset.caption_extension);
        ui.separator();
        self.dataset_and_output(ui, settings);
        ui.separator();
        let errors = &mut self.form_errors;
        let mut changed = training_form::common(ui, &mut settings.config, errors);
        ui.add_space(4.0);
        egui::CollapsingHeader::new("Advanced")
            .id_salt("training-advanced")
            .show(ui, |ui| {
                changed |= training_form::advanced(ui, &mut settings.config, errors);
            });
        ui.separator();
        changed |= training_form::sampling(ui, &mut settings.config, errors);
        if changed {
            self.config_changed();
            self.validate(&settings.config);
        }
    }

    fn model_section(&mut self, ui: &mut Ui, settings: &mut TrainingSettings) {
        ui.strong("Base model");
        let mut changed = false;
        ui.horizontal(|ui| {
            changed |= path_field(ui, "Checkpoint", &mut settings.config.model.checkpoint, 300.0)
                .on_hover_text(
                    "A Stable Diffusion 1.x/2.x checkpoint: a single .safetensors file or a diffusers folder.",
                )
                .changed();
            let start = settings
                .config
                .model
                .checkpoint
                .parent()
                .map(Path::to_path_buf);
            if ui.button("Browse…").on_hover_text("Choose a .safetensors file").clicked() {
                self.jobs.pick(Pick::ModelFile, start.clone());
            }
            if ui.button("Folder…").on_hover_text("Choose a diffusers folder").clicked() {
                self.jobs.pick(Pick::ModelFolder, start);
            }
            if let Some(p) = recent_menu(ui, "Recent models", &settings.recent_models) {
                settings.config.model.checkpoint = p;
                changed = true;
            }
        });
        match (&self.model, self.model_checking) {
            (_, true) => {
                ui.horizontal(|ui| {
                    ui.spinner();
                    ui.label("Reading the checkpoint …");
                });
            }
            (Some(Ok(m)), _) => {
                ui.label(format!(
                    "{} · {} · {} · {} parameters · {}",
                    m.family,
                    m.prediction,
                    m.precision,
                    si(m.parameters),
                    bytes(m.bytes)
                ))
                .on_hover_text(&m.description);
            }
            (Some(Err(e)), _) => {
                ui.colored_label(ui.visuals().error_fg_color, e);
            }
            (None, _) => {}
        }
        ui.horizontal(|ui| {
            let mut vae = settings.config.model.vae.clone().unwrap_or_default();
            let r = path_field(ui, "VAE (optional)", &mut vae, 260.0).on_hover_text(
                "A VAE file that replaces the checkpoint's own (leave empty to use the checkpoint's).",
            );
            if r.changed() {
                settings.config.model.vae = (!vae.as_os_str().is_empty()).then_some(vae);
                changed = true;
            }
            if ui.button("Browse…").on_hover_text("Choose a VAE file").clicked() {
                self.jobs.pick(Pick::Vae, None);
            }
        });
        if changed {
            self.model_changed();
        }
    }

    fn device_line(&self, ui: &mut Ui) {
        match &self.device {
            None => {
                ui.horizontal(|ui| {
                    ui.spinner();
                    ui.label("Looking for a GPU …");
                });
            }
            Some(d) => {
                match d.memory {
                    Some((free, total)) => {
                        ui.label(format!(
                            "Device: {} · {} total, {} free",
                            d.name,
                            bytes(total),
                            bytes(free)
                        ));
                    }
                    None => {
                        ui.label(format!("Device: {}", d.name));
                        ui.colored_label(
                            ui.visuals().warn_fg_color,
                            "This build trains on the CPU only: training is slow. Use the cpu-demo preset with \
                             a small model, or build with --features cuda for an NVIDIA GPU.",
                        );
                    }
                }
                if let Some(w) = &d.warning {
                    ui.colored_label(ui.visuals().warn_fg_color, w);
                }
            }
        }
    }

    fn preset_section(&mut self, ui: &mut Ui, settings: &mut TrainingSettings) {
        let mut chosen = None;
        ui.horizontal(|ui| {
            let l = ui.label("Preset");
            let current = self
                .presets
                .iter()
                .find(|p| p.name == settings.preset)
                .map_or_else(|| settings.preset.clone(), |p| p.info.title.clone());
            egui::ComboBox::from_id_salt("preset-picker")
                .selected_text(current)
                .width(260.0)
                .show_ui(ui, |ui| {
                    for (i, p) in self.presets.iter().enumerate() {
                        let text = if p.path.is_some() {
                            format!("{} (yours)", p.info.title)
                        } else {
                            p.info.title.clone()
                        };
                        if ui
                            .selectable_label(p.name == settings.preset, text)
                            .on_hover_text(&p.info.description)
                            .clicked()
                        {
                            chosen = Some(i);
                        }
                    }
                })
                .response
                .labelled_by(l.id)
                .on_hover_text(
                    "Settings for a model family and card size. Choosing one replaces the training settings (the \
                     model, dataset, output and sample prompts stay).",
                );
            if ui
                .button("Save as preset…")
                .on_hover_text("Save the current settings as your own preset.")
                .clicked()
            {
                self.save_preset = Some(SavePresetForm {
                    name: String::new(),
                    title: String::new(),
                    message: None,
                });
            }
        });
        if let Some(p) = self.presets.iter().find(|p| p.name == settings.preset) {
            ui.weak(&p.info.description);
        }
        for problem in &self.preset_problems {
            ui.colored_label(
                ui.visuals().warn_fg_color,
                format!("Preset skipped: {problem}"),
            );
        }
        if let Some(i) = chosen {
            self.apply_preset(ui.ctx(), settings, i);
        }
        self.save_preset_form(ui, settings);
    }

    fn save_preset_form(&mut self, ui: &mut Ui, settings: &mut TrainingSettings) {
        let Some(form) = &mut self.save_preset else {
            return;
        };
        let mut close = false;
        let mut saved = None;
        egui::Frame::group(ui.style()).show(ui, |ui| {
            ui.horizontal(|ui| {
                labeled_text(ui, "Preset name", &mut form.name, 120.0)
                    .on_hover_text("A file name: letters, digits, dashes.");
                labeled_text(ui, "Title", &mut form.title, 160.0);
            });
            ui.horizontal(|ui| {
                if ui.button("Save preset").clicked() {
                    let card_gib = self
                        .device
                        .as_ref()
                        .and_then(|d| d.memory)
                        .map_or(0.0, |(_, t)| (t as f64 / (1u64 << 30) as f64).round());
                    let info = PresetInfo {
                        title: if form.title.trim().is_empty() {
                            form.name.trim().to_owned()
                        } else {
                            form.title.trim().to_owned()
                        },
                        card_gib,
                        description: format!(
                            "Saved from lora-studio (based on {}).",
                            settings.preset
                        ),
                    };
                    let result = match presets::user_dir() {
                        Some(dir) => {
                            presets::save_user(&dir, form.name.trim(), &info, &settings.config)
                                .map(|p| p.display().to_string())
                                .map_err(|e| e.0)
                        }
                        None => {
                            Err("There is no user configuration folder to save presets in.".into())
                        }
                    };
                    if result.is_ok() {
                        saved = Some(form.name.trim().to_owned());
                    }
                    form.message = Some(result);
                }
                if ui.button("Close").clicked() {
                    close = true;
                }
            });
            match &form.message {
                Some(Ok(path)) => {
                    ui.label(format!("Saved {path}"));
                }
                Some(Err(e)) => {
                    ui.colored_label(ui.visuals().error_fg_color, e);
                }
                None => {}
            }
        });
        if let Some(name) = saved {
            let (presets, problems) = presets::all();
            self.presets = presets;
            self.preset_problems = problems;
            settings.preset = name;
        }
        if close {
            self.save_preset = None;
        }
    }

    fn dataset_and_output(&mut self, ui: &mut Ui, settings: &mut TrainingSettings) {
        let c = &mut settings.config;
        ui.strong("Dataset and output");
        if c.dataset.folder.as_os_str().is_empty() {
            ui.colored_label(
                ui.visuals().warn_fg_color,
                "No dataset: open one in the Dataset workspace.",
            );
        } else {
            ui.label(format!("Dataset: {}", c.dataset.folder.display()))
                .on_hover_text(
                    "The dataset open in the Dataset workspace; open another there to change it.",
                );
        }
        let problem = match &self.plan {
            Some(Err(e)) if e.contains(crate::schema::REGULARIZATION_FOLDER.label) => {
                Some(e.as_str())
            }
            _ => None,
        };
        let (mut changed, browse) =
            training_form::regularization(ui, c, &mut self.form_errors, problem);
        if browse {
            let start = c.dataset.regularization_folder.clone();
            let start = start.or_else(|| c.dataset.folder.parent().map(Path::to_path_buf));
            self.jobs.pick(Pick::RegularizationFolder, start);
        }
        ui.horizontal(|ui| {
            changed |= path_field(ui, "Output folder", &mut c.saving.output_dir, 300.0)
                .on_hover_text("Where the LoRA files, samples and training state are written.")
                .changed();
            if ui
                .button("Browse…")
                .on_hover_text("Choose the output folder")
                .clicked()
            {
                self.jobs
                    .pick(Pick::OutputFolder, Some(c.saving.output_dir.clone()));
            }
        });
        ui.horizontal(|ui| {
            changed |= labeled_text(ui, "Output name", &mut c.saving.output_name, 200.0)
                .on_hover_text(
                    "The LoRA file name, without .safetensors (intermediate saves add the step).",
                )
                .changed();
        });
        if changed {
            self.config_changed();
        }
    }

    fn run_controls(&mut self, ui: &mut Ui, settings: &TrainingSettings) {
        let blocker = self.start_blocker(settings);
        ui.horizontal(|ui| {
            let start = ui
                .add_enabled(
                    blocker.is_none(),
                    egui::Button::new(RichText::new("Start training").strong()),
                )
                .on_hover_text("Start a run with these settings.");
            let start = match &blocker {
                Some(why) => start.on_disabled_hover_text(why),
                None => start,
            };
            if start.clicked() {
                self.start(ui.ctx(), settings);
            }
            let active = self.is_running();
            let (paused, stopping) = self
                .run
                .as_ref()
                .map_or((false, false), |r| (r.paused, r.stopping));
            if paused {
                if ui
                    .add_enabled(active, egui::Button::new("Resume"))
                    .clicked()
                {
                    self.send(Command::Resume);
                }
            } else if ui
                .add_enabled(active && !stopping, egui::Button::new("Pause"))
                .on_hover_text("Pause after the current step.")
                .clicked()
            {
                self.send(Command::Pause);
            }
            if ui
                .add_enabled(active && !stopping, egui::Button::new("Stop"))
                .on_hover_text("Save the LoRA and the training state, then end the run.")
                .clicked()
            {
                self.confirm_stop = true;
            }
            if ui
                .add_enabled(active && !stopping, egui::Button::new("Sample now"))
                .on_hover_text("Make the sample images at the next step.")
                .clicked()
            {
                self.send(Command::SampleNow);
            }
            if ui
                .add_enabled(active && !stopping, egui::Button::new("Save now"))
                .on_hover_text("Save the LoRA and the training state at the next step, then go on.")
                .clicked()
            {
                self.send(Command::SaveNow);
            }
            self.resume_button(ui);
            if self.run.is_some()
                && !active
                && ui
                    .button("Show the plan")
                    .on_hover_text("Back to the plan of the current settings.")
                    .clicked()
            {
                self.run = None;
            }
        });
        if let Some(why) = &blocker
            && !self.is_running()
        {
            let color = ui.visuals().warn_fg_color;
            ui.add(egui::Label::new(RichText::new(why).color(color)).wrap());
        }
        if !self.status.is_empty() {
            ui.weak(&self.status);
        }
    }

    fn plan_panel(&mut self, ui: &mut Ui, settings: &TrainingSettings) {
        ui.heading("Plan");
        if let Some(v) = self.form_problem() {
            ui.colored_label(ui.visuals().error_fg_color, format!("Invalid setting: {v}"));
            return;
        }
        if self.planning {
            ui.horizontal(|ui| {
                ui.spinner();
                ui.label("Working out the plan …");
            });
        }
        match &self.plan {
            None => {}
            Some(Err(e)) => {
                ui.colored_label(ui.visuals().warn_fg_color, e);
            }
            Some(Ok(p)) => {
                let card = self.device.as_ref().and_then(|d| d.memory).map(|(_, t)| t);
                plan_view::plan_details(ui, p, card, &settings.config, self.last_speed);
            }
        }
    }

    fn run_panel(&mut self, ui: &mut Ui) {
        let Some(run) = &self.run else { return };
        if let Some((message, hint)) = &run.failed {
            run_view::failure(ui, message, hint);
            ui.add_space(6.0);
        }
        if let Some(f) = &run.finished {
            let text = match (&f.lora, f.stopped) {
                (Some(l), true) => format!("Stopped at step {}. Saved {}", f.step, l.display()),
                (Some(l), false) => format!("Finished: {}", l.display()),
                (None, _) => format!("Ended at step {} without a LoRA file.", f.step),
            };
            ui.label(RichText::new(text).strong());
        }
        run_view::progress(ui, run);
        if let (Some(s), Some(plan)) = (&run.last, &run.plan)
            && s.it_per_s > 0.0
        {
            let remaining = plan.total_steps.saturating_sub(s.step) as f64 / s.it_per_s;
            ui.weak(format!(
                "Estimated time for the whole run: {} ({} left)",
                duration(plan.total_steps as f64 / s.it_per_s),
                duration(remaining)
            ));
        }
        ui.separator();
        egui::Panel::bottom("run-log-panel")
            .resizable(true)
            .default_size(140.0)
            .show(ui, |ui| {
                ui.strong("Log");
                run_view::log_panel(ui, run);
            });
        egui::CentralPanel::default().show(ui, |ui| run_view::curves(ui, run, &mut self.curves));
    }

    fn stop_dialog(&mut self, ctx: &egui::Context) {
        if !self.confirm_stop {
            return;
        }
        if !self.is_running() {
            self.confirm_stop = false;
            return;
        }
        let modal = egui::Modal::new(egui::Id::unique("confirm-stop")).show(ctx, |ui| {
            ui.heading("Stop training?");
            ui.label("The LoRA and the training state are saved first; you can resume from the state later.");
            ui.horizontal(|ui| {
                if ui.button("Stop and save").clicked() {
                    self.send(Command::Stop);
                    self.confirm_stop = false;
                }
                if ui.button("Keep training").clicked() {
                    self.confirm_stop = false;
                }
            });
        });
        if modal.should_close() {
            self.confirm_stop = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_survive_a_restart_and_a_bad_config_falls_back() {
        let mut s = TrainingSettings::default();
        s.config.network.rank = 12;
        s.config.sampling.prompts.push(Default::default());
        s.remember_model(Path::new("/models/a.safetensors"));
        let text = serde_json::to_string(&s).unwrap();
        let back: TrainingSettings = serde_json::from_str(&text).unwrap();
        assert_eq!(back.config, s.config);
        assert_eq!(back.recent_models, s.recent_models);
        assert_eq!(back.preset, DEFAULT_PRESET);

        let broken = text.replace("rank = 12", "rnak = 12");
        let back: TrainingSettings = serde_json::from_str(&broken).unwrap();
        assert_eq!(back.config, TrainingSettings::default().config);
        assert_eq!(back.recent_models, s.recent_models, "the rest survives");
    }
}
