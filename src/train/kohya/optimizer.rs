//! The optimizer and its arguments, the learning rates and which parts of the model they train.

use super::map::Mapper;
use super::value::{Num, enum_value, num_of};
use crate::schema::{self, Number};
use crate::train::config::ConfigError;
use crate::train::optim::OptimizerKind;
use serde_json::Value;

impl Mapper {
    pub(super) fn optimizer(&mut self) -> Result<(), ConfigError> {
        let named = match self.text("optimizer")? {
            Some(n) => Some(("optimizer", n)),
            None => self.text("optimizer_type")?.map(|n| ("optimizer_type", n)),
        };
        let legacy = [
            ("use_8bit_adam", "AdamW8bit"),
            ("use_lion_optimizer", "Lion"),
        ];
        let mut chosen = named;
        for (key, name) in legacy {
            if self.flag(key)? == Some(true) && chosen.is_none() {
                chosen = Some((key, name.to_owned()));
            }
        }
        let args = self.key_values("optimizer_args")?;
        let kind = chosen.as_ref().and_then(|(_, name)| optimizer_kind(name));
        match (&chosen, kind) {
            (Some(_), Some(kind)) => {
                self.set("optimizer.kind", enum_value(kind));
                for (key, value) in optimizer_defaults(kind) {
                    self.set(key, value);
                }
            }
            (Some((key, _)), None) => self.skip(
                key,
                "not available: lora-studio has AdamW, AdamW8bit, Adafactor, Prodigy and Lion; the preset's \
                 optimizer is kept",
            ),
            (None, _) => {}
        }
        let mut relative_step_off = false;
        for (k, v) in args {
            relative_step_off |= k == "relative_step" && v.eq_ignore_ascii_case("false");
            self.optimizer_arg(&k, &v)?;
        }
        if kind == Some(OptimizerKind::Adafactor) && !relative_step_off {
            let key = chosen.map_or("optimizer", |(k, _)| k);
            self.skip(
                key,
                "kohya's Adafactor without relative_step=False sets its own step size (the adafactor schedule); \
                 lora-studio's uses `optimizer.lr` as given: check the learning rate",
            );
        }
        Ok(())
    }

    /// One `optimizer_args` entry (values are Python literals: `0.1`, `True`, `0.9,0.99`).
    fn optimizer_arg(&mut self, k: &str, v: &str) -> Result<(), ConfigError> {
        let shown = format!("\"{k}={v}\"");
        let parts: Vec<&str> = v
            .trim_matches(|c| c == '(' || c == ')' || c == '[' || c == ']')
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .collect();
        let reals = |m: &Mapper| -> Result<Vec<f64>, ConfigError> {
            parts
                .iter()
                .map(|p| p.parse::<f64>().ok().filter(|r| r.is_finite()))
                .collect::<Option<Vec<f64>>>()
                .ok_or_else(|| {
                    m.refuse(
                        "optimizer_args",
                        &Value::String(format!("{k}={v}")),
                        "finite numbers after the =",
                    )
                })
        };
        let truth = match v.trim() {
            t if t.eq_ignore_ascii_case("true") => Some(true),
            t if t.eq_ignore_ascii_case("false") => Some(false),
            _ => None,
        };
        let ours = |key: &str| format!("optimizer.{key}");
        match k {
            "weight_decay" | "d_coef" | "d0" | "eps" => {
                let r = reals(self)?;
                match r.as_slice() {
                    [one] => {
                        self.set_number_arg(&shown, &ours(k), *one);
                    }
                    _ if k == "eps" => {
                        self.skip_value(
                            "optimizer_args",
                            shown,
                            "Adafactor's epsilons are fixed in lora-studio",
                        );
                    }
                    _ => {
                        return Err(self.refuse(
                            "optimizer_args",
                            &Value::String(format!("{k}={v}")),
                            "one number after the =",
                        ));
                    }
                }
            }
            "betas" => match reals(self)?.as_slice() {
                [b1, b2] => {
                    if self.set_number_arg(&shown, "optimizer.beta1", *b1) {
                        self.set_number_arg(&shown, "optimizer.beta2", *b2);
                    }
                }
                _ => {
                    return Err(self.refuse(
                        "optimizer_args",
                        &Value::String(format!("{k}={v}")),
                        "betas=B1,B2, two numbers",
                    ));
                }
            },
            "use_bias_correction" | "safeguard_warmup" => match truth {
                Some(b) => self.set(&ours(k), toml::Value::Boolean(b)),
                None => {
                    return Err(self.refuse(
                        "optimizer_args",
                        &Value::String(format!("{k}={v}")),
                        "True or False after the =",
                    ));
                }
            },
            // What lora-studio's optimizers do anyway.
            "decouple" if truth == Some(true) => {}
            "relative_step" | "scale_parameter" | "warmup_init" if truth == Some(false) => {}
            "decouple" => self.skip_value(
                "optimizer_args",
                shown,
                "lora-studio's Prodigy has no decouple setting",
            ),
            "relative_step" | "scale_parameter" | "warmup_init" => self.skip_value(
                "optimizer_args",
                shown,
                "lora-studio's Adafactor uses `optimizer.lr` as given (relative_step, scale_parameter and \
                 warmup_init off)",
            ),
            _ => self.skip_value(
                "optimizer_args",
                shown,
                "not an option of lora-studio's optimizers",
            ),
        }
        Ok(())
    }

