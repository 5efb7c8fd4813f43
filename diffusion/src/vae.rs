//! The VAE (diffusers' `AutoencoderKL`): the decoder that turns latents into
//! pixels after every render, and the encoder that turns an image into
//! latents for img2img and the hires fix.
//!
//! Built from the UNet's parts — [`ResnetBlock`]s without a time embedding,
//! the fused [`GroupNorm`], the resampling convolutions, each convolution on
//! the load's fixed cuDNN algorithm — so the decoder's large feature maps
//! (128 channels at the full output size) get the same one-pass group norm
//! as the UNet instead of candle-nn's dozen passes over an f32 copy.
//!
//! The mid block's attention (one head over every pixel) works on the
//! feature map's own `(batch, channels, pixels)` layout: the group norm's
//! scale and shift and the softmax scale are folded into one stacked q/k/v
//! projection, and the output comes out channel-first, so no transpose is
//! ever copied. Scores and softmax run in f32 (diffusers' `upcast_softmax`).

use candle_core::{DType, Module, Tensor};
use candle_nn::VarBuilder;

use crate::conv::{Conv2d, ConvAlgorithm};
use crate::model::VaeConfig;
use crate::profile::section;
use crate::resnet::{GroupNorm, ResnetBlock, ResnetConfig};
use crate::unet::{Downsample, Upsample};

/// The VAE's group norms and resnets all use this epsilon.
const EPS: f64 = 1e-6;

fn resnet_config(cfg: &VaeConfig, conv: ConvAlgorithm) -> ResnetConfig {
    ResnetConfig {
        groups: cfg.norm_num_groups,
        eps: EPS,
        temb_channels: None,
        output_scale_factor: 1.0,
        conv,
    }
}

/// `count` resnets under `vb.resnets`, the first from `cin` channels.
fn resnets(
    vb: &VarBuilder,
    count: usize,
    cin: usize,
    channels: usize,
    cfg: ResnetConfig,
) -> candle_core::Result<Vec<ResnetBlock>> {
    (0..count)
        .map(|i| {
            let input = if i == 0 { cin } else { channels };
            ResnetBlock::new(vb.pp("resnets").pp(i.to_string()), input, channels, cfg)
        })
        .collect()
}

/// A `(channels, channels)` projection and its bias, saved as a linear layer
/// (`to_q`, …, or the old `query`, …) or as a 1×1 convolution. The hints are
/// PyTorch's initialisation of a linear layer (what the tiny-checkpoint
/// writer records).
fn projection(vb: &VarBuilder, channels: usize) -> candle_core::Result<(Tensor, Tensor)> {
    let weight = vb
        .get_with_hints(
            (channels, channels),
            "weight",
            candle_nn::init::DEFAULT_KAIMING_NORMAL,
        )
        .or_else(|_| {
            vb.get((channels, channels, 1, 1), "weight")?
                .reshape((channels, channels))
        })?;
    let bound = (channels as f64).powf(-0.5);
    let bias = vb.get_with_hints(
        channels,
        "bias",
        candle_nn::Init::Uniform {
            lo: -bound,
            up: bound,
        },
    )?;
    Ok((weight, bias))
}

/// The mid block's self-attention over all pixels, one head.
#[derive(Debug)]
struct SpatialAttention {
    norm: GroupNorm,
    /// `[W_q · s; W_k; W_v] · diag(γ)`, `(3c, c)`; s = c^-½.
    qkv_weight: Tensor,
    /// `[(W_q β + b_q) · s; W_k β + b_k; W_v β + b_v]`, `(3c, 1)`.
    qkv_bias: Tensor,
    out_weight: Tensor,
    /// `(c, 1)`.
    out_bias: Tensor,
}

