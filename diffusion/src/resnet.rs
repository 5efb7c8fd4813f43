//! The residual blocks of the UNet and the VAE (diffusers' `ResnetBlock2D`)
//! and a group norm built on candle's fused layer-norm kernel.
//!
//! candle-nn's `GroupNorm` is a dozen tensor operations (each a kernel
//! launch and a pass over an f32 copy of the feature map); here the
//! statistics and the normalisation are one fused pass per group, computed
//! in f32 whatever the compute type, followed by the per-channel scale and
//! shift.

use std::sync::Mutex;

use candle_core::{D, Module, Tensor};
use candle_nn::{Linear, VarBuilder};

use crate::conv::{Conv2d, ConvAlgorithm};
use crate::fused::GroupNormOutput;
use crate::profile::section;

/// diffusers' `GroupNorm`: each group of channels normalised over its
/// channels and pixels, then scaled and shifted per channel.
#[derive(Debug)]
pub(crate) struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f32,
    /// Unit scale and zero shift of the fused kernel for the last row length
    /// seen (one feature-map size at a time, in practice).
    unit: Mutex<Option<(usize, Tensor, Tensor)>>,
}

impl GroupNorm {
    pub(crate) fn new(
        vb: VarBuilder,
        groups: usize,
        channels: usize,
        eps: f64,
    ) -> candle_core::Result<Self> {
        if !channels.is_multiple_of(groups) {
            candle_core::bail!("{channels} channels do not split into {groups} groups");
        }
        Ok(Self {
            // The hints are what a fresh group norm starts from (the tiny
            // checkpoints are recorded with them).
            weight: vb.get_with_hints(channels, "weight", candle_nn::Init::Const(1.0))?,
            bias: vb.get_with_hints(channels, "bias", candle_nn::Init::Const(0.0))?,
            groups,
            eps: eps as f32,
            unit: Mutex::new(None),
        })
    }

    fn unit(&self, row: usize, like: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        let mut slot = self.unit.lock().expect("group norm cache");
        if let Some((n, one, zero)) = slot.as_ref()
            && *n == row
            && one.dtype() == like.dtype()
            && one.device().same_device(like.device())
        {
            crate::graph::keep_alive(&[one, zero]);
            return Ok((one.clone(), zero.clone()));
        }
        let one = Tensor::ones(row, like.dtype(), like.device())?;
        let zero = Tensor::zeros(row, like.dtype(), like.device())?;
        // Made while a CUDA graph records, they live in the graph's memory.
        if !crate::graph::recording() {
            *slot = Some((row, one.clone(), zero.clone()));
        }
        Ok((one, zero))
    }

    /// The normalisation without the per-channel scale and shift (for a
    /// caller that folds them into its next linear map).
    pub(crate) fn normalize(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        self.apply(xs, false, false)
    }

    /// A linear map `(weight (out, channels), bias (out,))` applied after
    /// this norm, with the norm's scale and shift folded in, in f32:
    /// W (γ ⊙ x̂ + β) + b = (W diag γ) x̂ + (W β + b).
    pub(crate) fn fold_into(
        &self,
        weight: &Tensor,
        bias: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let f32 = |t: &Tensor| t.to_dtype(candle_core::DType::F32);
        let w = f32(weight)?;
        let folded_w = w.broadcast_mul(&f32(&self.weight)?.unsqueeze(0)?)?;
        let folded_b = (w.matmul(&f32(&self.bias)?.unsqueeze(1)?)?.squeeze(1)? + f32(bias)?)?;
        Ok((folded_w, folded_b))
    }

    /// The norm, then SiLU (the resnets' and the output blocks' pattern).
    pub(crate) fn forward_silu(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        self.apply(xs, true, true)
    }

    /// The norm, with its scale and shift when `affine`, then SiLU when
    /// `silu`: the one-pass CPU kernel for the whole norm in f32 on the CPU,
    /// the fused CUDA kernel on a GPU, candle's operations elsewhere.
    fn apply(&self, xs: &Tensor, affine: bool, silu: bool) -> candle_core::Result<Tensor> {
        if affine && crate::cpu::applies(xs) {
            return crate::cpu::group_norm(
                xs,
                &self.weight,
                &self.bias,
                self.groups,
                self.eps,
                silu,
            );
        }
        let output = GroupNormOutput { affine, silu };
        if crate::fused::applies(xs) {
            return crate::fused::group_norm(
                xs,
                &self.weight,
                &self.bias,
                self.groups,
                self.eps,
                output,
            );
        }
        self.candle_ops(xs, output)
    }

    /// The norm as candle's operations (every device and type).
    fn candle_ops(&self, xs: &Tensor, output: GroupNormOutput) -> candle_core::Result<Tensor> {
        crate::fused::candle_group_norm(
            xs,
            &self.weight,
            &self.bias,
            self.groups,
            self.eps,
            output,
            &|row| self.unit(row, xs),
        )
    }
}

