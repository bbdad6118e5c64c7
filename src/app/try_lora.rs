//! "Try the LoRA" in the Samples workspace: a prompt drawn with any saved LoRA at a chosen weight, seed, sampler,
//! steps and cfg, beside the same prompt and seed without the LoRA. It runs on a worker thread through the
//! engine's `pipeline::draw` and reports through a channel, so the UI never waits.
//!
//! Device: while a run trains, the try runs on the CPU. The trainer owns the GPU and sizes its memory to the
//! card; a second model there could make the run fail out of memory, and queueing the try behind the run would
//! keep the user waiting for the whole run. On the CPU it is slower but can never hurt the run. With no run
//! under way it takes the best device.

use super::run_view::texture;
use super::widgets::labeled_text;
use super::workers::{Workers, file_dialog};
use crate::sample::Sampler;
use crate::sample::pipeline::{ModelChoice, Request, draw};
use crate::train::config::ModelConfig;
use egui::{RichText, Ui};
use std::path::PathBuf;

const SAMPLERS: [(Sampler, &str); 3] = [
    (Sampler::Euler, "Euler"),
    (Sampler::EulerAncestral, "Euler a"),
    (Sampler::Ddim, "DDIM"),
];

/// The settings of a try (kept between tries).
#[derive(Clone, Debug, PartialEq)]
pub struct TrySettings {
    pub lora: PathBuf,
    pub weight: f64,
    pub prompt: String,
    pub negative: String,
    pub seed: u64,
    pub sampler: Sampler,
    pub steps: u32,
    pub cfg: f64,
    pub width: u32,
    pub height: u32,
}

impl Default for TrySettings {
    fn default() -> Self {
        TrySettings {
            lora: PathBuf::new(),
            weight: 1.0,
            prompt: String::new(),
            negative: String::new(),
            seed: 1,
            sampler: Sampler::Euler,
            steps: 20,
            cfg: 7.0,
            width: 512,
            height: 512,
        }
    }
}

impl TrySettings {
    fn request(&self) -> Request {
        Request {
            prompt: self.prompt.clone(),
            negative: self.negative.clone(),
            seed: self.seed,
            steps: self.steps as usize,
            cfg: self.cfg,
            sampler: self.sampler,
            width: self.width as usize,
            height: self.height as usize,
            latents: None,
        }
    }
}

/// The model a run trained on, as the sampler takes it.
pub fn model_choice(m: &ModelConfig) -> ModelChoice {
    use crate::train::config::Prediction as P;
    ModelChoice {
        checkpoint: m.checkpoint.clone(),
        vae: m.vae.clone(),
        clip_skip: m.clip_skip.max(1) as usize,
        prediction: match m.prediction {
            P::Auto => None,
            P::Epsilon => Some(crate::sample::Prediction::Epsilon),
            P::V => Some(crate::sample::Prediction::V),
        },
    }
}

/// What the worker draws without the LoRA, so another weight or LoRA for the same prompt and seed reuses it.
#[derive(Clone, Debug, PartialEq)]
struct BaseKey {
    model: ModelChoice,
    settings: TrySettings,
}

impl BaseKey {
    fn new(model: &ModelChoice, s: &TrySettings) -> Self {
        let settings = TrySettings {
            lora: PathBuf::new(),
            weight: 0.0,
            ..s.clone()
        };
        BaseKey {
            model: model.clone(),
            settings,
        }
    }
}

enum TryEvent {
    Progress {
        generation: u64,
        what: &'static str,
        done: usize,
        total: usize,
    },
    Drawn {
        generation: u64,
        without_lora: bool,
        result: Result<image::RgbImage, String>,
        warnings: Vec<String>,
    },
    Picked(Option<PathBuf>),
}

/// A finished try: the images and the settings they were made with.
pub struct TryResult {
    pub with_lora: Option<egui::TextureHandle>,
    pub without_lora: Option<egui::TextureHandle>,
    pub settings: TrySettings,
    pub device: String,
}

pub struct TryLora {
    workers: Workers<TryEvent>,
    pub settings: TrySettings,
    generation: u64,
    /// (what, done, total) of the try under way.
    busy: Option<(&'static str, usize, usize)>,
    pub result: Option<TryResult>,
    base: Option<(BaseKey, egui::TextureHandle)>,
    /// The key of the image without the LoRA being drawn.
    base_key_pending: Option<BaseKey>,
    pub error: Option<String>,
    warnings: Vec<String>,
}

impl TryLora {
    pub fn new(ctx: &egui::Context) -> Self {
        TryLora {
            workers: Workers::new(ctx),
            settings: TrySettings::default(),
            generation: 0,
            busy: None,
            result: None,
            base: None,
            base_key_pending: None,
            error: None,
            warnings: Vec::new(),
        }
    }

    pub fn is_busy(&self) -> bool {
        self.busy.is_some()
    }

