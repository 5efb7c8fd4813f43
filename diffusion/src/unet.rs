//! The denoising UNet (diffusers' `UNet2DConditionModel`), the project's
//! own on candle-nn's convolutions and linear layers, with candle-
//! transformers' timestep embedding. Our own because candle-transformers'
//! UNet lacks SDXL's added conditioning (`addition_embed_type: "text_time"`:
//! the pooled text embedding and the size/crop ids, embedded and added to
//! the timestep embedding), its attention leaves the compute type (see
//! [`crate::attention`]), and its group norms are a dozen operations each
//! (see [`crate::resnet`]).
//!
//! The layout is read from the folder's `unet/config.json`; nothing about a
//! model family is hard-coded.

use candle_core::{Device, Module, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::stable_diffusion::embeddings::{TimestepEmbedding, Timesteps};

use crate::DiffusionError;
use crate::attention::{AttentionKernel, Transformer2D, TransformerConfig};
use crate::conv::{Conv2d, ConvAlgorithm};
use crate::model::UnetConfig;
use crate::profile::section;
use crate::resnet::{GroupNorm, ResnetBlock, ResnetConfig};

/// One resolution level of the UNet.
#[derive(Debug, Clone, PartialEq)]
pub struct Level {
    pub channels: usize,
    /// Attention heads of this level's transformers.
    pub heads: usize,
    /// Transformer layers per attention block; `None` for a level without
    /// attention (`DownBlock2D`/`UpBlock2D`).
    pub transformer_layers: Option<usize>,
}

/// SDXL's added conditioning: `add_time_proj` (sinusoidal, `time_dim` per
/// id) and `add_embedding` (`input_dim` = pooled width + ids × `time_dim`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TextTime {
    pub time_dim: usize,
    pub input_dim: usize,
}

/// Everything the UNet's construction needs, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct UnetSpec {
    pub in_channels: usize,
    pub out_channels: usize,
    pub levels: Vec<Level>,
    pub layers_per_block: usize,
    pub cross_attention_dim: usize,
    pub use_linear_projection: bool,
    pub upcast_attention: bool,
    pub norm_num_groups: usize,
    pub norm_eps: f64,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
    pub downsample_padding: usize,
    pub mid_block_scale_factor: f64,
    pub center_input_sample: bool,
    pub text_time: Option<TextTime>,
    /// How attention is computed (not from the config: the load chooses;
    /// [`AttentionKernel::Matmul`] until then).
    pub attention: AttentionKernel,
    /// The convolutions' cuDNN algorithm (chosen by the load, like attention).
    pub conv_algorithm: ConvAlgorithm,
}

/// Values given as one number or one per block.
pub(crate) fn per_block(
    v: &serde_json::Value,
    n: usize,
    what: &str,
) -> Result<Vec<usize>, DiffusionError> {
    let bad = || {
        DiffusionError::BadModel(format!(
            "unet config: {what} must be a number or a list of {n} numbers"
        ))
    };
    match v {
        serde_json::Value::Number(x) => Ok(vec![x.as_u64().ok_or_else(bad)? as usize; n]),
        serde_json::Value::Array(a) if a.len() == n => a
            .iter()
            .map(|x| x.as_u64().map(|x| x as usize).ok_or_else(bad))
            .collect(),
        _ => Err(bad()),
    }
}

