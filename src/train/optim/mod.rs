//! Optimizers for adapter weights: AdamW (f32 moments), AdamW8bit (8-bit moments), Adafactor (factored second
//! moment, no first moment), Prodigy (estimates its own step size) and Lion (sign of a momentum). All clip by the
//! global gradient norm and expose their state for resume. Each is checked against its reference implementation
//! (tests/optimizer_parity.rs, fixtures from tools/make_optim_reference.py).

mod blockwise;
mod prodigy;
mod rules;

use candle_core::backprop::GradStore;
use candle_core::{DType, Result, Tensor, Var};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerKind {
    #[default]
    AdamW,
    /// AdamW with both moments stored in 8 bits, block-wise quantized (bitsandbytes' `AdamW8bit`).
    #[serde(rename = "adamw_8bit")]
    AdamW8bit,
    Adafactor,
    /// Prodigy (Mishchenko & Defazio 2023): estimates the step size itself; the learning rate stays near 1.
    Prodigy,
    /// Lion (Chen et al. 2023): the sign of a momentum blend; one state tensor, lr 3–10× below AdamW's.
    Lion,
}

impl OptimizerKind {
    /// How many f32 copies of the adapters its state takes (for the memory estimate): AdamW two moments,
    /// AdamW8bit two one-byte ones, Adafactor row and column means (next to nothing), Prodigy two moments, the
    /// running sum and the starting weights, Lion one momentum.
    pub fn state_copies(self) -> f64 {
        match self {
            OptimizerKind::AdamW => 2.0,
            OptimizerKind::AdamW8bit => 0.5,
            OptimizerKind::Adafactor => 0.1,
            OptimizerKind::Prodigy => 4.0,
            OptimizerKind::Lion => 1.0,
        }
    }

