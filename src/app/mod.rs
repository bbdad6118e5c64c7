//! The GUI: one window with a top bar, a navigation between workspaces, the workspace, and a status bar.
//! Panels only draw and record what the user asked; slow work runs on worker threads (see `jobs`).

mod dataset_jobs;
mod dataset_tools;
pub mod dataset_view;
pub mod demo;
pub mod kohya_import;
mod past_runs;
mod plan_view;
mod resume;
pub mod run_view;
pub mod samples_view;
mod textures;
mod training_form;
pub mod training_jobs;
pub mod training_view;
mod try_lora;
mod widgets;
mod workers;

use crate::dataset::BucketConfig;
use crate::train::data::bucket_config;
use dataset_view::{DatasetSettings, DatasetView};
pub use demo::demo_dir;
use samples_view::SamplesView;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use training_view::{OpenDataset, TrainingSettings, TrainingView};

pub const APP_NAME: &str = "lora-studio";

/// The workspaces of the left navigation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Workspace {
    #[default]
    Dataset,
    Training,
    Samples,
}

impl Workspace {
    const ALL: [Workspace; 3] = [Workspace::Dataset, Workspace::Training, Workspace::Samples];

    fn label(self) -> &'static str {
        match self {
            Workspace::Dataset => "Dataset",
            Workspace::Training => "Training",
            Workspace::Samples => "Samples",
        }
    }
}

/// What survives a restart (eframe persistence; the window size is eframe's own).
#[derive(Default, Serialize, Deserialize)]
#[serde(default)]
pub struct AppState {
    pub workspace: Workspace,
    pub dataset: DatasetSettings,
    pub training: TrainingSettings,
}

impl AppState {
    /// The state of a first start: the demo project when `assets/demo` is there, else the defaults.
    pub fn first_start() -> Self {
        let Some(demo) = demo_dir() else {
            return AppState::default();
        };
        let data_dir = demo::default_output_dir("");
        let Ok(training) = TrainingSettings::demo(&demo, &data_dir) else {
            return AppState::default();
        };
        let mut state = AppState {
            workspace: Workspace::Training,
            training,
            ..Default::default()
        };
        let dataset = state.training.config.dataset.folder.clone();
        if dataset.is_dir() {
            state.dataset.remember(&dataset);
        }
        state
    }
}

pub struct LoraStudioApp {
    state: AppState,
    dataset: DatasetView,
    training: TrainingView,
    samples: SamplesView,
    /// The window was asked to close during a run: ask whether to stop.
    confirm_close: bool,
    /// Stop was chosen on close: close once the run has saved and ended.
    close_after_run: bool,
    /// The training config's buckets and batch size last copied into the dataset workspace.
    followed_buckets: Option<(BucketConfig, u32)>,
}

impl LoraStudioApp {
    /// Builds the app from persisted state and reopens the last dataset.
    pub fn new(ctx: &egui::Context, state: AppState) -> Self {
        let mut dataset = DatasetView::new(ctx);
        if let Some(last) = state.dataset.recent.first().cloned() {
            dataset.open(ctx, &state.dataset, last.into());
        }
        LoraStudioApp {
            state,
            dataset,
            training: TrainingView::new(ctx),
            samples: SamplesView::new(ctx),
            confirm_close: false,
            close_after_run: false,
            followed_buckets: None,
        }
    }

