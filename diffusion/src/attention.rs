//! The UNet's transformer blocks (diffusers' `Transformer2DModel` with
//! `BasicTransformerBlock`s), written here so attention runs in the compute
//! type: on a GPU in f16/bf16 the score and value matmuls use the tensor
//! cores, where candle-transformers' version converts queries, keys and
//! values to f32 first. Models whose config asks for `upcast_attention`
//! (SD 2.x v-models, which overflow in fp16) compute the scores and the
//! softmax in f32, as diffusers does.

use std::str::FromStr;
use std::sync::Mutex;

use candle_core::{DType, Device, Module, Tensor, TensorId};
use candle_nn::{LayerNorm, VarBuilder};

use crate::linear::Linear;

use crate::DiffusionError;
use crate::profile::section;
use crate::resnet::{GroupNorm, bias_or_zeros};

/// How the UNet's attention is computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionKernel {
    /// `softmax(QKᵀ)V` with candle's matmuls, the score matrix materialised
    /// per head (every device and type).
    Matmul,
    /// Fused flash attention (FlashAttention-2 through `candle-flash-attn`):
    /// the scores stay on chip and are accumulated in f32, so the
    /// `upcast_attention` models are safe too. CUDA, f16/bf16, head sizes
    /// that are multiples of 8 up to 256 (other layers fall back to
    /// [`AttentionKernel::Matmul`]).
    Flash,
    /// The crate's own fused attention (`fused::attention`): on CUDA the
    /// same scheme, its own kernel, so it needs only the `cuda` feature
    /// (f16/bf16, head sizes that are multiples of 8 up to 160; other layers
    /// fall back to [`AttentionKernel::Matmul`]); on the CPU in f32, blocks
    /// of queries whose scores stay in cache (`cpu::attention`).
    Fused,
}

/// The kernel a load asks for: `auto` (flash where this build, the device
/// and the type allow it, else the own fused kernel where they allow that —
/// CUDA in f16/bf16, or the CPU in f32 —, else matmul), `matmul`, `flash` or
/// `fused`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum AttentionChoice {
    #[default]
    Auto,
    Matmul,
    Flash,
    Fused,
}

impl FromStr for AttentionChoice {
    type Err = DiffusionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "matmul" => Ok(Self::Matmul),
            "flash" => Ok(Self::Flash),
            "fused" => Ok(Self::Fused),
            other => Err(DiffusionError::BadRequest(format!(
                "unknown attention kernel {other:?} (auto, matmul, flash, fused)"
            ))),
        }
    }
}

impl AttentionChoice {
    /// The kernel to use on `device` in `dtype`; asking for a fused kernel
    /// where it cannot run is an error naming why.
    pub fn resolve(self, device: &Device, dtype: DType) -> Result<AttentionKernel, DiffusionError> {
        let on_gpu = if !device.is_cuda() {
            Some("it runs only on a CUDA device")
        } else if !matches!(dtype, DType::F16 | DType::BF16) {
            Some("it needs the f16 or bf16 compute type")
        } else {
            None
        };
        let flash = if cfg!(feature = "flash-attn") {
            on_gpu
        } else {
            Some("this build lacks the `flash-attn` feature")
        };
        let fused = if device.is_cpu() {
            (dtype != DType::F32).then_some("on the CPU it needs the f32 compute type")
        } else if cfg!(feature = "cuda") {
            on_gpu
        } else {
            Some("this build lacks the `cuda` feature")
        };
        let refuse = |name: &str, why: &str| {
            Err(DiffusionError::BadRequest(format!(
                "{name} attention cannot run here: {why}"
            )))
        };
        match self {
            Self::Matmul => Ok(AttentionKernel::Matmul),
            Self::Flash => flash.map_or(Ok(AttentionKernel::Flash), |why| refuse("flash", why)),
            Self::Fused => fused.map_or(Ok(AttentionKernel::Fused), |why| refuse("fused", why)),
            Self::Auto => Ok(match (flash, fused) {
                (None, _) => AttentionKernel::Flash,
                (_, None) => AttentionKernel::Fused,
                _ => AttentionKernel::Matmul,
            }),
        }
    }
}

#[cfg(feature = "flash-attn")]
fn flash_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f32) -> candle_core::Result<Tensor> {
    candle_flash_attn::flash_attn(q, k, v, scale, false)
}

#[cfg(not(feature = "flash-attn"))]
fn flash_attention(
    _q: &Tensor,
    _k: &Tensor,
    _v: &Tensor,
    _scale: f32,
) -> candle_core::Result<Tensor> {
    candle_core::bail!("flash attention is not in this build (the `flash-attn` feature)")
}