    /// Starts drawing the current settings: without the LoRA first (unless the last try had the same prompt,
    /// seed and settings), then with it.
    pub fn start(&mut self, model: ModelChoice, training: bool) {
        let s = self.settings.clone();
        if s.lora.as_os_str().is_empty() || !s.lora.is_file() {
            self.error = Some(format!(
                "Choose a LoRA file to try: {} is not a file.",
                if s.lora.as_os_str().is_empty() {
                    "the LoRA field is empty, it".to_owned()
                } else {
                    s.lora.display().to_string()
                }
            ));
            return;
        }
        if s.prompt.trim().is_empty() {
            self.error = Some("Type a prompt to draw.".into());
            return;
        }
        self.generation += 1;
        let generation = self.generation;
        self.error = None;
        self.warnings.clear();
        self.busy = Some(("Loading the model", 0, 0));
        let key = BaseKey::new(&model, &s);
        let reuse = self
            .base
            .as_ref()
            .filter(|(k, _)| *k == key)
            .map(|(_, t)| t.clone());
        let device = if training {
            candle_core::Device::Cpu
        } else {
            crate::device::best().0
        };
        let draw_base = reuse.is_none();
        self.base_key_pending = draw_base.then_some(key);
        self.result = Some(TryResult {
            with_lora: None,
            without_lora: reuse,
            settings: s.clone(),
            device: crate::device::describe(&device),
        });
        self.workers.spawn("try-lora", move |report| {
            let req = s.request();
            let mut jobs = Vec::new();
            if draw_base {
                jobs.push((true, Vec::new()));
            }
            jobs.push((false, vec![(s.lora.clone(), s.weight)]));
            for (without_lora, loras) in jobs {
                let what = if without_lora {
                    "Drawing without the LoRA"
                } else {
                    "Drawing with the LoRA"
                };
                let drawn = draw(&model, &loras, &req, &device, |done, total| {
                    report.send(TryEvent::Progress {
                        generation,
                        what,
                        done,
                        total,
                    })
                });
                let (result, warnings) = match drawn {
                    Ok(d) => (Ok(d.image), d.warnings),
                    Err(e) => (Err(e), Vec::new()),
                };
                let failed = result.is_err();
                report.send(TryEvent::Drawn {
                    generation,
                    without_lora,
                    result,
                    warnings,
                });
                if failed {
                    return;
                }
            }
        });
    }

    pub fn poll(&mut self, ctx: &egui::Context) {
        let events: Vec<TryEvent> = self.workers.events().collect();
        for e in events {
            match e {
                TryEvent::Picked(Some(path)) => self.settings.lora = path,
                TryEvent::Picked(None) => {}
                TryEvent::Progress {
                    generation,
                    what,
                    done,
                    total,
                } if generation == self.generation => self.busy = Some((what, done, total)),
                TryEvent::Drawn {
                    generation,
                    without_lora,
                    result,
                    warnings,
                } if generation == self.generation => {
                    self.warnings.extend(warnings);
                    match result {
                        Ok(image) => {
                            let name = format!("try-{generation}-{without_lora}");
                            let t = texture(ctx, name, &image);
                            if let Some(r) = &mut self.result {
                                if without_lora {
                                    r.without_lora = Some(t.clone());
                                    if let Some(key) = self.base_key_pending.take() {
                                        self.base = Some((key, t));
                                    }
                                } else {
                                    r.with_lora = Some(t);
                                    self.busy = None;
                                }
                            }
                        }
                        Err(e) => {
                            self.busy = None;
                            self.error = Some(e);
                        }
                    }
                }
                _ => {}
            }
        }
    }

    /// The panel: the LoRA (picked from `loras`, typed or browsed), the settings, Draw, and the two images.
    pub fn ui(
        &mut self,
        ui: &mut Ui,
        loras: &[(String, PathBuf)],
        model: Option<ModelChoice>,
        training: bool,
    ) {
        self.poll(ui.ctx());
        ui.heading("Try the LoRA");
        ui.label("Draw any prompt with a saved LoRA, beside the same seed without it.");
        ui.horizontal(|ui| {
            let current = loras
                .iter()
                .find(|(_, p)| *p == self.settings.lora)
                .map_or("Choose…", |(l, _)| l.as_str());
            egui::ComboBox::from_label("Saved LoRA")
                .selected_text(current)
                .show_ui(ui, |ui| {
                    for (label, path) in loras.iter().rev() {
                        ui.selectable_value(&mut self.settings.lora, path.clone(), label)
                            .on_hover_text(path.display().to_string());
                    }
                });
        });
        ui.horizontal(|ui| {
            let mut text = self.settings.lora.to_string_lossy().into_owned();
            if labeled_text(ui, "LoRA file", &mut text, 200.0).changed() {
                self.settings.lora = PathBuf::from(text);
            }
            if ui.button("Browse…").clicked() {
                let start = self.settings.lora.parent().map(PathBuf::from);
                self.workers.spawn("lora-dialog", move |report| {
                    let path = file_dialog(start)
                        .add_filter("Safetensors", &["safetensors"])
                        .pick_file();
                    report.send(TryEvent::Picked(path));
                });
            }
        });
        self.form(ui);
        let model = model.filter(|m| !m.checkpoint.as_os_str().is_empty());
        ui.horizontal(|ui| {
            let can = model.is_some() && !self.is_busy();
            if ui
                .add_enabled(can, egui::Button::new("Draw"))
                .on_hover_text("Draw the prompt with the LoRA and without it (same seed).")
                .clicked()
                && let Some(m) = model.clone()
            {
                self.start(m, training);
            }
            if let Some((what, done, total)) = self.busy {
                ui.spinner();
                ui.label(if total > 0 {
                    format!("{what}: step {done}/{total}")
                } else {
                    format!("{what}…")
                });
            }
        });
        if model.is_none() {
            ui.weak("Choose the base checkpoint in the Training workspace first.");
        } else if training {
            ui.weak("A run is training: tries are drawn on the CPU so they cannot take the run's device memory (slower).");
        }
        if let Some(e) = &self.error {
            ui.colored_label(ui.visuals().error_fg_color, e);
        }
        for w in &self.warnings {
            ui.colored_label(ui.visuals().warn_fg_color, w);
        }
        self.result_ui(ui);
    }

