//! A checkpoint's tensors and configs checked against what an SD 1.x/2.x network can use, before anything is
//! built from them: the networks index shapes and divide by config values, so a damaged file must be refused
//! here, naming the tensor or key, rather than panic or fail deep inside a layer with a message about groups.

use super::component::{ComponentWeights, Transform};
use super::{CheckpointError, PerBlock, UNetConfig};
use crate::model::text_encoder::ClipTextConfig;
use crate::model::vae::VaeConfig;
use crate::model::weights::all_finite;
use candle_core::Device;
use safetensors::Dtype;
use std::path::Path;

/// Tensors at most this large get their values checked (norms, biases, embeddings of a tiny model); together
/// they are a small part of a checkpoint.
const STAT_PASS_ELEMS: usize = 1 << 16;

/// What to do about a bad tensor.
const REDO: &str = "the file is damaged or was converted wrongly: download it again, or convert it again from \
                    the original";

/// Every tensor of `w`: a float dtype, the rank its name calls for, the shapes a resnet chains together, and
/// finite values in the small tensors and the input and output convolutions.
pub fn check_tensors(path: &Path, w: &ComponentWeights) -> Result<(), CheckpointError> {
    let bad = |key: &str, detail: String| CheckpointError::BadTensor {
        path: path.to_path_buf(),
        tensor: key.to_owned(),
        detail,
    };
    let mut entries: Vec<_> = w.entries().collect();
    entries.sort_by(|a, b| a.0.cmp(b.0));
    for &(name, key, meta, transform) in &entries {
        if !matches!(
            meta.dtype,
            Dtype::F16 | Dtype::BF16 | Dtype::F32 | Dtype::F64
        ) {
            return Err(bad(
                key,
                format!(
                    "is stored as {:?}; model weights are f16, bf16 or f32, so {REDO}",
                    meta.dtype
                ),
            ));
        }
        let stored = &meta.shape;
        let fits = match transform {
            Transform::Same => true,
            Transform::Squeeze1x1 => stored.len() == 4 && stored[2..] == [1, 1],
            Transform::Chunk { count, .. } => {
                stored.first().is_some_and(|&n| n > 0 && n % count == 0)
            }
        };
        let shape = w.shape_of(name).filter(|_| fits);
        let Some(shape) = shape.filter(|s| s.iter().all(|&d| d > 0)) else {
            return Err(bad(
                key,
                format!("has shape {stored:?}, which cannot hold `{name}`; {REDO}"),
            ));
        };
        if let Some(expected) = expected_rank(name)
            && !expected.contains(&shape.len())
        {
            return Err(bad(
                key,
                format!(
                    "is {}-dimensional {shape:?}, but `{name}` is {} ; {REDO}",
                    shape.len(),
                    describe_rank(expected)
                ),
            ));
        }
        if is_conv(name) && (shape[2] != shape[3] || shape[2] % 2 == 0 || shape[2] > 7) {
            return Err(bad(
                key,
                format!(
                    "has shape {shape:?}, but `{name}` is a convolution [out, in, k, k] with a small odd kernel \
                     (is it transposed?); {REDO}"
                ),
            ));
        }
    }
    for &(name, key, _, _) in &entries {
        if let Some(prefix) = name.strip_suffix(".conv1.weight") {
            check_resnet(w, prefix).map_err(|detail| bad(key, format!("{detail}; {REDO}")))?;
        }
    }
    for &(name, key, meta, _) in &entries {
        let io_conv = name.ends_with("conv_in.weight") || name.ends_with("conv_out.weight");
        if !(io_conv || meta.elem_count() <= STAT_PASS_ELEMS) {
            continue;
        }
        let t = w
            .load_stored(key, &Device::Cpu)
            .map_err(|e| bad(key, format!("cannot be read ({e}); {REDO}")))?;
        if !all_finite(&t).map_err(|e| bad(key, format!("cannot be read ({e}); {REDO}")))? {
            return Err(bad(key, format!("holds NaN or infinite values; {REDO}")));
        }
    }
    Ok(())
}