impl Module for GroupNorm {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        self.apply(xs, true, false)
    }
}

/// A layer's bias, or zeros of its output width when it has none, for a
/// caller that folds it into another term.
pub(crate) fn bias_or_zeros(bias: Option<&Tensor>, weight: &Tensor) -> candle_core::Result<Tensor> {
    match bias {
        Some(b) => Ok(b.clone()),
        None => Tensor::zeros(weight.dim(0)?, weight.dtype(), weight.device()),
    }
}

/// A convolution without its bias, and the bias as `(1, channels, 1, 1)`.
fn split_bias(conv: Conv2d) -> candle_core::Result<(Conv2d, Tensor)> {
    let bias = bias_or_zeros(conv.bias(), conv.weight())?.reshape((1, (), 1, 1))?;
    Ok((conv.without_bias(), bias))
}

/// diffusers' `ResnetBlock2D`: in the UNet with a time-embedding projection
/// added after the first convolution, in the VAE without; a 1×1 shortcut
/// where the channel count changes.
#[derive(Debug)]
pub(crate) struct ResnetBlock {
    norm1: GroupNorm,
    /// The convolutions without their biases: `conv1`'s is added with the
    /// time embedding, `conv2`'s with the shortcut's, one broadcast each.
    conv1: Conv2d,
    conv1_bias: Tensor,
    /// The UNet's; the VAE's blocks have none.
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    /// `conv2`'s bias plus the shortcut's, `(1, out, 1, 1)`.
    out_bias: Tensor,
    /// The 1×1 shortcut's weight as `(out, in)`: a matmul over the pixels,
    /// in the feature map's own layout.
    shortcut: Option<Tensor>,
    output_scale_factor: f64,
}

/// How a [`ResnetBlock`] is built.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ResnetConfig {
    pub groups: usize,
    pub eps: f64,
    /// The timestep embedding's width (the UNet), or none (the VAE).
    pub temb_channels: Option<usize>,
    pub output_scale_factor: f64,
    pub conv: ConvAlgorithm,
}

impl ResnetBlock {
    pub(crate) fn new(
        vb: VarBuilder,
        cin: usize,
        cout: usize,
        cfg: ResnetConfig,
    ) -> candle_core::Result<Self> {
        let norm1 = GroupNorm::new(vb.pp("norm1"), cfg.groups, cin, cfg.eps)?;
        let (conv1, conv1_bias) =
            split_bias(cfg.conv.conv2d((cin, cout, 3), 1, 1, vb.pp("conv1"))?)?;
        let time_emb_proj = cfg
            .temb_channels
            .map(|t| candle_nn::linear(t, cout, vb.pp("time_emb_proj")))
            .transpose()?;
        let norm2 = GroupNorm::new(vb.pp("norm2"), cfg.groups, cout, cfg.eps)?;
        let (conv2, mut out_bias) =
            split_bias(cfg.conv.conv2d((cout, cout, 3), 1, 1, vb.pp("conv2"))?)?;
        let shortcut = if cin != cout {
            let shortcut = cfg
                .conv
                .conv2d((cin, cout, 1), 0, 1, vb.pp("conv_shortcut"))?;
            let (conv, bias) = split_bias(shortcut)?;
            out_bias = (out_bias + bias)?;
            Some(conv.weight().reshape((cout, cin))?)
        } else {
            None
        };
        Ok(Self {
            norm1,
            conv1,
            conv1_bias,
            time_emb_proj,
            norm2,
            conv2,
            out_bias,
            shortcut,
            output_scale_factor: cfg.output_scale_factor,
        })
    }

