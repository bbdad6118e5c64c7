//! Resuming a stopped run from the window: the state a run saved in its output folder is found (after a
//! restart too) and offered as "Resume"; a new run that would replace it asks first.

use super::training_view::TrainingView;
use crate::train::config::TrainConfig;
use crate::train::plan::OutputPaths;
use egui::Ui;
use std::path::PathBuf;

/// A run saved in an output folder that can go on.
#[derive(Clone, Debug)]
pub struct Resumable {
    /// The state folder (`OUTPUT/state`).
    pub dir: PathBuf,
    /// Steps it has taken.
    pub step: u64,
    /// The settings it was started with, which the continuation uses.
    pub config: TrainConfig,
}

impl Resumable {
    /// The state saved in `config`'s output folder, unless there is none or its run has taken all its steps.
    pub fn find(config: &TrainConfig) -> Option<Resumable> {
        let dir = OutputPaths::new(config).state();
        let (counters, saved) = crate::train::state::saved(&dir).ok()?;
        let steps = saved.training.steps;
        (steps == 0 || counters.step < steps).then_some(Resumable {
            dir,
            step: counters.step,
            config: saved,
        })
    }

    /// "step 51 of 150".
    pub fn progress(&self) -> String {
        match self.config.training.steps {
            0 => format!("step {}", self.step),
            total => format!("step {} of {total}", self.step),
        }
    }
}

/// What the user answered when Start would replace a saved run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplaceAnswer {
    Resume,
    StartOver,
    Cancel,
}

/// The question asked before a new run replaces `saved`; `None` while it is open.
pub fn replace_dialog(ctx: &egui::Context, saved: &Resumable) -> Option<ReplaceAnswer> {
    let mut answer = None;
    let modal = egui::Modal::new(egui::Id::unique("confirm-replace-state")).show(ctx, |ui: &mut Ui| {
        ui.heading("Replace the saved run?");
        ui.label(format!(
            "{} holds a run stopped at {}. A new run starts at step 0 and replaces that state at its first save.",
            saved.dir.display(),
            saved.progress()
        ));
        ui.horizontal(|ui| {
            if ui.button("Resume it").clicked() {
                answer = Some(ReplaceAnswer::Resume);
            }
            if ui.button("Start a new run").clicked() {
                answer = Some(ReplaceAnswer::StartOver);
            }
            if ui.button("Cancel").clicked() {
                answer = Some(ReplaceAnswer::Cancel);
            }
        });
    });
    if modal.should_close() && answer.is_none() {
        answer = Some(ReplaceAnswer::Cancel);
    }
    answer
}

impl TrainingView {
    /// The Resume button of a stopped run, shown while nothing runs.
    pub(super) fn resume_button(&mut self, ui: &mut Ui) {
        let Some(saved) = self.resumable().cloned() else {
            return;
        };
        if self.is_running() {
            return;
        }
        if ui
            .button(format!("Resume from step {}", saved.step))
            .on_hover_text(format!(
                "Continue the run saved in {} exactly where it stopped ({}), with the settings it was started \
                 with.",
                saved.dir.display(),
                saved.progress()
            ))
            .clicked()
        {
            self.resume(ui.ctx());
        }
    }
}
