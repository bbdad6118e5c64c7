//! The compute device: the GPU when this is a CUDA build and one is usable, else the CPU; and what its memory
//! is doing (free/total from the driver, and the high-water mark of the memory pool candle allocates from).

use candle_core::{Device, Tensor};

/// The first CUDA GPU in a CUDA build, else the CPU. A CUDA build on a machine without a usable GPU says why.
pub fn best() -> (Device, Option<String>) {
    #[cfg(feature = "cuda")]
    match Device::new_cuda(0) {
        Ok(d) => {
            if let Ok(cuda) = d.as_cuda_device() {
                // SAFETY: all our work on a device runs on its one stream, so the per-buffer events cudarc would
                // create, record and destroy for cross-stream ordering (several driver calls per op) order
                // nothing.
                unsafe { cuda.disable_event_tracking() };
            }
            return (d, None);
        }
        Err(e) => {
            let why = format!(
                "this is a CUDA build but no usable NVIDIA GPU was found ({e}); running on the CPU. Check `nvidia-smi` \
                 and that the driver supports CUDA 13."
            );
            return (Device::Cpu, Some(why));
        }
    }
    #[allow(unreachable_code)]
    (Device::Cpu, None)
}

/// Runs `f` (a network's forward or backward) with candle's cache of small host-to-device uploads on. Outside
/// it, every op on a strided or broadcast tensor first uploads its shape and strides (an allocation and a copy,
/// ~10 % of a small-batch SD step); a step repeats the same few hundred shapes. The cache keeps each distinct
/// upload of ≤ 4 KiB for the life of the thread, so `f` must not upload changing data of that size (see
/// `upload_uncached`).
pub fn with_upload_cache<T>(device: &Device, f: impl FnOnce() -> T) -> T {
    #[cfg(feature = "cuda")]
    if let Ok(cuda) = device.as_cuda_device() {
        let _cache = cuda.enable_cuda_graph_htod_cache();
        return f();
    }
    let _ = device;
    f()
}

/// `values` as a tensor of `shape` on `device`, uploaded past the cache of `with_upload_cache` (which keeps
/// only uploads of ≤ 4 KiB): for data that changes every step inside a forward.
pub fn upload_uncached(
    values: Vec<f32>,
    shape: &[usize],
    device: &Device,
) -> candle_core::Result<Tensor> {
    const PAST_CACHE: usize = 4096 / 4 + 1;
    let n = values.len();
    let mut padded = values;
    padded.resize(n.max(PAST_CACHE), 0.0);
    let len = padded.len();
    Tensor::from_vec(padded, len, device)?
        .narrow(0, 0, n)?
        .reshape(shape)
}

/// "NVIDIA H100 80GB HBM3 (compute 9.0)" or "CPU (a build without CUDA)".
pub fn describe(device: &Device) -> String {
    #[cfg(feature = "cuda")]
    if let Ok(cuda) = device.as_cuda_device() {
        let ctx = cuda.cuda_stream().context().clone();
        let name = ctx.name().unwrap_or_else(|_| "NVIDIA GPU".into());
        let (major, minor) = ctx.compute_capability().unwrap_or((0, 0));
        return format!("{name} (compute {major}.{minor})");
    }
    let _ = device;
    if cfg!(feature = "cuda") {
        "CPU".into()
    } else {
        "CPU (a build without CUDA)".into()
    }
}

/// Whether the device computes bf16 natively (NVIDIA compute capability 8.0 and up: Ampere and later).
pub fn supports_bf16(device: &Device) -> bool {
    #[cfg(feature = "cuda")]
    if let Ok(cuda) = device.as_cuda_device() {
        let ctx = cuda.cuda_stream().context().clone();
        return ctx.compute_capability().is_ok_and(|(major, _)| major >= 8);
    }
    let _ = device;
    false
}

/// (free, total) device memory in bytes, from the driver; `None` on the CPU.
pub fn memory(device: &Device) -> Option<(u64, u64)> {
    #[cfg(feature = "cuda")]
    if let Ok(cuda) = device.as_cuda_device() {
        let (free, total) = cuda.cuda_stream().context().mem_get_info().ok()?;
        return Some((free as u64, total as u64));
    }
    let _ = device;
    None
}

