//! The Stable Diffusion noise schedule: `scaled_linear` betas over 1000 training timesteps, the cumulative alphas
//! ᾱ_t every sampler and the trainer derive their coefficients from, and the inference timesteps of diffusers'
//! SD scheduler configs (`timestep_spacing = "leading"`, `steps_offset = 1`).
//!
//! A noisy sample at timestep t is `x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε`. Values are kept in f64: the coefficients are
//! applied as scalars, so the extra precision costs nothing and keeps long samplers from drifting.

use candle_core::{Result, Tensor, bail};
use std::fmt;
use std::str::FromStr;

/// What the network predicts from a noisy sample.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Prediction {
    /// The added noise ε (SD 1.x, SD 2.x-base, SDXL).
    Epsilon,
    /// The velocity v = √ᾱ·ε − √(1−ᾱ)·x0 (SD 2.x-768-v).
    V,
}

impl Prediction {
    /// "epsilon-prediction" / "v-prediction", for people.
    pub fn describe(self) -> &'static str {
        match self {
            Prediction::Epsilon => "epsilon-prediction",
            Prediction::V => "v-prediction",
        }
    }

    /// The clean-sample estimate x0 from the model `output` for `sample` = x_t at cumulative alpha `alpha_cumprod`.
    pub fn x0(self, sample: &Tensor, output: &Tensor, alpha_cumprod: f64) -> Result<Tensor> {
        let (signal, noise) = coefficients(alpha_cumprod);
        match self {
            Prediction::Epsilon => (sample - (output * noise)?)? / signal,
            Prediction::V => (sample * signal)? - (output * noise)?,
        }
    }

    /// The noise estimate ε from the model `output` for `sample` = x_t at cumulative alpha `alpha_cumprod`.
    pub fn eps(self, sample: &Tensor, output: &Tensor, alpha_cumprod: f64) -> Result<Tensor> {
        let (signal, noise) = coefficients(alpha_cumprod);
        match self {
            Prediction::Epsilon => Ok(output.clone()),
            Prediction::V => (output * signal)? + (sample * noise)?,
        }
    }
}

/// (√ᾱ, √(1−ᾱ)): the weights of the clean sample and of the noise in x_t.
fn coefficients(alpha_cumprod: f64) -> (f64, f64) {
    (alpha_cumprod.sqrt(), (1.0 - alpha_cumprod).sqrt())
}

impl FromStr for Prediction {
    type Err = String;

    /// Accepts diffusers' `prediction_type` values and the short forms `eps` / `v`.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "epsilon" | "eps" => Ok(Prediction::Epsilon),
            "v_prediction" | "v" => Ok(Prediction::V),
            _ => Err(format!(
                "unknown prediction type `{s}` (expected epsilon or v_prediction)"
            )),
        }
    }
}

impl fmt::Display for Prediction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Prediction::Epsilon => "epsilon",
            Prediction::V => "v_prediction",
        })
    }
}

/// A discrete DDPM noise schedule and its inference timesteps.
#[derive(Clone, Debug, PartialEq)]
pub struct NoiseSchedule {
    /// ᾱ_t for every training timestep t.
    pub alphas_cumprod: Vec<f64>,
    /// Added to every inference timestep (diffusers' `steps_offset`).
    pub steps_offset: usize,
}

impl NoiseSchedule {
    /// The schedule of every SD 1.x/2.x/XL checkpoint: scaled_linear betas 0.00085..0.012, 1000 steps, offset 1.
    pub fn stable_diffusion() -> Self {
        Self::scaled_linear(0.00085, 0.012, 1000, 1)
    }

    /// Betas spaced linearly in √β from `beta_start` to `beta_end` (diffusers' `scaled_linear`).
    pub fn scaled_linear(
        beta_start: f64,
        beta_end: f64,
        train_timesteps: usize,
        steps_offset: usize,
    ) -> Self {
        let (first, last) = (beta_start.sqrt(), beta_end.sqrt());
        let last_index = train_timesteps.saturating_sub(1).max(1) as f64;
        let mut cumprod = 1.0;
        let alphas_cumprod = (0..train_timesteps)
            .map(|i| {
                let beta = (first + (last - first) * i as f64 / last_index).powi(2);
                cumprod *= 1.0 - beta;
                cumprod
            })
            .collect();
        NoiseSchedule {
            alphas_cumprod,
            steps_offset,
        }
    }

