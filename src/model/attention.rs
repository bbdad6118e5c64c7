//! Multi-head attention for training without the score matrices in memory.
//!
//! Forward keeps only the output and each row's log-sum-exp; backward recomputes the probabilities from them (the
//! flash-attention recurrence). On a GPU with f16/bf16 heads that is one fused tensor-core kernel each way
//! (`fused::flash_forward`/`flash_backward`: no score matrix in memory at all); elsewhere it runs query chunk by
//! query chunk with candle ops. candle's composite softmax would keep five score-sized intermediates per layer for
//! backward — gigabytes at SD's 4096-token level.

use candle_core::{CpuStorage, CustomOp3, D, DType, Layout, Result, Shape, Tensor};

/// Score-matrix elements one chunk may hold: 8 Mi (backward holds four such matrices, ≈ 64 MB in bf16).
const CHUNK_ELEMENTS: usize = 8 << 20;

/// q [B, Nq, C] attends over k, v [B, Nk, C] with `heads` heads; `chunk` caps the queries per chunk (else chosen
/// from `CHUNK_ELEMENTS`). Softmax in f32, matmuls in the inputs' dtype. In a graph this is a single node: the
/// head split, scaling and merge happen inside it (as graph nodes they cost more launches in backward than the
/// attention itself at SD's batch sizes).
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    chunk: Option<usize>,
) -> Result<Tensor> {
    let (b, nq, _) = q.dims3()?;
    let heads = Heads { batch: b, heads };
    let (q0, k0, v0) = (q.detach(), k.detach(), v.detach());
    let (o, lse, step) = match flash_forward((&q0, &k0, &v0), heads.heads)? {
        Some((o, lse)) => (o, lse, None),
        None => {
            let (qs, ks, vs) = heads.split_all(&q0, &k0, &v0)?;
            let auto = (CHUNK_ELEMENTS / (qs.dim(0)? * ks.dim(1)?).max(1)).max(16);
            let step = chunk.filter(|c| *c > 0).unwrap_or(auto).min(nq);
            let (o, lse) = forward(&qs, &ks, &vs, step)?;
            (heads.merge(&o)?, lse, Some(step))
        }
    };
    if !(q.track_op() || k.track_op() || v.track_op()) {
        return Ok(o);
    }
    let op = Attention {
        o: super::handoff::Handoff::new(o),
        lse,
        step,
        heads,
    };
    q.apply_op3(k, v, op)
}

/// Output and per-head log-sum-exp by our flash kernels, where they cover these heads (CUDA, f16/bf16, head dim
/// even and ≤ 160).
fn flash_forward(
    qkv: (&Tensor, &Tensor, &Tensor),
    heads: usize,
) -> Result<Option<(Tensor, Tensor)>> {
    #[cfg(feature = "cuda")]
    if super::fused::flash_covers(qkv.0, heads) {
        return super::fused::flash_forward(qkv, heads).map(Some);
    }
    let _ = (qkv, heads);
    Ok(None)
}

/// (dq, dk, dv) by our flash kernels, for a forward that `flash_forward` ran.
fn flash_backward(
    qkv: (&Tensor, &Tensor, &Tensor),
    o: &Tensor,
    g: &Tensor,
    lse: &Tensor,
    heads: usize,
) -> Result<(Tensor, Tensor, Tensor)> {
    #[cfg(feature = "cuda")]
    return super::fused::flash_backward(qkv, o, g, lse, heads);
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (qkv, o, g, lse, heads);
        candle_core::bail!("flash attention runs only in a CUDA build")
    }
}

/// The head layout: [B, N, H·d] ↔ [B·H, N, d].
#[derive(Clone, Copy)]
struct Heads {
    batch: usize,
    heads: usize,
}

impl Heads {
    fn split(&self, t: &Tensor) -> Result<Tensor> {
        let (b, n, c) = t.dims3()?;
        t.reshape((b, n, self.heads, c / self.heads))?
            .transpose(1, 2)?
            .reshape((b * self.heads, n, c / self.heads))?
            .contiguous()
    }

    fn merge(&self, t: &Tensor) -> Result<Tensor> {
        let (_, n, d) = t.dims3()?;
        t.reshape((self.batch, self.heads, n, d))?
            .transpose(1, 2)?
            .reshape((self.batch, n, self.heads * d))
    }

    /// q scaled by 1/√d, k and v, each split into heads.
    fn split_all(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let q = q.affine(self.scale(q)?, 0.0)?;
        Ok((self.split(&q)?, self.split(k)?, self.split(v)?))
    }

    fn scale(&self, q: &Tensor) -> Result<f64> {
        Ok(1.0 / ((q.dim(2)? / self.heads) as f64).sqrt())
    }
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
        let (p, lse) = softmax(&q.narrow(1, start, len)?.matmul(&kt)?)?;
        outs.push(p.matmul(v)?);
        lses.push(lse);
    }
    Ok((Tensor::cat(&outs, 1)?, Tensor::cat(&lses, 1)?))
}

