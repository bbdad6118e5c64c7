//! Block-level recompute (gradient checkpointing), which candle lacks.
//!
//! Forward runs a block on detached inputs and keeps only its output; the block's activations are freed at
//! once. A custom op carries the gradient: its backward runs the block again on the saved inputs, back-propagates
//! the incoming gradient through it, returns the input gradients to the outer graph and parks the adapter
//! gradients in a `GradSink`, which the caller merges into the outer `GradStore` (`GradSink::backward`).

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor, TensorId, Var};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// A block as a function of (x, aux) — aux is the time embedding or the text context.
pub type BlockFn = Arc<dyn Fn(&Tensor, &Tensor) -> Result<Tensor> + Send + Sync>;

/// Adapter gradients produced inside recomputed blocks, waiting to be merged.
#[derive(Clone, Default)]
pub struct GradSink(Arc<Mutex<HashMap<TensorId, (Tensor, Tensor)>>>);

impl GradSink {
    fn add(&self, var: &Tensor, grad: &Tensor) -> Result<()> {
        let mut m = self.0.lock().expect("grad sink lock");
        match m.get_mut(&var.id()) {
            Some((_, g)) => *g = (&*g + grad)?,
            None => {
                m.insert(var.id(), (var.clone(), grad.clone()));
            }
        }
        Ok(())
    }

    /// `loss.backward()` plus the gradients of recomputed blocks: use this instead of `backward` on any loss
    /// computed through a network with recompute on.
    pub fn backward(&self, loss: &Tensor) -> Result<GradStore> {
        // Left over only by a backward that failed part-way: not this loss's.
        self.0.lock().expect("grad sink lock").clear();
        let mut grads = loss.backward()?;
        let parked: Vec<(Tensor, Tensor)> = self
            .0
            .lock()
            .expect("grad sink lock")
            .drain()
            .map(|(_, v)| v)
            .collect();
        for (var, g) in parked {
            let total = match grads.remove(&var) {
                Some(existing) => (existing + g)?,
                None => g,
            };
            grads.insert(&var, total);
        }
        Ok(grads)
    }
}

struct Recompute {
    f: BlockFn,
    y: super::handoff::Handoff,
    vars: Vec<Var>,
    aux_needs_grad: bool,
    sink: GradSink,
}

impl CustomOp2 for Recompute {
    fn name(&self) -> &'static str {
        "recompute"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.y.cpu()
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.y.cuda()
    }

    fn bwd(
        &self,
        x: &Tensor,
        aux: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        crate::device::trace(&format!("recompute backward in {:?}", x.dims()), x.device());
        let xv = Var::from_tensor(x)?;
        let av = if self.aux_needs_grad {
            Some(Var::from_tensor(aux)?)
        } else {
            None
        };
        let aux_in = av.as_ref().map_or(aux.clone(), |v| v.as_tensor().clone());
        let y = (self.f)(xv.as_tensor(), &aux_in)?;
        crate::device::trace("  recomputed forward", x.device());
        let grads = (y * g)?.sum_all()?.backward()?;
        crate::device::trace("  block backward done", x.device());
        for v in &self.vars {
            if let Some(gv) = grads.get(v) {
                self.sink.add(v.as_tensor(), gv)?;
            }
        }
        Ok((
            grads.get(&xv).cloned(),
            av.and_then(|v| grads.get(&v).cloned()),
        ))
    }
}

/// Runs `f(x, aux)` with recompute: only the output is kept; `vars` are the adapter weights inside the block.
pub fn checkpoint(
    f: BlockFn,
    x: &Tensor,
    aux: &Tensor,
    vars: Vec<Var>,
    sink: &GradSink,
) -> Result<Tensor> {
    let y = f(&x.detach(), &aux.detach())?.detach();
    let needs_graph = x.track_op() || aux.track_op() || !vars.is_empty();
    if !needs_graph {
        return Ok(y);
    }
    let op = Recompute {
        f,
        y: super::handoff::Handoff::new(y),
        vars,
        aux_needs_grad: aux.track_op(),
        sink: sink.clone(),
    };
    // The op must be recorded even when only the adapters inside need gradients: a variable-free input still
    // gets the op when we feed it through a variable-tracking tensor, so make x tracked if it is not.
    if x.track_op() || aux.track_op() {
        x.apply_op2(aux, op)
    } else {
        let anchor = Var::from_tensor(x)?;
        anchor.as_tensor().apply_op2(aux, op)
    }
}
