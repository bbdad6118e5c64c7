//! The plan of a run before it starts: images, buckets, steps, the device memory it needs against the card,
//! its warnings and the time estimate.

use super::widgets::{bytes, duration};
use crate::train::config::TrainConfig;
use crate::train::plan::Preview;
use egui::{RichText, Ui};

pub(super) fn plan_details(
    ui: &mut Ui,
    p: &Preview,
    card_total: Option<u64>,
    config: &TrainConfig,
    speed: Option<f64>,
) {
    let plan = &p.plan;
    egui::Grid::new("plan-grid")
        .num_columns(2)
        .spacing([16.0, 4.0])
        .show(ui, |ui| {
            let mut row = |k: &str, v: String| {
                ui.label(k);
                ui.label(v);
                ui.end_row();
            };
            row("Images", plan.images.to_string());
            if plan.regularization_images > 0 {
                row(
                    "Regularization images",
                    format!(
                        "{} ({} uses per epoch)",
                        plan.regularization_images, plan.regularization_samples_per_epoch
                    ),
                );
            }
            row(
                "Image uses per epoch (repeats)",
                plan.samples_per_epoch.to_string(),
            );
            row("Buckets", plan.buckets.len().to_string());
            row("Steps per epoch", plan.steps_per_epoch.to_string());
            row("Total steps", plan.total_steps.to_string());
            row("Device", format!("{} ({})", plan.device, plan.precision));
            row("Output folder", plan.output_dir.display().to_string());
            row(
                "LoRA file",
                plan.lora_file
                    .file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned(),
            );
        });
    ui.collapsing("Buckets (width x height: image uses)", |ui| {
        for (w, h, n) in &plan.buckets {
            ui.label(format!("{w} x {h}: {n}"));
        }
    });
    ui.add_space(6.0);
    ui.strong("Device memory");
    let total = p.memory.total_bytes;
    match card_total {
        Some(card) => {
            ui.add(
                egui::ProgressBar::new((total as f32 / card.max(1) as f32).min(1.0))
                    .desired_width(360.0)
                    .text(format!("about {} of {}", bytes(total), bytes(card))),
            );
            if let Some(advice) = p.memory.advice(card, config) {
                egui::Frame::new()
                    .stroke(egui::Stroke::new(1.5, ui.visuals().error_fg_color))
                    .inner_margin(8.0)
                    .corner_radius(4.0)
                    .show(ui, |ui| {
                        ui.label(
                            RichText::new("This run will not fit the card.")
                                .strong()
                                .color(ui.visuals().error_fg_color),
                        );
                        ui.label(advice);
                    });
            }
        }
        None => {
            ui.label(format!(
                "about {} (no GPU: the run uses main memory)",
                bytes(total)
            ));
        }
    }
    ui.collapsing("Where the memory goes", |ui| {
        for (part, b) in &p.memory.parts {
            ui.label(format!("{part}: {}", bytes(*b)));
        }
    });
    for w in &p.warnings {
        let color = ui.visuals().warn_fg_color;
        ui.add(egui::Label::new(RichText::new(w).color(color)).wrap());
    }
    match speed {
        Some(it_s) => {
            ui.label(format!(
                "Estimated time: about {} at {it_s:.2} it/s (the speed of the last run)",
                duration(plan.total_steps.saturating_sub(plan.start_step) as f64 / it_s)
            ));
        }
        None => {
            ui.weak("The time estimate appears once the first steps have run.");
        }
    }
}
