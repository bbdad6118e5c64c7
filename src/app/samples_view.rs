//! The Samples workspace: the preview images of the run (live) or of a past run read from its output folder, by
//! prompt (rows) and step (columns, after the "Without LoRA" baseline); click one to enlarge it with its
//! settings; compare two steps side by side; the saved LoRA files and the loss curve; Try the LoRA beside.

use super::past_runs::PastRuns;
use super::run_view::{CurveOptions, Run, SampleImage};
use super::training_jobs::open_folder;
use super::training_view::TrainingSettings;
use super::try_lora::{TryLora, model_choice};
use crate::sample::pipeline::ModelChoice;
use egui::{RichText, Ui, vec2};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// What the grid draws: the live run or a past one.
pub struct Shown<'a> {
    pub dir: PathBuf,
    pub samples: &'a BTreeMap<(u64, usize), SampleImage>,
    pub baseline: &'a BTreeMap<usize, SampleImage>,
    pub prompts: Vec<String>,
    /// (label, path) of the LoRA files, oldest first.
    pub loras: Vec<(String, PathBuf)>,
    pub losses: &'a [[f64; 2]],
    pub lrs: &'a [[f64; 2]],
    pub total_steps: u64,
    pub model: Option<ModelChoice>,
    pub no_prompts: bool,
}

impl Shown<'_> {
    fn sample_steps(&self) -> Vec<u64> {
        let mut steps: Vec<u64> = self.samples.keys().map(|(s, _)| *s).collect();
        steps.dedup();
        steps
    }

    fn prompt_text(&self, i: usize) -> &str {
        self.prompts.get(i).map_or("", String::as_str)
    }

    fn image(&self, step: Option<u64>, index: usize) -> Option<&SampleImage> {
        match step {
            None => self.baseline.get(&index),
            Some(s) => self.samples.get(&(s, index)),
        }
    }
}

fn live(run: &Run) -> Shown<'_> {
    Shown {
        dir: run.output_dir(),
        samples: &run.samples,
        baseline: &run.baseline,
        prompts: (0..run.prompt_count())
            .map(|i| run.prompt_text(i).to_owned())
            .collect(),
        loras: run
            .saved
            .iter()
            .map(|f| (lora_label(f.step, f.final_file), f.path.clone()))
            .collect(),
        losses: &run.losses,
        lrs: &run.lrs,
        total_steps: run.total_steps(),
        model: Some(model_choice(&run.config.model)),
        no_prompts: run.config.sampling.prompts.is_empty()
            || run.config.sampling.every_n_steps == 0,
    }
}

fn past<'a>(p: &'a super::past_runs::PastRun, settings: &TrainingSettings) -> Shown<'a> {
    let s = &p.summary;
    let count = (p.samples.keys().map(|(_, i)| i + 1))
        .chain(p.baseline.keys().map(|i| i + 1))
        .max()
        .unwrap_or(0);
    let config = s.config.as_ref().unwrap_or(&settings.config);
    Shown {
        dir: s.dir.clone(),
        samples: &p.samples,
        baseline: &p.baseline,
        prompts: (0..count)
            .map(|i| s.prompt_text(i).unwrap_or("").to_owned())
            .collect(),
        loras: s
            .loras
            .iter()
            .map(|l| {
                (
                    lora_label(l.step.unwrap_or(0), l.step.is_none()),
                    l.path.clone(),
                )
            })
            .collect(),
        losses: &p.losses,
        lrs: &p.lrs,
        total_steps: p.losses.last().map_or(0, |l| l[0] as u64),
        model: Some(model_choice(&config.model)),
        no_prompts: false,
    }
}

fn lora_label(step: u64, final_file: bool) -> String {
    if final_file {
        "final".to_owned()
    } else {
        format!("step {step}")
    }
}

const CELL: f32 = 160.0;

pub struct SamplesView {
    /// (step, prompt index) of the enlarged image; step `None` is the baseline.
    enlarged: Option<(Option<u64>, usize)>,
    compare: bool,
    left: Option<u64>,
    right: Option<u64>,
    past: PastRuns,
    /// The past run shown (by label); `None` shows the live run when there is one.
    chosen: Option<String>,
    try_lora: TryLora,
    curves: CurveOptions,
}

