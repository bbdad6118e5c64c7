//! Our UNet2DConditionModel for SD 1.x/2.x, with diffusers module names, per-sample timesteps, adapter-ready
//! layers and optional block-level recompute.

use super::layers::{Adaptable, GroupNorm, LayerNorm, Loader, attention};
use super::recompute::{BlockFn, GradSink, checkpoint};
use candle_core::{DType, Device, Result, Tensor, Var};
use std::sync::Arc;

pub use super::checkpoint::{PerBlock, UNetConfig};

impl UNetConfig {
    /// Width of the time embedding.
    fn time_dim(&self) -> usize {
        4 * self.block_out_channels[0]
    }

    /// Stable Diffusion 1.x (860 M parameters), for benchmarks on random weights.
    pub fn sd15() -> Self {
        let names = |v: [&str; 4]| v.map(str::to_owned).to_vec();
        UNetConfig {
            in_channels: 4,
            out_channels: 4,
            sample_size: 64,
            block_out_channels: vec![320, 640, 1280, 1280],
            layers_per_block: 2,
            attention_head_dim: PerBlock::One(8),
            num_attention_heads: None,
            cross_attention_dim: 768,
            use_linear_projection: false,
            norm_num_groups: 32,
            norm_eps: 1e-5,
            down_block_types: names([
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "DownBlock2D",
            ]),
            up_block_types: names([
                "UpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
            ]),
            transformer_layers_per_block: PerBlock::One(1),
            upcast_attention: false,
            flip_sin_to_cos: true,
            freq_shift: 0,
        }
    }
}

/// Run-time switches of the network.
#[derive(Clone, Copy, Debug, Default)]
pub struct UNetOptions {
    /// Recompute each resnet and attention block in backward instead of keeping its activations.
    pub recompute: bool,
    /// Process attention queries this many at a time.
    pub attention_chunk: Option<usize>,
}

struct Resnet {
    norm1: GroupNorm,
    conv1: Adaptable,
    time_emb_proj: Adaptable,
    norm2: GroupNorm,
    conv2: Adaptable,
    conv_shortcut: Option<Adaptable>,
}

impl Resnet {
    fn load(l: &Loader, path: &str, cin: usize, cout: usize, cfg: &UNetConfig) -> Result<Self> {
        let g = cfg.norm_num_groups;
        Ok(Resnet {
            norm1: l.group_norm(&format!("{path}.norm1"), cin, g, cfg.norm_eps)?,
            conv1: l.conv(&format!("{path}.conv1"), cin, cout, 3, 1, 1)?,
            time_emb_proj: l.linear(
                &format!("{path}.time_emb_proj"),
                cfg.time_dim(),
                cout,
                true,
            )?,
            norm2: l.group_norm(&format!("{path}.norm2"), cout, g, cfg.norm_eps)?,
            conv2: l.conv(&format!("{path}.conv2"), cout, cout, 3, 1, 1)?,
            conv_shortcut: if cin != cout {
                Some(l.conv(&format!("{path}.conv_shortcut"), cin, cout, 1, 1, 0)?)
            } else {
                None
            },
        })
    }

    fn forward(&self, x: &Tensor, temb: &Tensor) -> Result<Tensor> {
        let h = self.conv1.forward(&self.norm1.forward(x)?.silu()?)?;
        let t = self
            .time_emb_proj
            .forward(&temb.silu()?)?
            .unsqueeze(2)?
            .unsqueeze(3)?;
        let h = super::layers::add_constant(&h, &t)?;
        let h = self.conv2.forward(&self.norm2.forward(&h)?.silu()?)?;
        let skip = match &self.conv_shortcut {
            Some(c) => c.forward(x)?,
            None => x.clone(),
        };
        skip + h
    }

    fn layers_mut(&mut self) -> Vec<&mut Adaptable> {
        let mut v = vec![&mut self.conv1, &mut self.time_emb_proj, &mut self.conv2];
        v.extend(self.conv_shortcut.as_mut());
        v
    }
}

