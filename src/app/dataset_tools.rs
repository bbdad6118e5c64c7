//! The tool tabs beside the grid: bulk caption edits, the tag table, the checks list, buckets and repeats,
//! and import.

use super::dataset_jobs::Pick;
use super::dataset_view::{DatasetSettings, DatasetView, ToolTab};
use super::widgets::{labeled_drag, labeled_text};
use crate::dataset::edit::{BulkOp, apply_bulk};
use crate::dataset::project::MAX_REPEATS;
use crate::dataset::validate::Severity;
use crate::dataset::{BucketConfig, Buckets};
use egui::Ui;
use std::path::PathBuf;

const RESOLUTIONS: [u32; 3] = [512, 768, 1024];

impl DatasetView {
    pub(super) fn tool_tab(&mut self, ui: &mut Ui, settings: &mut DatasetSettings, tab: ToolTab) {
        if self.loaded.is_none() {
            ui.label("Open a dataset first.");
            return;
        }
        match tab {
            ToolTab::Bulk => self.bulk_tab(ui, settings),
            ToolTab::Tags => self.tags_tab(ui),
            ToolTab::Checks => self.checks_tab(ui, settings),
            ToolTab::Buckets => self.buckets_tab(ui, settings),
            ToolTab::Import => self.import_tab(ui),
            ToolTab::Image => {}
        }
    }

    fn bulk_tab(&mut self, ui: &mut Ui, settings: &DatasetSettings) {
        let total = self.loaded.as_ref().map_or(0, |l| l.scan.entries.len());
        ui.horizontal(|ui| {
            ui.label("Apply to");
            ui.radio_value(
                &mut self.bulk.filtered_only,
                false,
                format!("All images ({total})"),
            );
            ui.radio_value(
                &mut self.bulk.filtered_only,
                true,
                format!("Filtered ({})", self.filtered.len()),
            );
        });
        ui.separator();
        let mut op = None;
        ui.horizontal(|ui| {
            labeled_text(ui, "Trigger word", &mut self.bulk.trigger, 140.0);
            if ui
                .add_enabled(
                    !self.bulk.trigger.trim().is_empty(),
                    egui::Button::new("Add to front"),
                )
                .clicked()
            {
                op = Some(BulkOp::AddTrigger(self.bulk.trigger.trim().to_owned()));
            }
        });
        ui.weak("Put first in every caption; captions that already have it are not changed.");
        ui.horizontal(|ui| {
            labeled_text(ui, "Find", &mut self.bulk.find, 110.0);
            labeled_text(ui, "Replace with", &mut self.bulk.replace, 110.0);
        });
        if ui
            .add_enabled(!self.bulk.find.is_empty(), egui::Button::new("Replace all"))
            .clicked()
        {
            op = Some(BulkOp::Replace {
                find: self.bulk.find.clone(),
                replace: self.bulk.replace.clone(),
            });
        }
        ui.horizontal(|ui| {
            labeled_text(ui, "Tag to remove", &mut self.bulk.remove_tag, 140.0);
            if ui
                .add_enabled(
                    !self.bulk.remove_tag.trim().is_empty(),
                    egui::Button::new("Remove tag"),
                )
                .clicked()
            {
                op = Some(BulkOp::RemoveTag(self.bulk.remove_tag.trim().to_owned()));
            }
        });
        ui.separator();
        if ui
            .add_enabled(!self.undo.is_empty(), egui::Button::new("Undo last change"))
            .clicked()
        {
            self.undo_last(settings);
        }
        if let Some(op) = op {
            self.run_bulk(settings, &op);
        }
    }

    /// Runs a bulk operation on all or the filtered images; the whole batch is one undo step.
    pub fn run_bulk(&mut self, settings: &DatasetSettings, op: &BulkOp) {
        self.flush_caption(&mut settings.clone());
        let Some(l) = &mut self.loaded else { return };
        let indices: Vec<usize> = if self.bulk.filtered_only {
            self.filtered.clone()
        } else {
            (0..l.scan.entries.len()).collect()
        };
        let result = apply_bulk(std::sync::Arc::make_mut(&mut l.scan), &indices, op);
        self.status = result.describe();
        if !result.failed.is_empty() {
            self.error = Some(result.describe());
        }
        self.reload_editor_if(&result.edits);
        if !result.edits.is_empty() {
            self.undo.push(result.edits);
        }
        self.mark_changed();
    }

