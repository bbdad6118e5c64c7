//! Putting LoRA files onto networks: attach (unmerged, at a weight, for previews and continued training) or
//! merge into the base weights (for speed), matching modules by their diffusers path.

use super::layers::{Adaptable, Lora};
use crate::lora::LoraSet;
use candle_core::{DType, Result, Var};
use std::collections::BTreeSet;

/// How a LoRA is put onto a network.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attach {
    /// As an extra adapter beside the base weight: its weight can change, it can be removed or trained on.
    Unmerged,
    /// Added into the base weight: no cost per step, but fixed.
    Merged,
}

/// The module paths of `layers` with `component.` in front (`unet.down_blocks.0…`), as LoRA files name them.
pub fn module_paths<'a>(
    layers: impl IntoIterator<Item = &'a Adaptable>,
    component: &str,
) -> BTreeSet<String> {
    layers
        .into_iter()
        .map(|l| format!("{component}.{}", l.path))
        .collect()
}

/// Puts every module of `set` under `component` onto its layer at `multiplier`. Returns how many were attached;
/// modules for other components are left for their network.
pub fn attach(
    layers: Vec<&mut Adaptable>,
    set: &LoraSet,
    component: &str,
    multiplier: f64,
    how: Attach,
) -> Result<usize> {
    let mut attached = 0;
    for layer in layers {
        let Some(m) = set.modules.get(&format!("{component}.{}", layer.path)) else {
            continue;
        };
        let expect = layer.weight.dims();
        let delta_shape = [&m.up.dims()[..1], &m.down.dims()[1..]].concat();
        if delta_shape != expect {
            candle_core::bail!(
                "the LoRA's {component}.{} changes a {delta_shape:?} weight, but this model's is {expect:?}: the LoRA \
                 was trained for another model family",
                layer.path
            );
        }
        match how {
            Attach::Merged => layer.merge(&m.delta(multiplier)?)?,
            Attach::Unmerged => {
                let dev = layer.weight.device();
                let var = |t: &candle_core::Tensor| {
                    Var::from_tensor(&t.to_dtype(DType::F32)?.to_device(dev)?)
                };
                layer.adapters.push(Lora {
                    down: var(&m.down)?,
                    up: var(&m.up)?,
                    alpha: f64::from(m.alpha),
                    multiplier,
                    dropout: 0.0,
                });
            }
        }
        attached += 1;
    }
    Ok(attached)
}

/// Which adapter a layer gets when training.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Slot {
    /// A LoRA of the network rank (linear layers and 1×1 convs).
    Linear,
    /// A LoCon of the conv rank (3×3 convs).
    Conv,
}

/// The adapter a UNet layer gets for `targets`, as kohya places them: inside the transformers the attention
/// projections and proj_in/proj_out always, the feed-forward layers from `AttentionAndFeedForward` on; with `All`
/// also the resnets (3×3 convs as LoCon, time projection and shortcut as LoRA) and the resamplers. conv_in,
/// conv_out and the time embedding are never adapted.
pub fn unet_slot(layer: &Adaptable, targets: crate::train::config::Targets) -> Option<Slot> {
    use super::layers::AdapterShape;
    use crate::train::config::Targets;
    let p = layer.path.as_str();
    let kind = match layer.shape {
        AdapterShape::Conv { kernel, .. } if kernel > 1 => Slot::Conv,
        _ => Slot::Linear,
    };
    if p.contains(".attentions.") {
        let ff = p.ends_with(".ff.net.0.proj") || p.ends_with(".ff.net.2");
        return (!ff || targets != Targets::Attention).then_some(kind);
    }
    let resnet_or_resampler = p.contains(".resnets.") || p.contains("samplers.");
    (targets == Targets::All && resnet_or_resampler).then_some(kind)
}

/// The adapters being trained, by layer path; their variables are shared with the layers.
pub struct Trainable {
    pub adapters: Vec<(String, Lora)>,
}

impl Trainable {
    /// Adds a fresh adapter to every layer `slot` picks, with (rank, alpha) for linear and conv slots and
    /// `dropout` on all of them.
    pub fn attach(
        layers: Vec<&mut Adaptable>,
        slot: impl Fn(&Adaptable) -> Option<Slot>,
        linear: (usize, f64),
        conv: (usize, f64),
        dropout: f64,
        rng: &mut impl rand::Rng,
    ) -> Result<Trainable> {
        let mut adapters = Vec::new();
        for layer in layers {
            let (rank, alpha) = match slot(layer) {
                Some(Slot::Linear) => linear,
                Some(Slot::Conv) => conv,
                None => continue,
            };
            layer.add_adapter(rank, alpha, rng)?;
            let lora = layer.adapters.last_mut().expect("just added");
            lora.dropout = dropout;
            adapters.push((layer.path.clone(), lora.clone()));
        }
        Ok(Trainable { adapters })
    }

    pub fn vars(&self) -> Vec<Var> {
        self.adapters
            .iter()
            .flat_map(|(_, a)| [a.down.clone(), a.up.clone()])
            .collect()
    }

    /// The same adapters with `component.` in front of their paths (`unet.…`, `text_encoder.…`), so the adapters
    /// of several networks can live in one set.
    pub fn under(self, component: &str) -> Trainable {
        Trainable {
            adapters: self
                .adapters
                .into_iter()
                .map(|(p, a)| (format!("{component}.{p}"), a))
                .collect(),
        }
    }

    /// The adapters whose path starts with `component.`.
    pub fn vars_of(&self, component: &str) -> Vec<Var> {
        let prefix = format!("{component}.");
        self.adapters
            .iter()
            .filter(|(p, _)| p.starts_with(&prefix))
            .flat_map(|(_, a)| [a.down.clone(), a.up.clone()])
            .collect()
    }

    /// The adapters' current values as a LoRA set under `component`, for saving.
    pub fn to_set(&self, component: &str) -> std::result::Result<LoraSet, crate::lora::LoraError> {
        self.clone_paths(|p| format!("{component}.{p}"))
    }

    /// The adapters' current values as a LoRA set, their paths being full module paths already (see `under`).
    pub fn to_lora_set(&self) -> std::result::Result<LoraSet, crate::lora::LoraError> {
        self.clone_paths(str::to_owned)
    }

    fn clone_paths(
        &self,
        name: impl Fn(&str) -> String,
    ) -> std::result::Result<LoraSet, crate::lora::LoraError> {
        let mut set = LoraSet {
            modules: Default::default(),
            metadata: Default::default(),
        };
        for (path, a) in &self.adapters {
            let m = crate::lora::LoraModule::new(
                a.down.as_tensor().copy()?,
                a.up.as_tensor().copy()?,
                a.alpha as f32,
            )?;
            set.modules.insert(name(path), m);
        }
        Ok(set)
    }
}