struct Attention {
    to_q: Adaptable,
    to_k: Adaptable,
    to_v: Adaptable,
    to_out: Adaptable,
    heads: usize,
}

impl Attention {
    /// Attention over `c` channels whose keys and values come from `kv` channels (the text context for
    /// cross-attention).
    fn load(l: &Loader, path: &str, c: usize, kv: usize, heads: usize) -> Result<Self> {
        Ok(Attention {
            to_q: l.linear(&format!("{path}.to_q"), c, c, false)?,
            to_k: l.linear(&format!("{path}.to_k"), kv, c, false)?,
            to_v: l.linear(&format!("{path}.to_v"), kv, c, false)?,
            to_out: l.linear(&format!("{path}.to_out.0"), c, c, true)?,
            heads,
        })
    }

    fn forward(&self, x: &Tensor, context: &Tensor, chunk: Option<usize>) -> Result<Tensor> {
        let q = self.to_q.forward(x)?;
        let k = self.to_k.forward(context)?;
        let v = self.to_v.forward(context)?;
        self.to_out
            .forward(&attention(&q, &k, &v, self.heads, chunk)?)
    }

    fn layers_mut(&mut self) -> Vec<&mut Adaptable> {
        vec![
            &mut self.to_q,
            &mut self.to_k,
            &mut self.to_v,
            &mut self.to_out,
        ]
    }
}

struct TransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff_in: Adaptable,
    ff_out: Adaptable,
}

impl TransformerBlock {
    fn load(l: &Loader, path: &str, c: usize, context: usize, heads: usize) -> Result<Self> {
        Ok(TransformerBlock {
            norm1: l.layer_norm(&format!("{path}.norm1"), c, 1e-5)?,
            attn1: Attention::load(l, &format!("{path}.attn1"), c, c, heads)?,
            norm2: l.layer_norm(&format!("{path}.norm2"), c, 1e-5)?,
            attn2: Attention::load(l, &format!("{path}.attn2"), c, context, heads)?,
            norm3: l.layer_norm(&format!("{path}.norm3"), c, 1e-5)?,
            // GEGLU: 4c hidden units, projected to twice that (value and gate).
            ff_in: l.linear(&format!("{path}.ff.net.0.proj"), c, 8 * c, true)?,
            ff_out: l.linear(&format!("{path}.ff.net.2"), 4 * c, c, true)?,
        })
    }

    fn forward(&self, x: &Tensor, context: &Tensor, chunk: Option<usize>) -> Result<Tensor> {
        let h = self.norm1.forward(x)?;
        let x = (self.attn1.forward(&h, &h, chunk)? + x)?;
        let x = (self
            .attn2
            .forward(&self.norm2.forward(&x)?, context, chunk)?
            + x)?;
        // GEGLU: the projection holds the value and the gate side by side.
        let ff = super::layers::geglu(&self.ff_in.forward(&self.norm3.forward(&x)?)?)?;
        self.ff_out.forward(&ff)? + x
    }

    fn layers_mut(&mut self) -> Vec<&mut Adaptable> {
        let mut v = self.attn1.layers_mut();
        v.extend(self.attn2.layers_mut());
        v.extend([&mut self.ff_in, &mut self.ff_out]);
        v
    }
}

/// diffusers' Transformer2DModel: norm, proj_in, transformer blocks, proj_out, residual.
struct SpatialTransformer {
    norm: GroupNorm,
    proj_in: Adaptable,
    blocks: Vec<TransformerBlock>,
    proj_out: Adaptable,
    chunk: Option<usize>,
}

impl SpatialTransformer {
    /// The attention module of UNet level `level` (down-block numbering; the mid block is the last level).
    fn load(
        l: &Loader,
        path: &str,
        level: usize,
        cfg: &UNetConfig,
        chunk: Option<usize>,
    ) -> Result<Self> {
        let (c, heads) = (cfg.block_out_channels[level], cfg.heads(level));
        let conv = !cfg.use_linear_projection;
        let blocks = (0..cfg.transformer_layers_per_block.get(level))
            .map(|k| {
                let p = format!("{path}.transformer_blocks.{k}");
                TransformerBlock::load(l, &p, c, cfg.cross_attention_dim, heads)
            })
            .collect::<Result<_>>()?;
        Ok(SpatialTransformer {
            norm: l.group_norm(&format!("{path}.norm"), c, cfg.norm_num_groups, 1e-6)?,
            proj_in: l.projection(&format!("{path}.proj_in"), c, c, conv)?,
            blocks,
            proj_out: l.projection(&format!("{path}.proj_out"), c, c, conv)?,
            chunk,
        })
    }

    fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let to_tokens = |t: Tensor| -> Result<Tensor> {
            let ch = t.dim(1)?;
            t.permute((0, 2, 3, 1))?.reshape((b, h * w, ch))
        };
        let to_map = |t: Tensor| -> Result<Tensor> {
            let ch = t.dim(2)?;
            t.reshape((b, h, w, ch))?
                .permute((0, 3, 1, 2))?
                .contiguous()
        };
        let n = self.norm.forward(x)?;
        let conv_proj = matches!(self.proj_in.shape, super::layers::AdapterShape::Conv { .. });
        let mut t = if conv_proj {
            to_tokens(self.proj_in.forward(&n)?)?
        } else {
            self.proj_in.forward(&to_tokens(n)?)?
        };
        for block in &self.blocks {
            t = block.forward(&t, context, self.chunk)?;
        }
        let out = if conv_proj {
            self.proj_out.forward(&to_map(t)?)?
        } else {
            to_map(self.proj_out.forward(&t)?)?
        };
        debug_assert_eq!(out.dims4()?, (b, c, h, w));
        out + x
    }

    fn layers_mut(&mut self) -> Vec<&mut Adaptable> {
        let mut v = vec![&mut self.proj_in];
        for b in &mut self.blocks {
            v.extend(b.layers_mut());
        }
        v.push(&mut self.proj_out);
        v
    }
}

/// One step of the UNet's path, with the shared pieces behind `Arc` so recompute can re-run them in backward.
enum Step {
    Resnet(Arc<Resnet>),
    Attention(Arc<SpatialTransformer>),
    Down(Adaptable),
    Up(Adaptable),
    /// Marks where a down-path activation is kept for the up path.
    Skip,
    /// Concatenates the newest kept activation to the input of the next step (up path).
    Concat,
}

pub struct UNet {
    pub config: UNetConfig,
    pub options: UNetOptions,
    conv_in: Adaptable,
    time_1: Adaptable,
    time_2: Adaptable,
    steps: Vec<Step>,
    norm_out: GroupNorm,
    conv_out: Adaptable,
    sink: GradSink,
}