impl SamplesView {
    pub fn new(ctx: &egui::Context) -> Self {
        SamplesView {
            enlarged: None,
            compare: false,
            left: None,
            right: None,
            past: PastRuns::new(ctx),
            chosen: None,
            try_lora: TryLora::new(ctx),
            curves: CurveOptions::default(),
        }
    }

    pub fn ui(&mut self, ui: &mut Ui, run: Option<&Run>, settings: &TrainingSettings) {
        let mut dirs = settings.output_dirs.clone();
        if !dirs.contains(&settings.config.saving.output_dir) {
            dirs.push(settings.config.saving.output_dir.clone());
        }
        self.past.refresh(dirs.clone(), false);
        self.past.poll(ui.ctx());
        let live_key = run.map(|r| (r.output_dir(), r.config.saving.output_name.clone()));
        let past_labels: Vec<String> = self
            .past
            .runs
            .iter()
            .filter(|p| live_key.as_ref() != Some(&(p.summary.dir.clone(), p.summary.name.clone())))
            .map(|p| p.label())
            .collect();
        if self
            .chosen
            .as_ref()
            .is_some_and(|c| !past_labels.contains(c))
        {
            self.chosen = None;
        }
        if run.is_none() && self.chosen.is_none() {
            self.chosen = past_labels.first().cloned();
        }
        ui.horizontal(|ui| {
            ui.heading("Samples");
            let current = match (&self.chosen, run) {
                (Some(c), _) => c.clone(),
                (None, Some(_)) => "This run".to_owned(),
                (None, None) => "No run yet".to_owned(),
            };
            egui::ComboBox::from_label("Run")
                .selected_text(current)
                .show_ui(ui, |ui| {
                    if run.is_some() {
                        ui.selectable_value(&mut self.chosen, None, "This run");
                    }
                    for l in &past_labels {
                        ui.selectable_value(&mut self.chosen, Some(l.clone()), l);
                    }
                });
            if ui
                .button("Refresh")
                .on_hover_text("Read the output folders again for past runs.")
                .clicked()
            {
                self.past.refresh(dirs.clone(), true);
            }
            if self.past.loading {
                ui.spinner();
            }
        });
        let chosen = self.chosen.clone();
        // Taken out for the frame, so the panels can borrow the view mutably.
        let runs = std::mem::take(&mut self.past.runs);
        let past_run = chosen
            .as_ref()
            .and_then(|c| runs.iter().find(|p| p.label() == *c));
        let shown = match (past_run, run) {
            (Some(p), _) => past(p, settings),
            (None, Some(r)) => live(r),
            (None, None) => {
                ui.label(
                    "No run yet. Start training in the Training workspace: the sample prompts are drawn here every \
                     \"sample every N steps\", beside the same prompts without the LoRA, and the saved LoRA files \
                     are listed. Past runs in the output folders you used appear here too.",
                );
                for p in &self.past.problems {
                    ui.colored_label(ui.visuals().warn_fg_color, p);
                }
                self.past.runs = runs;
                return;
            }
        };
        let training = run.is_some_and(Run::is_active);
        egui::Panel::right("try-lora")
            .resizable(true)
            .default_size(330.0)
            .show(ui, |ui| {
                egui::ScrollArea::vertical()
                    .id_salt("try-scroll")
                    .show(ui, |ui| {
                        if self.try_lora.settings.prompt.is_empty()
                            && let Some(p) = shown.prompts.first()
                        {
                            self.try_lora.settings.prompt = p.clone();
                            // At the size the run's samples were drawn (the demo model draws 64 px only).
                            let first =
                                shown.baseline.values().chain(shown.samples.values()).next();
                            if let Some(image) = first {
                                let [w, h] = image.texture.size();
                                (self.try_lora.settings.width, self.try_lora.settings.height) =
                                    (w as u32, h as u32);
                            }
                        }
                        if self.try_lora.settings.lora.as_os_str().is_empty()
                            && let Some((_, l)) = shown.loras.last()
                        {
                            self.try_lora.settings.lora = l.clone();
                        }
                        self.try_lora
                            .ui(ui, &shown.loras, shown.model.clone(), training);
                    });
            });
        self.run_ui(ui, &shown);
        drop(shown);
        self.past.runs = runs;
    }

