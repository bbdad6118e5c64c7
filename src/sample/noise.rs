//! Reproducible Gaussian noise. candle's `Tensor::randn` draws from a per-device generator that cannot be seeded
//! per call on the CPU, and CUDA's curand would give other numbers anyway; so noise is drawn on the host from
//! ChaCha8 (`rand_chacha`, a portable, versioned stream) through `rand_distr`'s `StandardNormal`, and uploaded.
//! The same seed gives the same f32 values on every machine and device.

use candle_core::{Device, Result, Shape, Tensor};
use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::SeedableRng;
use rand_distr::{Distribution, StandardNormal};

/// A seeded source of N(0, 1) tensors. `stream` separates independent uses of one user-visible seed (the
/// initial latents and the noise Euler ancestral adds each step) so they never repeat each other's numbers.
pub struct NoiseRng {
    rng: ChaCha8Rng,
}

impl NoiseRng {
    pub fn new(seed: u64, stream: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(stream);
        NoiseRng { rng }
    }

    /// The next `shape.elem_count()` normal samples as an f32 tensor on `device`.
    pub fn randn<S: Into<Shape>>(&mut self, shape: S, device: &Device) -> Result<Tensor> {
        let shape = shape.into();
        let values: Vec<f32> = (0..shape.elem_count())
            .map(|_| StandardNormal.sample(&mut self.rng))
            .collect();
        Tensor::from_vec(values, shape, device)
    }
}

/// Stream 0 of a seed: the starting latents of a sample.
pub fn initial_noise<S: Into<Shape>>(seed: u64, shape: S, device: &Device) -> Result<Tensor> {
    NoiseRng::new(seed, 0).randn(shape, device)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    #[test]
    fn same_seed_same_noise_other_seed_or_stream_other_noise() {
        let dev = Device::Cpu;
        let a = values(&initial_noise(7, (2, 3), &dev).unwrap());
        assert_eq!(a, values(&initial_noise(7, (2, 3), &dev).unwrap()));
        assert_ne!(a, values(&initial_noise(8, (2, 3), &dev).unwrap()));
        assert_ne!(a, values(&NoiseRng::new(7, 1).randn((2, 3), &dev).unwrap()));
    }

    #[test]
    fn noise_is_standard_normal() {
        let v = values(&initial_noise(1, 100_000, &Device::Cpu).unwrap());
        let n = v.len() as f64;
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
        let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
        assert!(
            mean.abs() < 0.01 && (var - 1.0).abs() < 0.02,
            "{mean} {var}"
        );
    }
}
