//! The Stable Diffusion VAE (diffusers' `AutoencoderKL`), inference only: images to latents for the latent
//! cache, latents to images for previews.
//!
//! Our own rather than candle-transformers' `AutoEncoderKL`, whose posterior hides its mean and log-variance
//! (the latent cache stores both) and which cannot be seeded on the CPU.

use crate::model::checkpoint::var_builder;
use crate::model::weights::Weights;
use candle_core::{D, DType, Device, IndexOp, Module, Result, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, GroupNorm, Linear, VarBuilder};
use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::SeedableRng;
use rand_distr::{Distribution, StandardNormal};
use serde::{Deserialize, Serialize};

/// Every norm of the SD VAE uses this epsilon.
const NORM_EPS: f64 = 1e-6;
/// Queries per attention step in the mid block: a 1024 px image has 16384 latent-resolution tokens, and a
/// full 16384² score matrix would take 1 GiB.
const QUERY_CHUNK: usize = 4096;

/// diffusers' `vae/config.json` (the fields SD's `AutoencoderKL` uses).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct VaeConfig {
    #[serde(default = "default_rgb")]
    pub in_channels: usize,
    #[serde(default = "default_rgb")]
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub latent_channels: usize,
    #[serde(default = "default_groups")]
    pub norm_num_groups: usize,
    /// Latents are multiplied by this after encoding and divided before decoding (0.18215 for SD 1.x/2.x).
    #[serde(default = "default_scaling")]
    pub scaling_factor: f64,
    #[serde(default = "default_true")]
    pub use_quant_conv: bool,
    #[serde(default = "default_true")]
    pub use_post_quant_conv: bool,
    #[serde(default = "default_true")]
    pub mid_block_add_attention: bool,
}

fn default_rgb() -> usize {
    3
}
fn default_groups() -> usize {
    32
}
pub(crate) fn default_scaling() -> f64 {
    0.18215
}
fn default_true() -> bool {
    true
}

impl VaeConfig {
    /// Channels, levels, layers and latent width from the shapes. Norm groups and the scaling factor are not
    /// in the weights: SD 1.x/2.x use 32 and 0.18215; tiny test models pass their own.
    pub fn from_weights(
        w: &dyn Weights,
        norm_num_groups: usize,
        scaling_factor: f64,
    ) -> std::result::Result<Self, String> {
        let shape = |name: &str| {
            w.shape(name)
                .ok_or_else(|| format!("the VAE has no `{name}`"))
        };
        let levels = count(w, "encoder.down_blocks.", ".resnets.0.conv1.weight");
        if levels == 0 {
            return Err("the VAE encoder has no down blocks".into());
        }
        let block_out_channels = (0..levels)
            .map(|i| Ok(shape(&format!("encoder.down_blocks.{i}.resnets.0.conv1.weight"))?[0]))
            .collect::<std::result::Result<Vec<_>, String>>()?;
        Ok(VaeConfig {
            in_channels: shape("encoder.conv_in.weight")?[1],
            out_channels: shape("decoder.conv_out.weight")?[0],
            block_out_channels,
            layers_per_block: count(w, "encoder.down_blocks.0.resnets.", ".conv1.weight"),
            latent_channels: shape("decoder.conv_in.weight")?[1],
            norm_num_groups,
            scaling_factor,
            use_quant_conv: w.contains("quant_conv.weight"),
            use_post_quant_conv: w.contains("post_quant_conv.weight"),
            mid_block_add_attention: w.contains("encoder.mid_block.attentions.0.to_q.weight"),
        })
    }

    /// Image pixels per latent pixel along each side (8 for SD).
    pub fn downsample_factor(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }
}

fn count(w: &dyn Weights, prefix: &str, suffix: &str) -> usize {
    (0..)
        .take_while(|i| w.contains(&format!("{prefix}{i}{suffix}")))
        .count()
}

/// The encoder's output distribution, unscaled (multiply a sample by `scaling_factor` for the UNet).
pub struct Posterior {
    pub mean: Tensor,
    /// Clamped to [-30, 20] as diffusers and LDM do.
    pub logvar: Tensor,
}

impl Posterior {
    /// `mean + std · noise`.
    pub fn sample_with(&self, noise: &Tensor) -> Result<Tensor> {
        &self.mean + (&self.logvar * 0.5)?.exp()?.mul(noise)?
    }

