//! The dataset workspace: open a folder, browse the thumbnail grid, edit captions, and the tools beside them.

use super::dataset_jobs::{JobEvent, Jobs, Pick};
use super::textures::{Slot, TextureCache};
use super::widgets::{labeled_text, recent_menu};
use crate::dataset::edit::{self, CaptionEdit};
use crate::dataset::validate::{Finding, Severity, duplicate_map, findings};
use crate::dataset::{BucketConfig, Buckets, CaptionStatus, Inspection, Report, Scan, caption};
use crate::words::count;
use egui::{Align2, Color32, FontId, Rect, Sense, Ui, vec2};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

const RECENT_MAX: usize = 10;
const THUMB_SIDE: f32 = 112.0;
/// Thumbnails kept as textures (≈50 KB each at most: ≈75 MB of GPU memory at worst, which a training run on
/// the same card can spare).
const THUMB_CAPACITY: usize = 1500;
/// A caption edit is saved once typing pauses this long (or the field loses focus, or the selection moves).
const SAVE_DELAY: Duration = Duration::from_millis(600);
/// While images are being checked, the derived report is rebuilt at most this often.
const DERIVE_EVERY: Duration = Duration::from_millis(300);

/// Dataset settings that survive a restart.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default)]
pub struct DatasetSettings {
    /// Recently opened dataset folders, most recent first.
    pub recent: Vec<String>,
    pub buckets: BucketConfig,
    pub batch_size: u32,
}

impl Default for DatasetSettings {
    fn default() -> Self {
        DatasetSettings {
            recent: Vec::new(),
            buckets: BucketConfig::for_resolution(512),
            batch_size: 1,
        }
    }
}

impl DatasetSettings {
    /// Puts `path` first in the recent folders (the one opened on the next start).
    pub fn remember(&mut self, path: &Path) {
        let p = path.to_string_lossy().into_owned();
        self.recent.retain(|r| *r != p);
        self.recent.insert(0, p);
        self.recent.truncate(RECENT_MAX);
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ToolTab {
    Image,
    Bulk,
    Tags,
    Checks,
    Buckets,
    Import,
}

impl ToolTab {
    const ALL: [ToolTab; 6] = [
        ToolTab::Image,
        ToolTab::Bulk,
        ToolTab::Tags,
        ToolTab::Checks,
        ToolTab::Buckets,
        ToolTab::Import,
    ];

    fn label(self) -> &'static str {
        match self {
            ToolTab::Image => "Image",
            ToolTab::Bulk => "Bulk edit",
            ToolTab::Tags => "Tags",
            ToolTab::Checks => "Checks",
            ToolTab::Buckets => "Buckets",
            ToolTab::Import => "Import",
        }
    }
}

/// A dataset that has been scanned, and what is known about its images so far.
pub(super) struct Loaded {
    /// Shared with background derive jobs; edits copy on write (`Arc::make_mut`) only while a job holds it.
    pub scan: Arc<Scan>,
    pub inspections: Arc<Vec<Inspection>>,
    pub inspected: usize,
    /// Every image has been inspected.
    pub checked: bool,
}

/// Everything computed from the loaded dataset, rebuilt when it changes.
pub(super) struct Derived {
    pub report: Report,
    pub severity: Vec<Option<Severity>>,
    pub duplicates: Vec<Option<usize>>,
    pub tags: Vec<(String, usize)>,
}

#[derive(Default)]
pub(super) struct Filter {
    pub text: String,
    pub tag: String,
    pub no_caption: bool,
    pub problems: bool,
}

#[derive(Default)]
struct Editor {
    index: Option<usize>,
    text: String,
    edited_at: Option<Instant>,
}

#[derive(Default)]
pub(super) struct BulkForm {
    pub filtered_only: bool,
    pub trigger: String,
    pub find: String,
    pub replace: String,
    pub remove_tag: String,
}

pub struct DatasetView {
    jobs: Jobs,
    generation: u64,
    path_input: String,
    pub(super) loaded: Option<Loaded>,
    loading: Option<PathBuf>,
    pub(super) error: Option<String>,
    pub(super) status: String,
    selected: Option<usize>,
    editor: Editor,
    pub(super) filter: Filter,
    pub(super) filtered: Vec<usize>,
    filter_dirty: bool,
    pub(super) tab: ToolTab,
    pub(super) undo: Vec<Vec<CaptionEdit>>,
    pub(super) bulk: BulkForm,
    pub(super) import_path: String,
    pub(super) import_subfolder: String,
    pub(super) tag_search: String,
    thumbs: TextureCache,
    preview: TextureCache,
    pub(super) derived: Option<Derived>,
    derived_dirty: bool,
    deriving: bool,
    derived_at: Instant,
}

impl DatasetView {
    pub fn new(ctx: &egui::Context) -> Self {
        DatasetView {
            jobs: Jobs::new(ctx),
            generation: 0,
            path_input: String::new(),
            loaded: None,
            loading: None,
            error: None,
            status: "Open a dataset folder to begin.".into(),
            selected: None,
            editor: Editor::default(),
            filter: Filter::default(),
            filtered: Vec::new(),
            filter_dirty: false,
            tab: ToolTab::Image,
            undo: Vec::new(),
            bulk: BulkForm::default(),
            import_path: String::new(),
            import_subfolder: String::new(),
            tag_search: String::new(),
            thumbs: new_thumb_cache(ctx),
            preview: new_preview_cache(ctx),
            derived: None,
            derived_dirty: false,
            deriving: false,
            derived_at: Instant::now(),
        }
    }

