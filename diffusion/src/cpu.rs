//! The engine's own CPU kernels, for f32 on the CPU, where candle's are the
//! slow part of a UNet call (`hallmark-diffusion-bench ops`):
//!
//! - [`conv2d`]: convolution as one im2col and one matmul per tile, the
//!   im2col laid out `(cin·kh·kw, pixels)` so that the weight is used in its
//!   stored layout and the matmul writes the output in place, NCHW. candle's
//!   CPU convolution re-lays the input out as NHWC element by element on one
//!   core, re-flattens the weight on every call, gathers each im2col element
//!   on its own and scatters the result back element by element.
//! - [`group_norm`]: group norm with its per-channel scale and shift and,
//!   optionally, the SiLU after it, in one pass over the map per group (two
//!   reads for the statistics, one write). candle composes it from a layer
//!   norm, two broadcasts and a SiLU, each a pass of its own.
//! - [`softmax_last_dim`]: the attention's softmax, a row at a time (max,
//!   exponentials and their sum, scale) with the polynomial `exp`.
//! - [`geglu`]: `value · gelu(gate)` (exact, erf-based GELU) in one pass.
//!   candle's CPU GELU evaluates `erf` one element at a time.
//! - [`attention`]: `softmax(QKᵀ)V` a block of queries of one head at a
//!   time (scores, softmax, weighted sum while the block's scores are in
//!   cache), reading q, k and v through their strides. The matmul path
//!   writes every head's whole score matrix to memory (4096² per head at
//!   512²) and reads it back twice, after copying q, k and v heads-first.
//!
//! The activations use a polynomial `exp` (relative error about 1e-7) and
//! erf (absolute error ≤ 1.5e-7, Abramowitz & Stegun 7.1.26), written so the
//! compiler vectorises them; on x86-64 the loops are compiled for AVX-512
//! and for AVX2 with FMA too (the widest the CPU has chosen at run time).
//! Work is split over candle's rayon pool.
//!
//! Other devices and types keep candle's kernels: callers check
//! [`applies`] first.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

/// Whether these kernels run `xs`: f32 on the CPU.
pub(crate) fn applies(xs: &Tensor) -> bool {
    xs.device().is_cpu() && xs.dtype() == DType::F32
}

/// Defines `fn $name(args)` whose body is compiled three times, for
/// AVX-512, for AVX2 with FMA and for the baseline target, the widest the
/// CPU has chosen at run time.
/// Helpers the body calls must be `#[inline(always)]` to be compiled into
/// each version.
macro_rules! multiversion {
    ($(#[$meta:meta])* fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$meta])*
        fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn body($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                fn widest($($arg: $ty),*) {
                    body($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has the features `widest` is compiled for.
                    return unsafe { widest($($arg),*) };
                }
                #[target_feature(enable = "avx2,fma")]
                fn wide($($arg: $ty),*) {
                    body($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU has the features `wide` is compiled for.
                    return unsafe { wide($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}

mod winograd;

/// `e^x` for f32: x = n ln 2 + r with |r| ≤ ln 2 / 2, a degree-6 Taylor
/// polynomial for e^r, and 2^n put into the exponent bits. Arguments are
/// clamped to where e^x is a finite, normal f32; a NaN stays a NaN. No
/// float-to-integer cast (Rust's saturating `as` keeps loops scalar): n is
/// rounded by adding 1.5·2^23, which leaves it in the low mantissa bits.
#[inline(always)]
fn exp(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    const SHIFTER: f32 = 12_582_912.0;
    let x = if x < -87.0 { -87.0 } else { x };
    let x = if x > 88.0 { 88.0 } else { x };
    let shifted = x * std::f32::consts::LOG2_E + SHIFTER;
    let n = shifted - SHIFTER;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0 / 720.0;
    let p = p * r + 1.0 / 120.0;
    let p = p * r + 1.0 / 24.0;
    let p = p * r + 1.0 / 6.0;
    let p = p * r + 0.5;
    let p = p * r + 1.0;
    let p = p * r + 1.0;
    // n + 127 in the exponent field: the shifter's bits are 0x4B40_0000 + n.
    let biased = shifted
        .to_bits()
        .wrapping_sub(0x4B40_0000)
        .wrapping_add(127);
    p * f32::from_bits(biased << 23)
}

#[inline(always)]
fn silu(x: f32) -> f32 {
    x / (1.0 + exp(-x))
}

/// erf(x), |error| ≤ 1.5e-7 (Abramowitz & Stegun 7.1.26).
#[inline(always)]
fn erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let p = 1.061_405_4;
    let p = p * t - 1.453_152_1;
    let p = p * t + 1.421_413_8;
    let p = p * t - 0.284_496_74;
    let p = p * t + 0.254_829_6;
    (1.0 - p * t * exp(-a * a)).copysign(x)
}

/// The exact GELU, x Φ(x).
#[inline(always)]
fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("{what}: the CPU kernels take f32, got {:?}", s.dtype());
    };
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(&v[start..end]),
        None => candle_core::bail!("{what}: the input must be contiguous"),
    }
}

/// Elements per parallel work item of the elementwise kernels.
const CHUNK: usize = 1 << 14;

struct Geglu;

impl CustomOp2 for Geglu {
    fn name(&self) -> &'static str {
        "hallmark-geglu"
    }

    fn cpu_fwd(
        &self,
        value: &CpuStorage,
        value_l: &Layout,
        gate: &CpuStorage,
        gate_l: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        if value_l.shape() != gate_l.shape() {
            candle_core::bail!(
                "geglu: value {:?} and gate {:?} differ in shape",
                value_l.shape(),
                gate_l.shape()
            );
        }
        let v = f32_slice(value, value_l, "geglu")?;
        let g = f32_slice(gate, gate_l, "geglu")?;
        let mut out = vec![0f32; v.len()];
        out.par_chunks_mut(CHUNK)
            .zip(v.par_chunks(CHUNK).zip(g.par_chunks(CHUNK)))
            .for_each(|(o, (v, g))| geglu_run(o, v, g));
        Ok((CpuStorage::F32(out), value_l.shape().clone()))
    }
}

multiversion! {
    fn geglu_run(out: &mut [f32], value: &[f32], gate: &[f32]) {
        for ((o, &v), &g) in out.iter_mut().zip(value).zip(gate) {
            *o = v * gelu(g);
        }
    }
}

/// `value · gelu_erf(gate)`, f32 on the CPU (see [`applies`]).
pub(crate) fn geglu(value: &Tensor, gate: &Tensor) -> candle_core::Result<Tensor> {
    value
        .contiguous()?
        .apply_op2_no_bwd(&gate.contiguous()?, &Geglu)
}

struct Softmax;

impl candle_core::CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "hallmark-softmax"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(xs, l, "softmax")?;
        let cols = l.dims().last().copied().unwrap_or(1);
        let mut out = vec![0f32; x.len()];
        // Rows in work items of about CHUNK elements (none when rows are empty).
        if let Some(per_item) = CHUNK.checked_div(cols) {
            let rows = per_item.max(1) * cols;
            out.par_chunks_mut(rows)
                .zip(x.par_chunks(rows))
                .for_each(|(y, x)| {
                    y.copy_from_slice(x);
                    softmax_rows(y, cols);
                });
        }
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }
}

multiversion! {
    /// Each `cols`-long row of `y` replaced by its softmax.
    fn softmax_rows(y: &mut [f32], cols: usize) {
        for y in y.chunks_mut(cols) {
            let mut lanes = [f32::NEG_INFINITY; 16];
            let chunks = y.chunks_exact(16);
            let mut max = chunks.remainder().iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            for c in chunks {
                for (l, &v) in lanes.iter_mut().zip(c) {
                    *l = l.max(v);
                }
            }
            max = lanes.iter().fold(max, |m, &v| m.max(v));
            for o in y.iter_mut() {
                *o = exp(*o - max);
            }
            let inv = 1.0 / lane_sum(y, |v| v);
            for o in y.iter_mut() {
                *o *= inv;
            }
        }
    }
}

/// Softmax over the last dimension; f32 on the CPU (see [`applies`]).
pub(crate) fn softmax_last_dim(xs: &Tensor) -> candle_core::Result<Tensor> {
    xs.contiguous()?.apply_op1_no_bwd(&Softmax)
}

/// Queries per work item of [`attention`]: their scores against every key
/// (256 × 4096 in f32 at 512², 4 MiB) stay in the last-level cache, where the matmul path
/// writes and reads back all of them. Blocks of 256 ran the SD-1.5
/// self-attention at 256² and 512² 5–15 % faster than blocks of 64 (each
/// block's matmuls pack the head's keys and values anew).
const QUERY_BLOCK: usize = 256;

struct AttentionOp {
    scale: f32,
}

/// A `(batch, tokens, heads, d)` operand of [`attention`]: its slice, its
/// start in it, and the sizes and element strides of those four dimensions.
type HeadsOperand<'a> = (&'a [f32], usize, [usize; 4], [usize; 4]);