/// `(batch, tokens, heads × d)` → `(batch, heads, tokens, d)`, contiguous.
pub(crate) fn heads_first(t: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let (b, tokens, dim) = t.dims3()?;
    t.reshape((b, tokens, heads, dim / heads))?
        .transpose(1, 2)?
        .contiguous()
}

/// Multi-head attention: self-attention, or cross-attention to `context`.
///
/// The softmax scale is folded into the query weights. Self-attention
/// projects queries, keys and values with one matmul (the three weights
/// stacked); cross-attention keeps the keys and values of the last text
/// context it saw, since a render attends to the same text at every step.
#[derive(Debug)]
struct Attention {
    /// Self-attention: `[q·scale; k; v]` stacked, `(3 dim, dim)`.
    /// Cross-attention: `q·scale`.
    to_q: Linear,
    /// Cross-attention only.
    to_kv: Option<(Linear, Linear)>,
    to_out: Linear,
    heads: usize,
    upcast: bool,
    flash: bool,
    /// The own fused kernel (`fused::attention`).
    fused: bool,
    /// Cross-attention: the keys and values of the context with this id.
    kv_cache: Mutex<Option<(TensorId, Tensor, Tensor)>>,
}

impl Attention {
    fn new(
        vb: VarBuilder,
        dim: usize,
        context_dim: usize,
        cfg: &TransformerConfig,
        cross: bool,
    ) -> candle_core::Result<Self> {
        let (heads, d) = (cfg.heads, dim / cfg.heads);
        let to_q = Linear::load_no_bias(dim, dim, vb.pp("to_q"))?;
        let to_k = Linear::load_no_bias(context_dim, dim, vb.pp("to_k"))?;
        let to_v = Linear::load_no_bias(context_dim, dim, vb.pp("to_v"))?;
        let to_out = Linear::load(dim, dim, vb.pp("to_out.0"))?;
        let wq = to_q.weight();
        let scaled_q = (wq.to_dtype(DType::F32)? * (d as f64).powf(-0.5))?.to_dtype(wq.dtype())?;
        let (to_q, to_kv) = if cross {
            (Linear::new(scaled_q, None), Some((to_k, to_v)))
        } else {
            let stacked = Tensor::cat(&[&scaled_q, to_k.weight(), to_v.weight()], 0)?;
            (Linear::new(stacked, None), None)
        };
        Ok(Self {
            to_q,
            to_kv,
            to_out,
            heads,
            upcast: cfg.upcast_attention,
            flash: cfg.attention == AttentionKernel::Flash && d.is_multiple_of(8) && d <= 256,
            fused: cfg.attention == AttentionKernel::Fused
                && crate::fused::attention_fits(vb.device(), d, vb.dtype()),
            kv_cache: Mutex::new(None),
        })
    }

    /// Queries, keys and values as `(batch, tokens, heads, d)` (the scale
    /// already in the queries), each passed through `layout`.
    fn project(
        &self,
        xs: &Tensor,
        context: &Tensor,
        layout: &dyn Fn(&Tensor) -> candle_core::Result<Tensor>,
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let heads = self.heads;
        let split = |t: &Tensor| -> candle_core::Result<Tensor> {
            let (b, tokens, dim) = t.dims3()?;
            t.reshape((b, tokens, heads, dim / heads))
        };
        let Some((to_k, to_v)) = &self.to_kv else {
            let qkv = self.to_q.forward(xs)?;
            let (b, tokens, dim3) = qkv.dims3()?;
            let qkv = qkv.reshape((b, tokens, 3, heads, dim3 / 3 / heads))?;
            let part = |i: usize| layout(&qkv.narrow(2, i, 1)?.squeeze(2)?);
            return Ok((part(0)?, part(1)?, part(2)?));
        };
        let q = layout(&split(&self.to_q.forward(xs)?)?)?;
        let mut cache = self.kv_cache.lock().expect("attention cache");
        if let Some((id, k, v)) = cache.as_ref()
            && *id == context.id()
        {
            crate::graph::keep_alive(&[k, v]);
            return Ok((q, k.clone(), v.clone()));
        }
        let k = layout(&split(&to_k.forward(context)?)?)?;
        let v = layout(&split(&to_v.forward(context)?)?)?;
        // Made while a CUDA graph records, they live in the graph's memory.
        if !crate::graph::recording() {
            *cache = Some((context.id(), k.clone(), v.clone()));
        }
        Ok((q, k, v))
    }