    /// Starts scanning `root` (the previous dataset's pending caption edit is saved first).
    pub fn open(&mut self, ctx: &egui::Context, settings: &DatasetSettings, root: PathBuf) {
        if self.loaded.is_some() {
            self.save_editor(settings);
        }
        self.generation += 1;
        self.path_input = root.to_string_lossy().into_owned();
        self.status = format!("Scanning {} …", root.display());
        self.error = None;
        self.loading = Some(root.clone());
        self.jobs.scan(root, self.generation);
        self.preview = new_preview_cache(ctx);
    }

    fn rescan(&mut self, ctx: &egui::Context, settings: &DatasetSettings) {
        if let Some(root) = self.loaded.as_ref().map(|l| l.scan.root.clone()) {
            let keep = self.selected;
            self.open(ctx, settings, root);
            self.selected = keep;
        }
    }

    /// True while a scan, the image checks or a report update run.
    pub fn is_busy(&self) -> bool {
        self.loading.is_some()
            || self.deriving
            || self.derived_dirty
            || self.loaded.as_ref().is_some_and(|l| !l.checked)
    }

    pub fn scan(&self) -> Option<&Scan> {
        self.loaded.as_ref().map(|l| &*l.scan)
    }

    pub fn report(&self) -> Option<&Report> {
        self.derived.as_ref().map(|d| &d.report)
    }

    pub fn selected(&self) -> Option<usize> {
        self.selected
    }

    pub fn error(&self) -> Option<&str> {
        self.error.as_deref()
    }

    pub fn thumbnails_loaded(&self) -> usize {
        self.thumbs.loaded()
    }

    /// The images whose thumbnails are on hand.
    pub fn thumbnail_paths(&self) -> Vec<PathBuf> {
        self.thumbs.paths().map(Path::to_path_buf).collect()
    }

    /// Indices of the images the filters let through, in grid order.
    pub fn visible(&self) -> &[usize] {
        &self.filtered
    }

    pub fn status_line(&self) -> String {
        let mut s = self.status.clone();
        if let Some(l) = &self.loaded
            && !l.checked
        {
            s += &format!(
                "   Checking images {}/{} …",
                l.inspected,
                l.scan.entries.len()
            );
        }
        s
    }

