//! Opening a base model: a single-file `.safetensors` checkpoint with LDM/CompVis keys (what users download)
//! or a diffusers folder. [`open`] finds out what the file is (SD 1.x or 2.x, epsilon or v-prediction, or
//! something we refuse with a reason) and gives each network a weight source that answers diffusers names.
//! Pickles (`.ckpt`, `.pt`, `.bin`) are refused without being read: loading them can run code.

mod component;
mod detect;
mod file;
mod folder;
mod ldm_keys;
mod unet_config;
mod validate;

pub use unet_config::{PerBlock, UNetConfig};

use crate::model::text_encoder::ClipTextConfig;
use crate::model::vae::{VaeConfig, default_scaling};
use crate::model::weights::Weights;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use component::ComponentWeights;
use detect::Contents;
use file::SafetensorsFile;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The norm groups of every SD 1.x/2.x UNet and VAE (single files do not say).
const SD_NORM_GROUPS: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Family {
    /// Stable Diffusion 1.x: OpenAI CLIP ViT-L/14 text encoder, 768-wide context.
    Sd1,
    /// Stable Diffusion 2.x: OpenCLIP ViT-H/14 text encoder, 1024-wide context.
    Sd2,
}

impl std::fmt::Display for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Family::Sd1 => "SD 1.x",
            Family::Sd2 => "SD 2.x",
        })
    }
}

pub use crate::sample::Prediction;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    Diffusers,
    SingleFile,
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{} is {kind} (.ckpt/.pt/.bin), which can run code when it is loaded, so lora-studio does not open it. \
         Convert it to .safetensors (for example with ComfyUI's or A1111's converter, or diffusers' conversion \
         scripts) and open the .safetensors file.",
        path.display()
    )]
    Pickle { path: PathBuf, kind: &'static str },
    #[error(
        "{} is a zip archive, not a safetensors file. If it is a PyTorch checkpoint (saved by torch.save), convert \
         it to .safetensors (ComfyUI's or A1111's converter); if it holds a model folder, unpack it and open the \
         folder.",
        path.display()
    )]
    Archive { path: PathBuf },
    #[error("{} is damaged: {detail}. Download it again; an interrupted download leaves a file like this.", path.display())]
    Corrupt { path: PathBuf, detail: String },
    #[error("{} is not a safetensors file: {detail}.", path.display())]
    NotSafetensors { path: PathBuf, detail: String },
    #[error(
        "{} is a LoRA (it has tensors like `{example}`), not a base model. Open the checkpoint it was made for \
         as the model. To try a LoRA, pick it in the Samples workspace (or `lora-studio sample --lora FILE`).",
        path.display()
    )]
    IsLora { path: PathBuf, example: String },
    #[error(
        "{} holds only a VAE. Open the full checkpoint as the model and choose this file as its VAE (the VAE \
         override).",
        path.display()
    )]
    VaeOnly { path: PathBuf },
    #[error("{} is {family}, which lora-studio does not support yet; it trains SD 1.x and SD 2.x models for now.", path.display())]
    Unsupported { path: PathBuf, family: String },
    #[error("{} is not a Stable Diffusion 1.x/2.x checkpoint: {detail}.", path.display())]
    NotStableDiffusion { path: PathBuf, detail: String },
    #[error(
        "{} is not a diffusers model folder: {detail}. Open a folder that has model_index.json, or a single \
         .safetensors checkpoint.",
        path.display()
    )]
    NotDiffusers { path: PathBuf, detail: String },
    #[error("cannot use {}: {detail}. The model folder is incomplete or damaged; download it again.", path.display())]
    BadConfig { path: PathBuf, detail: String },
    #[error("{} cannot be this model's VAE: {detail}.", path.display())]
    NotVae { path: PathBuf, detail: String },
    #[error("{}: tensor `{tensor}` {detail}.", path.display())]
    BadTensor {
        path: PathBuf,
        tensor: String,
        detail: String,
    },
    #[error(
        "{}: `{key}` {detail}. Fix that value in the file, or download the model folder again.",
        path.display()
    )]
    BadConfigKey {
        path: PathBuf,
        key: String,
        detail: String,
    },
}