    /// The attention's output plus `residual` (the block's input), added
    /// with `to_out`'s bias.
    fn forward(
        &self,
        xs: &Tensor,
        context: &Tensor,
        residual: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let (b, n, dim) = xs.dims3()?;
        let d = dim / self.heads;
        let out_projection = |out: &Tensor| {
            section("attention/projections", || {
                self.to_out.forward_add(out, Some(residual))
            })
        };
        if self.flash {
            // (batch, tokens, heads, d), contiguous.
            let (q, k, v) = self.project(xs, context, &|t| t.contiguous())?;
            let out = flash_attention(&q, &k, &v, 1.0)?;
            return out_projection(&out.reshape((b, n, dim))?);
        }
        if self.fused {
            // Views of the projections' outputs, read through their strides.
            let (q, k, v) = section("attention/projections", || {
                self.project(xs, context, &|t| Ok(t.clone()))
            })?;
            let out = section("attention/fused", || {
                crate::fused::attention(&q, &k, &v, 1.0)
            })?;
            return out_projection(&out.reshape((b, n, dim))?);
        }
        let (q, k, v) = section("attention/projections", || {
            self.project(xs, context, &|t| t.transpose(1, 2)?.contiguous())
        })?;
        let dtype = q.dtype();
        let (q, k) = if self.upcast {
            (q.to_dtype(DType::F32)?, k.to_dtype(DType::F32)?)
        } else {
            (q, k)
        };
        let scores = section("attention/scores", || q.matmul(&k.t()?))?;
        let probs = section("attention/softmax", || {
            crate::softmax::softmax_last_dim(&scores)?.to_dtype(dtype)
        })?;
        let out = section("attention/weighted-sum", || {
            probs
                .matmul(&v)?
                .transpose(1, 2)?
                .reshape((b, n, self.heads * d))
        })?;
        out_projection(&out)
    }
}

/// GEGLU feed-forward (`ff.net.0.proj`, `ff.net.2`).
#[derive(Debug)]
struct FeedForward {
    /// `net.0.proj`'s first half (the values) and second half (the gate),
    /// without the bias.
    value: Linear,
    gate: Linear,
    /// `net.0.proj`'s bias, `(2 inner,)`, added by [`geglu_with_bias`].
    proj_bias: Tensor,
    out: Linear,
}

impl FeedForward {
    fn new(vb: VarBuilder, dim: usize) -> candle_core::Result<Self> {
        let inner = 4 * dim;
        let proj = Linear::load(dim, 2 * inner, vb.pp("net.0.proj"))?;
        // The projection's two halves as two matmuls: each output is
        // contiguous, so the GELU and the product run on plain layouts
        // instead of strided views of one wide output.
        let half = |i: usize| -> candle_core::Result<Linear> {
            Ok(Linear::new(
                proj.weight().narrow(0, i * inner, inner)?.contiguous()?,
                None,
            ))
        };
        Ok(Self {
            value: half(0)?,
            gate: half(1)?,
            proj_bias: bias_or_zeros(proj.bias(), proj.weight())?,
            out: Linear::load(inner, dim, vb.pp("net.2"))?,
        })
    }

    /// The feed-forward of `xs` plus `residual`.
    fn forward(&self, xs: &Tensor, residual: &Tensor) -> candle_core::Result<Tensor> {
        let hidden = geglu_with_bias(
            &self.value.matmul(xs)?,
            &self.gate.matmul(xs)?,
            &self.proj_bias,
        )?;
        self.out.forward_add(&hidden, Some(residual))
    }
}

/// GEGLU of the feed-forward's two projections without their biases,
/// `(value + b) · gelu(gate + b')` with `bias` = `[b; b']`, `net.0.proj`'s
/// `(2 width,)`: on CUDA one pass of the fused kernel, which adds the
/// biases as it reads; elsewhere the two bias adds, then [`geglu`].
pub(crate) fn geglu_with_bias(
    value: &Tensor,
    gate: &Tensor,
    bias: &Tensor,
) -> candle_core::Result<Tensor> {
    if crate::fused::applies(gate) {
        return crate::fused::geglu(value, gate, bias);
    }
    let width = bias.dim(0)? / 2;
    geglu(
        &value.broadcast_add(&bias.narrow(0, 0, width)?)?,
        &gate.broadcast_add(&bias.narrow(0, width, width)?)?,
    )
}