    fn run_ui(&mut self, ui: &mut Ui, run: &Shown<'_>) {
        let steps = run.sample_steps();
        ui.horizontal(|ui| {
            ui.label(format!(
                "{} images at {} steps, {} without LoRA",
                run.samples.len(),
                steps.len(),
                run.baseline.len()
            ));
            let dir = run.dir.clone();
            if ui
                .button("Open output folder")
                .on_hover_text(dir.display().to_string())
                .clicked()
            {
                open_folder(dir);
            }
            ui.add_enabled(
                steps.len() >= 2,
                egui::Checkbox::new(&mut self.compare, "Compare two steps"),
            );
        });
        egui::Panel::bottom("saved-files")
            .resizable(true)
            .default_size(150.0)
            .show(ui, |ui| {
                ui.columns(2, |c| {
                    saved_files(&mut c[0], run);
                    super::run_view::loss_curves(
                        &mut c[1],
                        "samples",
                        run.losses,
                        run.lrs,
                        run.total_steps,
                        &mut self.curves,
                    );
                });
            });
        if steps.is_empty() && run.baseline.is_empty() {
            ui.label("No samples yet: they appear here as the run makes them.");
            if run.no_prompts {
                ui.weak("This run has no sample prompts or \"sample every N steps\" is 0; use Sample now or add prompts for the next run.");
            }
        } else if self.compare && steps.len() >= 2 {
            self.compare_ui(ui, run, &steps);
        } else {
            self.grid(ui, run, &steps);
        }
        self.enlarged_window(ui, run);
    }

    /// Prompts as rows; the baseline ("Without LoRA") and then the steps as columns.
    fn grid(&mut self, ui: &mut Ui, run: &Shown<'_>, steps: &[u64]) {
        let columns: Vec<Option<u64>> = std::iter::once(None)
            .filter(|_| !run.baseline.is_empty())
            .chain(steps.iter().map(|s| Some(*s)))
            .collect();
        egui::ScrollArea::both().auto_shrink(false).show(ui, |ui| {
            egui::Grid::new("samples-grid")
                .spacing([6.0, 6.0])
                .show(ui, |ui| {
                    ui.label("");
                    for c in &columns {
                        let title = match c {
                            None => "Without LoRA".to_owned(),
                            Some(s) => format!("Step {s}"),
                        };
                        ui.add_sized(
                            [CELL, 20.0],
                            egui::Label::new(RichText::new(title).strong()),
                        );
                    }
                    ui.end_row();
                    for i in 0..run.prompts.len() {
                        let prompt = run.prompt_text(i);
                        ui.add_sized(
                            [120.0, 20.0],
                            egui::Label::new(
                                RichText::new(format!("{}. {prompt}", i + 1)).strong(),
                            )
                            .truncate(),
                        )
                        .on_hover_text(prompt);
                        for c in &columns {
                            self.cell(ui, run, *c, i, CELL);
                        }
                        ui.end_row();
                    }
                });
        });
    }

    fn cell(&mut self, ui: &mut Ui, run: &Shown<'_>, step: Option<u64>, index: usize, side: f32) {
        match run.image(step, index) {
            Some(s) => {
                let size = s.texture.size_vec2();
                let scale = (side / size.x).min(side / size.y);
                let settings = s.info.as_ref().map_or_else(String::new, |i| i.describe());
                let r = ui
                    .add(
                        egui::Image::new((s.texture.id(), size * scale))
                            .sense(egui::Sense::click()),
                    )
                    .on_hover_text(format!("{settings}\n{}", s.path.display()));
                let name = match step {
                    None => format!("Sample without LoRA prompt {}", index + 1),
                    Some(step) => format!("Sample step {step} prompt {}", index + 1),
                };
                super::widgets::name_widget(&r, egui::Role::Button, name);
                if r.clicked() {
                    self.enlarged = Some((step, index));
                }
            }
            None => {
                ui.allocate_exact_size(vec2(side, side), egui::Sense::hover());
            }
        }
    }

