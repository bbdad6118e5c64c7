//! From kohya settings to our keys. Each group of settings has its function (the optimizer's are in
//! `optimizer.rs`); what none of them reads is looked up in `tables.rs`.

use super::tables::{LYCORIS_OPTIONS, NO_EFFECT, NO_EFFECT_PREFIXES, inert, unsupported};
use super::value::{KeyValues, Num, enum_value, is_default, is_empty, num_of};
use super::{Format, Imported, Skipped, prompts};
use crate::fsutil::admit;
use crate::schema::Number;
use crate::train::config::{ConfigError, Precision, SaveDtype, Targets};
use crate::train::lr::LrSchedule;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

pub(super) fn map(
    file: &str,
    format: Format,
    settings: Vec<(String, Value)>,
) -> Result<Imported, ConfigError> {
    let mut m = Mapper {
        file: file.to_owned(),
        gui: format == Format::GuiJson,
        // Later keys win, as in sd-scripts (a key in two TOML tables).
        values: settings.into_iter().collect(),
        seen: BTreeSet::new(),
        layer: toml::Table::new(),
        skipped: Vec::new(),
    };
    if !MARKERS.iter().any(|k| m.values.contains_key(*k)) {
        return Err(ConfigError(format!(
            "{file} has no kohya training settings (none of {}): choose the .json the kohya_ss GUI saves or \
             an sd-scripts --config_file .toml",
            MARKERS.join(", ")
        )));
    }
    m.model()?;
    m.dataset()?;
    m.network()?;
    m.optimizer()?;
    m.learning_rates()?;
    let steps = m.training()?;
    m.schedule(steps)?;
    m.saving()?;
    m.sampling()?;
    m.rest();
    m.skipped.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(Imported {
        format,
        layer: m.layer,
        skipped: m.skipped,
    })
}

/// Keys one of which every kohya training config has.
const MARKERS: [&str; 8] = [
    "pretrained_model_name_or_path",
    "train_data_dir",
    "network_dim",
    "learning_rate",
    "optimizer",
    "optimizer_type",
    "output_name",
    "max_train_steps",
];

/// The file's settings and what became of them so far.
pub(super) struct Mapper {
    /// The file, for messages.
    pub(super) file: String,
    /// Written by the kohya_ss GUI (else by hand or for sd-scripts).
    pub(super) gui: bool,
    pub(super) values: BTreeMap<String, Value>,
    /// Keys a mapping function has read (applied or explained).
    pub(super) seen: BTreeSet<String>,
    pub(super) layer: toml::Table,
    pub(super) skipped: Vec<Skipped>,
}

impl Mapper {
    fn model(&mut self) -> Result<(), ConfigError> {
        let key = "pretrained_model_name_or_path";
        if let Some(p) = self.text(key)? {
            if looks_like_hub_name(&p) {
                self.skip(
                    key,
                    "a Hugging Face model name: lora-studio reads local files; download the model and choose \
                     its .safetensors file (or diffusers folder) as the base checkpoint",
                );
            } else {
                self.set("model.checkpoint", toml::Value::String(p));
            }
        }
        self.put_text("vae", "model.vae")?;
        if self.flag("v_parameterization")? == Some(true) {
            self.set("model.prediction", toml::Value::String("v".into()));
        }
        self.put_whole("clip_skip", "model.clip_skip")?;
        for (flag, family) in [
            ("sdxl", "SDXL"),
            ("flux1_checkbox", "FLUX.1"),
            ("sd3_checkbox", "SD3"),
            ("hunyuan_image_checkbox", "HunyuanImage"),
            ("lumina_checkbox", "Lumina"),
            ("anima_checkbox", "Anima"),
        ] {
            if self.flag(flag)? == Some(true) {
                self.skip(
                    flag,
                    format!(
                        "{family} is not supported yet: lora-studio trains SD 1.x and 2.x (the model check \
                         refuses other checkpoints)"
                    ),
                );
            }
        }
        Ok(())
    }

