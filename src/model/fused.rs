//! Our fused CUDA kernels (`kernels/train.cu`): each does in one launch and one pass over memory what a chain of
//! candle ops did in 10–20 (norms, attention softmax, AdamW), or what a candle op did several times slower (the
//! conv's im2col and output reorder). Fewer launches mattered most while steps were launched from the host;
//! fewer passes matter in a replayed step (`train::graph`). Inputs must be contiguous; arithmetic is f32 whatever
//! the element type. The CPU keeps the composite forms (the reference `bench kernels` checks the kernels against).

use super::layers::NormShape;
use candle_core::cuda_backend::cudarc::driver::{DevicePtr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDevice, CudaStorageSlice};
use candle_core::{DType, Device, Result, Shape, Storage, Tensor};
use std::sync::atomic::{AtomicBool, Ordering};

/// A PTX module of ours: its name for the driver and its text.
type Module = (&'static str, &'static str);
const TRAIN: Module = (
    "lora_studio_train",
    include_str!(concat!(env!("OUT_DIR"), "/train.ptx")),
);
/// Flash attention, a module of its own so that its JIT (~4 s on a first run) happens only where it is used.
const ATTENTION: Module = (
    "lora_studio_attention",
    include_str!(concat!(env!("OUT_DIR"), "/attention.ptx")),
);

/// Off with `LORA_STUDIO_FUSED=0`: the composite forms then run on the GPU too (to compare speed or results).
static DISABLED: std::sync::LazyLock<AtomicBool> = std::sync::LazyLock::new(|| {
    AtomicBool::new(std::env::var("LORA_STUDIO_FUSED").is_ok_and(|v| v == "0"))
});

/// Flash attention off with `LORA_STUDIO_FLASH=0`: attention then runs chunk by chunk (with the fused softmax).
static FLASH_DISABLED: std::sync::LazyLock<AtomicBool> = std::sync::LazyLock::new(|| {
    AtomicBool::new(std::env::var("LORA_STUDIO_FLASH").is_ok_and(|v| v == "0"))
});

/// Whether ops on `device` use the fused kernels.
pub fn on(device: &Device) -> bool {
    device.is_cuda() && !DISABLED.load(Ordering::Relaxed)
}

/// Turns the fused kernels off or on for the whole process (benchmarks compare both).
pub fn set_enabled(enabled: bool) {
    DISABLED.store(!enabled, Ordering::Relaxed);
}

/// Turns flash attention off or on for the whole process (benchmarks compare it with the chunked form).
pub fn set_flash(enabled: bool) {
    FLASH_DISABLED.store(!enabled, Ordering::Relaxed);
}

/// The padded head dims our flash kernels are built for (kernels/attention.cu: FLASH_DIMS).
const FLASH_DIMS: [usize; 5] = [48, 64, 80, 128, 160];

/// The flash kernels' tensor-core instructions exist from compute capability 8.0 (Ampere) on.
const FLASH_MIN_CAP: u32 = 80;

/// The padded head dim of flash attention over q [B, N, C] split into `heads` heads, where our kernels cover
/// it: f16/bf16, head dim even and ≤ 160, a build for Ampere or newer, and flash not turned off.
fn flash_dim(q: &Tensor, heads: usize) -> Option<usize> {
    let built_cap: u32 = env!("LORA_STUDIO_CUDA_CAP").parse().unwrap_or(0);
    let c = q.dim(candle_core::D::Minus1).ok()?;
    let d = c / heads.max(1);
    let usable = on(q.device())
        && !FLASH_DISABLED.load(Ordering::Relaxed)
        && built_cap >= FLASH_MIN_CAP
        && matches!(q.dtype(), DType::BF16 | DType::F16)
        && d * heads == c
        && d.is_multiple_of(2);
    usable.then(|| FLASH_DIMS.into_iter().find(|&p| d <= p))?
}

/// Whether `flash_forward` and `flash_backward` take q split into `heads` heads.
pub fn flash_covers(q: &Tensor, heads: usize) -> bool {
    flash_dim(q, heads).is_some()
}

#[derive(Clone, Copy)]
enum Arg {
    Ptr(u64),
    I32(i32),
    F32(f32),
    Size(usize),
}

