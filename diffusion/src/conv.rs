//! The networks' convolutions: on the CPU in f32 the engine's own kernels
//! (`cpu::conv2d`: Winograd's F(2×2, 3×3) or F(4×4, 3×3) for 3×3 stride-1 convolutions
//! under the default algorithm, the im2col for the rest); on CUDA the own im2col and one matmul (`fused::conv2d`)
//! or, in a `cudnn` build, cuDNN with the algorithm chosen here; candle's
//! convolution elsewhere.
//!
//! Without cuDNN, candle convolves on CUDA by an im2col whose columns are
//! `(pixels, channels·k·k)`, a matmul, and a transposing copy of the output
//! into `(batch, out, h, w)` — 29 % of a batch-8 UNet call on an H100
//! (run 6). The own im2col lays its columns out the other way round, so the
//! weight times them is the output in place, with no copy after it.
//!
//! With cuDNN, candle's default asks cuDNN's heuristic
//! (`cudnnGetConvolutionForwardAlgorithm_v7`) on every call, which costs
//! milliseconds of CPU time per convolution with cuDNN 9 — on an H100 it made
//! the whole SD-1.5 UNet six times slower than without cuDNN. A fixed
//! algorithm skips the query. Measured on an H100 (SD-1.5 UNet, 512², f16,
//! `hallmark-diffusion-bench profile`): the resnets took 52 / 63 / 76 ms per
//! guided batch-1 call with Winograd / implicit GEMM / implicit precomputed
//! GEMM and 86 / 186 / 191 ms at batch 8 — against 20 and 139 ms for the
//! im2col path of a build without cuDNN, whose per-call overhead is smaller:
//! a `cudnn` build pays off only at large batches. The downsamplers' stride-2
//! convolutions, which Winograd cannot run, took 4.8 ms per batch-8 call
//! with implicit precomputed GEMM against candle's im2col's 1.8 (run 6), so
//! the default runs them with the own im2col.

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
    /// Winograd (non-fused) for 3×3 stride-1 convolutions, the own im2col
    /// for the others (Winograd cannot run them); the fastest of the cuDNN
    /// algorithms on an H100. On the CPU the own Winograd F(2×2, 3×3) or F(4×4, 3×3)
    /// (`cpu/winograd.rs`); every other choice there is the own im2col.
    #[default]
    WinogradNonfused,
    /// cuDNN's heuristic, asked on every call (candle's default).
    Heuristic,
    /// The own im2col and a matmul for every convolution, as a build
    /// without cuDNN runs them.
    Im2col,
}

