//! The own fused CUDA kernels (`kernels/fused.cu`) for the UNet's and the
//! VAE's memory-bound work, where candle runs a chain of kernels each making
//! a pass over the feature map:
//!
//! - **group norm** with its per-channel scale and shift and, for the
//!   resnets, the SiLU after it: one pass of statistics (each group split
//!   over several blocks, so that batch 1's 32 groups still fill the GPU),
//!   then one pass that writes the result, where candle's layer norm, scale,
//!   shift and SiLU make four;
//! - **GEGLU**'s `(value + b) · gelu(gate + b')` (exact GELU) in one pass,
//!   where candle makes four (two bias adds, the GELU, the product);
//! - **bias adds**: a linear layer's or a convolution's bias, with the
//!   residual connection that follows it, in one pass. candle's broadcast
//!   add computes each element's operand index with 64-bit divisions per
//!   dimension, which made every bias add of the UNet several times slower
//!   than its bytes (by the per-section profile of an H100 run, the
//!   feed-forward and the projections ran at 55–70 TFLOP/s against the
//!   hundreds cuBLAS reaches, and they are little else than matmuls, bias
//!   adds and residuals);
//! - **tokens**: the transformer's `proj_in` output from the feature map's
//!   `(batch, channels, pixels)` to `(batch, pixels, channels)` with its
//!   bias, through shared-memory tiles;
//! - **attention**, `softmax(scale · QKᵀ)V` without materialising the scores
//!   (`kernels/attention.cu`, the FlashAttention-2 scheme on the tensor
//!   cores, f16/bf16), reading the queries, keys and values through their
//!   strides, so the self-attention's three come straight out of its one
//!   projection with no layout copies.
//!
//! Statistics, accumulators and sums are f32 whatever the storage type. The
//! norm, GEGLU, the bias adds and the tokens run for CUDA tensors in f32,
//! f16 or bf16 in a `cuda` build; `HALLMARK_FUSED_KERNELS=off` keeps
//! candle's chains instead (for
//! comparisons, or should a driver reject the kernels); the attention is
//! chosen by the UNet's attention setting (`AttentionChoice`). The test
//! `cuda_kernels_simulated` runs every kernel in a host simulation of the
//! CUDA execution model against f64 references; on a GPU the benchmark's
//! `kernels` check compares them against candle's operations.

use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};

use crate::cpu::{self, ConvShape, Tile};

/// Whether the fused kernels run for `xs`.
pub fn applies(xs: &Tensor) -> bool {
    cfg!(feature = "cuda")
        && xs.device().is_cuda()
        && matches!(xs.dtype(), DType::F32 | DType::F16 | DType::BF16)
        && enabled()
}

/// `HALLMARK_FUSED_KERNELS` is not `off` (read once).
fn enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| {
        !std::env::var("HALLMARK_FUSED_KERNELS").is_ok_and(|v| v.eq_ignore_ascii_case("off"))
    })
}

/// How [`group_norm`] finishes each element after normalising it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupNormOutput {
    /// Times the channel's scale (`weight`), plus its shift (`bias`).
    pub affine: bool,
    /// Then SiLU.
    pub silu: bool,
}

/// Checks a group norm's operands: a `(batch, channels, …)` map whose
/// channels split into `groups`, and, when `params`, a `(channels,)` weight
/// and bias in the map's type.
fn check_group_norm(
    xs: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    params: bool,
) -> candle_core::Result<()> {
    let dims = xs.dims();
    if dims.len() < 3 {
        candle_core::bail!("group norm wants (batch, channels, …), got {dims:?}");
    }
    if groups == 0 || !dims[1].is_multiple_of(groups) {
        candle_core::bail!("{} channels do not split into {groups} groups", dims[1]);
    }
    for (name, t) in [("weight", weight), ("bias", bias)] {
        if params && (t.dims() != [dims[1]] || t.dtype() != xs.dtype()) {
            candle_core::bail!(
                "group norm {name}: {:?} {:?}, the map has {} channels in {:?}",
                t.dims(),
                t.dtype(),
                dims[1],
                xs.dtype()
            );
        }
    }
    Ok(())
}

/// Group norm as candle's operations, the chain the fused kernel replaces
/// (and what runs where it does not): candle's fused layer norm over each
/// group, with `unit(row)` the unit scale and zero shift of a group's
/// length `row`, then the per-channel scale and shift when
/// `output.affine`, then SiLU when `output.silu`. Any device and type.
pub fn candle_group_norm(
    xs: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f32,
    output: GroupNormOutput,
    unit: &dyn Fn(usize) -> candle_core::Result<(Tensor, Tensor)>,
) -> candle_core::Result<Tensor> {
    check_group_norm(xs, weight, bias, groups, output.affine)?;
    let dims = xs.dims();
    let b = dims[0];
    let row = xs.elem_count() / (b * groups);
    let (one, zero) = unit(row)?;
    let mut ys = candle_nn::ops::layer_norm(
        &xs.contiguous()?.reshape((b, groups, row))?,
        &one,
        &zero,
        eps,
    )?
    .reshape(dims)?;
    if output.affine {
        let mut per_channel = vec![1; xs.rank()];
        per_channel[1] = dims[1];
        ys = ys
            .broadcast_mul(&weight.reshape(per_channel.as_slice())?)?
            .broadcast_add(&bias.reshape(per_channel.as_slice())?)?;
    }
    if output.silu {
        ys = candle_nn::ops::silu(&ys)?;
    }
    Ok(ys)
}

/// Group norm of a `(batch, channels, …)` map in `groups` groups of adjacent
/// channels, with the fused CUDA kernel; `weight` and `bias` are
/// `(channels,)` (read only when `output.affine`).
pub fn group_norm(
    xs: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f32,
    output: GroupNormOutput,
) -> candle_core::Result<Tensor> {
    check_group_norm(xs, weight, bias, groups, true)?;
    #[cfg(feature = "cuda")]
    {
        let op = cuda::GroupNormOp {
            groups,
            eps,
            output,
        };
        xs.contiguous()?
            .apply_op3_no_bwd(&weight.contiguous()?, &bias.contiguous()?, &op)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (eps, output);
        candle_core::bail!("the fused group norm runs only in a `cuda` build")
    }
}

