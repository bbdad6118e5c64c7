//! What a single-file checkpoint holds, from its tensor names, and how an SD 2.x file predicts.

use super::ldm_keys::{CLIP_L_PREFIX, OPEN_CLIP_PREFIX, UNET_PREFIX, VAE_PREFIX};
use super::{Family, Prediction, UNetConfig};
use crate::model::weights::Weights;
use candle_core::{DType, Device};
use std::collections::HashMap;

pub enum Contents {
    StableDiffusion(Family),
    Lora {
        example: String,
    },
    Vae,
    /// A model family we recognise but do not train yet.
    Unsupported(&'static str),
    /// Something else; the text says what was (not) found.
    Other(String),
}

/// Name fragments of LoRA and LyCORIS adapter files (kohya, diffusers/PEFT and the older diffusers
/// attention-processor format, LoHa, LoKr, OFT).
const ADAPTER_MARKS: &[&str] = &[
    "lora_unet_",
    "lora_te",
    ".lora_A.",
    ".lora_B.",
    ".lora_down.",
    ".lora_up.",
    "lora_linear_layer.",
    ".lora.down.",
    "_lora.down.",
    ".hada_w1",
    ".lokr_w1",
    ".oft_blocks",
];

pub fn classify(names: &[&str]) -> Contents {
    let keys = Keys(names);
    if let Some(k) = names
        .iter()
        .find(|k| ADAPTER_MARKS.iter().any(|m| k.contains(m)))
    {
        return Contents::Lora {
            example: (*k).to_owned(),
        };
    }
    if let Some(family) = unsupported_family(&keys) {
        return Contents::Unsupported(family);
    }
    if !keys.any(|k| k.starts_with(UNET_PREFIX)) {
        return without_unet(&keys);
    }
    if keys.any(|k| k.starts_with("model.diffusion_model.label_emb.")) {
        return Contents::Unsupported("a class-conditioned SD 2.x model (unCLIP or upscaler)");
    }
    let family = if keys.any(|k| k.starts_with(OPEN_CLIP_PREFIX)) {
        Family::Sd2
    } else if keys.any(|k| k.starts_with(CLIP_L_PREFIX)) {
        Family::Sd1
    } else {
        return Contents::Other(format!(
            "it has a UNet but no text encoder (no `{CLIP_L_PREFIX}…` or `{OPEN_CLIP_PREFIX}…` tensors)"
        ));
    };
    if !keys.any(|k| k.starts_with(VAE_PREFIX)) {
        return Contents::Other(format!(
            "it has a UNet and a text encoder but no VAE (no `{VAE_PREFIX}…` tensors)"
        ));
    }
    Contents::StableDiffusion(family)
}

struct Keys<'a>(&'a [&'a str]);

impl Keys<'_> {
    fn any(&self, f: impl Fn(&str) -> bool) -> bool {
        self.0.iter().any(|k| f(k))
    }
}

fn unsupported_family(keys: &Keys) -> Option<&'static str> {
    if keys.any(|k| k.starts_with("conditioner.embedders.") || k.starts_with("add_embedding.")) {
        Some("an SDXL model")
    } else if keys.any(|k| k.contains("double_blocks."))
        || (keys.any(|k| k.contains("transformer_blocks."))
            && keys.any(|k| k.contains("x_embedder")))
    {
        Some("a FLUX model")
    } else if keys.any(|k| k.contains("joint_blocks.")) {
        Some("an SD3 model")
    } else {
        None
    }
}

fn without_unet(keys: &Keys) -> Contents {
    if keys.any(|k| k.ends_with("encoder.conv_in.weight"))
        && keys.any(|k| k.ends_with("decoder.conv_in.weight"))
    {
        return Contents::Vae;
    }
    if keys.any(|k| k.starts_with("down_blocks.") || k.starts_with("mid_block.")) {
        return Contents::Other(
            "it holds a UNet with diffusers names but nothing else; open the diffusers folder it came from".into(),
        );
    }
    let mut examples: Vec<&str> = keys.0.iter().take(3).copied().collect();
    examples.sort_unstable();
    Contents::Other(format!(
        "it has no UNet (`{UNET_PREFIX}…`); its tensors are named like {examples:?}"
    ))
}

/// How a single-file checkpoint predicts, and why we think so. In order: the file's `modelspec` metadata;
/// SD 1.x always predicts noise; SD 2.x inpainting models predict noise; for a standard-size SD 2.x UNet the
/// weight statistic ComfyUI uses (the spread of one late norm bias is larger in v models); otherwise v, since
/// the SD 2.x 768 models are v-prediction. The caller can override it.
pub fn single_file_prediction(
    metadata: &HashMap<String, String>,
    family: Family,
    unet: &dyn Weights,
    config: &UNetConfig,
) -> (Prediction, String) {
    if let Some(p) = metadata_prediction(metadata) {
        return (p, "the file's modelspec metadata says so".into());
    }
    match family {
        Family::Sd1 => (Prediction::Epsilon, "SD 1.x models predict noise".into()),
        Family::Sd2 if config.in_channels != 4 => (
            Prediction::Epsilon,
            "SD 2.x inpainting models predict noise".into(),
        ),
        Family::Sd2 => match v_statistic(unet, config) {
            Some(true) => (
                Prediction::V,
                "the weights look like a v-prediction model (ComfyUI's test)".into(),
            ),
            Some(false) => (
                Prediction::Epsilon,
                "the weights look like an epsilon model (ComfyUI's test)".into(),
            ),
            None => (
                Prediction::V,
                "assumed: SD 2.x single files without metadata are taken to be 768-v models; \
                 set epsilon for an SD 2.x-base (512) model"
                    .into(),
            ),
        },
    }
}

fn metadata_prediction(metadata: &HashMap<String, String>) -> Option<Prediction> {
    match metadata
        .get("modelspec.prediction_type")?
        .to_ascii_lowercase()
        .as_str()
    {
        "epsilon" | "eps" => Some(Prediction::Epsilon),
        "v" | "v_prediction" | "v-prediction" => Some(Prediction::V),
        _ => None,
    }
}

/// ComfyUI's SD 2.x test: the population std of the last attention block's first norm bias exceeds 0.09 in
/// v models. It was calibrated on the standard SD 2.x UNet only (320 channels, context 1024).
fn v_statistic(unet: &dyn Weights, config: &UNetConfig) -> Option<bool> {
    if config.block_out_channels.first() != Some(&320) || config.cross_attention_dim != 1024 {
        return None;
    }
    let last = config.block_out_channels.len() - 1;
    let name = format!(
        "up_blocks.{last}.attentions.{}.transformer_blocks.0.norm1.bias",
        config.layers_per_block
    );
    let values = unet
        .get(&name, DType::F32, &Device::Cpu)
        .ok()?
        .to_vec1::<f32>()
        .ok()?;
    let n = values.len() as f64;
    let mean = values.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = values
        .iter()
        .map(|&v| (v as f64 - mean).powi(2))
        .sum::<f64>()
        / n;
    Some(var.sqrt() > 0.09)
}