    /// Draws one frame into `ui` (the whole window). Public so that tests drive the full app.
    pub fn show(&mut self, ui: &mut egui::Ui) {
        self.follow_training_buckets();
        self.dataset.poll(ui.ctx(), &mut self.state.dataset);
        let open = self.dataset.scan().map(|s| OpenDataset {
            root: s.root.clone(),
            caption_ext: s.project.caption_ext(),
            images: s.entries.len(),
        });
        self.training.poll(ui.ctx(), &mut self.state.training, open);
        if let Some(dir) = self.training.take_dataset_to_open() {
            self.dataset.open(ui.ctx(), &self.state.dataset, dir);
        }
        if let Some(run) = self.training.run() {
            self.state.training.remember_output_dir(&run.output_dir());
        }
        self.handle_close(ui.ctx());
        egui::Panel::top("top_bar").show(ui, |ui| {
            ui.horizontal(|ui| {
                ui.heading(APP_NAME);
                ui.separator();
                ui.label(self.state.workspace.label());
                if let Some(run) = self.training.run() {
                    ui.separator();
                    let step = run.last.as_ref().map_or(0, |s| s.step);
                    ui.label(format!(
                        "Run: {} · step {step}/{}",
                        if run.paused {
                            "Paused"
                        } else {
                            run.phase.label()
                        },
                        run.total_steps()
                    ));
                }
            });
            if self.state.training.demo {
                self.demo_banner(ui);
            }
        });
        egui::Panel::bottom("status_bar").show(ui, |ui| {
            ui.horizontal(|ui| ui.label(self.dataset.status_line()));
        });
        egui::Panel::left("navigation")
            .resizable(false)
            .exact_size(110.0)
            .show(ui, |ui| {
                ui.add_space(6.0);
                for w in Workspace::ALL {
                    ui.selectable_value(&mut self.state.workspace, w, w.label());
                }
            });
        egui::CentralPanel::default().show(ui, |ui| match self.state.workspace {
            Workspace::Dataset => self.dataset.ui(ui, &mut self.state.dataset),
            Workspace::Training => self.training.ui(ui, &mut self.state.training),
            Workspace::Samples => self
                .samples
                .ui(ui, self.training.run(), &self.state.training),
        });
        self.close_dialog(ui.ctx());
    }

    /// The dataset workspace and the training plan use one bucket setting: the training config's. Changes in
    /// the training form are copied to the dataset workspace, and changes in its Buckets tab are copied back.
    fn follow_training_buckets(&mut self) {
        let dataset_side = (self.state.dataset.buckets, self.state.dataset.batch_size);
        if let Some(followed) = self.followed_buckets
            && dataset_side != followed
        {
            let c = &mut self.state.training.config;
            let (b, batch) = dataset_side;
            (c.dataset.resolution, c.dataset.min_bucket_side) = (b.resolution, b.min_side);
            (c.dataset.max_bucket_side, c.dataset.bucket_step) = (b.max_side, b.step);
            c.training.batch_size = batch;
            self.training.settings_replaced();
        }
        let c = &self.state.training.config;
        let wanted = (bucket_config(&c.dataset), c.training.batch_size);
        if self.followed_buckets != Some(wanted) {
            self.followed_buckets = Some(wanted);
            (self.state.dataset.buckets, self.state.dataset.batch_size) = wanted;
            self.dataset.settings_changed();
        }
    }

    fn demo_banner(&mut self, ui: &mut egui::Ui) {
        egui::Frame::new()
            .fill(ui.visuals().selection.bg_fill.gamma_multiply(0.35))
            .inner_margin(6.0)
            .show(ui, |ui| {
                ui.horizontal(|ui| {
                    ui.label(egui::RichText::new("Demo project").strong());
                    ui.label(
                        "A tiny model and dataset that train on any CPU in under a minute. Press Start training \
                         to see the whole workflow.",
                    );
                    if ui
                        .button("Use my own dataset and model")
                        .on_hover_text("Leave the demo: open your dataset, then choose your checkpoint.")
                        .clicked()
                    {
                        self.state.training.demo = false;
                        self.state.training.config.model.checkpoint = PathBuf::new();
                        self.state.training.config.saving.output_dir =
                            demo::default_output_dir("output");
                        self.state.workspace = Workspace::Dataset;
                    }
                });
            });
    }

    /// A close request during a run is held back until the user says whether to stop (saving) or go on.
    fn handle_close(&mut self, ctx: &egui::Context) {
        if self.close_after_run && !self.training.is_running() {
            self.close_after_run = false;
            ctx.send_viewport_cmd(egui::ViewportCommand::Close);
            return;
        }
        if ctx.input(|i| i.viewport().close_requested()) && self.training.is_running() {
            ctx.send_viewport_cmd(egui::ViewportCommand::CancelClose);
            if !self.close_after_run {
                self.confirm_close = true;
            }
        }
    }

