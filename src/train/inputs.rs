//! What a run trains on, prepared before the UNet is loaded so the VAE and the text encoder have the device to
//! themselves: every image's latent posterior (from the on-disk cache or encoded now) and the text contexts
//! (every caption encoded once when the text encoder is frozen and captions are fixed).

use super::cache::{LatentCache, vae_id};
use super::config::TrainConfig;
use super::data::{Item, load_for_bucket};
use super::engine::Link;
use super::events::{Event, Phase};
use super::failure::Failure;
use super::plan::Data;
use crate::model::checkpoint::ModelFiles;
use crate::model::text_encoder::TextEncoder;
use crate::model::tokenizer::ClipTokenizer;
use crate::model::vae::Vae;
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;

/// Posterior (mean, logvar) of each (item, mirrored), on the CPU.
pub type Latents = HashMap<(usize, bool), (Tensor, Tensor)>;

/// Where text contexts come from during training.
pub enum TextSource {
    /// Embeddings of every caption, computed once (text encoder frozen, captions fixed); on the CPU.
    Cached(HashMap<String, Tensor>),
    /// The encoder stays on the device (captions vary from step to step).
    Live(TextEncoder),
    /// The encoder is trained: its adapters get gradients through the contexts.
    Trained(TextEncoder),
}

/// The parts of a run the preparation reads.
pub struct Inputs<'a> {
    pub link: &'a Link,
    pub config: &'a TrainConfig,
    pub device: &'a Device,
    pub dtype: DType,
    pub files: &'a ModelFiles,
    pub tokenizer: &'a ClipTokenizer,
}