impl UnetSpec {
    /// Translate and check a folder's `unet/config.json`.
    pub fn from_config(c: &UnetConfig) -> Result<Self, DiffusionError> {
        let n = c.block_out_channels.len();
        let bad = |m: String| Err(DiffusionError::BadModel(format!("unet config: {m}")));
        if n == 0 || c.down_block_types.len() != n || c.up_block_types.len() != n {
            return bad(format!(
                "{} block_out_channels, {} down blocks and {} up blocks do not match",
                n,
                c.down_block_types.len(),
                c.up_block_types.len()
            ));
        }
        let text_time = match c.addition_embed_type.as_deref() {
            None => None,
            Some("text_time") => {
                let (Some(time_dim), Some(input_dim)) = (
                    c.addition_time_embed_dim,
                    c.projection_class_embeddings_input_dim,
                ) else {
                    return bad("addition_embed_type \"text_time\" needs addition_time_embed_dim and projection_class_embeddings_input_dim".into());
                };
                Some(TextTime {
                    time_dim,
                    input_dim,
                })
            }
            Some(other) => return bad(format!("addition_embed_type {other:?} is not supported")),
        };
        if c.time_cond_proj_dim.is_some() || c.class_embed_type.is_some() {
            return bad("time_cond_proj_dim and class_embed_type are not supported".into());
        }
        if let Some(m) = &c.mid_block_type
            && m != "UNetMidBlock2DCrossAttn"
        {
            return bad(format!("mid_block_type {m:?} is not supported"));
        }
        // diffusers reads `attention_head_dim` as the number of heads when
        // `num_attention_heads` is absent (a naming slip it keeps for
        // compatibility).
        let heads_v = c
            .num_attention_heads
            .clone()
            .filter(|v| !v.is_null())
            .or_else(|| c.attention_head_dim.clone())
            .unwrap_or_else(|| 8.into());
        let heads = per_block(&heads_v, n, "attention_head_dim")?;
        let tl = per_block(
            c.transformer_layers_per_block.as_ref().unwrap_or(&1.into()),
            n,
            "transformer_layers_per_block",
        )?;
        let layers = per_block(&c.layers_per_block, n, "layers_per_block")?;
        if layers.iter().any(|&l| l != layers[0]) {
            return bad("different layers_per_block per block are not supported".into());
        }
        let cross = per_block(&c.cross_attention_dim, n, "cross_attention_dim")?;
        if cross.iter().any(|&x| x != cross[0]) {
            return bad("different cross_attention_dim per block are not supported".into());
        }
        let mut levels = Vec::with_capacity(n);
        for i in 0..n {
            let attn = match c.down_block_types[i].as_str() {
                "CrossAttnDownBlock2D" => true,
                "DownBlock2D" => false,
                other => return bad(format!("down block type {other:?} is not supported")),
            };
            let up = c.up_block_types[n - 1 - i].as_str();
            let mirrored = if attn {
                up == "CrossAttnUpBlock2D"
            } else {
                up == "UpBlock2D"
            };
            if !mirrored {
                return bad(format!(
                    "up block {up:?} does not mirror down block {:?}",
                    c.down_block_types[i]
                ));
            }
            let ch = c.block_out_channels[i];
            if !ch.is_multiple_of(heads[i]) || !ch.is_multiple_of(c.norm_num_groups) {
                return bad(format!(
                    "block {i}: {ch} channels are not divisible by {} heads and {} norm groups",
                    heads[i], c.norm_num_groups
                ));
            }
            levels.push(Level {
                channels: ch,
                heads: heads[i],
                transformer_layers: attn.then_some(tl[i]),
            });
        }
        Ok(Self {
            in_channels: c.in_channels,
            out_channels: c.out_channels,
            levels,
            layers_per_block: layers[0],
            cross_attention_dim: cross[0],
            use_linear_projection: c.use_linear_projection,
            upcast_attention: c.upcast_attention.unwrap_or(false),
            norm_num_groups: c.norm_num_groups,
            norm_eps: c.norm_eps,
            flip_sin_to_cos: c.flip_sin_to_cos,
            freq_shift: c.freq_shift,
            downsample_padding: c.downsample_padding,
            mid_block_scale_factor: c.mid_block_scale_factor,
            center_input_sample: c.center_input_sample,
            text_time,
            attention: AttentionKernel::Matmul,
            conv_algorithm: ConvAlgorithm::default(),
        })
    }

    /// The transformer blocks of an attention level.
    fn transformer(&self, level: &Level, depth: usize) -> TransformerConfig {
        TransformerConfig {
            channels: level.channels,
            heads: level.heads,
            depth,
            context_dim: self.cross_attention_dim,
            groups: self.norm_num_groups,
            linear_projection: self.use_linear_projection,
            upcast_attention: self.upcast_attention,
            attention: self.attention,
        }
    }

    /// Width of the timestep embedding (four times the first level's).
    fn time_embed_dim(&self) -> usize {
        self.levels[0].channels * 4
    }
}

/// Halves the feature map: a stride-2 convolution (`downsamplers.0.conv`);
/// with `downsample_padding` 0 the map is padded right and bottom first.
#[derive(Debug)]
pub(crate) struct Downsample {
    conv: Conv2d,
    pad: bool,
}

impl Downsample {
    pub(crate) fn new(
        vb: VarBuilder,
        channels: usize,
        padding: usize,
        algo: ConvAlgorithm,
    ) -> candle_core::Result<Self> {
        Ok(Self {
            conv: algo.conv2d(
                (channels, channels, 3),
                padding,
                2,
                vb.pp("downsamplers.0.conv"),
            )?,
            pad: padding == 0,
        })
    }

    pub(crate) fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        if self.pad {
            let xs = xs.pad_with_zeros(3, 0, 1)?.pad_with_zeros(2, 0, 1)?;
            self.conv.forward(&xs)
        } else {
            self.conv.forward(xs)
        }
    }
}

