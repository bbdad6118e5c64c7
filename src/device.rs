//! The compute device: the GPU when this is a CUDA build and one is usable, else the CPU; and what its memory
//! is doing (free/total from the driver, and the high-water mark of the memory pool candle allocates from).

use candle_core::Device;

/// The first CUDA GPU in a CUDA build, else the CPU. A CUDA build on a machine without a usable GPU says why.
pub fn best() -> (Device, Option<String>) {
    #[cfg(feature = "cuda")]
    match Device::new_cuda(0) {
        Ok(d) => return (d, None),
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

/// The most memory the device's pool has had in use since the last `reset_peak` (bytes); `None` on the CPU.
pub fn peak(device: &Device) -> Option<u64> {
    pool_attribute(device, false)
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
        (status == sys::CUresult::CUDA_SUCCESS).then_some(value)
    }
}

#[cfg(not(feature = "cuda"))]
fn pool_attribute(_device: &Device, _reset: bool) -> Option<u64> {
    None
}
