//! The latent cache: VAE posteriors (mean and log-variance) on disk, keyed by the image's content, its bucket,
//! whether it is mirrored, and the VAE — so a second run over the same data skips encoding, and a changed image,
//! bucket setting or VAE never reuses a stale latent.

use crate::model::weights::Weights;
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The cache folder inside a dataset (hidden, so scans skip it).
pub fn default_dir(dataset: &Path) -> PathBuf {
    dataset.join(".lora-studio").join("latents")
}

pub struct LatentCache {
    dir: PathBuf,
    vae_id: String,
}

impl LatentCache {
    pub fn new(dir: PathBuf, vae_id: String) -> Self {
        LatentCache { dir, vae_id }
    }

    /// The key of one image use: blake3 over its bytes' hash, the bucket, the mirroring and the VAE.
    pub fn key(&self, content_hash: &str, bucket: (u32, u32), flip: bool) -> String {
        let mut h = blake3::Hasher::new();
        h.update(content_hash.as_bytes());
        h.update(format!("|{}x{}|{flip}|", bucket.0, bucket.1).as_bytes());
        h.update(self.vae_id.as_bytes());
        h.finalize().to_hex().to_string()
    }

    fn path(&self, key: &str) -> PathBuf {
        self.dir.join(&key[..2]).join(format!("{key}.safetensors"))
    }

    /// The cached (mean, logvar), if present and readable; a damaged entry is removed and reported as absent.
    pub fn get(&self, key: &str, device: &Device) -> Option<(Tensor, Tensor)> {
        let path = self.path(key);
        if !path.is_file() {
            return None;
        }
        let mut t = match candle_core::safetensors::load(&path, device) {
            Ok(t) => t,
            Err(_) => {
                let _ = std::fs::remove_file(&path);
                return None;
            }
        };
        let (mean, logvar) = (t.remove("mean")?, t.remove("logvar")?);
        // A damaged entry (NaN from a bad VAE run, or edited by hand) is encoded again rather than trained on.
        let finite = |t: &Tensor| crate::model::weights::all_finite(t).unwrap_or(false);
        if !(finite(&mean) && finite(&logvar)) {
            let _ = std::fs::remove_file(&path);
            return None;
        }
        Some((mean, logvar))
    }

    /// Stores a posterior (in f32), atomically.
    pub fn put(&self, key: &str, mean: &Tensor, logvar: &Tensor) -> candle_core::Result<()> {
        let path = self.path(key);
        std::fs::create_dir_all(path.parent().expect("cache paths have a parent"))?;
        let tensors = HashMap::from([
            (
                "mean".to_owned(),
                mean.to_dtype(DType::F32)?.to_device(&Device::Cpu)?,
            ),
            (
                "logvar".to_owned(),
                logvar.to_dtype(DType::F32)?.to_device(&Device::Cpu)?,
            ),
        ]);
        let bytes = safetensors::serialize(&tensors, None)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        crate::fsutil::write_atomic(&path, &bytes)?;
        Ok(())
    }
}

/// Identifies a VAE by the content of its first and last layers (cheap, and any other VAE differs there).
pub fn vae_id(vae: &dyn Weights) -> candle_core::Result<String> {
    let mut h = blake3::Hasher::new();
    for name in [
        "encoder.conv_in.weight",
        "encoder.conv_out.weight",
        "quant_conv.weight",
    ] {
        if vae.contains(name) {
            let t = vae
                .get(name, DType::F32, &Device::Cpu)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            for v in t {
                h.update(&v.to_le_bytes());
            }
        }
    }
    Ok(h.finalize().to_hex().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::weights::MemoryWeights;

    #[test]
    fn round_trips_and_keys_separate_what_matters() {
        let dir = tempfile::tempdir().unwrap();
        let cache = LatentCache::new(dir.path().to_owned(), "vae-a".into());
        let key = cache.key("img", (512, 512), false);
        assert!(cache.get(&key, &Device::Cpu).is_none());
        let mean = Tensor::new(&[[1f32, 2.0]], &Device::Cpu).unwrap();
        let logvar = Tensor::new(&[[-1f32, 0.5]], &Device::Cpu).unwrap();
        cache.put(&key, &mean, &logvar).unwrap();
        let (m, l) = cache.get(&key, &Device::Cpu).unwrap();
        assert_eq!(m.to_vec2::<f32>().unwrap(), [[1.0, 2.0]]);
        assert_eq!(l.to_vec2::<f32>().unwrap(), [[-1.0, 0.5]]);
        assert_ne!(key, cache.key("img", (576, 448), false));
        assert_ne!(key, cache.key("img", (512, 512), true));
        assert_ne!(key, cache.key("other", (512, 512), false));
        assert_ne!(
            key,
            LatentCache::new(dir.path().to_owned(), "vae-b".into()).key("img", (512, 512), false)
        );
        std::fs::write(cache.path(&key), b"damaged").unwrap();
        assert!(cache.get(&key, &Device::Cpu).is_none());
        assert!(!cache.path(&key).exists(), "a damaged entry is removed");
        let nan = Tensor::new(&[[f32::NAN, 2.0]], &Device::Cpu).unwrap();
        cache.put(&key, &nan, &logvar).unwrap();
        assert!(
            cache.get(&key, &Device::Cpu).is_none(),
            "NaN latents are encoded again"
        );
        assert!(!cache.path(&key).exists());
    }

    #[test]
    fn vae_id_follows_the_weights() {
        let w = |v: f32| {
            MemoryWeights::new(HashMap::from([(
                "encoder.conv_in.weight".to_owned(),
                Tensor::new(&[v, 2.0], &Device::Cpu).unwrap(),
            )]))
        };
        assert_eq!(vae_id(&w(1.0)).unwrap(), vae_id(&w(1.0)).unwrap());
        assert_ne!(vae_id(&w(1.0)).unwrap(), vae_id(&w(1.5)).unwrap());
    }
}
