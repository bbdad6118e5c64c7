//! One training run on the engine thread: load, cache latents and text embeddings, train, sample and save, with
//! the front end's commands honoured between steps. Every random draw of a step comes from (seed, step), and the
//! data order from (seed, epoch), so a resumed run repeats the uninterrupted one exactly.

use super::config::{Precision, TrainConfig};
use super::data::{CaptionOptions, vary_caption};
use super::engine::{Link, StartOptions};
use super::events::{Command, Event, Phase, StepStats};
use super::failure::Failure;
use super::inputs::{Inputs, Latents, TextSource, prompt_contexts};
use super::lr::lr_factor;
use super::optim::{Group, Optimizer};
use super::plan::{Data, OutputPaths, load_data, make_plan, open_model};
use super::record::{LossLog, LossPoint, SampleInfo};
use super::state::{self, Counters};
use super::step::{LossInputs, LossOptions, loss_from};
use crate::lora::{BaseModel, ConvLora, LoraMetadata};
use crate::model::adapters::{Trainable, unet_slot};
use crate::model::checkpoint::{Family, ModelFiles};
use crate::model::layers::with_dropout_key;
use crate::model::text_encoder::TextEncoder;
use crate::model::tokenizer::ClipTokenizer;
use crate::model::unet::{UNet, UNetOptions};
use crate::model::vae::{Vae, tensor_to_images};
use crate::sample::{NoiseSchedule, Prediction, SampleConfig, Sampler, initial_noise};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use std::collections::VecDeque;
use std::time::{Instant, SystemTime};

/// Consecutive steps with a non-finite loss or gradient after which the run stops.
const MAX_BAD_STEPS: u32 = 5;

/// The sampler of the run's previews.
const PREVIEW_SAMPLER: Sampler = Sampler::Euler;

/// Runs `config` to its end, reporting through `link`; failures end with a `Failed` event.
pub fn run(config: TrainConfig, options: StartOptions, link: &Link) {
    let result = Trainer::new(config, &options, link).and_then(|mut t| t.train(&options));
    if let Err(f) = result {
        link.emit(Event::Phase {
            phase: Phase::Failed,
        });
        link.emit(Event::Failed {
            message: f.message,
            hint: f.hint,
        });
    }
}

/// The compute dtype: fp32 on the CPU; on a GPU bf16 where supported, else fp16 (unless set explicitly).
pub fn compute_dtype(config: &TrainConfig, device: &Device) -> DType {
    if device.is_cpu() {
        return DType::F32;
    }
    match config.training.precision {
        Precision::Auto if crate::device::supports_bf16(device) => DType::BF16,
        Precision::Auto | Precision::Fp16 => DType::F16,
        Precision::Bf16 => DType::BF16,
        Precision::Fp32 => DType::F32,
    }
}

/// Dynamic loss scaling for fp16: scale up while gradients stay finite, halve on overflow.
struct LossScale {
    scale: f64,
    good_steps: u32,
    dynamic: bool,
}

impl LossScale {
    fn new(dtype: DType) -> Self {
        let dynamic = dtype == DType::F16;
        LossScale {
            scale: if dynamic { 65536.0 } else { 1.0 },
            good_steps: 0,
            dynamic,
        }
    }

    /// Records a step's outcome; true when a skipped step was only the scale's fault (not a real failure).
    fn update(&mut self, finite: bool) -> bool {
        if !self.dynamic {
            return false;
        }
        if finite {
            self.good_steps += 1;
            if self.good_steps >= 2000 {
                self.scale *= 2.0;
                self.good_steps = 0;
            }
            false
        } else {
            self.good_steps = 0;
            self.scale /= 2.0;
            self.scale >= 1.0
        }
    }
}

/// Batch shapes (bucket × caption length) that get a captured step; a run with more launches the rest from the
/// host. Each graph keeps its own device memory while it is not replaying (CUDA may share physical pages
/// between graphs of one stream, but we do not count on it).
#[cfg(feature = "cuda")]
const MAX_CAPTURED_SHAPES: usize = 8;

struct Trainer<'a> {
    link: &'a Link,
    config: TrainConfig,
    device: Device,
    dtype: DType,
    files: ModelFiles,
    tokenizer: ClipTokenizer,
    data: Data,
    out: OutputPaths,
    unet: UNet,
    trainable: Trainable,
    opt: Optimizer,
    latents: Latents,
    text: TextSource,
    /// (uncond, cond) context of each sample prompt, on the CPU.
    sample_contexts: Vec<(Tensor, Tensor)>,
    schedule: NoiseSchedule,
    counters: Counters,
    total_steps: u64,
    started_at: SystemTime,
    loss_scale: LossScale,
    step_times: VecDeque<f64>,
    /// Set once the run is ending on a stop request (no phase change back to training after the save).
    stopping: bool,
    /// The loss curve file (none when it could not be opened; the run goes on without it).
    loss_log: Option<LossLog>,
    /// Batches of the current epoch (recomputed when the epoch changes).
    epoch_batches: (u64, Vec<Vec<super::data::Sample>>),
    /// Steps captured as CUDA graphs, one per batch shape (see `captured_step`).
    #[cfg(feature = "cuda")]
    graphs: Vec<super::graph::CapturedStep>,
}

fn fail<'c>(doing: &str, config: &'c TrainConfig) -> impl Fn(candle_core::Error) -> Failure + 'c {
    let doing = doing.to_owned();
    move |e| Failure::from_error(&doing, e, config)
}