    /// Applies what the workers sent since the last frame. Called at the start of every frame.
    pub fn poll(&mut self, ctx: &egui::Context, settings: &mut DatasetSettings) {
        let events: Vec<JobEvent> = self.jobs.events().collect();
        for event in events {
            self.apply(ctx, settings, event);
        }
        self.thumbs.poll(ctx);
        self.preview.poll(ctx);
        let checking = self.loaded.as_ref().is_some_and(|l| !l.checked);
        if self.derived_dirty && !self.deriving {
            if !checking || self.derived_at.elapsed() >= DERIVE_EVERY {
                self.start_derive(settings);
            } else {
                ctx.request_repaint_after(DERIVE_EVERY);
            }
        }
        if self.filter_dirty {
            self.refilter();
        }
        if let Some(t) = self.editor.edited_at {
            if t.elapsed() >= SAVE_DELAY {
                self.save_editor(settings);
            } else {
                ctx.request_repaint_after(SAVE_DELAY);
            }
        }
    }

    fn apply(&mut self, ctx: &egui::Context, settings: &mut DatasetSettings, event: JobEvent) {
        match event {
            JobEvent::Scanned { generation, result } if generation == self.generation => {
                self.loading = None;
                match result {
                    Ok(scan) => self.loaded_scan(ctx, settings, scan),
                    Err(e) => {
                        self.status = "Could not open the dataset.".into();
                        self.error = Some(e);
                    }
                }
            }
            JobEvent::Inspected {
                generation,
                index,
                result,
            } if generation == self.generation => {
                if let Some(l) = &mut self.loaded {
                    Arc::make_mut(&mut l.inspections)[index] = Some(result);
                    l.inspected += 1;
                    self.derived_dirty = true;
                }
            }
            JobEvent::InspectionDone { generation } if generation == self.generation => {
                if let Some(l) = &mut self.loaded {
                    l.checked = true;
                    self.status = format!("All {} images checked.", l.scan.entries.len());
                    self.derived_dirty = true;
                }
            }
            JobEvent::Derived {
                generation,
                derived,
            } if generation == self.generation => {
                self.deriving = false;
                self.derived = Some(*derived);
                self.filter_dirty = true;
            }
            JobEvent::Derived { .. } => self.deriving = false,
            JobEvent::Picked { purpose, paths } => self.picked(ctx, settings, purpose, paths),
            JobEvent::Imported { summary } => {
                self.status = summary.describe();
                self.rescan(ctx, settings);
            }
            _ => {} // a result of a dataset that is no longer open
        }
    }

    fn loaded_scan(&mut self, ctx: &egui::Context, settings: &mut DatasetSettings, scan: Scan) {
        settings.remember(&scan.root);
        self.status = format!(
            "{} images found in {}.",
            scan.entries.len(),
            scan.root.display()
        );
        if scan.entries.is_empty() {
            self.error = Some(format!(
                "No images in {}. lora-studio reads .png, .jpg, .jpeg, .webp and .bmp files (in subfolders too), \
                 each with a caption in a .txt file of the same name.",
                scan.root.display()
            ));
        }
        let n = scan.entries.len();
        if self.selected.is_some_and(|i| i >= n) {
            self.selected = None;
        }
        // Nothing computed or decoded for the previous folder stays: the grid drew it while this one was
        // being scanned.
        self.derived = None;
        self.filtered.clear();
        self.thumbs = new_thumb_cache(ctx);
        self.loaded = Some(Loaded {
            scan: Arc::new(scan),
            inspections: Arc::new(vec![None; n]),
            inspected: 0,
            checked: false,
        });
        self.editor = Editor::default();
        self.load_editor();
        self.derived_dirty = true;
        self.filter_dirty = true;
        self.undo.clear();
    }

    fn picked(
        &mut self,
        ctx: &egui::Context,
        settings: &mut DatasetSettings,
        purpose: Pick,
        paths: Vec<PathBuf>,
    ) {
        if paths.is_empty() {
            self.status = "No file dialog answered; type the path into the field instead.".into();
            return;
        }
        match purpose {
            Pick::DatasetFolder => self.open(ctx, settings, paths[0].clone()),
            Pick::ImportFiles | Pick::ImportFolder => self.start_import(paths),
        }
    }