/// Doubles the feature map (or grows it to a skip connection's size):
/// nearest-neighbour, then a convolution (`upsamplers.0.conv`).
#[derive(Debug)]
pub(crate) struct Upsample {
    conv: Conv2d,
}

impl Upsample {
    pub(crate) fn new(
        vb: VarBuilder,
        channels: usize,
        algo: ConvAlgorithm,
    ) -> candle_core::Result<Self> {
        Ok(Self {
            conv: algo.conv2d((channels, channels, 3), 1, 1, vb.pp("upsamplers.0.conv"))?,
        })
    }

    pub(crate) fn forward(
        &self,
        xs: &Tensor,
        size: Option<(usize, usize)>,
    ) -> candle_core::Result<Tensor> {
        let (_, _, h, w) = xs.dims4()?;
        let (th, tw) = size.unwrap_or((2 * h, 2 * w));
        let xs = section("upsample/nearest", || xs.upsample_nearest2d(th, tw))?;
        section("upsample/conv", || self.conv.forward(&xs))
    }
}

/// A level's blocks: resnets, each followed by a transformer where the
/// level has attention (`CrossAttnDownBlock2D`/`CrossAttnUpBlock2D`), none
/// where it is plain (`DownBlock2D`/`UpBlock2D`).
#[derive(Debug)]
struct LevelBlocks {
    resnets: Vec<ResnetBlock>,
    attentions: Vec<Transformer2D>,
}

