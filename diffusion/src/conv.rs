//! The networks' convolutions: on the CPU in f32 the engine's own kernel
//! (`cpu::conv2d`), elsewhere candle's, with the cuDNN algorithm chosen here.
//!
//! Only a `cudnn` build looks at the algorithm (without cuDNN candle
//! convolves by im2col and a matmul). candle's default asks cuDNN's heuristic
//! (`cudnnGetConvolutionForwardAlgorithm_v7`) on every call, which costs
//! milliseconds of CPU time per convolution with cuDNN 9 — on an H100 it made
//! the whole SD-1.5 UNet six times slower than without cuDNN. A fixed
//! algorithm skips the query. Measured on an H100 (SD-1.5 UNet, 512², f16,
//! `hallmark-diffusion-bench profile`): the resnets took 52 / 63 / 76 ms per
//! guided batch-1 call with Winograd / implicit GEMM / implicit precomputed
//! GEMM and 86 / 186 / 191 ms at batch 8 — against 20 and 139 ms for the
//! im2col path of a build without cuDNN, whose per-call overhead is smaller:
//! a `cudnn` build pays off only at large batches.

use std::fmt;
use std::str::FromStr;

use candle_core::conv::CudnnFwdAlgo;
use candle_core::{Module, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};

use crate::DiffusionError;

/// The cuDNN forward algorithm of every convolution of a network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ConvAlgorithm {
    /// Implicit GEMM with precomputed indices: every shape.
    ImplicitPrecompGemm,
    /// Implicit GEMM without the precomputed indices (no workspace).
    ImplicitGemm,
    /// Winograd (non-fused) for 3×3 stride-1 convolutions, implicit
    /// precomputed GEMM for the others (Winograd cannot run them); the
    /// fastest of the three on an H100.
    #[default]
    WinogradNonfused,
    /// cuDNN's heuristic, asked on every call (candle's default).
    Heuristic,
}

const NAMES: [(&str, ConvAlgorithm); 4] = [
    ("implicit-precomp-gemm", ConvAlgorithm::ImplicitPrecompGemm),
    ("implicit-gemm", ConvAlgorithm::ImplicitGemm),
    ("winograd-nonfused", ConvAlgorithm::WinogradNonfused),
    ("heuristic", ConvAlgorithm::Heuristic),
];

impl FromStr for ConvAlgorithm {
    type Err = DiffusionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        NAMES
            .iter()
            .find(|(name, _)| *name == s)
            .map(|(_, algo)| *algo)
            .ok_or_else(|| {
                let known: Vec<&str> = NAMES.iter().map(|(name, _)| *name).collect();
                DiffusionError::BadRequest(format!(
                    "unknown convolution algorithm {s:?} ({})",
                    known.join(", ")
                ))
            })
    }
}

impl fmt::Display for ConvAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = NAMES
            .iter()
            .find(|(_, a)| a == self)
            .map_or("?", |(n, _)| n);
        f.write_str(name)
    }
}

impl ConvAlgorithm {
    /// A `kernel`×`kernel` convolution loaded from `vb` (`weight`, `bias`)
    /// that runs with this algorithm.
    pub(crate) fn conv2d(
        self,
        (cin, cout, kernel): (usize, usize, usize),
        padding: usize,
        stride: usize,
        vb: VarBuilder,
    ) -> candle_core::Result<Conv2d> {
        let precomp = Some(CudnnFwdAlgo::ImplicitPrecompGemm);
        let cudnn_fwd_algo = match self {
            Self::ImplicitPrecompGemm => precomp,
            Self::ImplicitGemm => Some(CudnnFwdAlgo::ImplicitGemm),
            Self::WinogradNonfused if kernel == 3 && stride == 1 => {
                Some(CudnnFwdAlgo::WinogradNonFused)
            }
            Self::WinogradNonfused => precomp,
            Self::Heuristic => None,
        };
        let cfg = Conv2dConfig {
            padding,
            stride,
            cudnn_fwd_algo,
            ..Default::default()
        };
        candle_nn::conv2d(cin, cout, kernel, cfg, vb).map(Conv2d)
    }
}

/// A 2-D convolution with an optional bias: candle's, except f32 on the
/// CPU, which runs the engine's own kernel; the bias added by
/// `fused::add_bias` (one fused pass on CUDA).
#[derive(Debug, Clone)]
pub(crate) struct Conv2d(candle_nn::Conv2d);

impl Conv2d {
    pub(crate) fn weight(&self) -> &Tensor {
        self.0.weight()
    }

    pub(crate) fn bias(&self) -> Option<&Tensor> {
        self.0.bias()
    }

    /// The same convolution without its bias.
    pub(crate) fn without_bias(&self) -> Self {
        Self(candle_nn::Conv2d::new(
            self.0.weight().clone(),
            None,
            *self.0.config(),
        ))
    }
}

impl Module for Conv2d {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let cfg = self.0.config();
        let out = if crate::cpu::applies(xs) && cfg.dilation == 1 && cfg.groups == 1 {
            crate::cpu::conv2d(xs, self.0.weight(), cfg.stride, cfg.padding)?
        } else {
            xs.conv2d_with_algo(
                self.0.weight(),
                cfg.padding,
                cfg.stride,
                cfg.dilation,
                cfg.groups,
                cfg.cudnn_fwd_algo,
            )?
        };
        match self.0.bias() {
            Some(b) => crate::fused::add_bias(&out, &b.reshape((1, (), 1, 1))?, None),
            None => Ok(out),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_names_are_refused() {
        for (name, algo) in NAMES {
            assert_eq!(name.parse::<ConvAlgorithm>().unwrap(), algo);
            assert_eq!(algo.to_string(), name);
        }
        let err = "winograd".parse::<ConvAlgorithm>().unwrap_err().to_string();
        assert!(
            err.contains("\"winograd\"") && err.contains("implicit-precomp-gemm"),
            "{err}"
        );
    }
}
