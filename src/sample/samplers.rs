//! Samplers that turn noise into latents: DDIM (eta 0), Euler and Euler ancestral, with classifier-free guidance.
//! They follow diffusers' `DDIMScheduler`, `EulerDiscreteScheduler` and `EulerAncestralDiscreteScheduler` as SD
//! configures them, and step over a caller-supplied model function, so they know nothing of our networks.
//!
//! The model function is called as `model(latents, timesteps, context)`: `latents` is the batch
//! `[uncond…, cond…]` already scaled for the model input, `timesteps` one f32 per row, `context` the matching
//! `[uncond…, cond…]` text embeddings. With `cfg == 1` the unconditional half is skipped (the guided output would
//! equal the conditional one). Latents are kept in f32 whatever dtype the model computes in.

use super::noise::NoiseRng;
use super::schedule::{NoiseSchedule, Prediction};
use candle_core::{DType, Result, Tensor, bail};
use std::fmt;
use std::str::FromStr;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Sampler {
    Ddim,
    Euler,
    #[serde(rename = "euler_a")]
    EulerAncestral,
}

impl FromStr for Sampler {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "ddim" => Ok(Sampler::Ddim),
            "euler" => Ok(Sampler::Euler),
            "euler_a" => Ok(Sampler::EulerAncestral),
            _ => Err(format!(
                "unknown sampler `{s}` (choose ddim, euler or euler_a)"
            )),
        }
    }
}

impl fmt::Display for Sampler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Sampler::Ddim => "ddim",
            Sampler::Euler => "euler",
            Sampler::EulerAncestral => "euler_a",
        })
    }
}

/// Everything that chooses how a sample is drawn, apart from the inputs.
#[derive(Clone, Debug, PartialEq)]
pub struct SampleConfig {
    pub sampler: Sampler,
    pub steps: usize,
    /// Classifier-free guidance scale: `guided = uncond + cfg·(cond − uncond)`.
    pub cfg: f64,
    pub prediction: Prediction,
    /// Seeds the noise Euler ancestral adds at each step (the starting noise is the caller's `noise`).
    pub seed: u64,
}

/// Draws latents from `noise` (N(0, 1), e.g. [`super::noise::initial_noise`]; the sampler scales it by its
/// initial sigma). `cond` / `uncond` are the prompt and negative-prompt embeddings, with the batch size of
/// `noise` or 1 (then shared by every row). `progress(done, total)` is called after each step.
pub fn sample<M, P>(
    schedule: &NoiseSchedule,
    config: &SampleConfig,
    noise: &Tensor,
    cond: &Tensor,
    uncond: &Tensor,
    model: M,
    progress: P,
) -> Result<Tensor>
where
    M: FnMut(&Tensor, &Tensor, &Tensor) -> Result<Tensor>,
    P: FnMut(usize, usize),
{
    let timesteps = schedule.timesteps(config.steps)?;
    let noise = noise.to_dtype(DType::F32)?;
    let mut guidance = Guidance::new(model, cond, uncond, config.cfg, noise.dim(0)?)?;
    let stepper = Stepper {
        schedule,
        timesteps: &timesteps,
        prediction: config.prediction,
    };
    match config.sampler {
        Sampler::Ddim => stepper.ddim(noise, &mut guidance, progress),
        Sampler::Euler => stepper.euler(noise, &mut guidance, None, progress),
        Sampler::EulerAncestral => {
            // Stream 1: the caller's starting noise usually comes from stream 0 of the same seed.
            let rng = NoiseRng::new(config.seed, 1);
            stepper.euler(noise, &mut guidance, Some(rng), progress)
        }
    }
}

/// Runs the model on `[uncond, cond]` and mixes the halves with classifier-free guidance.
struct Guidance<M> {
    model: M,
    context: Tensor,
    cfg: f64,
    batch: usize,
    /// False when cfg is 1: the model then runs on the conditional half only.
    guided: bool,
}