    fn dataset(&mut self) -> Result<(), ConfigError> {
        self.put_text("train_data_dir", "dataset.folder")?;
        self.put_text("reg_data_dir", "dataset.regularization_folder")?;
        self.put_real("prior_loss_weight", "dataset.prior_loss_weight")?;
        self.put_text("caption_extension", "dataset.caption_extension")?;
        self.resolution()?;
        self.put_flag("enable_bucket", "dataset.bucketing")?;
        self.put_whole("min_bucket_reso", "dataset.min_bucket_side")?;
        self.put_whole("max_bucket_reso", "dataset.max_bucket_side")?;
        self.put_whole("bucket_reso_steps", "dataset.bucket_step")?;
        if self.flag("bucket_no_upscale")? == Some(true) {
            self.skip(
                "bucket_no_upscale",
                "images always fill a bucket of about resolution² pixels here (smaller ones are upscaled; the \
                 dataset check lists them)",
            );
        }
        self.put_flag("flip_aug", "dataset.flip")?;
        self.put_flag("shuffle_caption", "dataset.shuffle_caption")?;
        self.put_whole("keep_tokens", "dataset.keep_tokens")?;
        self.put_real("caption_dropout_rate", "dataset.caption_dropout")?;
        self.put_real("caption_tag_dropout_rate", "dataset.tag_dropout")?;
        Ok(())
    }

    /// `resolution` (sd-scripts) or `max_resolution` (GUI): `512`, `"512"`, `"512,768"` or `[512, 768]`. Ours is
    /// one square side: a non-square size becomes the side of the same pixel count.
    fn resolution(&mut self) -> Result<(), ConfigError> {
        let key = if self.values.contains_key("resolution") {
            "resolution"
        } else {
            "max_resolution"
        };
        self.seen.insert("max_resolution".into());
        let Some(v) = self.get(key) else {
            return Ok(());
        };
        let parts: Vec<Value> = match &v {
            Value::String(s) => s.split(',').map(|p| Value::String(p.into())).collect(),
            Value::Array(a) => a.clone(),
            other => vec![other.clone()],
        };
        let must = "a size in pixels: 512, \"512\" or \"512,768\"";
        let sides: Option<Vec<u64>> = parts
            .iter()
            .map(|p| match num_of(p) {
                Some(Num::Int(i)) => u64::try_from(i).ok().filter(|&s| s <= 1 << 20),
                _ => None,
            })
            .collect();
        let (w, h) = match sides.as_deref() {
            Some(&[s]) => (s, s),
            Some(&[w, h]) => (w, h),
            _ => return Err(self.refuse(key, &v, must)),
        };
        let exact = ((w * h) as f64).sqrt();
        let side = ((exact / 8.0).round() as u64 * 8).max(8);
        if self.set_number(key, "dataset.resolution", Number::Whole(side)) && side != w.max(h) {
            let why = if w == h {
                format!("not a multiple of 8: imported as {side}")
            } else {
                format!(
                    "not square: lora-studio trains buckets of about resolution² pixels from one side; imported \
                     as {side} (about the same number of pixels)"
                )
            };
            self.skip(key, why);
        }
        Ok(())
    }

    fn network(&mut self) -> Result<(), ConfigError> {
        let rank = self.put_whole("network_dim", "network.rank")?;
        match self.real("network_alpha")? {
            Some(a) => {
                self.set_number("network_alpha", "network.alpha", Number::Real(a));
            }
            // sd-scripts' alpha is 1 when only the rank is given; the rank came with it.
            None if rank.is_some() && !self.gui => {
                self.set("network.alpha", toml::Value::Float(1.0));
            }
            None => {}
        }
        self.put_real("network_dropout", "network.dropout")?;
        self.put_text("network_weights", "network.init_from")?;
        self.put_text("lora_network_weights", "network.init_from")?;
        if self.flag("dim_from_weights")? == Some(true) {
            self.skip(
                "dim_from_weights",
                "the rank is `network.rank`, which must match the LoRA in `network.init_from`",
            );
        }
        let (convs, args) = if self.gui {
            (self.gui_network_type()?, Vec::new())
        } else {
            self.scripts_network()?
        };
        let Some(convs) = convs else { return Ok(()) };
        let conv_dim = if convs {
            self.conv_setting("conv_dim", &args)?
        } else {
            None
        };
        let mut targets = Targets::AttentionAndFeedForward;
        if let Some(dim) = conv_dim.filter(|&d| d != 0) {
            let alpha = self.conv_setting_real("conv_alpha", &args)?.unwrap_or(1.0);
            if self
                .set_whole("conv_dim", "network.conv_rank", dim)
                .is_some()
                && self.set_number("conv_alpha", "network.conv_alpha", Number::Real(alpha))
            {
                targets = Targets::All;
            }
        }
        self.set("network.targets", enum_value(targets));
        for (k, v) in args {
            if matches!(k.as_str(), "conv_dim" | "conv_alpha" | "algo" | "preset") {
                continue;
            }
            let value = Value::String(v.clone());
            if is_empty(&value) || inert(&k).is_some_and(|d| is_default(&value, d)) {
                continue;
            }
            let why = unsupported(&k).unwrap_or("not available in lora-studio");
            self.skip_value("network_args", format!("\"{k}={v}\""), why);
        }
        Ok(())
    }

