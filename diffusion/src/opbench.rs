//! The UNet's operations one by one, at the shapes an SD-1.5 UNet call
//! feeds them (the benchmark's `ops`): matmuls of the projections and the
//! feed-forward, the attention's score and value products, the whole
//! attention as the engine runs it, 3×3
//! convolutions, group and layer norms, the activations and the layout
//! copies. `bench/diffusion/diffusers_bench.py ops` times the same
//! operations in PyTorch at the same shapes, so one run on a GPU says which
//! kernel costs what against PyTorch's — where the section profile
//! (`profile`) only says which part of the network is slow.
//!
//! Shapes, for a UNet batch `b` (twice the images of a guided render) and
//! latents `l`² (a 512² render: `l` = 64): the top level's `c` = 320
//! channels over `n` = `l`² tokens, 8 heads of 40; the deepest level's 1280
//! channels at (`l`/4)².

use std::collections::HashMap;
use std::time::Instant;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;

use crate::conv::ConvAlgorithm;
use crate::linear::Linear;
use crate::resnet::GroupNorm;

/// One operation's timing.
#[derive(Debug, Clone)]
pub struct OpTiming {
    /// The name `diffusers_bench.py ops` uses for the same operation.
    pub op: &'static str,
    /// The input's shape.
    pub shape: Vec<usize>,
    /// Median milliseconds per call.
    pub ms: f64,
    /// Floating-point operations per call (matmuls and convolutions), else 0.
    pub flops: f64,
    /// Bytes each call must read and write at the least.
    pub bytes: f64,
}

impl OpTiming {
    /// Achieved TFLOP/s (matmuls and convolutions).
    pub fn tflops(&self) -> f64 {
        self.flops / (self.ms * 1e-3) / 1e12
    }

    /// Achieved GB/s of the bytes the operation must move.
    pub fn gbps(&self) -> f64 {
        self.bytes / (self.ms * 1e-3) / 1e9
    }
}

/// How [`run`] measures.
#[derive(Debug, Clone)]
pub struct OpBenchConfig {
    pub device: Device,
    pub dtype: DType,
    /// UNet batch (images × 2 for a guided render).
    pub batch: usize,
    /// Latent side (render side / 8).
    pub latent: usize,
    /// Timed rounds; the median is reported.
    pub runs: usize,
    pub conv_algorithm: ConvAlgorithm,
}

fn randn(shape: &[usize], cfg: &OpBenchConfig) -> candle_core::Result<Tensor> {
    Tensor::randn(0f32, 1f32, shape, &cfg.device)?.to_dtype(cfg.dtype)
}

/// Median milliseconds per call of `f`: a warm-up call, then `runs` rounds of
/// a few calls each between device synchronisations.
fn time(
    cfg: &OpBenchConfig,
    f: &dyn Fn() -> candle_core::Result<Tensor>,
) -> candle_core::Result<f64> {
    f()?;
    cfg.device.synchronize()?;
    let calls = 4;
    let mut rounds = Vec::with_capacity(cfg.runs);
    for _ in 0..cfg.runs.max(1) {
        let started = Instant::now();
        for _ in 0..calls {
            f()?;
        }
        cfg.device.synchronize()?;
        rounds.push(started.elapsed().as_secs_f64() * 1e3 / calls as f64);
    }
    rounds.sort_by(f64::total_cmp);
    Ok(rounds[rounds.len() / 2])
}

/// One 3×3 convolution (padding 1, with a bias) of a `(batch, cin, side,
/// side)` map to `cout` channels, through the engine's convolution layer
/// with `cfg.conv_algorithm`.
pub fn conv3x3(
    cfg: &OpBenchConfig,
    op: &'static str,
    (batch, cin, cout, side): (usize, usize, usize, usize),
) -> candle_core::Result<OpTiming> {
    let vars = HashMap::from([
        (
            "weight".to_string(),
            (randn(&[cout, cin, 3, 3], cfg)? * (9.0 * cin as f64).powf(-0.5))?,
        ),
        ("bias".to_string(), randn(&[cout], cfg)?),
    ]);
    let vb = VarBuilder::from_tensors(vars, cfg.dtype, &cfg.device);
    let conv = cfg.conv_algorithm.conv2d((cin, cout, 3), 1, 1, vb)?;
    let x = randn(&[batch, cin, side, side], cfg)?;
    let ms = time(cfg, &|| conv.forward(&x))?;
    let pixels = (batch * side * side) as f64;
    let el = cfg.dtype.size_in_bytes() as f64;
    let bytes = (x.elem_count() as f64 + pixels * cout as f64 + (9 * cin * cout) as f64) * el;
    Ok(OpTiming {
        op,
        shape: x.dims().to_vec(),
        ms,
        flops: 2.0 * pixels * (9 * cin * cout) as f64,
        bytes,
    })
}