/// The device address of a contiguous tensor's first element.
fn ptr(t: &Tensor) -> Result<Arg> {
    let (s, l) = t.storage_and_layout();
    let Storage::Cuda(c) = &*s else {
        candle_core::bail!("fused kernel: a tensor is not on the GPU")
    };
    let Some((start, _)) = l.contiguous_offsets() else {
        candle_core::bail!("fused kernel: a tensor is not contiguous")
    };
    let stream = c.device.cuda_stream();
    let base = match &c.slice {
        CudaStorageSlice::F32(s) => s.device_ptr(&stream).0,
        CudaStorageSlice::BF16(s) => s.device_ptr(&stream).0,
        CudaStorageSlice::F16(s) => s.device_ptr(&stream).0,
        _ => candle_core::bail!("fused kernel: unsupported dtype {:?}", t.dtype()),
    };
    Ok(Arg::Ptr(base + (start * t.dtype().size_in_bytes()) as u64))
}

fn cuda(t: &Tensor) -> Result<&CudaDevice> {
    t.device().as_cuda_device()
}

fn suffix(dtype: DType) -> Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        dt => candle_core::bail!("fused kernel: unsupported dtype {dt:?}"),
    })
}

/// Launches `name` (the dtype suffix already added) on `grid` blocks of `block` threads.
fn launch(dev: &CudaDevice, name: &str, grid: usize, block: u32, args: &[Arg]) -> Result<()> {
    launch_config(dev, TRAIN, name, (grid.max(1) as u32, 1, 1), block, args)
}

/// Launches `name` on a (x, y) grid of 256-thread blocks.
fn launch_2d(dev: &CudaDevice, name: &str, (x, y): (usize, usize), args: &[Arg]) -> Result<()> {
    launch_config(dev, TRAIN, name, (x.max(1) as u32, y as u32, 1), 256, args)
}

