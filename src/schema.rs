//! What each setting a person can type admits: its key, its label on screen and, for numbers, the range. The
//! config's validation, the command-line flags, the GUI's fields and docs/CONFIG.md all read this one table, so
//! they cannot disagree.

use std::fmt::Write;

/// The values a number setting admits. NaN and infinities are never admitted.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Bound {
    /// A whole number from `min` to `max`, a multiple of `step`.
    Whole { min: u64, max: u64, step: u64 },
    /// A number from `min` to `max`; an open end excludes its own value.
    Real {
        min: f64,
        max: f64,
        min_open: bool,
        max_open: bool,
    },
}

/// A value to check against a `Bound`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Number {
    Whole(u64),
    Real(f64),
}

impl Bound {
    const fn whole(min: u64, max: u64) -> Bound {
        Bound::Whole { min, max, step: 1 }
    }

    const fn multiple_of(step: u64, min: u64, max: u64) -> Bound {
        Bound::Whole { min, max, step }
    }

    const fn real(min: f64, max: f64) -> Bound {
        Bound::Real {
            min,
            max,
            min_open: false,
            max_open: false,
        }
    }

    const fn above(min: f64, max: f64) -> Bound {
        Bound::Real {
            min,
            max,
            min_open: true,
            max_open: false,
        }
    }

    const fn below(min: f64, max: f64) -> Bound {
        Bound::Real {
            min,
            max,
            min_open: false,
            max_open: true,
        }
    }

    pub fn admits(&self, n: Number) -> bool {
        match (*self, n) {
            (Bound::Whole { min, max, step }, Number::Whole(v)) => {
                (min..=max).contains(&v) && v.is_multiple_of(step)
            }
            (
                Bound::Real {
                    min,
                    max,
                    min_open,
                    max_open,
                },
                Number::Real(v),
            ) => {
                let low = if min_open { v > min } else { v >= min };
                let high = if max_open { v < max } else { v <= max };
                low && high
            }
            _ => false,
        }
    }

    /// "a whole number from 1 to 1024", "a multiple of 8 from 32 to 4096", "a number above 0 and below 1".
    pub fn describe(&self) -> String {
        match *self {
            Bound::Whole { min, max, step: 1 } => format!("a whole number from {min} to {max}"),
            Bound::Whole { min, max, step } => format!("a multiple of {step} from {min} to {max}"),
            Bound::Real {
                min,
                max,
                min_open,
                max_open,
            } => {
                let (low, high) = (show_real(min), show_real(max));
                match (min_open, max_open) {
                    (false, false) => format!("a number from {low} to {high}"),
                    (true, false) => format!("a number above {low}, at most {high}"),
                    (false, true) => format!("a number from {low} to below {high}"),
                    (true, true) => format!("a number above {low} and below {high}"),
                }
            }
        }
    }

    /// Parses a command-line value of this bound: `Err` says what it must be instead.
    pub fn parse<N: std::str::FromStr + Into<Number> + Copy>(
        &self,
        text: &str,
    ) -> Result<N, String> {
        let value: N = text
            .trim()
            .parse()
            .map_err(|_| format!("it must be {}", self.describe()))?;
        let n = value.into();
        if self.admits(n) {
            Ok(value)
        } else {
            Err(format!(
                "{} is out of range: it must be {}",
                show(n),
                self.describe()
            ))
        }
    }
}

/// A command-line value parser admitting what `field` admits (clap takes it as `value_parser`).
pub fn flag<N: std::str::FromStr + Into<Number> + Copy>(
    field: &'static Field,
) -> impl Fn(&str) -> Result<N, String> + Clone + Send + Sync + 'static {
    move |text| field.bound().parse(text)
}

impl From<u32> for Number {
    fn from(v: u32) -> Number {
        Number::Whole(u64::from(v))
    }
}

impl From<u64> for Number {
    fn from(v: u64) -> Number {
        Number::Whole(v)
    }
}

impl From<usize> for Number {
    fn from(v: usize) -> Number {
        Number::Whole(v as u64)
    }
}

impl From<f64> for Number {
    fn from(v: f64) -> Number {
        Number::Real(v)
    }
}