/// A base model opened for use: its family, how it predicts, the architecture of each network and a
/// weight source per network that answers diffusers names.
pub struct ModelFiles {
    pub path: PathBuf,
    pub layout: Layout,
    pub family: Family,
    pub prediction: Prediction,
    /// Why we think the model predicts what it does (shown to the user).
    pub prediction_reason: String,
    /// Inferred from shapes for single files (with the family's standard heads); tests on non-standard
    /// models replace it.
    pub unet_config: UNetConfig,
    pub vae_config: VaeConfig,
    pub text_encoder_config: ClipTextConfig,
    /// The separate VAE file in use, if one was chosen with [`ModelFiles::with_vae`].
    pub vae_path: Option<PathBuf>,
    unet: ComponentWeights,
    vae: ComponentWeights,
    text_encoder: ComponentWeights,
}

/// Sizes and precision, for the model's description.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelSummary {
    pub parameters: u64,
    /// Bytes the three networks take as stored.
    pub bytes: u64,
    /// Stored dtype (`F16`, `F32`, …) → number of tensors.
    pub dtype_tensors: BTreeMap<String, usize>,
    /// The stored dtype that holds most parameters.
    pub main_dtype: String,
}

/// Opens a `.safetensors` checkpoint or a diffusers folder.
pub fn open(path: &Path) -> Result<ModelFiles, CheckpointError> {
    if path.is_dir() {
        return folder::open(path);
    }
    check_extension(path)?;
    open_single(path)
}

impl ModelFiles {
    pub fn unet(&self) -> &dyn Weights {
        &self.unet
    }

    pub fn vae(&self) -> &dyn Weights {
        &self.vae
    }

    pub fn text_encoder(&self) -> &dyn Weights {
        &self.text_encoder
    }

    /// Overrides what we detected (an SD 2.x single file without metadata cannot say).
    pub fn with_prediction(mut self, prediction: Prediction) -> Self {
        self.prediction = prediction;
        self.prediction_reason = "set by you".into();
        self
    }

    /// Uses a separate VAE: a `.safetensors` file in LDM layout (`encoder.*`, `decoder.*`, `quant_conv.*`,
    /// with or without `first_stage_model.`) or diffusers layout, or a diffusers `vae` folder. Norm groups and
    /// the scaling factor stay the model's.
    pub fn with_vae(mut self, path: &Path) -> Result<Self, CheckpointError> {
        let vae = open_vae(path)?;
        let not_vae = |detail: String| CheckpointError::NotVae {
            path: path.to_path_buf(),
            detail,
        };
        let config = VaeConfig::from_weights(
            &vae,
            self.vae_config.norm_num_groups,
            self.vae_config.scaling_factor,
        )
        .map_err(not_vae)?;
        if config.latent_channels != self.vae_config.latent_channels {
            return Err(not_vae(format!(
                "it makes {}-channel latents and this model works on {}-channel latents",
                config.latent_channels, self.vae_config.latent_channels
            )));
        }
        self.vae = vae;
        self.vae_config = config;
        self.vae_path = Some(path.to_path_buf());
        Ok(self)
    }

    pub fn summary(&self) -> ModelSummary {
        let mut dtype_tensors = BTreeMap::new();
        let mut dtype_params: BTreeMap<String, u64> = BTreeMap::new();
        let (mut parameters, mut bytes) = (0u64, 0u64);
        for part in [&self.unet, &self.vae, &self.text_encoder] {
            for (meta, parts) in part.stored() {
                let params = (meta.elem_count() / parts) as u64;
                let dtype = format!("{:?}", meta.dtype);
                *dtype_tensors.entry(dtype.clone()).or_insert(0) += 1;
                *dtype_params.entry(dtype).or_insert(0) += params;
                parameters += params;
                bytes += params * meta.dtype.bitsize() as u64 / 8;
            }
        }
        let main_dtype = dtype_params
            .into_iter()
            .max_by_key(|(_, n)| *n)
            .map(|(d, _)| d)
            .unwrap_or_default();
        ModelSummary {
            parameters,
            bytes,
            dtype_tensors,
            main_dtype,
        }
    }