    /// A sample whose noise depends only on `seed` (ChaCha8, the same on every machine and device).
    pub fn sample(&self, seed: u64) -> Result<Tensor> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let noise: Vec<f32> = (0..self.mean.elem_count())
            .map(|_| StandardNormal.sample(&mut rng))
            .collect();
        let noise = Tensor::from_vec(noise, self.mean.shape(), self.mean.device())?
            .to_dtype(self.mean.dtype())?;
        self.sample_with(&noise)
    }
}

pub struct Vae {
    encoder: Coder,
    decoder: Coder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
    pub config: VaeConfig,
}

impl Vae {
    /// `w` answers diffusers VAE names (`encoder.conv_in.weight`…). The SD VAE overflows in f16; use f32 or
    /// bf16.
    pub fn new(w: &dyn Weights, config: &VaeConfig, dtype: DType, device: &Device) -> Result<Self> {
        if config.block_out_channels.is_empty() {
            candle_core::bail!("the VAE config lists no block_out_channels");
        }
        let vb = var_builder(w, dtype, device);
        let latent = config.latent_channels;
        let quant = |on: bool, channels: usize, name: &str| -> Result<Option<Conv2d>> {
            on.then(|| {
                candle_nn::conv2d(channels, channels, 1, Conv2dConfig::default(), vb.pp(name))
            })
            .transpose()
        };
        Ok(Vae {
            encoder: Coder::encoder(vb.pp("encoder"), config)?,
            decoder: Coder::decoder(vb.pp("decoder"), config)?,
            quant_conv: quant(config.use_quant_conv, 2 * latent, "quant_conv")?,
            post_quant_conv: quant(config.use_post_quant_conv, latent, "post_quant_conv")?,
            config: config.clone(),
        })
    }

    /// Images `[B, 3, H, W]` in [-1, 1] (H and W multiples of the downsample factor) to the latent
    /// distribution.
    pub fn encode(&self, images: &Tensor) -> Result<Posterior> {
        let mut moments = self.encoder.forward(images)?;
        if let Some(conv) = &self.quant_conv {
            moments = conv.forward(&moments)?;
        }
        let latent = self.config.latent_channels;
        Ok(Posterior {
            mean: moments.narrow(1, 0, latent)?,
            logvar: moments.narrow(1, latent, latent)?.clamp(-30f32, 20f32)?,
        })
    }

    /// Unscaled latents to images, about [-1, 1].
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        match &self.post_quant_conv {
            Some(conv) => self.decoder.forward(&conv.forward(latents)?),
            None => self.decoder.forward(latents),
        }
    }

    /// `decode` in overlapping tiles of `tile` latents (blended linearly over `overlap` latents), so the
    /// decoder's memory follows the tile, not the image: what lets previews run beside training on a 6 GB card.
    /// Latents no larger than a tile decode in one piece. Output in f32.
    pub fn decode_tiled(&self, latents: &Tensor, tile: usize, overlap: usize) -> Result<Tensor> {
        let (b, _, h, w) = latents.dims4()?;
        if h <= tile && w <= tile {
            return self.decode(latents)?.to_dtype(DType::F32);
        }
        let f = self.config.downsample_factor();
        let (ys, xs) = (tile_starts(h, tile, overlap), tile_starts(w, tile, overlap));
        let dev = latents.device();
        let mut sum = Tensor::zeros((b, 3, h * f, w * f), DType::F32, dev)?;
        let mut weight = Tensor::zeros((1, 1, h * f, w * f), DType::F32, dev)?;
        for &y in &ys {
            for &x in &xs {
                let (th, tw) = (tile.min(h), tile.min(w));
                let part = latents.narrow(2, y, th)?.narrow(3, x, tw)?;
                let image = self.decode(&part)?.to_dtype(DType::F32)?;
                let ramp = |start: usize, len: usize, full: usize| {
                    blend_ramp(len * f, overlap * f, start > 0, start + len < full)
                };
                let (ry, rx) = (ramp(y, th, h), ramp(x, tw, w));
                let mask: Vec<f32> = ry
                    .iter()
                    .flat_map(|a| rx.iter().map(move |b| a * b))
                    .collect();
                let mask = Tensor::from_vec(mask, (1, 1, th * f, tw * f), dev)?;
                let (py, px) = (y * f..(y + th) * f, x * f..(x + tw) * f);
                let region = [0..b, 0..3, py.clone(), px.clone()];
                let acc =
                    (sum.i((.., .., py.clone(), px.clone()))? + image.broadcast_mul(&mask)?)?;
                sum = sum.slice_assign(&region, &acc)?;
                let wacc = (weight.i((.., .., py.clone(), px.clone()))? + &mask)?;
                weight = weight.slice_assign(&[0..1, 0..1, py, px], &wacc)?;
            }
        }
        sum.broadcast_div(&weight)
    }

    /// Encoder output → what the UNet sees.
    pub fn scale(&self, latents: &Tensor) -> Result<Tensor> {
        latents * self.config.scaling_factor
    }

    /// What the UNet produced → decoder input.
    pub fn unscale(&self, latents: &Tensor) -> Result<Tensor> {
        latents / self.config.scaling_factor
    }
}

