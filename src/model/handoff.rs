//! Results computed outside the autograd graph and handed to a custom op that carries their gradient.
//!
//! candle's custom ops must produce their output from raw storage. Our gradient-carrying ops (frozen conv,
//! recompute, chunked attention) compute the output with ordinary tensor ops first; the op's forward then copies
//! it out once and releases it, so the graph does not also keep the original.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Layout, Result, Shape, Storage, Tensor};
use std::sync::Mutex;

pub struct Handoff(Mutex<Option<Tensor>>);

impl Handoff {
    pub fn new(t: Tensor) -> Self {
        Handoff(Mutex::new(Some(t)))
    }

    fn take(&self) -> Result<Tensor> {
        let t = self.0.lock().expect("handoff lock").take();
        t.ok_or_else(|| candle_core::Error::Msg("a custom op ran its forward twice".into()))
    }

    fn copy<S: BackendStorage>(s: &S, l: &Layout) -> Result<(S, Shape)> {
        Ok((s.try_clone(l)?, l.shape().clone()))
    }

    /// The output for a CPU forward.
    pub fn cpu(&self) -> Result<(CpuStorage, Shape)> {
        let t = self.take()?;
        let (s, l) = t.storage_and_layout();
        match &*s {
            Storage::Cpu(c) => Self::copy(c, l),
            _ => candle_core::bail!("custom op: result on another device than its inputs"),
        }
    }

    /// The output for a CUDA forward.
    #[cfg(feature = "cuda")]
    pub fn cuda(&self) -> Result<(candle_core::CudaStorage, Shape)> {
        let t = self.take()?;
        let (s, l) = t.storage_and_layout();
        match &*s {
            Storage::Cuda(c) => Self::copy(c, l),
            _ => candle_core::bail!("custom op: result on another device than its inputs"),
        }
    }
}

/// The `cpu_fwd` and `cuda_fwd` of a one-input custom op whose output is the `Handoff` in `self.$field`.
macro_rules! forward_from_handoff {
    ($field:tt) => {
        fn cpu_fwd(
            &self,
            _s: &candle_core::CpuStorage,
            _l: &candle_core::Layout,
        ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
            self.$field.cpu()
        }

        #[cfg(feature = "cuda")]
        fn cuda_fwd(
            &self,
            _s: &candle_core::CudaStorage,
            _l: &candle_core::Layout,
        ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
            self.$field.cuda()
        }
    };
}
pub(crate) use forward_from_handoff;