fn heads_operand<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<HeadsOperand<'a>> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("attention: the CPU kernels take f32, got {:?}", s.dtype());
    };
    let not_4d = |_| candle_core::Error::Msg(format!("attention: {:?} is not 4-D", l.dims()));
    let dims = l.dims().try_into().map_err(not_4d)?;
    let strides = l.stride().try_into().map_err(not_4d)?;
    Ok((v, l.start_offset(), dims, strides))
}

impl CustomOp3 for AttentionOp {
    fn name(&self) -> &'static str {
        "hallmark-attention"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        q_l: &Layout,
        k: &CpuStorage,
        k_l: &Layout,
        v: &CpuStorage,
        v_l: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (q, q_start, [b, nq, h, d], qs) = heads_operand(q, q_l)?;
        let (k, k_start, k_dims, ks) = heads_operand(k, k_l)?;
        let (v, v_start, v_dims, vs) = heads_operand(v, v_l)?;
        let [kb, nk, kh, kd] = k_dims;
        if (kb, kh, kd) != (b, h, d) || k_dims != v_dims || nk == 0 {
            candle_core::bail!(
                "attention: q {:?}, k {:?} and v {:?} do not match",
                q_l.dims(),
                k_l.dims(),
                v_l.dims()
            );
        }
        // One (batch, head) pair's rows of an operand, from `row` on.
        let at = |start: usize, s: [usize; 4], bh: usize, row: usize| Operand {
            start: start + (bh / h) * s[0] + (bh % h) * s[2] + row * s[1],
            strides: [s[1], s[3]],
        };
        let mut out = vec![0f32; b * h * nq * d];
        if !out.is_empty() {
            out.par_chunks_mut(nq * d)
                .enumerate()
                .for_each(|(bh, out)| {
                    // kᵀ: the head's key rows read as columns.
                    let k_at = at(k_start, ks, bh, 0);
                    let kt = Operand {
                        start: k_at.start,
                        strides: [k_at.strides[1], k_at.strides[0]],
                    };
                    let v_at = at(v_start, vs, bh, 0);
                    out.par_chunks_mut(QUERY_BLOCK * d)
                        .enumerate()
                        .for_each(|(block, out)| {
                            let rows = out.len() / d;
                            let mut scores = vec![0f32; rows * nk];
                            matmul_strided(
                                (rows, nk, d),
                                self.scale,
                                (&mut scores, Operand::row_major(nk)),
                                (q, at(q_start, qs, bh, block * QUERY_BLOCK)),
                                (k, kt),
                                gemm::Parallelism::None,
                            );
                            softmax_rows(&mut scores, nk);
                            matmul_strided(
                                (rows, d, nk),
                                1.0,
                                (out, Operand::row_major(d)),
                                (&scores, Operand::row_major(nk)),
                                (v, v_at),
                                gemm::Parallelism::None,
                            );
                        });
                });
        }
        Ok((CpuStorage::F32(out), Shape::from((b, h, nq, d))))
    }
}

/// `softmax(scale · QKᵀ)V` per head without materialising the scores: `q`
/// is `(batch, queries, heads, d)`, `k` and `v` `(batch, keys, heads, d)`,
/// read through any strides; the result is
/// `(batch, heads, queries, d)`, contiguous. Blocks of [`QUERY_BLOCK`]
/// queries of one head are the work items: their scores, softmax and
/// weighted sum stay in cache. f32 on the CPU (see [`applies`]).
pub(crate) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f32,
) -> candle_core::Result<Tensor> {
    q.apply_op3_no_bwd(k, v, &AttentionOp { scale })
}

