//! The GUI: one window with a top bar, a navigation between workspaces, the workspace, and a status bar.
//! Panels only draw and record what the user asked; slow work runs on worker threads (see `jobs`).

mod dataset_jobs;
mod dataset_tools;
pub mod dataset_view;
mod textures;
mod widgets;

use dataset_view::{DatasetSettings, DatasetView};
use serde::{Deserialize, Serialize};

pub const APP_NAME: &str = "lora-studio";

/// The workspaces of the left navigation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Workspace {
    #[default]
    Dataset,
}

impl Workspace {
    const ALL: [Workspace; 1] = [Workspace::Dataset];

    fn label(self) -> &'static str {
        match self {
            Workspace::Dataset => "Dataset",
        }
    }
}

/// What survives a restart (eframe persistence; the window size is eframe's own).
#[derive(Default, Serialize, Deserialize)]
#[serde(default)]
pub struct AppState {
    pub workspace: Workspace,
    pub dataset: DatasetSettings,
}

pub struct LoraStudioApp {
    state: AppState,
    dataset: DatasetView,
}

impl LoraStudioApp {
    /// Builds the app from persisted state and reopens the last dataset.
    pub fn new(ctx: &egui::Context, state: AppState) -> Self {
        let mut dataset = DatasetView::new(ctx);
        if let Some(last) = state.dataset.recent.first().cloned() {
            dataset.open(ctx, &state.dataset, last.into());
        }
        LoraStudioApp { state, dataset }
    }

    /// Draws one frame into `ui` (the whole window). Public so that tests drive the full app.
    pub fn show(&mut self, ui: &mut egui::Ui) {
        self.dataset.poll(ui.ctx(), &mut self.state.dataset);
        egui::Panel::top("top_bar").show(ui, |ui| {
            ui.horizontal(|ui| {
                ui.heading(APP_NAME);
                ui.separator();
                ui.label(self.state.workspace.label());
            });
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
        });
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    pub fn dataset(&mut self) -> &mut DatasetView {
        &mut self.dataset
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
            let mut state: AppState = cc
                .storage
                .and_then(|s| eframe::get_value(s, eframe::APP_KEY))
                .unwrap_or_default();
            if let Some(dir) = &dataset {
                state.dataset.remember(dir);
            }
            Ok(Box::new(LoraStudioApp::new(&cc.egui_ctx, state)))
        }),
    )
    .map_err(|e| no_display_message(&e.to_string()))
}

fn no_display_message(why: &str) -> String {
    format!(
        "lora-studio could not open its window ({why}).\n\
         On a machine without a desktop, use the headless commands instead:\n  \
         lora-studio dataset check DIR     validate a dataset and show its buckets\n  \
         lora-studio --help                all commands"
    )
}
