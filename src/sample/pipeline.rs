//! Text to image with a checkpoint and any LoRAs: what `lora-studio sample` and training previews run.
//! LoRAs go onto the UNet unmerged (each at its weight) and are merged into the text encoder as it is built.

use super::{NoiseSchedule, Prediction, SampleConfig, Sampler, initial_noise, sample};
use crate::model::adapters::{Attach, attach};
use crate::model::checkpoint::{self, ModelFiles};
use crate::model::text_encoder::TextEncoder;
use crate::model::tokenizer::ClipTokenizer;
use crate::model::unet::{UNet, UNetOptions};
use crate::model::vae::{Vae, tensor_to_images};
use crate::model::weights::{Weights, WithDeltas};
use candle_core::{DType, Device, Tensor};
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

/// Prompts are encoded as up to this many 75-token windows (A1111/kohya style); the rest is dropped.
pub const MAX_CHUNKS: usize = 3;

/// One image to make.
#[derive(Clone, Debug)]
pub struct Request {
    pub prompt: String,
    pub negative: String,
    pub seed: u64,
    pub steps: usize,
    pub cfg: f64,
    pub sampler: Sampler,
    pub width: usize,
    pub height: usize,
    /// Start from these latents ([1, 4, H/8, W/8]) instead of seeded noise, for exact comparisons.
    pub latents: Option<Tensor>,
}

impl Request {
    /// The same ranges as the sample flags and the GUI's fields (`schema`), checked before any model loads, so
    /// that no caller can ask for a sample the sampler cannot make; `loras` are (file, weight).
    pub fn check(&self, loras: &[(PathBuf, f64)]) -> Result<(), String> {
        use crate::schema::{self, Number};
        let numbers = [
            ("steps", &schema::PROMPT_STEPS, self.steps.into()),
            ("cfg", &schema::PROMPT_CFG, self.cfg.into()),
            ("width", &schema::PROMPT_WIDTH, self.width.into()),
            ("height", &schema::PROMPT_HEIGHT, self.height.into()),
            ("seed", &schema::PROMPT_SEED, self.seed.into()),
        ];
        for (key, field, value) in numbers {
            field.check(key, value)?;
        }
        for (path, weight) in loras {
            let key = format!("the weight of {}", path.display());
            schema::LORA_WEIGHT.check(&key, Number::Real(*weight))?;
        }
        Ok(())
    }
}

/// The model to draw with and how to read it.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelChoice {
    /// A single-file .safetensors or a diffusers folder.
    pub checkpoint: PathBuf,
    /// Another VAE than the checkpoint's.
    pub vae: Option<PathBuf>,
    /// 1 = last text-encoder layer, 2 = penultimate.
    pub clip_skip: usize,
    /// What the model predicts, when the detection is wrong.
    pub prediction: Option<Prediction>,
}

/// An image drawn by [`draw`], with what the user should know about it.
pub struct Drawn {
    pub image: image::RgbImage,
    /// The model as detected (`ModelFiles::describe`).
    pub model: String,
    pub warnings: Vec<String>,
}

/// Loads `model` with `loras` (file, weight) on `device` and draws `req`: what `lora-studio sample` and the
/// Samples workspace's "Try the LoRA" run. The CPU computes in f32 (it has no fast bf16), a GPU in bf16.
pub fn draw(
    model: &ModelChoice,
    loras: &[(PathBuf, f64)],
    req: &Request,
    device: &Device,
    progress: impl FnMut(usize, usize),
) -> Result<Drawn, String> {
    req.check(loras)?;
    let dtype = if device.is_cpu() {
        DType::F32
    } else {
        DType::BF16
    };
    let mut p = Pipeline::load(
        &model.checkpoint,
        model.vae.as_deref(),
        loras,
        device,
        dtype,
    )?;
    p.clip_skip = model.clip_skip.max(1);
    if let Some(pr) = model.prediction {
        p.model.prediction = pr;
    }
    let f = p.model.vae_config.downsample_factor();
    if !req.width.is_multiple_of(f) || !req.height.is_multiple_of(f) {
        return Err(format!(
            "The width and height must be multiples of {f} for this model (not {}×{}).",
            req.width, req.height
        ));
    }
    let mut warnings = std::mem::take(&mut p.warnings);
    let dropped = p.prompt_overflow(&req.prompt);
    if dropped > 0 {
        warnings.push(format!(
            "the prompt is {dropped} tokens longer than the {} encoded; those are ignored",
            MAX_CHUNKS * 75
        ));
    }
    let image = p
        .generate(req, progress)
        .map_err(|e| format!("sampling failed: {e}"))?;
    Ok(Drawn {
        image,
        model: p.model.describe(),
        warnings,
    })
}