/// Tile origins covering `n` with tiles of `tile` overlapping by at least `overlap`; the last one ends at `n`.
fn tile_starts(n: usize, tile: usize, overlap: usize) -> Vec<usize> {
    if n <= tile {
        return vec![0];
    }
    let step = tile.saturating_sub(overlap).max(1);
    let mut starts: Vec<usize> = (0..n - tile).step_by(step).collect();
    starts.push(n - tile);
    starts
}

/// Per-pixel weights along one side of a tile: rising over `ramp` pixels at an edge shared with a neighbour.
fn blend_ramp(len: usize, ramp: usize, before: bool, after: bool) -> Vec<f32> {
    (0..len)
        .map(|i| {
            let rise = |d: usize| ((d as f32 + 0.5) / ramp.max(1) as f32).min(1.0);
            let a = if before { rise(i) } else { 1.0 };
            let b = if after { rise(len - 1 - i) } else { 1.0 };
            a * b
        })
        .collect()
}

/// An RGB image as a `[1, 3, H, W]` f32 tensor in [-1, 1], the VAE's input.
pub fn image_to_tensor(image: &image::RgbImage, device: &Device) -> Result<Tensor> {
    let (w, h) = image.dimensions();
    let pixels = Tensor::from_vec(image.as_raw().clone(), (h as usize, w as usize, 3), device)?;
    (pixels
        .permute((2, 0, 1))?
        .unsqueeze(0)?
        .to_dtype(DType::F32)?
        / 127.5)?
        - 1.0
}

/// Decoded `[B, 3, H, W]` images (about [-1, 1]) as RGB images; values outside the range are clipped.
pub fn tensor_to_images(images: &Tensor) -> Result<Vec<image::RgbImage>> {
    let (batch, _, h, w) = images.dims4()?;
    let bytes = ((images.to_dtype(DType::F32)?.clamp(-1f32, 1f32)? + 1.0)? * 127.5)?
        .round()?
        .to_dtype(DType::U8)?;
    (0..batch)
        .map(|i| {
            let raw = bytes
                .get(i)?
                .permute((1, 2, 0))?
                .flatten_all()?
                .to_vec1::<u8>()?;
            image::RgbImage::from_raw(w as u32, h as u32, raw)
                .ok_or_else(|| candle_core::Error::Msg("decoded image has the wrong size".into()))
        })
        .collect()
}

/// The encoder or the decoder: `conv_in`, levels of resnets with a resampler between levels, the mid block
/// (resnet, attention, resnet), norm, SiLU, `conv_out`. The encoder runs the mid block last, the decoder
/// first.
struct Coder {
    conv_in: Conv2d,
    levels: Vec<Level>,
    mid: MidBlock,
    norm_out: GroupNorm,
    conv_out: Conv2d,
    mid_first: bool,
}

struct Level {
    resnets: Vec<Resnet>,
    /// A stride-2 conv (encoder) or nearest ×2 + conv (decoder); none after the last level.
    resample: Option<Conv2d>,
}