    /// The usual learning rates (UNet, text encoder) of LoRA training with this optimizer.
    pub fn usual_lr(self) -> (f64, f64) {
        match self {
            OptimizerKind::AdamW | OptimizerKind::AdamW8bit | OptimizerKind::Adafactor => {
                (1e-4, 5e-5)
            }
            OptimizerKind::Prodigy => (1.0, 1.0),
            OptimizerKind::Lion => (3e-5, 1.5e-5),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimizerParams {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Prodigy: multiplies its step-size estimate (kohya users pass `d_coef` in `optimizer_args`).
    pub d_coef: f64,
    /// Prodigy: the initial step-size estimate.
    pub d0: f64,
    /// Prodigy: Adam's bias correction on the estimated step.
    pub use_bias_correction: bool,
    /// Prodigy: keeps the estimate from growing during warmup.
    pub safeguard_warmup: bool,
}

impl Default for OptimizerParams {
    fn default() -> Self {
        OptimizerParams {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            d_coef: 1.0,
            d0: 1e-6,
            use_bias_correction: false,
            safeguard_warmup: false,
        }
    }
}

/// A parameter group: variables sharing a learning rate (UNet adapters, text-encoder adapters).
pub struct Group {
    pub vars: Vec<Var>,
    pub lr: f64,
}

/// Updates adapter variables from gradients; state tensors are f32 and named for saving.
pub struct Optimizer {
    kind: OptimizerKind,
    params: OptimizerParams,
    pub groups: Vec<Group>,
    step: u64,
    /// Per variable (by group and index), as `state_shapes` lists.
    state: HashMap<(usize, usize), Vec<Tensor>>,
    /// AdamW8bit's code tables, on the variables' device (made by the first step).
    codes: Option<blockwise::Codes>,
    /// Prodigy's step-size estimate.
    estimate: prodigy::Estimate,
    /// The device-side step's buffers (AdamW on a GPU), made by the first `prepare_step`.
    #[cfg(feature = "cuda")]
    device: Option<DeviceStep>,
}

/// Buffers at fixed device addresses, so that a step's kernels can be captured once and replayed: Σ g² over all
/// gradients, and per group the hyper-parameters `Hyper` lays out.
#[cfg(feature = "cuda")]
struct DeviceStep {
    sumsq: Tensor,
    hyper: Vec<Tensor>,
    /// The prepared step's loss scale.
    loss_scale: f64,
}

/// The hyper-parameter vector of one group, in the order `adamw_f32` (kernels/train.cu) reads it.
#[cfg(feature = "cuda")]
struct Hyper {
    lr: f64,
    step: i32,
    max_norm: f64,
    loss_scale: f64,
}

#[cfg(feature = "cuda")]
impl Hyper {
    fn values(&self, p: &OptimizerParams) -> Vec<f32> {
        let t = self.step;
        [
            self.lr,
            1.0 / (1.0 - p.beta1.powi(t)),
            1.0 / (1.0 - p.beta2.powi(t)),
            1.0 - self.lr * p.weight_decay,
            1.0 / self.loss_scale,
            self.max_norm,
            p.beta1,
            p.beta2,
            p.eps,
        ]
        .iter()
        .map(|&v| v as f32)
        .collect()
    }
}

impl Optimizer {
    pub fn new(kind: OptimizerKind, params: OptimizerParams, groups: Vec<Group>) -> Self {
        Optimizer {
            kind,
            params,
            groups,
            step: 0,
            state: HashMap::new(),
            codes: None,
            estimate: prodigy::Estimate::new(&params),
            #[cfg(feature = "cuda")]
            device: None,
        }
    }

    pub fn steps_taken(&self) -> u64 {
        self.step
    }

    /// The global L2 norm of the gradients of all variables.
    fn grad_norm(&self, grads: &GradStore) -> Result<f64> {
        // Summed on the device and read once: one host sync, not one per variable.
        let grads: Vec<&Tensor> = self
            .groups
            .iter()
            .flat_map(|g| &g.vars)
            .filter_map(|v| grads.get(v))
            .collect();
        let mut total: Option<Tensor> = None;
        for g in grads {
            let sq = g.to_dtype(DType::F32)?.sqr()?.sum_all()?;
            total = Some(match total {
                Some(t) => (t + sq)?,
                None => sq,
            });
        }
        Ok(total.map_or(Ok(0.0), |t| t.to_scalar::<f32>())?.sqrt() as f64)
    }

    /// One update with each group's learning rate times `lr_factor`, from gradients of a loss multiplied by
    /// `loss_scale` (fp16 loss scaling; 1 otherwise), after clipping the global gradient norm to `max_norm`
    /// (0 = no clipping). Returns the (unscaled) gradient norm before clipping; when it is not finite nothing is
    /// updated.
    pub fn step(
        &mut self,
        grads: &GradStore,
        lr_factor: f64,
        max_norm: f64,
        loss_scale: f64,
    ) -> Result<f64> {
        #[cfg(feature = "cuda")]
        if self.on_device() {
            self.prepare_step(lr_factor, max_norm, loss_scale)?;
            self.launch_step(grads)?;
            return self.finish_step();
        }
        let norm = self.grad_norm(grads)? / loss_scale;
        if !norm.is_finite() {
            return Ok(norm);
        }
        let clip = if max_norm > 0.0 && norm > max_norm {
            max_norm / (norm + 1e-6)
        } else {
            1.0
        } / loss_scale;
        self.step += 1;
        let mut clipped = Vec::new();
        for (gi, group) in self.groups.iter().enumerate() {
            for (vi, var) in group.vars.iter().enumerate() {
                if let Some(g) = grads.get(var) {
                    clipped.push(((gi, vi), g.to_dtype(DType::F32)?.affine(clip, 0.0)?));
                }
            }
        }
        let lrs: Vec<f64> = self.groups.iter().map(|g| g.lr * lr_factor).collect();
        if self.kind == OptimizerKind::Prodigy {
            let p = self.params;
            let k = self.step - 1;
            let (groups, state) = (&self.groups, &mut self.state);
            if !prodigy::step(&mut self.estimate, groups, &lrs, state, &clipped, &p, k)? {
                // All gradients zero: prodigyopt takes no step and counts none.
                self.step -= 1;
            }
            return Ok(norm);
        }
        for ((gi, vi), g) in clipped {
            let direction = self.direction(gi, vi, &g)?;
            let var = &self.groups[gi].vars[vi];
            let lr = lrs[gi];
            let decayed = var
                .as_tensor()
                .affine(1.0 - lr * self.params.weight_decay, 0.0)?;
            var.set(&(decayed - direction.affine(lr, 0.0)?)?)?;
        }
        Ok(norm)
    }

    /// The direction of variable (gi, vi) for its gradient `g`, updating its state.
    fn direction(&mut self, gi: usize, vi: usize, g: &Tensor) -> Result<Tensor> {
        let (p, step) = (self.params, self.step);
        let st = self.state.entry((gi, vi)).or_default();
        match self.kind {
            OptimizerKind::AdamW => rules::adamw(st, g, &p, step),
            OptimizerKind::AdamW8bit => {
                if self.codes.is_none() {
                    self.codes = Some(blockwise::Codes::new(g.device())?);
                }
                let codes = self.codes.as_ref().expect("made above");
                rules::adamw_8bit(st, g, &p, step, codes)
            }
            OptimizerKind::Adafactor => rules::adafactor(st, g, step),
            OptimizerKind::Lion => rules::lion(st, g, &p),
            OptimizerKind::Prodigy => candle_core::bail!("Prodigy steps all variables at once"),
        }
    }

    /// Whether steps run on the device as one fused AdamW kernel per variable, in three parts: `prepare_step`
    /// (host → device: this step's hyper-parameters), `launch_step` (kernels only, no host sync: capturable
    /// into a CUDA graph) and `finish_step` (reads the norm back).
    #[cfg(feature = "cuda")]
    pub fn on_device(&self) -> bool {
        let first = self.groups.iter().flat_map(|g| &g.vars).next();
        self.kind == OptimizerKind::AdamW
            && first.is_some_and(|v| crate::model::fused::on(v.device()))
    }

    /// Writes the next step's hyper-parameters into the device buffers (making them, and any missing moment
    /// tensors, the first time).
    #[cfg(feature = "cuda")]
    pub fn prepare_step(&mut self, lr_factor: f64, max_norm: f64, loss_scale: f64) -> Result<()> {
        let Some(device) = self
            .groups
            .iter()
            .flat_map(|g| &g.vars)
            .next()
            .map(|v| v.device().clone())
        else {
            return Ok(());
        };
        if self.device.is_none() {
            self.device = Some(DeviceStep {
                sumsq: Tensor::zeros(1, DType::F32, &device)?,
                hyper: (0..self.groups.len())
                    .map(|_| Tensor::zeros(9, DType::F32, &device))
                    .collect::<Result<_>>()?,
                loss_scale,
            });
        }
        for (gi, group) in self.groups.iter().enumerate() {
            for (vi, var) in group.vars.iter().enumerate() {
                let st = self.state.entry((gi, vi)).or_default();
                if st.is_empty() {
                    st.push(var.zeros_like()?);
                    st.push(var.zeros_like()?);
                }
            }
        }
        let buffers = self.device.as_mut().expect("made above");
        buffers.loss_scale = loss_scale;
        for (group, hyper) in self.groups.iter().zip(&buffers.hyper) {
            let h = Hyper {
                lr: group.lr * lr_factor,
                step: self.step as i32 + 1,
                max_norm,
                loss_scale,
            };
            hyper.slice_set(&Tensor::from_vec(h.values(&self.params), 9, &device)?, 0, 0)?;
        }
        Ok(())
    }

    /// The step's kernels: Σ g², then each variable's AdamW update (skipped on the device when the norm is not
    /// finite). Variables without a gradient are left alone.
    #[cfg(feature = "cuda")]
    pub fn launch_step(&self, grads: &GradStore) -> Result<()> {
        use crate::model::fused;
        let Some(buffers) = &self.device else {
            candle_core::bail!("optimizer: launch_step before prepare_step")
        };
        fused::fill(&buffers.sumsq, 0.0)?;
        for var in self.groups.iter().flat_map(|g| &g.vars) {
            if let Some(g) = grads.get(var) {
                fused::add_sum_of_squares(g, &buffers.sumsq)?;
            }
        }
        for (gi, group) in self.groups.iter().enumerate() {
            for (vi, var) in group.vars.iter().enumerate() {
                let Some(g) = grads.get(var) else { continue };
                let st = &self.state[&(gi, vi)];
                let moments = (&st[0], &st[1]);
                fused::adamw(
                    var.as_tensor(),
                    g,
                    moments,
                    &buffers.sumsq,
                    &buffers.hyper[gi],
                )?;
            }
        }
        Ok(())
    }

    /// The (unscaled) gradient norm of the launched step; counts the step when it was finite (and so applied).
    #[cfg(feature = "cuda")]
    pub fn finish_step(&mut self) -> Result<f64> {
        let Some(buffers) = &self.device else {
            candle_core::bail!("optimizer: finish_step before prepare_step")
        };
        let norm = (buffers.sumsq.to_vec1::<f32>()?[0] as f64).sqrt() / buffers.loss_scale;
        if norm.is_finite() {
            self.step += 1;
        }
        Ok(norm)
    }

    /// The state as named tensors (for the training-state file), plus the step count.
    pub fn state_tensors(&self) -> Result<(HashMap<String, Tensor>, u64)> {
        let mut out = HashMap::new();
        for ((gi, vi), ts) in &self.state {
            for (k, t) in ts.iter().enumerate() {
                out.insert(format!("{gi}.{vi}.{k}"), t.clone());
            }
        }
        if self.kind == OptimizerKind::Prodigy {
            out.insert(PRODIGY_ESTIMATE.into(), self.estimate.to_tensor()?);
        }
        Ok((out, self.step))
    }

    /// Restores what `state_tensors` returned (same groups and variables in the same order).
    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>, step: u64) -> Result<()> {
        self.state.clear();
        let mut keys: Vec<&String> = tensors
            .keys()
            .filter(|k| k.as_str() != PRODIGY_ESTIMATE)
            .collect();
        keys.sort_by_key(|k| {
            k.split('.')
                .map(|p| p.parse::<usize>().unwrap_or(usize::MAX))
                .collect::<Vec<_>>()
        });
        for key in keys {
            let parts: Vec<usize> = key.split('.').filter_map(|p| p.parse().ok()).collect();
            let [gi, vi, _] = parts[..] else {
                candle_core::bail!("optimizer state: bad key {key}")
            };
            let dev = self
                .groups
                .get(gi)
                .and_then(|g| g.vars.get(vi))
                .map(|v| v.device().clone());
            let dev = dev.ok_or_else(|| {
                candle_core::Error::Msg(format!("optimizer state for a missing variable {key}"))
            })?;
            let st = self.state.entry((gi, vi)).or_default();
            if parts[2] != st.len() {
                candle_core::bail!("moment {}.{}.{} is missing", gi, vi, st.len())
            }
            let t = &tensors[key];
            let dtype = if t.dtype() == DType::U8 {
                DType::U8
            } else {
                DType::F32
            };
            st.push(t.to_device(&dev)?.to_dtype(dtype)?);
        }
        for ((gi, vi), st) in &self.state {
            let var = &self.groups[*gi].vars[*vi];
            let expected = self.state_shapes(var.dims());
            let found: Vec<(Vec<usize>, DType)> =
                st.iter().map(|t| (t.dims().to_vec(), t.dtype())).collect();
            if found != expected {
                candle_core::bail!(
                    "the state of variable {gi}.{vi} is {found:?}; a {:?} variable of {:?} needs {expected:?}",
                    var.dims(),
                    self.kind
                )
            }
        }
        if self.kind == OptimizerKind::Prodigy {
            let Some(t) = tensors.get(PRODIGY_ESTIMATE) else {
                candle_core::bail!("the Prodigy step-size estimate `{PRODIGY_ESTIMATE}` is missing")
            };
            self.estimate = prodigy::Estimate::from_tensor(t)?;
        }
        self.step = step;
        Ok(())
    }

    /// The shapes and dtypes of one variable's state.
    fn state_shapes(&self, dims: &[usize]) -> Vec<(Vec<usize>, DType)> {
        match self.kind {
            OptimizerKind::AdamW => vec![(dims.to_vec(), DType::F32); 2],
            OptimizerKind::AdamW8bit => rules::adamw_8bit_state(dims),
            OptimizerKind::Adafactor => rules::adafactor_state(dims),
            OptimizerKind::Prodigy => prodigy::state_shapes(dims),
            OptimizerKind::Lion => vec![(dims.to_vec(), DType::F32)],
        }
    }
}

/// The state file's key of Prodigy's shared estimate.
const PRODIGY_ESTIMATE: &str = "prodigy";

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Every optimizer minimises a quadratic at its usual learning rate (the 8-bit one on a variable large
    /// enough for 8-bit moments).
    #[test]
    fn optimizers_descend() {
        for (kind, lr) in [
            (OptimizerKind::AdamW, 0.05),
            (OptimizerKind::AdamW8bit, 0.05),
            (OptimizerKind::Adafactor, 0.05),
            (OptimizerKind::Prodigy, 1.0),
            (OptimizerKind::Lion, 0.03),
        ] {
            let values: Vec<f32> = (0..8192).map(|i| ((i as f32) * 0.7).sin() * 3.0).collect();
            let target = Tensor::from_vec(values, (64, 128), &Device::Cpu).unwrap();
            let w = Var::zeros((64, 128), DType::F32, &Device::Cpu).unwrap();
            let params = OptimizerParams {
                weight_decay: 0.0,
                ..Default::default()
            };
            let mut opt = Optimizer::new(
                kind,
                params,
                vec![Group {
                    vars: vec![w.clone()],
                    lr,
                }],
            );
            let loss = |w: &Var| {
                (w.as_tensor() - &target)
                    .unwrap()
                    .sqr()
                    .unwrap()
                    .sum_all()
                    .unwrap()
            };
            let first = loss(&w).to_scalar::<f32>().unwrap();
            for _ in 0..200 {
                let grads = loss(&w).backward().unwrap();
                opt.step(&grads, 1.0, 0.0, 1.0).unwrap();
            }
            let last = loss(&w).to_scalar::<f32>().unwrap();
            assert!(last < first * 0.05, "{kind:?}: {first} -> {last}");
        }
    }

    #[test]
    fn state_round_trips() {
        let w = Var::new(&[1f32, 2.0, 3.0], &Device::Cpu).unwrap();
        let mut a = Optimizer::new(
            OptimizerKind::AdamW,
            Default::default(),
            vec![Group {
                vars: vec![w.clone()],
                lr: 0.1,
            }],
        );
        let grads = w
            .as_tensor()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        a.step(&grads, 1.0, 0.0, 1.0).unwrap();
        let (state, step) = a.state_tensors().unwrap();
        let w2 = Var::from_tensor(w.as_tensor()).unwrap();
        let mut b = Optimizer::new(
            OptimizerKind::AdamW,
            Default::default(),
            vec![Group {
                vars: vec![w2.clone()],
                lr: 0.1,
            }],
        );
        b.load_state(&state, step).unwrap();
        let ga = w
            .as_tensor()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gb = w2
            .as_tensor()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        a.step(&ga, 1.0, 0.0, 1.0).unwrap();
        b.step(&gb, 1.0, 0.0, 1.0).unwrap();
        let diff = (w.as_tensor() - w2.as_tensor())
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(diff, 0.0);
    }
}