    fn tags_tab(&mut self, ui: &mut Ui) {
        labeled_text(ui, "Search tags", &mut self.tag_search, 180.0);
        let Some(d) = &self.derived else { return };
        let needle = self.tag_search.trim().to_lowercase();
        let rows: Vec<&(String, usize)> = d
            .tags
            .iter()
            .filter(|(t, _)| needle.is_empty() || t.to_lowercase().contains(&needle))
            .collect();
        ui.label(format!(
            "{} tags (click one to filter the grid by it)",
            rows.len()
        ));
        let mut chosen = None;
        let row_h = ui.text_style_height(&egui::TextStyle::Body) + 4.0;
        egui::ScrollArea::vertical().auto_shrink(false).show_rows(
            ui,
            row_h,
            rows.len(),
            |ui, range| {
                egui::Grid::new("tag_table")
                    .num_columns(2)
                    .striped(true)
                    .show(ui, |ui| {
                        for (tag, count) in &rows[range] {
                            if ui
                                .selectable_label(self.filter.tag == *tag, tag.as_str())
                                .clicked()
                            {
                                chosen = Some(tag.clone());
                            }
                            ui.label(count.to_string());
                            ui.end_row();
                        }
                    });
            },
        );
        if let Some(tag) = chosen {
            let same = self.filter.tag == tag;
            self.set_tag_filter(if same { "" } else { &tag });
        }
    }

    fn checks_tab(&mut self, ui: &mut Ui, settings: &DatasetSettings) {
        let (Some(l), Some(d)) = (&self.loaded, &self.derived) else {
            return;
        };
        let r = &d.report;
        egui::Grid::new("check_counts")
            .num_columns(2)
            .show(ui, |ui| {
                for (what, n) in [
                    ("Unreadable images", r.unreadable.len()),
                    ("Too small for their bucket", r.too_small.len()),
                    ("Missing captions", r.missing_caption.len()),
                    ("Empty captions", r.empty_caption.len()),
                    ("Captions not UTF-8", r.non_utf8_caption.len()),
                    ("Duplicate groups", r.duplicates.len()),
                    ("Transparent images", r.transparent.len()),
                    ("16-bit / CMYK / odd mode", r.odd_mode.len()),
                    ("EXIF-rotated (applied)", r.exif_rotated.len()),
                ] {
                    ui.label(what);
                    ui.label(n.to_string());
                    ui.end_row();
                }
            });
        if !l.checked {
            ui.weak(format!(
                "Still checking: {}/{} images.",
                l.inspected,
                l.scan.entries.len()
            ));
        }
        for p in &l.scan.problems {
            ui.colored_label(
                ui.visuals().warn_fg_color,
                format!("{}: {}", p.path.display(), p.what),
            );
        }
        ui.separator();
        let with_problems: Vec<usize> = (0..d.severity.len())
            .filter(|&i| d.severity[i].is_some_and(|s| s >= Severity::Warning))
            .collect();
        ui.label(format!(
            "{} images with problems (click to open):",
            with_problems.len()
        ));
        let mut open = None;
        let row_h = ui.text_style_height(&egui::TextStyle::Body) * 2.0 + 6.0;
        egui::ScrollArea::vertical().auto_shrink(false).show_rows(
            ui,
            row_h,
            with_problems.len(),
            |ui, range| {
                for &i in &with_problems[range] {
                    let msg = self
                        .findings_of(i, settings)
                        .into_iter()
                        .max_by_key(|f| f.severity)
                        .map(|f| f.message);
                    let text = format!("{}\n{}", l.scan.entries[i].rel, msg.unwrap_or_default());
                    if ui
                        .selectable_label(self.selected() == Some(i), text)
                        .clicked()
                    {
                        open = Some(i);
                    }
                }
            },
        );
        if let Some(i) = open {
            self.select(i, settings);
            self.tab = ToolTab::Image;
        }
    }

