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
                });
            }
        }
        attached += 1;
    }
    Ok(attached)
}