/// Row softmax of scores (in f32) as probabilities in the scores' dtype, and each row's log-sum-exp.
fn softmax(s: &Tensor) -> Result<(Tensor, Tensor)> {
    #[cfg(feature = "cuda")]
    if super::fused::on(s.device()) {
        return super::fused::softmax_forward(s);
    }
    let s32 = s.to_dtype(DType::F32)?;
    let m = s32.max_keepdim(D::Minus1)?;
    let e = s32.broadcast_sub(&m)?.exp()?;
    let l = e.sum_keepdim(D::Minus1)?;
    Ok((e.broadcast_div(&l)?.to_dtype(s.dtype())?, (m + l.log()?)?))
}

/// Backward through the softmax of scores `s` given dP and the rows' log-sum-exp and delta: P and
/// dS = P ⊙ (dP − delta), both in the scores' dtype.
fn softmax_backward(
    s: &Tensor,
    dp: &Tensor,
    lse: &Tensor,
    delta: &Tensor,
) -> Result<(Tensor, Tensor)> {
    #[cfg(feature = "cuda")]
    if super::fused::on(s.device()) {
        return super::fused::softmax_backward(s, dp, lse, delta);
    }
    let p = s.to_dtype(DType::F32)?.broadcast_sub(lse)?.exp()?;
    let ds = (&p * dp.to_dtype(DType::F32)?.broadcast_sub(delta)?)?;
    Ok((p.to_dtype(s.dtype())?, ds.to_dtype(s.dtype())?))
}

/// rowsum(a ⊙ b) in f32, keeping the last dimension as 1.
fn row_dot(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if super::fused::on(a.device()) {
        return super::fused::row_dot(a, b);
    }
    (a.to_dtype(DType::F32)? * b.to_dtype(DType::F32)?)?.sum_keepdim(D::Minus1)
}

/// `acc + x` for an f32 accumulator `acc` (in place on the GPU, where `acc` is ours alone).
fn accumulate(acc: Tensor, x: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if super::fused::on(x.device()) {
        super::fused::accumulate(&acc, x)?;
        return Ok(acc);
    }
    acc + x.to_dtype(DType::F32)?
}

struct Attention {
    o: super::handoff::Handoff,
    /// Log-sum-exp per query: [B, Nq, heads] from the flash kernels, [B·heads, Nq, 1] from the chunks.
    lse: Tensor,
    /// Queries per chunk, or None where the forward ran as flash attention.
    step: Option<usize>,
    heads: Heads,
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

    /// dV = Pᵀ·dO, dP = dO·Vᵀ, dS = P ⊙ (dP − rowsum(dO ⊙ O)), dQ = dS·K, dK = dSᵀ·Q, with P recomputed from
    /// the saved log-sum-exp (by the flash kernels, or chunk by chunk).
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
        let h = self.heads;
        let (q, k, v, o) = (q.detach(), k.detach(), v.detach(), o.detach());
        let Some(step) = self.step else {
            let (dq, dk, dv) = flash_backward((&q, &k, &v), &o, g, &self.lse, h.heads)?;
            return Ok((Some(dq), Some(dk), Some(dv)));
        };
        let (q, k, v) = h.split_all(&q, &k, &v)?;
        let (o, g) = (h.split(&o)?, h.split(g)?);
        let delta = row_dot(&g, &o)?;
        let (dq, dk, dv) = self.chunked_backward((&q, &k, &v), &g, &delta, step)?;
        let dq = h.merge(&dq)?;
        Ok((
            Some(dq.affine(h.scale(&dq)?, 0.0)?),
            Some(h.merge(&dk)?),
            Some(h.merge(&dv)?),
        ))
    }
}

impl Attention {
    /// dq (for the pre-scaled q), dk, dv in the heads' layout, chunk by chunk.
    fn chunked_backward(
        &self,
        (q, k, v): (&Tensor, &Tensor, &Tensor),
        g: &Tensor,
        delta: &Tensor,
        step: usize,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let kt = k.t()?.contiguous()?;
        let vt = v.t()?.contiguous()?;
        let mut dk = Tensor::zeros(k.shape(), DType::F32, k.device())?;
        let mut dv = Tensor::zeros(v.shape(), DType::F32, v.device())?;
        let mut dqs = Vec::new();
        for (start, len) in chunks(q.dim(1)?, step) {
            let qc = q.narrow(1, start, len)?;
            let gc = g.narrow(1, start, len)?;
            let (p, ds) = softmax_backward(
                &qc.matmul(&kt)?,
                &gc.matmul(&vt)?,
                &self.lse.narrow(1, start, len)?,
                &delta.narrow(1, start, len)?,
            )?;
            dv = accumulate(dv, &p.t()?.matmul(&gc)?)?;
            dqs.push(ds.matmul(k)?);
            dk = accumulate(dk, &ds.t()?.matmul(&qc)?)?;
        }
        let dt = q.dtype();
        Ok((Tensor::cat(&dqs, 1)?, dk.to_dtype(dt)?, dv.to_dtype(dt)?))
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
