//! The denoising loss of one batch: noise clean latents at per-sample timesteps, predict, and compare in f32,
//! each sample's loss optionally weighted by min-SNR-γ and, for regularization images, by the prior loss weight.

use crate::model::unet::UNet;
use crate::sample::{NoiseSchedule, Prediction};
use candle_core::{DType, Result, Tensor};

/// How the loss is formed.
#[derive(Clone, Copy, Debug)]
pub struct LossOptions {
    pub prediction: Prediction,
    /// 0 = plain MSE; else each sample's loss is weighted by min(SNR, γ)/SNR (eps) or min(SNR, γ)/(SNR+1) (v).
    pub min_snr_gamma: f64,
    /// Weight of a regularization sample's loss (kohya's `prior_loss_weight`); dataset samples weigh 1.
    pub prior_loss_weight: f64,
}

/// Per-sample [B,1,1,1] tensor of `f(t)` for each timestep.
fn per_sample(values: impl Iterator<Item = f64>, device: &candle_core::Device) -> Result<Tensor> {
    let v: Vec<f32> = values.map(|x| x as f32).collect();
    let n = v.len();
    Tensor::from_vec(v, (n, 1, 1, 1), device)
}

/// What a batch's loss needs per sample, on the device: √ᾱ and √(1 − ᾱ) [B,1,1,1], the timesteps [B] and, with
/// min-SNR-γ or a prior loss weight other than 1, the loss weights [B] (present for every batch of a run, so a
/// captured step can overwrite them).
pub struct LossInputs {
    a: Tensor,
    s: Tensor,
    t: Tensor,
    weights: Option<Tensor>,
}

impl LossInputs {
    /// `regularization[i]`: sample `i` is a regularization image (samples past its end are not).
    pub fn new(
        schedule: &NoiseSchedule,
        options: LossOptions,
        timesteps: &[usize],
        regularization: &[bool],
        device: &candle_core::Device,
    ) -> Result<Self> {
        let ac: Vec<f64> = timesteps
            .iter()
            .map(|&t| schedule.alphas_cumprod[t])
            .collect();
        let t: Vec<f32> = timesteps.iter().map(|&t| t as f32).collect();
        let (g, prior) = (options.min_snr_gamma, options.prior_loss_weight);
        let weights = (g > 0.0 || prior != 1.0).then(|| {
            let w: Vec<f32> = (timesteps.iter().enumerate())
                .map(|(i, &t)| {
                    let snr = schedule.snr(t);
                    let snr_weight = match (g > 0.0, options.prediction) {
                        (false, _) => 1.0,
                        (true, Prediction::Epsilon) => snr.min(g) / snr,
                        (true, Prediction::V) => snr.min(g) / (snr + 1.0),
                    };
                    let prior_weight = match regularization.get(i) {
                        Some(true) => prior,
                        _ => 1.0,
                    };
                    (snr_weight * prior_weight) as f32
                })
                .collect();
            Tensor::from_vec(w, timesteps.len(), device)
        });
        Ok(LossInputs {
            a: per_sample(ac.iter().map(|a| a.sqrt()), device)?,
            s: per_sample(ac.iter().map(|a| (1.0 - a).sqrt()), device)?,
            t: Tensor::from_vec(t, timesteps.len(), device)?,
            weights: weights.transpose()?,
        })
    }

    /// Overwrites these tensors with `other`'s values (same batch size and options), in place: a step captured
    /// as a CUDA graph reads its inputs at fixed addresses.
    pub fn copy_from(&self, other: &LossInputs) -> Result<()> {
        self.a.slice_set(&other.a, 0, 0)?;
        self.s.slice_set(&other.s, 0, 0)?;
        self.t.slice_set(&other.t, 0, 0)?;
        if let (Some(w), Some(o)) = (&self.weights, &other.weights) {
            w.slice_set(o, 0, 0)?;
        }
        Ok(())
    }
}

/// Mean loss over a batch of dataset images (none a regularization image) for clean `latents` [B,4,h,w], text
/// `context` [B,N,C], `timesteps` (one per sample) and `noise` shaped like the latents.
pub fn diffusion_loss(
    unet: &UNet,
    schedule: &NoiseSchedule,
    options: LossOptions,
    latents: &Tensor,
    context: &Tensor,
    timesteps: &[usize],
    noise: &Tensor,
) -> Result<Tensor> {
    let inputs = LossInputs::new(schedule, options, timesteps, &[], latents.device())?;
    loss_from(unet, options, latents, context, noise, &inputs)
}

