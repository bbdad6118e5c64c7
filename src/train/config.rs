//! The training configuration: one TOML document, versioned, every field with a documented default.
//! Presets are partial documents laid over the defaults; `--set key=value` lays single values over that.
//! An unknown key or a value out of range is an error naming the key — never a silent default.

use super::lr::LrSchedule;
use super::optim::{OptimizerKind, OptimizerParams};
use crate::schema::{self, Field, Number};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const SCHEMA: u32 = 1;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Version of this format; files from a newer app are refused.
    pub schema: u32,
    pub model: ModelConfig,
    pub dataset: DatasetConfig,
    pub network: NetworkConfig,
    pub optimizer: OptimizerConfig,
    pub training: TrainingConfig,
    pub saving: SavingConfig,
    pub sampling: SamplingConfig,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            schema: SCHEMA,
            model: ModelConfig::default(),
            dataset: DatasetConfig::default(),
            network: NetworkConfig::default(),
            optimizer: OptimizerConfig::default(),
            training: TrainingConfig::default(),
            saving: SavingConfig::default(),
            sampling: SamplingConfig::default(),
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Prediction {
    /// Take it from the checkpoint (diffusers scheduler config, or the family's rule for single files).
    #[default]
    Auto,
    Epsilon,
    V,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// The base checkpoint: a single-file `.safetensors` or a diffusers folder.
    pub checkpoint: PathBuf,
    /// A VAE file that replaces the checkpoint's VAE.
    pub vae: Option<PathBuf>,
    pub prediction: Prediction,
    /// 1 = the text encoder's last layer, 2 = the penultimate layer (common for anime models); 0 reads as 1.
    pub clip_skip: u32,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            checkpoint: PathBuf::new(),
            vae: None,
            prediction: Prediction::Auto,
            clip_skip: 1,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatasetConfig {
    /// The folder of images with caption files.
    pub folder: PathBuf,
    pub caption_extension: String,
    /// Base training resolution (square side in pixels).
    pub resolution: u32,
    /// Aspect-ratio buckets (off: every image is centre-cropped to a square).
    pub bucketing: bool,
    pub min_bucket_side: u32,
    pub max_bucket_side: u32,
    pub bucket_step: u32,
    /// Also train on mirrored images.
    pub flip: bool,
    /// Shuffle comma-separated tags every time a caption is used, keeping the first `keep_tokens` in place.
    pub shuffle_caption: bool,
    pub keep_tokens: u32,
    /// Probability of training a sample with an empty caption.
    pub caption_dropout: f64,
    /// Probability of dropping each tag (the kept ones excepted).
    pub tag_dropout: f64,
    /// Regularization (prior-preservation) images: pictures of the class without the concept, trained beside
    /// the dataset so the LoRA does not turn every "woman" into the subject.
    pub regularization_folder: Option<PathBuf>,
    /// Repeats of each regularization image (kohya `N_name` subfolders set their own).
    pub regularization_repeats: u32,
    /// Weight of the regularization images' loss against the dataset's.
    pub prior_loss_weight: f64,
}

impl Default for DatasetConfig {
    fn default() -> Self {
        DatasetConfig {
            folder: PathBuf::new(),
            caption_extension: ".txt".into(),
            resolution: 512,
            bucketing: true,
            min_bucket_side: 256,
            max_bucket_side: 1024,
            bucket_step: 64,
            flip: false,
            shuffle_caption: false,
            keep_tokens: 1,
            caption_dropout: 0.0,
            tag_dropout: 0.0,
            regularization_folder: None,
            regularization_repeats: 1,
            prior_loss_weight: 1.0,
        }
    }
}

/// Which layers get adapters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Targets {
    /// Attention projections (q, k, v, out) and the transformer in/out projections.
    Attention,
    /// The above plus the transformer feed-forward layers (kohya's default set).
    #[default]
    AttentionAndFeedForward,
    /// The above plus LoCon on the resnet and resampling convolutions.
    All,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetworkConfig {
    pub rank: u32,
    pub alpha: f64,
    pub targets: Targets,
    /// Rank and alpha of the LoCon convolution adapters (targets = "all").
    pub conv_rank: u32,
    pub conv_alpha: f64,
    /// Dropout on the adapters' down-projection output while training (kohya's `network_dropout`).
    pub dropout: f64,
    /// Start from an existing LoRA instead of fresh adapters.
    pub init_from: Option<PathBuf>,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        NetworkConfig {
            rank: 16,
            alpha: 16.0,
            targets: Targets::default(),
            conv_rank: 8,
            conv_alpha: 4.0,
            dropout: 0.0,
            init_from: None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimizerConfig {
    pub kind: OptimizerKind,
    #[serde(flatten)]
    pub params: OptimizerParams,
    /// Learning rate of the UNet adapters.
    pub lr: f64,
    /// Learning rate of the text-encoder adapters (when the text encoder is trained).
    pub lr_text_encoder: f64,
    pub schedule: LrSchedule,
    pub warmup_steps: u64,
    /// Cycles of `cosine_with_restarts`.
    pub restarts: u32,
    /// Clip the global gradient norm to this (0 = off).
    pub max_grad_norm: f64,
    /// Sum gradients over this many batches per update.
    pub gradient_accumulation: u32,
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        OptimizerConfig {
            kind: OptimizerKind::AdamW,
            params: OptimizerParams::default(),
            lr: 1e-4,
            lr_text_encoder: 5e-5,
            schedule: LrSchedule::Constant,
            warmup_steps: 0,
            restarts: 1,
            max_grad_norm: 1.0,
            gradient_accumulation: 1,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    /// bf16 where the card supports it, else fp16 with loss scaling; fp32 on the CPU.
    #[default]
    Auto,
    Bf16,
    Fp16,
    Fp32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainingConfig {
    pub batch_size: u32,
    /// Total optimizer steps; when 0, `epochs` decides.
    pub steps: u64,
    pub epochs: u32,
    pub seed: u64,
    pub precision: Precision,
    /// Recompute blocks in backward (gradient checkpointing): less memory, about a third slower.
    pub recompute: bool,
    pub noise_offset: f64,
    /// Min-SNR-γ loss weighting (0 = off; 5 is the usual value).
    pub min_snr_gamma: f64,
    pub train_text_encoder: bool,
}

impl Default for TrainingConfig {
    fn default() -> Self {
        TrainingConfig {
            batch_size: 1,
            steps: 1000,
            epochs: 0,
            seed: 42,
            precision: Precision::Auto,
            recompute: true,
            noise_offset: 0.0,
            min_snr_gamma: 0.0,
            train_text_encoder: false,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SavingConfig {
    pub output_dir: PathBuf,
    pub output_name: String,
    /// Save a LoRA (and the resumable state) every N steps (0 = off).
    pub every_n_steps: u64,
    /// Save a LoRA (and the state) every N epochs (0 = off). The final LoRA is always saved.
    pub every_n_epochs: u32,
    /// Keep only the newest K intermediate saves (0 = keep all).
    pub keep_last: u32,
    /// Tensor precision of the saved LoRA.
    pub dtype: SaveDtype,
}

/// The tensor precision LoRA files are written in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SaveDtype {
    /// What other tools expect: half the size of fp32 and no visible loss.
    #[default]
    Fp16,
    Bf16,
    Fp32,
}

impl SaveDtype {
    pub fn dtype(self) -> candle_core::DType {
        match self {
            SaveDtype::Fp16 => candle_core::DType::F16,
            SaveDtype::Bf16 => candle_core::DType::BF16,
            SaveDtype::Fp32 => candle_core::DType::F32,
        }
    }
}

impl Default for SavingConfig {
    fn default() -> Self {
        SavingConfig {
            output_dir: PathBuf::from("output"),
            output_name: "my-lora".into(),
            every_n_steps: 0,
            every_n_epochs: 0,
            keep_last: 0,
            dtype: SaveDtype::Fp16,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SamplingConfig {
    /// Generate the sample prompts every N steps (0 = off).
    pub every_n_steps: u64,
    pub prompts: Vec<SamplePrompt>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SamplePrompt {
    pub prompt: String,
    pub negative: String,
    pub seed: u64,
    pub width: u32,
    pub height: u32,
    pub cfg: f64,
    pub steps: u32,
}

impl Default for SamplePrompt {
    fn default() -> Self {
        SamplePrompt {
            prompt: String::new(),
            negative: String::new(),
            seed: 1,
            width: 512,
            height: 512,
            cfg: 7.0,
            steps: 20,
        }
    }
}

/// A configuration problem, naming the key.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

impl TrainConfig {
    /// Builds a config from the defaults, then each TOML layer in order (a preset, a config file), then
    /// `key=value` overrides (`training.steps=200`, `network.rank=8`, `dataset.folder="/data"`).
    pub fn build(layers: &[(&str, &str)], overrides: &[String]) -> Result<Self, ConfigError> {
        let mut doc = toml::Table::try_from(TrainConfig::default()).expect("defaults serialize");
        for (name, text) in layers {
            let layer: toml::Table =
                toml::from_str(text).map_err(|e| ConfigError(format!("{name}: {e}")))?;
            merge(&mut doc, layer);
        }
        for o in overrides {
            apply_override(&mut doc, o)?;
        }
        // Through text, so a type error shows the offending line (and with it the key).
        let text = toml::to_string(&doc).expect("a TOML table serializes");
        let config: TrainConfig =
            toml::from_str(&text).map_err(|e| ConfigError(format!("configuration: {e}")))?;
        config.validate()?;
        Ok(config)
    }

    /// Loads a config file (as the only layer over the defaults).
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = crate::fsutil::admit::read_text(path, crate::fsutil::admit::TOML)
            .map_err(|e| ConfigError(format!("cannot read {}: {e}", path.display())))?;
        Self::build(&[(&path.display().to_string(), &text)], &[])
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("config serializes")
    }

    /// Every number of the config with the key it is shown under (prompts with their index) and its field.
    pub fn numbers(&self) -> Vec<(String, &'static Field, Number)> {
        let (d, n, o, t, s) = (
            &self.dataset,
            &self.network,
            &self.optimizer,
            &self.training,
            &self.saving,
        );
        let general: Vec<(&'static Field, Number)> = vec![
            (&schema::CLIP_SKIP, self.model.clip_skip.into()),
            (&schema::RESOLUTION, d.resolution.into()),
            (&schema::MIN_BUCKET_SIDE, d.min_bucket_side.into()),
            (&schema::MAX_BUCKET_SIDE, d.max_bucket_side.into()),
            (&schema::BUCKET_STEP, d.bucket_step.into()),
            (&schema::KEEP_TOKENS, d.keep_tokens.into()),
            (&schema::CAPTION_DROPOUT, d.caption_dropout.into()),
            (&schema::TAG_DROPOUT, d.tag_dropout.into()),
            (
                &schema::REGULARIZATION_REPEATS,
                d.regularization_repeats.into(),
            ),
            (&schema::PRIOR_LOSS_WEIGHT, d.prior_loss_weight.into()),
            (&schema::RANK, n.rank.into()),
            (&schema::ALPHA, n.alpha.into()),
            (&schema::CONV_RANK, n.conv_rank.into()),
            (&schema::CONV_ALPHA, n.conv_alpha.into()),
            (&schema::NETWORK_DROPOUT, n.dropout.into()),
            (&schema::BETA1, o.params.beta1.into()),
            (&schema::BETA2, o.params.beta2.into()),
            (&schema::EPS, o.params.eps.into()),
            (&schema::WEIGHT_DECAY, o.params.weight_decay.into()),
            (&schema::D_COEF, o.params.d_coef.into()),
            (&schema::D0, o.params.d0.into()),
            (&schema::LR, o.lr.into()),
            (&schema::LR_TEXT_ENCODER, o.lr_text_encoder.into()),
            (&schema::WARMUP_STEPS, o.warmup_steps.into()),
            (&schema::RESTARTS, o.restarts.into()),
            (&schema::MAX_GRAD_NORM, o.max_grad_norm.into()),
            (
                &schema::GRADIENT_ACCUMULATION,
                o.gradient_accumulation.into(),
            ),
            (&schema::BATCH_SIZE, t.batch_size.into()),
            (&schema::STEPS, t.steps.into()),
            (&schema::EPOCHS, t.epochs.into()),
            (&schema::SEED, t.seed.into()),
            (&schema::NOISE_OFFSET, t.noise_offset.into()),
            (&schema::MIN_SNR_GAMMA, t.min_snr_gamma.into()),
            (&schema::SAVE_EVERY_N_STEPS, s.every_n_steps.into()),
            (&schema::SAVE_EVERY_N_EPOCHS, s.every_n_epochs.into()),
            (&schema::KEEP_LAST, s.keep_last.into()),
            (
                &schema::SAMPLE_EVERY_N_STEPS,
                self.sampling.every_n_steps.into(),
            ),
        ];
        let mut numbers: Vec<_> = general
            .into_iter()
            .map(|(f, v)| (f.key.to_owned(), f, v))
            .collect();
        for (i, p) in self.sampling.prompts.iter().enumerate() {
            for (f, v) in [
                (&schema::PROMPT_SEED, p.seed.into()),
                (&schema::PROMPT_WIDTH, p.width.into()),
                (&schema::PROMPT_HEIGHT, p.height.into()),
                (&schema::PROMPT_STEPS, p.steps.into()),
                (&schema::PROMPT_CFG, p.cfg.into()),
            ] {
                let key = f.key.replace("[]", &format!("[{i}]"));
                numbers.push((key, f, v));
            }
        }
        numbers
    }

    /// Checks every number against its range (`schema`) and the rules between settings; the error names the
    /// key, the value and what it must be.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |key: &str, why: &str| Err(ConfigError(format!("`{key}` {why}")));
        if self.schema > SCHEMA {
            return err(
                "schema",
                "is newer than this app understands; update lora-studio",
            );
        }
        for (key, field, value) in self.numbers() {
            field.check(&key, value).map_err(ConfigError)?;
        }
        let d = &self.dataset;
        if d.min_bucket_side > d.max_bucket_side {
            return Err(ConfigError(format!(
                "`dataset.min_bucket_side` ({}) is above `dataset.max_bucket_side` ({}); lower the first or \
                 raise the second",
                d.min_bucket_side, d.max_bucket_side
            )));
        }
        if self.training.steps == 0 && self.training.epochs == 0 {
            return err(
                "training.steps",
                "and `training.epochs` are both 0; set one of them",
            );
        }
        if self.saving.output_name.trim().is_empty()
            || self.saving.output_name.contains(['/', '\\'])
        {
            return err("saving.output_name", "must be a file name without folders");
        }
        Ok(())
    }
}

fn merge(base: &mut toml::Table, layer: toml::Table) {
    for (k, v) in layer {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(l)) => merge(b, l),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

/// `a.b.c=value`: value parsed as TOML (numbers, booleans, quoted strings, arrays), bare words as strings.
fn apply_override(doc: &mut toml::Table, assignment: &str) -> Result<(), ConfigError> {
    let (key, raw) = assignment.split_once('=').ok_or_else(|| {
        ConfigError(format!(
            "`--set {assignment}`: write it as key=value, e.g. training.steps=200"
        ))
    })?;
    let (key, raw) = (key.trim(), raw.trim());
    let value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"));
    let whole = raw.strip_prefix('-').unwrap_or(raw);
    if value.is_none() && !whole.is_empty() && whole.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ConfigError(format!(
            "`{key}` is {raw}: a config holds whole numbers from {} to {}",
            i64::MIN,
            i64::MAX
        )));
    }
    let value = value.unwrap_or_else(|| toml::Value::String(raw.to_owned()));
    let parts: Vec<&str> = key.split('.').collect();
    let (last, path) = parts.split_last().expect("split yields one part");
    let mut table = doc;
    for p in path {
        table = match table.get_mut(*p) {
            Some(toml::Value::Table(t)) => t,
            _ => {
                return Err(ConfigError(format!(
                    "`--set {key}`: there is no section `{p}`"
                )));
            }
        };
    }
    // Optional paths are absent from the defaults' document.
    let optional = matches!(*last, "vae" | "init_from" | "regularization_folder");
    if !table.contains_key(*last) && !optional {
        return Err(ConfigError(format!("`--set {key}`: unknown key `{last}`")));
    }
    table.insert((*last).to_owned(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_round_trip_and_validate() {
        let c = TrainConfig::default();
        c.validate().unwrap();
        let back = TrainConfig::build(&[("saved", &c.to_toml())], &[]).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn layers_and_overrides_apply_in_order() {
        let preset = "[network]\nrank = 8\n[training]\nsteps = 50\n";
        let c = TrainConfig::build(
            &[("preset", preset)],
            &[
                "training.steps=200".into(),
                "dataset.folder=/data/cats".into(),
                "optimizer.schedule=\"cosine\"".into(),
            ],
        )
        .unwrap();
        assert_eq!(c.network.rank, 8);
        assert_eq!(c.training.steps, 200);
        assert_eq!(c.dataset.folder, PathBuf::from("/data/cats"));
        assert_eq!(c.optimizer.schedule, LrSchedule::Cosine);
    }

    #[test]
    fn values_out_of_range_are_refused_naming_key_and_value() {
        for (set, expect) in [
            (
                "optimizer.max_grad_norm=nan",
                "`optimizer.max_grad_norm` is NaN",
            ),
            (
                "training.noise_offset=inf",
                "`training.noise_offset` is inf",
            ),
            ("optimizer.eps=-1e-8", "`optimizer.eps` is -1e-8"),
            ("network.alpha=1e308", "`network.alpha` is 1e308"),
            (
                "dataset.bucket_step=4294967295",
                "`dataset.bucket_step` is 4294967295",
            ),
            ("dataset.bucket_step=0", "`dataset.bucket_step` is 0"),
            (
                "dataset.max_bucket_side=4294967295",
                "`dataset.max_bucket_side`",
            ),
            ("model.clip_skip=3", "`model.clip_skip` is 3"),
            ("training.steps=100000001", "`training.steps` is 100000001"),
        ] {
            let e = TrainConfig::build(&[], &[set.into()]).unwrap_err();
            assert!(e.0.starts_with(expect), "{set}: {e}");
            assert!(e.0.contains("it must be"), "{set}: {e}");
        }
        let e = TrainConfig::build(
            &[],
            &[
                "dataset.min_bucket_side=2048".into(),
                "dataset.max_bucket_side=1024".into(),
            ],
        )
        .unwrap_err();
        assert!(
            e.0.contains("`dataset.min_bucket_side` (2048) is above"),
            "{e}"
        );
        let e = TrainConfig::build(
            &[("p", "[[sampling.prompts]]\nprompt = \"x\"\ncfg = nan\n")],
            &[],
        )
        .unwrap_err();
        assert!(e.0.starts_with("`sampling.prompts[0].cfg` is NaN"), "{e}");
        let highest = TrainConfig::build(&[], &[format!("training.seed={}", i64::MAX)]).unwrap();
        assert!(highest.to_toml().contains(&i64::MAX.to_string()));
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_key() {
        let e = TrainConfig::build(&[("p", "[network]\nrnak = 8\n")], &[]).unwrap_err();
        assert!(e.0.contains("rnak"), "{e}");
        let e = TrainConfig::build(&[], &["training.stesp=3".into()]).unwrap_err();
        assert!(e.0.contains("stesp"), "{e}");
        let e = TrainConfig::build(&[], &["network.rank=0".into()]).unwrap_err();
        assert!(e.0.contains("network.rank"), "{e}");
        let e =
            TrainConfig::build(&[("p", "[training]\nbatch_size = \"two\"\n")], &[]).unwrap_err();
        assert!(e.0.contains("batch_size"), "{e}");
    }
}
