//! Prodigy (Mishchenko & Defazio 2023, as prodigyopt 1.1 with decoupled weight decay): Adam whose step size d
//! is estimated from how far the weights have moved along the gradients, so the learning rate stays near 1. The
//! estimate is shared by all variables; the learning rates (and the schedule) multiply it.

use super::{Group, OptimizerParams};
use candle_core::{DType, Result, Tensor};
use std::collections::HashMap;

/// The shared estimate, saved with the state (as f64, for a bit-exact resume).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Estimate {
    pub d: f64,
    pub d_max: f64,
    pub d_numerator: f64,
}

impl Estimate {
    pub fn new(p: &OptimizerParams) -> Estimate {
        Estimate {
            d: p.d0,
            d_max: p.d0,
            d_numerator: 0.0,
        }
    }

    pub fn to_tensor(self) -> Result<Tensor> {
        Tensor::new(
            &[self.d, self.d_max, self.d_numerator],
            &candle_core::Device::Cpu,
        )
    }

    pub fn from_tensor(t: &Tensor) -> Result<Estimate> {
        match t.to_dtype(DType::F64)?.to_vec1::<f64>()?[..] {
            [d, d_max, d_numerator] if d > 0.0 && d_max >= d && d_numerator.is_finite() => {
                Ok(Estimate {
                    d,
                    d_max,
                    d_numerator,
                })
            }
            _ => candle_core::bail!(
                "the Prodigy estimate is not three finite numbers with 0 < d ≤ d_max"
            ),
        }
    }
}

/// The shapes of one variable's state: [exp_avg, exp_avg_sq, s, p0] like it.
pub fn state_shapes(dims: &[usize]) -> Vec<(Vec<usize>, DType)> {
    vec![(dims.to_vec(), DType::F32); 4]
}

/// One Prodigy step over every variable with a gradient (`grads` by group and index, clipped); `k` counts the
/// steps before this one. Returns false (and changes nothing) when every gradient is zero.
pub fn step(
    estimate: &mut Estimate,
    groups: &[Group],
    lrs: &[f64],
    state: &mut HashMap<(usize, usize), Vec<Tensor>>,
    grads: &[((usize, usize), Tensor)],
    p: &OptimizerParams,
    k: u64,
) -> Result<bool> {
    let (beta1, beta2) = (p.beta1, p.beta2);
    let beta3 = beta2.sqrt();
    let bias_correction = if p.use_bias_correction {
        let k1 = (k + 1) as i32;
        (1.0 - beta2.powi(k1)).sqrt() / (1.0 - beta1.powi(k1))
    } else {
        1.0
    };
    let (d, d0) = (estimate.d, p.d0);
    let dlr = |gi: usize| d * lrs[gi] * bias_correction;
    let mut delta_numerator = 0.0;
    let mut denominator: Option<Tensor> = None;
    for ((gi, vi), g) in grads {
        if lrs[*gi] <= 0.0 {
            continue;
        }
        let var = groups[*gi].vars[*vi].as_tensor();
        let st = state.entry((*gi, *vi)).or_default();
        if st.is_empty() {
            *st = vec![
                g.zeros_like()?,
                g.zeros_like()?,
                g.zeros_like()?,
                var.copy()?,
            ];
        }
        let moved = (&st[3] - var)?;
        let dot = (g * moved)?.sum_all()?.to_scalar::<f32>()?;
        delta_numerator += (d / d0) * dlr(*gi) * f64::from(dot);
        st[0] = (st[0].affine(beta1, 0.0)? + g.affine(d * (1.0 - beta1), 0.0)?)?;
        st[1] = (st[1].affine(beta2, 0.0)? + g.sqr()?.affine(d * d * (1.0 - beta2), 0.0)?)?;
        let s_rate = (d / d0) * if p.safeguard_warmup { d } else { dlr(*gi) };
        st[2] = (st[2].affine(beta3, 0.0)? + g.affine(s_rate, 0.0)?)?;
        let abs = st[2].abs()?.sum_all()?;
        denominator = Some(match denominator {
            Some(sum) => (sum + abs)?,
            None => abs,
        });
    }
    let denominator = denominator.map_or(Ok(0.0), |t| t.to_scalar::<f32>().map(f64::from))?;
    if denominator == 0.0 {
        return Ok(false);
    }
    let numerator = estimate.d_numerator * beta3 + delta_numerator;
    let d_hat = p.d_coef * numerator / denominator;
    // With prodigyopt's default (unbounded) growth rate, d is the running maximum of the estimates.
    let d_max = estimate.d_max.max(d_hat);
    let new_d = d_max;
    *estimate = Estimate {
        d: new_d,
        d_max,
        d_numerator: numerator,
    };
    for ((gi, vi), g) in grads {
        if lrs[*gi] <= 0.0 {
            continue;
        }
        let var = &groups[*gi].vars[*vi];
        let st = &state[&(*gi, *vi)];
        let denom = (st[1].sqrt()? + new_d * p.eps)?;
        let decayed = var
            .as_tensor()
            .affine(1.0 - p.weight_decay * dlr(*gi), 0.0)?;
        let direction = if beta1 > 0.0 {
            (&st[0] / denom)?
        } else {
            (g.affine(new_d, 0.0)? / denom)?
        };
        var.set(&(decayed - direction.affine(dlr(*gi), 0.0)?)?)?;
    }
    Ok(true)
}