impl SpatialAttention {
    fn new(vb: VarBuilder, channels: usize, groups: usize) -> candle_core::Result<Self> {
        let norm = GroupNorm::new(vb.pp("group_norm"), groups, channels, EPS)?;
        let names = if vb.contains_tensor("to_q.weight") || !vb.contains_tensor("query.weight") {
            ["to_q", "to_k", "to_v", "to_out.0"]
        } else {
            ["query", "key", "value", "proj_attn"]
        };
        let [q, k, v, out] = names.map(|name| projection(&vb.pp(name), channels));
        let (out_weight, out_bias) = out?;
        let dtype = out_weight.dtype();
        let scale = (channels as f64).powf(-0.5);
        let mut weights = Vec::with_capacity(3);
        let mut biases = Vec::with_capacity(3);
        for (i, part) in [q, k, v].into_iter().enumerate() {
            let (w, b) = part?;
            let (folded_w, folded_b) = norm.fold_into(&w, &b)?;
            let s = if i == 0 { scale } else { 1.0 };
            weights.push((folded_w * s)?);
            biases.push((folded_b.unsqueeze(1)? * s)?);
        }
        Ok(Self {
            norm,
            qkv_weight: Tensor::cat(&weights, 0)?.to_dtype(dtype)?,
            qkv_bias: Tensor::cat(&biases, 0)?.to_dtype(dtype)?,
            out_weight,
            out_bias: out_bias.unsqueeze(1)?,
        })
    }

    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let (b, c, h, w) = xs.dims4()?;
        let pixels = self.norm.normalize(xs)?.reshape((b, c, h * w))?;
        // (b, 3c, pixels); the shared weight is the left operand, which
        // every backend multiplies batch by batch.
        let qkv = crate::fused::add_bias(
            &self.qkv_weight.broadcast_left(b)?.matmul(&pixels)?,
            &self.qkv_bias,
            None,
        )?;
        let part = |i: usize| qkv.narrow(1, i * c, c);
        let out = if crate::cpu::applies(&qkv) {
            // One head of `(b, pixels, 1, c)` views; the scores stay in cache.
            let head = |i: usize| part(i)?.t()?.unsqueeze(2);
            let out = crate::fused::attention(&head(0)?, &head(1)?, &head(2)?, 1.0)?;
            out.squeeze(2)?.t()?
        } else {
            materialised_attention(&part(0)?, &part(1)?, &part(2)?)?
        };
        let out = self.out_weight.broadcast_left(b)?.matmul(&out)?;
        crate::fused::add_bias(&out, &self.out_bias, Some(&xs.reshape((b, c, h * w))?))?
            .reshape((b, c, h, w))
    }
}

/// `v · softmax(qᵀk)ᵀ` of channel-first `(b, c, pixels)` parts, the scores
/// and the softmax in f32.
fn materialised_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> candle_core::Result<Tensor> {
    let dtype = v.dtype();
    let (q, k) = (q.to_dtype(DType::F32)?, k.to_dtype(DType::F32)?);
    // scores[i, j] = q_i · k_j over the channels: (b, pixels, pixels).
    let scores = q.t()?.matmul(&k)?;
    let probs = crate::softmax::softmax_last_dim(&scores)?.to_dtype(dtype)?;
    // out[:, i] = Σ_j probs[i, j] v_j, channel-first: v · probsᵀ.
    v.matmul(&probs.t()?)
}

/// `UNetMidBlock2D` of the VAE: resnet, attention (unless the config turns
/// it off), resnet.
#[derive(Debug)]
struct MidBlock {
    first: ResnetBlock,
    attention: Option<SpatialAttention>,
    second: ResnetBlock,
}

impl MidBlock {
    fn new(
        vb: VarBuilder,
        channels: usize,
        cfg: &VaeConfig,
        conv: ConvAlgorithm,
    ) -> candle_core::Result<Self> {
        let r = resnet_config(cfg, conv);
        let mut blocks = resnets(&vb, 2, channels, channels, r)?.into_iter();
        let (Some(first), Some(second)) = (blocks.next(), blocks.next()) else {
            candle_core::bail!("the mid block has two resnets");
        };
        let attention = cfg
            .mid_block_add_attention
            .then(|| SpatialAttention::new(vb.pp("attentions.0"), channels, cfg.norm_num_groups))
            .transpose()?;
        Ok(Self {
            first,
            attention,
            second,
        })
    }

    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let mut xs = section("resnet", || self.first.forward(xs, None))?;
        if let Some(a) = &self.attention {
            xs = section("attention", || a.forward(&xs))?;
        }
        section("resnet", || self.second.forward(&xs, None))
    }
}