/// The ranks a diffusers tensor name allows, where its name says.
fn expected_rank(name: &str) -> Option<&'static [usize]> {
    let last = name.rsplit('.').nth(1).unwrap_or_default();
    if name.ends_with(".bias") || last.contains("norm") {
        return Some(&[1]);
    }
    if is_conv(name) {
        return Some(&[4]);
    }
    if ["proj_in", "proj_out"].contains(&last) {
        return Some(&[2, 4]);
    }
    let linear = [
        "to_q",
        "to_k",
        "to_v",
        "q_proj",
        "k_proj",
        "v_proj",
        "out_proj",
        "fc1",
        "fc2",
        "proj",
        "linear_1",
        "linear_2",
        "time_emb_proj",
    ];
    if linear.contains(&last)
        || name.ends_with("to_out.0.weight")
        || name.ends_with("ff.net.2.weight")
    {
        return Some(&[2]);
    }
    if name.ends_with("embedding.weight") {
        return Some(&[2]);
    }
    None
}

fn describe_rank(ranks: &[usize]) -> String {
    let words: Vec<String> = ranks.iter().map(|r| format!("{r}-dimensional")).collect();
    words.join(" or ")
}

fn is_conv(name: &str) -> bool {
    let last = name.rsplit('.').nth(1).unwrap_or_default();
    name.ends_with(".weight")
        && matches!(
            last,
            "conv_in"
                | "conv_out"
                | "conv1"
                | "conv2"
                | "conv_shortcut"
                | "conv"
                | "quant_conv"
                | "post_quant_conv"
        )
}

/// A resnet's convolutions and norms must chain: norm1 and conv1 read the input's channels, conv1 makes the
/// output's, which norm2 and conv2 read and conv2 keeps; a shortcut exists exactly when the two differ.
fn check_resnet(w: &ComponentWeights, prefix: &str) -> Result<(), String> {
    let shape = |part: &str| w.shape_of(&format!("{prefix}.{part}.weight"));
    let Some(conv1) = shape("conv1") else {
        return Ok(());
    };
    let (cout, cin) = (conv1[0], conv1[1]);
    let mut wants = vec![("norm1", vec![cin]), ("norm2", vec![cout])];
    if let Some(conv2) = shape("conv2")
        && conv2[..2] != [cout, cout]
    {
        return Err(format!(
            "`{prefix}.conv2.weight` has shape {conv2:?}, but conv1 makes {cout} channels, so it must start \
                 [{cout}, {cout}, …] (is it transposed?)"
        ));
    }
    match shape("conv_shortcut") {
        Some(_) => wants.push(("conv_shortcut", vec![cout, cin, 1, 1])),
        None if cin != cout => {
            return Err(format!(
                "`{prefix}.conv1.weight` has shape {conv1:?}: it changes {cin} channels into {cout}, but the \
                 block has no shortcut for that (is the weight transposed?)"
            ));
        }
        None => {}
    }
    for (part, want) in wants {
        if let Some(found) = shape(part)
            && found != want
        {
            return Err(format!(
                "`{prefix}.{part}.weight` has shape {found:?}, but `{prefix}.conv1.weight` {conv1:?} needs \
                 {want:?} (is a weight transposed?)"
            ));
        }
    }
    Ok(())
}