    pub(super) fn start_import(&mut self, sources: Vec<PathBuf>) {
        let Some(l) = &self.loaded else {
            self.error = Some("Open a dataset before importing into it.".into());
            return;
        };
        let known = l
            .inspections
            .iter()
            .flatten()
            .flatten()
            .map(|i| i.hash.clone())
            .collect();
        let unhashed = (l.scan.entries.iter().zip(l.inspections.iter()))
            .filter(|(_, i)| !matches!(i, Some(Ok(_))))
            .map(|(e, _)| e.path.clone())
            .collect();
        let dest = l.scan.root.join(self.import_subfolder.trim());
        self.status = format!(
            "Importing {} item(s) into {} …",
            sources.len(),
            dest.display()
        );
        self.jobs
            .import(sources, dest, l.scan.project.caption_ext(), known, unhashed);
    }

    pub(super) fn pick(&self, purpose: Pick) {
        let start = self.loaded.as_ref().map(|l| l.scan.root.clone());
        self.jobs.pick(purpose, start);
    }

    /// Rebuilds the report, problem marks and tag table on a worker: for thousands of images it takes
    /// milliseconds that a frame cannot spare.
    fn start_derive(&mut self, settings: &DatasetSettings) {
        let Some(l) = &self.loaded else { return };
        self.derived_dirty = false;
        self.deriving = true;
        self.derived_at = Instant::now();
        let (scan, inspections) = (l.scan.clone(), l.inspections.clone());
        let (buckets, batch) = (settings.buckets, settings.batch_size);
        self.jobs.derive(self.generation, move || {
            derive(&scan, &inspections, &buckets, batch)
        });
    }

    pub(super) fn mark_changed(&mut self) {
        self.derived_dirty = true;
        self.filter_dirty = true;
    }

    pub(super) fn settings_changed(&mut self) {
        self.derived_dirty = true;
    }

    /// The findings of one image, for the detail view and the checks list.
    pub(super) fn findings_of(&self, index: usize, settings: &DatasetSettings) -> Vec<Finding> {
        let (Some(l), Some(d)) = (&self.loaded, &self.derived) else {
            return vec![];
        };
        let dup = d
            .duplicates
            .get(index)
            .copied()
            .flatten()
            .map(|j| l.scan.entries[j].rel.as_str());
        findings(
            &l.scan.entries[index],
            &l.inspections[index],
            &Buckets::new(&settings.buckets),
            dup,
        )
    }

    fn refilter(&mut self) {
        self.filter_dirty = false;
        let Some(l) = &self.loaded else {
            self.filtered.clear();
            return;
        };
        let text = self.filter.text.trim().to_lowercase();
        let tag = self.filter.tag.trim();
        let severity = self.derived.as_ref().map(|d| &d.severity);
        self.filtered = (0..l.scan.entries.len())
            .filter(|&i| {
                let e = &l.scan.entries[i];
                (text.is_empty()
                    || e.caption.text.to_lowercase().contains(&text)
                    || e.rel.to_lowercase().contains(&text))
                    && (tag.is_empty() || caption::has_tag(&e.caption.text, tag))
                    && (!self.filter.no_caption || !e.caption.is_usable())
                    && (!self.filter.problems
                        || severity
                            .and_then(|s| s.get(i).copied().flatten())
                            .is_some_and(|s| s >= Severity::Warning))
            })
            .collect();
    }

    pub(super) fn set_tag_filter(&mut self, tag: &str) {
        self.filter.tag = tag.to_owned();
        self.filter_dirty = true;
    }

    /// Selects image `index`, saving the caption being edited first.
    pub fn select(&mut self, index: usize, settings: &DatasetSettings) {
        if self.selected == Some(index) {
            return;
        }
        self.save_editor(settings);
        self.selected = Some(index);
        self.load_editor();
    }

    fn load_editor(&mut self) {
        self.editor = Editor::default();
        if let (Some(i), Some(l)) = (self.selected, &self.loaded) {
            self.editor.index = Some(i);
            self.editor.text = l.scan.entries[i].caption.text.clone();
        }
    }

    /// Reloads the editor when an operation changed the selected caption on disk.
    pub(super) fn reload_editor_if(&mut self, edits: &[CaptionEdit]) {
        if edits.iter().any(|e| Some(e.index) == self.editor.index) {
            self.load_editor();
        }
    }