impl UNet {
    /// Builds the network from `weights` (diffusers names) in `dtype` on `device`.
    pub fn load(
        weights: &dyn super::weights::Weights,
        config: &UNetConfig,
        options: UNetOptions,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let l = Loader {
            weights,
            dtype,
            device: device.clone(),
        };
        let cfg = config;
        let ch = &cfg.block_out_channels;
        let n = ch.len();
        let mut steps = vec![Step::Skip];
        let res = |path: String, cin, cout| -> Result<Step> {
            Ok(Step::Resnet(Arc::new(Resnet::load(
                &l, &path, cin, cout, cfg,
            )?)))
        };
        let attn = |path: String, level| -> Result<Step> {
            let t = SpatialTransformer::load(&l, &path, level, cfg, options.attention_chunk)?;
            Ok(Step::Attention(Arc::new(t)))
        };
        let mut cin = ch[0];
        for (i, &c) in ch.iter().enumerate() {
            for j in 0..cfg.layers_per_block {
                steps.push(res(format!("down_blocks.{i}.resnets.{j}"), cin, c)?);
                cin = c;
                if cfg.down_has_attention(i) {
                    steps.push(attn(format!("down_blocks.{i}.attentions.{j}"), i)?);
                }
                steps.push(Step::Skip);
            }
            if i + 1 < n {
                let path = format!("down_blocks.{i}.downsamplers.0.conv");
                steps.push(Step::Down(l.conv(&path, c, c, 3, 2, 1)?));
                steps.push(Step::Skip);
            }
        }
        steps.push(res("mid_block.resnets.0".into(), ch[n - 1], ch[n - 1])?);
        steps.push(attn("mid_block.attentions.0".into(), n - 1)?);
        steps.push(res("mid_block.resnets.1".into(), ch[n - 1], ch[n - 1])?);
        let mut prev = ch[n - 1];
        for i in 0..n {
            let out = ch[n - 1 - i];
            let skip_in = ch[(n - 1 - i).saturating_sub(1)];
            for j in 0..=cfg.layers_per_block {
                let skip = if j == cfg.layers_per_block {
                    skip_in
                } else {
                    out
                };
                let rin = if j == 0 { prev } else { out };
                steps.push(Step::Concat);
                steps.push(res(format!("up_blocks.{i}.resnets.{j}"), rin + skip, out)?);
                if cfg.up_has_attention(i) {
                    steps.push(attn(format!("up_blocks.{i}.attentions.{j}"), n - 1 - i)?);
                }
            }
            prev = out;
            if i + 1 < n {
                let path = format!("up_blocks.{i}.upsamplers.0.conv");
                steps.push(Step::Up(l.conv(&path, out, out, 3, 1, 1)?));
            }
        }
        Ok(UNet {
            config: cfg.clone(),
            options,
            conv_in: l.conv("conv_in", cfg.in_channels, ch[0], 3, 1, 1)?,
            time_1: l.linear("time_embedding.linear_1", ch[0], cfg.time_dim(), true)?,
            time_2: l.linear(
                "time_embedding.linear_2",
                cfg.time_dim(),
                cfg.time_dim(),
                true,
            )?,
            steps,
            norm_out: l.group_norm("conv_norm_out", ch[0], cfg.norm_num_groups, cfg.norm_eps)?,
            conv_out: l.conv("conv_out", ch[0], cfg.out_channels, 3, 1, 1)?,
            sink: GradSink::default(),
        })
    }

    /// Sinusoidal timestep features (diffusers: flip_sin_to_cos, no frequency shift), one row per sample.
    fn time_features(&self, t: &Tensor, dim: usize) -> Result<Tensor> {
        let half = dim / 2;
        let freqs: Vec<f32> = (0..half)
            .map(|i| (-(10000f64.ln()) * i as f64 / half as f64).exp() as f32)
            .collect();
        let freqs = Tensor::from_vec(freqs, (1, half), t.device())?;
        let args = t
            .to_dtype(DType::F32)?
            .unsqueeze(1)?
            .broadcast_mul(&freqs)?;
        Tensor::cat(&[args.cos()?, args.sin()?], 1)
    }

    /// Predicts noise (or v) for latents `x` [B, 4, H, W] at timesteps `t` [B] given `context` [B, N, C].
    pub fn forward(&self, x: &Tensor, t: &Tensor, context: &Tensor) -> Result<Tensor> {
        crate::device::with_upload_cache(x.device(), || self.forward_uncached(x, t, context))
    }

    fn forward_uncached(&self, x: &Tensor, t: &Tensor, context: &Tensor) -> Result<Tensor> {
        let dt = self.conv_in.weight.dtype();
        let (x, context) = (x.to_dtype(dt)?, context.to_dtype(dt)?);
        let tf = self
            .time_features(t, self.config.block_out_channels[0])?
            .to_dtype(dt)?;
        let temb = self.time_2.forward(&self.time_1.forward(&tf)?.silu()?)?;
        let mut h = self.conv_in.forward(&x)?;
        let mut kept: Vec<Tensor> = Vec::new();
        let mut concat = false;
        for step in &self.steps {
            match step {
                Step::Skip => kept.push(h.clone()),
                Step::Concat => concat = true,
                Step::Resnet(r) => {
                    if std::mem::take(&mut concat) {
                        let skip = kept.pop().expect("a kept activation for every up resnet");
                        h = Tensor::cat(&[&h, &skip], 1)?;
                    }
                    h = self.run(r.clone(), &h, &temb)?;
                }
                Step::Attention(a) => h = self.run_attention(a.clone(), &h, &context)?,
                Step::Down(c) => h = c.forward(&h)?,
                Step::Up(c) => {
                    let (_, _, hh, ww) = h.dims4()?;
                    h = c.forward(&h.upsample_nearest2d(hh * 2, ww * 2)?)?;
                }
            }
        }
        self.conv_out.forward(&self.norm_out.forward(&h)?.silu()?)
    }