impl Inputs<'_> {
    fn emit(&self, event: Event) {
        self.link.emit(event);
    }

    fn failure(&self, doing: &str, e: impl std::fmt::Display) -> Failure {
        Failure::from_error(doing, e, self.config)
    }

    /// Encodes every (image, mirrored) posterior once, reading what the on-disk cache has; the VAE leaves the
    /// device afterwards. Images that fail to decode are left out of `data`.
    pub fn cache_latents(&self, data: &mut Data) -> Result<Latents, Failure> {
        self.emit(Event::Phase {
            phase: Phase::CachingLatents,
        });
        let vae = Vae::new(
            self.files.vae(),
            &self.files.vae_config,
            DType::F32,
            self.device,
        )
        .map_err(|e| self.failure("loading the VAE", e))?;
        let id = vae_id(self.files.vae()).map_err(|e| self.failure("loading the VAE", e))?;
        let cache = LatentCache::new(super::cache::default_dir(&self.config.dataset.folder), id);
        let flips: &[bool] = if self.config.dataset.flip {
            &[false, true]
        } else {
            &[false]
        };
        let total = data.plan.items.len() * flips.len();
        let (mut done, mut encoded) = (0, 0);
        let mut latents = Latents::new();
        let mut unreadable = Vec::new();
        for (i, item) in data.plan.items.iter().enumerate() {
            let hash =
                match crate::fsutil::admit::read_bounded(&item.path, crate::fsutil::admit::IMAGE) {
                    Ok(bytes) => blake3::hash(&bytes).to_hex().to_string(),
                    Err(e) => {
                        unreadable.push((i, e.to_string()));
                        continue;
                    }
                };
            for &flip in flips {
                let key = cache.key(&hash, item.bucket, flip);
                let (mean, logvar) = match cache.get(&key, &Device::Cpu) {
                    Some(p) => p,
                    None => match self.encode_image(&vae, item, flip) {
                        Ok((mean, logvar)) => {
                            if let Err(e) = cache.put(&key, &mean, &logvar) {
                                self.emit(Event::Warning {
                                    message: format!(
                                        "the latent cache cannot be written ({e}); encoding again next run"
                                    ),
                                });
                            }
                            encoded += 1;
                            (mean, logvar)
                        }
                        Err(e) if e.to_string().to_lowercase().contains("out of memory") => {
                            return Err(Failure::new(
                                format!(
                                    "The GPU ran out of memory while the VAE encoded {} ({}x{}).",
                                    item.path.display(),
                                    item.bucket.0,
                                    item.bucket.1
                                ),
                                "Lower `dataset.max_bucket_side` or `dataset.resolution`, and close other \
                                 programs that use the GPU. Latents already encoded are cached.",
                            ));
                        }
                        Err(e) => {
                            unreadable.push((i, e.to_string()));
                            break;
                        }
                    },
                };
                let pair = mean.squeeze(0).and_then(|m| Ok((m, logvar.squeeze(0)?)));
                latents.insert(
                    (i, flip),
                    pair.map_err(|e| self.failure("reading the latent cache", e))?,
                );
                done += 1;
                self.emit(Event::PhaseProgress {
                    phase: Phase::CachingLatents,
                    done,
                    total,
                });
            }
        }
        drop(vae);
        self.emit(Event::Log {
            message: format!(
                "latents: {encoded} encoded, {} from the cache",
                done - encoded
            ),
        });
        self.drop_unreadable(data, latents, unreadable)
    }

    fn encode_image(
        &self,
        vae: &Vae,
        item: &Item,
        flip: bool,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let pixels = load_for_bucket(item, flip, self.device)?.unsqueeze(0)?;
        let p = vae.encode(&pixels)?;
        Ok((
            p.mean.to_device(&Device::Cpu)?,
            p.logvar.to_device(&Device::Cpu)?,
        ))
    }

    /// Leaves out images that failed to decode during caching (they passed the header check).
    fn drop_unreadable(
        &self,
        data: &mut Data,
        latents: Latents,
        unreadable: Vec<(usize, String)>,
    ) -> Result<Latents, Failure> {
        if unreadable.is_empty() {
            return Ok(latents);
        }
        for (i, why) in &unreadable {
            self.emit(Event::Warning {
                message: format!("{} is left out: {why}", data.plan.items[*i].path.display()),
            });
        }
        let bad: Vec<usize> = unreadable.iter().map(|u| u.0).collect();
        let mut keep_index = HashMap::new();
        let items = std::mem::take(&mut data.plan.items);
        for (i, item) in items.into_iter().enumerate() {
            if !bad.contains(&i) {
                keep_index.insert(i, data.plan.items.len());
                data.plan.items.push(item);
            }
        }
        if data.plan.items.iter().all(|i| i.regularization) {
            return Err(Failure::new(
                "Every image of the dataset failed to decode.",
                "Check the files in the Dataset workspace (Problems filter) and replace the broken ones.",
            ));
        }
        Ok(latents
            .into_iter()
            .filter_map(|((i, f), v)| Some(((*keep_index.get(&i)?, f), v)))
            .collect())
    }

    /// Where the run's text contexts come from: `trained` (the text encoder with adapters) when it is trained;
    /// otherwise every caption encoded once when captions are fixed, or the frozen encoder kept for per-step
    /// encoding when they vary. Also returns the sample prompts' contexts (empty when trained: those are
    /// encoded at sampling time with the encoder as trained so far).
    pub fn prepare_text(
        &self,
        data: &Data,
        trained: Option<TextEncoder>,
    ) -> Result<(TextSource, Vec<(Tensor, Tensor)>), Failure> {
        if let Some(encoder) = trained {
            return Ok((TextSource::Trained(encoder), Vec::new()));
        }
        let encoder = TextEncoder::new(
            self.files.text_encoder(),
            &self.files.text_encoder_config,
            self.dtype,
            self.device,
        )
        .map_err(|e| self.failure("loading the text encoder", e))?;
        let prompts = prompt_contexts(self, &encoder)
            .map_err(|e| self.failure("encoding the sample prompts", e))?;
        let d = &self.config.dataset;
        if d.shuffle_caption || d.tag_dropout > 0.0 {
            return Ok((TextSource::Live(encoder), prompts));
        }
        self.emit(Event::Phase {
            phase: Phase::CachingText,
        });
        let mut unique: Vec<&str> = data.plan.items.iter().map(|i| i.caption.as_str()).collect();
        unique.push("");
        unique.sort_unstable();
        unique.dedup();
        let mut map = HashMap::new();
        for (n, caption) in unique.iter().enumerate() {
            let t = encode_texts(self, &encoder, &[caption])
                .and_then(|t| t.to_device(&Device::Cpu))
                .map_err(|e| self.failure("encoding the captions", e))?;
            map.insert((*caption).to_owned(), t);
            self.emit(Event::PhaseProgress {
                phase: Phase::CachingText,
                done: n + 1,
                total: unique.len(),
            });
        }
        Ok((TextSource::Cached(map), prompts))
    }
}

/// Contexts `[N, n·77, C]` of `texts`, detached, on the device.
pub fn encode_texts(
    inputs: &Inputs,
    encoder: &TextEncoder,
    texts: &[&str],
) -> candle_core::Result<Tensor> {
    let (ids, _) = inputs.tokenizer.tokenize_batch(
        texts,
        crate::sample::pipeline::MAX_CHUNKS,
        inputs.device,
    )?;
    let clip_skip = inputs.config.model.clip_skip.max(1) as usize;
    Ok(encoder.forward(&ids)?.context(clip_skip)?.detach())
}

/// (uncond, cond) contexts of every sample prompt, on the CPU.
pub fn prompt_contexts(
    inputs: &Inputs,
    encoder: &TextEncoder,
) -> candle_core::Result<Vec<(Tensor, Tensor)>> {
    let mut contexts = Vec::new();
    for p in &inputs.config.sampling.prompts {
        let both =
            encode_texts(inputs, encoder, &[&p.negative, &p.prompt])?.to_device(&Device::Cpu)?;
        contexts.push((both.narrow(0, 0, 1)?, both.narrow(0, 1, 1)?));
    }
    Ok(contexts)
}