    fn close_dialog(&mut self, ctx: &egui::Context) {
        if !self.confirm_close {
            return;
        }
        if !self.training.is_running() {
            self.confirm_close = false;
            return;
        }
        egui::Modal::new(egui::Id::unique("confirm-close")).show(ctx, |ui| {
            ui.heading("A training run is in progress");
            ui.label(
                "Stop it (the LoRA and the training state are saved first, then the window closes) or keep \
                 training?",
            );
            ui.horizontal(|ui| {
                if ui.button("Stop, save and quit").clicked() {
                    self.training.send(crate::train::Command::Stop);
                    self.close_after_run = true;
                    self.confirm_close = false;
                }
                if ui.button("Keep training").clicked() {
                    self.confirm_close = false;
                }
            });
        });
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    pub fn state_mut(&mut self) -> &mut AppState {
        &mut self.state
    }

    pub fn dataset(&mut self) -> &mut DatasetView {
        &mut self.dataset
    }

    pub fn training(&mut self) -> &mut TrainingView {
        &mut self.training
    }
}

impl eframe::App for LoraStudioApp {
    fn ui(&mut self, ui: &mut egui::Ui, _frame: &mut eframe::Frame) {
        self.show(ui);
    }

    fn save(&mut self, storage: &mut dyn eframe::Storage) {
        self.dataset.flush_caption(&mut self.state.dataset);
        eframe::set_value(storage, eframe::APP_KEY, &self.state);
    }
}

/// Opens the main window. Fails with a message for people when there is no display to open it on.
/// `dataset` opens that folder instead of the last one.
pub fn run_gui(dataset: Option<std::path::PathBuf>) -> Result<(), String> {
    if cfg!(target_os = "linux")
        && std::env::var_os("DISPLAY").is_none()
        && std::env::var_os("WAYLAND_DISPLAY").is_none()
    {
        return Err(no_display_message("no DISPLAY or WAYLAND_DISPLAY is set"));
    }
    let options = eframe::NativeOptions {
        viewport: egui::ViewportBuilder::default()
            .with_title("lora-studio")
            .with_inner_size([1280.0, 820.0])
            .with_min_inner_size([800.0, 500.0]),
        ..Default::default()
    };
    eframe::run_native(
        APP_NAME,
        options,
        Box::new(move |cc| {
            let mut state = persisted_state(cc.storage).unwrap_or_else(AppState::first_start);
            if let Some(dir) = &dataset {
                state.dataset.remember(dir);
            }
            Ok(Box::new(start_from(&cc.egui_ctx, state)))
        }),
    )
    .map_err(|e| no_display_message(&e.to_string()))
}

/// The state saved by the last session; one that cannot be read is dropped with a log line.
fn persisted_state(storage: Option<&dyn eframe::Storage>) -> Option<AppState> {
    let storage = storage?;
    storage.get_string(eframe::APP_KEY)?;
    let state = eframe::get_value(storage, eframe::APP_KEY);
    if state.is_none() {
        eprintln!(
            "lora-studio: the saved window state could not be read; starting as on a first start."
        );
    }
    state
}

/// The app built from `state`; a state that fails to apply never makes the app unstartable: it is dropped
/// with a log line and the app starts as on a first start.
pub fn start_from(ctx: &egui::Context, state: AppState) -> LoraStudioApp {
    let ctx2 = ctx.clone();
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| LoraStudioApp::new(&ctx2, state)))
        .unwrap_or_else(|_| {
            eprintln!("lora-studio: the saved window state could not be applied; starting as on a first start.");
            LoraStudioApp::new(ctx, AppState::first_start())
        })
}

fn no_display_message(why: &str) -> String {
    format!(
        "lora-studio could not open its window ({why}).\n\
         On a machine without a desktop, use the headless commands instead:\n  \
         lora-studio dataset check DIR     validate a dataset and show its buckets\n  \
         lora-studio --help                all commands"
    )
}
