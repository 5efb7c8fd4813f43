//! The CLIP text encoder (transformers' `CLIPTextModel` and
//! `CLIPTextModelWithProjection`), batched, with access to the penultimate
//! hidden state (SDXL) and the projected pooled output (SDXL's second
//! encoder). Built from the folder's `config.json`.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Embedding, LayerNorm, Linear, VarBuilder};
use serde::Deserialize;

use crate::DiffusionError;
use crate::attention::heads_first;

#[derive(Debug, Clone, Deserialize)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default = "default_positions")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub projection_dim: Option<usize>,
    #[serde(default)]
    pub architectures: Vec<String>,
}

fn default_positions() -> usize {
    77
}
fn default_act() -> String {
    "quick_gelu".into()
}
fn default_eps() -> f64 {
    1e-5
}

#[derive(Debug, Clone, Copy)]
enum Activation {
    QuickGelu,
    Gelu,
}

impl Activation {
    fn forward(self, xs: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::QuickGelu => xs * candle_nn::ops::sigmoid(&(xs * 1.702)?)?,
            Self::Gelu => xs.gelu_erf(),
        }
    }
}

#[derive(Debug)]
struct EncoderLayer {
    norm1: LayerNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

/// What one encoder pass returns.
#[derive(Debug)]
pub struct TextEncoding {
    /// Last hidden state after the final layer norm, `(batch, 77, hidden)`.
    pub last: Tensor,
    /// Hidden state before the last layer (no final norm), `(batch, 77, hidden)`.
    pub penultimate: Tensor,
    /// The end-of-text position's final state, projected when the model has
    /// a `text_projection`, `(batch, dim)`.
    pub pooled: Tensor,
}

#[derive(Debug)]
pub struct ClipTextModel {
    token_embedding: Embedding,
    position_embedding: Embedding,
    layers: Vec<EncoderLayer>,
    final_norm: LayerNorm,
    projection: Option<Linear>,
    heads: usize,
    act: Activation,
}

impl ClipTextModel {
    pub fn new(vb: VarBuilder, cfg: &ClipTextConfig) -> Result<Self, DiffusionError> {
        let act = match cfg.hidden_act.as_str() {
            "quick_gelu" => Activation::QuickGelu,
            "gelu" => Activation::Gelu,
            other => {
                return Err(DiffusionError::BadModel(format!(
                    "text encoder activation {other:?} is not supported (quick_gelu, gelu)"
                )));
            }
        };
        if !cfg.hidden_size.is_multiple_of(cfg.num_attention_heads) {
            return Err(DiffusionError::BadModel(format!(
                "text encoder hidden_size {} is not a multiple of num_attention_heads {}",
                cfg.hidden_size, cfg.num_attention_heads
            )));
        }
        let h = cfg.hidden_size;
        let eps = cfg.layer_norm_eps;
        let tm = vb.pp("text_model");
        let emb = tm.pp("embeddings");
        let token_embedding = candle_nn::embedding(cfg.vocab_size, h, emb.pp("token_embedding"))?;
        let position_embedding =
            candle_nn::embedding(cfg.max_position_embeddings, h, emb.pp("position_embedding"))?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let l = tm.pp("encoder.layers").pp(i.to_string());
                let a = l.pp("self_attn");
                Ok(EncoderLayer {
                    norm1: candle_nn::layer_norm(h, eps, l.pp("layer_norm1"))?,
                    q: candle_nn::linear(h, h, a.pp("q_proj"))?,
                    k: candle_nn::linear(h, h, a.pp("k_proj"))?,
                    v: candle_nn::linear(h, h, a.pp("v_proj"))?,
                    out: candle_nn::linear(h, h, a.pp("out_proj"))?,
                    norm2: candle_nn::layer_norm(h, eps, l.pp("layer_norm2"))?,
                    fc1: candle_nn::linear(h, cfg.intermediate_size, l.pp("mlp.fc1"))?,
                    fc2: candle_nn::linear(cfg.intermediate_size, h, l.pp("mlp.fc2"))?,
                })
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let final_norm = candle_nn::layer_norm(h, eps, tm.pp("final_layer_norm"))?;
        let with_projection = cfg
            .architectures
            .iter()
            .any(|a| a == "CLIPTextModelWithProjection");
        let projection = if with_projection {
            let dim = cfg.projection_dim.unwrap_or(h);
            Some(candle_nn::linear_no_bias(h, dim, vb.pp("text_projection"))?)
        } else {
            None
        };
        Ok(Self {
            token_embedding,
            position_embedding,
            layers,
            final_norm,
            projection,
            heads: cfg.num_attention_heads,
            act,
        })
    }

    /// Whether the model projects its pooled output (`CLIPTextModelWithProjection`).
    pub fn has_projection(&self) -> bool {
        self.projection.is_some()
    }

    fn attention(
        &self,
        l: &EncoderLayer,
        xs: &Tensor,
        mask: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let (b, t, h) = xs.dims3()?;
        let hd = h / self.heads;
        let q = heads_first(&(l.q.forward(xs)? * (hd as f64).powf(-0.5))?, self.heads)?;
        let k = heads_first(&l.k.forward(xs)?, self.heads)?;
        let v = heads_first(&l.v.forward(xs)?, self.heads)?;
        let scores = q.matmul(&k.t()?)?.broadcast_add(mask)?;
        let probs =
            candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?.to_dtype(v.dtype())?;
        let out = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, t, h))?;
        l.out.forward(&out)
    }

    /// Encode a batch of token rows (each [`crate::tokenizer::MAX_TOKENS`] long).
    pub fn encode(
        &self,
        ids: &[Vec<u32>],
        eos_positions: &[usize],
        device: &Device,
    ) -> Result<TextEncoding, DiffusionError> {
        let b = ids.len();
        let t = ids.first().map(Vec::len).unwrap_or(0);
        let flat: Vec<u32> = ids.iter().flatten().copied().collect();
        let ids = Tensor::from_vec(flat, (b, t), device)?;
        let positions = Tensor::arange(0u32, t as u32, device)?.unsqueeze(0)?;
        let mut xs = self
            .token_embedding
            .forward(&ids)?
            .broadcast_add(&self.position_embedding.forward(&positions)?)?;
        let mask: Vec<f32> = (0..t)
            .flat_map(|i| (0..t).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
            .collect();
        let mask = Tensor::from_vec(mask, (t, t), device)?.to_dtype(xs.dtype())?;
        let mut penultimate = xs.clone();
        for (i, l) in self.layers.iter().enumerate() {
            if i + 1 == self.layers.len() {
                penultimate = xs.clone();
            }
            let r = xs.clone();
            xs = (self.attention(l, &l.norm1.forward(&xs)?, &mask)? + r)?;
            let r = xs.clone();
            let hidden = self.act.forward(&l.fc1.forward(&l.norm2.forward(&xs)?)?)?;
            xs = (l.fc2.forward(&hidden)? + r)?;
        }
        let last = self.final_norm.forward(&xs)?;
        let rows = eos_positions
            .iter()
            .enumerate()
            .map(|(i, &p)| last.get(i)?.get(p))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let mut pooled = Tensor::stack(&rows, 0)?;
        if let Some(p) = &self.projection {
            pooled = p.forward(&pooled)?;
        }
        Ok(TextEncoding {
            last,
            penultimate,
            pooled,
        })
    }
}
