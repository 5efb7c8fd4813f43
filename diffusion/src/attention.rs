//! The UNet's transformer blocks (diffusers' `Transformer2DModel` with
//! `BasicTransformerBlock`s), written here so attention runs in the compute
//! type: on a GPU in f16/bf16 the score and value matmuls use the tensor
//! cores, where candle-transformers' version converts queries, keys and
//! values to f32 first. Models whose config asks for `upcast_attention`
//! (SD 2.x v-models, which overflow in fp16) compute the scores and the
//! softmax in f32, as diffusers does.

use candle_core::{D, DType, Module, Tensor};
use candle_nn::{Conv2d, GroupNorm, LayerNorm, Linear, VarBuilder};

/// `(batch, tokens, heads × d)` → `(batch, heads, tokens, d)`, contiguous.
pub(crate) fn heads_first(t: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let (b, tokens, dim) = t.dims3()?;
    t.reshape((b, tokens, heads, dim / heads))?
        .transpose(1, 2)?
        .contiguous()
}

/// Multi-head attention: self-attention, or cross-attention to `context`.
#[derive(Debug)]
struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    upcast: bool,
}

impl Attention {
    fn new(
        vb: VarBuilder,
        dim: usize,
        context_dim: usize,
        heads: usize,
        upcast: bool,
    ) -> candle_core::Result<Self> {
        Ok(Self {
            to_q: candle_nn::linear_no_bias(dim, dim, vb.pp("to_q"))?,
            to_k: candle_nn::linear_no_bias(context_dim, dim, vb.pp("to_k"))?,
            to_v: candle_nn::linear_no_bias(context_dim, dim, vb.pp("to_v"))?,
            to_out: candle_nn::linear(dim, dim, vb.pp("to_out.0"))?,
            heads,
            upcast,
        })
    }

    fn forward(&self, xs: &Tensor, context: &Tensor) -> candle_core::Result<Tensor> {
        let (b, n, dim) = xs.dims3()?;
        let d = dim / self.heads;
        let q = heads_first(
            &(self.to_q.forward(xs)? * (d as f64).powf(-0.5))?,
            self.heads,
        )?;
        let k = heads_first(&self.to_k.forward(context)?, self.heads)?;
        let v = heads_first(&self.to_v.forward(context)?, self.heads)?;
        let dtype = q.dtype();
        let (q, k) = if self.upcast {
            (q.to_dtype(DType::F32)?, k.to_dtype(DType::F32)?)
        } else {
            (q, k)
        };
        let probs = candle_nn::ops::softmax_last_dim(&q.matmul(&k.t()?)?)?.to_dtype(dtype)?;
        let out = probs
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((b, n, self.heads * d))?;
        self.to_out.forward(&out)
    }
}

/// GEGLU feed-forward (`ff.net.0.proj`, `ff.net.2`).
#[derive(Debug)]
struct FeedForward {
    proj: Linear,
    out: Linear,
}

impl FeedForward {
    fn new(vb: VarBuilder, dim: usize) -> candle_core::Result<Self> {
        let inner = 4 * dim;
        Ok(Self {
            proj: candle_nn::linear(dim, 2 * inner, vb.pp("net.0.proj"))?,
            out: candle_nn::linear(inner, dim, vb.pp("net.2"))?,
        })
    }

    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let parts = self.proj.forward(xs)?.chunk(2, D::Minus1)?;
        self.out.forward(&(&parts[0] * parts[1].gelu_erf()?)?)
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
        let h = self.norm1.forward(xs)?;
        let xs = (self.attn1.forward(&h, &h)? + xs)?;
        let xs = (self.attn2.forward(&self.norm2.forward(&xs)?, context)? + xs)?;
        self.ff.forward(&self.norm3.forward(&xs)?)? + xs
    }
}

#[derive(Debug)]
enum Projection {
    Conv(Conv2d),
    Linear(Linear),
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
}

/// diffusers' `Transformer2DModel`: group norm, project the feature map to
/// tokens, run the blocks, project back, add the input.
#[derive(Debug)]
pub struct Transformer2D {
    norm: GroupNorm,
    proj_in: Projection,
    blocks: Vec<Block>,
    proj_out: Projection,
}

impl Transformer2D {
    pub fn new(vb: VarBuilder, cfg: TransformerConfig) -> candle_core::Result<Self> {
        let c = cfg.channels;
        let projection = |name: &str| -> candle_core::Result<Projection> {
            Ok(if cfg.linear_projection {
                Projection::Linear(candle_nn::linear(c, c, vb.pp(name))?)
            } else {
                Projection::Conv(candle_nn::conv2d(c, c, 1, Default::default(), vb.pp(name))?)
            })
        };
        let blocks = (0..cfg.depth)
            .map(|i| {
                let vb = vb.pp("transformer_blocks").pp(i.to_string());
                Ok(Block {
                    norm1: candle_nn::layer_norm(c, 1e-5, vb.pp("norm1"))?,
                    attn1: Attention::new(vb.pp("attn1"), c, c, cfg.heads, cfg.upcast_attention)?,
                    norm2: candle_nn::layer_norm(c, 1e-5, vb.pp("norm2"))?,
                    attn2: Attention::new(
                        vb.pp("attn2"),
                        c,
                        cfg.context_dim,
                        cfg.heads,
                        cfg.upcast_attention,
                    )?,
                    norm3: candle_nn::layer_norm(c, 1e-5, vb.pp("norm3"))?,
                    ff: FeedForward::new(vb.pp("ff"), c)?,
                })
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            norm: candle_nn::group_norm(cfg.groups, c, 1e-6, vb.pp("norm"))?,
            proj_in: projection("proj_in")?,
            blocks,
            proj_out: projection("proj_out")?,
        })
    }

    pub fn forward(&self, xs: &Tensor, context: &Tensor) -> candle_core::Result<Tensor> {
        let (b, c, h, w) = xs.dims4()?;
        let normed = self.norm.forward(xs)?;
        let to_tokens = |t: &Tensor| t.flatten_from(2)?.transpose(1, 2)?.contiguous();
        let mut tokens = match &self.proj_in {
            Projection::Conv(p) => to_tokens(&p.forward(&normed)?)?,
            Projection::Linear(p) => p.forward(&to_tokens(&normed)?)?,
        };
        for block in &self.blocks {
            tokens = block.forward(&tokens, context)?;
        }
        let to_map = |t: &Tensor| t.transpose(1, 2)?.reshape((b, c, h, w));
        let out = match &self.proj_out {
            Projection::Conv(p) => p.forward(&to_map(&tokens)?)?,
            Projection::Linear(p) => to_map(&p.forward(&tokens)?)?,
        };
        out + xs
    }
}