    /// Like `set_number`, listing the `optimizer_args` entry when out of range.
    fn set_number_arg(&mut self, shown: &str, ours: &str, r: f64) -> bool {
        let field = schema::field(ours).expect("a key of the schema");
        if field.bound().admits(Number::Real(r)) {
            self.set(ours, toml::Value::Float(r));
            return true;
        }
        let why = format!(
            "out of range: lora-studio's `{ours}` admits {}",
            field.bound().describe()
        );
        self.skip_value("optimizer_args", shown.to_owned(), why);
        false
    }

    /// `learning_rate`, `unet_lr`, `text_encoder_lr` and which parts are trained. sd-scripts trains the text
    /// encoder at `learning_rate` unless `text_encoder_lr` is 0 or `network_train_unet_only` is set; the GUI writes
    /// 0 for "not set" and trains the UNet alone when only `unet_lr` is set.
    pub(super) fn learning_rates(&mut self) -> Result<(), ConfigError> {
        let lr = self.real("learning_rate")?;
        let unet = self.real("unet_lr")?;
        let te = self.text_encoder_lr()?;
        let mut unet_only = self.flag("network_train_unet_only")?.unwrap_or(false);
        let te_only = self
            .flag("network_train_text_encoder_only")?
            .unwrap_or(false);
        let unet_set = unet.is_some_and(|u| u != 0.0);
        let te_set = te.is_some_and(|t| t != 0.0);
        if self.gui {
            unet_only |= !te_set && unet_set;
        }
        let key = if te_only {
            Some("network_train_text_encoder_only")
        } else if self.gui && te_set && !unet_set {
            // The GUI trains the text encoder alone when only its rate is set.
            Some("text_encoder_lr")
        } else if !self.gui && unet == Some(0.0) {
            Some("unet_lr")
        } else {
            None
        };
        if let Some(key) = key {
            self.skip(
                key,
                "kohya trains the text encoder alone here; lora-studio always trains the UNet adapters",
            );
        }
        let unet_lr = if unet_set { unet } else { lr };
        let unet_key = if unet_set { "unet_lr" } else { "learning_rate" };
        if let Some(u) = unet_lr {
            self.set_number(unet_key, "optimizer.lr", Number::Real(u));
        }
        let te_lr = match (unet_only, te) {
            (true, _) => None,
            (false, Some(t)) if t != 0.0 => Some(("text_encoder_lr", t)),
            // The GUI's 0 is "not set", sd-scripts' 0 turns the text encoder off.
            (false, Some(_)) if !self.gui => None,
            (false, _) => lr.map(|l| ("learning_rate", l)),
        };
        if unet_only && te_set {
            self.skip(
                "text_encoder_lr",
                "not used: network_train_unet_only is set",
            );
        }
        let mut trained = false;
        if let Some((key, t)) = te_lr {
            let field = &schema::LR_TEXT_ENCODER;
            if field.bound().admits(Number::Real(t)) && t > 0.0 {
                self.set(field.key, toml::Value::Float(t));
                trained = true;
            } else {
                let why = format!(
                    "out of range: lora-studio's `{}` admits {}, so the text encoder is not trained",
                    field.key,
                    field.bound().describe()
                );
                // learning_rate may be listed already, as out of the UNet's range.
                if !self.skipped.iter().any(|s| s.key == key) {
                    self.skip(key, why);
                }
            }
        }
        if lr.is_some() || unet.is_some() || te.is_some() || unet_only {
            self.set(
                schema::TRAIN_TEXT_ENCODER.key,
                toml::Value::Boolean(trained),
            );
        }
        let lr_used = !unet_set || te_lr.is_some_and(|(k, _)| k == "learning_rate");
        if let (Some(l), false) = (lr, lr_used)
            && unet != Some(l)
        {
            self.skip("learning_rate", "superseded by unet_lr");
        }
        Ok(())
    }