    /// The GUI's `LoRA_type`: `Some(true)` for the types with conv adapters, `Some(false)` for the others,
    /// `None` when not given. Types lora-studio cannot train are listed and imported as a standard LoRA.
    fn gui_network_type(&mut self) -> Result<Option<bool>, ConfigError> {
        let Some(kind) = self.text("LoRA_type")? else {
            return Ok(None);
        };
        // kohya_ss passes conv_dim only to the LoCon types, and the LyCORIS options only to LyCORIS types.
        for key in ["conv_dim", "conv_alpha"] {
            self.seen.insert(key.into());
        }
        if kind != "LyCORIS/LoCon" {
            for key in LYCORIS_OPTIONS {
                self.seen.insert(key.into());
            }
        }
        Ok(Some(match kind.as_str() {
            "Standard" => false,
            "Kohya LoCon" | "LoCon" | "LyCORIS/LoCon" => true,
            _ => {
                self.skip("LoRA_type", not_trainable());
                false
            }
        }))
    }

    /// sd-scripts' `network_module` and `network_args` (`["conv_dim=8", "algo=locon", …]`).
    fn scripts_network(&mut self) -> Result<(Option<bool>, KeyValues), ConfigError> {
        let args = self.key_values("network_args")?;
        let module = self.text("network_module")?;
        let algo = args
            .iter()
            .find(|(k, _)| k == "algo")
            .map(|(_, v)| v.clone());
        let convs = match module.as_deref() {
            None if args.is_empty() => None,
            None | Some("networks.lora") => Some(true),
            Some("lycoris.kohya") => match algo.as_deref() {
                None | Some("lora" | "locon") => Some(true),
                Some(_) => {
                    self.skip_value(
                        "network_args",
                        format!("\"algo={}\"", algo.unwrap_or_default()),
                        not_trainable(),
                    );
                    Some(false)
                }
            },
            Some(_) => {
                self.skip("network_module", not_trainable());
                Some(false)
            }
        };
        Ok((convs, args))
    }

    /// `conv_dim` from `network_args` (sd-scripts) or its own key (GUI).
    fn conv_setting(
        &mut self,
        key: &str,
        args: &[(String, String)],
    ) -> Result<Option<i128>, ConfigError> {
        match args.iter().find(|(k, _)| k == key) {
            Some((_, v)) => {
                let value = Value::String(v.clone());
                match num_of(&value) {
                    Some(Num::Int(i)) => Ok(Some(i)),
                    _ => Err(self.refuse("network_args", &value, "conv_dim=N, a whole number")),
                }
            }
            None => self.whole(key),
        }
    }

    fn conv_setting_real(
        &mut self,
        key: &str,
        args: &[(String, String)],
    ) -> Result<Option<f64>, ConfigError> {
        match args.iter().find(|(k, _)| k == key) {
            Some((_, v)) => {
                let value = Value::String(v.clone());
                match num_of(&value) {
                    Some(Num::Int(i)) => Ok(Some(i as f64)),
                    Some(Num::Real(r)) if r.is_finite() => Ok(Some(r)),
                    _ => Err(self.refuse("network_args", &value, "conv_alpha=N, a finite number")),
                }
            }
            None => self.real(key),
        }
    }

