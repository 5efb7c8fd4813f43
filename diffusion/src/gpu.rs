//! Device set-up for CUDA.

use candle_core::Device;

/// Sets up `device` for the engine before a model's tensors are created on
/// it: [`keep_freed_memory`] and [`skip_event_tracking`]. Nothing on the CPU.
pub(crate) fn prepare(device: &Device) {
    keep_freed_memory(device);
    skip_event_tracking(device);
}

/// Lets the device's memory pool keep what the engine frees instead of
/// returning it to the driver at every synchronisation (CUDA's default
/// release threshold is zero). The pipeline synchronises once per step, so
/// the step's large buffers — the attention scores alone are gigabytes at
/// batch 8 — were mapped afresh every step; PyTorch's caching allocator
/// keeps them too. Best effort: a driver that refuses leaves the default.
fn keep_freed_memory(device: &Device) {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(dev) = device {
        use candle_core::cuda_backend::cudarc::driver::sys;
        let cu_device = dev.cuda_stream().context().cu_device();
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        let mut threshold = u64::MAX;
        // SAFETY: `pool` is written by the driver before it is used, and the
        // attribute's value is a u64 as the driver API documents.
        let set = unsafe {
            sys::cuDeviceGetDefaultMemPool(&mut pool, cu_device)
                .result()
                .and_then(|()| {
                    sys::cuMemPoolSetAttribute(
                        pool,
                        sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                        (&mut threshold as *mut u64).cast(),
                    )
                    .result()
                })
        };
        if let Err(e) = set {
            tracing::warn!("cannot keep freed GPU memory in the pool: {e}");
        }
    }
    #[cfg(not(feature = "cuda"))]
    let _ = device;
}

/// Stops cudarc from creating two CUDA events with every allocation and
/// destroying them with every free. It uses them to order work between
/// streams, and only once a second stream exists in the context (until
/// then it neither records nor waits on them); candle runs everything on
/// one stream, the per-thread default stream, and never creates another,
/// so the events of the engine's tensors are never used — yet each tensor
/// still costs two `cuEventCreate` and two `cuEventDestroy` driver calls,
/// hundreds of each per UNet call, on the host time that bounds
/// batch 1. Tensors created before this call keep theirs.
/// `HALLMARK_CUDA_EVENTS=on` keeps the events (the benchmark's in-run
/// baseline for this).
fn skip_event_tracking(device: &Device) {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(dev) = device {
        let keep =
            std::env::var("HALLMARK_CUDA_EVENTS").is_ok_and(|v| v.eq_ignore_ascii_case("on"));
        // Asked to, or something made a second stream, where they matter.
        if keep || dev.cuda_stream().context().is_in_multi_stream_mode() {
            return;
        }
        // SAFETY: the events only order work between streams, and this
        // context has one (checked above; candle creates no other).
        unsafe { dev.disable_event_tracking() };
    }
    #[cfg(not(feature = "cuda"))]
    let _ = device;
}