    fn buckets_tab(&mut self, ui: &mut Ui, settings: &mut DatasetSettings) {
        let before = (settings.buckets, settings.batch_size);
        egui::ComboBox::from_label("Resolution")
            .selected_text(format!("{} px", settings.buckets.resolution))
            .show_ui(ui, |ui| {
                for r in RESOLUTIONS {
                    if ui
                        .selectable_label(settings.buckets.resolution == r, format!("{r} px"))
                        .clicked()
                    {
                        settings.buckets = BucketConfig::for_resolution(r);
                    }
                }
            });
        ui.horizontal(|ui| {
            labeled_drag(ui, "Min side", &mut settings.buckets.min_side, 64..=4096);
            labeled_drag(ui, "Max side", &mut settings.buckets.max_side, 64..=8192);
            labeled_drag(ui, "Step", &mut settings.buckets.step, 8..=256);
        });
        labeled_drag(ui, "Batch size", &mut settings.batch_size, 1..=64);
        if (settings.buckets, settings.batch_size) != before {
            self.settings_changed();
        }
        let Some(d) = &self.derived else { return };
        let r = &d.report;
        ui.label(format!(
            "{} images per epoch (with repeats) · {} steps per epoch at batch {}",
            r.images_per_epoch, r.steps_per_epoch, r.batch_size
        ));
        let max = r.buckets.values().copied().max().unwrap_or(1) as f32;
        egui::Grid::new("bucket_table")
            .num_columns(2)
            .striped(true)
            .show(ui, |ui| {
                for (bucket, n) in &r.buckets {
                    ui.label(bucket);
                    ui.add(
                        egui::ProgressBar::new(*n as f32 / max)
                            .text(n.to_string())
                            .desired_width(200.0),
                    );
                    ui.end_row();
                }
            });
        ui.weak(format!(
            "{} possible buckets at these settings.",
            Buckets::new(&settings.buckets).list().len()
        ));
        ui.separator();
        self.repeats_editor(ui);
    }

    fn repeats_editor(&mut self, ui: &mut Ui) {
        ui.label("Repeats per folder");
        let Some(l) = &mut self.loaded else { return };
        let mut failed = None;
        let mut changed = false;
        egui::Grid::new("repeats").num_columns(3).show(ui, |ui| {
            for f in l.scan.folders.clone() {
                ui.label(format!("{} ({} images)", f.name, f.images));
                if f.repeats.from_folder_name {
                    ui.label(format!("×{}", f.repeats.count));
                    ui.weak("from the folder name");
                } else {
                    let mut n = f.repeats.count;
                    let l2 = ui.label("×");
                    let resp = ui
                        .add(egui::DragValue::new(&mut n).range(1..=MAX_REPEATS as u32))
                        .labelled_by(l2.id);
                    super::widgets::name_widget(
                        &resp,
                        egui::Role::SpinButton,
                        format!("Repeats of {}", f.name),
                    );
                    if n != f.repeats.count {
                        if let Err(e) =
                            std::sync::Arc::make_mut(&mut l.scan).set_repeats(&f.name, n)
                        {
                            failed = Some(e);
                        }
                        changed = true;
                    }
                    ui.weak("saved in lora-studio.toml");
                }
                ui.end_row();
            }
        });
        if let Some(e) = failed {
            self.error = Some(e);
        }
        if changed {
            self.settings_changed();
        }
    }

    fn import_tab(&mut self, ui: &mut Ui) {
        ui.label("Copy images (with their captions) into this dataset. Exact duplicates are skipped; a different \
                  file with the same name is imported under a new name, never overwritten.");
        labeled_text(ui, "Into subfolder", &mut self.import_subfolder, 200.0);
        ui.horizontal(|ui| {
            if ui.button("Import files…").clicked() {
                self.pick(Pick::ImportFiles);
            }
            if ui.button("Import folder…").clicked() {
                self.pick(Pick::ImportFolder);
            }
        });
        ui.horizontal(|ui| {
            // Narrow enough for the panel's least width, so this tab does not widen the panel.
            labeled_text(ui, "Import from path", &mut self.import_path, 150.0);
            if ui
                .add_enabled(
                    !self.import_path.trim().is_empty(),
                    egui::Button::new("Import"),
                )
                .clicked()
            {
                let path = PathBuf::from(self.import_path.trim());
                if path.exists() {
                    self.start_import(vec![path]);
                } else {
                    self.error = Some(format!("{} does not exist.", path.display()));
                }
            }
        });
    }
}