/// GEGLU's `(value + value_bias) · gelu(gate + gate_bias)` (exact GELU)
/// with the fused CUDA kernel: `value` and `gate` are the feed-forward's
/// two projections without their biases, `(…, width)`, and `bias` is the
/// projection's `(2 width,)` bias, the values' half first; the bias adds
/// cost no pass of their own.
pub fn geglu(value: &Tensor, gate: &Tensor, bias: &Tensor) -> candle_core::Result<Tensor> {
    let width = value.dims().last().copied().unwrap_or(0);
    if value.dims() != gate.dims()
        || value.dtype() != gate.dtype()
        || bias.dims() != [2 * width]
        || bias.dtype() != value.dtype()
    {
        candle_core::bail!(
            "GEGLU: value {:?} {:?}, gate {:?} {:?} and bias {:?} {:?} do not match",
            value.dims(),
            value.dtype(),
            gate.dims(),
            gate.dtype(),
            bias.dims(),
            bias.dtype()
        );
    }
    #[cfg(feature = "cuda")]
    {
        value
            .contiguous()?
            .apply_op3_no_bwd(&gate.contiguous()?, &bias.contiguous()?, &cuda::Geglu)
    }
    #[cfg(not(feature = "cuda"))]
    candle_core::bail!("the fused GEGLU runs only in a `cuda` build")
}

/// Where a bias broadcast over a tensor of `dims` (candle's rules: `bias`
/// left-padded with ones) falls on its elements: `(inner, period)` such
/// that element `e` (row-major) adds `bias[(e / inner) % period]`. That
/// holds when the bias's dimensions other than one form a single run that
/// matches the tensor's; `None` for any other broadcast.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn bias_extent(dims: &[usize], bias: &[usize]) -> Option<(usize, usize)> {
    if bias.len() > dims.len() {
        return None;
    }
    let padded: Vec<usize> = std::iter::repeat_n(1, dims.len() - bias.len())
        .chain(bias.iter().copied())
        .collect();
    let Some(first) = padded.iter().position(|&n| n != 1) else {
        return Some((1, 1));
    };
    let last = padded.iter().rposition(|&n| n != 1).expect("one exists");
    if padded[first..=last] != dims[first..=last] {
        return None;
    }
    Some((
        dims[last + 1..].iter().product(),
        dims[first..=last].iter().product(),
    ))
}

/// `x + bias`, the bias broadcast as candle broadcasts it, plus `residual`
/// (of `x`'s shape) when given: on CUDA one fused pass (a linear layer's or
/// a convolution's bias together with the residual connection after it),
/// where candle's strided bias add alone is several times slower than its
/// bytes; [`candle_add_bias`] elsewhere, and for any broadcast or layout
/// the kernel does not take.
pub fn add_bias(
    x: &Tensor,
    bias: &Tensor,
    residual: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    #[cfg(feature = "cuda")]
    {
        let fits = |t: &Tensor| t.dtype() == x.dtype() && t.is_contiguous();
        if let Some((inner, period)) = bias_extent(x.dims(), bias.dims())
            && applies(x)
            && fits(x)
            && fits(bias)
            && residual.is_none_or(|r| r.dims() == x.dims() && fits(r))
        {
            let op = cuda::AddBias { inner, period };
            return match residual {
                Some(r) => x.apply_op3_no_bwd(bias, r, &cuda::AddBiasResidual(op)),
                None => x.apply_op2_no_bwd(bias, &op),
            };
        }
    }
    candle_add_bias(x, bias, residual)
}

/// The bias add as candle's operations, what [`add_bias`] replaces (and
/// runs where its kernel does not): `broadcast_add`, then the residual.
pub fn candle_add_bias(
    x: &Tensor,
    bias: &Tensor,
    residual: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    let y = x.broadcast_add(bias)?;
    match residual {
        Some(r) => y + r,
        None => Ok(y),
    }
}

/// A `(batch, channels, pixels)` map as `(batch, pixels, channels)` tokens
/// plus a `(channels,)` bias: one tiled pass with the fused kernel on CUDA,
/// candle's transposed broadcast add elsewhere.
pub fn tokens(map: &Tensor, bias: &Tensor) -> candle_core::Result<Tensor> {
    let (_, c, _) = map.dims3()?;
    if bias.dims() != [c] {
        candle_core::bail!("tokens: a bias of {:?} for {c} channels", bias.dims());
    }
    #[cfg(feature = "cuda")]
    if applies(map) && map.is_contiguous() && bias.dtype() == map.dtype() {
        return map.apply_op2_no_bwd(&bias.contiguous()?, &cuda::Tokens);
    }
    map.transpose(1, 2)?.broadcast_add(bias)
}

/// The most bytes of columns [`conv2d`] makes for one matmul: a larger
/// convolution (the VAE's at full resolution, a large upscale tile) goes in
/// chunks of images or, when one image is too large, bands of output rows.
pub const IM2COL_BUDGET: usize = 512 << 20;

/// A `k`×`k` convolution (dilation 1, one group) without its bias as the
/// own im2col and one matmul of the weight, as an `(out, channels·k·k)`
/// matrix, with the columns: the matmul writes the `(batch, out, h, w)`
/// output in place, where candle's im2col path (CUDA without cuDNN) makes
/// its columns the other way round and copies its output into that layout
/// afterwards. The im2col kernel runs on CUDA (`kernels/fused.cu`), its
/// plain loops on the CPU.
pub fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    stride: usize,
    padding: usize,
) -> candle_core::Result<Tensor> {
    conv2d_in_budget(x, weight, stride, padding, IM2COL_BUDGET)
}

/// [`conv2d`] with at most `budget` bytes of columns per matmul.
pub fn conv2d_in_budget(
    x: &Tensor,
    weight: &Tensor,
    stride: usize,
    padding: usize,
    budget: usize,
) -> candle_core::Result<Tensor> {
    let (_, _, kh, kw) = weight.dims4()?;
    if kh != kw || stride == 0 {
        candle_core::bail!(
            "conv2d: a {:?} kernel (stride {stride}, padding {padding}) on a {:?} input",
            weight.dims(),
            x.dims()
        );
    }
    let shape = ConvShape::new(x.shape(), weight.shape(), stride, padding)?;
    let x = x.contiguous()?;
    let matrix = weight.contiguous()?.reshape((shape.cout, shape.k()))?;
    let col_elements = budget / x.dtype().size_in_bytes();
    // Whole images, or the row bands of one image, to be joined in order.
    let mut images = Vec::new();
    let mut bands = Vec::new();
    for tile in cpu::tiles(&shape, col_elements) {
        let col = x.apply_op1_no_bwd(&Im2col { shape, tile })?;
        let y = matrix.broadcast_left(tile.images)?.matmul(&col)?.reshape((
            tile.images,
            shape.cout,
            tile.rows,
            shape.out_w,
        ))?;
        if tile.rows == shape.out_h {
            images.push(y);
            continue;
        }
        bands.push(y);
        if tile.row + tile.rows == shape.out_h {
            images.push(Tensor::cat(&bands, 2)?);
            bands.clear();
        }
    }
    Tensor::cat(&images, 0)
}