struct GroupNormOp {
    groups: usize,
    eps: f32,
    silu: bool,
}

impl CustomOp3 for GroupNormOp {
    fn name(&self) -> &'static str {
        "hallmark-group-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xs_l: &Layout,
        weight: &CpuStorage,
        weight_l: &Layout,
        bias: &CpuStorage,
        bias_l: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = xs_l.dims();
        if dims.len() < 3 {
            candle_core::bail!("group norm wants (batch, channels, …), got {dims:?}");
        }
        let channels = dims[1];
        if !channels.is_multiple_of(self.groups)
            || weight_l.dims() != [channels]
            || bias_l.dims() != [channels]
        {
            candle_core::bail!(
                "group norm: {channels} channels in {} groups with scale {:?} and shift {:?}",
                self.groups,
                weight_l.dims(),
                bias_l.dims()
            );
        }
        let x = f32_slice(xs, xs_l, "group norm")?;
        let gamma = f32_slice(weight, weight_l, "group norm")?;
        let beta = f32_slice(bias, bias_l, "group norm")?;
        let per_group = channels / self.groups;
        let pixels: usize = dims[2..].iter().product();
        let row = per_group * pixels;
        let mut out = vec![0f32; x.len()];
        if row > 0 {
            out.par_chunks_mut(row)
                .zip(x.par_chunks(row))
                .enumerate()
                .for_each(|(i, (y, x))| {
                    let first = (i % self.groups) * per_group;
                    let channels = first..first + per_group;
                    let (gamma, beta) = (&gamma[channels.clone()], &beta[channels]);
                    norm_group(x, y, gamma, beta, pixels, self.eps, self.silu);
                });
        }
        Ok((CpuStorage::F32(out), xs_l.shape().clone()))
    }
}

/// Sum of a slice in 16 lanes (so the compiler may vectorise it).
#[inline(always)]
fn lane_sum(xs: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut lanes = [0f32; 16];
    let chunks = xs.chunks_exact(16);
    let rest: f32 = chunks.remainder().iter().map(|&v| f(v)).sum();
    for c in chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l += f(v);
        }
    }
    lanes.iter().sum::<f32>() + rest
}

multiversion! {
    /// One group of one image: mean, then variance about it (two reads, as
    /// exact as f32 allows), then scale, shift and the optional SiLU.
    fn norm_group(
        x: &[f32],
        y: &mut [f32],
        gamma: &[f32],
        beta: &[f32],
        pixels: usize,
        eps: f32,
        act: bool,
    ) {
        let n = x.len() as f32;
        let mean = lane_sum(x, |v| v) / n;
        let var = lane_sum(x, |v| (v - mean) * (v - mean)) / n;
        let rstd = 1.0 / (var + eps).sqrt();
        for (c, (xc, yc)) in x.chunks(pixels).zip(y.chunks_mut(pixels)).enumerate() {
            let scale = gamma[c] * rstd;
            let shift = beta[c] - mean * scale;
            if act {
                for (o, &v) in yc.iter_mut().zip(xc) {
                    *o = silu(v * scale + shift);
                }
            } else {
                for (o, &v) in yc.iter_mut().zip(xc) {
                    *o = v * scale + shift;
                }
            }
        }
    }
}

/// diffusers' group norm (`groups` groups, scale and shift per channel),
/// then SiLU when `act`; f32 on the CPU (see [`applies`]).
pub(crate) fn group_norm(
    xs: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f32,
    act: bool,
) -> candle_core::Result<Tensor> {
    xs.contiguous()?.apply_op3_no_bwd(
        &weight.contiguous()?,
        &bias.contiguous()?,
        &GroupNormOp {
            groups,
            eps,
            silu: act,
        },
    )
}

/// Bytes of im2col buffer per tile: large enough for an efficient matmul,
/// small enough to stay near the caches.
const COL_BYTES: usize = 8 << 20;

struct Conv2dOp {
    stride: usize,
    padding: usize,
    /// 3×3 stride-1 convolutions by Winograd's F(2×2, 3×3) or F(4×4, 3×3) rather than
    /// the im2col.
    winograd: bool,
}

/// The shape of one convolution (also `fused::conv2d`'s).
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConvShape {
    pub(crate) batch: usize,
    pub(crate) cin: usize,
    pub(crate) height: usize,
    pub(crate) width: usize,
    pub(crate) cout: usize,
    pub(crate) kh: usize,
    pub(crate) kw: usize,
    pub(crate) stride: usize,
    pub(crate) padding: usize,
    pub(crate) out_h: usize,
    pub(crate) out_w: usize,
}

impl ConvShape {
    /// The convolution of a `(batch, cin, height, width)` input by a
    /// `(cout, cin, kh, kw)` weight; refused when the channels differ or
    /// the kernel does not fit the padded input.
    pub(crate) fn new(
        x: &Shape,
        weight: &Shape,
        stride: usize,
        padding: usize,
    ) -> candle_core::Result<Self> {
        let (batch, cin, height, width) = x.dims4()?;
        let (cout, wcin, kh, kw) = weight.dims4()?;
        if wcin != cin {
            candle_core::bail!(
                "conv2d: a {:?} kernel on a {:?} input of {cin} channels",
                weight.dims(),
                x.dims()
            );
        }
        let (p, st) = (padding, stride.max(1));
        if height + 2 * p < kh || width + 2 * p < kw {
            candle_core::bail!(
                "conv2d: a {kh}×{kw} kernel does not fit a {height}×{width} input padded by {p}"
            );
        }
        Ok(Self {
            batch,
            cin,
            height,
            width,
            cout,
            kh,
            kw,
            stride: st,
            padding: p,
            out_h: (height + 2 * p - kh) / st + 1,
            out_w: (width + 2 * p - kw) / st + 1,
        })
    }

    /// The im2col's rows: (input channel, kernel row, kernel column), the
    /// weight's own order.
    pub(crate) fn k(&self) -> usize {
        self.cin * self.kh * self.kw
    }
}