    /// Batch, length, seed, precision and the loss options; returns the run's steps when the file sets them.
    fn training(&mut self) -> Result<Option<u64>, ConfigError> {
        self.put_whole("train_batch_size", "training.batch_size")?;
        let epochs = self.whole("max_train_epochs")?.filter(|&e| e != 0);
        let steps = self.whole("max_train_steps")?.filter(|&s| s != 0);
        let epoch = self.whole("epoch")?.filter(|_| self.gui);
        let mut total = None;
        if let Some(e) = epochs {
            if self
                .set_whole("max_train_epochs", "training.epochs", e)
                .is_some()
            {
                self.set("training.steps", toml::Value::Integer(0));
                if steps.is_some() {
                    self.skip("max_train_steps", "superseded by max_train_epochs");
                }
            }
        } else if let Some(s) = steps {
            total = self.set_whole("max_train_steps", "training.steps", s);
            if total.is_some() {
                self.set("training.epochs", toml::Value::Integer(0));
            }
        } else if let Some(e) = epoch.filter(|&e| e > 0) {
            // The GUI works the steps out from the epochs and the dataset when max_train_steps is 0.
            if self.set_whole("epoch", "training.epochs", e).is_some() {
                self.set("training.steps", toml::Value::Integer(0));
            }
        }
        if (epochs.is_some() || steps.is_some()) && epoch.is_some_and(|e| e != 1) {
            let by = if epochs.is_some() {
                "max_train_epochs"
            } else {
                "max_train_steps"
            };
            self.skip("epoch", format!("superseded by {by}"));
        }
        // kohya draws a random seed for 0.
        if let Some(seed) = self.whole("seed")?.filter(|&s| s != 0) {
            self.set_whole("seed", "training.seed", seed);
        }
        if let Some(p) = self.text("mixed_precision")? {
            match p.to_ascii_lowercase().as_str() {
                "bf16" => self.set("training.precision", enum_value(Precision::Bf16)),
                "fp16" => self.set("training.precision", enum_value(Precision::Fp16)),
                "no" | "fp32" | "float" => {
                    self.set("training.precision", enum_value(Precision::Fp32))
                }
                _ => self.skip(
                    "mixed_precision",
                    "lora-studio computes in bf16, fp16 or fp32",
                ),
            }
        }
        self.put_flag("gradient_checkpointing", "training.recompute")?;
        let offset_type = self.text("noise_offset_type")?;
        match offset_type.as_deref() {
            None => self.put_real("noise_offset", "training.noise_offset")?,
            Some(t) if t.eq_ignore_ascii_case("original") => {
                self.put_real("noise_offset", "training.noise_offset")?;
                // The GUI passes the multi-resolution settings only with its "Multires" type.
                self.seen.insert("multires_noise_iterations".into());
            }
            Some(_) => {
                self.skip(
                    "noise_offset_type",
                    "multi-resolution noise is not available; no noise offset is used",
                );
                for key in [
                    "noise_offset",
                    "adaptive_noise_scale",
                    "multires_noise_iterations",
                ] {
                    self.seen.insert(key.into());
                }
            }
        }
        self.put_real("min_snr_gamma", "training.min_snr_gamma")?;
        self.put_real("max_grad_norm", "optimizer.max_grad_norm")?;
        self.put_whole(
            "gradient_accumulation_steps",
            "optimizer.gradient_accumulation",
        )?;
        Ok(total)
    }