/// Learning rates and epsilons read best as 3e-4 and 1e-8, and huge values as 1e308.
pub fn show_real(v: f64) -> String {
    if v != 0.0 && !(1e-3..1e6).contains(&v.abs()) {
        format!("{v:e}")
    } else {
        v.to_string()
    }
}

fn show(n: Number) -> String {
    match n {
        Number::Whole(v) => v.to_string(),
        Number::Real(v) => show_real(v),
    }
}

/// A setting: its config key (`section.key`; sample prompts as `sampling.prompts[].key`), its label on screen,
/// and for numbers the admitted range and the usual values.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Field {
    pub key: &'static str,
    pub label: &'static str,
    pub bound: Option<Bound>,
    pub usual: &'static str,
}

impl Field {
    const fn choice(key: &'static str, label: &'static str) -> Field {
        Field {
            key,
            label,
            bound: None,
            usual: "",
        }
    }

    const fn number(
        key: &'static str,
        label: &'static str,
        bound: Bound,
        usual: &'static str,
    ) -> Field {
        Field {
            key,
            label,
            bound: Some(bound),
            usual,
        }
    }

    /// The bound of a number field (a choice admits every value its type holds).
    pub fn bound(&self) -> Bound {
        self.bound.unwrap_or(Bound::whole(0, u64::MAX))
    }

    /// `Err` naming `shown_key` (the key with its index, for prompts) when `value` is not admitted.
    pub fn check(&self, shown_key: &str, value: Number) -> Result<(), String> {
        let bound = self.bound();
        if bound.admits(value) {
            return Ok(());
        }
        let mut message = format!(
            "`{shown_key}` is {}: it must be {}",
            show(value),
            bound.describe()
        );
        if !self.usual.is_empty() {
            let _ = write!(message, " (usually {})", self.usual);
        }
        Err(message)
    }
}

/// The most steps a run may have (also the absurd-step limit of resume states).
pub const MAX_STEPS: u64 = 100_000_000;
/// TOML integers are signed 64-bit: a seed above this could not be written to a config file.
pub const MAX_SEED: u64 = i64::MAX as u64;

pub const SCHEMA: Field = Field::choice("schema", "Schema");
pub const CHECKPOINT: Field = Field::choice("model.checkpoint", "Base model");
pub const PREDICTION: Field = Field::choice("model.prediction", "Prediction");
/// 0 is read as 1: files of earlier versions wrote 0 for "the last layer".
pub const CLIP_SKIP: Field = Field::number(
    "model.clip_skip",
    "CLIP skip",
    Bound::whole(0, 2),
    "1, or 2 for anime models",
);
pub const RESOLUTION: Field = Field::number(
    "dataset.resolution",
    "Resolution",
    Bound::multiple_of(8, 32, 4096),
    "512, 768 or 1024",
);
pub const BUCKETING: Field = Field::choice("dataset.bucketing", "Aspect-ratio buckets");
pub const MIN_BUCKET_SIDE: Field = Field::number(
    "dataset.min_bucket_side",
    "Min bucket side",
    Bound::whole(32, 4096),
    "256",
);
pub const MAX_BUCKET_SIDE: Field = Field::number(
    "dataset.max_bucket_side",
    "Max bucket side",
    Bound::whole(32, 8192),
    "1024, or twice the resolution",
);
pub const BUCKET_STEP: Field = Field::number(
    "dataset.bucket_step",
    "Bucket step",
    Bound::multiple_of(8, 8, 256),
    "64",
);
pub const FLIP: Field = Field::choice("dataset.flip", "Mirror images");
pub const SHUFFLE_CAPTION: Field = Field::choice("dataset.shuffle_caption", "Shuffle caption tags");
pub const KEEP_TOKENS: Field = Field::number(
    "dataset.keep_tokens",
    "Keep tokens",
    Bound::whole(0, 1000),
    "1",
);
pub const CAPTION_DROPOUT: Field = Field::number(
    "dataset.caption_dropout",
    "Caption dropout",
    Bound::real(0.0, 1.0),
    "0–0.1",
);
pub const TAG_DROPOUT: Field = Field::number(
    "dataset.tag_dropout",
    "Tag dropout",
    Bound::real(0.0, 1.0),
    "0–0.1",
);
pub const REGULARIZATION_FOLDER: Field =
    Field::choice("dataset.regularization_folder", "Regularization images");