impl<'a> Trainer<'a> {
    fn new(config: TrainConfig, options: &StartOptions, link: &'a Link) -> Result<Self, Failure> {
        link.emit(Event::Phase {
            phase: Phase::Loading,
        });
        config
            .validate()
            .map_err(|e| Failure::new(e.0, "Fix the setting named."))?;
        let (device, warning) = crate::device::best();
        if let Some(w) = warning {
            link.emit(Event::Warning { message: w });
        }
        let dtype = compute_dtype(&config, &device);
        if device.is_cpu() && matches!(config.training.precision, Precision::Bf16 | Precision::Fp16)
        {
            link.emit(Event::Warning {
                message:
                    "training on the CPU computes in fp32 (its matrix units have no fast bf16/fp16)"
                        .into(),
            });
        }
        let files = open_model(&config)?;
        link.emit(Event::Log {
            message: format!("model: {}", files.describe()),
        });
        let mut data = load_data(&config)?;
        for w in &data.warnings {
            link.emit(Event::Warning { message: w.clone() });
        }
        let out = OutputPaths::new(&config);
        std::fs::create_dir_all(out.samples()).map_err(|e| {
            Failure::new(
                format!("Cannot create the output folder {}: {e}", out.dir.display()),
                "Choose an output folder you can write to (`saving.output_dir`).",
            )
        })?;
        for dir in [out.dir.clone(), out.samples()] {
            for path in crate::fsutil::remove_stale_temps(&dir) {
                link.emit(Event::Log {
                    message: format!("removed {}, left by an interrupted save", path.display()),
                });
            }
        }
        let mut plan = make_plan(
            &config,
            &data,
            &crate::device::describe(&device),
            &format!("{dtype:?}").to_lowercase(),
        );
        if let Some(dir) = &options.resume {
            plan.start_step = state::saved(dir).map_or(0, |(c, _)| c.step);
        }
        let total_steps = plan.total_steps;
        let start_step = plan.start_step;
        link.emit(Event::Plan(plan));
        let tokenizer =
            crate::sample::pipeline::tokenizer_for(&config.model.checkpoint, files.family)
                .map_err(|e| Failure::new(e, "The model folder's tokenizer files are damaged."))?;
        crate::device::reset_peak(&device);
        // The VAE and the text encoder do their work before the UNet takes its place on the device.
        let inputs = Inputs {
            link,
            config: &config,
            device: &device,
            dtype,
            files: &files,
            tokenizer: &tokenizer,
        };
        let latents = inputs.cache_latents(&mut data)?;
        let trained_te = if config.training.train_text_encoder {
            Some(
                trained_text_encoder(&files, &config, dtype, &device)
                    .map_err(fail("adding adapters to the text encoder", &config))?,
            )
        } else {
            None
        };
        let (encoder, te_adapters) = trained_te.unzip();
        let (text, sample_contexts) = inputs.prepare_text(&data, encoder)?;
        let (unet, trainable, opt, counters) =
            networks(&config, &files, dtype, &device, te_adapters, options)?;
        // Opened once the resume state has loaded: a refused state leaves the curve as it was.
        let loss_log = LossLog::open(&out.loss_log(), start_step)
            .map_err(|e| {
                link.emit(Event::Warning {
                    message: format!(
                        "the loss curve is not saved: cannot write {}: {e}",
                        out.loss_log().display()
                    ),
                })
            })
            .ok();
        Ok(Trainer {
            link,
            loss_scale: LossScale::new(dtype),
            config,
            device,
            dtype,
            files,
            tokenizer,
            data,
            out,
            unet,
            trainable,
            opt,
            latents,
            text,
            sample_contexts,
            schedule: NoiseSchedule::stable_diffusion(),
            counters,
            total_steps,
            started_at: SystemTime::now(),
            step_times: VecDeque::new(),
            stopping: false,
            loss_log,
            epoch_batches: (u64::MAX, Vec::new()),
            #[cfg(feature = "cuda")]
            graphs: Vec::new(),
        })
    }