    /// The learning-rate schedule and its warmup (a percentage in the GUI, steps or a fraction in sd-scripts),
    /// which needs the run's steps when it is relative.
    fn schedule(&mut self, steps: Option<u64>) -> Result<(), ConfigError> {
        let name = self.text("lr_scheduler")?;
        let power = self.real("lr_scheduler_power")?;
        let schedule = match name.as_deref().map(str::to_ascii_lowercase).as_deref() {
            None => None,
            Some("constant" | "constant_with_warmup") => Some(LrSchedule::Constant),
            Some("linear") => Some(LrSchedule::Linear),
            Some("cosine") => Some(LrSchedule::Cosine),
            Some("cosine_with_restarts") => Some(LrSchedule::CosineWithRestarts),
            Some("polynomial") => {
                if power.is_some_and(|p| p != 1.0) {
                    self.skip(
                        "lr_scheduler_power",
                        "polynomial decay is available with power 1 only: imported as linear decay",
                    );
                }
                Some(LrSchedule::Linear)
            }
            Some(_) => {
                self.skip(
                    "lr_scheduler",
                    "not available: lora-studio has constant, linear, cosine and cosine_with_restarts; the \
                     preset's schedule is kept",
                );
                None
            }
        };
        if let Some(s) = schedule {
            self.set("optimizer.schedule", enum_value(s));
        }
        let cycles = self.whole("lr_scheduler_num_cycles")?;
        if schedule == Some(LrSchedule::CosineWithRestarts) {
            // The GUI's empty cycles are its epochs.
            let epochs = if self.gui {
                self.values.get("epoch").and_then(num_of)
            } else {
                None
            };
            let cycles = cycles.or(match epochs {
                Some(Num::Int(i)) => Some(i),
                _ => None,
            });
            if let Some(c) = cycles {
                self.set_whole("lr_scheduler_num_cycles", "optimizer.restarts", c);
            }
        }
        self.warmup(steps)
    }

    fn warmup(&mut self, steps: Option<u64>) -> Result<(), ConfigError> {
        let percent = if self.gui {
            self.real("lr_warmup")?
        } else {
            None
        };
        let given = self.get("lr_warmup_steps");
        let Some(v) = given.clone().filter(|v| !is_empty(v)) else {
            return match percent {
                Some(p) if p != 0.0 => self.relative_warmup("lr_warmup", p / 100.0, steps),
                // An explicit 0 is no warmup, whatever the preset has.
                _ if percent.is_some() || given.is_some() => {
                    self.set("optimizer.warmup_steps", toml::Value::Integer(0));
                    Ok(())
                }
                _ => Ok(()),
            };
        };
        if percent.is_some_and(|p| p != 0.0) {
            self.skip("lr_warmup", "superseded by lr_warmup_steps");
        }
        match num_of(&v) {
            // sd-scripts reads a float below 1 as a fraction of the run.
            Some(Num::Real(r)) if r.is_finite() && r > 0.0 && r < 1.0 && !self.gui => {
                self.relative_warmup("lr_warmup_steps", r, steps)
            }
            _ => {
                if let Some(w) = self.whole("lr_warmup_steps")? {
                    self.set_whole("lr_warmup_steps", "optimizer.warmup_steps", w);
                }
                Ok(())
            }
        }
    }

    fn relative_warmup(
        &mut self,
        key: &str,
        fraction: f64,
        steps: Option<u64>,
    ) -> Result<(), ConfigError> {
        match steps {
            Some(s) => {
                let w = (fraction * s as f64).round();
                let n = if w >= 0.0 {
                    Number::Whole(w as u64)
                } else {
                    Number::Real(w)
                };
                self.set_number(key, "optimizer.warmup_steps", n);
            }
            _ => self.skip(
                key,
                "a share of the run's steps, which follow from the epochs and the dataset here: set \
                 `optimizer.warmup_steps` from the plan's total",
            ),
        }
        Ok(())
    }

