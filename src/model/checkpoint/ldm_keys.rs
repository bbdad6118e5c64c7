//! LDM/CompVis single-file names → the diffusers names our networks ask for (UNet, VAE, SD1 and SD2 text
//! encoders). Every stored key is translated once when the file is opened; keys that belong to no network
//! (EMA copies, schedule buffers, `position_ids`, open_clip's projection) translate to nothing and are never
//! read. The layouts are described in tests/fixtures/sd_tiny/README.md.

use super::component::{Source, Transform};
use super::file::SafetensorsFile;
use std::collections::{BTreeSet, HashMap};

pub const UNET_PREFIX: &str = "model.diffusion_model.";
pub const VAE_PREFIX: &str = "first_stage_model.";
pub const CLIP_L_PREFIX: &str = "cond_stage_model.transformer.";
pub const OPEN_CLIP_PREFIX: &str = "cond_stage_model.model.";

type Names = HashMap<String, Source>;

/// The stored keys under `prefix`, without it.
fn under<'a>(file: &'a SafetensorsFile, prefix: &str) -> Vec<&'a str> {
    file.names()
        .filter_map(|k| k.strip_prefix(prefix))
        .collect()
}

fn joined(head: &str, tail: &[&str]) -> String {
    if tail.is_empty() {
        head.to_owned()
    } else {
        format!("{head}.{}", tail.join("."))
    }
}

/// Diffusers keys stored as they are (a diffusers component file).
pub fn same(file: &SafetensorsFile) -> Names {
    file.names()
        .map(|k| (k.to_owned(), Source::same(k)))
        .collect()
}

// ---- UNet ----

pub fn unet(file: &SafetensorsFile) -> Names {
    let keys = under(file, UNET_PREFIX);
    let per_level = unet_blocks_per_level(&keys);
    keys.iter()
        .filter_map(|k| {
            Some((
                unet_name(k, per_level)?,
                Source::same(&format!("{UNET_PREFIX}{k}")),
            ))
        })
        .collect()
}

/// `layers_per_block + 1`: the number of `input_blocks` per resolution level. The first downsampler sits at
/// `input_blocks.{layers_per_block + 1}`; a UNet with one level has none, and all its input blocks are layers.
fn unet_blocks_per_level(keys: &[&str]) -> usize {
    let index = |k: &&str| {
        k.strip_prefix("input_blocks.")?
            .split('.')
            .next()?
            .parse::<usize>()
            .ok()
    };
    let first_downsampler = keys
        .iter()
        .filter(|k| k.contains(".0.op."))
        .filter_map(index)
        .min();
    first_downsampler.unwrap_or_else(|| keys.iter().filter_map(index).max().unwrap_or(0) + 1)
}

fn unet_name(key: &str, per_level: usize) -> Option<String> {
    let p: Vec<&str> = key.split('.').collect();
    let num = |i: usize| p.get(i)?.parse::<usize>().ok();
    match (*p.first()?, num(1)?) {
        ("time_embed", 0) => Some(joined("time_embedding.linear_1", &p[2..])),
        ("time_embed", 2) => Some(joined("time_embedding.linear_2", &p[2..])),
        ("out", 0) => Some(joined("conv_norm_out", &p[2..])),
        ("out", 2) => Some(joined("conv_out", &p[2..])),
        ("input_blocks", 0) => Some(joined("conv_in", p.get(3..)?)),
        ("input_blocks", n) => input_block(n - 1, per_level, num(2)?, p.get(3..)?),
        ("middle_block", 0) => unet_resnet("mid_block.resnets.0", &p[2..]),
        ("middle_block", 1) => Some(joined("mid_block.attentions.0", &p[2..])),
        ("middle_block", 2) => unet_resnet("mid_block.resnets.1", &p[2..]),
        ("output_blocks", n) => output_block(n, per_level, num(2)?, p.get(3..)?),
        _ => None,
    }
}

/// `n` counts from the first block after `conv_in`; the last block of each level is its downsampler.
fn input_block(n: usize, per_level: usize, sub: usize, rest: &[&str]) -> Option<String> {
    let (level, j) = (n / per_level, n % per_level);
    if j == per_level - 1 {
        let ["op", tail @ ..] = rest else { return None };
        return (sub == 0)
            .then(|| joined(&format!("down_blocks.{level}.downsamplers.0.conv"), tail));
    }
    match sub {
        0 => unet_resnet(&format!("down_blocks.{level}.resnets.{j}"), rest),
        1 => Some(joined(&format!("down_blocks.{level}.attentions.{j}"), rest)),
        _ => None,
    }
}

