//! Where model weights come from. Every network asks for its tensors by their diffusers name
//! (`down_blocks.0.resnets.0.conv1.weight`); a `Weights` source answers from a diffusers folder, a single-file
//! LDM checkpoint (through a key map), or memory (tests). Tensors are read from memory-mapped files one at a
//! time and converted on the way, so a checkpoint is never held twice in RAM.

use candle_core::{DType, Device, Result, Tensor};
use std::collections::HashMap;

pub trait Weights: Send + Sync {
    /// The tensor stored under the diffusers-style `name`, converted to `dtype` on `device`.
    fn get(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor>;
    /// Its shape, without reading the data.
    fn shape(&self, name: &str) -> Option<Vec<usize>>;
    /// Every name this source can answer.
    fn names(&self) -> Vec<String>;

    fn contains(&self, name: &str) -> bool {
        self.shape(name).is_some()
    }

    /// `get`, checking the tensor has the `shape` the network needs.
    fn get_shaped(
        &self,
        name: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let t = self.get(name, dtype, device)?;
        if t.dims() != shape {
            candle_core::bail!(
                "`{name}` has shape {:?} in the checkpoint but the network needs {shape:?}: the file is not the \
                 model it appears to be, or its config does not match it",
                t.dims()
            );
        }
        Ok(t)
    }
}

/// A view of another source under a name prefix: `prefixed(w, "unet")` answers `conv_in.weight` with
/// `unet.conv_in.weight`.
pub struct Prefixed<'a> {
    inner: &'a dyn Weights,
    prefix: String,
}

pub fn prefixed<'a>(inner: &'a dyn Weights, prefix: &str) -> Prefixed<'a> {
    Prefixed {
        inner,
        prefix: if prefix.is_empty() {
            String::new()
        } else {
            format!("{prefix}.")
        },
    }
}

impl Weights for Prefixed<'_> {
    fn get(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        self.inner
            .get(&format!("{}{name}", self.prefix), dtype, device)
    }
    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.inner.shape(&format!("{}{name}", self.prefix))
    }
    fn names(&self) -> Vec<String> {
        self.inner
            .names()
            .into_iter()
            .filter_map(|n| n.strip_prefix(&self.prefix).map(str::to_owned))
            .collect()
    }
    fn get_shaped(
        &self,
        name: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        self.inner
            .get_shaped(&format!("{}{name}", self.prefix), shape, dtype, device)
    }
}

/// Tensors held in memory (random test models, tensors converted at load time).
#[derive(Default)]
pub struct MemoryWeights {
    pub tensors: HashMap<String, Tensor>,
}

impl MemoryWeights {
    pub fn new(tensors: HashMap<String, Tensor>) -> Self {
        MemoryWeights { tensors }
    }
}

impl Weights for MemoryWeights {
    fn get(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        let t = self.tensors.get(name).ok_or_else(|| missing(name))?;
        t.to_device(device)?.to_dtype(dtype)
    }
    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.tensors.get(name).map(|t| t.dims().to_vec())
    }
    fn names(&self) -> Vec<String> {
        self.tensors.keys().cloned().collect()
    }
}

/// Random weights of whatever shape a network asks for: full-size architectures for benchmarks without a
/// checkpoint. Matrices and kernels ~ N(0, 1/fan_in), norm weights 1, biases 0.
pub struct RandomWeights;

impl Weights for RandomWeights {
    fn get(&self, name: &str, _dtype: DType, _device: &Device) -> Result<Tensor> {
        candle_core::bail!(
            "random weights are made for a requested shape; `{name}` was asked for without one"
        )
    }
    fn shape(&self, _name: &str) -> Option<Vec<usize>> {
        None
    }
    fn names(&self) -> Vec<String> {
        Vec::new()
    }
    fn get_shaped(
        &self,
        name: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let t = match shape.len() {
            1 if name.ends_with(".weight") => Tensor::ones(shape, DType::F32, device)?,
            1 => Tensor::zeros(shape, DType::F32, device)?,
            _ => {
                let fan_in: usize = shape[1..].iter().product();
                Tensor::randn(0f32, (1.0 / fan_in as f64).sqrt() as f32, shape, device)?
            }
        };
        t.to_dtype(dtype)
    }
}

/// Whether every value is finite: `0 · t` is 0 for finite values and NaN for NaN and ±inf, and one NaN makes the
/// sum NaN. (Values beyond f32's range, like 1e308 in an f64 file, become infinite on the way and count as not
/// finite.)
pub fn all_finite(t: &Tensor) -> Result<bool> {
    let t = t.to_dtype(DType::F32)?;
    let zero = t.affine(0.0, 0.0)?.sum_all()?.to_scalar::<f32>()?;
    Ok(zero.is_finite())
}

/// The error for a tensor a network needs but the file lacks.
pub fn missing(name: &str) -> candle_core::Error {
    candle_core::Error::Msg(format!(
        "the checkpoint has no tensor `{name}`; it is incomplete or not this model"
    ))
}

/// Another source with weight changes added on read: how a LoRA is merged into a network that is built from
/// weights (the text encoder) without copying the checkpoint.
pub struct WithDeltas<'a> {
    inner: &'a dyn Weights,
    /// Tensor name (`….weight`) → change, in any dtype, same shape as the stored tensor.
    deltas: HashMap<String, Tensor>,
}

impl<'a> WithDeltas<'a> {
    pub fn new(inner: &'a dyn Weights, deltas: HashMap<String, Tensor>) -> Self {
        WithDeltas { inner, deltas }
    }
}

impl Weights for WithDeltas<'_> {
    fn get(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        match self.deltas.get(name) {
            None => self.inner.get(name, dtype, device),
            Some(d) => {
                let base = self.inner.get(name, DType::F32, device)?;
                let d = d
                    .to_device(device)?
                    .to_dtype(DType::F32)?
                    .reshape(base.shape())?;
                (base + d)?.to_dtype(dtype)
            }
        }
    }
    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.inner.shape(name)
    }
    fn names(&self) -> Vec<String> {
        self.inner.names()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_and_deltas() {
        let t = Tensor::new(&[1f32, 2.0], &Device::Cpu).unwrap();
        let mem = MemoryWeights::new(HashMap::from([("unet.a.weight".to_owned(), t)]));
        let unet = prefixed(&mem, "unet");
        assert_eq!(unet.names(), vec!["a.weight".to_owned()]);
        let d = Tensor::new(&[0.5f32, -1.0], &Device::Cpu).unwrap();
        let merged = WithDeltas::new(&unet, HashMap::from([("a.weight".to_owned(), d)]));
        let v: Vec<f32> = merged
            .get("a.weight", DType::F32, &Device::Cpu)
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(v, [1.5, 1.0]);
        assert!(merged.get("b.weight", DType::F32, &Device::Cpu).is_err());
        assert!(all_finite(&Tensor::new(&[1f32, 2.0], &Device::Cpu).unwrap()).unwrap());
        for bad in [f64::NAN, f64::INFINITY, -1e308] {
            let t = Tensor::new(&[1f64, bad], &Device::Cpu).unwrap();
            assert!(!all_finite(&t).unwrap(), "{bad}");
        }
    }
}
