//! The denoising UNet (diffusers' `UNet2DConditionModel`), assembled here
//! from candle-transformers' down, mid and up blocks. Our own top level
//! because candle-transformers' UNet lacks SDXL's added conditioning
//! (`addition_embed_type: "text_time"`): the pooled text embedding and the
//! size/crop ids, embedded and added to the timestep embedding.
//!
//! The layout is read from the folder's `unet/config.json`; nothing about a
//! model family is hard-coded.

use candle_core::{Device, Module, Tensor};
use candle_nn::{Conv2d, GroupNorm, VarBuilder};
use candle_transformers::models::stable_diffusion::{
    embeddings::{TimestepEmbedding, Timesteps},
    unet_2d_blocks::{
        CrossAttnDownBlock2D, CrossAttnDownBlock2DConfig, CrossAttnUpBlock2D,
        CrossAttnUpBlock2DConfig, DownBlock2D, DownBlock2DConfig, UNetMidBlock2DCrossAttn,
        UNetMidBlock2DCrossAttnConfig, UpBlock2D, UpBlock2DConfig,
    },
};

use crate::DiffusionError;
use crate::model::UnetConfig;

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
    pub norm_num_groups: usize,
    pub norm_eps: f64,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
    pub downsample_padding: usize,
    pub mid_block_scale_factor: f64,
    pub center_input_sample: bool,
    pub text_time: Option<TextTime>,
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
            norm_num_groups: c.norm_num_groups,
            norm_eps: c.norm_eps,
            flip_sin_to_cos: c.flip_sin_to_cos,
            freq_shift: c.freq_shift,
            downsample_padding: c.downsample_padding,
            mid_block_scale_factor: c.mid_block_scale_factor,
            center_input_sample: c.center_input_sample,
            text_time,
        })
    }

    /// Width of the timestep embedding (four times the first level's).
    fn time_embed_dim(&self) -> usize {
        self.levels[0].channels * 4
    }
}

#[derive(Debug)]
enum Down {
    Plain(DownBlock2D),
    Attn(CrossAttnDownBlock2D),
}

#[derive(Debug)]
enum Up {
    Plain(UpBlock2D),
    Attn(CrossAttnUpBlock2D),
}

impl Up {
    fn resnets(&self) -> usize {
        match self {
            Up::Plain(b) => b.resnets.len(),
            Up::Attn(b) => b.upblock.resnets.len(),
        }
    }
}