    fn inputs(&self) -> Inputs<'_> {
        Inputs {
            link: self.link,
            config: &self.config,
            device: &self.device,
            dtype: self.dtype,
            files: &self.files,
            tokenizer: &self.tokenizer,
        }
    }

    fn emit(&self, event: Event) {
        self.link.emit(event);
    }

    fn failure(&self, doing: &str, e: impl std::fmt::Display) -> Failure {
        Failure::from_error(doing, e, &self.config)
    }

    /// The whole run after loading.
    fn train(&mut self, options: &StartOptions) -> Result<(), Failure> {
        self.emit(Event::Phase {
            phase: Phase::Training,
        });
        let first = self.counters.step;
        let stop_at = options.stop_after.map(|n| first + n);
        self.sample_baseline()?;
        let mut bad_steps = 0;
        while self.counters.step < self.total_steps {
            if self.handle_commands()? || stop_at.is_some_and(|s| self.counters.step >= s) {
                return self.stop();
            }
            let started = Instant::now();
            let (loss, finite) = self.step().map_err(|e| self.failure("training", e))?;
            if !finite {
                if self.loss_scale.update(false) {
                    continue;
                }
                bad_steps += 1;
                self.emit(Event::Warning {
                    message: format!(
                        "step {}: the loss or its gradient is not finite ({loss}); the step is skipped",
                        self.counters.step + 1
                    ),
                });
                if bad_steps >= MAX_BAD_STEPS {
                    return Err(Failure::new(
                        format!(
                            "Training diverged: {MAX_BAD_STEPS} steps in a row gave a non-finite loss (NaN or \
                             infinity) at step {}.",
                            self.counters.step
                        ),
                        "Lower `optimizer.lr` (e.g. halve it), keep `optimizer.max_grad_norm` at 1, or use \
                         `training.precision = \"bf16\"`/\"fp32\". The last saved LoRA and state are intact.",
                    ));
                }
                continue;
            }
            self.loss_scale.update(true);
            bad_steps = 0;
            self.counters.step += 1;
            self.record_time(started.elapsed().as_secs_f64());
            let stats = self.stats(loss);
            if let Some(log) = &mut self.loss_log {
                let point = LossPoint {
                    step: stats.step,
                    loss,
                    lr: stats.lr,
                };
                if let Err(e) = log.append(point) {
                    self.loss_log = None;
                    self.emit(Event::Warning {
                        message: format!("the loss curve is no longer saved: {e}"),
                    });
                }
            }
            self.emit(Event::Progress(stats));
            self.after_step()?;
        }
        self.finish()
    }

    /// Saves and samples as configured after a step.
    fn after_step(&mut self) -> Result<(), Failure> {
        let step = self.counters.step;
        let s = &self.config.saving;
        if s.every_n_steps > 0 && step.is_multiple_of(s.every_n_steps) && step < self.total_steps {
            self.save_point(false)?;
        }
        let every = self.config.sampling.every_n_steps;
        if every > 0 && step.is_multiple_of(every) {
            self.sample()?;
        }
        Ok(())
    }

    /// Honours waiting commands; true when the run must stop.
    fn handle_commands(&mut self) -> Result<bool, Failure> {
        while let Some(c) = self.link.try_command() {
            match c {
                Command::Stop => return Ok(true),
                Command::SampleNow => self.sample()?,
                Command::SaveNow => self.save_point(false)?,
                Command::Resume => {}
                Command::Pause => {
                    self.emit(Event::Paused);
                    loop {
                        match self.link.wait_command() {
                            Some(Command::Resume) => break,
                            Some(Command::Stop) | None => return Ok(true),
                            Some(Command::SampleNow) => self.sample()?,
                            Some(Command::SaveNow) => self.save_point(false)?,
                            Some(Command::Pause) => {}
                        }
                    }
                    self.emit(Event::Resumed);
                }
            }
        }
        Ok(false)
    }

    fn record_time(&mut self, seconds: f64) {
        self.step_times.push_back(seconds);
        if self.step_times.len() > 20 {
            self.step_times.pop_front();
        }
    }

    fn stats(&self, loss: f64) -> StepStats {
        let mean = self.step_times.iter().sum::<f64>() / self.step_times.len().max(1) as f64;
        let it_per_s = if mean > 0.0 { 1.0 / mean } else { 0.0 };
        let left = self.total_steps - self.counters.step;
        let memory = crate::device::memory(&self.device);
        StepStats {
            step: self.counters.step,
            total_steps: self.total_steps,
            epoch: self.counters.epoch,
            loss,
            lr: self.config.optimizer.lr * self.lr_factor(self.counters.step - 1),
            it_per_s,
            eta_s: (it_per_s > 0.0).then(|| left as f64 / it_per_s),
            memory_used: memory.map(|(free, total)| total - free),
            memory_total: memory.map(|m| m.1),
            memory_peak: crate::device::peak(&self.device),
        }
    }

    fn lr_factor(&self, step: u64) -> f64 {
        let o = &self.config.optimizer;
        lr_factor(
            o.schedule,
            step,
            self.total_steps,
            o.warmup_steps,
            o.restarts,
        )
    }

    /// Whole epochs trained (the counter moves on only when the next batch is drawn, so an epoch whose last
    /// batch has just been used counts as done here).
    fn epochs_done(&self) -> u64 {
        let (epoch, batches) = &self.epoch_batches;
        let finished = *epoch == self.counters.epoch
            && !batches.is_empty()
            && self.counters.batch_in_epoch == batches.len();
        self.counters.epoch + u64::from(finished)
    }

    /// The next batch of the data order (moving to the next epoch when one ends).
    fn next_batch(&mut self) -> Result<Vec<super::data::Sample>, Failure> {
        loop {
            if self.epoch_batches.0 != self.counters.epoch {
                self.epoch_batches = (
                    self.counters.epoch,
                    self.data.plan.epoch(self.counters.epoch),
                );
            }
            if let Some(b) = self.epoch_batches.1.get(self.counters.batch_in_epoch) {
                self.counters.batch_in_epoch += 1;
                return Ok(b.clone());
            }
            self.counters.epoch += 1;
            self.counters.batch_in_epoch = 0;
            let every = self.config.saving.every_n_epochs;
            if every > 0
                && self.counters.epoch.is_multiple_of(u64::from(every))
                && self.counters.step > 0
            {
                self.save_point(false)?;
            }
        }
    }

    /// One optimizer step over `gradient_accumulation` batches: (mean loss, whether it was finite and applied).
    fn step(&mut self) -> Result<(f64, bool), Failure> {
        #[cfg(feature = "cuda")]
        if self.can_capture() {
            return self.captured_step();
        }
        let k = self.config.optimizer.gradient_accumulation as usize;
        let scale = self.loss_scale.scale;
        let mut grads: Option<GradStore> = None;
        let mut loss_sum = 0.0;
        for micro in 0..k {
            let batch = self.next_batch()?;
            let mut rng = step_rng(self.config.training.seed, self.counters.step, micro);
            let key = dropout_key(self.config.training.seed, self.counters.step, micro);
            let (loss, g) =
                with_dropout_key(key, || self.micro_step(&batch, &mut rng, scale / k as f64))
                    .map_err(|e| self.failure("training", e))?;
            loss_sum += loss;
            grads = Some(match grads {
                None => g,
                Some(acc) => self
                    .add_grads(acc, g)
                    .map_err(|e| self.failure("training", e))?,
            });
        }
        let loss = loss_sum / k as f64;
        let grads = grads.expect("at least one micro-batch");
        if !loss.is_finite() {
            return Ok((loss, false));
        }
        let factor = self.lr_factor(self.counters.step);
        let norm = self
            .opt
            .step(&grads, factor, self.config.optimizer.max_grad_norm, scale)
            .map_err(|e| self.failure("updating the adapters", e))?;
        Ok((loss, norm.is_finite()))
    }

    /// Whether steps can be captured as CUDA graphs: one batch per step, adapters updated on the device, and
    /// nothing that uploads per-step data inside the step (text-encoder training tokenizes, dropout draws its
    /// masks on the host).
    #[cfg(feature = "cuda")]
    fn can_capture(&self) -> bool {
        self.config.optimizer.gradient_accumulation == 1
            && self.config.network.dropout == 0.0
            && !matches!(self.text, TextSource::Trained(_))
            && self.opt.on_device()
    }

    /// `step` as a replayed CUDA graph: the batch is prepared on the host as for an uncaptured step, copied into
    /// the captured step of its shape, and the step replayed (captured on the second batch of a shape).
    #[cfg(feature = "cuda")]
    fn captured_step(&mut self) -> Result<(f64, bool), Failure> {
        use super::graph::{Batch, CapturedStep, StepSettings};
        let batch = self.next_batch()?;
        let mut rng = step_rng(self.config.training.seed, self.counters.step, 0);
        let (latents, context, timesteps, noise) = self
            .batch_tensors(&batch, &mut rng)
            .map_err(|e| self.failure("training", e))?;
        let options = self.loss_options();
        let reg = self.regularization(&batch);
        let inputs = || LossInputs::new(&self.schedule, options, &timesteps, &reg, &self.device);
        let batch = |inputs| Batch {
            latents: &latents,
            context: &context,
            noise: &noise,
            inputs,
        };
        let settings = StepSettings {
            lr_factor: self.lr_factor(self.counters.step),
            max_norm: self.config.optimizer.max_grad_norm,
            loss_scale: self.loss_scale.scale,
        };
        let ran = (|| -> candle_core::Result<_> {
            let b = batch(inputs()?);
            let at = match self.graphs.iter().position(|g| g.fits(&b)) {
                Some(at) => at,
                None if self.graphs.len() >= MAX_CAPTURED_SHAPES => {
                    let out = super::graph::launched_step(
                        &self.unet,
                        &mut self.opt,
                        options,
                        b,
                        settings,
                    )?;
                    return Ok((out, None));
                }
                None => {
                    self.graphs.push(CapturedStep::new(b, options)?);
                    self.graphs.len() - 1
                }
            };
            let b = batch(inputs()?);
            let out = self.graphs[at].run(&self.unet, &mut self.opt, b, settings)?;
            Ok((out, self.graphs[at].unreported_capture_error()))
        })();
        let ((loss, norm), capture_error) = ran.map_err(|e| self.failure("training", e))?;
        if let Some(why) = capture_error {
            self.emit(Event::Log {
                message: format!(
                    "this batch shape runs without a CUDA graph (slower, same result): capturing it failed: {why}"
                ),
            });
        }
        Ok((loss, loss.is_finite() && norm.is_finite()))
    }

    fn add_grads(&self, mut acc: GradStore, more: GradStore) -> candle_core::Result<GradStore> {
        for var in self.trainable.vars() {
            if let Some(g) = more.get(&var) {
                let sum = match acc.remove(&var) {
                    Some(a) => (a + g)?,
                    None => g.clone(),
                };
                acc.insert(&var, sum);
            }
        }
        Ok(acc)
    }

    /// Forward and backward of one batch; returns the unscaled loss and the gradients of `loss · scale`.
    fn micro_step(
        &self,
        batch: &[super::data::Sample],
        rng: &mut ChaCha8Rng,
        scale: f64,
    ) -> candle_core::Result<(f64, GradStore)> {
        let (latents, context, timesteps, noise) = self.batch_tensors(batch, rng)?;
        let options = self.loss_options();
        let reg = self.regularization(batch);
        let inputs = LossInputs::new(&self.schedule, options, &timesteps, &reg, &self.device)?;
        let loss = loss_from(&self.unet, options, &latents, &context, &noise, &inputs)?;
        let value = f64::from(loss.to_scalar::<f32>()?);
        let grads = self.unet.backward(&loss.affine(scale, 0.0)?)?;
        Ok((value, grads))
    }

    /// A batch's latents, text context, timesteps and noise, drawn from `rng`.
    fn batch_tensors(
        &self,
        batch: &[super::data::Sample],
        rng: &mut ChaCha8Rng,
    ) -> candle_core::Result<(Tensor, Tensor, Vec<usize>, Tensor)> {
        let latents = self.batch_latents(batch, rng)?;
        let captions: Vec<String> = batch
            .iter()
            .map(|s| {
                let caption = &self.data.plan.items[s.item].caption;
                vary_caption(caption, CaptionOptions::from(&self.config.dataset), rng)
            })
            .collect();
        let context = self.contexts(&captions)?;
        let timesteps: Vec<usize> = batch
            .iter()
            .map(|_| rng.random_range(0..self.schedule.alphas_cumprod.len()))
            .collect();
        let mut noise = randn(rng, latents.dims(), &self.device)?;
        let offset = self.config.training.noise_offset;
        if offset > 0.0 {
            let (b, c, _, _) = latents.dims4()?;
            let shift = randn(rng, &[b, c, 1, 1], &self.device)?.affine(offset, 0.0)?;
            noise = noise.broadcast_add(&shift)?;
        }
        Ok((latents, context, timesteps, noise))
    }

    fn loss_options(&self) -> LossOptions {
        LossOptions {
            prediction: self.files.prediction,
            min_snr_gamma: self.config.training.min_snr_gamma,
            prior_loss_weight: self.config.dataset.prior_loss_weight,
        }
    }

    /// Which samples of a batch are regularization images (their loss takes the prior loss weight).
    fn regularization(&self, batch: &[super::data::Sample]) -> Vec<bool> {
        let items = &self.data.plan.items;
        batch.iter().map(|s| items[s.item].regularization).collect()
    }

    /// Latents of a batch drawn from the cached posteriors, scaled for the UNet, on the device.
    fn batch_latents(
        &self,
        batch: &[super::data::Sample],
        rng: &mut ChaCha8Rng,
    ) -> candle_core::Result<Tensor> {
        let mut rows = Vec::with_capacity(batch.len());
        for s in batch {
            let (mean, logvar) = &self.latents[&(s.item, s.flip)];
            let eps = randn(rng, mean.dims(), &Device::Cpu)?;
            let z = (mean + (logvar * 0.5)?.exp()?.mul(&eps)?)?;
            rows.push(z);
        }
        let z = Tensor::stack(&rows, 0)?.affine(self.files.vae_config.scaling_factor, 0.0)?;
        z.to_device(&self.device)
    }

    /// Text contexts `[B, n·77, C]` for `captions`, in the compute dtype on the device.
    fn contexts(&self, captions: &[String]) -> candle_core::Result<Tensor> {
        let clip_skip = self.config.model.clip_skip.max(1) as usize;
        match &self.text {
            TextSource::Live(encoder) | TextSource::Trained(encoder) => {
                let texts: Vec<&str> = captions.iter().map(String::as_str).collect();
                let (ids, _) = self.tokenizer.tokenize_batch(
                    &texts,
                    crate::sample::pipeline::MAX_CHUNKS,
                    &self.device,
                )?;
                let context = encoder.forward(&ids)?.context(clip_skip)?.clone();
                Ok(match self.text {
                    TextSource::Trained(_) => context,
                    _ => context.detach(),
                })
            }
            TextSource::Cached(map) => {
                let rows: Vec<&Tensor> = captions.iter().map(|c| &map[c]).collect();
                let longest = rows
                    .iter()
                    .map(|t| t.dim(1))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                let longest = longest.into_iter().max().unwrap_or(0);
                // Shorter prompts get empty windows, as the tokenizer pads a batch.
                let empty = &map[""];
                let padded = rows
                    .into_iter()
                    .map(|t| {
                        let mut parts = vec![t.clone()];
                        while parts.iter().map(|p| p.dim(1).unwrap_or(0)).sum::<usize>() < longest {
                            parts.push(empty.clone());
                        }
                        Tensor::cat(&parts, 1)
                    })
                    .collect::<candle_core::Result<Vec<_>>>()?;
                Tensor::cat(&padded, 0)?.to_device(&self.device)
            }
        }
    }

    /// Generates every sample prompt with the current adapter and writes the images.
    fn sample(&mut self) -> Result<(), Failure> {
        self.draw_prompts(false)
    }

    /// The sample prompts drawn without the LoRA (its adapters at weight 0, before the first step while the
    /// UNet is on the device anyway, so the peak is not raised), for the Samples grid's "without LoRA" column.
    /// A resumed run whose folder has them with the same settings sends those instead of drawing them again.
    fn sample_baseline(&mut self) -> Result<(), Failure> {
        let prompts = self.config.sampling.prompts.clone();
        if prompts.is_empty() {
            return Ok(());
        }
        let saved: Option<Vec<(SampleInfo, image::RgbImage)>> = prompts
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let path = self.out.baseline_sample(i);
                let info = super::record::read_info(&path)
                    .filter(|info| *info == self.sample_info(i, p, true))?;
                Some((info, image::open(&path).ok()?.into_rgb8()))
            })
            .collect();
        if let Some(saved) = saved.filter(|s| !s.is_empty()) {
            for (info, image) in saved {
                self.emit(Event::Sample {
                    path: self.out.baseline_sample(info.prompt_index),
                    info,
                    image: std::sync::Arc::new(image),
                });
            }
            return Ok(());
        }
        self.set_adapter_weight(0.0)?;
        let drawn = self.draw_prompts(true);
        self.set_adapter_weight(1.0)?;
        drawn
    }

    fn set_adapter_weight(&mut self, weight: f64) -> Result<(), Failure> {
        let mut layers = self.unet.layers_mut().map_err(|e| {
            Failure::from_error("making the samples without the LoRA", e, &self.config)
        })?;
        if let TextSource::Trained(encoder) = &mut self.text {
            layers.extend(encoder.layers_mut());
        }
        for a in layers.into_iter().flat_map(|l| l.adapters.iter_mut()) {
            a.multiplier = weight;
        }
        Ok(())
    }

    fn sample_info(
        &self,
        index: usize,
        p: &super::config::SamplePrompt,
        baseline: bool,
    ) -> SampleInfo {
        SampleInfo {
            step: if baseline { 0 } else { self.counters.step },
            prompt_index: index,
            prompt: p.prompt.clone(),
            negative: p.negative.clone(),
            seed: p.seed,
            sampler: PREVIEW_SAMPLER,
            steps: p.steps,
            cfg: p.cfg,
            width: p.width,
            height: p.height,
            lora_weight: if baseline { 0.0 } else { 1.0 },
            baseline,
        }
    }

    /// Draws every sample prompt with the adapters as they are and writes the images with their settings.
    fn draw_prompts(&mut self, baseline: bool) -> Result<(), Failure> {
        let prompts = self.config.sampling.prompts.clone();
        if prompts.is_empty() {
            return Ok(());
        }
        self.emit(Event::Phase {
            phase: Phase::Sampling,
        });
        // The captured steps' memory, free between replays, goes back to the driver for the VAE and sampler.
        crate::device::trim_graph_memory(&self.device);
        let before = crate::device::memory(&self.device);
        // bf16 halves the decoder's memory (the SD VAE overflows in fp16, not in bf16); fp32 elsewhere.
        let vae_dtype = if self.dtype == DType::BF16 {
            DType::BF16
        } else {
            DType::F32
        };
        let vae = Vae::new(
            self.files.vae(),
            &self.files.vae_config,
            vae_dtype,
            &self.device,
        )
        .map_err(|e| self.failure("loading the VAE for samples", e))?;
        let f = self.files.vae_config.downsample_factor();
        // A trained encoder's adapters are off for the baseline, so the same call gives the base model's contexts.
        if let TextSource::Trained(encoder) = &self.text {
            let contexts = prompt_contexts(&self.inputs(), encoder)
                .map_err(|e| self.failure("encoding the sample prompts", e))?;
            self.sample_contexts = contexts;
        }
        for (i, p) in prompts.iter().enumerate() {
            let image = self
                .sample_one(&vae, vae_dtype, i, p, f)
                .map_err(|e| self.failure("making a sample", e))?;
            let info = self.sample_info(i, p, baseline);
            let path = if baseline {
                self.out.baseline_sample(i)
            } else {
                self.out.sample(self.counters.step, i)
            };
            super::record::write_sample(&path, &image, &info)
                .map_err(|e| self.failure("saving a sample", e))?;
            self.emit(Event::Sample {
                info,
                path,
                image: std::sync::Arc::new(image),
            });
            self.emit(Event::PhaseProgress {
                phase: Phase::Sampling,
                done: i + 1,
                total: prompts.len(),
            });
        }
        drop(vae);
        if let (Some(b), Some(a)) = (before, crate::device::memory(&self.device)) {
            let mib = |m: (u64, u64)| (m.1 - m.0) / (1 << 20);
            self.emit(Event::Log {
                message: format!(
                    "samples: device memory in use {} MiB before, {} MiB after",
                    mib(b),
                    mib(a)
                ),
            });
        }
        self.emit(Event::Phase {
            phase: Phase::Training,
        });
        Ok(())
    }

    fn sample_one(
        &self,
        vae: &Vae,
        vae_dtype: DType,
        index: usize,
        p: &super::config::SamplePrompt,
        f: usize,
    ) -> candle_core::Result<image::RgbImage> {
        let shape = (
            1,
            self.files.unet_config.in_channels,
            p.height as usize / f,
            p.width as usize / f,
        );
        let noise = initial_noise(p.seed, shape, &self.device)?;
        let (uncond, cond) = &self.sample_contexts[index];
        let config = SampleConfig {
            sampler: PREVIEW_SAMPLER,
            steps: p.steps as usize,
            cfg: p.cfg,
            prediction: self.files.prediction,
            seed: p.seed,
        };
        let unet = &self.unet;
        let latents = crate::sample::sample(
            &self.schedule,
            &config,
            &noise,
            &cond.to_device(&self.device)?,
            &uncond.to_device(&self.device)?,
            // Detached: a preview keeps no graph through the adapters.
            |x, t, c| Ok(unet.forward(x, t, c)?.detach()),
            |_, _| {},
        )?;
        // In 256-pixel tiles: the decoder at full size would need more memory than training does.
        let pixels = vae.decode_tiled(&vae.unscale(&latents.to_dtype(vae_dtype)?)?, 32, 8)?;
        Ok(tensor_to_images(&pixels)?.remove(0))
    }

    /// Writes the LoRA (`final_file`: NAME.safetensors, else NAME-step{N}.safetensors) and the training state.
    fn save_point(&mut self, final_file: bool) -> Result<(), Failure> {
        self.emit(Event::Phase {
            phase: Phase::Saving,
        });
        let step = self.counters.step;
        let path = if final_file {
            self.out.final_lora()
        } else {
            self.out.step_lora(step)
        };
        let set = self
            .trainable
            .to_lora_set()
            .map_err(|e| self.failure("saving the LoRA", e))?;
        crate::lora::save_kohya(
            &set,
            &path,
            &self.metadata(),
            self.config.saving.dtype.dtype(),
        )
        .map_err(|e| self.failure("saving the LoRA", e))?;
        self.emit(Event::Saved {
            step,
            path,
            final_file,
        });
        let state_dir = self.out.state();
        state::save(
            &state_dir,
            &self.counters,
            &self.config,
            &self.trainable,
            &self.opt,
        )
        .map_err(|e| self.failure("saving the training state", e))?;
        self.emit(Event::StateSaved {
            step,
            path: state_dir,
        });
        self.prune_step_files();
        if !final_file && !self.stopping {
            self.emit(Event::Phase {
                phase: Phase::Training,
            });
        }
        Ok(())
    }

    /// Keeps only the newest `keep_last` intermediate LoRA files.
    fn prune_step_files(&self) {
        let keep = self.config.saving.keep_last as usize;
        if keep == 0 {
            return;
        }
        let files = self.out.step_loras();
        for (_, path) in files.iter().take(files.len().saturating_sub(keep)) {
            let _ = std::fs::remove_file(path);
        }
    }

    fn metadata(&self) -> LoraMetadata {
        let c = &self.config;
        let base_model = match (self.files.family, self.files.prediction) {
            (Family::Sd1, _) => BaseModel::Sd1,
            (Family::Sd2, Prediction::V) => BaseModel::Sd2V,
            (Family::Sd2, Prediction::Epsilon) => BaseModel::Sd2,
        };
        let with_conv = c.network.targets == super::config::Targets::All;
        let name = |p: &std::path::Path| {
            p.file_name()
                .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
        };
        let mut extra = std::collections::BTreeMap::new();
        let mut put = |k: &str, v: String| {
            extra.insert(k.to_owned(), v);
        };
        put("ss_sd_model_name", name(&c.model.checkpoint));
        if let Some(vae) = &c.model.vae {
            put("ss_vae_name", name(vae));
        }
        put("ss_seed", c.training.seed.to_string());
        put("ss_optimizer", format!("{:?}", c.optimizer.kind));
        put(
            "ss_lr_scheduler",
            serde_json::to_value(c.optimizer.schedule).map_or_else(
                |_| String::new(),
                |v| v.as_str().unwrap_or_default().to_owned(),
            ),
        );
        put("ss_lr_warmup_steps", c.optimizer.warmup_steps.to_string());
        put("ss_max_train_steps", self.total_steps.to_string());
        put(
            "ss_batch_size_per_device",
            c.training.batch_size.to_string(),
        );
        put(
            "ss_gradient_accumulation_steps",
            c.optimizer.gradient_accumulation.to_string(),
        );
        put("ss_max_grad_norm", c.optimizer.max_grad_norm.to_string());
        put(
            "ss_mixed_precision",
            format!("{:?}", self.dtype).to_lowercase(),
        );
        put("ss_gradient_checkpointing", py_bool(c.training.recompute));
        put("ss_clip_skip", c.model.clip_skip.max(1).to_string());
        put("ss_noise_offset", c.training.noise_offset.to_string());
        put("ss_min_snr_gamma", c.training.min_snr_gamma.to_string());
        put("ss_shuffle_caption", py_bool(c.dataset.shuffle_caption));
        put("ss_keep_tokens", c.dataset.keep_tokens.to_string());
        put(
            "ss_caption_dropout_rate",
            c.dataset.caption_dropout.to_string(),
        );
        put(
            "ss_caption_tag_dropout_rate",
            c.dataset.tag_dropout.to_string(),
        );
        put("ss_flip_aug", py_bool(c.dataset.flip));
        put("ss_enable_bucket", py_bool(c.dataset.bucketing));
        put("ss_min_bucket_reso", c.dataset.min_bucket_side.to_string());
        put("ss_max_bucket_reso", c.dataset.max_bucket_side.to_string());
        put("ss_bucket_no_upscale", "False".into());
        put("ss_network_dropout", c.network.dropout.to_string());
        put(
            "ss_text_encoder_lr",
            c.optimizer.lr_text_encoder.to_string(),
        );
        put("ss_unet_lr", c.optimizer.lr.to_string());
        put(
            "ss_network_train_unet_only",
            py_bool(!c.training.train_text_encoder),
        );
        put(
            "ss_num_batches_per_epoch",
            self.data.plan.steps_per_epoch().to_string(),
        );
        let reg_dirs = super::plan::dataset_dirs(&self.data, true);
        let reg_images: u64 = (reg_dirs.values())
            .map(|d| u64::from(d.n_repeats) * d.img_count as u64)
            .sum();
        put("ss_num_reg_images", reg_images.to_string());
        put(
            "ss_reg_dataset_dirs",
            serde_json::json!(reg_dirs).to_string(),
        );
        put(
            "ss_prior_loss_weight",
            c.dataset.prior_loss_weight.to_string(),
        );
        if c.dataset.keep_tokens > 0
            && let Some(trigger) = self
                .data
                .plan
                .items
                .first()
                .and_then(|i| crate::dataset::caption::split_tags(&i.caption).next())
        {
            put("modelspec.trigger_phrase", trigger.to_owned());
        }
        LoraMetadata {
            base_model,
            network_dim: c.network.rank as usize,
            network_alpha: c.network.alpha as f32,
            conv: with_conv.then_some(ConvLora {
                dim: c.network.conv_rank as usize,
                alpha: c.network.conv_alpha as f32,
            }),
            output_name: c.saving.output_name.clone(),
            training_started_at: self.started_at,
            saved_at: SystemTime::now(),
            steps: self.counters.step,
            epoch: self.epochs_done(),
            learning_rate: c.optimizer.lr,
            resolution: (c.dataset.resolution, c.dataset.resolution),
            num_train_images: self.data.plan.epoch_uses().0 as usize,
            dataset_dirs: super::plan::dataset_dirs(&self.data, false),
            tag_frequency: super::plan::tag_frequency(&self.data),
            extra,
        }
    }

    /// Stop on request: save the LoRA at this step and the state, so `--resume` continues.
    fn stop(&mut self) -> Result<(), Failure> {
        self.stopping = true;
        self.save_point(false)?;
        self.emit(Event::Phase {
            phase: Phase::Finished,
        });
        self.emit(Event::Finished {
            step: self.counters.step,
            stopped: true,
            lora: Some(self.out.step_lora(self.counters.step)),
            state: Some(self.out.state()),
        });
        Ok(())
    }

    fn finish(&mut self) -> Result<(), Failure> {
        let every = self.config.sampling.every_n_steps;
        if every > 0 && !self.counters.step.is_multiple_of(every) {
            self.sample()?;
        }
        self.save_point(true)?;
        self.emit(Event::Phase {
            phase: Phase::Finished,
        });
        self.emit(Event::Finished {
            step: self.counters.step,
            stopped: false,
            lora: Some(self.out.final_lora()),
            state: Some(self.out.state()),
        });
        Ok(())
    }
}