pub struct Pipeline {
    pub model: ModelFiles,
    tokenizer: ClipTokenizer,
    text_encoder: TextEncoder,
    vae: Vae,
    unet: UNet,
    schedule: NoiseSchedule,
    device: Device,
    /// 1 = last text-encoder layer, 2 = penultimate.
    pub clip_skip: usize,
    /// Things the user should know (LoRA keys that matched nothing, prompts cut short).
    pub warnings: Vec<String>,
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

impl Pipeline {
    /// Opens `model` (file or diffusers folder), optionally with another VAE, and puts `loras` (file, weight)
    /// on it. The VAE runs in f32 (the SD VAE overflows in fp16); the UNet and text encoder in `dtype`.
    pub fn load(
        model: &Path,
        vae: Option<&Path>,
        loras: &[(PathBuf, f64)],
        device: &Device,
        dtype: DType,
    ) -> Result<Pipeline, String> {
        let mut files = checkpoint::open(model).map_err(err)?;
        if let Some(v) = vae {
            files = files.with_vae(v).map_err(err)?;
        }
        let options = UNetOptions::default();
        let mut unet =
            UNet::load(files.unet(), &files.unet_config, options, dtype, device).map_err(err)?;
        let mut known = unet.module_paths().map_err(err)?;
        known.extend(text_encoder_paths(files.text_encoder()));
        let mut te_deltas: HashMap<String, Tensor> = HashMap::new();
        let mut warnings = Vec::new();
        for (path, weight) in loras {
            let (set, report) = crate::lora::load(path, &known).map_err(err)?;
            if !report.unmatched.is_empty() {
                warnings.push(format!(
                    "{}: {} keys match nothing in this model (first: {})",
                    path.display(),
                    report.unmatched.len(),
                    report.unmatched[0]
                ));
            }
            attach(
                unet.layers_mut().map_err(err)?,
                &set,
                "unet",
                *weight,
                Attach::Unmerged,
            )
            .map_err(err)?;
            for (name, m) in set
                .modules
                .iter()
                .filter_map(|(k, m)| Some((k.strip_prefix("text_encoder.")?, m)))
            {
                let d = m.delta(*weight).map_err(err)?;
                let key = format!("{name}.weight");
                let total = match te_deltas.remove(&key) {
                    Some(prev) => (prev + d).map_err(err)?,
                    None => d,
                };
                te_deltas.insert(key, total);
            }
        }
        let te_weights = WithDeltas::new(files.text_encoder(), te_deltas);
        let text_encoder = TextEncoder::new(&te_weights, &files.text_encoder_config, dtype, device)
            .map_err(err)?;
        let vae = Vae::new(files.vae(), &files.vae_config, DType::F32, device).map_err(err)?;
        let tokenizer = tokenizer_for(model, files.family)?;
        Ok(Pipeline {
            tokenizer,
            model: files,
            text_encoder,
            vae,
            unet,
            schedule: NoiseSchedule::stable_diffusion(),
            device: device.clone(),
            clip_skip: 1,
            warnings,
        })
    }

    pub fn prediction(&self) -> Prediction {
        self.model.prediction
    }

    /// Tokens of `prompt` beyond what is encoded (`MAX_CHUNKS` windows of 75), for a warning.
    pub fn prompt_overflow(&self, prompt: &str) -> usize {
        self.tokenizer.tokenize(prompt, MAX_CHUNKS).dropped
    }

    /// (uncond, cond) text contexts for a negative and a positive prompt.
    pub fn encode_prompts(
        &self,
        negative: &str,
        prompt: &str,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let (ids, _) =
            self.tokenizer
                .tokenize_batch(&[negative, prompt], MAX_CHUNKS, &self.device)?;
        let emb = self.text_encoder.forward(&ids)?;
        let ctx = emb.context(self.clip_skip)?;
        Ok((ctx.narrow(0, 0, 1)?, ctx.narrow(0, 1, 1)?))
    }

    /// Makes the latents of one image (before decoding), calling `progress(done, total)` after each step.
    pub fn latents(
        &self,
        req: &Request,
        progress: impl FnMut(usize, usize),
    ) -> candle_core::Result<Tensor> {
        let f = self.model.vae_config.downsample_factor();
        let shape = (
            1,
            self.model.unet_config.in_channels,
            req.height / f,
            req.width / f,
        );
        let noise = match &req.latents {
            Some(l) if l.dims() != [shape.0, shape.1, shape.2, shape.3] => candle_core::bail!(
                "the latents have shape {:?}, but a {}×{} image of this model needs {shape:?}: set --width and \
                 --height to the size they were made for",
                l.dims(),
                req.width,
                req.height
            ),
            Some(l) => l.to_device(&self.device)?.to_dtype(DType::F32)?,
            None => initial_noise(req.seed, shape, &self.device)?,
        };
        let (uncond, cond) = self.encode_prompts(&req.negative, &req.prompt)?;
        let config = SampleConfig {
            sampler: req.sampler,
            steps: req.steps,
            cfg: req.cfg,
            prediction: self.prediction(),
            seed: req.seed,
        };
        let unet = &self.unet;
        sample(
            &self.schedule,
            &config,
            &noise,
            &cond,
            &uncond,
            |x, t, c| unet.forward(x, t, c),
            progress,
        )
    }