/// Output blocks hold a resnet, then an attention block if the level has one, then (last of a level) the
/// upsampler: sub-index 1 or 2 with a `conv`.
fn output_block(n: usize, per_level: usize, sub: usize, rest: &[&str]) -> Option<String> {
    let (level, j) = (n / per_level, n % per_level);
    match (sub, rest) {
        (0, _) => unet_resnet(&format!("up_blocks.{level}.resnets.{j}"), rest),
        (1 | 2, ["conv", tail @ ..]) => Some(joined(
            &format!("up_blocks.{level}.upsamplers.0.conv"),
            tail,
        )),
        (1, _) => Some(joined(&format!("up_blocks.{level}.attentions.{j}"), rest)),
        _ => None,
    }
}

fn unet_resnet(module: &str, rest: &[&str]) -> Option<String> {
    let (name, tail) = match rest {
        ["in_layers", "0", tail @ ..] => ("norm1", tail),
        ["in_layers", "2", tail @ ..] => ("conv1", tail),
        ["emb_layers", "1", tail @ ..] => ("time_emb_proj", tail),
        ["out_layers", "0", tail @ ..] => ("norm2", tail),
        ["out_layers", "3", tail @ ..] => ("conv2", tail),
        ["skip_connection", tail @ ..] => ("conv_shortcut", tail),
        _ => return None,
    };
    Some(joined(&format!("{module}.{name}"), tail))
}

// ---- VAE ----