/// GEGLU's product, `value · gelu(gate)` with the exact (erf) GELU: one
/// pass on the CPU in f32, candle's two elsewhere.
pub(crate) fn geglu(value: &Tensor, gate: &Tensor) -> candle_core::Result<Tensor> {
    if crate::cpu::applies(gate) {
        crate::cpu::geglu(value, gate)
    } else {
        value * gate.gelu_erf()?
    }
}

/// Self-attention, cross-attention to the text, feed-forward; each on a
/// layer-normed input with a residual connection.
#[derive(Debug)]
struct Block {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
}

impl Block {
    fn forward(&self, xs: &Tensor, context: &Tensor) -> candle_core::Result<Tensor> {
        let xs = section("transformer/self-attention", || {
            let h = self.norm1.forward(xs)?;
            self.attn1.forward(&h, &h, xs)
        })?;
        let xs = section("transformer/cross-attention", || {
            self.attn2.forward(&self.norm2.forward(&xs)?, context, &xs)
        })?;
        section("transformer/feed-forward", || {
            self.ff.forward(&self.norm3.forward(&xs)?, &xs)
        })
    }
}

/// How a [`Transformer2D`] is built.
#[derive(Debug, Clone, Copy)]
pub struct TransformerConfig {
    pub channels: usize,
    pub heads: usize,
    pub depth: usize,
    pub context_dim: usize,
    pub groups: usize,
    pub linear_projection: bool,
    pub upcast_attention: bool,
    pub attention: AttentionKernel,
}

/// diffusers' `Transformer2DModel`: group norm, project the feature map to
/// tokens, run the blocks, project back, add the input.
///
/// Both projections are matmuls on the feature map's own `(batch, channels,
/// pixels)` layout (`proj_out` reads the tokens transposed, no copy), and the
/// group norm's per-channel scale and shift are folded into `proj_in`.
#[derive(Debug)]
pub struct Transformer2D {
    norm: GroupNorm,
    /// `proj_in`'s weight × the norm's scale, `(channels, channels)`.
    proj_in_weight: Tensor,
    /// `proj_in`'s weight × the norm's shift + its bias, `(channels,)`.
    proj_in_bias: Tensor,
    blocks: Vec<Block>,
    proj_out_weight: Tensor,
    /// `(1, channels, 1, 1)`.
    proj_out_bias: Tensor,
}