    fn compare_ui(&mut self, ui: &mut Ui, run: &Shown<'_>, steps: &[u64]) {
        let left = *self.left.get_or_insert(steps[0]);
        let right = *self.right.get_or_insert(*steps.last().unwrap());
        ui.horizontal(|ui| {
            for (label, value) in [
                ("Left step", &mut self.left),
                ("Right step", &mut self.right),
            ] {
                let current = value.unwrap_or(steps[0]);
                egui::ComboBox::from_label(label)
                    .selected_text(format!("Step {current}"))
                    .show_ui(ui, |ui| {
                        for &s in steps {
                            if ui
                                .selectable_label(current == s, format!("Step {s}"))
                                .clicked()
                            {
                                *value = Some(s);
                            }
                        }
                    });
            }
        });
        let side = ((ui.available_width() - 40.0) / 2.0).clamp(96.0, 384.0);
        egui::ScrollArea::vertical()
            .auto_shrink(false)
            .show(ui, |ui| {
                for i in 0..run.prompts.len() {
                    let prompt = run.prompt_text(i);
                    ui.label(RichText::new(format!("{}. {prompt}", i + 1)).strong());
                    ui.horizontal(|ui| {
                        for step in [left, right] {
                            ui.vertical(|ui| {
                                ui.label(format!("Step {step}"));
                                self.cell(ui, run, Some(step), i, side);
                            });
                        }
                    });
                }
            });
    }

    fn enlarged_window(&mut self, ui: &mut Ui, run: &Shown<'_>) {
        let Some((step, index)) = self.enlarged else {
            return;
        };
        let Some(s) = run.image(step, index) else {
            self.enlarged = None;
            return;
        };
        let mut open = true;
        let mut close = false;
        let title = match step {
            None => format!("Without LoRA, prompt {}", index + 1),
            Some(step) => format!("Step {step}, prompt {}", index + 1),
        };
        egui::Window::new(title)
            .open(&mut open)
            .collapsible(false)
            .resizable(true)
            .show(ui.ctx(), |ui| {
                let avail = ui.ctx().content_rect().size() * 0.7;
                let size = s.texture.size_vec2();
                let scale = (avail.x / size.x).min(avail.y / size.y).max(1.0);
                ui.image((s.texture.id(), size * scale));
                match &s.info {
                    Some(info) => {
                        ui.label(&info.prompt);
                        if !info.negative.is_empty() {
                            ui.label(format!("Negative: {}", info.negative));
                        }
                        ui.label(info.describe());
                    }
                    None => {
                        ui.label(run.prompt_text(index));
                        ui.weak("The settings were not saved with this sample.");
                    }
                }
                ui.horizontal(|ui| {
                    ui.weak(s.path.display().to_string());
                    if ui.small_button("Copy path").clicked() {
                        ui.ctx().copy_text(s.path.display().to_string());
                    }
                    if ui.button("Close").clicked() {
                        close = true;
                    }
                });
            });
        if !open || close {
            self.enlarged = None;
        }
    }
}

fn saved_files(ui: &mut Ui, run: &Shown<'_>) {
    ui.strong("Saved LoRA files");
    if run.loras.is_empty() {
        ui.weak(
            "None yet: the run saves every \"save every N steps\", on Save now and at the end.",
        );
        return;
    }
    egui::ScrollArea::vertical()
        .id_salt("saved-list")
        .show(ui, |ui| {
            egui::Grid::new("saved-grid").striped(true).show(ui, |ui| {
                for (i, (label, path)) in run.loras.iter().enumerate().rev() {
                    ui.label(label);
                    let name = path.file_name().map(|n| n.to_string_lossy());
                    ui.monospace(name.unwrap_or_default())
                        .on_hover_text(path.display().to_string());
                    let r = ui.small_button("Copy path");
                    super::widgets::name_widget(
                        &r,
                        egui::Role::Button,
                        format!("Copy path {}", i + 1),
                    );
                    if r.clicked() {
                        ui.ctx().copy_text(path.display().to_string());
                    }
                    ui.end_row();
                }
            });
        });
}