/// A linear layer (weight and bias) from random tensors.
fn linear(cin: usize, cout: usize, cfg: &OpBenchConfig) -> candle_core::Result<Linear> {
    let w = (randn(&[cout, cin], cfg)? * (cin as f64).powf(-0.5))?;
    Ok(Linear::new(w, Some(randn(&[cout], cfg)?)))
}

/// Time every operation (see the module doc for the shapes).
pub fn run(cfg: &OpBenchConfig) -> candle_core::Result<Vec<OpTiming>> {
    let (b, l) = (cfg.batch, cfg.latent);
    let (c, n, heads) = (320, l * l, 8);
    let d = c / heads;
    let el = cfg.dtype.size_in_bytes() as f64;
    let mut out = Vec::new();
    let mut push = |op, shape: &[usize], ms, flops, bytes| {
        out.push(OpTiming {
            op,
            shape: shape.to_vec(),
            ms,
            flops,
            bytes,
        })
    };

    // Matmuls: the feed-forward's projections (the engine's `Linear`: a
    // contiguous (b, n, c) input as one flat matmul, then the bias add), and a shared weight
    // times the feature map's (b, c, pixels), as `proj_in`, the resnets'
    // 1×1 shortcuts and the VAE's attention multiply.
    let tokens = randn(&[b, n, c], cfg)?;
    let ff_in = linear(c, 4 * c, cfg)?;
    let mm = |m: usize, k: usize, nn: usize| (2 * m * k * nn) as f64;
    let io = |m: usize, k: usize, nn: usize| (m * k + k * nn + m * nn) as f64 * el;
    let ms = time(cfg, &|| ff_in.forward(&tokens))?;
    push(
        "linear",
        tokens.dims(),
        ms,
        mm(b * n, c, 4 * c),
        io(b * n, c, 4 * c),
    );
    let pixels = randn(&[b, c, n], cfg)?;
    let w = randn(&[c, c], cfg)?;
    let ms = time(cfg, &|| w.broadcast_left(b)?.matmul(&pixels))?;
    push(
        "shared_weight_matmul",
        pixels.dims(),
        ms,
        mm(b * n, c, c),
        io(b * n, c, c),
    );
    let hidden = randn(&[b, n, 4 * c], cfg)?;
    let ff_out = linear(4 * c, c, cfg)?;
    let ms = time(cfg, &|| ff_out.forward(&hidden))?;
    push(
        "linear_out",
        hidden.dims(),
        ms,
        mm(b * n, 4 * c, c),
        io(b * n, 4 * c, c),
    );

    // Attention: scores and the weighted sum, one head per batch entry.
    let q = randn(&[b * heads, n, d], cfg)?;
    let k = randn(&[b * heads, n, d], cfg)?;
    let kt = k.t()?;
    let ms = time(cfg, &|| q.matmul(&kt))?;
    let bh = b * heads;
    push(
        "scores",
        q.dims(),
        ms,
        (bh as f64) * mm(n, d, n),
        bh as f64 * io(n, d, n),
    );
    let probs = crate::softmax::softmax_last_dim(&q.matmul(&kt)?)?;
    let ms = time(cfg, &|| probs.matmul(&k))?;
    push(
        "weighted_sum",
        probs.dims(),
        ms,
        (bh as f64) * mm(n, n, d),
        bh as f64 * io(n, n, d),
    );
    let ms = time(cfg, &|| crate::softmax::softmax_last_dim(&probs))?;
    push(
        "softmax",
        probs.dims(),
        ms,
        0.0,
        2.0 * probs.elem_count() as f64 * el,
    );
    drop(probs);
    // The whole self-attention as the engine runs it (the own fused kernel
    // where it takes the heads, else candle's matmuls and the softmax), on
    // q, k and v as views of one projection's `(b, n, 3, heads, d)` output;
    // PyTorch's scaled_dot_product_attention on the same views.
    let qkv = randn(&[b, n, 3, heads, d], cfg)?;
    let part = |i: usize| qkv.narrow(2, i, 1)?.squeeze(2);
    let (q, k, v) = (part(0)?, part(1)?, part(2)?);
    let scale = (d as f32).powf(-0.5);
    let fused = crate::fused::attention_fits(&cfg.device, d, cfg.dtype);
    let ms = time(cfg, &|| {
        if fused {
            crate::fused::attention(&q, &k, &v, scale)
        } else {
            crate::fused::candle_attention(&q, &k, &v, scale)
        }
    })?;
    push(
        "attention",
        q.dims(),
        ms,
        2.0 * (bh as f64) * mm(n, d, n),
        4.0 * q.elem_count() as f64 * el,
    );

    // 3×3 convolutions at the top level and at the deepest one.
    for (op, ch, side) in [("conv3x3", c, l), ("conv3x3_deep", 4 * c, l / 4)] {
        let t = conv3x3(cfg, op, (b, ch, ch, side))?;
        push(op, &t.shape, t.ms, t.flops, t.bytes);
    }

    // Norms, activations and elementwise passes over the top level's maps.
    let map = randn(&[b, c, l, l], cfg)?;
    let map_bytes = 2.0 * map.elem_count() as f64 * el;
    let vars = HashMap::from([
        ("weight".to_string(), randn(&[c], cfg)?),
        ("bias".to_string(), randn(&[c], cfg)?),
    ]);
    let norm = GroupNorm::new(
        VarBuilder::from_tensors(vars, cfg.dtype, &cfg.device),
        32,
        c,
        1e-5,
    )?;
    let ms = time(cfg, &|| norm.forward(&map))?;
    push("group_norm", map.dims(), ms, 0.0, map_bytes);
    let ms = time(cfg, &|| norm.forward_silu(&map))?;
    push("group_norm_silu", map.dims(), ms, 0.0, map_bytes);
    let ms = time(cfg, &|| candle_nn::ops::silu(&map))?;
    push("silu", map.dims(), ms, 0.0, map_bytes);
    let bias = randn(&[1, c, 1, 1], cfg)?;
    let ms = time(cfg, &|| crate::fused::add_bias(&map, &bias, None))?;
    push("add_channel_bias", map.dims(), ms, 0.0, map_bytes);
    let other = randn(&[b, c, l, l], cfg)?;
    let ms = time(cfg, &|| &map + &other)?;
    push("add", map.dims(), ms, 0.0, 1.5 * map_bytes);

    let ln = candle_nn::LayerNorm::new(randn(&[c], cfg)?, randn(&[c], cfg)?, 1e-5);
    let ms = time(cfg, &|| ln.forward(&tokens))?;
    push(
        "layer_norm",
        tokens.dims(),
        ms,
        0.0,
        2.0 * tokens.elem_count() as f64 * el,
    );
    let ms = time(cfg, &|| hidden.gelu_erf())?;
    let hidden_bytes = 2.0 * hidden.elem_count() as f64 * el;
    push("gelu", hidden.dims(), ms, 0.0, hidden_bytes);
    let gate = randn(&[b, n, 4 * c], cfg)?;
    // The engine's GEGLU: on CUDA the fused kernel, which also adds the
    // projections' biases (zeros here; PyTorch's adds none).
    let geglu_bias = Tensor::zeros(8 * c, cfg.dtype, &cfg.device)?;
    let ms = time(cfg, &|| {
        if crate::fused::applies(&gate) {
            crate::fused::geglu(&hidden, &gate, &geglu_bias)
        } else {
            crate::attention::geglu(&hidden, &gate)
        }
    })?;
    push("geglu", hidden.dims(), ms, 0.0, 1.5 * hidden_bytes);
    let ms = time(cfg, &|| &hidden * &hidden)?;
    push("mul", hidden.dims(), ms, 0.0, 1.5 * hidden_bytes);
    let split = tokens.reshape((b, n, heads, d))?;
    let ms = time(cfg, &|| split.transpose(1, 2)?.contiguous())?;
    push(
        "transpose_heads",
        split.dims(),
        ms,
        0.0,
        2.0 * split.elem_count() as f64 * el,
    );
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_operation_is_timed_at_its_shape() {
        let cfg = OpBenchConfig {
            device: Device::Cpu,
            dtype: DType::F32,
            batch: 2,
            latent: 8,
            runs: 1,
            conv_algorithm: ConvAlgorithm::default(),
        };
        let timings = run(&cfg).unwrap();
        let names: Vec<_> = timings.iter().map(|t| t.op).collect();
        assert_eq!(
            names,
            [
                "linear",
                "shared_weight_matmul",
                "linear_out",
                "scores",
                "weighted_sum",
                "softmax",
                "attention",
                "conv3x3",
                "conv3x3_deep",
                "group_norm",
                "group_norm_silu",
                "silu",
                "add_channel_bias",
                "add",
                "layer_norm",
                "gelu",
                "geglu",
                "mul",
                "transpose_heads"
            ]
        );
        let scores = &timings[3];
        assert_eq!(scores.shape, [16, 64, 40]);
        assert_eq!(scores.flops, 16.0 * 2.0 * 64.0 * 40.0 * 64.0);
        assert!(timings.iter().all(|t| t.ms > 0.0 && t.bytes > 0.0));
        assert!(timings[7].tflops() > 0.0 && timings[9].gbps() > 0.0);
    }
}
