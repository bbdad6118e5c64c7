//! A training step captured once as a CUDA graph and replayed: at SD's batch sizes a step launches thousands
//! of small kernels and the host's per-launch work, not the GPU, sets the pace; a replay costs one launch.
//!
//! What a captured step may do: launch kernels and allocate and free device memory (the graph keeps its own
//! memory pool); everything that changes between steps must be read from device buffers at fixed addresses
//! (inputs, learning rate, loss scale) and all results written to such buffers. It may not copy from or to the
//! host: candle's cache of small uploads (`device::with_upload_cache`) must already hold every shape/stride
//! vector the step uploads, so the step runs once uncaptured first.

use super::optim::Optimizer;
use super::step::{LossInputs, LossOptions, loss_from};
use crate::model::fused;
use crate::model::unet::UNet;
use candle_core::cuda_backend::cudarc::driver::{CudaGraph, sys};
use candle_core::{DType, Device, Result, Tensor};

pub struct StepGraph {
    graph: CudaGraph,
}

impl StepGraph {
    /// Records `step` on `device`'s stream (nothing runs yet). An error inside `step` ends the capture and is
    /// returned.
    pub fn capture(device: &Device, step: impl FnOnce() -> Result<()>) -> Result<Self> {
        let stream = device.as_cuda_device()?.cuda_stream();
        device.synchronize()?;
        let mode = sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL;
        stream.begin_capture(mode).map_err(cuda_error)?;
        let ran = step();
        // Memory the graph allocates and does not free itself is released before the next replay.
        let flags = sys::CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH;
        let graph = stream.end_capture(flags).map_err(cuda_error);
        ran?;
        match graph? {
            Some(graph) => Ok(StepGraph { graph }),
            None => candle_core::bail!("CUDA graph capture recorded nothing"),
        }
    }

    /// Runs the recorded step once more (asynchronously, on the same stream).
    pub fn replay(&self) -> Result<()> {
        self.graph.launch().map_err(cuda_error)
    }
}

fn cuda_error(e: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(format!("CUDA graph: {e}"))
}

/// A training step (loss, backward, optimizer update) that runs uncaptured the first time, is captured the
/// second and replayed after that, with its inputs copied into buffers it owns. One per batch shape.
pub struct CapturedStep {
    latents: Tensor,
    context: Tensor,
    noise: Tensor,
    inputs: LossInputs,
    /// The loss multiplier (fp16 loss scaling), and the step's loss as computed (before scaling).
    loss_scale: Tensor,
    loss: Tensor,
    options: LossOptions,
    runs: usize,
    graph: Option<StepGraph>,
    /// Why capturing this step failed, if it did: it then runs launched from the host.
    capture_failed: Option<String>,
    capture_reported: bool,
}

/// One batch: latents [B,4,h,w], text context [B,N,C], noise like the latents and the per-sample inputs.
pub struct Batch<'a> {
    pub latents: &'a Tensor,
    pub context: &'a Tensor,
    pub noise: &'a Tensor,
    pub inputs: LossInputs,
}

/// How the optimizer steps: learning-rate factor, clipping norm and loss scale.
#[derive(Clone, Copy)]
pub struct StepSettings {
    pub lr_factor: f64,
    pub max_norm: f64,
    pub loss_scale: f64,
}

impl CapturedStep {
    /// Buffers shaped like `batch`.
    pub fn new(batch: Batch<'_>, options: LossOptions) -> Result<Self> {
        let device = batch.latents.device();
        Ok(CapturedStep {
            latents: batch.latents.copy()?,
            context: batch.context.copy()?,
            noise: batch.noise.copy()?,
            inputs: batch.inputs,
            loss_scale: Tensor::ones(1, DType::F32, device)?,
            loss: Tensor::zeros((), DType::F32, device)?,
            options,
            runs: 0,
            graph: None,
            capture_failed: None,
            capture_reported: false,
        })
    }