impl LevelBlocks {
    /// `inputs[i]`: the input channels of the i-th resnet.
    fn new(
        vb: &VarBuilder,
        inputs: &[usize],
        channels: usize,
        resnet: ResnetConfig,
        attn: Option<TransformerConfig>,
    ) -> candle_core::Result<Self> {
        let resnets = inputs
            .iter()
            .enumerate()
            .map(|(i, &cin)| {
                ResnetBlock::new(vb.pp("resnets").pp(i.to_string()), cin, channels, resnet)
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let attentions = match attn {
            Some(attn) => (0..inputs.len())
                .map(|i| Transformer2D::new(vb.pp("attentions").pp(i.to_string()), attn))
                .collect::<candle_core::Result<Vec<_>>>()?,
            None => Vec::new(),
        };
        Ok(Self {
            resnets,
            attentions,
        })
    }

    /// The i-th resnet, then the i-th transformer if the level has them.
    fn step(
        &self,
        i: usize,
        xs: &Tensor,
        temb: &Tensor,
        context: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let xs = section("resnet", || self.resnets[i].forward(xs, Some(temb)))?;
        match self.attentions.get(i) {
            Some(a) => section("transformer", || a.forward(&xs, context)),
            None => Ok(xs),
        }
    }
}

#[derive(Debug)]
struct Down {
    blocks: LevelBlocks,
    resample: Option<Downsample>,
}

#[derive(Debug)]
struct Up {
    blocks: LevelBlocks,
    resample: Option<Upsample>,
}

/// The middle: resnet, transformer, resnet.
#[derive(Debug)]
struct Mid {
    first: ResnetBlock,
    attention: Transformer2D,
    second: ResnetBlock,
}

/// SDXL's added-conditioning layers.
#[derive(Debug)]
struct AddedEmbedding {
    sizes: TextTime,
    time_proj: Timesteps,
    embedding: TimestepEmbedding,
}

/// The conditioning the UNet's `text_time` models take besides the text
/// states: the pooled text embedding `(batch, pooled)` and the six size/crop
/// ids `(batch, 6)` (original h, w; crop top, left; target h, w).
#[derive(Debug, Clone)]
pub struct AddedConditioning {
    pub pooled: Tensor,
    pub time_ids: Tensor,
}

#[derive(Debug)]
pub struct Unet {
    spec: UnetSpec,
    conv_in: Conv2d,
    time_proj: Timesteps,
    time_embedding: TimestepEmbedding,
    added: Option<AddedEmbedding>,
    down: Vec<Down>,
    mid: Mid,
    up: Vec<Up>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Unet {
    pub fn new(vb: VarBuilder, spec: UnetSpec) -> candle_core::Result<Self> {
        let first = spec.levels[0].channels;
        let temb = spec.time_embed_dim();
        let n = spec.levels.len();
        let algo = spec.conv_algorithm;
        let conv_in = algo.conv2d((spec.in_channels, first, 3), 1, 1, vb.pp("conv_in"))?;
        let time_proj = Timesteps::new(first, spec.flip_sin_to_cos, spec.freq_shift);
        let time_embedding = TimestepEmbedding::new(vb.pp("time_embedding"), first, temb)?;
        let added = match spec.text_time {
            Some(tt) => Some(AddedEmbedding {
                sizes: tt,
                time_proj: Timesteps::new(tt.time_dim, spec.flip_sin_to_cos, spec.freq_shift),
                embedding: TimestepEmbedding::new(vb.pp("add_embedding"), tt.input_dim, temb)?,
            }),
            None => None,
        };

        let resnet = ResnetConfig {
            groups: spec.norm_num_groups,
            eps: spec.norm_eps,
            temb_channels: Some(temb),
            output_scale_factor: 1.0,
            conv: algo,
        };
        let attn = |level: &Level| level.transformer_layers.map(|d| spec.transformer(level, d));
        let mut down = Vec::with_capacity(n);
        for (i, level) in spec.levels.iter().enumerate() {
            let cin = if i == 0 {
                first
            } else {
                spec.levels[i - 1].channels
            };
            let vb = vb.pp("down_blocks").pp(i.to_string());
            let mut inputs = vec![level.channels; spec.layers_per_block];
            inputs[0] = cin;
            down.push(Down {
                blocks: LevelBlocks::new(&vb, &inputs, level.channels, resnet, attn(level))?,
                resample: (i + 1 < n)
                    .then(|| {
                        Downsample::new(vb.clone(), level.channels, spec.downsample_padding, algo)
                    })
                    .transpose()?,
            });
        }

        let last = spec.levels.last().expect("checked non-empty");
        let mid_vb = vb.pp("mid_block");
        let mid_resnet = |i: usize| {
            ResnetBlock::new(
                mid_vb.pp("resnets").pp(i.to_string()),
                last.channels,
                last.channels,
                ResnetConfig {
                    output_scale_factor: spec.mid_block_scale_factor,
                    ..resnet
                },
            )
        };
        let mid_attn = spec.transformer(last, last.transformer_layers.unwrap_or(1));
        let mid = Mid {
            first: mid_resnet(0)?,
            attention: Transformer2D::new(mid_vb.pp("attentions.0"), mid_attn)?,
            second: mid_resnet(1)?,
        };

        // Up blocks run from the deepest level back; each resnet takes the
        // running map and one skip connection of the mirrored down level
        // (the last one from the level below).
        let mut up = Vec::with_capacity(n);
        for i in 0..n {
            let level = &spec.levels[n - 1 - i];
            let prev = if i == 0 {
                last.channels
            } else {
                spec.levels[n - i].channels
            };
            let skip = spec.levels[(n - 1 - i).saturating_sub(1)].channels;
            let layers = spec.layers_per_block + 1;
            let inputs: Vec<usize> = (0..layers)
                .map(|j| {
                    let running = if j == 0 { prev } else { level.channels };
                    let skip_ch = if j + 1 == layers {
                        skip
                    } else {
                        level.channels
                    };
                    running + skip_ch
                })
                .collect();
            let vb = vb.pp("up_blocks").pp(i.to_string());
            up.push(Up {
                blocks: LevelBlocks::new(&vb, &inputs, level.channels, resnet, attn(level))?,
                resample: (i + 1 < n)
                    .then(|| Upsample::new(vb.clone(), level.channels, algo))
                    .transpose()?,
            });
        }

        let norm_out = GroupNorm::new(
            vb.pp("conv_norm_out"),
            spec.norm_num_groups,
            first,
            spec.norm_eps,
        )?;
        let conv_out = algo.conv2d((first, spec.out_channels, 3), 1, 1, vb.pp("conv_out"))?;
        Ok(Self {
            spec,
            conv_in,
            time_proj,
            time_embedding,
            added,
            down,
            mid,
            up,
            norm_out,
            conv_out,
        })
    }

    /// The timestep embedding, plus the added conditioning when the model
    /// takes it.
    fn embedding(
        &self,
        batch: usize,
        timestep: f64,
        added: Option<&AddedConditioning>,
        dtype: candle_core::DType,
        device: &Device,
    ) -> Result<Tensor, DiffusionError> {
        let t = (Tensor::ones(batch, dtype, device)? * timestep)?;
        let emb = self.time_embedding.forward(&self.time_proj.forward(&t)?)?;
        match (&self.added, added) {
            (None, None) => Ok(emb),
            (Some(layers), Some(a)) => {
                let ids = a.time_ids.to_dtype(dtype)?.to_device(device)?;
                let (b, k) = ids.dims2()?;
                let ids = layers
                    .time_proj
                    .forward(&ids.flatten_all()?)?
                    .reshape((b, k * layers.sizes.time_dim))?;
                let pooled = a.pooled.to_dtype(dtype)?.to_device(device)?;
                let input = Tensor::cat(&[&pooled, &ids], 1)?;
                let want = layers.sizes.input_dim;
                if input.dim(1)? != want || b != batch {
                    return Err(DiffusionError::BadModel(format!(
                        "the unet's add_embedding takes {want} values per image, the pooled text ({}) and {k} ids give {}",
                        pooled.dim(1)?,
                        input.dim(1)?
                    )));
                }
                Ok((emb + layers.embedding.forward(&input)?)?)
            }
            (Some(_), None) => Err(DiffusionError::BadRequest(
                "this unet needs the pooled text embedding and size ids (SDXL conditioning)".into(),
            )),
            (None, Some(_)) => Err(DiffusionError::BadRequest(
                "this unet takes no added conditioning".into(),
            )),
        }
    }

    /// Channels of the prediction (the latents').
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn out_channels(&self) -> usize {
        self.spec.out_channels
    }

    pub fn attention(&self) -> AttentionKernel {
        self.spec.attention
    }

    /// The noise (or v) prediction for `xs` at `timestep`, attending to
    /// `context` `(batch, 77, cross_attention_dim)`.
    pub fn forward(
        &self,
        xs: &Tensor,
        timestep: f64,
        context: &Tensor,
        added: Option<&AddedConditioning>,
    ) -> Result<Tensor, DiffusionError> {
        let emb = self.embed(xs, timestep, added)?;
        self.forward_embedded(xs, &emb, context)
    }

    /// The timestep embedding (plus the added conditioning) of a call on
    /// `xs`: the part of [`forward`](Self::forward) that depends on the
    /// timestep's value, made on the host's side of a CUDA graph.
    pub(crate) fn embed(
        &self,
        xs: &Tensor,
        timestep: f64,
        added: Option<&AddedConditioning>,
    ) -> Result<Tensor, DiffusionError> {
        section("embedding", || {
            self.embedding(xs.dim(0)?, timestep, added, xs.dtype(), xs.device())
        })
    }

    /// [`forward`](Self::forward) from the embedding [`embed`](Self::embed)
    /// made: device work only, with nothing read back or copied from the
    /// host, so that a CUDA graph can record it (`graph.rs`).
    pub(crate) fn forward_embedded(
        &self,
        xs: &Tensor,
        emb: &Tensor,
        context: &Tensor,
    ) -> Result<Tensor, DiffusionError> {
        let (_, _, h, w) = xs.dims4()?;
        let xs = if self.spec.center_input_sample {
            ((xs * 2.0)? - 1.0)?
        } else {
            xs.clone()
        };
        let mut xs = section("conv_in", || self.conv_in.forward(&xs))?;
        let temb = candle_nn::ops::silu(emb)?;
        let mut skips = vec![xs.clone()];
        for block in &self.down {
            for i in 0..block.blocks.resnets.len() {
                xs = block.blocks.step(i, &xs, &temb, context)?;
                skips.push(xs.clone());
            }
            if let Some(d) = &block.resample {
                xs = section("downsample", || d.forward(&xs))?;
                skips.push(xs.clone());
            }
        }
        xs = section("resnet", || self.mid.first.forward(&xs, Some(&temb)))?;
        xs = section("transformer", || self.mid.attention.forward(&xs, context))?;
        xs = section("resnet", || self.mid.second.forward(&xs, Some(&temb)))?;
        // Sizes that do not halve evenly down the levels upsample to the
        // skip connection's size rather than to twice their own.
        let factor = 1usize << (self.up.len() - 1);
        let odd = !h.is_multiple_of(factor) || !w.is_multiple_of(factor);
        for (i, block) in self.up.iter().enumerate() {
            for j in 0..block.blocks.resnets.len() {
                let skip = skips.pop().expect("one skip connection per up resnet");
                xs = section("skip concat", || Tensor::cat(&[&xs, &skip], 1))?;
                xs = block.blocks.step(j, &xs, &temb, context)?;
            }
            if let Some(u) = &block.resample {
                let size = match skips.last() {
                    Some(s) if odd && i + 1 < self.up.len() => {
                        let (_, _, sh, sw) = s.dims4()?;
                        Some((sh, sw))
                    }
                    _ => None,
                };
                xs = section("upsample", || u.forward(&xs, size))?;
            }
        }
        Ok(section("conv_out", || {
            self.conv_out.forward(&self.norm_out.forward_silu(&xs)?)
        })?)
    }
}
