//! A diffusers model folder: `model_index.json`, and `unet/`, `vae/`, `text_encoder/` each with a config and
//! safetensors weights (whole, sharded, or the `.fp16` variant).

use super::component::ComponentWeights;
use super::file::SafetensorsFile;
use super::{
    CheckpointError, Family, Layout, ModelFiles, Prediction, UNetConfig, ldm_keys, validate,
};
use crate::fsutil::admit;
use crate::model::text_encoder::{Activation, ClipTextConfig};
use crate::model::vae::VaeConfig;
use serde::de::DeserializeOwned;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub fn open(dir: &Path) -> Result<ModelFiles, CheckpointError> {
    let index = dir.join("model_index.json");
    if !present(&index) {
        return Err(CheckpointError::NotDiffusers {
            path: dir.to_path_buf(),
            detail: "it has no model_index.json".into(),
        });
    }
    let index: serde_json::Value = read_json(&index)?;
    check_pipeline(dir, index["_class_name"].as_str().unwrap_or_default())?;
    let text_json = dir.join("text_encoder/config.json");
    let text_encoder_config: ClipTextConfig = read_json(&text_json)?;
    validate::check_text_config(&text_json, &text_encoder_config)?;
    let family = match text_encoder_config.hidden_act {
        Activation::QuickGelu => Family::Sd1,
        Activation::Gelu => Family::Sd2,
    };
    let (prediction, prediction_reason) = scheduler_prediction(dir)?;
    let unet = Arc::new(component_file(
        &dir.join("unet"),
        "diffusion_pytorch_model",
    )?);
    let vae = Arc::new(component_file(&dir.join("vae"), "diffusion_pytorch_model")?);
    let text_encoder = Arc::new(component_file(&dir.join("text_encoder"), "model")?);
    let (unet_json, vae_json) = (dir.join("unet/config.json"), dir.join("vae/config.json"));
    let unet_config = read_json::<UNetConfig>(&unet_json)?;
    validate::check_unet_config(&unet_json, &unet_config)?;
    let vae_config = read_json::<VaeConfig>(&vae_json)?;
    validate::check_vae_config(&vae_json, &vae_config)?;
    let unet = ComponentWeights::new(unet.clone(), ldm_keys::same(&unet));
    let vae = ComponentWeights::new(vae.clone(), ldm_keys::diffusers_vae(&vae, ""));
    let text_encoder =
        ComponentWeights::new(text_encoder.clone(), ldm_keys::hf_clip(&text_encoder, ""));
    for (part, weights) in [
        ("unet", &unet),
        ("vae", &vae),
        ("text_encoder", &text_encoder),
    ] {
        validate::check_tensors(&dir.join(part), weights)?;
    }
    ModelFiles {
        path: dir.to_path_buf(),
        layout: Layout::Diffusers,
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

fn check_pipeline(dir: &Path, class: &str) -> Result<(), CheckpointError> {
    let family = if class.contains("XL") {
        "an SDXL model".to_owned()
    } else if class.starts_with("Flux") {
        "a FLUX model".to_owned()
    } else if class.starts_with("StableDiffusion3") {
        "an SD3 model".to_owned()
    } else if class.starts_with("StableDiffusion")
        && !class.contains("Upscale")
        && !class.contains("UnCLIP")
    {
        return Ok(());
    } else {
        format!("a `{class}` model")
    };
    Err(CheckpointError::Unsupported {
        path: dir.to_path_buf(),
        family,
    })
}

/// diffusers' schedulers default to epsilon when the config does not say.
fn scheduler_prediction(dir: &Path) -> Result<(Prediction, String), CheckpointError> {
    let path = dir.join("scheduler/scheduler_config.json");
    if !path.is_file() {
        return Ok((
            Prediction::Epsilon,
            "the folder has no scheduler config; diffusers then assumes epsilon".into(),
        ));
    }
    let config: serde_json::Value = read_json(&path)?;
    match config["prediction_type"].as_str().unwrap_or("epsilon") {
        "epsilon" => Ok((
            Prediction::Epsilon,
            "scheduler_config.json says epsilon".into(),
        )),
        "v_prediction" => Ok((
            Prediction::V,
            "scheduler_config.json says v_prediction".into(),
        )),
        other => Err(CheckpointError::Unsupported {
            path: dir.to_path_buf(),
            family: format!("a model with prediction type `{other}`"),
        }),
    }
}

/// `{stem}.safetensors`, its shards (`{stem}.safetensors.index.json`), or the `.fp16` variant of either.
pub fn component_file(dir: &Path, stem: &str) -> Result<SafetensorsFile, CheckpointError> {
    for variant in ["", ".fp16"] {
        let whole = dir.join(format!("{stem}{variant}.safetensors"));
        if present(&whole) {
            return SafetensorsFile::open(&whole);
        }
        let index = dir.join(format!("{stem}{variant}.safetensors.index.json"));
        if present(&index) {
            return SafetensorsFile::open_shards(&shards(&index)?);
        }
    }
    if let Some(pickle) = [".bin", ".fp16.bin", ".ckpt"]
        .iter()
        .map(|e| dir.join(format!("{stem}{e}")))
        .find(|p| p.is_file())
    {
        return Err(CheckpointError::Pickle {
            path: pickle,
            kind: "a PyTorch pickle",
        });
    }
    Err(CheckpointError::NotDiffusers {
        path: dir.to_path_buf(),
        detail: format!("it has no {stem}.safetensors"),
    })
}

/// The shard files an index names, in its folder.
fn shards(index: &Path) -> Result<Vec<PathBuf>, CheckpointError> {
    let json: serde_json::Value = read_json(index)?;
    let files: BTreeSet<&str> = json["weight_map"]
        .as_object()
        .ok_or_else(|| CheckpointError::BadConfig {
            path: index.to_path_buf(),
            detail: "it has no weight_map".into(),
        })?
        .values()
        .filter_map(|v| v.as_str())
        .collect();
    if files.is_empty() {
        return Err(CheckpointError::BadConfig {
            path: index.to_path_buf(),
            detail: "its weight_map lists no files".into(),
        });
    }
    let dir = index.parent().unwrap_or(Path::new("."));
    Ok(files.into_iter().map(|f| dir.join(f)).collect())
}

/// Something is at `path` (a file, or a pipe or broken link that reading then refuses with its reason).
fn present(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok()
}

fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T, CheckpointError> {
    let text = admit::read_text(path, admit::JSON).map_err(|source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| CheckpointError::BadConfig {
        path: path.to_path_buf(),
        detail: e.to_string(),
    })
}
