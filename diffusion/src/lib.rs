//! Latent diffusion on candle: the `diffusion` engine's library.
//!
//! - [`model`]: a diffusers model folder — pipeline family, configs, weight
//!   files and their sha256 digests;
//! - [`hub`]: `hf:owner/name[@rev]` models fetched from the Hugging Face Hub;
//! - [`tokenizer`], [`clip`]: the CLIP tokenizer and text encoder;
//! - [`scheduler`]: DDIM, Euler, Euler ancestral, DPM++ 2M Karras, UniPC;
//! - [`rng`]: the seeded noise generator (same noise on every device);
//! - [`unet`]: the denoising UNet, with SDXL's added conditioning;
//! - [`attention`]: its transformer blocks, attention by matmuls or fused flash attention;
//! - [`conv`]: the convolutions and their cuDNN algorithm (`cudnn` builds);
//! - `cpu`: the own CPU kernels (convolution, group norm, GEGLU) for f32;
//! - [`fused`]: the own fused CUDA kernels (group norm with SiLU, GEGLU);
//! - [`softmax`]: the attention's softmax (an own kernel on CUDA);
//! - [`profile`]: where a UNet call spends its time (the benchmark's `profile`);
//! - [`opbench`]: the UNet's operations one by one at its shapes (the benchmark's `ops`);
//! - [`pipeline`]: Stable Diffusion 1.x/2.x/XL text-to-image and img2img;
//! - `vae`: the VAE's decoder and encoder, on the UNet's resnets and group norm;
//! - [`esrgan`]: Real-ESRGAN (RRDBNet) super-resolution, tiled;
//! - [`upscale`]: the super-resolution stage (Real-ESRGAN or hires fix);
//! - [`cache`]: loaded models within a memory budget, least recently used out;
//! - [`tiny`]: tiny random-weight checkpoints in the real layouts, for tests;
//! - [`latents`]: initial latents from `.safetensors` or `.npy` files;
//! - [`mask`]: an inpainting mask's blur, crop and overlay, as diffusers' PIL.

pub mod attention;
pub mod cache;
pub mod clip;
pub mod conv;
mod cpu;
mod error;
pub mod esrgan;
pub mod fused;
mod gpu;
pub mod graph;
pub mod hub;
pub mod latents;
mod linear;
pub mod mask;
pub mod model;
pub mod opbench;
pub mod pipeline;
pub mod profile;
mod resnet;
pub mod rng;
pub mod scheduler;
pub mod softmax;
pub mod tiny;
pub mod tokenizer;
pub mod unet;
pub mod upscale;
mod vae;

pub use attention::AttentionChoice;
pub use conv::ConvAlgorithm;
pub use error::DiffusionError;
pub use pipeline::{GenerateRequest, Generation, LoadOptions, Sample, StableDiffusion};
pub use scheduler::SchedulerKind;

#[cfg(test)]
mod test_util {
    use crate::rng::NoiseGenerator;
    use candle_core::{Device, Tensor};
    use std::cell::RefCell;

    thread_local! {
        /// Each test runs on its own thread (and, under nextest, in its own
        /// process), so each test draws the same data on every run.
        static NOISE: RefCell<NoiseGenerator> = RefCell::new(NoiseGenerator::new(0x4a11_3a2c));
    }

    /// A CPU tensor of standard normal samples from the test thread's
    /// seeded stream: a failure reproduces, and a tolerance that holds once
    /// holds on every run (candle's own `randn` cannot be seeded on the CPU).
    pub(crate) fn randn(shape: &[usize]) -> Tensor {
        let n = shape.iter().product();
        let values = NOISE.with(|g| g.borrow_mut().normals(n));
        Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
    }

    /// A CPU tensor of samples uniform in [lo, hi), from the same stream.
    pub(crate) fn rand(shape: &[usize], lo: f64, hi: f64) -> Tensor {
        let n = shape.iter().product();
        let values: Vec<f32> = NOISE.with(|g| {
            let mut g = g.borrow_mut();
            (0..n).map(|_| g.next_uniform(lo, hi) as f32).collect()
        });
        Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
    }

    /// [`max_diff`] of `got` from `want` relative to `want`'s largest
    /// magnitude (at least 1, so that an output near zero is held to an
    /// absolute bound): how far a kernel strays at any output size.
    pub(crate) fn relative_diff(got: &Tensor, want: &Tensor) -> f32 {
        let largest = want.abs().and_then(|a| a.max_all()?.to_scalar::<f32>());
        max_diff(got, want) / largest.unwrap().max(1.0)
    }

    /// The largest absolute elementwise difference of two f32 tensors.
    pub(crate) fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .and_then(|d| d.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>())
            .unwrap()
    }
}