pub const REGULARIZATION_REPEATS: Field = Field::number(
    "dataset.regularization_repeats",
    "Regularization repeats",
    Bound::whole(1, crate::dataset::project::MAX_REPEATS),
    "1",
);
pub const PRIOR_LOSS_WEIGHT: Field = Field::number(
    "dataset.prior_loss_weight",
    "Prior loss weight",
    Bound::real(0.0, 10.0),
    "1",
);
pub const RANK: Field = Field::number("network.rank", "Rank", Bound::whole(1, 1024), "4–64");
pub const ALPHA: Field = Field::number(
    "network.alpha",
    "Alpha",
    Bound::above(0.0, 10_000.0),
    "the rank or half of it",
);
pub const TARGETS: Field = Field::choice("network.targets", "Layers");
pub const CONV_RANK: Field = Field::number(
    "network.conv_rank",
    "Conv rank",
    Bound::whole(1, 1024),
    "4–16",
);
pub const CONV_ALPHA: Field = Field::number(
    "network.conv_alpha",
    "Conv alpha",
    Bound::above(0.0, 10_000.0),
    "half the conv rank",
);
pub const NETWORK_DROPOUT: Field = Field::number(
    "network.dropout",
    "Network dropout",
    Bound::below(0.0, 0.9),
    "0 or 0.1",
);
pub const OPTIMIZER: Field = Field::choice("optimizer.kind", "Optimizer");
pub const BETA1: Field = Field::number("optimizer.beta1", "Beta 1", Bound::below(0.0, 1.0), "0.9");
pub const BETA2: Field =
    Field::number("optimizer.beta2", "Beta 2", Bound::below(0.0, 1.0), "0.999");
pub const EPS: Field = Field::number("optimizer.eps", "Epsilon", Bound::above(0.0, 1.0), "1e-8");
pub const WEIGHT_DECAY: Field = Field::number(
    "optimizer.weight_decay",
    "Weight decay",
    Bound::real(0.0, 1.0),
    "0–0.1",
);
pub const D_COEF: Field = Field::number(
    "optimizer.d_coef",
    "Prodigy d coef",
    Bound::above(0.0, 100.0),
    "1; 0.5–2",
);
pub const D0: Field = Field::number("optimizer.d0", "Prodigy d0", Bound::above(0.0, 1.0), "1e-6");
pub const USE_BIAS_CORRECTION: Field =
    Field::choice("optimizer.use_bias_correction", "Prodigy bias correction");
pub const SAFEGUARD_WARMUP: Field =
    Field::choice("optimizer.safeguard_warmup", "Prodigy safeguard warmup");
pub const LR: Field = Field::number(
    "optimizer.lr",
    "Learning rate",
    Bound::above(0.0, 10.0),
    "1e-4; 5e-5 to 1e-3; 1 for Prodigy",
);
pub const LR_TEXT_ENCODER: Field = Field::number(
    "optimizer.lr_text_encoder",
    "Text encoder LR",
    Bound::real(0.0, 10.0),
    "half the UNet's learning rate; 1 for Prodigy",
);
pub const SCHEDULE: Field = Field::choice("optimizer.schedule", "LR schedule");
pub const WARMUP_STEPS: Field = Field::number(
    "optimizer.warmup_steps",
    "Warmup steps",
    Bound::whole(0, MAX_STEPS),
    "0–10% of the steps",
);
pub const RESTARTS: Field = Field::number(
    "optimizer.restarts",
    "Restarts",
    Bound::whole(1, 1000),
    "1–4",
);
pub const MAX_GRAD_NORM: Field = Field::number(
    "optimizer.max_grad_norm",
    "Max gradient norm",
    Bound::real(0.0, 10_000.0),
    "1; 0 turns clipping off",
);
pub const GRADIENT_ACCUMULATION: Field = Field::number(
    "optimizer.gradient_accumulation",
    "Gradient accumulation",
    Bound::whole(1, 256),
    "1–4",
);
pub const BATCH_SIZE: Field = Field::number(
    "training.batch_size",
    "Batch size",
    Bound::whole(1, 256),
    "1–4",
);
pub const STEPS: Field = Field::number(
    "training.steps",
    "Steps",
    Bound::whole(0, MAX_STEPS),
    "1000–3000; 0 lets the epochs decide",
);
pub const EPOCHS: Field = Field::number(
    "training.epochs",
    "Epochs",
    Bound::whole(0, 1_000_000),
    "10–20",
);
pub const SEED: Field = Field::number("training.seed", "Seed", Bound::whole(0, MAX_SEED), "");
pub const PRECISION: Field = Field::choice("training.precision", "Precision");
pub const RECOMPUTE: Field =
    Field::choice("training.recompute", "Recompute (gradient checkpointing)");