/// Group norm, SiLU and the last convolution of both halves.
#[derive(Debug)]
struct Head {
    norm: GroupNorm,
    conv: Conv2d,
}

impl Head {
    fn new(
        vb: &VarBuilder,
        (cin, cout): (usize, usize),
        cfg: &VaeConfig,
        conv: ConvAlgorithm,
    ) -> candle_core::Result<Self> {
        Ok(Self {
            norm: GroupNorm::new(vb.pp("conv_norm_out"), cfg.norm_num_groups, cin, EPS)?,
            conv: conv.conv2d((cin, cout, 3), 1, 1, vb.pp("conv_out"))?,
        })
    }

    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        self.conv.forward(&self.norm.forward_silu(xs)?)
    }
}

/// A checked VAE config: the channel list is not empty.
fn levels(cfg: &VaeConfig) -> candle_core::Result<&[usize]> {
    if cfg.block_out_channels.is_empty() {
        candle_core::bail!("vae config: block_out_channels is empty");
    }
    Ok(&cfg.block_out_channels)
}

/// The decoder half: `post_quant_conv`, then `decoder.*`.
#[derive(Debug)]
pub(crate) struct Decoder {
    post_quant_conv: Option<Conv2d>,
    conv_in: Conv2d,
    mid: MidBlock,
    /// From the deepest level up: resnets, then a ×2 upsample but at the top.
    up: Vec<(Vec<ResnetBlock>, Option<Upsample>)>,
    head: Head,
}

impl Decoder {
    /// `vb`: the VAE's root (the folder's `vae/` weights).
    pub(crate) fn new(
        vb: VarBuilder,
        cfg: &VaeConfig,
        conv: ConvAlgorithm,
    ) -> candle_core::Result<Self> {
        let channels: Vec<usize> = levels(cfg)?.iter().rev().copied().collect();
        let latent = cfg.latent_channels;
        let post_quant_conv = cfg
            .use_post_quant_conv
            .then(|| conv.conv2d((latent, latent, 1), 0, 1, vb.pp("post_quant_conv")))
            .transpose()?;
        let vb = vb.pp("decoder");
        let deepest = channels[0];
        let r = resnet_config(cfg, conv);
        let mut up = Vec::with_capacity(channels.len());
        for (i, &c) in channels.iter().enumerate() {
            let vb = vb.pp("up_blocks").pp(i.to_string());
            let cin = if i == 0 { deepest } else { channels[i - 1] };
            let blocks = resnets(&vb, cfg.layers_per_block + 1, cin, c, r)?;
            let upsample = (i + 1 < channels.len())
                .then(|| Upsample::new(vb.clone(), c, conv))
                .transpose()?;
            up.push((blocks, upsample));
        }
        let top = *channels.last().expect("checked non-empty");
        Ok(Self {
            post_quant_conv,
            conv_in: conv.conv2d((latent, deepest, 3), 1, 1, vb.pp("conv_in"))?,
            mid: MidBlock::new(vb.pp("mid_block"), deepest, cfg, conv)?,
            up,
            head: Head::new(&vb, (top, 3), cfg, conv)?,
        })
    }

    /// Pixels in about [-1, 1], `(batch, 3, H, W)`, from latents already
    /// divided by the scaling factor.
    pub(crate) fn forward(&self, z: &Tensor) -> candle_core::Result<Tensor> {
        let z = match &self.post_quant_conv {
            Some(conv) => conv.forward(z)?,
            None => z.clone(),
        };
        let xs = section("conv_in", || self.conv_in.forward(&z))?;
        let mut xs = self.mid.forward(&xs)?;
        for (blocks, upsample) in &self.up {
            for block in blocks {
                xs = section("resnet", || block.forward(&xs, None))?;
            }
            if let Some(u) = upsample {
                xs = section("upsample", || u.forward(&xs, None))?;
            }
        }
        section("head", || self.head.forward(&xs))
    }
}