/// A run of output rows: `images` whole images from `image`, or one image's
/// rows `row..row + rows`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Tile {
    pub(crate) image: usize,
    pub(crate) images: usize,
    pub(crate) row: usize,
    pub(crate) rows: usize,
}

impl Tile {
    pub(crate) fn columns(&self, s: &ConvShape) -> usize {
        self.images * self.rows * s.out_w
    }
}

/// The tiles of a convolution: whole images together while their columns
/// fit in `col_elements` (small maps: one matmul shares the weight across
/// images), else row bands of one image.
pub(crate) fn tiles(s: &ConvShape, col_elements: usize) -> Vec<Tile> {
    split_rows(s.batch, s.out_h, s.out_w, col_elements / s.k().max(1))
}

/// `batch` images of `rows` rows of `row_len` units each in runs of at
/// most `budget` units (one row at the least): whole images together while
/// they fit, else row bands of one image.
fn split_rows(batch: usize, rows: usize, row_len: usize, budget: usize) -> Vec<Tile> {
    let budget = budget.max(row_len);
    let image_units = rows * row_len;
    let mut out = Vec::new();
    if image_units <= budget {
        let per = (budget / image_units.max(1)).max(1);
        let mut image = 0;
        while image < batch {
            let images = per.min(batch - image);
            out.push(Tile {
                image,
                images,
                row: 0,
                rows,
            });
            image += images;
        }
    } else {
        let band = (budget / row_len.max(1)).max(1);
        for image in 0..batch {
            let mut row = 0;
            while row < rows {
                let n = band.min(rows - row);
                out.push(Tile {
                    image,
                    images: 1,
                    row,
                    rows: n,
                });
                row += n;
            }
        }
    }
    out
}

/// Fills the im2col rows of `tile`: row (c, ky, kx), column (image, output
/// row, output column) holds the input pixel under kernel tap (ky, kx).
pub(crate) fn im2col<T: Copy + Default + Send + Sync>(
    x: &[T],
    s: &ConvShape,
    tile: Tile,
    col: &mut [T],
) {
    let n = tile.columns(s);
    let taps = s.kh * s.kw;
    col.par_chunks_mut(n).enumerate().for_each(|(r, dst)| {
        let (c, ky, kx) = (r / taps, (r % taps) / s.kw, r % s.kw);
        // Output columns whose input column lies inside the map.
        let lo = s.padding.saturating_sub(kx).div_ceil(s.stride).min(s.out_w);
        let hi = (s.width + s.padding)
            .checked_sub(kx)
            .map_or(0, |end| end.div_ceil(s.stride))
            .clamp(lo, s.out_w);
        for (i, seg) in dst.chunks_mut(s.out_w).enumerate() {
            let image = tile.image + i / tile.rows;
            let oy = tile.row + i % tile.rows;
            let iy = (oy * s.stride + ky).checked_sub(s.padding);
            let src = match iy {
                Some(iy) if iy < s.height => {
                    let start = ((image * s.cin + c) * s.height + iy) * s.width;
                    &x[start..start + s.width]
                }
                _ => {
                    seg.fill(T::default());
                    continue;
                }
            };
            if hi == lo {
                seg.fill(T::default());
                continue;
            }
            seg[..lo].fill(T::default());
            seg[hi..].fill(T::default());
            let first = lo * s.stride + kx - s.padding;
            if s.stride == 1 {
                seg[lo..hi].copy_from_slice(&src[first..first + (hi - lo)]);
            } else {
                for (j, v) in seg[lo..hi].iter_mut().enumerate() {
                    *v = src[first + j * s.stride];
                }
            }
        }
    });
}

/// A matrix inside a slice: element `(i, j)` at `start + i·strides[0] +
/// j·strides[1]`.
#[derive(Debug, Clone, Copy)]
struct Operand {
    start: usize,
    strides: [usize; 2],
}

impl Operand {
    fn row_major(cols: usize) -> Self {
        Self {
            start: 0,
            strides: [cols, 1],
        }
    }

    /// Whether a `(rows, cols)` matrix read so stays inside `len` elements.
    fn fits(&self, (rows, cols): (usize, usize), len: usize) -> bool {
        if rows == 0 || cols == 0 {
            return true;
        }
        let last = (rows - 1)
            .checked_mul(self.strides[0])
            .zip((cols - 1).checked_mul(self.strides[1]))
            .and_then(|(r, c)| r.checked_add(c)?.checked_add(self.start));
        last.is_some_and(|last| last < len)
    }
}

/// The matmuls' split over candle's thread pool.
fn parallelism() -> gemm::Parallelism {
    match candle_core::utils::get_num_threads() {
        0 | 1 => gemm::Parallelism::None,
        threads => gemm::Parallelism::Rayon(threads),
    }
}