    /// `text_encoder_lr`: a number, or sd-scripts' list (one per text encoder; SD 1.x/2.x have one).
    fn text_encoder_lr(&mut self) -> Result<Option<f64>, ConfigError> {
        let key = "text_encoder_lr";
        if let Some(Value::Array(list)) = self.values.get(key).cloned() {
            self.seen.insert(key.into());
            let Some(first) = list.first() else {
                return Ok(None);
            };
            return match num_of(first) {
                Some(Num::Int(i)) => Ok(Some(i as f64)),
                Some(Num::Real(r)) if r.is_finite() => Ok(Some(r)),
                _ => Err(self.refuse(key, &Value::Array(list.clone()), "a number")),
            };
        }
        self.real(key)
    }
}

fn optimizer_kind(name: &str) -> Option<OptimizerKind> {
    Some(match name.to_ascii_lowercase().as_str() {
        "adamw" | "pagedadamw" | "pagedadamw32bit" => OptimizerKind::AdamW,
        "adamw8bit" | "pagedadamw8bit" => OptimizerKind::AdamW8bit,
        "adafactor" => OptimizerKind::Adafactor,
        "prodigy" => OptimizerKind::Prodigy,
        "lion" | "lion8bit" | "pagedlion8bit" => OptimizerKind::Lion,
        _ => return None,
    })
}

/// The settings of the optimizer kohya builds when `optimizer_args` does not say otherwise (torch's and
/// bitsandbytes' AdamW, lion-pytorch, prodigyopt, transformers' Adafactor).
fn optimizer_defaults(kind: OptimizerKind) -> Vec<(&'static str, toml::Value)> {
    let f = toml::Value::Float;
    match kind {
        OptimizerKind::AdamW | OptimizerKind::AdamW8bit => vec![
            ("optimizer.beta1", f(0.9)),
            ("optimizer.beta2", f(0.999)),
            ("optimizer.eps", f(1e-8)),
            ("optimizer.weight_decay", f(0.01)),
        ],
        OptimizerKind::Lion => vec![
            ("optimizer.beta1", f(0.9)),
            ("optimizer.beta2", f(0.99)),
            ("optimizer.weight_decay", f(0.0)),
        ],
        OptimizerKind::Prodigy => vec![
            ("optimizer.beta1", f(0.9)),
            ("optimizer.beta2", f(0.999)),
            ("optimizer.eps", f(1e-8)),
            ("optimizer.weight_decay", f(0.0)),
            ("optimizer.d_coef", f(1.0)),
            ("optimizer.d0", f(1e-6)),
            ("optimizer.use_bias_correction", toml::Value::Boolean(false)),
            ("optimizer.safeguard_warmup", toml::Value::Boolean(false)),
        ],
        OptimizerKind::Adafactor => vec![("optimizer.weight_decay", f(0.0))],
    }
}