impl<M: FnMut(&Tensor, &Tensor, &Tensor) -> Result<Tensor>> Guidance<M> {
    fn new(model: M, cond: &Tensor, uncond: &Tensor, cfg: f64, batch: usize) -> Result<Self> {
        let cond = expand_batch(cond, batch, "cond")?;
        let guided = cfg != 1.0;
        let context = if guided {
            Tensor::cat(&[&expand_batch(uncond, batch, "uncond")?, &cond], 0)?
        } else {
            cond
        };
        Ok(Guidance {
            model,
            context,
            cfg,
            batch,
            guided,
        })
    }

    /// The guided model output for `latents` (already scaled for the model input) at `timestep`.
    fn predict(&mut self, latents: &Tensor, timestep: f64) -> Result<Tensor> {
        let input = if self.guided {
            Tensor::cat(&[latents, latents], 0)?
        } else {
            latents.clone()
        };
        let timesteps = Tensor::full(timestep as f32, input.dim(0)?, input.device())?;
        let output = (self.model)(&input, &timesteps, &self.context)?.to_dtype(DType::F32)?;
        if !self.guided {
            return Ok(output);
        }
        let uncond = output.narrow(0, 0, self.batch)?;
        let cond = output.narrow(0, self.batch, self.batch)?;
        &uncond + ((cond - &uncond)? * self.cfg)?
    }
}

/// `t` with its batch dimension repeated to `batch` rows when it has one row.
fn expand_batch(t: &Tensor, batch: usize, what: &str) -> Result<Tensor> {
    match t.dim(0)? {
        rows if rows == batch => Ok(t.clone()),
        1 => {
            let mut dims = t.dims().to_vec();
            dims[0] = batch;
            t.broadcast_as(dims)?.contiguous()
        }
        rows => bail!("{what} has {rows} rows but the latents have {batch}; give 1 or {batch}"),
    }
}

struct Stepper<'a> {
    schedule: &'a NoiseSchedule,
    timesteps: &'a [usize],
    prediction: Prediction,
}

impl Stepper<'_> {
    /// DDIM with eta 0: the deterministic step to the next timestep's ᾱ through the x0 and ε estimates.
    fn ddim<M, P>(
        &self,
        noise: Tensor,
        guidance: &mut Guidance<M>,
        mut progress: P,
    ) -> Result<Tensor>
    where
        M: FnMut(&Tensor, &Tensor, &Tensor) -> Result<Tensor>,
        P: FnMut(usize, usize),
    {
        let ac = &self.schedule.alphas_cumprod;
        let mut latents = noise;
        for (i, &t) in self.timesteps.iter().enumerate() {
            let output = guidance.predict(&latents, t as f64)?;
            let prev = self
                .timesteps
                .get(i + 1)
                .map_or(self.schedule.final_alpha_cumprod(), |&p| ac[p]);
            let x0 = self.prediction.x0(&latents, &output, ac[t])?;
            let eps = self.prediction.eps(&latents, &output, ac[t])?;
            latents = ((x0 * prev.sqrt())? + (eps * (1.0 - prev).sqrt())?)?;
            progress(i + 1, self.timesteps.len());
        }
        Ok(latents)
    }

    /// Euler in the σ (variance-exploding) parametrisation, ending at σ = 0; with `ancestral_noise`, Euler
    /// ancestral: each step goes down to σ_down and adds fresh noise of std σ_up, with σ_down² + σ_up² = σ_next².
    fn euler<M, P>(
        &self,
        noise: Tensor,
        guidance: &mut Guidance<M>,
        mut ancestral_noise: Option<NoiseRng>,
        mut progress: P,
    ) -> Result<Tensor>
    where
        M: FnMut(&Tensor, &Tensor, &Tensor) -> Result<Tensor>,
        P: FnMut(usize, usize),
    {
        let mut sigmas: Vec<f64> = self
            .timesteps
            .iter()
            .map(|&t| self.schedule.sigma(t))
            .collect();
        sigmas.push(0.0);
        let init_sigma = (sigmas[0].powi(2) + 1.0).sqrt();
        let mut latents = (noise * init_sigma)?;
        for (i, &t) in self.timesteps.iter().enumerate() {
            let (sigma, next) = (sigmas[i], sigmas[i + 1]);
            // The model sees the variance-preserving sample x_t = x/√(σ²+1), whose ᾱ is 1/(σ²+1).
            let scaled = (&latents / (sigma * sigma + 1.0).sqrt())?;
            let output = guidance.predict(&scaled, t as f64)?;
            let x0 = self
                .prediction
                .x0(&scaled, &output, 1.0 / (sigma * sigma + 1.0))?;
            let derivative = ((&latents - x0)? / sigma)?;
            latents = match ancestral_noise.as_mut() {
                None => (&latents + (derivative * (next - sigma))?)?,
                Some(rng) => {
                    let (down, up) = ancestral_sigmas(sigma, next);
                    let fresh = rng.randn(latents.shape(), latents.device())?;
                    ((&latents + (derivative * (down - sigma))?)? + (fresh * up)?)?
                }
            };
            progress(i + 1, self.timesteps.len());
        }
        Ok(latents)
    }
}

