//! The CLIP text encoder of SD 1.x (OpenAI CLIP ViT-L/14) and SD 2.x (OpenCLIP ViT-H/14), inference only: it
//! turns token ids into the UNet's context, for caching and previews.
//!
//! Our own rather than candle-transformers' CLIP: its SD config cannot describe other sizes (private fields)
//! and its `Gelu` is the tanh approximation, where SD 2.x's encoder uses the exact (erf) GELU.

use super::layers::{Adaptable, LayerNorm, Loader};
use crate::model::checkpoint::{Family, var_builder};
use crate::model::weights::Weights;
use candle_core::{D, DType, Device, IndexOp, Module, Result, Tensor};
use candle_nn::Embedding;
use serde::{Deserialize, Serialize};

/// The fields of transformers' `CLIPTextConfig` (`text_encoder/config.json`) that the network needs. Its
/// `bos/eos/pad_token_id` are legacy values that do not match the vocabulary and are not used.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default = "default_positions")]
    pub max_position_embeddings: usize,
    pub hidden_act: Activation,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
}

fn default_positions() -> usize {
    77
}
fn default_eps() -> f64 {
    1e-5
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// `x · sigmoid(1.702 x)`, OpenAI CLIP (SD 1.x).
    QuickGelu,
    /// The exact (erf) GELU, OpenCLIP (SD 2.x).
    Gelu,
}

impl ClipTextConfig {
    /// Sizes from the shapes; the head count from CLIP's head width of 64 (12 heads for ViT-L, 16 for ViT-H)
    /// and the activation from the family. Encoders narrower than one head (the tiny test models) get one head
    /// and must be given their real config.
    pub fn from_weights(w: &dyn Weights, family: Family) -> std::result::Result<Self, String> {
        let shape = |name: &str| {
            w.shape(name)
                .ok_or_else(|| format!("the text encoder has no `{name}`"))
        };
        let [vocab_size, hidden_size] = shape("text_model.embeddings.token_embedding.weight")?[..]
        else {
            return Err("the token embedding is not a matrix".into());
        };
        let layers = (0..)
            .take_while(|i| w.contains(&format!("text_model.encoder.layers.{i}.mlp.fc1.weight")))
            .count();
        Ok(ClipTextConfig {
            vocab_size,
            hidden_size,
            intermediate_size: shape("text_model.encoder.layers.0.mlp.fc1.weight")?[0],
            num_hidden_layers: layers,
            num_attention_heads: (hidden_size / 64).max(1),
            max_position_embeddings: shape("text_model.embeddings.position_embedding.weight")?[0],
            hidden_act: match family {
                Family::Sd1 => Activation::QuickGelu,
                Family::Sd2 => Activation::Gelu,
            },
            layer_norm_eps: default_eps(),
        })
    }
}

/// What the encoder gives for a batch of token ids `[B, n·77]` (n chunks of 77, see `tokenizer`).
pub struct TextEmbeddings {
    /// The last layer after the final layer norm, `[B, n·77, H]`: SD's context by default.
    pub last: Tensor,
    /// `final_layer_norm(hidden_states[-2])` (clip skip 2, as A1111, kohya and diffusers' `clip_skip=1`).
    pub penultimate: Tensor,
    /// `last` at each row's first end-of-text token (the highest id), of the first chunk, `[B, H]`.
    pub pooled: Tensor,
}

impl TextEmbeddings {
    /// The UNet's context for a clip skip of 1 (last layer) or 2 (penultimate).
    pub fn context(&self, clip_skip: usize) -> Result<&Tensor> {
        match clip_skip {
            1 => Ok(&self.last),
            2 => Ok(&self.penultimate),
            n => candle_core::bail!(
                "clip skip {n} is not supported; use 1 (last layer) or 2 (penultimate layer)"
            ),
        }
    }
}

pub struct TextEncoder {
    token_embedding: Embedding,
    position_embedding: Tensor,
    layers: Vec<EncoderLayer>,
    final_layer_norm: LayerNorm,
    window: usize,
}