    fn run(&self, r: Arc<Resnet>, x: &Tensor, temb: &Tensor) -> Result<Tensor> {
        if !self.options.recompute {
            return r.forward(x, temb);
        }
        let vars = adapter_vars(&r.layers_ref());
        let f: BlockFn = Arc::new(move |x: &Tensor, t: &Tensor| r.forward(x, t));
        checkpoint(f, x, temb, vars, &self.sink)
    }

    fn run_attention(
        &self,
        a: Arc<SpatialTransformer>,
        x: &Tensor,
        context: &Tensor,
    ) -> Result<Tensor> {
        if !self.options.recompute {
            return a.forward(x, context);
        }
        let vars = adapter_vars(&a.layers_ref());
        let f: BlockFn = Arc::new(move |x: &Tensor, c: &Tensor| a.forward(x, c));
        checkpoint(f, x, context, vars, &self.sink)
    }

    /// Back-propagates `loss` (computed through this network), including the gradients of recomputed blocks.
    pub fn backward(&self, loss: &Tensor) -> Result<candle_core::backprop::GradStore> {
        crate::device::with_upload_cache(loss.device(), || self.sink.backward(loss))
    }

    /// Every adaptable layer, for attaching, listing, saving and merging adapters. Call while no computation
    /// graph through the network is alive (recompute keeps blocks shared until backward ends).
    pub fn layers_mut(&mut self) -> Result<Vec<&mut Adaptable>> {
        let mut v = vec![&mut self.conv_in, &mut self.time_1, &mut self.time_2];
        for step in &mut self.steps {
            match step {
                Step::Resnet(r) => v.extend(Arc::get_mut(r).ok_or_else(busy)?.layers_mut()),
                Step::Attention(a) => v.extend(Arc::get_mut(a).ok_or_else(busy)?.layers_mut()),
                Step::Down(c) | Step::Up(c) => v.push(c),
                Step::Skip | Step::Concat => {}
            }
        }
        v.push(&mut self.conv_out);
        Ok(v)
    }
}

fn busy() -> candle_core::Error {
    candle_core::Error::Msg(
        "the UNet's layers are in use by a computation that has not finished".into(),
    )
}

fn adapter_vars(layers: &[&Adaptable]) -> Vec<Var> {
    layers
        .iter()
        .flat_map(|l| {
            l.adapters
                .iter()
                .flat_map(|a| [a.down.clone(), a.up.clone()])
        })
        .collect()
}

impl Resnet {
    fn layers_ref(&self) -> Vec<&Adaptable> {
        let mut v = vec![&self.conv1, &self.time_emb_proj, &self.conv2];
        v.extend(self.conv_shortcut.as_ref());
        v
    }
}

impl SpatialTransformer {
    fn layers_ref(&self) -> Vec<&Adaptable> {
        let mut v = vec![&self.proj_in];
        for b in &self.blocks {
            let a = [&b.attn1, &b.attn2];
            for at in a {
                v.extend([&at.to_q, &at.to_k, &at.to_v, &at.to_out]);
            }
            v.extend([&b.ff_in, &b.ff_out]);
        }
        v.push(&self.proj_out);
        v
    }
}

impl UNet {
    /// The diffusers module paths of every adaptable layer, `unet.` in front, for resolving LoRA files.
    pub fn module_paths(&mut self) -> Result<std::collections::BTreeSet<String>> {
        Ok(super::adapters::module_paths(
            self.layers_mut()?.into_iter().map(|l| &*l),
            "unet",
        ))
    }
}
