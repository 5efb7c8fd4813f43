//! Device set-up for CUDA.

use candle_core::Device;

/// Lets the device's memory pool keep what the engine frees instead of
/// returning it to the driver at every synchronisation (CUDA's default
/// release threshold is zero). The pipeline synchronises once per step, so
/// the step's large buffers — the attention scores alone are gigabytes at
/// batch 8 — were mapped afresh every step; PyTorch's caching allocator
/// keeps them too. Best effort: a driver that refuses leaves the default.
pub(crate) fn keep_freed_memory(device: &Device) {
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
