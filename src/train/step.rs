//! The denoising loss of one batch: noise clean latents at per-sample timesteps, predict, and compare in f32,
//! optionally weighted by min-SNR-γ.

use crate::model::unet::UNet;
use crate::sample::{NoiseSchedule, Prediction};
use candle_core::{DType, Result, Tensor};

/// How the loss is formed.
#[derive(Clone, Copy, Debug)]
pub struct LossOptions {
    pub prediction: Prediction,
    /// 0 = plain MSE; else each sample's loss is weighted by min(SNR, γ)/SNR (eps) or min(SNR, γ)/(SNR+1) (v).
    pub min_snr_gamma: f64,
}

/// Per-sample [B,1,1,1] tensor of `f(t)` for each timestep.
fn per_sample(values: impl Iterator<Item = f64>, device: &candle_core::Device) -> Result<Tensor> {
    let v: Vec<f32> = values.map(|x| x as f32).collect();
    let n = v.len();
    Tensor::from_vec(v, (n, 1, 1, 1), device)
}

/// Mean loss over the batch for clean `latents` [B,4,h,w], text `context` [B,N,C], `timesteps` (one per sample)
/// and `noise` shaped like the latents.
pub fn diffusion_loss(
    unet: &UNet,
    schedule: &NoiseSchedule,
    options: LossOptions,
    latents: &Tensor,
    context: &Tensor,
    timesteps: &[usize],
    noise: &Tensor,
) -> Result<Tensor> {
    let dev = latents.device();
    let ac: Vec<f64> = timesteps
        .iter()
        .map(|&t| schedule.alphas_cumprod[t])
        .collect();
    let a = per_sample(ac.iter().map(|a| a.sqrt()), dev)?;
    let s = per_sample(ac.iter().map(|a| (1.0 - a).sqrt()), dev)?;
    let x0 = latents.to_dtype(DType::F32)?;
    let eps = noise.to_dtype(DType::F32)?;
    let noisy = (x0.broadcast_mul(&a)? + eps.broadcast_mul(&s)?)?;
    let target = match options.prediction {
        Prediction::Epsilon => eps.clone(),
        Prediction::V => (eps.broadcast_mul(&a)? - x0.broadcast_mul(&s)?)?,
    };
    let t = Tensor::from_vec(
        timesteps.iter().map(|&t| t as f32).collect::<Vec<_>>(),
        timesteps.len(),
        dev,
    )?;
    let pred = unet.forward(&noisy, &t, context)?.to_dtype(DType::F32)?;
    let per = (pred - target)?.sqr()?.flatten_from(1)?.mean(1)?;
    if options.min_snr_gamma <= 0.0 {
        return per.mean_all();
    }
    let g = options.min_snr_gamma;
    let weights: Vec<f32> = timesteps
        .iter()
        .map(|&t| {
            let snr = schedule.snr(t);
            let w = match options.prediction {
                Prediction::Epsilon => snr.min(g) / snr,
                Prediction::V => snr.min(g) / (snr + 1.0),
            };
            w as f32
        })
        .collect();
    (per * Tensor::from_vec(weights, timesteps.len(), dev)?)?.mean_all()
}