    /// One line for the user: what the model is and how we know.
    pub fn describe(&self) -> String {
        let s = self.summary();
        let encoder = match self.family {
            Family::Sd1 => "CLIP ViT-L",
            Family::Sd2 => "OpenCLIP ViT-H",
        };
        let precision = match s.main_dtype.as_str() {
            "F16" => "fp16".to_owned(),
            "BF16" => "bf16".to_owned(),
            "F32" => "fp32".to_owned(),
            other => other.to_ascii_lowercase(),
        };
        let layout = match self.layout {
            Layout::Diffusers => "diffusers folder",
            Layout::SingleFile => "single file",
        };
        format!(
            "{} ({encoder} text encoder, {}-wide context), {} ({}); {precision}, {} parameters ({}); {layout}",
            self.family,
            self.unet_config.cross_attention_dim,
            self.prediction.describe(),
            self.prediction_reason,
            si(s.parameters, ""),
            si(s.bytes, "B"),
        )
    }

    /// The networks must fit together: context width, latent channels.
    fn check_consistent(self) -> Result<Self, CheckpointError> {
        let unet = &self.unet_config;
        let detail = if self.text_encoder_config.hidden_size != unet.cross_attention_dim {
            format!(
                "its text encoder is {} wide but its UNet expects a {}-wide context",
                self.text_encoder_config.hidden_size, unet.cross_attention_dim
            )
        } else if self.vae_config.latent_channels != unet.out_channels {
            format!(
                "its VAE makes {}-channel latents but its UNet predicts {} channels",
                self.vae_config.latent_channels, unet.out_channels
            )
        } else {
            return Ok(self);
        };
        Err(CheckpointError::NotStableDiffusion {
            path: self.path,
            detail,
        })
    }
}

/// 1066000000, "B" → "1.07 GB"; 2100000, "" → "2.1 M".
fn si(n: u64, unit: &str) -> String {
    let n = n as f64;
    let text = match n {
        n if n >= 1e9 => format!("{:.2} G{unit}", n / 1e9),
        n if n >= 1e6 => format!("{:.1} M{unit}", n / 1e6),
        n if n >= 1e3 => format!("{:.1} k{unit}", n / 1e3),
        n => format!("{n} {unit}"),
    };
    text.trim_end().to_owned()
}

/// Only `.safetensors` is opened; pickle extensions are refused before the file is touched.
fn check_extension(path: &Path) -> Result<(), CheckpointError> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    let path = path.to_path_buf();
    match ext.as_deref() {
        Some("safetensors" | "sft") => Ok(()),
        Some("ckpt" | "pt" | "pth" | "bin" | "pkl" | "pickle") => Err(CheckpointError::Pickle {
            path,
            kind: "a PyTorch pickle",
        }),
        Some("gguf") => Err(CheckpointError::Unsupported {
            path,
            family: "a GGUF (quantized) model".into(),
        }),
        _ => Err(CheckpointError::NotSafetensors {
            path,
            detail: "lora-studio opens .safetensors checkpoints and diffusers folders".into(),
        }),
    }
}