impl Coder {
    fn encoder(vb: VarBuilder, c: &VaeConfig) -> Result<Self> {
        let ch = &c.block_out_channels;
        let last = ch[ch.len() - 1];
        let stride2 = Conv2dConfig {
            stride: 2,
            ..Default::default()
        };
        let levels = (0..ch.len())
            .map(|i| {
                let vb = vb.pp(format!("down_blocks.{i}"));
                let input = if i == 0 { ch[0] } else { ch[i - 1] };
                let resnets = resnets(
                    vb.pp("resnets"),
                    input,
                    ch[i],
                    c.layers_per_block,
                    c.norm_num_groups,
                )?;
                let resample = (i + 1 < ch.len())
                    .then(|| {
                        candle_nn::conv2d(ch[i], ch[i], 3, stride2, vb.pp("downsamplers.0.conv"))
                    })
                    .transpose()?;
                Ok(Level { resnets, resample })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Coder {
            conv_in: candle_nn::conv2d(c.in_channels, ch[0], 3, padded(), vb.pp("conv_in"))?,
            levels,
            mid: MidBlock::new(vb.pp("mid_block"), last, c)?,
            norm_out: candle_nn::group_norm(
                c.norm_num_groups,
                last,
                NORM_EPS,
                vb.pp("conv_norm_out"),
            )?,
            conv_out: candle_nn::conv2d(
                last,
                2 * c.latent_channels,
                3,
                padded(),
                vb.pp("conv_out"),
            )?,
            mid_first: false,
        })
    }

    fn decoder(vb: VarBuilder, c: &VaeConfig) -> Result<Self> {
        let ch: Vec<usize> = c.block_out_channels.iter().rev().copied().collect();
        let levels = (0..ch.len())
            .map(|i| {
                let vb = vb.pp(format!("up_blocks.{i}"));
                let input = if i == 0 { ch[0] } else { ch[i - 1] };
                let resnets = resnets(
                    vb.pp("resnets"),
                    input,
                    ch[i],
                    c.layers_per_block + 1,
                    c.norm_num_groups,
                )?;
                let resample = (i + 1 < ch.len())
                    .then(|| {
                        candle_nn::conv2d(ch[i], ch[i], 3, padded(), vb.pp("upsamplers.0.conv"))
                    })
                    .transpose()?;
                Ok(Level { resnets, resample })
            })
            .collect::<Result<Vec<_>>>()?;
        let first = ch[0];
        let out = ch[ch.len() - 1];
        Ok(Coder {
            conv_in: candle_nn::conv2d(c.latent_channels, first, 3, padded(), vb.pp("conv_in"))?,
            levels,
            mid: MidBlock::new(vb.pp("mid_block"), first, c)?,
            norm_out: candle_nn::group_norm(
                c.norm_num_groups,
                out,
                NORM_EPS,
                vb.pp("conv_norm_out"),
            )?,
            conv_out: candle_nn::conv2d(out, c.out_channels, 3, padded(), vb.pp("conv_out"))?,
            mid_first: true,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = self.conv_in.forward(x)?;
        if self.mid_first {
            x = self.mid.forward(&x)?;
        }
        for level in &self.levels {
            for resnet in &level.resnets {
                x = resnet.forward(&x)?;
            }
            if let Some(conv) = &level.resample {
                x = self.resample(conv, &x)?;
            }
        }
        if !self.mid_first {
            x = self.mid.forward(&x)?;
        }
        self.conv_out
            .forward(&candle_nn::ops::silu(&self.norm_out.forward(&x)?)?)
    }

    fn resample(&self, conv: &Conv2d, x: &Tensor) -> Result<Tensor> {
        if self.mid_first {
            let (_, _, h, w) = x.dims4()?;
            conv.forward(&x.upsample_nearest2d(2 * h, 2 * w)?)
        } else {
            // The stride-2 conv has no padding of its own: LDM pads right and bottom only.
            conv.forward(
                &x.pad_with_zeros(D::Minus1, 0, 1)?
                    .pad_with_zeros(D::Minus2, 0, 1)?,
            )
        }
    }
}

fn padded() -> Conv2dConfig {
    Conv2dConfig {
        padding: 1,
        ..Default::default()
    }
}

fn resnets(
    vb: VarBuilder,
    input: usize,
    output: usize,
    count: usize,
    groups: usize,
) -> Result<Vec<Resnet>> {
    (0..count)
        .map(|j| {
            Resnet::new(
                vb.pp(j),
                if j == 0 { input } else { output },
                output,
                groups,
            )
        })
        .collect()
}

struct Resnet {
    norm1: GroupNorm,
    conv1: Conv2d,
    norm2: GroupNorm,
    conv2: Conv2d,
    shortcut: Option<Conv2d>,
}

impl Resnet {
    fn new(vb: VarBuilder, input: usize, output: usize, groups: usize) -> Result<Self> {
        Ok(Resnet {
            norm1: candle_nn::group_norm(groups, input, NORM_EPS, vb.pp("norm1"))?,
            conv1: candle_nn::conv2d(input, output, 3, padded(), vb.pp("conv1"))?,
            norm2: candle_nn::group_norm(groups, output, NORM_EPS, vb.pp("norm2"))?,
            conv2: candle_nn::conv2d(output, output, 3, padded(), vb.pp("conv2"))?,
            shortcut: (input != output)
                .then(|| {
                    candle_nn::conv2d(
                        input,
                        output,
                        1,
                        Conv2dConfig::default(),
                        vb.pp("conv_shortcut"),
                    )
                })
                .transpose()?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self
            .conv1
            .forward(&candle_nn::ops::silu(&self.norm1.forward(x)?)?)?;
        let h = self
            .conv2
            .forward(&candle_nn::ops::silu(&self.norm2.forward(&h)?)?)?;
        match &self.shortcut {
            Some(conv) => conv.forward(x)? + h,
            None => x + h,
        }
    }
}

struct MidBlock {
    first: Resnet,
    attention: Option<Attention>,
    second: Resnet,
}

impl MidBlock {
    fn new(vb: VarBuilder, channels: usize, c: &VaeConfig) -> Result<Self> {
        let groups = c.norm_num_groups;
        Ok(MidBlock {
            first: Resnet::new(vb.pp("resnets.0"), channels, channels, groups)?,
            attention: c
                .mid_block_add_attention
                .then(|| Attention::new(vb.pp("attentions.0"), channels, groups))
                .transpose()?,
            second: Resnet::new(vb.pp("resnets.1"), channels, channels, groups)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = self.first.forward(x)?;
        if let Some(attention) = &self.attention {
            x = attention.forward(&x)?;
        }
        self.second.forward(&x)
    }
}

/// Single-head self-attention over all latent pixels, with a residual connection.
struct Attention {
    norm: GroupNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
}

impl Attention {
    fn new(vb: VarBuilder, channels: usize, groups: usize) -> Result<Self> {
        let linear = |name: &str| candle_nn::linear(channels, channels, vb.pp(name));
        Ok(Attention {
            norm: candle_nn::group_norm(groups, channels, NORM_EPS, vb.pp("group_norm"))?,
            q: linear("to_q")?,
            k: linear("to_k")?,
            v: linear("to_v")?,
            out: linear("to_out.0")?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let tokens = self
            .norm
            .forward(x)?
            .reshape((b, c, h * w))?
            .transpose(1, 2)?
            .contiguous()?;
        // Scores and softmax in f32: the f16 products overflow.
        let q = self.q.forward(&tokens)?.to_dtype(DType::F32)?;
        let k_t = self
            .k
            .forward(&tokens)?
            .to_dtype(DType::F32)?
            .t()?
            .contiguous()?;
        let v = self.v.forward(&tokens)?.to_dtype(DType::F32)?;
        let scale = 1.0 / (c as f64).sqrt();
        let chunks = (0..h * w)
            .step_by(QUERY_CHUNK)
            .map(|start| {
                let q = q.narrow(1, start, QUERY_CHUNK.min(h * w - start))?;
                candle_nn::ops::softmax_last_dim(&(q.matmul(&k_t)? * scale)?)?.matmul(&v)
            })
            .collect::<Result<Vec<_>>>()?;
        let attended = Tensor::cat(&chunks, 1)?.to_dtype(x.dtype())?;
        let y = self
            .out
            .forward(&attended)?
            .transpose(1, 2)?
            .reshape((b, c, h, w))?;
        x + y
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_cover_the_latents_and_blend_to_full_weight() {
        assert_eq!(tile_starts(64, 32, 8), [0, 24, 32]);
        assert_eq!(tile_starts(20, 32, 8), [0]);
        let ramp = blend_ramp(16, 4, true, false);
        assert!(ramp[0] < 0.2 && ramp[15] == 1.0);
        // Where two tiles overlap, their weights add up to more than zero everywhere.
        let (a, b) = (blend_ramp(8, 4, false, true), blend_ramp(8, 4, true, false));
        for i in 0..4 {
            assert!(a[4 + i] + b[i] > 0.0);
        }
    }

    #[test]
    fn tiled_decoding_matches_whole_decoding_in_shape_and_closely_in_value() {
        let config = VaeConfig {
            in_channels: 3,
            out_channels: 3,
            block_out_channels: vec![8, 8],
            layers_per_block: 1,
            latent_channels: 4,
            norm_num_groups: 4,
            scaling_factor: 0.18215,
            use_quant_conv: true,
            use_post_quant_conv: true,
            mid_block_add_attention: true,
        };
        let vae = Vae::new(
            &crate::model::weights::RandomWeights,
            &config,
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();
        let z = Tensor::randn(0f32, 1.0, (1, 4, 24, 20), &Device::Cpu).unwrap();
        let whole = vae.decode(&z).unwrap();
        let tiled = vae.decode_tiled(&z, 12, 4).unwrap();
        assert_eq!(whole.dims(), tiled.dims());
        let diff = (whole - tiled).unwrap().abs().unwrap().mean_all().unwrap();
        let diff = diff.to_scalar::<f32>().unwrap();
        assert!(diff.is_finite() && diff < 0.5, "{diff}");
    }
}
