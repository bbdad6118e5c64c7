//! The Samples workspace: the preview images of the run by step (rows) and prompt (columns), filling in live;
//! click one to enlarge it; compare two steps side by side; the saved LoRA files with their paths.

use super::run_view::Run;
use super::training_jobs::open_folder;
use egui::{RichText, Ui, vec2};

const CELL: f32 = 160.0;

#[derive(Default)]
pub struct SamplesView {
    /// (step, prompt index) of the enlarged image.
    enlarged: Option<(u64, usize)>,
    compare: bool,
    left: Option<u64>,
    right: Option<u64>,
}

impl SamplesView {
    pub fn ui(&mut self, ui: &mut Ui, run: Option<&Run>) {
        let Some(run) = run else {
            ui.heading("Samples");
            ui.label(
                "No run yet. Start training in the Training workspace: the sample prompts are drawn here every \
                 \"sample every N steps\", and the saved LoRA files are listed.",
            );
            return;
        };
        let steps = run.sample_steps();
        ui.horizontal(|ui| {
            ui.heading("Samples");
            ui.label(format!(
                "{} images at {} steps",
                run.samples.len(),
                steps.len()
            ));
            let dir = run.output_dir();
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
            .show(ui, |ui| saved_files(ui, run));
        if steps.is_empty() {
            ui.label("No samples yet: they appear here as the run makes them.");
            if run.config.sampling.prompts.is_empty() || run.config.sampling.every_n_steps == 0 {
                ui.weak("This run has no sample prompts or \"sample every N steps\" is 0; use Sample now or add prompts for the next run.");
            }
        } else if self.compare && steps.len() >= 2 {
            self.compare_ui(ui, run, &steps);
        } else {
            self.grid(ui, run, &steps);
        }
        self.enlarged_window(ui, run);
    }

    fn grid(&mut self, ui: &mut Ui, run: &Run, steps: &[u64]) {
        let columns = run.prompt_count();
        egui::ScrollArea::both().auto_shrink(false).show(ui, |ui| {
            egui::Grid::new("samples-grid")
                .spacing([6.0, 6.0])
                .show(ui, |ui| {
                    ui.label("");
                    for i in 0..columns {
                        let prompt = run.prompt_text(i);
                        ui.add_sized(
                            [CELL, 20.0],
                            egui::Label::new(
                                RichText::new(format!("{}. {prompt}", i + 1)).strong(),
                            )
                            .truncate(),
                        )
                        .on_hover_text(prompt);
                    }
                    ui.end_row();
                    for &step in steps.iter().rev() {
                        ui.label(RichText::new(format!("Step {step}")).strong());
                        for i in 0..columns {
                            self.cell(ui, run, step, i, CELL);
                        }
                        ui.end_row();
                    }
                });
        });
    }

    fn cell(&mut self, ui: &mut Ui, run: &Run, step: u64, index: usize, side: f32) {
        match run.samples.get(&(step, index)) {
            Some(s) => {
                let size = s.texture.size_vec2();
                let scale = (side / size.x).min(side / size.y);
                let r = ui
                    .add(
                        egui::Image::new((s.texture.id(), size * scale))
                            .sense(egui::Sense::click()),
                    )
                    .on_hover_text(format!("Step {step}: {}\n{}", s.prompt, s.path.display()));
                super::widgets::name_widget(
                    &r,
                    egui::Role::Button,
                    format!("Sample step {step} prompt {}", index + 1),
                );
                if r.clicked() {
                    self.enlarged = Some((step, index));
                }
            }
            None => {
                ui.allocate_exact_size(vec2(side, side), egui::Sense::hover());
            }
        }
    }

    fn compare_ui(&mut self, ui: &mut Ui, run: &Run, steps: &[u64]) {
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
                for i in 0..run.prompt_count() {
                    let prompt = run.prompt_text(i);
                    ui.label(RichText::new(format!("{}. {prompt}", i + 1)).strong());
                    ui.horizontal(|ui| {
                        for step in [left, right] {
                            ui.vertical(|ui| {
                                ui.label(format!("Step {step}"));
                                self.cell(ui, run, step, i, side);
                            });
                        }
                    });
                }
            });
    }

    fn enlarged_window(&mut self, ui: &mut Ui, run: &Run) {
        let Some((step, index)) = self.enlarged else {
            return;
        };
        let Some(s) = run.samples.get(&(step, index)) else {
            self.enlarged = None;
            return;
        };
        let mut open = true;
        let mut close = false;
        egui::Window::new(format!("Step {step}, prompt {}", index + 1))
            .open(&mut open)
            .collapsible(false)
            .resizable(true)
            .show(ui.ctx(), |ui| {
                let avail = ui.ctx().content_rect().size() * 0.75;
                let size = s.texture.size_vec2();
                let scale = (avail.x / size.x).min(avail.y / size.y).max(1.0);
                ui.image((s.texture.id(), size * scale));
                ui.label(&s.prompt);
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

fn saved_files(ui: &mut Ui, run: &Run) {
    ui.strong("Saved LoRA files");
    if run.saved.is_empty() {
        ui.weak(
            "None yet: the run saves every \"save every N steps\", on Save now and at the end.",
        );
        return;
    }
    egui::ScrollArea::vertical()
        .id_salt("saved-list")
        .show(ui, |ui| {
            egui::Grid::new("saved-grid").striped(true).show(ui, |ui| {
                for (i, f) in run.saved.iter().enumerate().rev() {
                    ui.label(format!("Step {}", f.step));
                    ui.label(if f.final_file { "final" } else { "" });
                    ui.monospace(f.path.display().to_string());
                    let r = ui.small_button("Copy path");
                    super::widgets::name_widget(
                        &r,
                        egui::Role::Button,
                        format!("Copy path {}", i + 1),
                    );
                    if r.clicked() {
                        ui.ctx().copy_text(f.path.display().to_string());
                    }
                    ui.end_row();
                }
            });
        });
}