fn py_bool(b: bool) -> String {
    if b { "True" } else { "False" }.into()
}

/// The UNet with the adapters the config asks for (plus the text encoder's, when trained), the optimizer, and
/// the counters: restored from a state folder when resuming, else from `network.init_from` or fresh.
fn networks(
    config: &TrainConfig,
    files: &ModelFiles,
    dtype: DType,
    device: &Device,
    te_adapters: Option<Trainable>,
    options: &StartOptions,
) -> Result<(UNet, Trainable, Optimizer, Counters), Failure> {
    let unet_options = UNetOptions {
        recompute: config.training.recompute,
        attention_chunk: None,
    };
    let mut unet = UNet::load(
        files.unet(),
        &files.unet_config,
        unet_options,
        dtype,
        device,
    )
    .map_err(fail("loading the UNet", config))?;
    let mut trainable = attach_adapters(&mut unet, config)
        .map_err(fail("adding the adapters", config))?
        .under("unet");
    let mut groups = vec![Group {
        vars: trainable.vars_of("unet"),
        lr: config.optimizer.lr,
    }];
    if let Some(te) = te_adapters {
        trainable.adapters.extend(te.adapters);
        groups.push(Group {
            vars: trainable.vars_of("text_encoder"),
            lr: config.optimizer.lr_text_encoder,
        });
    }
    let mut opt = Optimizer::new(config.optimizer.kind, config.optimizer.params, groups);
    let counters = match &options.resume {
        Some(dir) => resume(dir, config, &trainable, &mut opt)?,
        None => {
            if let Some(init) = &config.network.init_from {
                init_from(init, &trainable).map_err(|e| {
                    Failure::new(
                        format!("Cannot start from {}: {e}", init.display()),
                        "Choose a LoRA trained on this model family with the same rank, or clear \
                         `network.init_from`.",
                    )
                })?;
            }
            Counters {
                step: 0,
                epoch: 0,
                batch_in_epoch: 0,
            }
        }
    };
    Ok((unet, trainable, opt, counters))
}