    fn saving(&mut self) -> Result<(), ConfigError> {
        self.put_text("output_dir", "saving.output_dir")?;
        if let Some(name) = self.text("output_name")? {
            if name.contains(['/', '\\']) {
                self.skip(
                    "output_name",
                    "lora-studio's `saving.output_name` is a file name without folders",
                );
            } else {
                self.set("saving.output_name", toml::Value::String(name));
            }
        }
        let every_steps = self.put_whole("save_every_n_steps", "saving.every_n_steps")?;
        let every_epochs = self.put_whole("save_every_n_epochs", "saving.every_n_epochs")?;
        // kohya keeps every save unless told otherwise: 0 here too, when the file says.
        let mut keep = Vec::new();
        let last_epochs = self.whole("save_last_n_epochs")?;
        let last_steps = self.whole("save_last_n_steps")?;
        if let Some(n) = last_epochs.filter(|&n| n != 0) {
            match every_epochs.filter(|&e| e > 0) {
                Some(_) => keep.push(("save_last_n_epochs", n)),
                None => self.skip(
                    "save_last_n_epochs",
                    "applies to saves every N epochs, which are off",
                ),
            }
        }
        if let Some(n) = last_steps.filter(|&n| n != 0) {
            // sd-scripts keeps the saves of the last N steps; ours counts saves.
            match every_steps.filter(|&e| e > 0) {
                Some(e) => keep.push(("save_last_n_steps", (n / i128::from(e)).max(1))),
                None => self.skip(
                    "save_last_n_steps",
                    "applies to saves every N steps, which are off",
                ),
            }
        }
        match keep.into_iter().max_by_key(|(_, n)| *n) {
            Some((key, n)) => {
                self.set_whole(key, "saving.keep_last", n);
            }
            None if last_epochs.is_some() || last_steps.is_some() => {
                self.set("saving.keep_last", toml::Value::Integer(0));
            }
            None => {}
        }
        if let Some(p) = self.text("save_precision")? {
            match p.to_ascii_lowercase().as_str() {
                "fp16" => self.set("saving.dtype", enum_value(SaveDtype::Fp16)),
                "bf16" => self.set("saving.dtype", enum_value(SaveDtype::Bf16)),
                "float" | "fp32" => self.set("saving.dtype", enum_value(SaveDtype::Fp32)),
                _ => self.skip(
                    "save_precision",
                    "LoRA files are saved in fp16, bf16 or fp32",
                ),
            }
        }
        Ok(())
    }

    /// `sample_prompts`: the prompts themselves in the GUI's file, a prompt file's path in sd-scripts'.
    fn sampling(&mut self) -> Result<(), ConfigError> {
        self.put_whole("sample_every_n_steps", "sampling.every_n_steps")?;
        let key = "sample_prompts";
        let Some(value) = self.text(key)? else {
            return Ok(());
        };
        let text = if self.gui {
            value
        } else {
            let path = Path::new(&value);
            if !path
                .extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("txt"))
            {
                self.skip(
                    key,
                    "only .txt prompt files are read (one prompt a line, with --n, --w, --h, --s, --l and --d)",
                );
                return Ok(());
            }
            match admit::read_text(path, admit::PROMPTS) {
                Ok(t) => t,
                Err(e) => {
                    self.skip(key, format!("cannot read the prompt file: {e}"));
                    return Ok(());
                }
            }
        };
        let parsed = prompts::parse(&text);
        for (shown, why) in parsed.problems {
            self.skip_value(key, shown, why);
        }
        if !parsed.prompts.is_empty() {
            let list = parsed.prompts.into_iter().map(toml::Value::Table).collect();
            self.set("sampling.prompts", toml::Value::Array(list));
        }
        Ok(())
    }

    /// The keys no mapping read: silent when they have no effect here or hold an "off" value, else listed.
    fn rest(&mut self) {
        let left: Vec<(String, Value)> = (self.values.iter())
            .filter(|(k, _)| !self.seen.contains(*k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (key, value) in left {
            if is_empty(&value)
                || NO_EFFECT.contains(&key.as_str())
                || NO_EFFECT_PREFIXES.iter().any(|p| key.starts_with(p))
                || inert(&key).is_some_and(|d| is_default(&value, d))
            {
                continue;
            }
            let why = unsupported(&key).unwrap_or("lora-studio has no such setting");
            self.skip(&key, why);
        }
    }
}

fn not_trainable() -> &'static str {
    "lora-studio trains LoRA (and LoCon) adapters only: imported as a LoRA with this rank on attention and \
     feed-forward layers"
}

/// `owner/name` without a file extension: a Hugging Face model id, not a local path.
fn looks_like_hub_name(p: &str) -> bool {
    let parts: Vec<&str> = p.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|s| !s.is_empty() && !s.starts_with('.'))
        && !p.contains(['\\', ':'])
        && Path::new(p).extension().is_none()
}