impl TextEncoder {
    /// `w` answers transformers' names (`text_model.encoder.layers.0.self_attn.q_proj.weight`…).
    pub fn new(
        w: &dyn Weights,
        config: &ClipTextConfig,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let vb = var_builder(w, dtype, device).pp("text_model");
        let l = Loader {
            weights: w,
            dtype,
            device: device.clone(),
        };
        let c = config;
        let embeddings = vb.pp("embeddings");
        Ok(TextEncoder {
            token_embedding: candle_nn::embedding(
                c.vocab_size,
                c.hidden_size,
                embeddings.pp("token_embedding"),
            )?,
            position_embedding: embeddings.get(
                (c.max_position_embeddings, c.hidden_size),
                "position_embedding.weight",
            )?,
            layers: (0..c.num_hidden_layers)
                .map(|i| EncoderLayer::new(&l, &format!("text_model.encoder.layers.{i}"), c))
                .collect::<Result<_>>()?,
            final_layer_norm: l.layer_norm(
                "text_model.final_layer_norm",
                c.hidden_size,
                c.layer_norm_eps,
            )?,
            window: c.max_position_embeddings,
        })
    }

    /// Every adaptable layer (attention projections and MLP of each encoder layer), for attaching adapters.
    pub fn layers_mut(&mut self) -> Vec<&mut Adaptable> {
        self.layers
            .iter_mut()
            .flat_map(EncoderLayer::layers_mut)
            .collect()
    }

    /// Token ids `[B, n·77]` (u32 or i64). Each chunk of 77 is encoded on its own and the results are
    /// concatenated along the sequence, as A1111 and kohya do for long prompts.
    pub fn forward(&self, input_ids: &Tensor) -> Result<TextEmbeddings> {
        let ids = input_ids.to_dtype(DType::U32)?;
        let (_, len) = ids.dims2()?;
        if len == 0 || !len.is_multiple_of(self.window) {
            candle_core::bail!(
                "token ids must come in chunks of {}; got a sequence of {len}",
                self.window
            );
        }
        let mut last = Vec::new();
        let mut penultimate = Vec::new();
        for chunk in 0..len / self.window {
            let (l, p) =
                self.forward_window(&ids.narrow(1, chunk * self.window, self.window)?)?;
            last.push(l);
            penultimate.push(p);
        }
        let pooled = pool(&last[0], &ids.narrow(1, 0, self.window)?)?;
        Ok(TextEmbeddings {
            last: Tensor::cat(&last, 1)?,
            penultimate: Tensor::cat(&penultimate, 1)?,
            pooled,
        })
    }

    fn forward_window(&self, ids: &Tensor) -> Result<(Tensor, Tensor)> {
        let mut x = self
            .token_embedding
            .forward(ids)?
            .broadcast_add(&self.position_embedding)?;
        let mask = causal_mask(self.window, x.device())?;
        // hidden_states[-2] is the embedding output when there is only one layer.
        let mut penultimate = x.clone();
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(&x, &mask)?;
            if i + 2 == self.layers.len() {
                penultimate = x.clone();
            }
        }
        Ok((
            self.final_layer_norm.forward(&x)?,
            self.final_layer_norm.forward(&penultimate)?,
        ))
    }
}

/// Each row of `hidden` at the first position of its row's highest id (the first end-of-text token: CLIP's
/// end-of-text is the last id of the vocabulary).
fn pool(hidden: &Tensor, ids: &Tensor) -> Result<Tensor> {
    let rows = ids.to_vec2::<u32>()?;
    let picked = rows
        .iter()
        .enumerate()
        .map(|(b, row)| {
            let max = row.iter().copied().max().unwrap_or(0);
            let pos = row.iter().position(|&id| id == max).unwrap_or(0);
            hidden.i((b, pos))
        })
        .collect::<Result<Vec<_>>>()?;
    Tensor::stack(&picked, 0)
}