/// The adapters the config asks for on the UNet, initialised from the seed.
fn attach_adapters(unet: &mut UNet, config: &TrainConfig) -> candle_core::Result<Trainable> {
    let n = &config.network;
    let mut rng = ChaCha8Rng::seed_from_u64(config.training.seed);
    Trainable::attach(
        unet.layers_mut()?,
        |l| unet_slot(l, n.targets),
        (n.rank as usize, n.alpha),
        (n.conv_rank as usize, n.conv_alpha),
        n.dropout,
        &mut rng,
    )
}

/// The text encoder with an adapter on every attention projection and MLP layer (kohya's text-encoder targets),
/// initialised from the seed; the adapters' paths start with `text_encoder.`.
fn trained_text_encoder(
    files: &ModelFiles,
    config: &TrainConfig,
    dtype: DType,
    device: &Device,
) -> candle_core::Result<(TextEncoder, Trainable)> {
    let mut encoder = TextEncoder::new(
        files.text_encoder(),
        &files.text_encoder_config,
        dtype,
        device,
    )?;
    let n = &config.network;
    let mut rng = ChaCha8Rng::seed_from_u64(config.training.seed);
    rng.set_stream(1);
    let adapters = Trainable::attach(
        encoder.layers_mut(),
        |_| Some(crate::model::adapters::Slot::Linear),
        (n.rank as usize, n.alpha),
        (n.rank as usize, n.alpha),
        n.dropout,
        &mut rng,
    )?;
    Ok((encoder, adapters.under("text_encoder")))
}