    pub fn train_timesteps(&self) -> usize {
        self.alphas_cumprod.len()
    }

    /// The `steps` inference timesteps, highest first, with "leading" spacing: multiples of
    /// `train_timesteps / steps` plus `steps_offset` (4 steps of SD: 751, 501, 251, 1).
    pub fn timesteps(&self, steps: usize) -> Result<Vec<usize>> {
        let n = self.train_timesteps();
        if steps == 0 {
            bail!("the number of sampling steps must be at least 1");
        }
        let ratio = (n / steps).max(1);
        let timesteps: Vec<usize> = (0..steps)
            .rev()
            .map(|i| i * ratio + self.steps_offset)
            .collect();
        if timesteps[0] >= n {
            bail!("{steps} sampling steps do not fit a schedule of {n} timesteps; use fewer steps");
        }
        Ok(timesteps)
    }

    /// ᾱ before the first training timestep, used by DDIM's last step (`set_alpha_to_one = false`, as SD ships).
    pub fn final_alpha_cumprod(&self) -> f64 {
        self.alphas_cumprod[0]
    }

    /// The noise level σ_t = √((1−ᾱ_t)/ᾱ_t) of the variance-exploding view the Euler samplers step in.
    pub fn sigma(&self, t: usize) -> f64 {
        let a = self.alphas_cumprod[t];
        ((1.0 - a) / a).sqrt()
    }

    /// Signal-to-noise ratio ᾱ_t/(1−ᾱ_t) of timestep t (the min-SNR loss weight is built from it).
    pub fn snr(&self, t: usize) -> f64 {
        let a = self.alphas_cumprod[t];
        a / (1.0 - a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn leading_timesteps_match_diffusers() {
        let s = NoiseSchedule::stable_diffusion();
        assert_eq!(s.timesteps(4).unwrap(), [751, 501, 251, 1]);
        let twenty = s.timesteps(20).unwrap();
        assert_eq!((twenty[0], twenty[19], twenty.len()), (951, 1, 20));
        assert_eq!(s.timesteps(500).unwrap()[0], 999);
    }

    #[test]
    fn impossible_step_counts_are_refused() {
        let s = NoiseSchedule::stable_diffusion();
        for steps in [0, 1000, 1001] {
            let err = s.timesteps(steps).unwrap_err().to_string();
            assert!(err.contains("step"), "{steps}: {err}");
        }
    }

    #[test]
    fn snr_and_sigma_agree() {
        let s = NoiseSchedule::stable_diffusion();
        for t in [0, 500, 999] {
            assert!((s.snr(t) * s.sigma(t).powi(2) - 1.0).abs() < 1e-12);
        }
        assert!(s.snr(0) > s.snr(999));
    }

    #[test]
    fn predictions_invert_the_forward_process() {
        let dev = Device::Cpu;
        let x0 = Tensor::new(&[0.5f32, -1.0, 2.0], &dev).unwrap();
        let eps = Tensor::new(&[1.0f32, 0.3, -0.7], &dev).unwrap();
        let a = NoiseSchedule::stable_diffusion().alphas_cumprod[400];
        let (signal, noise) = coefficients(a);
        let xt = ((&x0 * signal).unwrap() + (&eps * noise).unwrap()).unwrap();
        let v = ((&eps * signal).unwrap() - (&x0 * noise).unwrap()).unwrap();
        for (prediction, output) in [(Prediction::Epsilon, &eps), (Prediction::V, &v)] {
            let diff = |a: Tensor, b: &Tensor| {
                (a - b)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max(0)
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
            };
            assert!(diff(prediction.x0(&xt, output, a).unwrap(), &x0) < 1e-5);
            assert!(diff(prediction.eps(&xt, output, a).unwrap(), &eps) < 1e-5);
        }
    }

    #[test]
    fn prediction_names_round_trip() {
        for p in [Prediction::Epsilon, Prediction::V] {
            assert_eq!(p.to_string().parse::<Prediction>(), Ok(p));
        }
        assert!("x0".parse::<Prediction>().unwrap_err().contains("x0"));
    }
}