const NAMES: [(&str, ConvAlgorithm); 5] = [
    ("implicit-precomp-gemm", ConvAlgorithm::ImplicitPrecompGemm),
    ("implicit-gemm", ConvAlgorithm::ImplicitGemm),
    ("winograd-nonfused", ConvAlgorithm::WinogradNonfused),
    ("heuristic", ConvAlgorithm::Heuristic),
    ("im2col", ConvAlgorithm::Im2col),
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

/// Whether `HALLMARK_WINOGRAD=f2` keeps the CPU's Winograd at F(2×2, 3×3)
/// everywhere (the benchmarks' baseline of F(4×4, 3×3) on large maps;
/// read once).
pub fn winograd_f2_only() -> bool {
    static F2_ONLY: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *F2_ONLY.get_or_init(|| std::env::var("HALLMARK_WINOGRAD").is_ok_and(|v| v == "f2"))
}

impl ConvAlgorithm {
    /// Whether, on the CPU (f32), the 3×3 stride-1 convolutions run by the
    /// own Winograd: under the default only, every other choice running the
    /// own im2col (the cuDNN algorithms have no CPU counterpart).
    pub fn winograd_on_cpu(self) -> bool {
        self == Self::WinogradNonfused
    }

    /// A `kernel`×`kernel` convolution loaded from `vb` (`weight`, `bias`)
    /// that runs with this algorithm.
    pub(crate) fn conv2d(
        self,
        (cin, cout, kernel): (usize, usize, usize),
        padding: usize,
        stride: usize,
        vb: VarBuilder,
    ) -> candle_core::Result<Conv2d> {
        let winograd = kernel == 3 && stride == 1;
        // What cuDNN runs; also where the own im2col is chosen but the fused
        // kernels are off (`HALLMARK_FUSED_KERNELS=off`).
        let precomp = Some(CudnnFwdAlgo::ImplicitPrecompGemm);
        let cudnn_fwd_algo = match self {
            Self::ImplicitPrecompGemm | Self::Im2col => precomp,
            Self::ImplicitGemm => Some(CudnnFwdAlgo::ImplicitGemm),
            Self::WinogradNonfused if winograd => Some(CudnnFwdAlgo::WinogradNonFused),
            Self::WinogradNonfused => precomp,
            Self::Heuristic => None,
        };
        let im2col = !cfg!(feature = "cudnn")
            || self == Self::Im2col
            || (self == Self::WinogradNonfused && !winograd);
        let cpu_winograd = self.winograd_on_cpu() && winograd;
        let cfg = Conv2dConfig {
            padding,
            stride,
            cudnn_fwd_algo,
            ..Default::default()
        };
        let conv = candle_nn::conv2d(cin, cout, kernel, cfg, vb)?;
        Ok(Conv2d {
            conv,
            im2col,
            cpu_winograd,
        })
    }
}

/// A 2-D convolution with an optional bias: f32 on the CPU runs the
/// engine's own kernel, CUDA the own im2col where `im2col` says so (and the
/// fused kernels are on), everything else candle's convolution; the bias
/// added as the output is written on the CPU, by `fused::add_bias` (one
/// fused pass on CUDA) elsewhere.
#[derive(Debug, Clone)]
pub(crate) struct Conv2d {
    conv: candle_nn::Conv2d,
    /// On CUDA, `fused::conv2d` rather than candle's (cuDNN's) convolution.
    im2col: bool,
    /// On the CPU, a 3×3 stride-1 convolution by Winograd's F(2×2, 3×3) or F(4×4, 3×3)
    /// rather than the im2col.
    cpu_winograd: bool,
}

impl Conv2d {
    pub(crate) fn weight(&self) -> &Tensor {
        self.conv.weight()
    }

    pub(crate) fn bias(&self) -> Option<&Tensor> {
        self.conv.bias()
    }

    /// The same convolution without its bias.
    pub(crate) fn without_bias(&self) -> Self {
        Self {
            conv: candle_nn::Conv2d::new(self.conv.weight().clone(), None, *self.conv.config()),
            ..self.clone()
        }
    }
}

impl Conv2d {
    /// Whether the CPU kernels run this convolution on `xs`.
    fn on_cpu_kernels(&self, xs: &Tensor) -> bool {
        let cfg = self.conv.config();
        crate::cpu::applies(xs) && cfg.dilation == 1 && cfg.groups == 1
    }

    /// Whether [`Conv2d::forward_cpu_into`] runs this convolution: its
    /// weights f32 on the CPU, no dilation, one group.
    pub(crate) fn runs_on_cpu_slices(&self) -> bool {
        self.on_cpu_kernels(self.conv.weight())
    }

    /// The convolution of `x`, a `dims` (`(batch, cin, h, w)`) input, into
    /// `out` with the CPU kernels, the bias and `ep`'s leaky ReLU and
    /// residual applied as the output is written (`ep.bias` is this
    /// layer's); the output's dims back. Only where
    /// [`Conv2d::runs_on_cpu_slices`].
    pub(crate) fn forward_cpu_into(
        &self,
        x: &[f32],
        dims: (usize, usize, usize, usize),
        out: &mut [f32],
        ep: crate::cpu::Epilogue,
    ) -> candle_core::Result<(usize, usize, usize, usize)> {
        let cfg = self.conv.config();
        let weight = self.conv.weight();
        let s = crate::cpu::ConvShape::new(&dims.into(), weight.shape(), cfg.stride, cfg.padding)?;
        crate::cpu::with_f32(weight, |w| match self.conv.bias() {
            Some(b) => crate::cpu::with_f32(b, |b| {
                let ep = crate::cpu::Epilogue {
                    bias: Some(b),
                    ..ep
                };
                crate::cpu::conv2d_into(x, w, &s, self.cpu_winograd, out, &ep)
            })?,
            None => crate::cpu::conv2d_into(x, w, &s, self.cpu_winograd, out, &ep),
        })??;
        Ok((s.batch, s.cout, s.out_h, s.out_w))
    }
}

impl Conv2d {
    /// The convolution of `xs` (this layer without a bias of its own) plus
    /// `bias` (`(1, cout, 1, 1)`, or `(batch, cout, 1, 1)` with one per
    /// image) and `residual` (laid out as the output) where given. On the
    /// CPU kernels both are added as the output is written, with no pass
    /// of their own; elsewhere by one `fused::add_bias` pass after the
    /// convolution.
    pub(crate) fn forward_with(
        &self,
        xs: &Tensor,
        bias: &Tensor,
        residual: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        if self.conv.bias().is_some() {
            candle_core::bail!("conv2d: forward_with takes the bias of a layer without one");
        }
        if !(self.on_cpu_kernels(xs) && self.runs_on_cpu_slices()) {
            return crate::fused::add_bias(&self.forward(xs)?, bias, residual);
        }
        let cfg = self.conv.config();
        let xs = xs.contiguous()?;
        let s = crate::cpu::ConvShape::new(
            xs.shape(),
            self.conv.weight().shape(),
            cfg.stride,
            cfg.padding,
        )?;
        let dims = (s.batch, s.cout, s.out_h, s.out_w);
        if let Some(r) = residual
            && r.dims() != [dims.0, dims.1, dims.2, dims.3]
        {
            candle_core::bail!("conv2d: a {:?} residual for a {dims:?} output", r.dims());
        }
        let bias = bias.flatten_all()?.contiguous()?;
        let residual = residual.map(Tensor::contiguous).transpose()?;
        let mut out = vec![0f32; dims.0 * dims.1 * dims.2 * dims.3];
        let into = |x: &[f32], bias: &[f32], residual: Option<&[f32]>, out: &mut [f32]| {
            let ep = crate::cpu::Epilogue {
                bias: Some(bias),
                leaky: None,
                residual: residual.map(|r| (r, 1.0)),
            };
            let input = (s.batch, s.cin, s.height, s.width);
            self.forward_cpu_into(x, input, out, ep).map(|_| ())
        };
        crate::cpu::with_f32(&xs, |x| {
            crate::cpu::with_f32(&bias, |b| match &residual {
                Some(r) => crate::cpu::with_f32(r, |r| into(x, b, Some(r), &mut out))?,
                None => into(x, b, None, &mut out),
            })?
        })??;
        Tensor::from_vec(out, dims, xs.device())
    }
}

impl Module for Conv2d {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let cfg = self.conv.config();
        let plain = cfg.dilation == 1 && cfg.groups == 1;
        let weight = self.conv.weight();
        if self.on_cpu_kernels(xs) {
            // The bias added as each tile is written.
            let bias = self.conv.bias();
            return crate::cpu::conv2d(
                xs,
                weight,
                bias,
                cfg.stride,
                cfg.padding,
                self.cpu_winograd,
            );
        }
        let out = if self.im2col && plain && crate::fused::applies(xs) {
            crate::fused::conv2d(xs, weight, cfg.stride, cfg.padding)?
        } else {
            xs.conv2d_with_algo(
                weight,
                cfg.padding,
                cfg.stride,
                cfg.dilation,
                cfg.groups,
                cfg.cudnn_fwd_algo,
            )?
        };
        match self.conv.bias() {
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

    #[test]
    fn forward_with_adds_per_channel_and_per_image_biases_and_the_residual() {
        use crate::test_util::{randn, relative_diff};
        use candle_core::{DType, Device};
        // (batch, channels, side, kernel, algorithm): Winograd (32 channels,
        // enough tiles), the im2col (too few channels for Winograd, and the
        // im2col chosen), a 1×1.
        let cases = [
            (2, 32, 24, 3, ConvAlgorithm::WinogradNonfused),
            (3, 8, 9, 3, ConvAlgorithm::WinogradNonfused),
            (2, 32, 24, 3, ConvAlgorithm::Im2col),
            (2, 6, 7, 1, ConvAlgorithm::WinogradNonfused),
        ];
        for (b, c, side, k, algo) in cases {
            let weight = (randn(&[c, c, k, k]) * 0.1).unwrap();
            let mut map = std::collections::HashMap::new();
            map.insert("weight".to_string(), weight.clone());
            map.insert("bias".to_string(), randn(&[c]));
            let vb = VarBuilder::from_tensors(map, DType::F32, &Device::Cpu);
            let conv = algo.conv2d((c, c, k), k / 2, 1, vb).unwrap().without_bias();
            let x = randn(&[b, c, side, side]);
            let plain = x.conv2d(&weight, k / 2, 1, 1, 1).unwrap();
            let residual = randn(plain.dims());
            for bias in [randn(&[1, c, 1, 1]), randn(&[b, c, 1, 1])] {
                let biased = plain.broadcast_add(&bias).unwrap();
                for (r, want) in [
                    (None, biased.clone()),
                    (Some(&residual), (&biased + &residual).unwrap()),
                ] {
                    let got = conv.forward_with(&x, &bias, r).unwrap();
                    // Relative to the largest output: F(4×4)'s rounding
                    // stays under 1e-4, a misplaced bias or residual is
                    // off by order 1.
                    let d = relative_diff(&got, &want);
                    let what = (b, c, side, k, algo, bias.dims(), r.is_some());
                    assert!(d < 1e-4, "{what:?}: differs by {d} of the largest output");
                }
            }
            // A residual of another shape, a bias that fits neither way.
            let short = residual.narrow(3, 0, side - 1).unwrap();
            let bias = randn(&[1, c, 1, 1]);
            assert!(conv.forward_with(&x, &bias, Some(&short)).is_err());
            let odd = randn(&[1, c + 1, 1, 1]);
            assert!(conv.forward_with(&x, &odd, None).is_err());
        }
    }
}