impl Transformer2D {
    pub fn new(vb: VarBuilder, cfg: TransformerConfig) -> candle_core::Result<Self> {
        let c = cfg.channels;
        // A projection's `(channels, channels)` weight and its bias. SD 1.x
        // saves them as 1×1 convolutions: the same map on the channels.
        let projection = |name: &str| -> candle_core::Result<(Tensor, Tensor)> {
            let (w, b) = if cfg.linear_projection {
                let p = candle_nn::linear(c, c, vb.pp(name))?;
                (p.weight().clone(), p.bias().cloned())
            } else {
                let p = candle_nn::conv2d(c, c, 1, Default::default(), vb.pp(name))?;
                (p.weight().reshape((c, c))?, p.bias().cloned())
            };
            let b = bias_or_zeros(b.as_ref(), &w)?;
            Ok((w, b))
        };
        let blocks = (0..cfg.depth)
            .map(|i| {
                let vb = vb.pp("transformer_blocks").pp(i.to_string());
                Ok(Block {
                    norm1: candle_nn::layer_norm(c, 1e-5, vb.pp("norm1"))?,
                    attn1: Attention::new(vb.pp("attn1"), c, c, &cfg, false)?,
                    norm2: candle_nn::layer_norm(c, 1e-5, vb.pp("norm2"))?,
                    attn2: Attention::new(vb.pp("attn2"), c, cfg.context_dim, &cfg, true)?,
                    norm3: candle_nn::layer_norm(c, 1e-5, vb.pp("norm3"))?,
                    ff: FeedForward::new(vb.pp("ff"), c)?,
                })
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let norm = GroupNorm::new(vb.pp("norm"), cfg.groups, c, 1e-6)?;
        let (w_in, b_in) = projection("proj_in")?;
        let (w_out, b_out) = projection("proj_out")?;
        let dtype = w_in.dtype();
        let (proj_in_weight, proj_in_bias) = norm.fold_into(&w_in, &b_in)?;
        Ok(Self {
            norm,
            proj_in_weight: proj_in_weight.to_dtype(dtype)?,
            proj_in_bias: proj_in_bias.to_dtype(dtype)?,
            blocks,
            proj_out_weight: w_out,
            proj_out_bias: b_out.reshape((1, c, 1, 1))?,
        })
    }

    pub fn forward(&self, xs: &Tensor, context: &Tensor) -> candle_core::Result<Tensor> {
        let (b, c, h, w) = xs.dims4()?;
        let pixels = self.norm.normalize(xs)?.reshape((b, c, h * w))?;
        // W · pixels, then to (batch, pixels, channels) while adding the
        // bias: one pass writes the tokens. (Not pixelsᵀ · Wᵀ: candle's CPU
        // matmul folds a transposed left operand's batches wrongly when the
        // right one is shared.)
        let mut tokens = crate::fused::tokens(
            &self.proj_in_weight.broadcast_left(b)?.matmul(&pixels)?,
            &self.proj_in_bias,
        )?;
        for block in &self.blocks {
            tokens = block.forward(&tokens, context)?;
        }
        // (batch, channels, pixels) = W · tokensᵀ
        let out = self
            .proj_out_weight
            .broadcast_left(b)?
            .matmul(&tokens.transpose(1, 2)?)?
            .reshape((b, c, h, w))?;
        crate::fused::add_bias(&out, &self.proj_out_bias, Some(xs))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernels_parse_and_resolve_to_what_the_device_can_run() {
        let parse = |s: &str| s.parse::<AttentionChoice>();
        assert_eq!(parse("auto").unwrap(), AttentionChoice::Auto);
        assert_eq!(parse("matmul").unwrap(), AttentionChoice::Matmul);
        assert_eq!(parse("flash").unwrap(), AttentionChoice::Flash);
        assert_eq!(parse("fused").unwrap(), AttentionChoice::Fused);
        let err = parse("sdpa").unwrap_err().to_string();
        assert!(
            err.contains("\"sdpa\"") && err.contains("auto, matmul, flash, fused"),
            "{err}"
        );

        // The CPU's own fused attention takes f32 only.
        let cpu = Device::Cpu;
        for (choice, dtype, want) in [
            (AttentionChoice::Auto, DType::F32, AttentionKernel::Fused),
            (AttentionChoice::Fused, DType::F32, AttentionKernel::Fused),
            (AttentionChoice::Matmul, DType::F32, AttentionKernel::Matmul),
            (AttentionChoice::Auto, DType::F16, AttentionKernel::Matmul),
        ] {
            let got = choice.resolve(&cpu, dtype).unwrap();
            assert_eq!(got, want, "{choice:?} in {dtype:?}");
        }
        let err = AttentionChoice::Flash
            .resolve(&cpu, DType::F16)
            .unwrap_err()
            .to_string();
        let why = if cfg!(feature = "flash-attn") {
            "CUDA device"
        } else {
            "`flash-attn` feature"
        };
        assert!(err.contains(why), "{err}");
        let err = AttentionChoice::Fused
            .resolve(&cpu, DType::F16)
            .unwrap_err()
            .to_string();
        assert!(err.contains("fused") && err.contains("f32"), "{err}");
    }

    #[test]
    fn keys_and_values_made_while_a_graph_records_are_not_kept() {
        let dev = Device::Cpu;
        let cfg = TransformerConfig {
            channels: 8,
            heads: 2,
            depth: 1,
            context_dim: 6,
            groups: 2,
            linear_projection: false,
            upcast_attention: false,
            attention: AttentionKernel::Matmul,
        };
        let vb = VarBuilder::zeros(DType::F32, &dev);
        let attention = Attention::new(vb, 8, 6, &cfg, true).unwrap();
        let xs = crate::test_util::randn(&[1, 4, 8]);
        let context = crate::test_util::randn(&[1, 3, 6]);
        let same = |t: &Tensor| Ok(t.clone());
        let cached = || attention.kv_cache.lock().unwrap().is_some();
        let (made, kept) =
            crate::graph::while_recording(|| attention.project(&xs, &context, &same));
        assert_eq!(made.unwrap().1.dims(), [1, 3, 2, 4]);
        assert!(!cached(), "kept keys made in a graph's memory");
        assert!(kept.is_empty());
        let (_, k, v) = attention.project(&xs, &context, &same).unwrap();
        assert!(cached(), "eager calls keep them");
        // Taken from the cache while a graph records, the graph keeps them.
        let (_, kept) = crate::graph::while_recording(|| attention.project(&xs, &context, &same));
        let ids: Vec<_> = kept.iter().map(Tensor::id).collect();
        assert_eq!(ids, [k.id(), v.id()]);
    }
}