/// An LDM VAE under `prefix` (`first_stage_model.` in a checkpoint, nothing in a standalone VAE file).
pub fn ldm_vae(file: &SafetensorsFile, prefix: &str) -> Names {
    let keys = under(file, prefix);
    let levels = keys
        .iter()
        .filter_map(|k| {
            k.strip_prefix("decoder.up.")?
                .split('.')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .collect::<BTreeSet<_>>()
        .len();
    keys.iter()
        .filter_map(|k| Some((ldm_vae_name(k, levels)?, format!("{prefix}{k}"))))
        .map(|(name, key)| vae_source(file, name, key))
        .collect()
}

/// A diffusers VAE under `prefix`, accepting the attention names of diffusers before 0.14
/// (`query`/`key`/`value`/`proj_attn`), which old SD repositories still carry.
pub fn diffusers_vae(file: &SafetensorsFile, prefix: &str) -> Names {
    under(file, prefix)
        .into_iter()
        .map(|k| {
            let name = k
                .replace("attentions.0.query.", "attentions.0.to_q.")
                .replace("attentions.0.key.", "attentions.0.to_k.")
                .replace("attentions.0.value.", "attentions.0.to_v.")
                .replace("attentions.0.proj_attn.", "attentions.0.to_out.0.");
            vae_source(file, name, format!("{prefix}{k}"))
        })
        .collect()
}

/// The mid-block attention projections are 1x1 convs in LDM files and linear layers in diffusers.
fn vae_source(file: &SafetensorsFile, name: String, key: String) -> (String, Source) {
    let is_projection = [
        "to_q.weight",
        "to_k.weight",
        "to_v.weight",
        "to_out.0.weight",
    ]
    .iter()
    .any(|s| name.ends_with(s));
    let is_conv = file.meta(&key).is_some_and(|m| m.shape.len() == 4);
    let transform = if is_projection && is_conv {
        Transform::Squeeze1x1
    } else {
        Transform::Same
    };
    (name, Source { key, transform })
}

fn ldm_vae_name(key: &str, levels: usize) -> Option<String> {
    let p: Vec<&str> = key.split('.').collect();
    match p.as_slice() {
        ["quant_conv" | "post_quant_conv", ..] => Some(key.to_owned()),
        [side @ ("encoder" | "decoder"), rest @ ..] => {
            Some(format!("{side}.{}", ldm_vae_part(rest, levels)?))
        }
        _ => None,
    }
}

/// Decoder levels are numbered from the bottom in LDM (`up.0` is the last to run) and from the top in
/// diffusers (`up_blocks.0` runs first).
fn ldm_vae_part(rest: &[&str], levels: usize) -> Option<String> {
    let flip = |k: &str| levels.checked_sub(k.parse::<usize>().ok()? + 1);
    match rest {
        ["conv_in" | "conv_out", ..] => Some(rest.join(".")),
        ["norm_out", tail @ ..] => Some(joined("conv_norm_out", tail)),
        ["mid", "block_1", tail @ ..] => vae_resnet("mid_block.resnets.0", tail),
        ["mid", "block_2", tail @ ..] => vae_resnet("mid_block.resnets.1", tail),
        ["mid", "attn_1", tail @ ..] => vae_attention("mid_block.attentions.0", tail),
        ["down", i, "block", j, tail @ ..] => {
            vae_resnet(&format!("down_blocks.{i}.resnets.{j}"), tail)
        }
        ["down", i, "downsample", "conv", tail @ ..] => Some(joined(
            &format!("down_blocks.{i}.downsamplers.0.conv"),
            tail,
        )),
        ["up", k, "block", j, tail @ ..] => {
            vae_resnet(&format!("up_blocks.{}.resnets.{j}", flip(k)?), tail)
        }
        ["up", k, "upsample", "conv", tail @ ..] => Some(joined(
            &format!("up_blocks.{}.upsamplers.0.conv", flip(k)?),
            tail,
        )),
        _ => None,
    }
}

fn vae_resnet(module: &str, rest: &[&str]) -> Option<String> {
    match rest {
        ["nin_shortcut", tail @ ..] => Some(joined(&format!("{module}.conv_shortcut"), tail)),
        [name @ ("norm1" | "conv1" | "norm2" | "conv2"), tail @ ..] => {
            Some(joined(&format!("{module}.{name}"), tail))
        }
        _ => None,
    }
}

fn vae_attention(module: &str, rest: &[&str]) -> Option<String> {
    let (name, tail) = match rest {
        ["norm", tail @ ..] => ("group_norm", tail),
        ["q", tail @ ..] => ("to_q", tail),
        ["k", tail @ ..] => ("to_k", tail),
        ["v", tail @ ..] => ("to_v", tail),
        ["proj_out", tail @ ..] => ("to_out.0", tail),
        _ => return None,
    };
    Some(joined(&format!("{module}.{name}"), tail))
}

// ---- Text encoders ----

/// A CLIP text model with transformers' names under `prefix`: SD1's `cond_stage_model.transformer.`, or
/// nothing in a diffusers `text_encoder`. Older checkpoints and transformers ≥ 5.6 leave out the
/// `text_model.` level; published SD repositories have it, and so do the names we answer.
pub fn hf_clip(file: &SafetensorsFile, prefix: &str) -> Names {
    under(file, prefix)
        .into_iter()
        .filter(|k| !k.ends_with("position_ids"))
        .map(|k| {
            let name = if k.starts_with("text_model.") {
                k.to_owned()
            } else {
                format!("text_model.{k}")
            };
            (name, Source::same(&format!("{prefix}{k}")))
        })
        .collect()
}

/// SD2's OpenCLIP ViT-H with open_clip names. SD2 conditions on the penultimate block, so the last
/// resblock is left out, which makes this the same network as diffusers' SD2 `text_encoder`.
pub fn open_clip(file: &SafetensorsFile) -> Names {
    let keys = under(file, OPEN_CLIP_PREFIX);
    let blocks = keys
        .iter()
        .filter_map(|k| {
            k.strip_prefix("transformer.resblocks.")?
                .split('.')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .collect::<BTreeSet<_>>()
        .len();
    keys.iter()
        .flat_map(|k| {
            let key = format!("{OPEN_CLIP_PREFIX}{k}");
            open_clip_names(k, blocks.saturating_sub(1))
                .into_iter()
                .map(move |(name, transform)| {
                    (
                        name,
                        Source {
                            key: key.clone(),
                            transform,
                        },
                    )
                })
        })
        .collect()
}

fn open_clip_names(key: &str, used_blocks: usize) -> Vec<(String, Transform)> {
    let p: Vec<&str> = key.split('.').collect();
    let one = |name: String| vec![(name, Transform::Same)];
    match p.as_slice() {
        ["token_embedding", tail @ ..] => {
            one(joined("text_model.embeddings.token_embedding", tail))
        }
        ["positional_embedding"] => {
            one("text_model.embeddings.position_embedding.weight".to_owned())
        }
        ["ln_final", tail @ ..] => one(joined("text_model.final_layer_norm", tail)),
        ["transformer", "resblocks", n, rest @ ..] => match n.parse::<usize>() {
            Ok(n) if n < used_blocks => {
                open_clip_layer(&format!("text_model.encoder.layers.{n}"), rest)
            }
            _ => vec![],
        },
        _ => vec![],
    }
}

fn open_clip_layer(layer: &str, rest: &[&str]) -> Vec<(String, Transform)> {
    let renamed = |name: &str, tail: &[&str]| {
        vec![(joined(&format!("{layer}.{name}"), tail), Transform::Same)]
    };
    let fused = |suffix: &str| {
        ["q_proj", "k_proj", "v_proj"]
            .iter()
            .enumerate()
            .map(|(index, proj)| {
                (
                    format!("{layer}.self_attn.{proj}.{suffix}"),
                    Transform::Chunk { index, count: 3 },
                )
            })
            .collect()
    };
    match rest {
        ["ln_1", tail @ ..] => renamed("layer_norm1", tail),
        ["ln_2", tail @ ..] => renamed("layer_norm2", tail),
        ["mlp", "c_fc", tail @ ..] => renamed("mlp.fc1", tail),
        ["mlp", "c_proj", tail @ ..] => renamed("mlp.fc2", tail),
        ["attn", "out_proj", tail @ ..] => renamed("self_attn.out_proj", tail),
        ["attn", "in_proj_weight"] => fused("weight"),
        ["attn", "in_proj_bias"] => fused("bias"),
        _ => vec![],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unet_names_follow_the_sd15_layout() {
        // SD1.5: 4 levels, layers_per_block 2 → 3 input blocks per level.
        let cases = [
            ("input_blocks.0.0.weight", "conv_in.weight"),
            (
                "input_blocks.1.0.in_layers.2.weight",
                "down_blocks.0.resnets.0.conv1.weight",
            ),
            (
                "input_blocks.2.1.proj_in.weight",
                "down_blocks.0.attentions.1.proj_in.weight",
            ),
            (
                "input_blocks.3.0.op.bias",
                "down_blocks.0.downsamplers.0.conv.bias",
            ),
            (
                "input_blocks.11.0.emb_layers.1.weight",
                "down_blocks.3.resnets.1.time_emb_proj.weight",
            ),
            (
                "middle_block.2.skip_connection.bias",
                "mid_block.resnets.1.conv_shortcut.bias",
            ),
            (
                "output_blocks.2.1.conv.weight",
                "up_blocks.0.upsamplers.0.conv.weight",
            ),
            (
                "output_blocks.5.2.conv.bias",
                "up_blocks.1.upsamplers.0.conv.bias",
            ),
            (
                "output_blocks.11.1.transformer_blocks.0.norm1.bias",
                "up_blocks.3.attentions.2.transformer_blocks.0.norm1.bias",
            ),
            ("out.2.weight", "conv_out.weight"),
            ("time_embed.2.bias", "time_embedding.linear_2.bias"),
        ];
        for (ldm, diffusers) in cases {
            assert_eq!(unet_name(ldm, 3).as_deref(), Some(diffusers), "{ldm}");
        }
        assert_eq!(
            unet_blocks_per_level(&["input_blocks.3.0.op.weight", "input_blocks.6.0.op.weight"]),
            3
        );
    }

    #[test]
    fn vae_decoder_levels_are_flipped() {
        assert_eq!(
            ldm_vae_name("decoder.up.3.block.2.nin_shortcut.weight", 4).as_deref(),
            Some("decoder.up_blocks.0.resnets.2.conv_shortcut.weight")
        );
        assert_eq!(
            ldm_vae_name("decoder.up.1.upsample.conv.bias", 4).as_deref(),
            Some("decoder.up_blocks.2.upsamplers.0.conv.bias")
        );
        assert_eq!(
            ldm_vae_name("encoder.mid.attn_1.proj_out.weight", 4).as_deref(),
            Some("encoder.mid_block.attentions.0.to_out.0.weight")
        );
        assert_eq!(ldm_vae_name("decoder.up.4.block.0.conv1.weight", 4), None);
    }

    #[test]
    fn open_clip_splits_in_proj_and_drops_the_last_block() {
        let names = open_clip_names("transformer.resblocks.22.attn.in_proj_bias", 23);
        assert_eq!(names.len(), 3);
        assert_eq!(
            names[1],
            (
                "text_model.encoder.layers.22.self_attn.k_proj.bias".to_owned(),
                Transform::Chunk { index: 1, count: 3 }
            )
        );
        assert!(open_clip_names("transformer.resblocks.23.ln_1.weight", 23).is_empty());
        assert!(open_clip_names("text_projection", 23).is_empty());
    }
}