/// The most memory the device's pools (candle's and CUDA graphs') have had in use since the last `reset_peak`
/// (bytes); `None` on the CPU.
pub fn peak(device: &Device) -> Option<u64> {
    pool_attribute(device, false)
}

/// Returns the memory CUDA graphs keep reserved between replays to the driver (they take it back when next
/// replayed). No-op on the CPU.
pub fn trim_graph_memory(device: &Device) {
    #[cfg(feature = "cuda")]
    if let Ok(cuda) = device.as_cuda_device() {
        let ctx = cuda.cuda_stream().context().clone();
        if device.synchronize().is_ok() {
            // SAFETY: a driver call on the device's context with no pointers; the stream is idle.
            unsafe {
                candle_core::cuda::cudarc::driver::sys::cuDeviceGraphMemTrim(ctx.cu_device())
            };
        }
    }
    let _ = device;
}

/// With `LORA_STUDIO_MEMTRACE` set, prints the memory in use (driver) and the pool's peak at `label`, in MiB:
/// how to find where a training step's memory goes.
pub fn trace(label: &str, device: &Device) {
    if std::env::var_os("LORA_STUDIO_MEMTRACE").is_none() {
        return;
    }
    let mib = |b: u64| b / (1 << 20);
    let used = memory(device).map(|(free, total)| mib(total - free));
    eprintln!(
        "memtrace {label}: in use {used:?} MiB, pool peak {:?} MiB",
        peak(device).map(mib)
    );
}

/// Starts a new peak measurement.
pub fn reset_peak(device: &Device) {
    let _ = pool_attribute(device, true);
}

#[cfg(feature = "cuda")]
fn pool_attribute(device: &Device, reset: bool) -> Option<u64> {
    use candle_core::cuda::cudarc::driver::sys;
    let cuda = device.as_cuda_device().ok()?;
    device.synchronize().ok()?;
    let ctx = cuda.cuda_stream().context().clone();
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    let attr = sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH;
    let mut value: u64 = 0;
    // SAFETY: plain driver queries on the device's default pool with valid out-pointers; the context is current
    // (candle made it so when it created the device).
    unsafe {
        if sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) != sys::CUresult::CUDA_SUCCESS
        {
            return None;
        }
        let ptr = (&mut value as *mut u64).cast();
        let status = if reset {
            sys::cuMemPoolSetAttribute(pool, attr, ptr)
        } else {
            sys::cuMemPoolGetAttribute(pool, attr, ptr)
        };
        // A replayed training step (CUDA graph) allocates from the graph memory pool instead.
        let mut graph: u64 = 0;
        let gptr = (&mut graph as *mut u64).cast();
        let gattr = sys::CUgraphMem_attribute::CU_GRAPH_MEM_ATTR_USED_MEM_HIGH;
        let gstatus = if reset {
            sys::cuDeviceSetGraphMemAttribute(ctx.cu_device(), gattr, gptr)
        } else {
            sys::cuDeviceGetGraphMemAttribute(ctx.cu_device(), gattr, gptr)
        };
        (status == sys::CUresult::CUDA_SUCCESS && gstatus == sys::CUresult::CUDA_SUCCESS)
            .then_some(value + graph)
    }
}

#[cfg(not(feature = "cuda"))]
fn pool_attribute(_device: &Device, _reset: bool) -> Option<u64> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Small or large, an upload past the cache gives exactly the values in the asked shape.
    #[test]
    fn uncached_uploads_keep_values_and_shape() {
        for n in [6usize, 5000] {
            let v: Vec<f32> = (0..n).map(|i| i as f32 * 0.5).collect();
            let t = upload_uncached(v.clone(), &[n / 2, 2], &Device::Cpu).unwrap();
            assert_eq!(t.dims(), &[n / 2, 2]);
            assert_eq!(t.flatten_all().unwrap().to_vec1::<f32>().unwrap(), v);
        }
    }
}