    /// Saves the caption being edited, if it changed. Called on pause in typing, selection change, and exit.
    pub fn flush_caption(&mut self, settings: &mut DatasetSettings) {
        self.save_editor(settings);
    }

    fn save_editor(&mut self, _settings: &DatasetSettings) {
        let (Some(i), Some(_)) = (self.editor.index, self.editor.edited_at.take()) else {
            return;
        };
        let Some(l) = &mut self.loaded else { return };
        match edit::set_caption(Arc::make_mut(&mut l.scan), i, &self.editor.text) {
            Ok(Some(e)) => {
                self.status = format!("Saved {}.", l.scan.entries[i].caption_path.display());
                self.undo.push(vec![e]);
                self.mark_changed();
            }
            Ok(None) => {}
            Err(e) => {
                self.error = Some(format!(
                    "Could not save {}: {e}. Your text is still in the editor; check the folder is writable.",
                    l.scan.entries[i].caption_path.display()
                ));
            }
        }
    }

    /// Reverts the newest caption edit (one image or one bulk operation).
    pub fn undo_last(&mut self, settings: &DatasetSettings) {
        self.save_editor(settings);
        let (Some(batch), Some(l)) = (self.undo.pop(), &mut self.loaded) else {
            return;
        };
        match edit::undo(Arc::make_mut(&mut l.scan), &batch) {
            Ok(()) => self.status = format!("Undid the change of {} caption(s).", batch.len()),
            Err(e) => self.error = Some(format!("Undo failed: {e}")),
        }
        self.reload_editor_if(&batch);
        self.mark_changed();
    }

    /// Draws the workspace.
    pub fn ui(&mut self, ui: &mut Ui, settings: &mut DatasetSettings) {
        self.folder_bar(ui, settings);
        if let Some(err) = self.error.clone() {
            ui.horizontal_wrapped(|ui| {
                ui.colored_label(ui.visuals().error_fg_color, format!("Error: {err}"));
                if ui.small_button("Dismiss").clicked() {
                    self.error = None;
                }
            });
        }
        self.summary(ui);
        ui.separator();
        egui::Panel::right("dataset_tools")
            .default_size(400.0)
            .min_size(320.0)
            .show(ui, |ui| {
                ui.horizontal_wrapped(|ui| {
                    for t in ToolTab::ALL {
                        ui.selectable_value(&mut self.tab, t, t.label());
                    }
                });
                ui.separator();
                match self.tab {
                    ToolTab::Image => self.image_tab(ui, settings),
                    other => self.tool_tab(ui, settings, other),
                }
            });
        egui::CentralPanel::default().show(ui, |ui| {
            self.filter_bar(ui);
            self.grid(ui, settings);
        });
    }

    fn folder_bar(&mut self, ui: &mut Ui, settings: &mut DatasetSettings) {
        ui.horizontal(|ui| {
            let field = labeled_text(ui, "Dataset folder", &mut self.path_input, 420.0);
            let entered = field.lost_focus() && ui.input(|i| i.key_pressed(egui::Key::Enter));
            if ui.button("Open").clicked() || entered {
                let path = PathBuf::from(self.path_input.trim());
                self.open(ui.ctx(), settings, path);
            }
            if ui.button("Browse…").clicked() {
                self.pick(Pick::DatasetFolder);
            }
            if let Some(path) = recent_menu(ui, "Recent", &settings.recent) {
                self.open(ui.ctx(), settings, path);
            }
            if ui
                .add_enabled(self.loaded.is_some(), egui::Button::new("Rescan"))
                .clicked()
            {
                self.rescan(ui.ctx(), settings);
            }
            self.caption_extension(ui, settings);
            if self.is_busy() {
                ui.spinner();
            }
        });
    }