pub const NOISE_OFFSET: Field = Field::number(
    "training.noise_offset",
    "Noise offset",
    Bound::real(0.0, 1.0),
    "0.03–0.1",
);
pub const MIN_SNR_GAMMA: Field = Field::number(
    "training.min_snr_gamma",
    "Min-SNR gamma",
    Bound::real(0.0, 100.0),
    "5; 0 turns it off",
);
pub const TRAIN_TEXT_ENCODER: Field =
    Field::choice("training.train_text_encoder", "Train the text encoder");
pub const OUTPUT_NAME: Field = Field::choice("saving.output_name", "Output name");
pub const SAVE_EVERY_N_STEPS: Field = Field::number(
    "saving.every_n_steps",
    "Save every N steps",
    Bound::whole(0, MAX_STEPS),
    "10–25% of the run; 0 = only at the end",
);
pub const SAVE_EVERY_N_EPOCHS: Field = Field::number(
    "saving.every_n_epochs",
    "Save every N epochs",
    Bound::whole(0, 1_000_000),
    "0 = off",
);
pub const KEEP_LAST: Field = Field::number(
    "saving.keep_last",
    "Keep last",
    Bound::whole(0, 10_000),
    "0 = keep all",
);
pub const SAVE_DTYPE: Field = Field::choice("saving.dtype", "Saved precision");
pub const SAMPLE_EVERY_N_STEPS: Field = Field::number(
    "sampling.every_n_steps",
    "Sample every N steps",
    Bound::whole(0, MAX_STEPS),
    "as often as saves; 0 = off",
);
pub const PROMPT_SEED: Field = Field::number(
    "sampling.prompts[].seed",
    "Seed",
    Bound::whole(0, MAX_SEED),
    "",
);
pub const PROMPT_WIDTH: Field = Field::number(
    "sampling.prompts[].width",
    "Width",
    Bound::multiple_of(8, 32, 2048),
    "the resolution",
);
pub const PROMPT_HEIGHT: Field = Field::number(
    "sampling.prompts[].height",
    "Height",
    Bound::multiple_of(8, 32, 2048),
    "the resolution",
);
pub const PROMPT_STEPS: Field = Field::number(
    "sampling.prompts[].steps",
    "Sampling steps",
    Bound::whole(1, 200),
    "20–30",
);
pub const PROMPT_CFG: Field = Field::number(
    "sampling.prompts[].cfg",
    "CFG",
    Bound::real(0.0, 30.0),
    "5–8",
);
/// The weight a LoRA is applied with when sampling (negative weights push away from it).
pub const LORA_WEIGHT: Field = Field::number(
    "lora_weight",
    "LoRA weight",
    Bound::real(-10.0, 10.0),
    "0.6–1",
);