/// Restores a state folder into the adapters and optimizer, after checking it is from the same network.
fn resume(
    dir: &std::path::Path,
    config: &TrainConfig,
    trainable: &Trainable,
    opt: &mut Optimizer,
) -> Result<Counters, Failure> {
    let hint = "Resume with the same network settings (rank, alpha, targets) the run started with, or start a new \
                run.";
    let (counters, saved) = state::load(dir, trainable, opt)
        .map_err(|e| Failure::new(format!("Cannot resume from {}: {e}", dir.display()), hint))?;
    let (a, b) = (&saved.network, &config.network);
    if (a.rank, a.targets, a.conv_rank) != (b.rank, b.targets, b.conv_rank) || a.alpha != b.alpha {
        return Err(Failure::new(
            format!(
                "The state in {} was trained with rank {} / alpha {} / targets {:?}, not rank {} / alpha {} / {:?}.",
                dir.display(),
                a.rank,
                a.alpha,
                a.targets,
                b.rank,
                b.alpha,
                b.targets
            ),
            hint,
        ));
    }
    Ok(counters)
}

/// Sets the adapters from an existing LoRA file (same rank; a different alpha is folded into `up`).
fn init_from(path: &std::path::Path, trainable: &Trainable) -> Result<(), String> {
    let known = trainable.adapters.iter().map(|(p, _)| p.clone()).collect();
    let (set, _) = crate::lora::load(path, &known).map_err(|e| e.to_string())?;
    let mut matched = 0;
    for (p, a) in &trainable.adapters {
        let Some(m) = set.modules.get(p) else {
            continue;
        };
        if m.rank() != a.rank() {
            return Err(format!(
                "its rank is {} but `network.rank` is {}",
                m.rank(),
                a.rank()
            ));
        }
        let to = |t: &Tensor| t.to_dtype(DType::F32)?.to_device(a.down.device());
        let fold = f64::from(m.alpha) / a.alpha;
        a.down
            .set(&to(&m.down).map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
        let up = to(&m.up)
            .and_then(|u| u.affine(fold, 0.0))
            .map_err(|e| e.to_string())?;
        a.up.set(&up).map_err(|e| e.to_string())?;
        matched += 1;
    }
    if matched == 0 {
        return Err("none of its modules matches the adapters of this run (another model family or targets)".into());
    }
    Ok(())
}

/// The adapter-dropout key of one micro-batch of one step (apart from the step's random stream, so that turning
/// dropout on changes nothing else).
fn dropout_key(seed: u64, step: u64, micro: usize) -> u64 {
    let mut rng = step_rng(seed ^ 0xd80c_0a7e_5eed_0001, step, micro);
    rng.random()
}

/// The random stream of one micro-batch of one step: timesteps, noise, latent samples and caption variations.
fn step_rng(seed: u64, step: u64, micro: usize) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(step.wrapping_mul(1024).wrapping_add(micro as u64 + 1));
    rng
}

fn randn(rng: &mut ChaCha8Rng, dims: &[usize], device: &Device) -> candle_core::Result<Tensor> {
    let n: usize = dims.iter().product();
    let v: Vec<f32> = (0..n).map(|_| StandardNormal.sample(rng)).collect();
    Tensor::from_vec(v, dims, device)
}