    /// The caption file extension of this dataset (`.txt`, `.caption` …), kept in its project file.
    fn caption_extension(&mut self, ui: &mut Ui, settings: &DatasetSettings) {
        let Some(l) = &self.loaded else { return };
        let current = l.scan.project.caption_ext();
        let mut chosen = None;
        egui::ComboBox::from_label("Captions")
            .selected_text(current.as_str())
            .show_ui(ui, |ui| {
                for ext in [".txt", ".caption"] {
                    if ui.selectable_label(current == ext, ext).clicked() && current != ext {
                        chosen = Some(ext);
                    }
                }
            });
        let Some(ext) = chosen else { return };
        let mut project = l.scan.project.clone();
        project.caption_extension = ext.to_owned();
        match project.save(&l.scan.root) {
            Ok(()) => self.rescan(ui.ctx(), settings),
            Err(e) => {
                self.error = Some(format!(
                    "Could not save {}: {e}",
                    crate::dataset::PROJECT_FILE
                ))
            }
        }
    }

    fn summary(&self, ui: &mut Ui) {
        let (Some(l), Some(d)) = (&self.loaded, &self.derived) else {
            if self.loaded.is_none() && self.loading.is_none() {
                ui.label("Open a folder of images with .txt captions (kohya `10_name` folders are understood).");
            }
            return;
        };
        let r = &d.report;
        let problems = d
            .severity
            .iter()
            .filter(|s| s.is_some_and(|s| s >= Severity::Warning))
            .count();
        ui.label(format!(
            "{} ({} readable) · {} captioned · {} with problems · {} · {} images/epoch · {} steps/epoch at batch {}",
            count(l.scan.entries.len() as u64, "image"),
            r.images,
            r.with_caption,
            problems,
            count(r.buckets.len() as u64, "bucket"),
            r.images_per_epoch,
            r.steps_per_epoch,
            r.batch_size
        ));
    }

    fn filter_bar(&mut self, ui: &mut Ui) {
        ui.horizontal(|ui| {
            let mut changed = labeled_text(ui, "Filter", &mut self.filter.text, 160.0).changed();
            changed |= labeled_text(ui, "Tag", &mut self.filter.tag, 110.0).changed();
            changed |= ui
                .checkbox(&mut self.filter.no_caption, "No caption")
                .changed();
            changed |= ui.checkbox(&mut self.filter.problems, "Problems").changed();
            if changed {
                self.filter_dirty = true;
            }
            if let Some(l) = &self.loaded {
                ui.label(format!(
                    "{} of {}",
                    self.filtered.len(),
                    l.scan.entries.len()
                ));
            }
        });
    }

    fn grid(&mut self, ui: &mut Ui, settings: &DatasetSettings) {
        let Some(l) = &self.loaded else { return };
        let cell = vec2(THUMB_SIDE + 8.0, THUMB_SIDE + 24.0);
        let cols = ((ui.available_width() / (cell.x + ui.spacing().item_spacing.x)).floor()
            as usize)
            .max(1);
        let rows = self.filtered.len().div_ceil(cols);
        let mut clicked = None;
        let mut wanted = Vec::new();
        let severity = self.derived.as_ref().map(|d| &d.severity);
        let thumbs = &mut self.thumbs;
        egui::ScrollArea::vertical()
            .auto_shrink(false)
            .show_rows(ui, cell.y, rows, |ui, range| {
                // Ask for the rows on screen first, then one row either side, so scrolling finds them ready.
                let ahead = range.start.saturating_sub(1)..(range.end + 1).min(rows);
                for row in range.clone() {
                    ui.horizontal(|ui| {
                        for &i in self.filtered.iter().skip(row * cols).take(cols) {
                            let entry = &l.scan.entries[i];
                            let sev = severity.and_then(|s| s.get(i).copied().flatten());
                            let name = entry.path.file_name().unwrap_or_default().to_string_lossy();
                            if thumb_cell(
                                ui,
                                cell,
                                thumbs.get(&entry.path),
                                &name,
                                self.selected == Some(i),
                                sev,
                            )
                            .clicked()
                            {
                                clicked = Some(i);
                            }
                        }
                    });
                }
                for row in range.chain(ahead) {
                    for &i in self.filtered.iter().skip(row * cols).take(cols) {
                        wanted.push(l.scan.entries[i].path.clone());
                    }
                }
            });
        self.thumbs.want(wanted);
        if let Some(i) = clicked {
            self.select(i, settings);
            self.tab = ToolTab::Image;
        }
        self.arrow_keys(ui, settings, cols);
    }