/// (σ_down, σ_up) of an ancestral step from σ `from` to σ `to` (k-diffusion's `get_ancestral_step`, eta 1).
pub fn ancestral_sigmas(from: f64, to: f64) -> (f64, f64) {
    let up = (to * to * (from * from - to * to) / (from * from)).sqrt();
    let down = (to * to - up * up).sqrt();
    (down, up)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn config(sampler: Sampler, seed: u64) -> SampleConfig {
        SampleConfig {
            sampler,
            steps: 4,
            cfg: 3.0,
            prediction: Prediction::Epsilon,
            seed,
        }
    }

    /// A stand-in model whose output depends on its inputs, so guidance and scaling show up in the result.
    fn toy_model(x: &Tensor, t: &Tensor, ctx: &Tensor) -> Result<Tensor> {
        let rows = x.dim(0)?;
        let t = (t.reshape((rows, 1, 1, 1))? / 1000.0)?;
        let c = ctx
            .mean_keepdim(2)?
            .mean_keepdim(1)?
            .reshape((rows, 1, 1, 1))?;
        (x * 0.3)?.broadcast_add(&t)?.broadcast_add(&c)
    }

    fn run(sampler: Sampler, seed: u64, noise: &Tensor) -> Tensor {
        let dev = Device::Cpu;
        let cond = Tensor::ones((1, 3, 2), DType::F32, &dev).unwrap();
        let uncond = Tensor::zeros((1, 3, 2), DType::F32, &dev).unwrap();
        let schedule = NoiseSchedule::stable_diffusion();
        sample(
            &schedule,
            &config(sampler, seed),
            noise,
            &cond,
            &uncond,
            toy_model,
            |_, _| {},
        )
        .unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    #[test]
    fn euler_ancestral_is_reproducible_by_seed() {
        let noise = super::super::noise::initial_noise(3, (2, 4, 8, 8), &Device::Cpu).unwrap();
        let a = run(Sampler::EulerAncestral, 11, &noise);
        assert_eq!(max_diff(&a, &run(Sampler::EulerAncestral, 11, &noise)), 0.0);
        assert!(max_diff(&a, &run(Sampler::EulerAncestral, 12, &noise)) > 0.01);
        // Deterministic samplers ignore the seed.
        let e = run(Sampler::Euler, 1, &noise);
        assert_eq!(max_diff(&e, &run(Sampler::Euler, 2, &noise)), 0.0);
    }

    #[test]
    fn euler_ancestral_adds_noise_of_std_sigma_up() {
        let dev = Device::Cpu;
        let schedule = NoiseSchedule::stable_diffusion();
        let timesteps = schedule.timesteps(4).unwrap();
        let mut sigmas: Vec<f64> = timesteps.iter().map(|&t| schedule.sigma(t)).collect();
        sigmas.push(0.0);
        let noise = Tensor::zeros((1, 4, 64, 64), DType::F32, &dev).unwrap();
        let cond = Tensor::zeros((1, 3, 2), DType::F32, &dev).unwrap();
        // A model predicting zero noise makes x0 = x, so each step changes the latents by σ_up·N(0,1) only.
        let mut inputs = Vec::new();
        let zero = |x: &Tensor, _: &Tensor, _: &Tensor| {
            inputs.push(x.narrow(0, 0, 1)?);
            x.zeros_like()
        };
        let out = sample(
            &schedule,
            &config(Sampler::EulerAncestral, 5),
            &noise,
            &cond,
            &cond,
            zero,
            |_, _| {},
        )
        .unwrap();
        let mut latents: Vec<Tensor> = inputs
            .iter()
            .zip(&sigmas)
            .map(|(x, s)| (x * (s * s + 1.0).sqrt()).unwrap())
            .collect();
        latents.push(out);
        for i in 0..4 {
            let step = (&latents[i + 1] - &latents[i])
                .unwrap()
                .flatten_all()
                .unwrap();
            let std = step
                .sqr()
                .unwrap()
                .mean_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                .sqrt() as f64;
            let (_, up) = ancestral_sigmas(sigmas[i], sigmas[i + 1]);
            assert!(
                (std - up).abs() <= 0.03 * up + 1e-5,
                "step {i}: std {std}, σ_up {up}"
            );
        }
    }

    #[test]
    fn ancestral_sigmas_split_the_next_variance() {
        let (down, up) = ancestral_sigmas(4.0, 1.5);
        assert!((down * down + up * up - 1.5 * 1.5).abs() < 1e-12);
        assert_eq!(ancestral_sigmas(0.5, 0.0), (0.0, 0.0));
    }

    #[test]
    fn cfg_one_runs_only_the_conditional_batch() {
        let dev = Device::Cpu;
        let noise = Tensor::ones((2, 4, 2, 2), DType::F32, &dev).unwrap();
        let cond = Tensor::ones((1, 3, 2), DType::F32, &dev).unwrap();
        let mut rows = Vec::new();
        let model = |x: &Tensor, t: &Tensor, ctx: &Tensor| {
            rows.push((x.dim(0)?, t.dim(0)?, ctx.dim(0)?));
            x.zeros_like()
        };
        let cfg = SampleConfig {
            cfg: 1.0,
            ..config(Sampler::Ddim, 0)
        };
        sample(
            &NoiseSchedule::stable_diffusion(),
            &cfg,
            &noise,
            &cond,
            &cond,
            model,
            |_, _| {},
        )
        .unwrap();
        assert_eq!(rows, vec![(2, 2, 2); 4]);
    }

    #[test]
    fn mismatched_embedding_batch_is_an_error() {
        let dev = Device::Cpu;
        let noise = Tensor::ones((2, 4, 2, 2), DType::F32, &dev).unwrap();
        let cond = Tensor::ones((3, 3, 2), DType::F32, &dev).unwrap();
        let err = sample(
            &NoiseSchedule::stable_diffusion(),
            &config(Sampler::Euler, 0),
            &noise,
            &cond,
            &cond,
            |x: &Tensor, _: &Tensor, _: &Tensor| x.zeros_like(),
            |_, _| {},
        )
        .unwrap_err();
        assert!(err.to_string().contains("3 rows"), "{err}");
    }

    #[test]
    fn sampler_names_round_trip() {
        for s in [Sampler::Ddim, Sampler::Euler, Sampler::EulerAncestral] {
            assert_eq!(s.to_string().parse::<Sampler>(), Ok(s));
        }
        assert!("dpm".parse::<Sampler>().unwrap_err().contains("euler_a"));
    }
}
