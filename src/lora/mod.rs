//! LoRA adapters as data and as files: the in-memory set of down/up/alpha per adapted layer, kohya-format save
//! with `ss_*`/`modelspec.*` metadata, and load from kohya and diffusers/PEFT layouts
//! (notes/lora-format.md). Layers find their adapter by the diffusers module path, with the model component in
//! front: `unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`,
//! `text_encoder.text_model.encoder.layers.0.self_attn.q_proj`.

mod file;
mod metadata;
mod names;

pub use file::{LoadReport, load, save_kohya};
pub use metadata::{BaseModel, ConvLora, DatasetDir, LoraMetadata};
pub use names::{KohyaIndex, kohya_name};

use candle_core::{DType, Tensor};
use std::collections::BTreeMap;

#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    /// A file or adapter that does not make sense; the message says which key or module and why.
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}

/// The low-rank update of one layer: `ΔW = multiplier · alpha/rank · up @ down`.
/// Linear: `down` [rank, in], `up` [out, rank]. Conv: `down` [rank, in, kh, kw], `up` [out, rank, 1, 1].
#[derive(Clone, Debug)]
pub struct LoraModule {
    pub down: Tensor,
    pub up: Tensor,
    pub alpha: f32,
}

impl LoraModule {
    /// Checks that `down` and `up` form a linear or conv pair of the same rank.
    pub fn new(down: Tensor, up: Tensor, alpha: f32) -> Result<Self, LoraError> {
        check_pair(down.dims(), up.dims()).map_err(LoraError::Invalid)?;
        Ok(LoraModule { down, up, alpha })
    }

    pub fn rank(&self) -> usize {
        self.down.dims()[0]
    }

    /// alpha / rank: what kohya multiplies the update by.
    pub fn scale(&self) -> f64 {
        self.alpha as f64 / self.rank() as f64
    }

    /// The weight update to add to the base weight when merging, shaped like that weight ([out, in] or
    /// [out, in, kh, kw]), in f32 whatever the stored dtype; cast it to the base weight's dtype to add it.
    pub fn delta(&self, multiplier: f64) -> candle_core::Result<Tensor> {
        let down = self.down.to_dtype(DType::F32)?;
        let up = self.up.to_dtype(DType::F32)?;
        // Contract over the rank; a conv's kernel dims ride along flattened with its input channels.
        let product = up.flatten_from(1)?.matmul(&down.flatten_from(1)?)?;
        let mut shape = vec![up.dim(0)?];
        shape.extend_from_slice(&down.dims()[1..]);
        product.reshape(shape)? * (multiplier * self.scale())
    }
}

/// Why `down`/`up` shapes cannot be one LoRA pair, if they cannot.
fn check_pair(down: &[usize], up: &[usize]) -> Result<(), String> {
    let rank = down.first().copied().unwrap_or(0);
    let expected_up = match down.len() {
        2 => format!("[out, {rank}]"),
        4 => format!("[out, {rank}, 1, 1]"),
        _ => {
            return Err(format!(
                "lora_down has shape {down:?}; expected [rank, in] (linear) or [rank, in, kh, kw] (conv)"
            ));
        }
    };
    let up_fits =
        up.len() == down.len() && up.get(1) == Some(&rank) && up[2..].iter().all(|&d| d == 1);
    if rank == 0 || !up_fits {
        return Err(format!(
            "lora_up has shape {up:?} but lora_down has {down:?}: for rank {rank} lora_up must be {expected_up}"
        ));
    }
    Ok(())
}

/// All adapters of a model, keyed by module path, with the metadata of the file they came from.
#[derive(Clone, Debug, Default)]
pub struct LoraSet {
    pub modules: BTreeMap<String, LoraModule>,
    /// What the loaded file carried (`ss_*`, `modelspec.*`, …); `save_kohya` writes the `LoraMetadata` it is
    /// given instead.
    pub metadata: BTreeMap<String, String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn t(values: &[f32], shape: &[usize]) -> Tensor {
        Tensor::from_vec(values.to_vec(), shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn linear_delta_is_scaled_up_times_down() {
        // rank 2, in 3, out 2; alpha 1 → scale 0.5; multiplier 2 → factor 1.
        let down = t(&[1., 0., 2., 0., 1., 1.], &[2, 3]);
        let up = t(&[1., 1., 0., 3.], &[2, 2]);
        let m = LoraModule::new(down, up, 1.0).unwrap();
        let delta: Vec<Vec<f32>> = m.delta(2.0).unwrap().to_vec2().unwrap();
        assert_eq!(delta, vec![vec![1., 1., 3.], vec![0., 3., 3.]]);
    }

    #[test]
    fn conv_delta_contracts_over_rank() {
        let down = Tensor::arange(0f32, 2. * 3. * 9., &Device::Cpu)
            .unwrap()
            .reshape((2, 3, 3, 3))
            .unwrap();
        let up = t(&[1., 0., 0., 1., 1., 1., 2., -1.], &[4, 2, 1, 1]);
        let m = LoraModule::new(down.clone(), up, 2.0).unwrap();
        let delta = m.delta(1.0).unwrap();
        assert_eq!(delta.dims(), [4, 3, 3, 3]);
        // Row 2 of up is [1, 1]: the sum of both down kernels.
        let expected = (down.get(0).unwrap() + down.get(1).unwrap()).unwrap();
        let diff = (delta.get(2).unwrap() - expected)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap();
        assert_eq!(diff.max(0).unwrap().to_scalar::<f32>().unwrap(), 0.0);
    }

    #[test]
    fn mismatched_pairs_are_explained() {
        let zeros = |shape: &[usize]| Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap();
        let err = LoraModule::new(zeros(&[4, 16]), zeros(&[16, 8]), 4.0)
            .unwrap_err()
            .to_string();
        assert!(err.contains("[16, 8]") && err.contains("[out, 4]"), "{err}");
        let err = LoraModule::new(zeros(&[4, 16, 3, 3]), zeros(&[16, 4, 3, 3]), 4.0)
            .unwrap_err()
            .to_string();
        assert!(err.contains("[out, 4, 1, 1]"), "{err}");
        let err = LoraModule::new(zeros(&[4]), zeros(&[16, 4]), 4.0)
            .unwrap_err()
            .to_string();
        assert!(err.contains("[rank, in]"), "{err}");
    }
}