    /// Arrow keys move through the filtered images while no text field has focus: left/right by one,
    /// up/down by a row of `cols`.
    fn arrow_keys(&mut self, ui: &Ui, settings: &DatasetSettings, cols: usize) {
        if ui.memory(|m| m.focused().is_some()) || self.filtered.is_empty() {
            return;
        }
        let step = ui.input(|i| {
            let pressed = |k| i.key_pressed(k) as isize;
            pressed(egui::Key::ArrowRight) - pressed(egui::Key::ArrowLeft)
                + cols as isize * (pressed(egui::Key::ArrowDown) - pressed(egui::Key::ArrowUp))
        });
        if step == 0 {
            return;
        }
        let pos = self
            .selected
            .and_then(|s| self.filtered.iter().position(|&i| i == s));
        let next = match pos {
            Some(p) => (p as isize + step).clamp(0, self.filtered.len() as isize - 1) as usize,
            None => 0,
        };
        self.select(self.filtered[next], settings);
    }

    fn image_tab(&mut self, ui: &mut Ui, settings: &DatasetSettings) {
        let (Some(i), Some(l)) = (self.selected, &self.loaded) else {
            ui.label("Select an image in the grid to see it large and edit its caption.");
            return;
        };
        let entry = &l.scan.entries[i];
        let path = entry.path.clone();
        self.preview.want([path.clone()]);
        let side = ui.available_width().min(420.0);
        match self.preview.get(&path) {
            Slot::Ready(tex) => {
                let size = tex.size_vec2();
                let scale = (side / size.x).min(side / size.y);
                ui.image((tex.id(), size * scale));
            }
            Slot::Failed(e) => {
                ui.colored_label(
                    ui.visuals().error_fg_color,
                    format!("Cannot show this image: {e}"),
                );
            }
            Slot::Loading => {
                ui.add_sized([side, side * 0.6], egui::Spinner::new());
            }
        }
        ui.label(egui::RichText::new(&entry.rel).strong());
        let size = match &l.inspections[i] {
            Some(Ok(info)) => format!(
                "{} × {} px · {:.1} KB",
                info.width,
                info.height,
                info.file_size as f64 / 1024.0
            ),
            Some(Err(_)) => "unreadable".into(),
            None => "checking …".into(),
        };
        ui.label(format!(
            "{size} · folder {} ×{} repeats",
            entry.folder,
            l.scan.repeats_of(&entry.folder)
        ));
        let caption_file = entry
            .caption_path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let not_utf8 = entry.caption.status == CaptionStatus::NotUtf8;
        for f in self.findings_of(i, settings) {
            let color = match f.severity {
                Severity::Error => ui.visuals().error_fg_color,
                Severity::Warning => ui.visuals().warn_fg_color,
                Severity::Info => ui.visuals().weak_text_color(),
            };
            ui.colored_label(color, f.message);
        }
        ui.add_space(4.0);
        let label = ui.label(format!("Caption ({caption_file})"));
        if not_utf8 {
            ui.colored_label(
                ui.visuals().warn_fg_color,
                "Not UTF-8: editing saves it as UTF-8 text.",
            );
        }
        let resp = ui
            .add(
                egui::TextEdit::multiline(&mut self.editor.text)
                    .desired_rows(5)
                    .desired_width(f32::INFINITY),
            )
            .labelled_by(label.id);
        if resp.changed() {
            self.editor.edited_at = Some(Instant::now());
        }
        if resp.lost_focus() && self.editor.edited_at.is_some() {
            self.save_editor(settings);
        }
        ui.horizontal(|ui| {
            if ui.button("Save caption").clicked() {
                self.editor.edited_at.get_or_insert_with(Instant::now);
                self.save_editor(settings);
            }
            if ui
                .add_enabled(!self.undo.is_empty(), egui::Button::new("Undo"))
                .clicked()
            {
                self.undo_last(settings);
            }
            if self.editor.edited_at.is_some() {
                ui.weak("editing …");
            }
        });
    }
}

fn new_thumb_cache(ctx: &egui::Context) -> TextureCache {
    TextureCache::new(
        ctx,
        "thumb",
        crate::dataset::validate::default_threads(),
        THUMB_SIDE as u32,
        THUMB_CAPACITY,
    )
}

fn new_preview_cache(ctx: &egui::Context) -> TextureCache {
    TextureCache::new(ctx, "preview", 1, 1024, 4)
}

/// One grid cell: the thumbnail (or its state), a problem marker and the file name; a button to assistive tech.
fn thumb_cell(
    ui: &mut Ui,
    size: egui::Vec2,
    slot: Slot<'_>,
    name: &str,
    selected: bool,
    sev: Option<Severity>,
) -> egui::Response {
    let (rect, resp) = ui.allocate_exact_size(size, Sense::click());
    resp.widget_info(|| egui::WidgetInfo::selected(egui::Role::Button, true, selected, name));
    if !ui.is_rect_visible(rect) {
        return resp;
    }
    let visuals = ui.visuals();
    let painter = ui.painter();
    if selected {
        painter.rect_filled(rect, 4.0, visuals.selection.bg_fill);
    } else if resp.hovered() {
        painter.rect_filled(rect, 4.0, visuals.widgets.hovered.weak_bg_fill);
    }
    let image_rect = Rect::from_min_size(rect.min + vec2(4.0, 4.0), vec2(THUMB_SIDE, THUMB_SIDE));
    match slot {
        Slot::Ready(tex) => {
            let s = tex.size_vec2();
            let scale = (THUMB_SIDE / s.x).min(THUMB_SIDE / s.y);
            let r = Rect::from_center_size(image_rect.center(), s * scale);
            painter.image(
                tex.id(),
                r,
                Rect::from_min_max([0.0, 0.0].into(), [1.0, 1.0].into()),
                Color32::WHITE,
            );
        }
        Slot::Failed(_) => {
            painter.text(
                image_rect.center(),
                Align2::CENTER_CENTER,
                "unreadable",
                FontId::proportional(12.0),
                visuals.error_fg_color,
            );
        }
        Slot::Loading => {
            painter.rect_filled(image_rect.shrink(8.0), 2.0, visuals.faint_bg_color);
        }
    }
    if let Some(sev) = sev.filter(|s| *s >= Severity::Warning) {
        let color = if sev == Severity::Error {
            visuals.error_fg_color
        } else {
            visuals.warn_fg_color
        };
        painter.circle_filled(image_rect.right_top() + vec2(-7.0, 7.0), 5.0, color);
    }
    let text_pos = egui::pos2(rect.center().x, rect.bottom() - 10.0);
    let mut label = name.to_owned();
    if label.chars().count() > 18 {
        label = label.chars().take(16).collect::<String>() + "…";
    }
    painter.text(
        text_pos,
        Align2::CENTER_CENTER,
        label,
        FontId::proportional(11.0),
        visuals.text_color(),
    );
    resp.on_hover_text(name)
}

/// The report, per-image severity, duplicates and tag counts of a dataset (run on a worker thread).
fn derive(
    scan: &Scan,
    inspections: &[Inspection],
    buckets_cfg: &BucketConfig,
    batch: u32,
) -> Derived {
    let buckets = Buckets::new(buckets_cfg);
    let duplicates = duplicate_map(&scan.entries, inspections);
    let severity = (scan.entries.iter().zip(inspections).zip(&duplicates))
        .map(|((e, ins), dup)| {
            let dup_rel = dup.map(|j| scan.entries[j].rel.as_str());
            findings(e, ins, &buckets, dup_rel)
                .iter()
                .map(|f| f.severity)
                .max()
        })
        .collect();
    let report = Report::build(scan, inspections, buckets_cfg, batch);
    let tags = caption::tag_counts(scan.entries.iter().map(|e| e.caption.text.as_str()));
    Derived {
        report,
        severity,
        duplicates,
        tags,
    }
}
