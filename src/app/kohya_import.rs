//! The "Kohya config" row of the training form: a typed path with Browse… and Import. The file (and the prompt
//! file it names) is read and mapped on a worker; the result is laid over the chosen preset and the project's
//! settings, as choosing the preset would, and what was not applied is listed below the row.

use super::training_form::on_screen;
use super::widgets::path_field;
use super::workers::{Workers, file_dialog};
use crate::train::config::TrainConfig;
use crate::train::kohya::{self, Imported, Skipped};
use crate::train::presets::Preset;
use egui::Ui;
use std::path::PathBuf;

enum Done {
    Picked(Option<PathBuf>),
    Read {
        path: PathBuf,
        result: Result<Imported, String>,
    },
}

/// The config an import made, and the dataset folder it names when that is not the one open.
pub struct Applied {
    pub config: TrainConfig,
    pub dataset: Option<PathBuf>,
}

/// What the last import did.
pub struct Outcome {
    pub file: PathBuf,
    pub skipped: Vec<Skipped>,
    /// The caption extension the kohya config reads (the open dataset's own decides in the window).
    caption_extension: Option<String>,
}

pub struct KohyaImport {
    workers: Workers<Done>,
    path: PathBuf,
    reading: bool,
    last: Option<Result<Outcome, String>>,
}

impl KohyaImport {
    pub fn new(ctx: &egui::Context) -> Self {
        KohyaImport {
            workers: Workers::new(ctx),
            path: PathBuf::new(),
            reading: false,
            last: None,
        }
    }

    /// True while a file is read.
    pub fn is_busy(&self) -> bool {
        self.reading
    }

    /// The last import: what it did, or why it failed.
    pub fn last(&self) -> Option<&Result<Outcome, String>> {
        self.last.as_ref()
    }

    fn start(&mut self, path: PathBuf) {
        self.reading = true;
        self.workers.spawn("kohya-import", move |report| {
            let result = kohya::read(&path).map_err(|e| e.0);
            report.send(Done::Read { path, result });
        });
    }

    /// Takes the workers' results; an import that read well is laid over `preset` and `current`'s project
    /// settings and returned for the caller to use.
    pub fn poll(&mut self, preset: &Preset, current: &TrainConfig) -> Option<Applied> {
        let mut applied = None;
        let done: Vec<Done> = self.workers.events().collect();
        for d in done {
            match d {
                Done::Picked(Some(path)) => {
                    self.path = path.clone();
                    self.start(path);
                }
                Done::Picked(None) => {
                    self.last = Some(Err(
                        "No file dialog answered; type the path into the field instead.".into(),
                    ));
                }
                Done::Read { path, result } => {
                    self.reading = false;
                    let made = result.and_then(|imported| {
                        let config = preset
                            .apply_with(
                                current,
                                &[(&path.display().to_string(), &imported.layer_text())],
                            )
                            .map_err(|e| {
                                format!(
                                    "{}: the imported settings are not valid: {}",
                                    path.display(),
                                    on_screen(&e.0)
                                )
                            })?;
                        Ok((config, imported))
                    });
                    match made {
                        Ok((config, imported)) => {
                            let dataset = (config.dataset.folder != current.dataset.folder)
                                .then(|| config.dataset.folder.clone())
                                .filter(|f| !f.as_os_str().is_empty());
                            let caption_extension = (imported.layer.get("dataset"))
                                .and_then(|d| d.get("caption_extension"))
                                .and_then(toml::Value::as_str)
                                .map(str::to_owned);
                            self.last = Some(Ok(Outcome {
                                file: path,
                                skipped: imported.skipped,
                                caption_extension,
                            }));
                            applied = Some(Applied { config, dataset });
                        }
                        Err(e) => self.last = Some(Err(e)),
                    }
                }
            }
        }
        applied
    }

    /// The row and the outcome of the last import. `caption_extension` is the one the training uses now.
    pub fn ui(&mut self, ui: &mut Ui, caption_extension: &str) {
        ui.horizontal(|ui| {
            path_field(ui, "Kohya config", &mut self.path, 260.0).on_hover_text(
                "A kohya_ss GUI config (.json, what its Save writes) or an sd-scripts --config_file (.toml).",
            );
            if ui
                .button("Browse…")
                .on_hover_text("Choose a kohya_ss or sd-scripts config")
                .clicked()
            {
                let start = self.path.parent().map(PathBuf::from);
                self.workers.spawn("file-dialog", move |report| {
                    let path = file_dialog(start)
                        .add_filter("kohya config", &["json", "toml"])
                        .pick_file();
                    report.send(Done::Picked(path));
                });
            }
            let ready = !self.reading && !self.path.as_os_str().is_empty();
            if ui
                .add_enabled(ready, egui::Button::new("Import kohya config"))
                .on_hover_text(
                    "Apply the kohya settings over the preset, as choosing the preset would (the model, dataset \
                     and output too when the file has them); what cannot be applied is listed here.",
                )
                .clicked()
            {
                self.start(self.path.clone());
            }
            if self.reading {
                ui.spinner();
            }
        });
        match &self.last {
            None => {}
            Some(Err(e)) => {
                ui.colored_label(ui.visuals().error_fg_color, format!("Cannot import: {e}"));
            }
            Some(Ok(o)) => outcome(ui, o, caption_extension),
        }
    }
}

fn outcome(ui: &mut Ui, o: &Outcome, caption_extension: &str) {
    ui.label(format!("Imported {}.", o.file.display()));
    if let Some(ext) = o
        .caption_extension
        .as_deref()
        .filter(|e| *e != caption_extension)
    {
        ui.colored_label(
            ui.visuals().warn_fg_color,
            format!(
                "The kohya config reads {ext} captions; the dataset uses {caption_extension}: choose Captions \
                 {ext} in the Dataset workspace."
            ),
        );
    }
    if o.skipped.is_empty() {
        ui.weak("Every setting that changes a run was applied.");
        return;
    }
    egui::CollapsingHeader::new(format!("Not applied ({})", o.skipped.len()))
        .id_salt("kohya-not-applied")
        .default_open(true)
        .show(ui, |ui| {
            egui::ScrollArea::vertical()
                .id_salt("kohya-not-applied-scroll")
                .max_height(180.0)
                .show(ui, |ui| {
                    for s in &o.skipped {
                        ui.add(egui::Label::new(s.line()).wrap());
                    }
                });
        });
}