/// `-inf` above the diagonal: each token sees itself and the tokens before it.
fn causal_mask(len: usize, device: &Device) -> Result<Tensor> {
    let mask: Vec<f32> = (0..len)
        .flat_map(|i| (0..len).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(mask, (len, len), device)
}

struct EncoderLayer {
    layer_norm1: LayerNorm,
    attention: Attention,
    layer_norm2: LayerNorm,
    fc1: Adaptable,
    fc2: Adaptable,
    activation: Activation,
}

impl EncoderLayer {
    fn new(l: &Loader, path: &str, c: &ClipTextConfig) -> Result<Self> {
        let (h, i) = (c.hidden_size, c.intermediate_size);
        Ok(EncoderLayer {
            layer_norm1: l.layer_norm(&format!("{path}.layer_norm1"), h, c.layer_norm_eps)?,
            attention: Attention::new(l, &format!("{path}.self_attn"), c)?,
            layer_norm2: l.layer_norm(&format!("{path}.layer_norm2"), h, c.layer_norm_eps)?,
            fc1: l.linear(&format!("{path}.mlp.fc1"), h, i, true)?,
            fc2: l.linear(&format!("{path}.mlp.fc2"), i, h, true)?,
            activation: c.hidden_act,
        })
    }

    fn layers_mut(&mut self) -> Vec<&mut Adaptable> {
        let a = &mut self.attention;
        vec![
            &mut a.q,
            &mut a.k,
            &mut a.v,
            &mut a.out,
            &mut self.fc1,
            &mut self.fc2,
        ]
    }

    fn forward(&self, x: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let x = (x + self
            .attention
            .forward(&self.layer_norm1.forward(x)?, mask)?)?;
        let h = self.fc1.forward(&self.layer_norm2.forward(&x)?)?;
        let h = match self.activation {
            // From primitives when gradients flow (training the text encoder): candle's fused sigmoid has no
            // backward.
            Activation::QuickGelu if h.track_op() => {
                (&h * (h.affine(-1.702, 0.0)?.exp()? + 1.0)?.recip()?)?
            }
            Activation::QuickGelu => (&h * candle_nn::ops::sigmoid(&(&h * 1.702)?)?)?,
            Activation::Gelu => h.gelu_erf()?,
        };
        x + self.fc2.forward(&h)?
    }
}

struct Attention {
    q: Adaptable,
    k: Adaptable,
    v: Adaptable,
    out: Adaptable,
    heads: usize,
}

impl Attention {
    fn new(l: &Loader, path: &str, c: &ClipTextConfig) -> Result<Self> {
        let h = c.hidden_size;
        let linear = |name: &str| l.linear(&format!("{path}.{name}"), h, h, true);
        Ok(Attention {
            q: linear("q_proj")?,
            k: linear("k_proj")?,
            v: linear("v_proj")?,
            out: linear("out_proj")?,
            heads: c.num_attention_heads,
        })
    }

    fn forward(&self, x: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (b, s, h) = x.dims3()?;
        let d = h / self.heads;
        // [b, s, h] → [b, heads, s, d], in f32 so f16 scores cannot overflow.
        let split = |t: Tensor| {
            t.reshape((b, s, self.heads, d))?
                .transpose(1, 2)?
                .to_dtype(DType::F32)?
                .contiguous()
        };
        let q = split((self.q.forward(x)? * (d as f64).powf(-0.5))?)?;
        let k = split(self.k.forward(x)?)?;
        let v = split(self.v.forward(x)?)?;
        let scores = q
            .matmul(&k.transpose(D::Minus2, D::Minus1)?.contiguous()?)?
            .broadcast_add(mask)?;
        // candle's fused softmax has no backward; the composite one does (training the text encoder).
        let weights = if scores.track_op() {
            candle_nn::ops::softmax(&scores, D::Minus1)?
        } else {
            candle_nn::ops::softmax_last_dim(&scores)?
        };
        let y = weights.matmul(&v)?;
        let y = y.transpose(1, 2)?.reshape((b, s, h))?.to_dtype(x.dtype())?;
        self.out.forward(&y)
    }
}