    fn form(&mut self, ui: &mut Ui) {
        let s = &mut self.settings;
        let l = ui.label("Try prompt");
        ui.add(
            egui::TextEdit::multiline(&mut s.prompt)
                .desired_rows(2)
                .desired_width(f32::INFINITY),
        )
        .labelled_by(l.id);
        let l = ui.label("Try negative prompt");
        ui.add(egui::TextEdit::singleline(&mut s.negative).desired_width(f32::INFINITY))
            .labelled_by(l.id);
        egui::Grid::new("try-form").num_columns(2).show(ui, |ui| {
            let drag = |ui: &mut Ui, label: &str, tip: &str, w: egui::DragValue<'_>| {
                let l = ui.label(label).on_hover_text(tip);
                ui.add(w).labelled_by(l.id).on_hover_text(tip);
                ui.end_row();
            };
            drag(
                ui,
                "LoRA weight",
                "How strongly the LoRA is applied (1 = as trained, 0 = not at all).",
                egui::DragValue::new(&mut s.weight)
                    .range(-2.0..=2.0)
                    .speed(0.01),
            );
            drag(
                ui,
                "Seed",
                "The same seed gives the same starting noise.",
                egui::DragValue::new(&mut s.seed),
            );
            let l = ui.label("Sampler");
            let current = SAMPLERS
                .iter()
                .find(|(v, _)| *v == s.sampler)
                .map_or("", |c| c.1);
            egui::ComboBox::from_id_salt("try-sampler")
                .selected_text(current)
                .show_ui(ui, |ui| {
                    for (v, name) in SAMPLERS {
                        ui.selectable_value(&mut s.sampler, v, name);
                    }
                })
                .response
                .labelled_by(l.id);
            ui.end_row();
            drag(
                ui,
                "Try steps",
                "Sampling steps.",
                egui::DragValue::new(&mut s.steps).range(1..=150),
            );
            drag(
                ui,
                "CFG",
                "Classifier-free guidance: how closely the image follows the prompt.",
                egui::DragValue::new(&mut s.cfg)
                    .range(1.0..=30.0)
                    .speed(0.1),
            );
            drag(
                ui,
                "Try width",
                "Image width in pixels (a multiple of 8).",
                egui::DragValue::new(&mut s.width).range(32..=2048).speed(8),
            );
            drag(
                ui,
                "Try height",
                "Image height in pixels (a multiple of 8).",
                egui::DragValue::new(&mut s.height)
                    .range(32..=2048)
                    .speed(8),
            );
        });
    }

    fn result_ui(&self, ui: &mut Ui) {
        let Some(r) = &self.result else { return };
        let side = ((ui.available_width() - 12.0) / 2.0).clamp(64.0, 384.0);
        ui.horizontal(|ui| {
            for (label, t) in [
                ("Without LoRA", &r.without_lora),
                ("With LoRA", &r.with_lora),
            ] {
                ui.vertical(|ui| {
                    ui.label(RichText::new(label).strong());
                    match t {
                        Some(t) => {
                            let size = t.size_vec2();
                            let scale = (side / size.x).min(side / size.y);
                            let resp = ui.image((t.id(), size * scale));
                            super::widgets::name_widget(
                                &resp,
                                egui::Role::Image,
                                format!("Try result {}", label.to_lowercase()),
                            );
                        }
                        None => {
                            ui.allocate_exact_size(egui::vec2(side, side), egui::Sense::hover());
                        }
                    }
                });
            }
        });
        let s = &r.settings;
        ui.weak(format!(
            "{} at weight {} · seed {} · {} {} steps · cfg {} · {}×{} · on {}",
            s.lora
                .file_name()
                .map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
            s.weight,
            s.seed,
            s.sampler,
            s.steps,
            s.cfg,
            s.width,
            s.height,
            r.device
        ));
    }
}