/// Every setting, in the order of docs/CONFIG.md.
pub const FIELDS: [Field; 59] = [
    SCHEMA,
    CHECKPOINT,
    PREDICTION,
    CLIP_SKIP,
    RESOLUTION,
    BUCKETING,
    MIN_BUCKET_SIDE,
    MAX_BUCKET_SIDE,
    BUCKET_STEP,
    FLIP,
    SHUFFLE_CAPTION,
    KEEP_TOKENS,
    CAPTION_DROPOUT,
    TAG_DROPOUT,
    REGULARIZATION_FOLDER,
    REGULARIZATION_REPEATS,
    PRIOR_LOSS_WEIGHT,
    RANK,
    ALPHA,
    TARGETS,
    CONV_RANK,
    CONV_ALPHA,
    NETWORK_DROPOUT,
    OPTIMIZER,
    BETA1,
    BETA2,
    EPS,
    WEIGHT_DECAY,
    D_COEF,
    D0,
    USE_BIAS_CORRECTION,
    SAFEGUARD_WARMUP,
    LR,
    LR_TEXT_ENCODER,
    SCHEDULE,
    WARMUP_STEPS,
    RESTARTS,
    MAX_GRAD_NORM,
    GRADIENT_ACCUMULATION,
    BATCH_SIZE,
    STEPS,
    EPOCHS,
    SEED,
    PRECISION,
    RECOMPUTE,
    NOISE_OFFSET,
    MIN_SNR_GAMMA,
    TRAIN_TEXT_ENCODER,
    OUTPUT_NAME,
    SAVE_EVERY_N_STEPS,
    SAVE_EVERY_N_EPOCHS,
    KEEP_LAST,
    SAVE_DTYPE,
    SAMPLE_EVERY_N_STEPS,
    PROMPT_SEED,
    PROMPT_WIDTH,
    PROMPT_HEIGHT,
    PROMPT_STEPS,
    PROMPT_CFG,
];

/// The field of a config key; prompt keys may carry their index (`sampling.prompts[2].cfg`).
pub fn field(key: &str) -> Option<&'static Field> {
    let general = match key.strip_prefix("sampling.prompts[") {
        Some(rest) => format!("sampling.prompts[].{}", rest.split_once("].")?.1),
        None => key.to_owned(),
    };
    FIELDS.iter().find(|f| f.key == general)
}

/// The table of admitted values that docs/CONFIG.md carries (a test keeps the two equal).
pub fn markdown_table() -> String {
    let mut out = String::from("| key | admits | usually |\n|---|---|---|\n");
    for f in &FIELDS {
        if let Some(bound) = f.bound {
            let _ = writeln!(out, "| `{}` | {} | {} |", f.key, bound.describe(), f.usual);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_admit_their_range_and_never_nan() {
        assert!(RANK.bound().admits(Number::Whole(1)));
        assert!(!RANK.bound().admits(Number::Whole(0)));
        assert!(!RESOLUTION.bound().admits(Number::Whole(516)));
        assert!(RESOLUTION.bound().admits(Number::Whole(520)));
        assert!(!LR.bound().admits(Number::Real(0.0)));
        assert!(
            LR.bound().admits(Number::Real(1.0)),
            "Prodigy's learning rate"
        );
        assert!(!LR.bound().admits(Number::Real(11.0)));
        assert!(LR.bound().admits(Number::Real(1e-4)));
        for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, 1e308] {
            assert!(!MAX_GRAD_NORM.bound().admits(Number::Real(bad)), "{bad}");
        }
        assert!(!RANK.bound().admits(Number::Real(4.0)));
    }

    #[test]
    fn messages_name_the_key_the_value_and_the_range() {
        let e = RANK.check("network.rank", Number::Whole(0)).unwrap_err();
        assert_eq!(
            e,
            "`network.rank` is 0: it must be a whole number from 1 to 1024 (usually 4–64)"
        );
        let e = PROMPT_CFG
            .check("sampling.prompts[1].cfg", Number::Real(f64::NAN))
            .unwrap_err();
        assert!(e.starts_with("`sampling.prompts[1].cfg` is NaN"), "{e}");
        assert_eq!(
            RESOLUTION.bound().parse::<u32>("4294967295").unwrap_err(),
            "4294967295 is out of range: it must be a multiple of 8 from 32 to 4096"
        );
        assert_eq!(
            LORA_WEIGHT.bound().parse::<f64>("nan").unwrap_err(),
            "NaN is out of range: it must be a number from -10 to 10"
        );
    }

    #[test]
    fn keys_are_unique_and_prompt_keys_resolve() {
        let mut keys: Vec<_> = FIELDS.iter().map(|f| f.key).collect();
        keys.sort_unstable();
        keys.dedup();
        assert_eq!(keys.len(), FIELDS.len());
        assert_eq!(field("sampling.prompts[3].cfg"), Some(&PROMPT_CFG));
        assert_eq!(field("network.rank"), Some(&RANK));
        assert_eq!(field("no.such"), None);
    }
}