/// The columns of a convolution for the output rows of `tile`: `(images,
/// channels·kh·kw, rows·out_w)`, row `(c·kh + ky)·kw + kx` (the weight's own
/// order), zeros where the window leaves the padded map; each image's
/// columns as `cpu::im2col` fills them, one image after the other (the
/// matmul broadcasts the weight over the images).
#[derive(Debug, Clone, Copy)]
struct Im2col {
    shape: ConvShape,
    tile: Tile,
}

impl Im2col {
    /// The output's shape, once the input is checked to be the shape's.
    fn output(&self, l: &Layout) -> candle_core::Result<Shape> {
        let s = &self.shape;
        let t = &self.tile;
        if l.dims() != [s.batch, s.cin, s.height, s.width]
            || t.image + t.images > s.batch
            || t.row + t.rows > s.out_h
        {
            candle_core::bail!(
                "im2col: {t:?} of {s:?} does not fit an input of {:?}",
                l.dims()
            );
        }
        Ok(Shape::from((t.images, s.k(), t.rows * s.out_w)))
    }

    fn cpu<T: Copy + Default + Send + Sync>(&self, x: &[T]) -> Vec<T> {
        let per_image = self.shape.k() * self.tile.rows * self.shape.out_w;
        let mut col = vec![T::default(); self.tile.images * per_image];
        for (i, image_col) in col.chunks_exact_mut(per_image.max(1)).enumerate() {
            let tile = Tile {
                image: self.tile.image + i,
                images: 1,
                ..self.tile
            };
            cpu::im2col(x, &self.shape, tile, image_col);
        }
        col
    }
}

impl CustomOp1 for Im2col {
    fn name(&self) -> &'static str {
        "hallmark-im2col"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let shape = self.output(l)?;
        let Some((start, end)) = l.contiguous_offsets() else {
            candle_core::bail!("im2col: the input must be contiguous");
        };
        let col = match xs {
            CpuStorage::F32(v) => CpuStorage::F32(self.cpu(&v[start..end])),
            CpuStorage::F16(v) => CpuStorage::F16(self.cpu(&v[start..end])),
            CpuStorage::BF16(v) => CpuStorage::BF16(self.cpu(&v[start..end])),
            other => candle_core::bail!(
                "im2col: {:?} is not a type it takes",
                candle_core::backend::BackendStorage::dtype(other)
            ),
        };
        Ok((col, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let shape = self.output(l)?;
        cuda::im2col(self, xs, l, shape)
    }
}

/// Blocks a group norm aims for: several per multiprocessor.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
const TARGET_BLOCKS: usize = 1024;
/// The fewest elements one block of a group norm works through.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
const MIN_CHUNK: usize = 2048;
/// The most blocks one group is split over.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
const MAX_SPLITS: usize = 256;

/// How the fused group norm splits each of `groups` groups of `n > 0`
/// elements over blocks: `(blocks per group, elements per block)`, every
/// block with work, the chunk a whole number of `lanes` (one 16-byte load)
/// when the kernel loads 16 bytes at a time (`vec`).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn group_norm_split(groups: usize, n: usize, lanes: usize, vec: bool) -> (usize, usize) {
    let splits = TARGET_BLOCKS
        .div_ceil(groups)
        .clamp(1, n.div_ceil(MIN_CHUNK).clamp(1, MAX_SPLITS));
    let mut chunk = n.div_ceil(splits);
    if vec {
        chunk = chunk.next_multiple_of(lanes);
    }
    (n.div_ceil(chunk), chunk)
}

/// The padded head sizes the fused attention kernel is compiled for.
const ATTENTION_HEAD_SIZES: [usize; 6] = [48, 64, 80, 96, 128, 160];

/// Whether the fused attention runs heads of `d` in `dtype` on `device`:
/// the CUDA kernel takes f16/bf16 heads of a multiple of 8 up to 160, the
/// CPU one (`cpu::attention`) any head in f32.
pub fn attention_fits(device: &Device, d: usize, dtype: DType) -> bool {
    if device.is_cpu() {
        return dtype == DType::F32;
    }
    cuda_attention_fits(d, dtype)
}

fn cuda_attention_fits(d: usize, dtype: DType) -> bool {
    matches!(dtype, DType::F16 | DType::BF16)
        && d.is_multiple_of(8)
        && d <= ATTENTION_HEAD_SIZES[ATTENTION_HEAD_SIZES.len() - 1]
}

/// The attention as candle's matmuls and the softmax, what [`attention`]
/// replaces (the benchmark's baseline): the same `(batch, tokens, heads,
/// d)` operands and result, the scores materialised heads-first. Any device
/// and type.
pub fn candle_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f32,
) -> candle_core::Result<Tensor> {
    let heads_first = |t: &Tensor| t.transpose(1, 2)?.contiguous();
    let scores = (heads_first(q)?.matmul(&heads_first(k)?.t()?)? * f64::from(scale))?;
    crate::softmax::softmax_last_dim(&scores)?
        .matmul(&heads_first(v)?)?
        .transpose(1, 2)
}