    /// Makes one image.
    pub fn generate(
        &self,
        req: &Request,
        progress: impl FnMut(usize, usize),
    ) -> candle_core::Result<image::RgbImage> {
        let latents = self.latents(req, progress)?;
        Ok(tensor_to_images(&self.decode(&latents)?)?.remove(0))
    }

    /// Latents as [`Pipeline::latents`] returns them → images `[B, 3, H, W]` in about [-1, 1], f32, before
    /// any clipping or rounding (what `generate` turns into pixels).
    pub fn decode(&self, latents: &Tensor) -> candle_core::Result<Tensor> {
        self.vae
            .decode(&self.vae.unscale(&latents.to_dtype(DType::F32)?)?)
    }
}

/// Module paths of the text encoder's linear layers, `text_encoder.` in front, as LoRA files name them.
fn text_encoder_paths(w: &dyn Weights) -> BTreeSet<String> {
    w.names()
        .into_iter()
        .filter(|n| n.contains(".encoder.layers.") && w.shape(n).is_some_and(|s| s.len() == 2))
        .filter_map(|n| {
            n.strip_suffix(".weight")
                .map(|p| format!("text_encoder.{p}"))
        })
        .collect()
}

/// The tokenizer of `model`: the folder's own when it is a diffusers folder with tokenizer files, else the
/// bundled one of its family.
pub fn tokenizer_for(
    model: &Path,
    family: crate::model::checkpoint::Family,
) -> Result<ClipTokenizer, String> {
    match folder_tokenizer(model) {
        Some(t) => t,
        None => Ok(ClipTokenizer::bundled(family)),
    }
}

/// The tokenizer shipped in a diffusers folder (`tokenizer/vocab.json`, `merges.txt`, its pad token), if any.
fn folder_tokenizer(model: &Path) -> Option<Result<ClipTokenizer, String>> {
    let dir = model.join("tokenizer");
    let (vocab, merges) = (dir.join("vocab.json"), dir.join("merges.txt"));
    if !vocab.is_file() || !merges.is_file() {
        return None;
    }
    Some((|| {
        let read_json = |p: PathBuf| -> Result<serde_json::Value, String> {
            let text = crate::fsutil::admit::read_text(&p, crate::fsutil::admit::JSON)
                .map_err(|e| format!("cannot read {}: {e}", p.display()))?;
            serde_json::from_str(&text)
                .map_err(|e| format!("{} is not valid JSON: {e}", p.display()))
        };
        let ids = read_json(vocab.clone())?;
        let pad_token = read_json(dir.join("special_tokens_map.json"))
            .ok()
            // A plain string, or {"content": …} in newer files.
            .and_then(|m| {
                m["pad_token"]
                    .as_str()
                    .or(m["pad_token"]["content"].as_str())
                    .map(str::to_owned)
            })
            .unwrap_or_else(|| "<|endoftext|>".into());
        let pad = ids[&pad_token]
            .as_u64()
            .ok_or_else(|| format!("the pad token {pad_token} is not in {}", vocab.display()))?;
        ClipTokenizer::from_files(&vocab, &merges, pad as u32).map_err(err)
    })())
}

/// The tensor `latents` of a safetensors file (`sample --latents`), checked to be finite.
pub fn read_latents(path: &Path, device: &candle_core::Device) -> Result<Tensor, String> {
    use crate::fsutil::admit;
    let cannot = |e: &dyn std::fmt::Display| {
        format!(
            "cannot read {} (--latents): {e}; give a .safetensors file with one tensor named `latents`",
            path.display()
        )
    };
    admit::regular_file(path, admit::SAFETENSORS).map_err(|e| cannot(&e))?;
    let latents = candle_core::safetensors::load(path, device)
        .map_err(|e| cannot(&e))?
        .remove("latents")
        .ok_or_else(|| cannot(&"it has no tensor named `latents`"))?;
    if !crate::model::weights::all_finite(&latents).map_err(|e| cannot(&e))? {
        return Err(cannot(&"`latents` holds NaN or infinite values"));
    }
    Ok(latents)
}