/// A UNet config (a diffusers `unet/config.json`, or one inferred from shapes) that the network can be built
/// from: one block type per level, values above 0, heads that divide the channels.
pub fn check_unet_config(path: &Path, c: &UNetConfig) -> Result<(), CheckpointError> {
    let bad = |key: &str, detail: String| CheckpointError::BadConfigKey {
        path: path.to_path_buf(),
        key: key.to_owned(),
        detail,
    };
    let levels = c.block_out_channels.len();
    if levels == 0 || c.block_out_channels.contains(&0) {
        return Err(bad(
            "block_out_channels",
            format!(
                "is {:?}; it needs one channel count above 0 per level",
                c.block_out_channels
            ),
        ));
    }
    for (key, list, known) in [
        (
            "down_block_types",
            &c.down_block_types,
            ["CrossAttnDownBlock2D", "DownBlock2D"],
        ),
        (
            "up_block_types",
            &c.up_block_types,
            ["CrossAttnUpBlock2D", "UpBlock2D"],
        ),
    ] {
        if list.len() != levels {
            return Err(bad(
                key,
                format!(
                    "lists {} block types for {levels} levels (`block_out_channels`)",
                    list.len()
                ),
            ));
        }
        if let Some(other) = list.iter().find(|t| !known.contains(&t.as_str())) {
            return Err(bad(
                key,
                format!("has `{other}`; SD 1.x/2.x UNets use {known:?}"),
            ));
        }
    }
    for (key, value) in [
        ("layers_per_block", c.layers_per_block),
        ("in_channels", c.in_channels),
        ("out_channels", c.out_channels),
        ("cross_attention_dim", c.cross_attention_dim),
        ("norm_num_groups", c.norm_num_groups),
        ("sample_size", c.sample_size),
    ] {
        if value == 0 {
            return Err(bad(key, "is 0".into()));
        }
    }
    if !(c.norm_eps.is_finite() && c.norm_eps > 0.0) {
        return Err(bad(
            "norm_eps",
            format!("is {}; it must be a small positive number", c.norm_eps),
        ));
    }
    let per_block = |key: &str, v: &PerBlock| match v {
        PerBlock::One(0) => Err(bad(key, "is 0".into())),
        PerBlock::Each(list) if list.len() != levels || list.contains(&0) => Err(bad(
            key,
            format!("is {list:?}; it needs one value above 0 for each of the {levels} levels"),
        )),
        _ => Ok(()),
    };
    per_block(
        "transformer_layers_per_block",
        &c.transformer_layers_per_block,
    )?;
    let heads_key = match &c.num_attention_heads {
        Some(h) => {
            per_block("num_attention_heads", h)?;
            "num_attention_heads"
        }
        None => {
            per_block("attention_head_dim", &c.attention_head_dim)?;
            "attention_head_dim"
        }
    };
    for (level, &channels) in c.block_out_channels.iter().enumerate() {
        let heads = c.heads(level);
        if !channels.is_multiple_of(heads) {
            return Err(bad(
                heads_key,
                format!(
                    "gives level {level} {heads} heads, which do not divide its {channels} channels"
                ),
            ));
        }
    }
    Ok(())
}

/// A VAE config the network can be built from and whose latents make sense.
pub fn check_vae_config(path: &Path, c: &VaeConfig) -> Result<(), CheckpointError> {
    let bad = |key: &str, detail: String| CheckpointError::BadConfigKey {
        path: path.to_path_buf(),
        key: key.to_owned(),
        detail,
    };
    if !(c.scaling_factor.is_finite() && c.scaling_factor > 0.0) {
        return Err(bad(
            "scaling_factor",
            format!("is {}; SD 1.x/2.x VAEs use 0.18215", c.scaling_factor),
        ));
    }
    if c.block_out_channels.is_empty() || c.block_out_channels.contains(&0) {
        return Err(bad(
            "block_out_channels",
            format!(
                "is {:?}; it needs one channel count above 0 per level",
                c.block_out_channels
            ),
        ));
    }
    for (key, value) in [
        ("in_channels", c.in_channels),
        ("out_channels", c.out_channels),
        ("layers_per_block", c.layers_per_block),
        ("latent_channels", c.latent_channels),
        ("norm_num_groups", c.norm_num_groups),
    ] {
        if value == 0 {
            return Err(bad(key, "is 0".into()));
        }
    }
    Ok(())
}

/// A text encoder config with heads that divide its width and sizes above 0.
pub fn check_text_config(path: &Path, c: &ClipTextConfig) -> Result<(), CheckpointError> {
    let bad = |key: &str, detail: String| CheckpointError::BadConfigKey {
        path: path.to_path_buf(),
        key: key.to_owned(),
        detail,
    };
    for (key, value) in [
        ("vocab_size", c.vocab_size),
        ("hidden_size", c.hidden_size),
        ("intermediate_size", c.intermediate_size),
        ("num_hidden_layers", c.num_hidden_layers),
        ("num_attention_heads", c.num_attention_heads),
        ("max_position_embeddings", c.max_position_embeddings),
    ] {
        if value == 0 {
            return Err(bad(key, "is 0".into()));
        }
    }
    if !c.hidden_size.is_multiple_of(c.num_attention_heads) {
        return Err(bad(
            "num_attention_heads",
            format!(
                "is {}, which does not divide `hidden_size` {}",
                c.num_attention_heads, c.hidden_size
            ),
        ));
    }
    if !(c.layer_norm_eps.is_finite() && c.layer_norm_eps > 0.0) {
        return Err(bad(
            "layer_norm_eps",
            format!(
                "is {}; it must be a small positive number",
                c.layer_norm_eps
            ),
        ));
    }
    Ok(())
}