    /// `temb_act`: the timestep embedding after its SiLU, shared by every
    /// block of the UNet (none in the VAE).
    pub(crate) fn forward(
        &self,
        xs: &Tensor,
        temb_act: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let norm_silu =
            |norm: &GroupNorm, x: &Tensor| section("resnet/norm+silu", || norm.forward_silu(x));
        // Each convolution's bias (and the second's residual) goes in as
        // its output is written on the CPU, in one pass after it elsewhere.
        let conv = |conv: &Conv2d, x: &Tensor, bias: &Tensor, residual: Option<&Tensor>| {
            section("resnet/conv", || conv.forward_with(x, bias, residual))
        };
        let bias1 = section("resnet/time", || match (&self.time_emb_proj, temb_act) {
            (Some(proj), Some(temb)) => {
                let t = proj
                    .forward(temb)?
                    .unsqueeze(D::Minus1)?
                    .unsqueeze(D::Minus1)?;
                // (batch, channels, 1, 1): one bias per sample and channel.
                t.broadcast_add(&self.conv1_bias)
            }
            (None, None) => Ok(self.conv1_bias.clone()),
            _ => candle_core::bail!(
                "a resnet block takes a time embedding exactly when it has a projection for one"
            ),
        })?;
        let h = conv(&self.conv1, &norm_silu(&self.norm1, xs)?, &bias1, None)?;
        let skip = section("resnet/skip", || match &self.shortcut {
            Some(w) => {
                let (b, cin, height, width) = xs.dims4()?;
                let pixels = xs.contiguous()?.reshape((b, cin, height * width))?;
                w.broadcast_left(b)?
                    .matmul(&pixels)?
                    .reshape((b, (), height, width))
            }
            None => Ok(xs.clone()),
        })?;
        let h = norm_silu(&self.norm2, &h)?;
        let out = conv(&self.conv2, &h, &self.out_bias, Some(&skip))?;
        if self.output_scale_factor == 1.0 {
            Ok(out)
        } else {
            out / self.output_scale_factor
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn assert_close(a: &Tensor, b: &Tensor) {
        let diff = crate::test_util::max_diff(a, b);
        assert!(diff < 1e-5, "max |a - b| = {diff}");
    }

    #[test]
    fn fused_group_norm_matches_candle_nn() {
        let dev = Device::Cpu;
        let x = ((crate::test_util::randn(&[2, 8, 5, 3]) * 3.0).unwrap() + 1.5).unwrap();
        let w = crate::test_util::randn(&[8]);
        let b = crate::test_util::randn(&[8]);
        let mut map = std::collections::HashMap::new();
        map.insert("weight".to_string(), w.clone());
        map.insert("bias".to_string(), b.clone());
        let vb = VarBuilder::from_tensors(map, DType::F32, &dev);
        let norm = GroupNorm::new(vb, 4, 8, 1e-6).unwrap();
        let theirs = candle_nn::GroupNorm::new(w, b, 8, 4, 1e-6)
            .unwrap()
            .forward(&x)
            .unwrap();
        // The CPU kernel (f32 on the CPU) and the candle operations other
        // devices run.
        let affine = GroupNormOutput {
            affine: true,
            silu: false,
        };
        assert_close(&norm.forward(&x).unwrap(), &theirs);
        assert_close(&norm.candle_ops(&x, affine).unwrap(), &theirs);
        let silu = candle_nn::ops::silu(&theirs).unwrap();
        assert_close(&norm.forward_silu(&x).unwrap(), &silu);
    }

    #[test]
    fn resnet_matches_candle_transformers() {
        use candle_transformers::models::stable_diffusion::resnet::{
            ResnetBlock2D, ResnetBlock2DConfig,
        };
        let dev = Device::Cpu;
        let varmap = candle_nn::VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
        let theirs = ResnetBlock2D::new(
            vb.clone(),
            8,
            ResnetBlock2DConfig {
                out_channels: Some(16),
                temb_channels: Some(12),
                groups: 4,
                ..Default::default()
            },
        )
        .unwrap();
        let ours = ResnetBlock::new(
            vb,
            8,
            16,
            ResnetConfig {
                groups: 4,
                eps: 1e-6,
                temb_channels: Some(12),
                output_scale_factor: 1.0,
                conv: ConvAlgorithm::default(),
            },
        )
        .unwrap();
        let x = crate::test_util::randn(&[2, 8, 6, 5]);
        let t = crate::test_util::randn(&[2, 12]);
        let a = theirs.forward(&x, Some(&t)).unwrap();
        let b = ours
            .forward(&x, Some(&candle_nn::ops::silu(&t).unwrap()))
            .unwrap();
        assert_close(&a, &b);
    }

    #[test]
    fn the_unit_scale_made_while_a_graph_records_is_not_kept() {
        let dev = Device::Cpu;
        let norm =
            GroupNorm::new(candle_nn::VarBuilder::zeros(DType::F32, &dev), 2, 4, 1e-5).unwrap();
        let like = Tensor::zeros(1, DType::F32, &dev).unwrap();
        let kept = || norm.unit.lock().unwrap().is_some();
        let (made, _) = crate::graph::while_recording(|| norm.unit(6, &like));
        let (one, zero) = made.unwrap();
        assert_eq!(one.to_vec1::<f32>().unwrap(), [1.0; 6]);
        assert_eq!(zero.to_vec1::<f32>().unwrap(), [0.0; 6]);
        assert!(!kept(), "kept a tensor made in a graph's memory");
        let (one, zero) = norm.unit(6, &like).unwrap();
        assert!(kept(), "eager calls keep it");
        // Taken from the cache while a graph records, the graph keeps them.
        let (_, read) = crate::graph::while_recording(|| norm.unit(6, &like));
        let ids: Vec<_> = read.iter().map(Tensor::id).collect();
        assert_eq!(ids, [one.id(), zero.id()]);
    }
}