/// `diffusion_loss` from per-sample inputs already on the device (no host → device copy: capturable).
pub fn loss_from(
    unet: &UNet,
    options: LossOptions,
    latents: &Tensor,
    context: &Tensor,
    noise: &Tensor,
    inputs: &LossInputs,
) -> Result<Tensor> {
    let (a, s) = (&inputs.a, &inputs.s);
    let x0 = latents.to_dtype(DType::F32)?;
    let eps = noise.to_dtype(DType::F32)?;
    let noisy = (x0.broadcast_mul(a)? + eps.broadcast_mul(s)?)?;
    let target = match options.prediction {
        Prediction::Epsilon => eps.clone(),
        Prediction::V => (eps.broadcast_mul(a)? - x0.broadcast_mul(s)?)?,
    };
    let pred = unet
        .forward(&noisy, &inputs.t, context)?
        .to_dtype(DType::F32)?;
    let per = (pred - target)?.sqr()?.flatten_from(1)?.mean(1)?;
    batch_mean(&per, inputs)
}

/// The batch's loss from the per-sample losses [B]: each weighted, then the mean over the batch (kohya's order:
/// a regularization sample weighted 0 still counts in the mean).
fn batch_mean(per: &Tensor, inputs: &LossInputs) -> Result<Tensor> {
    match &inputs.weights {
        None => per.mean_all(),
        Some(w) => (per * w)?.mean_all(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    /// A captured step's inputs are overwritten in place with the next batch's values, weights included.
    #[test]
    fn loss_inputs_copy_in_place() {
        let schedule = NoiseSchedule::stable_diffusion();
        let options = LossOptions {
            prediction: Prediction::V,
            min_snr_gamma: 5.0,
            prior_loss_weight: 1.0,
        };
        let fixed = LossInputs::new(&schedule, options, &[10, 900], &[], &Device::Cpu).unwrap();
        let next = LossInputs::new(&schedule, options, &[500, 3], &[], &Device::Cpu).unwrap();
        let before = fixed.a.clone();
        fixed.copy_from(&next).unwrap();
        assert_eq!(values(&before), values(&next.a), "same storage, new values");
        assert_eq!(values(&fixed.t), vec![500.0, 3.0]);
        assert_eq!(values(&fixed.s), values(&next.s));
        let (w, nw) = (
            fixed.weights.as_ref().unwrap(),
            next.weights.as_ref().unwrap(),
        );
        assert_eq!(values(w), values(nw));
        let a = schedule.alphas_cumprod[500].sqrt() as f32;
        assert!((values(&fixed.a)[0] - a).abs() < 1e-6);
    }

    /// Per-sample losses 1, 2, 3, 4 of which the second and fourth are regularization images.
    fn batch_loss(options: LossOptions, timesteps: &[usize]) -> f32 {
        let schedule = NoiseSchedule::stable_diffusion();
        let reg = [false, true, false, true];
        let inputs = LossInputs::new(&schedule, options, timesteps, &reg, &Device::Cpu).unwrap();
        let per = Tensor::new(&[1f32, 2.0, 3.0, 4.0], &Device::Cpu).unwrap();
        batch_mean(&per, &inputs).unwrap().to_scalar().unwrap()
    }

    /// kohya: each sample's loss times its weight, then the mean over the whole batch.
    #[test]
    fn the_prior_loss_weight_applies_to_regularization_samples_only() {
        let plain = LossOptions {
            prediction: Prediction::Epsilon,
            min_snr_gamma: 0.0,
            prior_loss_weight: 1.0,
        };
        let t = [100, 200, 300, 400];
        assert_eq!(batch_loss(plain, &t), 2.5, "weight 1: the plain mean");
        let schedule = NoiseSchedule::stable_diffusion();
        let unweighted = LossInputs::new(&schedule, plain, &t, &[true; 4], &Device::Cpu).unwrap();
        assert!(unweighted.weights.is_none(), "no weights to apply");
        let off = LossOptions {
            prior_loss_weight: 0.0,
            ..plain
        };
        assert_eq!(
            batch_loss(off, &t),
            1.0,
            "weight 0: (1 + 3) / 4, the regularization samples add nothing"
        );
        let half = LossOptions {
            prior_loss_weight: 0.5,
            ..plain
        };
        assert_eq!(batch_loss(half, &t), (1.0 + 1.0 + 3.0 + 2.0) / 4.0);
        // With min-SNR-γ the two weights multiply.
        let snr = LossOptions {
            min_snr_gamma: 1.0,
            ..half
        };
        let w: Vec<f32> = t
            .iter()
            .map(|&t| (schedule.snr(t).min(1.0) / schedule.snr(t)) as f32)
            .collect();
        let want = (w[0] + 2.0 * w[1] * 0.5 + 3.0 * w[2] + 4.0 * w[3] * 0.5) / 4.0;
        assert!((batch_loss(snr, &t) - want).abs() < 1e-6);
    }
}