/// The encoder half: `encoder.*`, then `quant_conv`.
#[derive(Debug)]
pub(crate) struct Encoder {
    conv_in: Conv2d,
    /// From the top level down: resnets, then a ×½ downsample but at the
    /// deepest.
    down: Vec<(Vec<ResnetBlock>, Option<Downsample>)>,
    mid: MidBlock,
    head: Head,
    quant_conv: Option<Conv2d>,
}

impl Encoder {
    /// `vb`: the VAE's root (the folder's `vae/` weights).
    pub(crate) fn new(
        vb: VarBuilder,
        cfg: &VaeConfig,
        conv: ConvAlgorithm,
    ) -> candle_core::Result<Self> {
        let channels = levels(cfg)?;
        let moments = 2 * cfg.latent_channels;
        let quant_conv = cfg
            .use_quant_conv
            .then(|| conv.conv2d((moments, moments, 1), 0, 1, vb.pp("quant_conv")))
            .transpose()?;
        let vb = vb.pp("encoder");
        let r = resnet_config(cfg, conv);
        let mut down = Vec::with_capacity(channels.len());
        for (i, &c) in channels.iter().enumerate() {
            let vb = vb.pp("down_blocks").pp(i.to_string());
            let cin = if i == 0 { channels[0] } else { channels[i - 1] };
            let blocks = resnets(&vb, cfg.layers_per_block, cin, c, r)?;
            // The VAE pads right and bottom, then convolves unpadded.
            let downsample = (i + 1 < channels.len())
                .then(|| Downsample::new(vb.clone(), c, 0, conv))
                .transpose()?;
            down.push((blocks, downsample));
        }
        let deepest = *channels.last().expect("checked non-empty");
        Ok(Self {
            conv_in: conv.conv2d((3, channels[0], 3), 1, 1, vb.pp("conv_in"))?,
            down,
            mid: MidBlock::new(vb.pp("mid_block"), deepest, cfg, conv)?,
            head: Head::new(&vb, (deepest, moments), cfg, conv)?,
            quant_conv,
        })
    }