    /// Whether `batch` has the shapes these buffers were made for.
    pub fn fits(&self, batch: &Batch<'_>) -> bool {
        self.latents.shape() == batch.latents.shape()
            && self.context.shape() == batch.context.shape()
            && self.latents.dtype() == batch.latents.dtype()
            && self.context.dtype() == batch.context.dtype()
    }

    /// One step on `batch`: returns the loss and the (unscaled) gradient norm; when the norm is not finite the
    /// update was skipped.
    pub fn run(
        &mut self,
        unet: &UNet,
        opt: &mut Optimizer,
        batch: Batch<'_>,
        settings: StepSettings,
    ) -> Result<(f64, f64)> {
        self.latents.slice_set(batch.latents, 0, 0)?;
        self.context.slice_set(batch.context, 0, 0)?;
        self.noise.slice_set(batch.noise, 0, 0)?;
        self.inputs.copy_from(&batch.inputs)?;
        let scale = Tensor::new(&[settings.loss_scale as f32], self.loss.device())?;
        self.loss_scale.slice_set(&scale, 0, 0)?;
        opt.prepare_step(settings.lr_factor, settings.max_norm, settings.loss_scale)?;
        match (&self.graph, self.runs) {
            (Some(graph), _) => graph.replay()?,
            // The first run fills candle's upload cache and makes the optimizer's buffers.
            (None, 0) => self.launch(unet, opt)?,
            (None, _) if self.capture_failed.is_some() => self.launch(unet, opt)?,
            (None, _) => {
                let device = self.loss.device().clone();
                match StepGraph::capture(&device, || self.launch(unet, opt)) {
                    Ok(graph) => {
                        graph.replay()?;
                        self.graph = Some(graph);
                    }
                    // Nothing ran while capturing: the step runs launched instead, now and from now on.
                    Err(e) => {
                        self.capture_failed = Some(e.to_string());
                        self.launch(unet, opt)?;
                    }
                }
            }
        }
        self.runs += 1;
        let loss = f64::from(self.loss.to_scalar::<f32>()?);
        let norm = opt.finish_step()?;
        Ok((loss, norm))
    }

    /// Why the capture failed, the first time this is asked after it did.
    pub fn unreported_capture_error(&mut self) -> Option<String> {
        if self.capture_reported {
            return None;
        }
        self.capture_reported = self.capture_failed.is_some();
        self.capture_failed.clone()
    }

    /// The step's device work, from and into the buffers.
    fn launch(&self, unet: &UNet, opt: &Optimizer) -> Result<()> {
        crate::device::with_upload_cache(self.loss.device(), || {
            let (l, c, n) = (&self.latents, &self.context, &self.noise);
            let loss = loss_from(unet, self.options, l, c, n, &self.inputs)?;
            let grads = unet.backward(&loss.broadcast_mul(&self.loss_scale.reshape(())?)?)?;
            opt.launch_step(&grads)?;
            fused::fill(&self.loss, 0.0)?;
            fused::accumulate(&self.loss, &loss)
        })
    }
}

/// One step on `batch` with its kernels launched from the host (a batch shape without a captured step):
/// (loss, gradient norm), the norm NaN when the loss was not finite and nothing was updated.
pub fn launched_step(
    unet: &UNet,
    opt: &mut Optimizer,
    options: LossOptions,
    batch: Batch<'_>,
    settings: StepSettings,
) -> Result<(f64, f64)> {
    let (l, c, n) = (batch.latents, batch.context, batch.noise);
    let loss = loss_from(unet, options, l, c, n, &batch.inputs)?;
    let value = f64::from(loss.to_scalar::<f32>()?);
    if !value.is_finite() {
        return Ok((value, f64::NAN));
    }
    let grads = unet.backward(&loss.affine(settings.loss_scale, 0.0)?)?;
    let s = settings;
    let norm = opt.step(&grads, s.lr_factor, s.max_norm, s.loss_scale)?;
    Ok((value, norm))
}