/// `dst (m, n) = scale · lhs (m, k) · rhs (k, n)`, each operand read
/// through its strides.
fn matmul_strided(
    (m, n, k): (usize, usize, usize),
    scale: f32,
    (dst, dst_at): (&mut [f32], Operand),
    (lhs, lhs_at): (&[f32], Operand),
    (rhs, rhs_at): (&[f32], Operand),
    parallelism: gemm::Parallelism,
) {
    assert!(dst_at.fits((m, n), dst.len()));
    assert!(lhs_at.fits((m, k), lhs.len()) && rhs_at.fits((k, n), rhs.len()));
    if m == 0 || n == 0 {
        return;
    }
    let stride = |s: usize| s as isize;
    // SAFETY: the asserts above keep every element of the (m, k), (k, n)
    // and (m, n) matrices, read through their strides, inside the slices.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr().add(dst_at.start),
            stride(dst_at.strides[1]),
            stride(dst_at.strides[0]),
            false,
            lhs.as_ptr().add(lhs_at.start),
            stride(lhs_at.strides[1]),
            stride(lhs_at.strides[0]),
            rhs.as_ptr().add(rhs_at.start),
            stride(rhs_at.strides[1]),
            stride(rhs_at.strides[0]),
            0.0,
            scale,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// `dst (m, n) = lhs (m, k) · rhs (k, n)`, row-major operands, `dst_rs`
/// apart between the rows of `dst`, over candle's thread pool.
fn matmul(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    dst_rs: usize,
    lhs: &[f32],
    rhs: &[f32],
) {
    let dst_at = Operand {
        start: 0,
        strides: [dst_rs, 1],
    };
    matmul_strided(
        (m, n, k),
        1.0,
        (dst, dst_at),
        (lhs, Operand::row_major(k)),
        (rhs, Operand::row_major(n)),
        parallelism(),
    );
}

/// What a convolution does to its output while the output is in cache:
/// `v = acc + bias[o]`, then the leaky ReLU `max(v, slope·v)` where given,
/// then `v = residual + scale·v` where given. The default does nothing.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Epilogue<'a> {
    /// One value per output channel (`cout`), or one per image and
    /// channel (`batch × cout`: the UNet's time embedding added to a bias).
    pub(crate) bias: Option<&'a [f32]>,
    /// The leaky ReLU's slope below zero (Real-ESRGAN's 0.2).
    pub(crate) leaky: Option<f32>,
    /// `(residual, scale)`: the residual laid out as the output.
    pub(crate) residual: Option<(&'a [f32], f32)>,
}

impl Epilogue<'_> {
    fn does_nothing(&self) -> bool {
        self.bias.is_none() && self.leaky.is_none() && self.residual.is_none()
    }

    /// Applies it to `y`, output elements `at..` of output plane `plane`
    /// (`image × cout + channel`).
    fn apply(&self, y: &mut [f32], plane: usize, at: usize) {
        if self.does_nothing() {
            return;
        }
        // Per channel: the plane's channel; per image and channel: the
        // plane itself.
        let bias = self.bias.map_or(0.0, |b| b[plane % b.len()]);
        let residual = self
            .residual
            .map(|(r, scale)| (&r[at..at + y.len()], scale));
        epilogue_run(y, bias, self.leaky, residual);
    }

    /// Refuses a bias or residual that does not fit an `s` output of
    /// `len` elements.
    fn check(&self, s: &ConvShape, len: usize) -> candle_core::Result<()> {
        if let Some(b) = self.bias
            && b.len() != s.cout
            && b.len() != s.batch * s.cout
        {
            candle_core::bail!(
                "conv2d: {} bias values for {} channels of {} images",
                b.len(),
                s.cout,
                s.batch
            );
        }
        if let Some((r, _)) = self.residual
            && r.len() != len
        {
            candle_core::bail!(
                "conv2d: a residual of {} elements for an output of {len}",
                r.len()
            );
        }
        Ok(())
    }
}

multiversion! {
    fn epilogue_run(y: &mut [f32], bias: f32, leaky: Option<f32>, residual: Option<(&[f32], f32)>) {
        for v in y.iter_mut() {
            *v += bias;
        }
        if let Some(slope) = leaky {
            for v in y.iter_mut() {
                *v = v.max(*v * slope);
            }
        }
        if let Some((r, scale)) = residual {
            for (v, &r) in y.iter_mut().zip(r) {
                *v = r + scale * *v;
            }
        }
    }
}

/// The im2col convolution of `x` by `w` into `out`, `ep` applied to each
/// tile's rows as they are written.
fn convolve(x: &[f32], w: &[f32], s: &ConvShape, out: &mut [f32], ep: &Epilogue) {
    let image_px = s.out_h * s.out_w;
    let tiles = tiles(s, COL_BYTES / 4);
    let widest = tiles.iter().map(|t| t.columns(s)).max().unwrap_or(0);
    let mut col = vec![0f32; s.k() * widest];
    let mut staged = Vec::new();
    for tile in tiles {
        let n = tile.columns(s);
        let col = &mut col[..s.k() * n];
        im2col(x, s, tile, col);
        let images = &mut out[tile.image * s.cout * image_px..][..tile.images * s.cout * image_px];
        if tile.images == 1 {
            // Straight into the image's rows: channel after channel,
            // `image_px` apart.
            let start = tile.row * s.out_w;
            matmul((s.cout, n, s.k()), &mut images[start..], image_px, w, col);
        } else {
            // (cout, images × pixels), then each image's block to its place.
            staged.resize(s.cout * n, 0f32);
            matmul((s.cout, n, s.k()), &mut staged, n, w, col);
            images
                .par_chunks_mut(image_px)
                .enumerate()
                .for_each(|(j, dst)| {
                    let (image, channel) = (j / s.cout, j % s.cout);
                    let src = channel * n + image * image_px;
                    dst.copy_from_slice(&staged[src..src + image_px]);
                });
        }
        if ep.does_nothing() {
            continue;
        }
        let rows = tile.row * s.out_w..(tile.row + tile.rows) * s.out_w;
        images
            .par_chunks_mut(image_px)
            .enumerate()
            .for_each(|(j, plane)| {
                let at = (tile.image * s.cout + j) * image_px + rows.start;
                ep.apply(&mut plane[rows.clone()], tile.image * s.cout + j, at);
            });
    }
}

/// The convolution of `x` (`(batch, cin, height, width)`, contiguous) by
/// `w` (`(cout, cin, kh, kw)`) into `out` (`(batch, cout, out_h, out_w)`),
/// `ep` applied to it; with `winograd`, by Winograd's F(2×2, 3×3) or F(4×4, 3×3) where it
/// runs ([`winograd::runs`]), else by the im2col.
pub(crate) fn conv2d_into(
    x: &[f32],
    w: &[f32],
    s: &ConvShape,
    winograd: bool,
    out: &mut [f32],
    ep: &Epilogue,
) -> candle_core::Result<()> {
    let out_len = s.batch * s.cout * s.out_h * s.out_w;
    if x.len() != s.batch * s.cin * s.height * s.width || w.len() != s.cout * s.k() {
        candle_core::bail!(
            "conv2d: {} input and {} weight elements for {s:?}",
            x.len(),
            w.len()
        );
    }
    if out.len() != out_len {
        candle_core::bail!("conv2d: an output of {} elements for {out_len}", out.len());
    }
    ep.check(s, out_len)?;
    if winograd && winograd::runs(s) {
        winograd::convolve(x, w, s, out, ep);
    } else {
        convolve(x, w, s, out, ep);
    }
    Ok(())
}