fn launch_config(
    dev: &CudaDevice,
    (module, ptx): Module,
    name: &str,
    grid_dim: (u32, u32, u32),
    block: u32,
    args: &[Arg],
) -> Result<()> {
    let func = dev.get_or_load_custom_func(name, module, ptx)?;
    let mut b = func.builder();
    for a in args {
        match a {
            Arg::Ptr(p) => b.arg(p),
            Arg::I32(v) => b.arg(v),
            Arg::F32(v) => b.arg(v),
            Arg::Size(v) => b.arg(v),
        };
    }
    let cfg = LaunchConfig {
        grid_dim,
        block_dim: (block, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: the arguments match the kernel's signature in kernels/train.cu, and every pointer is a live,
    // contiguous device buffer of the element count the kernel is told.
    unsafe { b.launch(cfg) }
        .map_err(|e| candle_core::Error::Msg(format!("fused kernel {name}: {e}")))?;
    Ok(())
}

/// Blocks for a grid-stride loop over `n` elements.
fn grid_for(n: usize) -> usize {
    n.div_ceil(256).clamp(1, 65_535)
}

/// Threads per block for a reduction over rows of `n` elements.
fn block_for(n: usize) -> u32 {
    if n >= 4096 {
        512
    } else if n >= 512 {
        256
    } else {
        64
    }
}

/// # Safety
/// Uninitialised: every element must be written by the kernel the tensor is handed to.
unsafe fn output(shape: impl Into<Shape>, dtype: DType, device: &Device) -> Result<Tensor> {
    unsafe { Tensor::empty(shape, dtype, device) }
}

/// y = normalised rows · w + b, and each row's mean and 1/σ ([rows, 1], f32).
pub fn norm_forward(
    x: &Tensor,
    (w, b): (&Tensor, &Tensor),
    s: NormShape,
    eps: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    let x = x.contiguous()?;
    let n = x.elem_count() / s.rows;
    let y = unsafe { output(x.shape(), x.dtype(), x.device())? };
    let mean = unsafe { output((s.rows, 1), DType::F32, x.device())? };
    let rstd = unsafe { output((s.rows, 1), DType::F32, x.device())? };
    let name = format!("norm_fwd_{}", suffix(x.dtype())?);
    let args = [
        ptr(&x)?,
        ptr(&y)?,
        ptr(&mean)?,
        ptr(&rstd)?,
        ptr(&w.contiguous()?)?,
        ptr(&b.contiguous()?)?,
        Arg::I32(n as i32),
        Arg::I32(s.inner as i32),
        Arg::I32(s.channels as i32),
        Arg::F32(eps as f32),
    ];
    launch(cuda(&x)?, &name, s.rows, block_for(n), &args)?;
    Ok((y, mean, rstd))
}

/// The input gradient of `norm_forward` from the output gradient `g`.
pub fn norm_backward(
    x: &Tensor,
    g: &Tensor,
    (mean, rstd): (&Tensor, &Tensor),
    w: &Tensor,
    s: NormShape,
) -> Result<Tensor> {
    let (x, g) = (x.contiguous()?, g.to_dtype(x.dtype())?.contiguous()?);
    let n = x.elem_count() / s.rows;
    let dx = unsafe { output(x.shape(), x.dtype(), x.device())? };
    let name = format!("norm_bwd_{}", suffix(x.dtype())?);
    let args = [
        ptr(&x)?,
        ptr(&g)?,
        ptr(&dx)?,
        ptr(mean)?,
        ptr(rstd)?,
        ptr(&w.contiguous()?)?,
        Arg::I32(n as i32),
        Arg::I32(s.inner as i32),
        Arg::I32(s.channels as i32),
    ];
    launch(cuda(&x)?, &name, s.rows, block_for(n), &args)?;
    Ok(dx)
}

/// Softmax over the last dimension of attention scores `s` [.., n]: probabilities (s's dtype) and each row's
/// log-sum-exp ([.., 1], f32).
pub fn softmax_forward(s: &Tensor) -> Result<(Tensor, Tensor)> {
    let s = s.contiguous()?;
    let dims = s.dims();
    let n = dims[dims.len() - 1];
    let rows = s.elem_count() / n;
    let p = unsafe { output(s.shape(), s.dtype(), s.device())? };
    let mut lse_shape = dims.to_vec();
    *lse_shape.last_mut().expect("scores have a key dimension") = 1;
    let lse = unsafe { output(lse_shape, DType::F32, s.device())? };
    let name = format!("softmax_fwd_{}", suffix(s.dtype())?);
    let args = [ptr(&s)?, ptr(&p)?, ptr(&lse)?, Arg::I32(n as i32)];
    launch(cuda(&s)?, &name, rows, block_for(n), &args)?;
    Ok((p, lse))
}

/// Backward through attention's softmax from scores `s`, dP = dO·Vᵀ and the rows' log-sum-exp and
/// delta = rowsum(dO ⊙ O): the probabilities P and dS = P ⊙ (dP − delta), both in s's dtype.
pub fn softmax_backward(
    s: &Tensor,
    dp: &Tensor,
    lse: &Tensor,
    delta: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let (s, dp) = (s.contiguous()?, dp.contiguous()?);
    let n = s.dim(candle_core::D::Minus1)?;
    let total = s.elem_count();
    let p = unsafe { output(s.shape(), s.dtype(), s.device())? };
    let ds = unsafe { output(s.shape(), s.dtype(), s.device())? };
    let name = format!("softmax_bwd_{}", suffix(s.dtype())?);
    let args = [
        ptr(&s)?,
        ptr(&dp)?,
        ptr(&lse.contiguous()?)?,
        ptr(&delta.contiguous()?)?,
        ptr(&p)?,
        ptr(&ds)?,
        Arg::Size(total),
        Arg::I32(n as i32),
    ];
    launch(cuda(&s)?, &name, grid_for(total), 256, &args)?;
    Ok((p, ds))
}

/// Σ a·b over the last dimension, in f32, keeping that dimension as 1.
pub fn row_dot(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (a, b) = (a.contiguous()?, b.contiguous()?);
    let dims = a.dims();
    let n = dims[dims.len() - 1];
    let rows = a.elem_count() / n;
    let mut out_shape = dims.to_vec();
    *out_shape.last_mut().expect("rows have a last dimension") = 1;
    let out = unsafe { output(out_shape, DType::F32, a.device())? };
    let name = format!("row_dot_{}", suffix(a.dtype())?);
    let args = [
        ptr(&a)?,
        ptr(&b)?,
        ptr(&out)?,
        Arg::I32(rows as i32),
        Arg::I32(n as i32),
    ];
    // Eight rows (warps) per block.
    launch(cuda(&a)?, &name, rows.div_ceil(8), 256, &args)?;
    Ok(out)
}

/// `acc += x` in place; `acc` is a contiguous f32 tensor that no other tensor shares.
pub fn accumulate(acc: &Tensor, x: &Tensor) -> Result<()> {
    let x = x.contiguous()?;
    let n = x.elem_count();
    let name = format!("acc_add_{}", suffix(x.dtype())?);
    let args = [ptr(acc)?, ptr(&x)?, Arg::Size(n)];
    launch(cuda(&x)?, &name, grid_for(n), 256, &args)
}

/// `acc += Σ x²` into the one-element f32 tensor `acc`.
pub fn add_sum_of_squares(x: &Tensor, acc: &Tensor) -> Result<()> {
    let x = x.contiguous()?;
    let n = x.elem_count();
    let name = format!("sum_squares_{}", suffix(x.dtype())?);
    let args = [ptr(&x)?, ptr(acc)?, Arg::Size(n)];
    launch(cuda(&x)?, &name, grid_for(n).min(1024), 256, &args)
}

/// One AdamW update of the f32 parameter `p` and its moments `m`, `v`, all in place, from gradient `g`, with the
/// global Σ g² in `sumsq` and the group's hyper-parameters in `hyper` (both device tensors; see
/// `adamw_f32` in kernels/train.cu for the layout).
pub fn adamw(
    p: &Tensor,
    g: &Tensor,
    (m, v): (&Tensor, &Tensor),
    sumsq: &Tensor,
    hyper: &Tensor,
) -> Result<()> {
    let g = g.to_dtype(DType::F32)?.contiguous()?;
    let n = p.elem_count();
    let args = [
        ptr(p)?,
        ptr(&g)?,
        ptr(m)?,
        ptr(v)?,
        Arg::Size(n),
        ptr(sumsq)?,
        ptr(hyper)?,
    ];
    launch(cuda(p)?, "adamw_f32", grid_for(n), 256, &args)
}

/// A 2-D convolution of x [B, C, H, W] with w [N, C, kh, kw] plus an optional per-channel bias (no dilation, no
/// groups) as our im2col, one cuBLAS matmul and one pass that reorders the output and adds the bias. candle's
/// CUDA conv2d is the same plan, but its im2col, output transpose and bias add each took longer than the matmul
/// (Nsight Compute, SD's 64×64 convs at batch 4: 448, 80 and 28–126 µs against 51 µs).
pub fn conv2d(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    padding: usize,
    stride: usize,
) -> Result<Tensor> {
    let (b, c, h, wd) = x.dims4()?;
    let (n, _, kh, kw) = w.dims4()?;
    let (oh, ow) = (
        (h + 2 * padding - kh) / stride + 1,
        (wd + 2 * padding - kw) / stride + 1,
    );
    let x = x.contiguous()?;
    let rows = c * kh * kw;
    let col = if kh == 1 && kw == 1 && stride == 1 && padding == 0 {
        // A 1×1 conv's columns are the input itself, channel-major.
        x.reshape((b, c, h * wd))?.transpose(0, 1)?.contiguous()?
    } else {
        if rows * b * oh * ow >= i32::MAX as usize || c > 65_535 {
            // Past our kernel's 32-bit indexes and grid rows: candle's conv.
            let y = x.conv2d(w, padding, stride, 1, 1)?;
            return match bias {
                Some(bias) => y.broadcast_add(&bias.reshape((1, (), 1, 1))?),
                None => Ok(y),
            };
        }
        let col = unsafe { output((rows, b * oh * ow), x.dtype(), x.device())? };
        let args = [
            ptr(&x)?,
            ptr(&col)?,
            Arg::I32(b as i32),
            Arg::I32(c as i32),
            Arg::I32(h as i32),
            Arg::I32(wd as i32),
            Arg::I32(kh as i32),
            Arg::I32(kw as i32),
            Arg::I32(stride as i32),
            Arg::I32(padding as i32),
            Arg::I32(oh as i32),
            Arg::I32(ow as i32),
        ];
        let name = format!("im2col_{}", suffix(x.dtype())?);
        launch_2d(cuda(&x)?, &name, (grid_for(b * oh * ow), c), &args)?;
        col
    };
    let y = w
        .reshape((n, rows))?
        .matmul(&col.reshape((rows, b * oh * ow))?)?;
    if b == 1 && bias.is_none() {
        return y.reshape((1, n, oh, ow));
    }
    let out = unsafe { output((b, n, oh, ow), y.dtype(), y.device())? };
    let bias = bias.map(|t| t.to_dtype(DType::F32)).transpose()?;
    let args = [
        ptr(&y)?,
        bias.as_ref().map_or(Ok(Arg::Ptr(0)), ptr)?,
        ptr(&out)?,
        Arg::I32(n as i32),
        Arg::I32(b as i32),
        Arg::I32((oh * ow) as i32),
    ];
    let name = format!("conv_output_{}", suffix(y.dtype())?);
    launch(cuda(&y)?, &name, grid_for(out.elem_count()), 256, &args)?;
    Ok(out)
}

/// GEGLU of p [.., 2F] (value and gate side by side): value · gelu(gate), exact GELU, as [.., F].
pub fn geglu_forward(p: &Tensor) -> Result<Tensor> {
    let p = p.contiguous()?;
    let mut dims = p.dims().to_vec();
    let last = dims.last_mut().expect("GEGLU input has a last dimension");
    *last /= 2;
    let f = *last;
    let out = unsafe { output(dims, p.dtype(), p.device())? };
    let total = out.elem_count();
    let args = [ptr(&p)?, ptr(&out)?, Arg::Size(total), Arg::I32(f as i32)];
    let name = format!("geglu_fwd_{}", suffix(p.dtype())?);
    launch(cuda(&p)?, &name, grid_for(total), 256, &args)?;
    Ok(out)
}

/// The gradient of `geglu_forward` with respect to p, from the output gradient g.
pub fn geglu_backward(p: &Tensor, g: &Tensor) -> Result<Tensor> {
    let (p, g) = (p.contiguous()?, g.to_dtype(p.dtype())?.contiguous()?);
    let dp = unsafe { output(p.shape(), p.dtype(), p.device())? };
    let total = g.elem_count();
    let f = g.dim(candle_core::D::Minus1)?;
    let args = [
        ptr(&p)?,
        ptr(&g)?,
        ptr(&dp)?,
        Arg::Size(total),
        Arg::I32(f as i32),
    ];
    let name = format!("geglu_bwd_{}", suffix(p.dtype())?);
    launch(cuda(&p)?, &name, grid_for(total), 256, &args)?;
    Ok(dp)
}

/// `y += b` over y's rows, in place: y is a contiguous tensor no other tensor shares (a matmul's fresh output),
/// b has y's last dimension.
pub fn add_bias(y: &Tensor, b: &Tensor) -> Result<()> {
    let b = b.to_dtype(y.dtype())?.contiguous()?;
    let total = y.elem_count();
    let args = [
        ptr(y)?,
        ptr(&b)?,
        Arg::Size(total),
        Arg::I32(b.elem_count() as i32),
    ];
    let name = format!("add_bias_{}", suffix(y.dtype())?);
    launch(cuda(y)?, &name, grid_for(total), 256, &args)
}

/// Sets every element of the contiguous f32 tensor `x` to `value`, in place.
pub fn fill(x: &Tensor, value: f32) -> Result<()> {
    let n = x.elem_count();
    let args = [ptr(x)?, Arg::F32(value), Arg::Size(n)];
    launch(cuda(x)?, "fill_f32", grid_for(n), 256, &args)
}

/// Rows (queries or keys) of one flash-attention block: 4 warps of 16.
const FLASH_ROWS: usize = 64;

/// A flash kernel's operand: contiguous, and at a fresh allocation when its start is not 16-byte aligned (the
/// kernels copy 16 bytes at a time).
fn flash_operand(t: &Tensor) -> Result<Tensor> {
    let t = t.contiguous()?;
    match ptr(&t)? {
        Arg::Ptr(p) if !p.is_multiple_of(16) => t.copy(),
        _ => Ok(t),
    }
}

/// Launches flash kernel `kernel` for q [B, Nq, C] in `heads` heads, a block per 64 `rows` of each head.
fn launch_flash(q: &Tensor, heads: usize, kernel: &str, rows: usize, args: &[Arg]) -> Result<()> {
    let Some(dp) = flash_dim(q, heads) else {
        candle_core::bail!(
            "flash attention does not cover {:?} in {heads} heads",
            q.dims()
        )
    };
    let name = format!("{kernel}_{}_{dp}", suffix(q.dtype())?);
    let grid = (
        rows.div_ceil(FLASH_ROWS) as u32,
        (q.dim(0)? * heads) as u32,
        1,
    );
    launch_config(cuda(q)?, ATTENTION, &name, grid, 128, args)
}

/// The kernels' trailing arguments: Nq, Nk, d, heads, the score scale 1/√d and whether 16-byte copies apply.
fn flash_sizes(q: &Tensor, k: &Tensor, heads: usize) -> Result<[Arg; 6]> {
    let (nq, nk, d) = (q.dim(1)?, k.dim(1)?, q.dim(2)? / heads);
    Ok([
        Arg::I32(nq as i32),
        Arg::I32(nk as i32),
        Arg::I32(d as i32),
        Arg::I32(heads as i32),
        Arg::F32(1.0 / (d as f32).sqrt()),
        Arg::I32(d.is_multiple_of(8) as i32),
    ])
}

/// Attention of q [B, Nq, C] over k, v [B, Nk, C] in `heads` heads (scores scaled by 1/√d), read and written in
/// that layout, without score matrices in memory: the output [B, Nq, C] and each query's log-sum-exp per head
/// [B, Nq, heads] (f32), for `flash_backward`.
pub fn flash_forward(
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    heads: usize,
) -> Result<(Tensor, Tensor)> {
    let (q, k, v) = (flash_operand(q)?, flash_operand(k)?, flash_operand(v)?);
    let (b, nq, _) = q.dims3()?;
    let o = unsafe { output(q.shape(), q.dtype(), q.device())? };
    let lse = unsafe { output((b, nq, heads), DType::F32, q.device())? };
    let mut args = vec![ptr(&q)?, ptr(&k)?, ptr(&v)?, ptr(&o)?, ptr(&lse)?];
    args.extend(flash_sizes(&q, &k, heads)?);
    launch_flash(&q, heads, "flash_fwd", nq, &args)?;
    Ok((o, lse))
}

/// The gradients (dq, dk, dv) of `flash_forward`'s output `o` from its gradient `g`, with `lse` from the forward.
pub fn flash_backward(
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    o: &Tensor,
    g: &Tensor,
    lse: &Tensor,
    heads: usize,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (q, k, v) = (flash_operand(q)?, flash_operand(k)?, flash_operand(v)?);
    let g = flash_operand(&g.to_dtype(q.dtype())?)?;
    let (b, nq, c) = q.dims3()?;
    // rowsum(dO ⊙ O) per head, [B, Nq, heads].
    let per_head = (b, nq, heads, c / heads);
    let delta = row_dot(&g.reshape(per_head)?, &o.reshape(per_head)?)?;
    let dq = unsafe { output(q.shape(), q.dtype(), q.device())? };
    let dk = unsafe { output(k.shape(), k.dtype(), k.device())? };
    let dv = unsafe { output(v.shape(), v.dtype(), v.device())? };
    let lse = lse.contiguous()?;
    let sizes = flash_sizes(&q, &k, heads)?;
    let inputs: Vec<Arg> = [&q, &k, &v, &g, &lse, &delta]
        .into_iter()
        .map(ptr)
        .collect::<Result<_>>()?;
    let mut args = inputs.clone();
    args.push(ptr(&dq)?);
    args.extend(sizes);
    launch_flash(&q, heads, "flash_bwd_dq", nq, &args)?;
    let mut args = inputs;
    args.extend([ptr(&dk)?, ptr(&dv)?]);
    args.extend(sizes);
    launch_flash(&q, heads, "flash_bwd_dkdv", k.dim(1)?, &args)?;
    Ok((dq, dk, dv))
}
