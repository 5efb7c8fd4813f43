//! Softmax over the last dimension, the attention's hot spot.
//!
//! On a CUDA device this is the crate's own kernel (`kernels/softmax.cu`):
//! one block per row that finds the maximum and the sum of exponentials in a
//! single pass, then writes the probabilities — two reads of the scores
//! where candle's kernel (one warp per row) makes three, 16-byte loads, and
//! a whole block of loads in flight per row. On the CPU in f32 the crate's
//! own (`cpu`), elsewhere candle's softmax.

use candle_core::Tensor;

/// `softmax(xs)` over the last dimension.
pub fn softmax_last_dim(xs: &Tensor) -> candle_core::Result<Tensor> {
    #[cfg(feature = "cuda")]
    if xs.device().is_cuda() {
        return xs.contiguous()?.apply_op1_no_bwd(&cuda::RowSoftmax);
    }
    if crate::cpu::applies(xs) {
        return crate::cpu::softmax_last_dim(xs);
    }
    candle_nn::ops::softmax_last_dim(xs)
}

/// candle's own softmax, for comparisons (the benchmark's `kernels` check).
pub fn candle_softmax_last_dim(xs: &Tensor) -> candle_core::Result<Tensor> {
    candle_nn::ops::softmax_last_dim(xs)
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{
        CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg,
    };
    use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
    use candle_core::{CpuStorage, CudaDevice, CudaStorage, CustomOp1, Layout, Shape};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/softmax.ptx"));

    pub(super) struct RowSoftmax;

    fn launch<T: DeviceRepr>(
        name: &str,
        src: &CudaSlice<T>,
        dev: &CudaDevice,
        layout: &Layout,
    ) -> candle_core::Result<CudaSlice<T>> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("softmax: the input must be contiguous");
        };
        let src = src.slice(start..end);
        let el = layout.shape().elem_count();
        let cols = layout.shape().dims().last().copied().unwrap_or(1).max(1);
        let rows = el / cols;
        // A warp per short row (the text's 77 tokens), 256 threads per long
        // one (4096 pixels).
        let threads = if cols <= 256 { 32 } else { 256 };
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        let func = dev.get_or_load_custom_func(name, "hallmark_softmax", PTX)?;
        // SAFETY: every element is written by the kernel.
        let dst = unsafe { dev.alloc::<T>(el)? };
        // 16-byte loads where every row starts on a 16-byte boundary (the
        // allocation itself is aligned).
        let per_16 = 16 / std::mem::size_of::<T>();
        let vec = i32::from(cols.is_multiple_of(per_16) && start.is_multiple_of(per_16));
        let cols = cols as i32;
        let mut builder = func.builder();
        builder.arg(&src);
        builder.arg(&dst);
        builder.arg(&cols);
        builder.arg(&vec);
        // SAFETY: the arguments match the kernel's signature.
        unsafe { builder.launch(cfg) }.w()?;
        Ok(dst)
    }

    impl CustomOp1 for RowSoftmax {
        fn name(&self) -> &'static str {
            "hallmark-softmax"
        }

        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
            candle_core::bail!("the CUDA softmax kernel runs only on a CUDA device")
        }

        fn cuda_fwd(
            &self,
            storage: &CudaStorage,
            layout: &Layout,
        ) -> candle_core::Result<(CudaStorage, Shape)> {
            let dev = storage.device();
            let slice = match &storage.slice {
                CudaStorageSlice::F32(s) => {
                    CudaStorageSlice::F32(launch("hallmark_softmax_f32", s, dev, layout)?)
                }
                CudaStorageSlice::F16(s) => {
                    CudaStorageSlice::F16(launch("hallmark_softmax_f16", s, dev, layout)?)
                }
                CudaStorageSlice::BF16(s) => {
                    CudaStorageSlice::BF16(launch("hallmark_softmax_bf16", s, dev, layout)?)
                }
                _ => candle_core::bail!("softmax: {:?} is not a float type", storage.dtype()),
            };
            let out = CudaStorage {
                slice,
                device: dev.clone(),
            };
            Ok((out, layout.shape().clone()))
        }
    }
}