impl Conv2dOp {
    fn run(
        &self,
        (xs, xs_l): (&CpuStorage, &Layout),
        (weight, weight_l): (&CpuStorage, &Layout),
        bias: Option<&[f32]>,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let s = ConvShape::new(xs_l.shape(), weight_l.shape(), self.stride, self.padding)?;
        let x = f32_slice(xs, xs_l, "conv2d")?;
        let w = f32_slice(weight, weight_l, "conv2d")?;
        let mut out = vec![0f32; s.batch * s.cout * s.out_h * s.out_w];
        let ep = Epilogue {
            bias,
            ..Default::default()
        };
        conv2d_into(x, w, &s, self.winograd, &mut out, &ep)?;
        Ok((
            CpuStorage::F32(out),
            Shape::from((s.batch, s.cout, s.out_h, s.out_w)),
        ))
    }
}

impl CustomOp2 for Conv2dOp {
    fn name(&self) -> &'static str {
        "hallmark-conv2d"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xs_l: &Layout,
        weight: &CpuStorage,
        weight_l: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.run((xs, xs_l), (weight, weight_l), None)
    }
}

impl CustomOp3 for Conv2dOp {
    fn name(&self) -> &'static str {
        "hallmark-conv2d-bias"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xs_l: &Layout,
        weight: &CpuStorage,
        weight_l: &Layout,
        bias: &CpuStorage,
        bias_l: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let b = f32_slice(bias, bias_l, "conv2d bias")?;
        self.run((xs, xs_l), (weight, weight_l), Some(b))
    }
}

/// A 2-D convolution (no dilation, one group) of `xs (b, cin, h, w)` by
/// `weight (cout, cin, kh, kw)`, plus `bias (cout)` where given; f32 on
/// the CPU (see [`applies`]). With `winograd`, a 3×3 stride-1 convolution
/// runs by Winograd's F(2×2, 3×3) or F(4×4, 3×3) (`winograd.rs`), every other by the
/// im2col; the bias is added as each tile is written.
pub(crate) fn conv2d(
    xs: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    padding: usize,
    winograd: bool,
) -> candle_core::Result<Tensor> {
    let op = Conv2dOp {
        stride,
        padding,
        winograd,
    };
    let (xs, weight) = (xs.contiguous()?, weight.contiguous()?);
    match bias {
        Some(b) => xs.apply_op3_no_bwd(&weight, &b.flatten_all()?.contiguous()?, &op),
        None => xs.apply_op2_no_bwd(&weight, &op),
    }
}