/// SDXL's added-conditioning layers.
#[derive(Debug)]
struct AddedEmbedding {
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
    mid: UNetMidBlock2DCrossAttn,
    up: Vec<Up>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Unet {
    pub fn new(vb: VarBuilder, spec: UnetSpec) -> candle_core::Result<Self> {
        let pad1 = candle_nn::Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let first = spec.levels[0].channels;
        let temb = spec.time_embed_dim();
        let n = spec.levels.len();
        let conv_in = candle_nn::conv2d(spec.in_channels, first, 3, pad1, vb.pp("conv_in"))?;
        let time_proj = Timesteps::new(first, spec.flip_sin_to_cos, spec.freq_shift);
        let time_embedding = TimestepEmbedding::new(vb.pp("time_embedding"), first, temb)?;
        let added = match spec.text_time {
            Some(tt) => Some(AddedEmbedding {
                time_proj: Timesteps::new(tt.time_dim, spec.flip_sin_to_cos, spec.freq_shift),
                embedding: TimestepEmbedding::new(vb.pp("add_embedding"), tt.input_dim, temb)?,
            }),
            None => None,
        };

        let mut down = Vec::with_capacity(n);
        for (i, level) in spec.levels.iter().enumerate() {
            let cin = if i == 0 {
                first
            } else {
                spec.levels[i - 1].channels
            };
            let plain = DownBlock2DConfig {
                num_layers: spec.layers_per_block,
                resnet_eps: spec.norm_eps,
                resnet_groups: spec.norm_num_groups,
                add_downsample: i + 1 < n,
                downsample_padding: spec.downsample_padding,
                ..Default::default()
            };
            let vb = vb.pp("down_blocks").pp(i.to_string());
            down.push(match level.transformer_layers {
                None => Down::Plain(DownBlock2D::new(
                    vb,
                    cin,
                    level.channels,
                    Some(temb),
                    plain,
                )?),
                Some(depth) => Down::Attn(CrossAttnDownBlock2D::new(
                    vb,
                    cin,
                    level.channels,
                    Some(temb),
                    false,
                    CrossAttnDownBlock2DConfig {
                        downblock: plain,
                        attn_num_head_channels: level.heads,
                        cross_attention_dim: spec.cross_attention_dim,
                        sliced_attention_size: None,
                        use_linear_projection: spec.use_linear_projection,
                        transformer_layers_per_block: depth,
                    },
                )?),
            });
        }

        let last = spec.levels.last().expect("checked non-empty");
        let mid = UNetMidBlock2DCrossAttn::new(
            vb.pp("mid_block"),
            last.channels,
            Some(temb),
            false,
            UNetMidBlock2DCrossAttnConfig {
                resnet_eps: spec.norm_eps,
                output_scale_factor: spec.mid_block_scale_factor,
                cross_attn_dim: spec.cross_attention_dim,
                attn_num_head_channels: last.heads,
                resnet_groups: Some(spec.norm_num_groups),
                use_linear_projection: spec.use_linear_projection,
                transformer_layers_per_block: last.transformer_layers.unwrap_or(1),
                ..Default::default()
            },
        )?;

        // Up blocks run from the deepest level back; each also takes the
        // skip connections of its mirrored down level.
        let mut up = Vec::with_capacity(n);
        for i in 0..n {
            let level = &spec.levels[n - 1 - i];
            let prev = if i == 0 {
                last.channels
            } else {
                spec.levels[n - i].channels
            };
            let skip = spec.levels[(n - 1 - i).saturating_sub(1)].channels;
            let plain = UpBlock2DConfig {
                num_layers: spec.layers_per_block + 1,
                resnet_eps: spec.norm_eps,
                resnet_groups: spec.norm_num_groups,
                add_upsample: i + 1 < n,
                ..Default::default()
            };
            let vb = vb.pp("up_blocks").pp(i.to_string());
            up.push(match level.transformer_layers {
                None => Up::Plain(UpBlock2D::new(
                    vb,
                    skip,
                    prev,
                    level.channels,
                    Some(temb),
                    plain,
                )?),
                Some(depth) => Up::Attn(CrossAttnUpBlock2D::new(
                    vb,
                    skip,
                    prev,
                    level.channels,
                    Some(temb),
                    false,
                    CrossAttnUpBlock2DConfig {
                        upblock: plain,
                        attn_num_head_channels: level.heads,
                        cross_attention_dim: spec.cross_attention_dim,
                        sliced_attention_size: None,
                        use_linear_projection: spec.use_linear_projection,
                        transformer_layers_per_block: depth,
                    },
                )?),
            });
        }

        let norm_out = candle_nn::group_norm(
            spec.norm_num_groups,
            first,
            spec.norm_eps,
            vb.pp("conv_norm_out"),
        )?;
        let conv_out = candle_nn::conv2d(first, spec.out_channels, 3, pad1, vb.pp("conv_out"))?;
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

    pub fn spec(&self) -> &UnetSpec {
        &self.spec
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
                    .reshape((b, k * self.spec.text_time.expect("added set").time_dim))?;
                let pooled = a.pooled.to_dtype(dtype)?.to_device(device)?;
                let input = Tensor::cat(&[&pooled, &ids], 1)?;
                let want = self.spec.text_time.expect("added set").input_dim;
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

    /// The noise (or v) prediction for `xs` at `timestep`, attending to
    /// `context` `(batch, 77, cross_attention_dim)`.
    pub fn forward(
        &self,
        xs: &Tensor,
        timestep: f64,
        context: &Tensor,
        added: Option<&AddedConditioning>,
    ) -> Result<Tensor, DiffusionError> {
        let (b, _, h, w) = xs.dims4()?;
        let emb = self.embedding(b, timestep, added, xs.dtype(), xs.device())?;
        let xs = if self.spec.center_input_sample {
            ((xs * 2.0)? - 1.0)?
        } else {
            xs.clone()
        };
        let mut xs = self.conv_in.forward(&xs)?;
        let mut skips = vec![xs.clone()];
        for block in &self.down {
            let (out, states) = match block {
                Down::Plain(d) => d.forward(&xs, Some(&emb))?,
                Down::Attn(d) => d.forward(&xs, Some(&emb), Some(context))?,
            };
            skips.extend(states);
            xs = out;
        }
        xs = self.mid.forward(&xs, Some(&emb), Some(context))?;
        // Sizes that do not halve evenly down the levels upsample to the
        // skip connection's size rather than to twice their own.
        let factor = 1usize << (self.up.len() - 1);
        let odd = !h.is_multiple_of(factor) || !w.is_multiple_of(factor);
        for (i, block) in self.up.iter().enumerate() {
            let res = skips.split_off(skips.len() - block.resnets());
            let size = match skips.last() {
                Some(s) if odd && i + 1 < self.up.len() => {
                    let (_, _, sh, sw) = s.dims4()?;
                    Some((sh, sw))
                }
                _ => None,
            };
            xs = match block {
                Up::Plain(u) => u.forward(&xs, &res, Some(&emb), size)?,
                Up::Attn(u) => u.forward(&xs, &res, Some(&emb), size, Some(context))?,
            };
        }
        let xs = candle_nn::ops::silu(&self.norm_out.forward(&xs)?)?;
        Ok(self.conv_out.forward(&xs)?)
    }
}