fn open_single(path: &Path) -> Result<ModelFiles, CheckpointError> {
    let file = Arc::new(SafetensorsFile::open(path)?);
    let path = path.to_path_buf();
    let names: Vec<&str> = file.names().collect();
    let family = match detect::classify(&names) {
        Contents::StableDiffusion(family) => family,
        Contents::Lora { example } => return Err(CheckpointError::IsLora { path, example }),
        Contents::Vae => return Err(CheckpointError::VaeOnly { path }),
        Contents::Unsupported(family) => {
            return Err(CheckpointError::Unsupported {
                path,
                family: family.into(),
            });
        }
        Contents::Other(detail) => {
            return Err(CheckpointError::NotStableDiffusion { path, detail });
        }
    };
    let text_names = match family {
        Family::Sd1 => ldm_keys::hf_clip(&file, ldm_keys::CLIP_L_PREFIX),
        Family::Sd2 => ldm_keys::open_clip(&file),
    };
    let unet = ComponentWeights::new(file.clone(), ldm_keys::unet(&file));
    let vae = ComponentWeights::new(file.clone(), ldm_keys::ldm_vae(&file, ldm_keys::VAE_PREFIX));
    let text_encoder = ComponentWeights::new(file.clone(), text_names);
    for part in [&unet, &vae, &text_encoder] {
        validate::check_tensors(&path, part)?;
    }
    let invalid = |detail: String| CheckpointError::NotStableDiffusion {
        path: path.clone(),
        detail,
    };
    let mut unet_config = UNetConfig::from_weights(&unet, family).map_err(invalid)?;
    validate::check_unet_config(&path, &unet_config)?;
    let vae_config =
        VaeConfig::from_weights(&vae, SD_NORM_GROUPS, default_scaling()).map_err(invalid)?;
    validate::check_vae_config(&path, &vae_config)?;
    let text_encoder_config =
        ClipTextConfig::from_weights(&text_encoder, family).map_err(invalid)?;
    validate::check_text_config(&path, &text_encoder_config)?;
    let (prediction, prediction_reason) =
        detect::single_file_prediction(file.metadata(), family, &unet, &unet_config);
    // SD 2.x v models were trained at 768 px (96 latent pixels), everything else at 512 px.
    unet_config.sample_size = if family == Family::Sd2 && prediction == Prediction::V {
        96
    } else {
        64
    };
    ModelFiles {
        path,
        layout: Layout::SingleFile,
        family,
        prediction,
        prediction_reason,
        unet_config,
        vae_config,
        text_encoder_config,
        vae_path: None,
        unet,
        vae,
        text_encoder,
    }
    .check_consistent()
}

/// A standalone VAE: a file (LDM or diffusers names, any prefix a checkpoint uses) or a diffusers `vae` folder.
fn open_vae(path: &Path) -> Result<ComponentWeights, CheckpointError> {
    let file = if path.is_dir() {
        folder::component_file(path, "diffusion_pytorch_model")?
    } else {
        check_extension(path)?;
        SafetensorsFile::open(path)?
    };
    let file = Arc::new(file);
    let names: Vec<&str> = file.names().collect();
    let path_buf = path.to_path_buf();
    match detect::classify(&names) {
        Contents::Lora { example } => {
            return Err(CheckpointError::IsLora {
                path: path_buf,
                example,
            });
        }
        Contents::Unsupported(family) => {
            return Err(CheckpointError::NotVae {
                path: path_buf,
                detail: format!("it is {family}"),
            });
        }
        _ => {}
    }
    let prefix = ["first_stage_model.", "vae."]
        .into_iter()
        .find(|p| {
            names
                .iter()
                .any(|k| k.starts_with(p) && k.contains("coder."))
        })
        .unwrap_or("");
    let diffusers = names.iter().any(|k| k.contains("encoder.down_blocks."));
    let table = if diffusers {
        ldm_keys::diffusers_vae(&file, prefix)
    } else {
        ldm_keys::ldm_vae(&file, prefix)
    };
    let vae = ComponentWeights::new(file, table);
    validate::check_tensors(path, &vae)?;
    if !(vae.contains("encoder.conv_in.weight") && vae.contains("decoder.conv_out.weight")) {
        return Err(CheckpointError::NotVae {
            path: path.to_path_buf(),
            detail: "it has no VAE encoder and decoder (`encoder.conv_in`, `decoder.conv_out`)"
                .into(),
        });
    }
    Ok(vae)
}

/// One of our weight sources as a candle `VarBuilder`, for the inference-only networks built from candle-nn
/// layers (text encoder, VAE). Every shape is checked against what the network expects.
pub fn var_builder<'a>(w: &'a dyn Weights, dtype: DType, device: &Device) -> VarBuilder<'a> {
    VarBuilder::from_backend(Box::new(Backend(w)), dtype, device.clone())
}

struct Backend<'a>(&'a dyn Weights);

impl SimpleBackend for Backend<'_> {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.0.get_shaped(name, shape.dims(), dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.0.get(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.contains(name)
    }
}
