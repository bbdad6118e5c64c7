//! The UNet's architecture: read from diffusers' `unet/config.json`, or inferred from tensor shapes for a
//! single-file checkpoint (which carries no config).

use super::Family;
use crate::model::weights::Weights;
use serde::{Deserialize, Serialize};

/// A value given once for every block or once per block, as diffusers configs do.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum PerBlock {
    One(usize),
    Each(Vec<usize>),
}

impl PerBlock {
    /// The value for down block `block`; the mid block uses the last entry.
    pub fn get(&self, block: usize) -> usize {
        match self {
            PerBlock::One(v) => *v,
            PerBlock::Each(v) => v[block.min(v.len() - 1)],
        }
    }
}

/// The fields of diffusers' `UNet2DConditionModel` config that SD 1.x/2.x use.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct UNetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    /// Latent side length the model was trained at (64 for 512 px, 96 for 768 px).
    #[serde(default = "default_sample_size")]
    pub sample_size: usize,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    /// The NUMBER OF HEADS per block when `num_attention_heads` is absent (diffusers' legacy naming, which
    /// every SD 1.x/2.x config uses). Use [`UNetConfig::heads`] rather than reading this.
    #[serde(default = "default_heads")]
    pub attention_head_dim: PerBlock,
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock>,
    pub cross_attention_dim: usize,
    #[serde(default)]
    pub use_linear_projection: bool,
    #[serde(default = "default_groups")]
    pub norm_num_groups: usize,
    #[serde(default = "default_eps")]
    pub norm_eps: f64,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    #[serde(default = "default_one")]
    pub transformer_layers_per_block: PerBlock,
    /// Attention scores in f32 even when the model runs in f16 (SD 2.1 produces NaNs otherwise).
    #[serde(default)]
    pub upcast_attention: bool,
    #[serde(default = "default_true")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: usize,
}

fn default_sample_size() -> usize {
    64
}
fn default_heads() -> PerBlock {
    PerBlock::One(8)
}
fn default_groups() -> usize {
    32
}
fn default_eps() -> f64 {
    1e-5
}
fn default_one() -> PerBlock {
    PerBlock::One(1)
}
fn default_true() -> bool {
    true
}

impl UNetConfig {
    /// Attention heads in down block `block` (up blocks mirror it; the mid block uses the last).
    pub fn heads(&self, block: usize) -> usize {
        self.num_attention_heads
            .as_ref()
            .unwrap_or(&self.attention_head_dim)
            .get(block)
    }

    pub fn down_has_attention(&self, block: usize) -> bool {
        self.down_block_types[block].starts_with("CrossAttn")
    }

    pub fn up_has_attention(&self, block: usize) -> bool {
        self.up_block_types[block].starts_with("CrossAttn")
    }

    /// Reads everything the shapes tell (channels, levels, layers, which levels have attention, context
    /// width, linear or 1x1 projections); what they cannot tell comes from the family's standard: SD 1.x has 8
    /// heads everywhere, SD 2.x has heads of 64 channels, both use 32 norm groups. Models with other head
    /// counts (the tiny test models) must be given their config.
    pub fn from_weights(w: &dyn Weights, family: Family) -> Result<UNetConfig, String> {
        let shape = |name: &str| {
            w.shape(name)
                .ok_or_else(|| format!("the UNet has no `{name}`"))
        };
        let levels = count_indices(w, "down_blocks.", ".resnets.0.conv1.weight");
        if levels == 0 {
            return Err("the UNet has no down blocks".into());
        }
        let block_out_channels = (0..levels)
            .map(|i| Ok(shape(&format!("down_blocks.{i}.resnets.0.conv1.weight"))?[0]))
            .collect::<Result<Vec<_>, String>>()?;
        let has_attention =
            |side: &str, i: usize| w.contains(&format!("{side}.{i}.attentions.0.proj_in.weight"));
        let first_attention = (0..levels)
            .find(|&i| has_attention("down_blocks", i))
            .ok_or("the UNet has no attention blocks")?;
        let attention = format!("down_blocks.{first_attention}.attentions.0");
        let heads = match family {
            Family::Sd1 => PerBlock::One(8),
            // At least one head: a model narrower than 64 channels is not standard (it is given its config).
            Family::Sd2 => {
                PerBlock::Each(block_out_channels.iter().map(|c| (c / 64).max(1)).collect())
            }
        };
        Ok(UNetConfig {
            in_channels: shape("conv_in.weight")?[1],
            out_channels: shape("conv_out.weight")?[0],
            sample_size: default_sample_size(),
            layers_per_block: count_indices(w, "down_blocks.0.resnets.", ".conv1.weight"),
            attention_head_dim: heads,
            num_attention_heads: None,
            cross_attention_dim: shape(&format!(
                "{attention}.transformer_blocks.0.attn2.to_k.weight"
            ))?[1],
            use_linear_projection: shape(&format!("{attention}.proj_in.weight"))?.len() == 2,
            norm_num_groups: default_groups(),
            norm_eps: default_eps(),
            down_block_types: (0..levels)
                .map(|i| {
                    if has_attention("down_blocks", i) {
                        "CrossAttnDownBlock2D"
                    } else {
                        "DownBlock2D"
                    }
                    .to_owned()
                })
                .collect(),
            up_block_types: (0..levels)
                .map(|i| {
                    if has_attention("up_blocks", i) {
                        "CrossAttnUpBlock2D"
                    } else {
                        "UpBlock2D"
                    }
                    .to_owned()
                })
                .collect(),
            transformer_layers_per_block: PerBlock::One(count_indices(
                w,
                &format!("{attention}.transformer_blocks."),
                ".norm1.weight",
            )),
            upcast_attention: family == Family::Sd2,
            flip_sin_to_cos: true,
            freq_shift: 0,
            block_out_channels,
        })
    }
}

/// How many consecutive `{prefix}{i}{suffix}` tensors exist, from 0.
fn count_indices(w: &dyn Weights, prefix: &str, suffix: &str) -> usize {
    (0..)
        .take_while(|i| w.contains(&format!("{prefix}{i}{suffix}")))
        .count()
}