/// Runs `f` on the f32 elements of `t`, a contiguous f32 tensor on the CPU.
pub(crate) fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> candle_core::Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!(
            "the CPU kernels take CPU tensors, got one on {:?}",
            t.device()
        );
    };
    Ok(f(f32_slice(cpu, layout, "tensor")?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{max_diff, randn, relative_diff};
    use candle_core::Device;

    #[test]
    fn activations_match_the_standard_library() {
        let xs: Vec<f32> = (-4000..=4000).map(|i| i as f32 * 0.01).collect();
        for &x in &xs {
            let e = exp(x);
            assert!((e - x.exp()).abs() <= 3e-7 * x.exp(), "exp({x}) = {e}");
            let s = silu(x);
            let want = x / (1.0 + (-x).exp());
            assert!(
                (s - want).abs() <= 1e-6 * (1.0 + want.abs()),
                "silu({x}) = {s}"
            );
        }
        // The exact GELU against candle's (erf from the standard formulas).
        let t = Tensor::new(xs.as_slice(), &Device::Cpu).unwrap();
        let ones = Tensor::ones_like(&t).unwrap();
        let ours = geglu(&ones, &t).unwrap();
        let d = max_diff(&ours, &t.gelu_erf().unwrap());
        assert!(d < 1e-6, "gelu differs by {d}");
        // Extremes stay finite, and a NaN stays a NaN.
        assert!(silu(-200.0).abs() < 1e-30);
        assert_eq!(silu(200.0), 200.0);
        assert!(exp(f32::NAN).is_nan() && silu(f32::NAN).is_nan() && gelu(f32::NAN).is_nan());
        assert_eq!(gelu(-30.0), 0.0);
    }

    #[test]
    fn geglu_matches_candle() {
        let (v, g) = (randn(&[3, 77, 40]), (randn(&[3, 77, 40]) * 3.0).unwrap());
        let want = (&v * g.gelu_erf().unwrap()).unwrap();
        let d = max_diff(&geglu(&v, &g).unwrap(), &want);
        assert!(d < 1e-5, "geglu differs by {d}");
        // Non-contiguous inputs are made contiguous first.
        let vt = v.transpose(1, 2).unwrap();
        let gt = g.transpose(1, 2).unwrap();
        let want = (&vt * gt.gelu_erf().unwrap()).unwrap();
        assert!(max_diff(&geglu(&vt, &gt).unwrap(), &want) < 1e-5);
        assert!(geglu(&v, &g.narrow(1, 0, 5).unwrap()).is_err());
    }

    #[test]
    fn softmax_matches_candle() {
        for shape in [&[2, 3, 77][..], &[4, 1000][..], &[5, 3][..]] {
            let x = (randn(shape) * 8.0).unwrap();
            let want = candle_nn::ops::softmax_last_dim(&x).unwrap();
            let d = max_diff(&softmax_last_dim(&x).unwrap(), &want);
            assert!(d < 1e-6, "{shape:?}: softmax differs by {d}");
        }
        // A row of equal very negative scores (a fully masked row in f32).
        let x = Tensor::full(-1e30f32, (1, 8), &Device::Cpu).unwrap();
        let s = softmax_last_dim(&x).unwrap().to_vec2::<f32>().unwrap();
        assert!(s[0].iter().all(|&p| (p - 0.125).abs() < 1e-7), "{s:?}");
    }

    /// `softmax(scale · QKᵀ)V` by candle's matmuls and softmax, as
    /// `(batch, heads, queries, d)`.
    fn materialised_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Tensor {
        let heads_first = |t: &Tensor| t.transpose(1, 2).unwrap().contiguous().unwrap();
        let kt = heads_first(k).t().unwrap();
        let scores = (heads_first(q).matmul(&kt).unwrap() * scale).unwrap();
        candle_nn::ops::softmax_last_dim(&scores)
            .unwrap()
            .matmul(&heads_first(v))
            .unwrap()
    }

    #[test]
    fn attention_matches_the_materialised_scores_through_any_strides() {
        // Self-attention with q, k and v as views of one interleaved
        // projection; the query count not a multiple of the block.
        let (b, n, heads, d) = (2, 2 * QUERY_BLOCK + 5, 3, 8);
        let qkv = (randn(&[b, n, 3, heads, d]) * 2.0).unwrap();
        let part = |i: usize| qkv.narrow(2, i, 1).unwrap().squeeze(2).unwrap();
        let (q, k, v) = (part(0), part(1), part(2));
        assert!(!q.is_contiguous());
        let ours = attention(&q, &k, &v, 0.3).unwrap();
        assert_eq!(ours.dims(), [b, heads, n, d]);
        let d_self = max_diff(&ours, &materialised_attention(&q, &k, &v, 0.3));
        assert!(d_self < 1e-5, "self-attention differs by {d_self}");

        // Cross-attention to 77 text tokens, contiguous operands.
        let q = randn(&[2, 37, 4, 40]);
        let (k, v) = (randn(&[2, 77, 4, 40]), randn(&[2, 77, 4, 40]));
        let d_cross = max_diff(
            &attention(&q, &k, &v, 1.0).unwrap(),
            &materialised_attention(&q, &k, &v, 1.0),
        );
        assert!(d_cross < 1e-5, "cross-attention differs by {d_cross}");

        // One head over the pixels of channel-first maps (the VAE's), every
        // operand read transposed, from an offset into its storage.
        let maps = randn(&[1, 3 * 16, 150]);
        let head = |i: usize| {
            maps.narrow(1, i * 16, 16)
                .unwrap()
                .t()
                .unwrap()
                .unsqueeze(2)
                .unwrap()
        };
        let (q, k, v) = (head(0), head(1), head(2));
        let d_vae = max_diff(
            &attention(&q, &k, &v, 0.25).unwrap(),
            &materialised_attention(&q, &k, &v, 0.25),
        );
        assert!(d_vae < 1e-5, "channel-first attention differs by {d_vae}");

        // The weights matter: swapping keys and values changes the result.
        let swapped = attention(&q, &v, &k, 0.25).unwrap();
        assert!(max_diff(&swapped, &materialised_attention(&q, &k, &v, 0.25)) > 1e-2);
    }

    #[test]
    fn attention_refuses_operands_that_do_not_match() {
        let q = randn(&[2, 10, 4, 8]);
        let k = randn(&[2, 12, 4, 8]);
        let err = attention(&q, &k, &randn(&[2, 11, 4, 8]), 1.0).unwrap_err();
        assert!(err.to_string().contains("do not match"), "{err}");
        let err = attention(&q, &randn(&[2, 12, 2, 16]), &randn(&[2, 12, 2, 16]), 1.0);
        assert!(err.is_err());
        let err = attention(&q, &randn(&[2, 0, 4, 8]), &randn(&[2, 0, 4, 8]), 1.0);
        assert!(err.is_err(), "no keys");
    }

    #[test]
    fn group_norm_matches_candle_nn() {
        for (shape, groups) in [
            (&[2, 8, 5, 3][..], 4),
            (&[1, 6, 7][..], 3),
            (&[3, 4, 1, 1][..], 2),
        ] {
            // A group of two elements (the 1×1 maps) is ill-conditioned
            // when its two random values nearly coincide: with the
            // variance near eps, both this kernel and candle's differ from
            // an f64 reference by up to 2e-4 (the worst of 2000 draws), so
            // the test failed now and then. That case takes values 1.3
            // apart instead.
            let x = if shape[2..].iter().product::<usize>() == 1 {
                let n = shape.iter().product::<usize>() as u32;
                let ramp = Tensor::arange(0u32, n, &Device::Cpu).unwrap();
                let ramp = ramp.to_dtype(DType::F32).unwrap().reshape(shape).unwrap();
                ramp.affine(1.3, -4.0).unwrap()
            } else {
                ((randn(shape) * 3.0).unwrap() + 1.5).unwrap()
            };
            let c = shape[1];
            let (w, b) = (randn(&[c]), randn(&[c]));
            let reference =
                candle_nn::GroupNorm::new(w.clone(), b.clone(), c, groups, 1e-6).unwrap();
            let want = candle_core::Module::forward(&reference, &x).unwrap();
            let d = max_diff(&group_norm(&x, &w, &b, groups, 1e-6, false).unwrap(), &want);
            assert!(d < 1e-5, "{shape:?}: group norm differs by {d}");
            let want = candle_nn::ops::silu(&want).unwrap();
            let d = max_diff(&group_norm(&x, &w, &b, groups, 1e-6, true).unwrap(), &want);
            assert!(d < 1e-5, "{shape:?}: group norm + SiLU differs by {d}");
        }
        let x = randn(&[1, 6, 4]);
        assert!(group_norm(&x, &randn(&[6]), &randn(&[6]), 4, 1e-6, false).is_err());
        assert!(group_norm(&x, &randn(&[5]), &randn(&[6]), 3, 1e-6, false).is_err());
    }

    #[test]
    fn conv2d_matches_candle() {
        // (batch, cin, h, w, cout, kernel, stride, padding): same-size 3×3,
        // stride-2 downsampling with and without padding, a 1×1, odd sizes,
        // a map too small for the kernel's padding on one side.
        let cases = [
            (2, 5, 9, 7, 4, 3, 1, 1),
            (3, 4, 8, 8, 6, 3, 2, 1),
            (1, 3, 9, 10, 2, 3, 2, 0),
            (2, 6, 5, 4, 3, 1, 1, 0),
            (1, 2, 2, 1, 3, 3, 1, 1),
            (2, 3, 6, 6, 2, 5, 1, 2),
            (2, 128, 16, 15, 128, 3, 1, 1),
        ];
        // With `winograd`, the 3×3 stride-1 case with enough channels and
        // tiles (the last) runs by Winograd's F(2×2, 3×3) or F(4×4, 3×3), the others by
        // the im2col still.
        for winograd in [false, true] {
            for (b, cin, h, w, cout, k, stride, padding) in cases {
                let x = randn(&[b, cin, h, w]);
                let wt = randn(&[cout, cin, k, k]);
                let mut want = x.conv2d(&wt, padding, stride, 1, 1).unwrap();
                // The odd-sized cases with a bias.
                let bias = (h % 2 == 1).then(|| randn(&[cout]));
                if let Some(b) = &bias {
                    want = want
                        .broadcast_add(&b.reshape((1, cout, 1, 1)).unwrap())
                        .unwrap();
                }
                let ours = conv2d(&x, &wt, bias.as_ref(), stride, padding, winograd).unwrap();
                assert_eq!(ours.dims(), want.dims());
                // Relative to the output's largest magnitude (about 10 here,
                // 100 for the 128-channel sums).
                let d = relative_diff(&ours, &want);
                let s = ConvShape::new(x.shape(), wt.shape(), stride, padding).unwrap();
                let tolerance = if winograd && winograd::runs(&s) {
                    winograd::tolerance(&s).max(1e-5)
                } else {
                    1e-5
                };
                assert!(
                    d < tolerance,
                    "case {:?}, winograd {winograd}: differs by {d}",
                    (b, cin, h, w, cout, k, stride, padding)
                );
            }
            let bad = |x: &[usize], w: &[usize], padding, bias: Option<usize>| {
                let bias = bias.map(|n| randn(&[n]));
                conv2d(&randn(x), &randn(w), bias.as_ref(), 1, padding, winograd).is_err()
            };
            assert!(bad(&[1, 3, 4, 4], &[2, 4, 3, 3], 1, None));
            assert!(bad(&[1, 3, 2, 2], &[2, 3, 5, 5], 0, None));
            assert!(bad(&[1, 3, 1, 2], &[2, 3, 3, 3], 0, None));
            assert!(bad(&[1, 3, 4, 4], &[2, 3, 3, 3], 1, Some(3)));
        }
    }

    #[test]
    fn conv2d_tiles_cover_every_output_once() {
        // Bands of one image (a wide im2col) and groups of whole images.
        for (batch, cin, side) in [(2, 320, 64), (5, 1280, 4), (3, 64, 300)] {
            let s = ConvShape {
                batch,
                cin,
                height: side,
                width: side,
                cout: cin,
                kh: 3,
                kw: 3,
                stride: 1,
                padding: 1,
                out_h: side,
                out_w: side,
            };
            let mut seen = vec![0u8; batch * side];
            for t in tiles(&s, COL_BYTES / 4) {
                assert!(t.columns(&s) * s.k() * 4 <= COL_BYTES.max(s.k() * side * 4));
                for image in t.image..t.image + t.images {
                    for row in t.row..t.row + t.rows {
                        seen[image * side + row] += 1;
                    }
                }
            }
            assert!(seen.iter().all(|&n| n == 1), "{batch}×{cin}×{side}²");
        }
    }

    #[test]
    fn banded_conv2d_matches_candle() {
        // A map large enough that one image is split into row bands.
        let x = randn(&[1, 64, 40, 130]);
        let wt = (randn(&[8, 64, 3, 3]) * 0.1).unwrap();
        let s_k = 64 * 9;
        assert!(40 * 130 * s_k * 4 > COL_BYTES, "the case must band");
        let want = x.conv2d(&wt, 1, 1, 1, 1).unwrap();
        let d = max_diff(&conv2d(&x, &wt, None, 1, 1, false).unwrap(), &want);
        assert!(d < 1e-4, "differs by {d}");
    }

    #[test]
    fn the_epilogue_applies_on_every_convolution_path() {
        // (batch, cin, side, winograd): the im2col in row bands of one
        // image, the im2col over several whole images per matmul, and
        // Winograd; each with a bias, the leaky ReLU and a scaled residual,
        // into an output that held NaNs.
        for (b, cin, side, winograd) in [(1, 64, 70, false), (3, 8, 9, false), (2, 32, 24, true)] {
            let x = randn(&[b, cin, side, side]);
            let wt = (randn(&[32, cin, 3, 3]) * 0.1).unwrap();
            let bias = randn(&[32]);
            let s = ConvShape::new(x.shape(), wt.shape(), 1, 1).unwrap();
            assert!(
                winograd::runs(&s) || !winograd,
                "the case must run Winograd"
            );
            let conv = x.conv2d(&wt, 1, 1, 1, 1).unwrap();
            let residual = randn(conv.dims());
            let biased = conv
                .broadcast_add(&bias.reshape((1, 32, 1, 1)).unwrap())
                .unwrap();
            let want = (&residual
                + (biased.maximum(&(&biased * 0.2).unwrap()).unwrap() * 0.2).unwrap())
            .unwrap();
            let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let (bias, residual) = (flat(&bias), flat(&residual));
            let ep = Epilogue {
                bias: Some(&bias),
                leaky: Some(0.2),
                residual: Some((&residual, 0.2)),
            };
            let mut out = vec![f32::NAN; residual.len()];
            conv2d_into(&flat(&x), &flat(&wt), &s, winograd, &mut out, &ep).unwrap();
            let ours = Tensor::from_vec(out, conv.dims(), &Device::Cpu).unwrap();
            let d = relative_diff(&ours, &want);
            let tolerance = if winograd {
                winograd::tolerance(&s)
            } else {
                1e-5
            };
            assert!(
                d < tolerance,
                "{:?}: differs by {d}",
                (b, cin, side, winograd)
            );
            // A residual or bias of another size, or an output of another
            // size, is refused.
            let short = &residual[1..];
            let mut out = vec![0f32; residual.len()];
            let bad = Epilogue {
                residual: Some((short, 1.0)),
                ..ep
            };
            assert!(conv2d_into(&flat(&x), &flat(&wt), &s, winograd, &mut out, &bad).is_err());
            let bad = Epilogue {
                bias: Some(&bias[1..]),
                ..ep
            };
            assert!(conv2d_into(&flat(&x), &flat(&wt), &s, winograd, &mut out, &bad).is_err());
            let mut short_out = vec![0f32; residual.len() - 1];
            assert!(conv2d_into(&flat(&x), &flat(&wt), &s, winograd, &mut short_out, &ep).is_err());
        }
    }
}
