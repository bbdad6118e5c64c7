//! Multi-head attention for training without the score matrices in memory.
//!
//! Forward runs query chunk by query chunk and keeps only the output and each row's log-sum-exp; backward
//! recomputes each chunk's probabilities from them (the flash-attention recurrence, here with candle ops per
//! chunk rather than one fused kernel). candle's composite softmax would keep five score-sized intermediates per
//! layer for backward — gigabytes at SD's 4096-token level.

use candle_core::{CpuStorage, CustomOp3, D, DType, Layout, Result, Shape, Tensor};

/// Score-matrix elements (f32) one chunk may hold: 16 Mi ≈ 64 MB (backward holds about six such matrices).
const CHUNK_ELEMENTS: usize = 16 << 20;

/// q [B, Nq, C] attends over k, v [B, Nk, C] with `heads` heads; `chunk` caps the queries per chunk (else chosen
/// from `CHUNK_ELEMENTS`). Softmax in f32, matmuls in the inputs' dtype.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    chunk: Option<usize>,
) -> Result<Tensor> {
    let (b, nq, c) = q.dims3()?;
    let d = c / heads;
    let split = |t: &Tensor| -> Result<Tensor> {
        let n = t.dim(1)?;
        t.reshape((b, n, heads, d))?
            .transpose(1, 2)?
            .reshape((b * heads, n, d))?
            .contiguous()
    };
    let qs = split(&q.affine(1.0 / (d as f64).sqrt(), 0.0)?)?;
    let (ks, vs) = (split(k)?, split(v)?);
    let nk = ks.dim(1)?;
    let auto = (CHUNK_ELEMENTS / (b * heads * nk).max(1)).max(16);
    let step = chunk.filter(|c| *c > 0).unwrap_or(auto).min(nq);
    let (o, lse) = forward(&qs.detach(), &ks.detach(), &vs.detach(), step)?;
    let o = if qs.track_op() || ks.track_op() || vs.track_op() {
        qs.apply_op3(
            &ks,
            &vs,
            Attention {
                o: super::handoff::Handoff::new(o),
                lse,
                step,
            },
        )?
    } else {
        o
    };
    o.reshape((b, heads, nq, d))?
        .transpose(1, 2)?
        .reshape((b, nq, c))
}

/// Chunks of `step` queries along dim 1, as (start, len).
fn chunks(n: usize, step: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..n)
        .step_by(step.max(1))
        .map(move |s| (s, step.min(n - s)))
}

/// Output [BH, Nq, d] and log-sum-exp [BH, Nq, 1] (f32) of pre-scaled q over k, v.
fn forward(q: &Tensor, k: &Tensor, v: &Tensor, step: usize) -> Result<(Tensor, Tensor)> {
    let kt = k.t()?.contiguous()?;
    let (mut outs, mut lses) = (Vec::new(), Vec::new());
    for (start, len) in chunks(q.dim(1)?, step) {
        let s = q.narrow(1, start, len)?.matmul(&kt)?.to_dtype(DType::F32)?;
        let m = s.max_keepdim(D::Minus1)?;
        let e = s.broadcast_sub(&m)?.exp()?;
        let l = e.sum_keepdim(D::Minus1)?;
        outs.push(e.broadcast_div(&l)?.to_dtype(v.dtype())?.matmul(v)?);
        lses.push((m + l.log()?)?);
    }
    Ok((Tensor::cat(&outs, 1)?, Tensor::cat(&lses, 1)?))
}

struct Attention {
    o: super::handoff::Handoff,
    lse: Tensor,
    step: usize,
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "chunked-attention"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.o.cpu()
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.o.cuda()
    }

    /// dV = Pᵀ·dO, dP = dO·Vᵀ, dS = P ⊙ (dP − rowsum(dO ⊙ O)), dQ = dS·K, dK = dSᵀ·Q, chunk by chunk with P
    /// recomputed from the saved log-sum-exp.
    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // The inputs are graph nodes: computing from them would record every chunk's intermediates into the
        // returned gradients' graphs and keep them alive until those are consumed (gigabytes per layer).
        let (q, k, v, o) = (&q.detach(), &k.detach(), &v.detach(), &o.detach());
        let dt = q.dtype();
        let kt = k.t()?.contiguous()?;
        let vt = v.t()?.contiguous()?;
        let g = g.contiguous()?;
        let delta = (g.to_dtype(DType::F32)? * o.to_dtype(DType::F32)?)?.sum_keepdim(D::Minus1)?;
        let mut dk = k.zeros_like()?.to_dtype(DType::F32)?;
        let mut dv = v.zeros_like()?.to_dtype(DType::F32)?;
        let mut dqs = Vec::new();
        for (start, len) in chunks(q.dim(1)?, self.step) {
            let qc = q.narrow(1, start, len)?;
            let gc = g.narrow(1, start, len)?;
            let s = qc.matmul(&kt)?.to_dtype(DType::F32)?;
            let p = s.broadcast_sub(&self.lse.narrow(1, start, len)?)?.exp()?;
            let pd = p.to_dtype(dt)?;
            dv = (dv + pd.t()?.matmul(&gc)?.to_dtype(DType::F32)?)?;
            let dp = gc.matmul(&vt)?.to_dtype(DType::F32)?;
            let ds = (p * dp.broadcast_sub(&delta.narrow(1, start, len)?)?)?.to_dtype(dt)?;
            dqs.push(ds.matmul(k)?);
            dk = (dk + ds.t()?.matmul(&qc)?.to_dtype(DType::F32)?)?;
        }
        Ok((
            Some(Tensor::cat(&dqs, 1)?),
            Some(dk.to_dtype(dt)?),
            Some(dv.to_dtype(dt)?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Attention from candle's differentiable primitives, all at once: the reference.
    fn composite(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Result<Tensor> {
        let (b, nq, c) = q.dims3()?;
        let d = c / heads;
        let split = |t: &Tensor| -> Result<Tensor> {
            let n = t.dim(1)?;
            t.reshape((b, n, heads, d))?
                .transpose(1, 2)?
                .reshape((b * heads, n, d))
        };
        let s = split(&q.affine(1.0 / (d as f64).sqrt(), 0.0)?)?.matmul(&split(k)?.t()?)?;
        let p = candle_nn::ops::softmax(&s, D::Minus1)?;
        p.matmul(&split(v)?)?
            .reshape((b, heads, nq, d))?
            .transpose(1, 2)?
            .reshape((b, nq, c))
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
    fn values_and_gradients_match_the_composite() {
        let dev = Device::Cpu;
        let q = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 10, 8), &dev).unwrap()).unwrap();
        let k = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 7, 8), &dev).unwrap()).unwrap();
        let v = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 7, 8), &dev).unwrap()).unwrap();
        let w = Tensor::randn(0f32, 1.0, (2, 10, 8), &dev).unwrap();
        let reference = composite(&q, &k, &v, 2).unwrap();
        let g_ref = (&reference * &w)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for chunk in [None, Some(3), Some(1)] {
            let ours = attention(&q, &k, &v, 2, chunk).unwrap();
            assert!(max_diff(&ours, &reference) < 1e-5, "{chunk:?}");
            let g = (&ours * &w).unwrap().sum_all().unwrap().backward().unwrap();
            for (name, x) in [("q", &q), ("k", &k), ("v", &v)] {
                let err = max_diff(g.get(x).unwrap(), g_ref.get(x).unwrap());
                assert!(err < 1e-5, "d{name} differs by {err} with chunk {chunk:?}");
            }
        }
    }
}