    /// Mean and standard deviation of the latent distribution of pixels in
    /// [-1, 1], `(batch, 3, H, W)`.
    pub(crate) fn forward(&self, xs: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        let mut xs = self.conv_in.forward(xs)?;
        for (blocks, downsample) in &self.down {
            for block in blocks {
                xs = block.forward(&xs, None)?;
            }
            if let Some(d) = downsample {
                xs = d.forward(&xs)?;
            }
        }
        let mut xs = self.head.forward(&self.mid.forward(&xs)?)?;
        if let Some(q) = &self.quant_conv {
            xs = q.forward(&xs)?;
        }
        let half = xs.dim(1)? / 2;
        let logvar = xs.narrow(1, half, half)?.clamp(-30f32, 20f32)?;
        Ok((xs.narrow(1, 0, half)?, (logvar * 0.5)?.exp()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::max_diff;
    use candle_core::Device;
    use candle_transformers::models::stable_diffusion::vae::{AutoEncoderKL, AutoEncoderKLConfig};

    /// Norm scales around 1 with shifts, and attention projections large
    /// enough that the attention is sharp (a wrong scale shows).
    fn randomize(varmap: &candle_nn::VarMap) {
        for (name, var) in varmap.data().lock().unwrap().iter() {
            let shape = var.as_tensor().shape().clone();
            let normal = |std: f32| (crate::test_util::randn(shape.dims()) * std as f64).unwrap();
            let fresh = if name.contains("norm") {
                (normal(0.5) + 1.0).unwrap()
            } else if name.contains("query") || name.contains("key") {
                normal(1.0)
            } else if name.contains("value") || name.contains("proj_attn") {
                normal(0.3)
            } else {
                continue;
            };
            var.set(&fresh).unwrap();
        }
    }

    fn config(json: &str) -> VaeConfig {
        serde_json::from_str(json).unwrap()
    }

    /// Random weights recorded by candle-transformers' VAE (so both read the
    /// same tensors). Its builder leaves the attention's projections at zero
    /// and the norms at unit scale: both are drawn afresh here, so the
    /// attention and the folds are exercised.
    fn random_vae(cfg: &VaeConfig) -> (candle_nn::VarMap, AutoEncoderKL) {
        let dev = Device::Cpu;
        let varmap = candle_nn::VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
        let theirs = AutoEncoderKL::new(
            vb,
            3,
            3,
            AutoEncoderKLConfig {
                block_out_channels: cfg.block_out_channels.clone(),
                layers_per_block: cfg.layers_per_block,
                latent_channels: cfg.latent_channels,
                norm_num_groups: cfg.norm_num_groups,
                use_quant_conv: cfg.use_quant_conv,
                use_post_quant_conv: cfg.use_post_quant_conv,
            },
        )
        .unwrap();
        randomize(&varmap);
        (varmap, theirs)
    }

    #[test]
    fn decoder_and_encoder_match_candle_transformers() {
        let cfg = config(
            r#"{"block_out_channels": [8, 16], "layers_per_block": 1,
                "latent_channels": 4, "norm_num_groups": 4}"#,
        );
        let (varmap, theirs) = random_vae(&cfg);
        let dev = Device::Cpu;
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
        let algo = ConvAlgorithm::default();
        let decoder = Decoder::new(vb, &cfg, algo).unwrap();

        // Batch 1: candle's attention block feeds a transposed input to a
        // shared-weight matmul, which candle's CPU backend gets wrong for
        // larger batches (see `batches_decode_as_their_images_alone`).
        let z = crate::test_util::randn(&[1, 4, 6, 5]);
        let ours = decoder.forward(&z).unwrap();
        assert_eq!(ours.dims(), [1, 3, 12, 10]);
        let diff = max_diff(&ours, &theirs.decode(&z).unwrap());
        assert!(diff < 1e-4, "decoder: max |ours - candle| = {diff}");

        // candle's distribution keeps its moments private and samples with an
        // unseeded generator: pin the log-variance rows of `quant_conv` to
        // -30 so its sample is its mean (to within e^-15).
        {
            let data = varmap.data().lock().unwrap();
            let (w, bias) = (&data["quant_conv.weight"], &data["quant_conv.bias"]);
            let keep = w.as_tensor().narrow(0, 0, 4).unwrap();
            let w_new = Tensor::cat(&[&keep, &keep.zeros_like().unwrap()], 0).unwrap();
            w.set(&w_new).unwrap();
            let b_keep = bias.as_tensor().narrow(0, 0, 4).unwrap();
            let b_new = Tensor::cat(
                &[&b_keep, &(b_keep.zeros_like().unwrap() - 30.0).unwrap()],
                0,
            );
            bias.set(&b_new.unwrap()).unwrap();
        }
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
        let encoder = Encoder::new(vb, &cfg, algo).unwrap();
        let img = crate::test_util::randn(&[1, 3, 12, 10]);
        let (mean, std) = encoder.forward(&img).unwrap();
        assert_eq!(mean.dims(), [1, 4, 6, 5]);
        let theirs = theirs.encode(&img).unwrap().sample().unwrap();
        let spread = mean
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(spread > 0.1, "a degenerate encoder output ({spread})");
        let diff = max_diff(&mean, &theirs);
        assert!(diff < 1e-4, "encoder: max |ours - candle| = {diff}");
        let std_max = std.max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!((std_max - (-15f32).exp()).abs() < 1e-9, "std {std_max}");
    }

    #[test]
    fn spatial_attention_matches_candle_transformers() {
        use candle_transformers::models::stable_diffusion::attention::{
            AttentionBlock, AttentionBlockConfig,
        };
        let dev = Device::Cpu;
        let varmap = candle_nn::VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
        let cfg = AttentionBlockConfig {
            num_head_channels: None,
            num_groups: 4,
            rescale_output_factor: 1.0,
            eps: EPS,
        };
        let theirs = AttentionBlock::new(vb.clone(), 16, cfg).unwrap();
        randomize(&varmap);
        let ours = SpatialAttention::new(vb, 16, 4).unwrap();
        let x = crate::test_util::randn(&[1, 16, 8, 7]);
        let (a, b) = (ours.forward(&x).unwrap(), theirs.forward(&x).unwrap());
        let diff = max_diff(&a, &b);
        assert!(diff < 1e-4, "max |ours - candle| = {diff}");
        let effect = max_diff(&a, &x);
        assert!(
            effect > 0.1,
            "the attention barely changes its input ({effect})"
        );
    }

    #[test]
    fn batches_decode_as_their_images_alone() {
        let cfg = config(r#"{"block_out_channels": [8, 16], "norm_num_groups": 4}"#);
        let (varmap, _) = random_vae(&cfg);
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let decoder = Decoder::new(vb, &cfg, ConvAlgorithm::default()).unwrap();
        let z = crate::test_util::randn(&[3, 4, 5, 6]);
        let batch = decoder.forward(&z).unwrap();
        for i in 0..3 {
            let alone = decoder.forward(&z.narrow(0, i, 1).unwrap()).unwrap();
            let diff = max_diff(&batch.narrow(0, i, 1).unwrap(), &alone);
            assert!(diff < 1e-5, "image {i}: max |batch - alone| = {diff}");
        }
    }

    #[test]
    fn a_decoder_without_mid_attention_skips_it() {
        let cfg = config(r#"{"block_out_channels": [8], "norm_num_groups": 4}"#);
        let (varmap, _) = random_vae(&cfg);
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let with = Decoder::new(vb.clone(), &cfg, ConvAlgorithm::default()).unwrap();
        let cfg_off = VaeConfig {
            mid_block_add_attention: false,
            ..cfg
        };
        let without = Decoder::new(vb, &cfg_off, ConvAlgorithm::default()).unwrap();
        assert!(with.mid.attention.is_some() && without.mid.attention.is_none());
        let z = crate::test_util::randn(&[1, 4, 4, 4]);
        let diff = max_diff(&with.forward(&z).unwrap(), &without.forward(&z).unwrap());
        assert!(diff > 1e-4, "the attention changed nothing ({diff})");
    }

    #[test]
    fn a_profiled_decode_names_each_block_once_per_call() {
        // Three levels, layers_per_block 1 (two resnets a decoder level):
        // the mid block's two resnets and its attention, two resnets a
        // level, an upsample between levels, the head.
        let cfg = config(
            r#"{"block_out_channels": [8, 16, 16], "layers_per_block": 1, "norm_num_groups": 4}"#,
        );
        let (varmap, _) = random_vae(&cfg);
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let decoder = Decoder::new(vb, &cfg, ConvAlgorithm::default()).unwrap();
        let z = crate::test_util::randn(&[1, 4, 4, 4]);
        let (out, sections) = crate::profile::profile(&Device::Cpu, || decoder.forward(&z));
        assert_eq!(out.unwrap().dims4().unwrap(), (1, 3, 16, 16));
        let calls = |name: &str| {
            sections
                .iter()
                .find(|s| s.name == name)
                .map_or(0, |s| s.calls)
        };
        assert_eq!(calls("conv_in"), 1);
        assert_eq!(calls("resnet"), 2 + 3 * 2);
        assert_eq!(calls("resnet/conv"), 2 * (2 + 3 * 2));
        assert_eq!(calls("attention"), 1);
        assert_eq!(calls("upsample"), 2);
        assert_eq!(calls("upsample/nearest"), 2);
        assert_eq!(calls("upsample/conv"), 2);
        assert_eq!(calls("head"), 1);
    }
}