/// `softmax(scale · QKᵀ)V` per head without materialising the scores: `q`
/// is `(batch, queries, heads, d)`, `k` and `v` `(batch, keys, heads, d)`;
/// the result is `(batch, queries, heads, d)`. On CUDA the fused kernel:
/// any strides with a contiguous last dimension, every stride and start a
/// multiple of 8 elements, the result contiguous. On the CPU in f32
/// `cpu::attention`: any strides, the result a transposed view of its
/// `(batch, heads, queries, d)`.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f32) -> candle_core::Result<Tensor> {
    let (b, _, h, d) = q.dims4()?;
    let (kb, nk, kh, kd) = k.dims4()?;
    if (kb, kh, kd) != (b, h, d) || k.dims() != v.dims() {
        candle_core::bail!(
            "attention: q {:?}, k {:?} and v {:?} do not match",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    if nk == 0 {
        candle_core::bail!("attention: no keys");
    }
    let dtype = q.dtype();
    if k.dtype() != dtype || v.dtype() != dtype {
        candle_core::bail!(
            "attention: q, k and v in {dtype:?}, {:?} and {:?}",
            k.dtype(),
            v.dtype()
        );
    }
    if cpu::applies(q) {
        return cpu::attention(q, k, v, scale)?.transpose(1, 2);
    }
    if !q.device().is_cuda() || !cuda_attention_fits(d, dtype) {
        candle_core::bail!(
            "the fused attention takes heads in f32 on the CPU, or f16/bf16 heads of a multiple of 8 up to {} on CUDA, not {d} in {dtype:?} on {:?}",
            ATTENTION_HEAD_SIZES[ATTENTION_HEAD_SIZES.len() - 1],
            q.device()
        );
    }
    #[cfg(feature = "cuda")]
    {
        q.apply_op3_no_bwd(k, v, &cuda::Attention { scale })
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = scale;
        candle_core::bail!("the fused attention runs only in a `cuda` build")
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{
        CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
    };
    use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
    use candle_core::{CpuStorage, CudaDevice, CudaStorage, CustomOp2, CustomOp3, Layout, Shape};

    use super::{ATTENTION_HEAD_SIZES, GroupNormOutput};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/fused.ptx"));
    const ATTENTION_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/attention.ptx"));
    const MODULE: &str = "hallmark_fused";
    const THREADS: u32 = 256;

    /// The contiguous part of `slice` that `layout` covers, and where it
    /// starts (in elements).
    fn view<'a, T>(
        slice: &'a CudaSlice<T>,
        layout: &Layout,
        what: &str,
    ) -> candle_core::Result<(CudaView<'a, T>, usize)> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("{what}: the input must be contiguous");
        };
        Ok((slice.slice(start..end), start))
    }

    fn lanes<T>() -> usize {
        16 / std::mem::size_of::<T>()
    }

    /// The output shape of an op whose result has its first operand's.
    fn same_shape(l: &Layout) -> candle_core::Result<Shape> {
        Ok(l.shape().clone())
    }

    fn to_i32(v: usize, what: &str) -> candle_core::Result<i32> {
        i32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("{what} {v} is too large")))
    }

    /// `CustomOp2` for a kernel op with a generic `launch(suffix, device,
    /// (slice, layout) × 2)`: the storage types it has, by variant and
    /// kernel-name suffix; `$shape` gives the result's shape from the first
    /// operand's layout.
    macro_rules! two_operand_op {
        ($op:ty, $name:literal, $what:literal, $shape:expr, [$($variant:ident => $suffix:literal),*]) => {
            impl CustomOp2 for $op {
                fn name(&self) -> &'static str {
                    $name
                }

                fn cpu_fwd(
                    &self,
                    _: &CpuStorage,
                    _: &Layout,
                    _: &CpuStorage,
                    _: &Layout,
                ) -> candle_core::Result<(CpuStorage, Shape)> {
                    candle_core::bail!(concat!($what, " runs only on a CUDA device"))
                }

                fn cuda_fwd(
                    &self,
                    a: &CudaStorage,
                    al: &Layout,
                    b: &CudaStorage,
                    bl: &Layout,
                ) -> candle_core::Result<(CudaStorage, Shape)> {
                    let dev = a.device();
                    let slice = match (&a.slice, &b.slice) {
                        $((
                            CudaStorageSlice::$variant(a),
                            CudaStorageSlice::$variant(b),
                        ) => CudaStorageSlice::$variant(
                            self.launch($suffix, dev, (a, al), (b, bl))?,
                        ),)*
                        _ => candle_core::bail!(
                            "{}: {:?} (with {:?}) is not a type the kernel has",
                            $what,
                            a.dtype(),
                            b.dtype()
                        ),
                    };
                    let out = CudaStorage {
                        slice,
                        device: dev.clone(),
                    };
                    Ok((out, $shape(al)?))
                }
            }
        };
    }

    /// `CustomOp3` for a kernel op with a generic `launch(suffix, device,
    /// (slice, layout) × 3)`: the storage types it has, by variant and
    /// kernel-name suffix; the result has the first operand's shape.
    macro_rules! three_operand_op {
        ($op:ty, $name:literal, $what:literal, [$($variant:ident => $suffix:literal),*]) => {
            impl CustomOp3 for $op {
                fn name(&self) -> &'static str {
                    $name
                }

                fn cpu_fwd(
                    &self,
                    _: &CpuStorage,
                    _: &Layout,
                    _: &CpuStorage,
                    _: &Layout,
                    _: &CpuStorage,
                    _: &Layout,
                ) -> candle_core::Result<(CpuStorage, Shape)> {
                    candle_core::bail!(concat!($what, " runs only on a CUDA device"))
                }

                fn cuda_fwd(
                    &self,
                    a: &CudaStorage,
                    al: &Layout,
                    b: &CudaStorage,
                    bl: &Layout,
                    c: &CudaStorage,
                    cl: &Layout,
                ) -> candle_core::Result<(CudaStorage, Shape)> {
                    let dev = a.device();
                    let slice = match (&a.slice, &b.slice, &c.slice) {
                        $((
                            CudaStorageSlice::$variant(a),
                            CudaStorageSlice::$variant(b),
                            CudaStorageSlice::$variant(c),
                        ) => CudaStorageSlice::$variant(
                            self.launch($suffix, dev, (a, al), (b, bl), (c, cl))?,
                        ),)*
                        _ => candle_core::bail!(
                            "{}: {:?} (with {:?}, {:?}) is not a type the kernel has",
                            $what,
                            a.dtype(),
                            b.dtype(),
                            c.dtype()
                        ),
                    };
                    let out = CudaStorage {
                        slice,
                        device: dev.clone(),
                    };
                    Ok((out, al.shape().clone()))
                }
            }
        };
    }

    pub(super) struct GroupNormOp {
        pub(super) groups: usize,
        pub(super) eps: f32,
        pub(super) output: GroupNormOutput,
    }

    impl GroupNormOp {
        fn launch<T: DeviceRepr>(
            &self,
            suffix: &str,
            dev: &CudaDevice,
            (x, xl): (&CudaSlice<T>, &Layout),
            (gamma, gl): (&CudaSlice<T>, &Layout),
            (beta, bl): (&CudaSlice<T>, &Layout),
        ) -> candle_core::Result<CudaSlice<T>> {
            let (x, start) = view(x, xl, "group norm")?;
            let (gamma, _) = view(gamma, gl, "group norm weight")?;
            let (beta, _) = view(beta, bl, "group norm bias")?;
            let dims = xl.shape().dims();
            let el = xl.shape().elem_count();
            let (batch, channels) = (dims[0], dims[1]);
            let spatial: usize = dims[2..].iter().product();
            let cpg = channels / self.groups;
            let n = cpg * spatial;
            let blocks_x = batch * self.groups;
            if el == 0 {
                // SAFETY: nothing to write.
                return unsafe { dev.alloc::<T>(0) };
            }
            let vec = spatial.is_multiple_of(lanes::<T>()) && start.is_multiple_of(lanes::<T>());
            let (splits, chunk) = super::group_norm_split(blocks_x, n, lanes::<T>(), vec);
            let cfg = LaunchConfig {
                grid_dim: (to_i32(blocks_x, "batch × groups")? as u32, splits as u32, 1),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            // The apply kernel divides offsets within a group in 32 bits.
            to_i32(n, "one group's elements")?;
            let (n, chunk) = (n as i64, chunk as i64);
            let vec = i32::from(vec);
            // SAFETY: the stats kernel writes both sums of every block.
            let partial = unsafe { dev.alloc::<f32>(blocks_x * splits * 2)? };
            let stats = dev.get_or_load_custom_func(
                &format!("hallmark_group_norm_stats_{suffix}"),
                MODULE,
                PTX,
            )?;
            let mut builder = stats.builder();
            builder.arg(&x);
            builder.arg(&partial);
            builder.arg(&n);
            builder.arg(&chunk);
            builder.arg(&vec);
            // SAFETY: the arguments match the kernel's signature.
            unsafe { builder.launch(cfg) }.w()?;

            // SAFETY: the apply kernel writes every element.
            let y = unsafe { dev.alloc::<T>(el)? };
            let apply = dev.get_or_load_custom_func(
                &format!("hallmark_group_norm_apply_{suffix}"),
                MODULE,
                PTX,
            )?;
            let spatial = to_i32(spatial, "spatial size")?;
            let groups = to_i32(self.groups, "groups")?;
            let cpg = to_i32(cpg, "channels per group")?;
            let affine = i32::from(self.output.affine);
            let silu = i32::from(self.output.silu);
            let mut builder = apply.builder();
            builder.arg(&x);
            builder.arg(&partial);
            builder.arg(&gamma);
            builder.arg(&beta);
            builder.arg(&y);
            builder.arg(&n);
            builder.arg(&chunk);
            builder.arg(&spatial);
            builder.arg(&groups);
            builder.arg(&cpg);
            builder.arg(&self.eps);
            builder.arg(&affine);
            builder.arg(&silu);
            builder.arg(&vec);
            // SAFETY: the arguments match the kernel's signature.
            unsafe { builder.launch(cfg) }.w()?;
            Ok(y)
        }
    }

    three_operand_op!(GroupNormOp, "hallmark-group-norm", "the fused group norm", [F32 => "f32", F16 => "f16", BF16 => "bf16"]);

    /// Launches over `units` elements or 16-byte vectors: one thread each,
    /// the grid capped (the kernels loop over what is left).
    fn elementwise_config(units: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (
                units.div_ceil(THREADS as usize).clamp(1, 1 << 16) as u32,
                1,
                1,
            ),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    pub(super) struct Geglu;

    impl Geglu {
        fn launch<T: DeviceRepr>(
            &self,
            suffix: &str,
            dev: &CudaDevice,
            (value, vl): (&CudaSlice<T>, &Layout),
            (gate, gl): (&CudaSlice<T>, &Layout),
            (bias, bl): (&CudaSlice<T>, &Layout),
        ) -> candle_core::Result<CudaSlice<T>> {
            let (value, value_start) = view(value, vl, "GEGLU value")?;
            let (gate, gate_start) = view(gate, gl, "GEGLU gate")?;
            let (_, bias_start) = view(bias, bl, "GEGLU bias")?;
            let el = vl.shape().elem_count();
            let width = bl.shape().elem_count() / 2;
            let value_bias = bias.slice(bias_start..bias_start + width);
            let gate_bias = bias.slice(bias_start + width..bias_start + 2 * width);
            let lanes = lanes::<T>();
            let vec = [width, value_start, gate_start, bias_start]
                .iter()
                .all(|v| v.is_multiple_of(lanes));
            // SAFETY: every element is written by the kernel.
            let y = unsafe { dev.alloc::<T>(el)? };
            if el == 0 {
                return Ok(y);
            }
            let func =
                dev.get_or_load_custom_func(&format!("hallmark_geglu_{suffix}"), MODULE, PTX)?;
            let (n, width64, vec32) = (el as i64, width as i64, i32::from(vec));
            let mut builder = func.builder();
            builder.arg(&value);
            builder.arg(&gate);
            builder.arg(&value_bias);
            builder.arg(&gate_bias);
            builder.arg(&y);
            builder.arg(&n);
            builder.arg(&width64);
            builder.arg(&vec32);
            let cfg = elementwise_config(if vec { el / lanes } else { el });
            // SAFETY: the arguments match the kernel's signature.
            unsafe { builder.launch(cfg) }.w()?;
            Ok(y)
        }
    }

    three_operand_op!(Geglu, "hallmark-geglu", "the fused GEGLU", [F32 => "f32", F16 => "f16", BF16 => "bf16"]);

    /// `x + bias[(e / inner) % period]` (+ a residual), see `add_bias`.
    pub(super) struct AddBias {
        pub(super) inner: usize,
        pub(super) period: usize,
    }

    impl AddBias {
        fn run<T: DeviceRepr>(
            &self,
            suffix: &str,
            dev: &CudaDevice,
            (x, xl): (&CudaSlice<T>, &Layout),
            (bias, bl): (&CudaSlice<T>, &Layout),
            residual: Option<(&CudaSlice<T>, &Layout)>,
        ) -> candle_core::Result<CudaSlice<T>> {
            let (x, x_start) = view(x, xl, "bias add input")?;
            let (bias, bias_start) = view(bias, bl, "bias")?;
            let residual = residual
                .map(|(r, rl)| view(r, rl, "residual"))
                .transpose()?;
            let el = xl.shape().elem_count();
            // SAFETY: every element is written by the kernel.
            let y = unsafe { dev.alloc::<T>(el)? };
            if el == 0 {
                return Ok(y);
            }
            let lanes = lanes::<T>();
            let aligned = [
                Some(x_start),
                Some(bias_start),
                residual.as_ref().map(|r| r.1),
            ]
            .into_iter()
            .flatten()
            .all(|s| s.is_multiple_of(lanes));
            let (inner, period) = (self.inner, self.period);
            let mode: i32 = if aligned && inner == 1 && period.is_multiple_of(lanes) {
                1
            } else if aligned && inner.is_multiple_of(lanes) {
                2
            } else {
                0
            };
            let func =
                dev.get_or_load_custom_func(&format!("hallmark_add_bias_{suffix}"), MODULE, PTX)?;
            let (n, inner, period) = (el as i64, inner as i64, period as i64);
            let null: u64 = 0;
            let mut builder = func.builder();
            builder.arg(&x);
            builder.arg(&bias);
            match &residual {
                Some((r, _)) => builder.arg(r),
                None => builder.arg(&null),
            };
            builder.arg(&y);
            builder.arg(&n);
            builder.arg(&inner);
            builder.arg(&period);
            builder.arg(&mode);
            let cfg = elementwise_config(if mode == 0 { el } else { el / lanes });
            // SAFETY: the arguments match the kernel's signature (a null
            // residual pointer means none).
            unsafe { builder.launch(cfg) }.w()?;
            Ok(y)
        }

        fn launch<T: DeviceRepr>(
            &self,
            suffix: &str,
            dev: &CudaDevice,
            x: (&CudaSlice<T>, &Layout),
            bias: (&CudaSlice<T>, &Layout),
        ) -> candle_core::Result<CudaSlice<T>> {
            self.run(suffix, dev, x, bias, None)
        }
    }

    two_operand_op!(AddBias, "hallmark-add-bias", "the fused bias add", same_shape, [F32 => "f32", F16 => "f16", BF16 => "bf16"]);

    /// The bias add with a residual: the residual is the third operand.
    pub(super) struct AddBiasResidual(pub(super) AddBias);

    impl AddBiasResidual {
        fn launch<T: DeviceRepr>(
            &self,
            suffix: &str,
            dev: &CudaDevice,
            x: (&CudaSlice<T>, &Layout),
            bias: (&CudaSlice<T>, &Layout),
            residual: (&CudaSlice<T>, &Layout),
        ) -> candle_core::Result<CudaSlice<T>> {
            self.0.run(suffix, dev, x, bias, Some(residual))
        }
    }

    three_operand_op!(AddBiasResidual, "hallmark-add-bias-residual", "the fused bias add", [F32 => "f32", F16 => "f16", BF16 => "bf16"]);

    pub(super) struct Tokens;

    impl Tokens {
        fn launch<T: DeviceRepr>(
            &self,
            suffix: &str,
            dev: &CudaDevice,
            (x, xl): (&CudaSlice<T>, &Layout),
            (bias, bl): (&CudaSlice<T>, &Layout),
        ) -> candle_core::Result<CudaSlice<T>> {
            let (x, _) = view(x, xl, "tokens input")?;
            let (bias, _) = view(bias, bl, "tokens bias")?;
            let (b, c, p) = xl.shape().dims3()?;
            // SAFETY: every element is written by the kernel.
            let y = unsafe { dev.alloc::<T>(b * c * p)? };
            if b * c * p == 0 {
                return Ok(y);
            }
            let cfg = LaunchConfig {
                grid_dim: (
                    to_i32(p.div_ceil(32), "pixel tiles")? as u32,
                    to_i32(c.div_ceil(32), "channel tiles")? as u32,
                    to_i32(b, "batch")? as u32,
                ),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            let func = dev.get_or_load_custom_func(
                &format!("hallmark_tokens_add_bias_{suffix}"),
                MODULE,
                PTX,
            )?;
            let (c, p) = (to_i32(c, "channels")?, to_i32(p, "pixels")?);
            let mut builder = func.builder();
            builder.arg(&x);
            builder.arg(&bias);
            builder.arg(&y);
            builder.arg(&c);
            builder.arg(&p);
            // SAFETY: the arguments match the kernel's signature.
            unsafe { builder.launch(cfg) }.w()?;
            Ok(y)
        }
    }

    /// `(batch, channels, pixels)` in, `(batch, pixels, channels)` out.
    fn tokens_shape(l: &Layout) -> candle_core::Result<Shape> {
        let (b, c, p) = l.shape().dims3()?;
        Ok(Shape::from((b, p, c)))
    }

    two_operand_op!(Tokens, "hallmark-tokens", "the fused tokens bias add", tokens_shape, [F32 => "f32", F16 => "f16", BF16 => "bf16"]);

    /// Launches the im2col kernel for `op` on `xs`, whose result has
    /// `shape`.
    pub(super) fn im2col(
        op: &super::Im2col,
        xs: &CudaStorage,
        l: &Layout,
        shape: Shape,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        fn run<T: DeviceRepr>(
            op: &super::Im2col,
            suffix: &str,
            dev: &CudaDevice,
            x: &CudaSlice<T>,
            l: &Layout,
            shape: &Shape,
        ) -> candle_core::Result<CudaSlice<T>> {
            let (s, t) = (&op.shape, &op.tile);
            if s.kh != s.kw {
                candle_core::bail!("im2col: the kernel takes square windows, not {s:?}");
            }
            let (x, _) = view(x, l, "im2col input")?;
            let image = s.cin * s.height * s.width;
            let x = x.slice(t.image * image..(t.image + t.images) * image);
            // SAFETY: every element is written by the kernel.
            let col = unsafe { dev.alloc::<T>(shape.elem_count())? };
            if shape.elem_count() == 0 {
                return Ok(col);
            }
            let pixels = to_i32(t.rows * s.out_w, "band pixels")? as usize;
            let cfg = LaunchConfig {
                grid_dim: (
                    to_i32(t.images * s.k(), "images × column rows")? as u32,
                    pixels.div_ceil(THREADS as usize).clamp(1, 65_535) as u32,
                    1,
                ),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            let func =
                dev.get_or_load_custom_func(&format!("hallmark_im2col_{suffix}"), MODULE, PTX)?;
            let args = [
                to_i32(s.cin, "channels")?,
                to_i32(s.height, "height")?,
                to_i32(s.width, "width")?,
                to_i32(s.kh, "kernel")?,
                to_i32(s.stride, "stride")?,
                to_i32(s.padding, "padding")?,
                to_i32(s.out_w, "output width")?,
                to_i32(t.row, "first row")?,
                to_i32(t.rows, "rows")?,
            ];
            let mut builder = func.builder();
            builder.arg(&x);
            builder.arg(&col);
            for a in &args {
                builder.arg(a);
            }
            // SAFETY: the arguments match the kernel's signature.
            unsafe { builder.launch(cfg) }.w()?;
            Ok(col)
        }
        let dev = xs.device();
        let slice = match &xs.slice {
            CudaStorageSlice::F32(x) => CudaStorageSlice::F32(run(op, "f32", dev, x, l, &shape)?),
            CudaStorageSlice::F16(x) => CudaStorageSlice::F16(run(op, "f16", dev, x, l, &shape)?),
            CudaStorageSlice::BF16(x) => {
                CudaStorageSlice::BF16(run(op, "bf16", dev, x, l, &shape)?)
            }
            _ => candle_core::bail!("im2col: {:?} is not a type the kernel has", xs.dtype()),
        };
        let out = CudaStorage {
            slice,
            device: dev.clone(),
        };
        Ok((out, shape))
    }

    pub(super) struct Attention {
        pub(super) scale: f32,
    }

    /// `(batch, tokens, heads)` strides of a `(batch, tokens, heads, d)`
    /// operand and where it starts, checked for the kernel's 16-byte loads.
    fn operand<'a, T>(
        slice: &'a CudaSlice<T>,
        layout: &Layout,
        what: &str,
    ) -> candle_core::Result<(CudaView<'a, T>, [i64; 3])> {
        let stride = layout.stride();
        let start = layout.start_offset();
        let aligned = stride[..3]
            .iter()
            .chain([&start])
            .all(|s| s.is_multiple_of(8));
        if stride[3] != 1 || !aligned {
            candle_core::bail!(
                "attention {what}: strides {stride:?} from {start} (the kernel wants a contiguous head and multiples of 8)"
            );
        }
        // The furthest element the strides reach, plus one.
        let dims = layout.dims();
        let end = start
            + 1
            + dims
                .iter()
                .zip(stride)
                .map(|(&n, &s)| n.saturating_sub(1) * s)
                .sum::<usize>();
        Ok((
            slice.slice(start..end),
            [stride[0] as i64, stride[1] as i64, stride[2] as i64],
        ))
    }

    impl Attention {
        fn launch<T: DeviceRepr>(
            &self,
            suffix: &str,
            dev: &CudaDevice,
            (q, ql): (&CudaSlice<T>, &Layout),
            (k, kl): (&CudaSlice<T>, &Layout),
            (v, vl): (&CudaSlice<T>, &Layout),
        ) -> candle_core::Result<CudaSlice<T>> {
            let (b, nq, heads, d) = ql.shape().dims4()?;
            let nk = kl.dims()[1];
            let padded = ATTENTION_HEAD_SIZES
                .into_iter()
                .find(|&p| p >= d)
                .expect("checked by cuda_attention_fits");
            let el = b * nq * heads * d;
            // SAFETY: every element is written by the kernel.
            let o = unsafe { dev.alloc::<T>(el)? };
            if el == 0 {
                return Ok(o);
            }
            let (q, qs) = operand(q, ql, "queries")?;
            let (k, ks) = operand(k, kl, "keys")?;
            let (v, vs) = operand(v, vl, "values")?;
            let cfg = LaunchConfig {
                grid_dim: (
                    to_i32(nq.div_ceil(64), "query tiles")? as u32,
                    to_i32(heads, "heads")? as u32,
                    to_i32(b, "batch")? as u32,
                ),
                block_dim: (128, 1, 1),
                shared_mem_bytes: 0,
            };
            let func = dev.get_or_load_custom_func(
                &format!("hallmark_attention_{suffix}_{padded}"),
                "hallmark_attention",
                ATTENTION_PTX,
            )?;
            let (nq, nk, d, heads) = (
                to_i32(nq, "queries")?,
                to_i32(nk, "keys")?,
                d as i32,
                heads as i32,
            );
            let scale_log2 = self.scale * std::f32::consts::LOG2_E;
            let mut builder = func.builder();
            builder.arg(&q);
            builder.arg(&k);
            builder.arg(&v);
            builder.arg(&o);
            builder.arg(&nq);
            builder.arg(&nk);
            builder.arg(&d);
            builder.arg(&heads);
            for s in qs.iter().chain(&ks).chain(&vs) {
                builder.arg(s);
            }
            builder.arg(&scale_log2);
            // SAFETY: the arguments match the kernel's signature.
            unsafe { builder.launch(cfg) }.w()?;
            Ok(o)
        }
    }

    three_operand_op!(Attention, "hallmark-attention", "the fused attention", [F16 => "f16", BF16 => "bf16"]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn bias_extent_places_every_broadcast_the_kernel_takes() {
        // A linear layer's bias over tokens; a convolution's per channel; a
        // resnet's per sample and channel; the VAE's (channels, 1) over
        // (batch, channels, pixels); a scalar.
        assert_eq!(bias_extent(&[2, 5, 6], &[6]), Some((1, 6)));
        assert_eq!(bias_extent(&[2, 8, 4, 4], &[1, 8, 1, 1]), Some((16, 8)));
        assert_eq!(bias_extent(&[2, 8, 4, 4], &[2, 8, 1, 1]), Some((16, 16)));
        assert_eq!(bias_extent(&[2, 24, 9], &[24, 1]), Some((9, 24)));
        assert_eq!(bias_extent(&[2, 3], &[1]), Some((1, 1)));
        // A broadcast inside the bias's run, a bias larger than the tensor,
        // a mismatched dimension: not one run, so candle's add.
        assert_eq!(bias_extent(&[2, 8, 4, 4], &[2, 1, 1, 4]), None);
        assert_eq!(bias_extent(&[6], &[1, 6]), None);
        assert_eq!(bias_extent(&[2, 5, 6], &[5, 3]), None);
        // What the extent says agrees with candle's broadcast, element by
        // element.
        let dev = Device::Cpu;
        for (dims, bias_dims) in [
            (vec![2, 5, 6], vec![6]),
            (vec![2, 8, 4, 4], vec![2, 8, 1, 1]),
            (vec![2, 24, 9], vec![24, 1]),
            (vec![3, 4, 5], vec![3, 4, 1]),
        ] {
            let (inner, period) = bias_extent(&dims, &bias_dims).unwrap();
            let n: usize = bias_dims.iter().product();
            let bias = Tensor::arange(0u32, n as u32, &dev)
                .unwrap()
                .reshape(bias_dims.as_slice())
                .unwrap();
            let zeros = Tensor::zeros(dims.as_slice(), DType::U32, &dev).unwrap();
            let spread = zeros.broadcast_add(&bias).unwrap().flatten_all().unwrap();
            let spread = spread.to_vec1::<u32>().unwrap();
            for (e, &b) in spread.iter().enumerate() {
                assert_eq!(
                    b as usize,
                    (e / inner) % period,
                    "{dims:?} + {bias_dims:?} at {e}"
                );
            }
        }
    }

    #[test]
    fn im2col_convolutions_match_candles_whole_in_chunks_and_in_bands() {
        let dev = Device::Cpu;
        // A resnet's 3×3, a downsampler's stride 2 on odd sizes, a 1×1.
        for (shape, out, k, stride, padding) in [
            ([2, 3, 9, 7], 4, 3, 1, 1),
            ([3, 4, 11, 9], 5, 3, 2, 1),
            ([2, 5, 6, 5], 3, 1, 1, 0),
        ] {
            let x = crate::test_util::randn(&shape);
            let w = crate::test_util::randn(&[out, shape[1], k, k]);
            let want = x.conv2d(&w, padding, stride, 1, 1).unwrap();
            let ow = ConvShape::new(x.shape(), w.shape(), stride, padding)
                .unwrap()
                .out_w;
            let oh = want.dim(2).unwrap();
            let row_bytes = shape[1] * k * k * ow * 4;
            // The whole batch at once; two images per matmul; bands of two
            // rows of one image; one row at a time.
            for budget in [IM2COL_BUDGET, 2 * oh * row_bytes, 2 * row_bytes, 1] {
                let got = conv2d_in_budget(&x, &w, stride, padding, budget).unwrap();
                assert_eq!(got.dims(), want.dims(), "{shape:?}, budget {budget}");
                let d = crate::test_util::max_diff(&got, &want);
                assert!(
                    d < 1e-4,
                    "{shape:?} {k}×{k} stride {stride}, budget {budget}: {d}"
                );
            }
            // f16 columns hold the same values.
            let got = conv2d(
                &x.to_dtype(DType::F16).unwrap(),
                &w.to_dtype(DType::F16).unwrap(),
                stride,
                padding,
            )
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
            let d = crate::test_util::max_diff(&got, &want);
            assert!(d < 0.05, "{shape:?} in f16: {d}");
        }
        let x = Tensor::zeros((1, 3, 4, 4), DType::F32, &dev).unwrap();
        let wrong_channels = Tensor::zeros((2, 4, 3, 3), DType::F32, &dev).unwrap();
        let err = conv2d(&x, &wrong_channels, 1, 1).unwrap_err().to_string();
        assert!(
            err.contains("[2, 4, 3, 3]") && err.contains("[1, 3, 4, 4]"),
            "{err}"
        );
        let too_large = Tensor::zeros((2, 3, 7, 7), DType::F32, &dev).unwrap();
        assert!(conv2d(&x, &too_large, 1, 1).is_err());
    }

    #[test]
    fn bias_add_and_tokens_are_candles_where_the_kernels_do_not_run() {
        let dev = Device::Cpu;
        let x = crate::test_util::randn(&[2, 3, 4]);
        let bias = crate::test_util::randn(&[1, 3, 1]);
        let r = crate::test_util::randn(&[2, 3, 4]);
        let want = (x.broadcast_add(&bias).unwrap() + &r).unwrap();
        let got = add_bias(&x, &bias, Some(&r)).unwrap();
        assert_eq!(crate::test_util::max_diff(&got, &want), 0.0);
        let got = add_bias(&x, &bias, None).unwrap();
        assert_eq!(
            crate::test_util::max_diff(&got, &x.broadcast_add(&bias).unwrap()),
            0.0
        );
        let b3 = bias.flatten_all().unwrap();
        let got = tokens(&x, &b3).unwrap();
        assert_eq!(got.dims(), [2, 4, 3]);
        let want = x.transpose(1, 2).unwrap().broadcast_add(&b3).unwrap();
        assert_eq!(crate::test_util::max_diff(&got, &want), 0.0);
        // A bias that is not the map's channels, named.
        let err = tokens(&x, &Tensor::zeros(4, DType::F32, &dev).unwrap()).unwrap_err();
        assert!(err.to_string().contains("3 channels"), "{err}");
        // The fused GEGLU checks its operands before anything runs.
        let err = geglu(&x, &x, &Tensor::zeros(4, DType::F32, &dev).unwrap()).unwrap_err();
        assert!(err.to_string().contains("do not match"), "{err}");
    }

    #[test]
    fn group_norm_splits_cover_each_group_once_with_work_in_every_block() {
        // (batch × groups, elements per group, lanes, vec): SD 1.5 at 512²
        // batch 1 (guided) and 8, its deepest maps, the VAE at 512², odd
        // tiny maps, f32 lanes.
        let cases = [
            (64, 10 * 64 * 64, 8, true),
            (512, 10 * 64 * 64, 8, true),
            (64, 40 * 8 * 8, 8, true),
            (32, 4 * 512 * 512, 8, true),
            (2, 1, 8, false),
            (8, 2 * 35, 8, false),
            (1, 4 * 1024, 4, true),
            (5000, 3, 4, false),
        ];
        for (groups, n, lanes, vec) in cases {
            let (splits, chunk) = group_norm_split(groups, n, lanes, vec);
            let case =
                format!("{groups} groups of {n} ({lanes} lanes, vec {vec}): {splits} × {chunk}");
            assert!((1..=MAX_SPLITS).contains(&splits), "{case}");
            assert!(splits * chunk >= n && (splits - 1) * chunk < n, "{case}");
            assert!(!vec || chunk.is_multiple_of(lanes), "{case}");
            // Few groups are split until the GPU has enough blocks or the
            // chunks reach their floor; many groups are not split.
            if groups * splits < TARGET_BLOCKS {
                assert!(splits == 1 || chunk < 2 * MIN_CHUNK + lanes, "{case}");
            }
            if groups >= TARGET_BLOCKS {
                assert_eq!(splits, 1, "{case}");
            }
        }
        // Batch 1's 32 groups of a 64² map of 320 channels fill 1024 blocks.
        assert_eq!(group_norm_split(64, 10 * 64 * 64, 8, true).0, 16);
    }
}
