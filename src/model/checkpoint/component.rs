//! One network's tensors by diffusers name, answered from a stored file through a name table.

use super::file::{SafetensorsFile, TensorMeta};
use crate::model::weights::{Weights, missing};
use candle_core::{DType, Device, Result, Tensor};
use std::collections::HashMap;
use std::sync::Arc;

/// How a diffusers tensor is made from the stored one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transform {
    Same,
    /// A 1x1 conv kernel `[O, I, 1, 1]` used as a linear weight `[O, I]` (LDM's VAE attention).
    Squeeze1x1,
    /// Part `index` of `count` equal parts along dim 0 (open_clip's fused q/k/v `in_proj`).
    Chunk {
        index: usize,
        count: usize,
    },
}

impl Transform {
    /// The shape after the transform; `None` where the stored shape cannot take it (a damaged file).
    fn shape(self, stored: &[usize]) -> Option<Vec<usize>> {
        match self {
            Transform::Same => Some(stored.to_vec()),
            Transform::Squeeze1x1 => Some(stored.get(..2)?.to_vec()),
            Transform::Chunk { count, .. } => {
                let mut shape = stored.to_vec();
                *shape.first_mut()? /= count;
                Some(shape)
            }
        }
    }

    fn apply(self, t: Tensor) -> Result<Tensor> {
        match self {
            Transform::Same => Ok(t),
            Transform::Squeeze1x1 => t.squeeze(3)?.squeeze(2),
            Transform::Chunk { index, count } => {
                let n = t.dim(0)? / count;
                // A copy, so the part does not keep the whole fused tensor alive.
                t.narrow(0, index * n, n)?.copy()
            }
        }
    }
}

/// Where one diffusers-named tensor comes from.
#[derive(Debug, Clone)]
pub struct Source {
    pub key: String,
    pub transform: Transform,
}

impl Source {
    pub fn same(key: &str) -> Self {
        Source {
            key: key.to_owned(),
            transform: Transform::Same,
        }
    }
}

/// A component (UNet, VAE, text encoder) of a checkpoint, by diffusers name.
pub struct ComponentWeights {
    file: Arc<SafetensorsFile>,
    names: HashMap<String, Source>,
}

impl ComponentWeights {
    pub fn new(file: Arc<SafetensorsFile>, names: HashMap<String, Source>) -> Self {
        ComponentWeights { file, names }
    }

    /// The stored tensors behind this component, each with the number of parts it is split into (open_clip's
    /// q/k/v each use a third of the fused tensor), for parameter counts.
    pub fn stored(&self) -> impl Iterator<Item = (&TensorMeta, usize)> {
        self.names.values().filter_map(|s| {
            let parts = match s.transform {
                Transform::Chunk { count, .. } => count,
                _ => 1,
            };
            Some((self.file.meta(&s.key)?, parts))
        })
    }

    /// Each diffusers name with its stored key, header entry and transform (for validation).
    pub fn entries(&self) -> impl Iterator<Item = (&str, &str, &TensorMeta, Transform)> {
        self.names.iter().filter_map(|(name, s)| {
            Some((
                name.as_str(),
                s.key.as_str(),
                self.file.meta(&s.key)?,
                s.transform,
            ))
        })
    }

    /// The diffusers-side shape of `name`, if it exists and its stored shape can take the transform.
    pub fn shape_of(&self, name: &str) -> Option<Vec<usize>> {
        let source = self.names.get(name)?;
        source.transform.shape(&self.file.meta(&source.key)?.shape)
    }

    /// A tensor as stored, by its key in the file.
    pub fn load_stored(&self, key: &str, device: &Device) -> Result<Tensor> {
        self.file.load(key, device)
    }
}

impl Weights for ComponentWeights {
    fn get(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        let source = self.names.get(name).ok_or_else(|| missing(name))?;
        let stored = self.file.load(&source.key, device)?;
        source.transform.apply(stored)?.to_dtype(dtype)
    }

    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.shape_of(name)
    }

    fn names(&self) -> Vec<String> {
        self.names.keys().cloned().collect()
    }
}
