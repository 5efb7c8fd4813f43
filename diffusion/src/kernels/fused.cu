// Fused kernels for the UNet's and the VAE's elementwise work.
//
// Group norm over a contiguous (batch, channels, spatial) map, the channels
// in `groups` groups of `cpg` adjacent channels: each (batch, group) is `n =
// cpg * spatial` adjacent elements. Two launches:
//   - stats: grid (batch * groups, splits); each block sums x - shift and
//     (x - shift)^2 over its chunk of one group (shift: the group's first
//     element, so the variance does not come from the difference of two
//     large sums), in f32, into partial[(group * splits + split) * 2 + {0, 1}];
//   - apply: same grid; each block combines its group's partial sums (in
//     f64) into the mean and 1/sqrt(var + eps), then writes its chunk once:
//     (x - mean) * rstd, times the channel's scale plus its shift when
//     `affine`, then SiLU when `silu`.
// Splitting a group over several blocks keeps every multiprocessor busy when
// there are few groups (batch 1 has 32). `vec` (set by the caller when the
// spatial size, the chunk and the start are multiples of 16 bytes) moves
// 16 bytes per load and store; all elements of one such load are then in the
// same channel.
//
// GEGLU: y = (value + value_bias) * gelu(gate + gate_bias), the exact (erf)
// GELU, in f32, the biases indexed by the last dimension (`width`): the
// feed-forward's two projections' bias adds happen here rather than in two
// passes of their own.
//
// Bias add: y = x + bias[(e / inner) % period] (+ residual[e]) for every
// element e of a contiguous x, in f32 with one rounding: a bias broadcast
// over the rows of (rows, period) tokens (inner 1), over the pixels of a
// (batch, channels, pixels) map (inner the pixels, period the channels, or
// batch * channels for a per-sample bias such as a resnet's time embedding),
// with the residual connection that follows it folded in. `mode` 0 goes
// element by element; 1 (inner 1, period a multiple of 16 bytes) and 2
// (inner a multiple of 16 bytes) move 16 bytes per load, the bias too in
// mode 1, one bias value per load in mode 2. The index arithmetic is 32-bit
// when the tensor allows (candle's strided kernels divide in 64 bits per
// element and dimension, which made its bias adds several times slower
// than their bytes).
//
// Tokens: y[b][p][c] = x[b][c][p] + bias[c], a (batch, channels, pixels)
// map to (batch, pixels, channels) tokens with a per-channel bias, through
// a 32x32 tile in shared memory so both the reads and the writes are
// coalesced; grid (pixel tiles, channel tiles, batch), 256 threads.
//
// Im2col: the columns of a k x k convolution (stride, zero padding) of a
// contiguous (batch, channels, height, width) map, laid out as (batch,
// channels * k * k, pixels) with row r = (c * k + ky) * k + kx, the order of
// the weight's own (out, channels, k, k) elements: the weight as an (out,
// channels * k * k) matrix times one image's columns is that image's
// output already in (out, pixels) order, so no layout copy follows the
// matmul (candle's im2col makes (pixels, channels * k * k) columns, and its
// output then needs a transposing copy). Output rows [row0, row0 + rows)
// only, for a band of a large output. Grid (batch * channels * k * k,
// pixel chunks); each block fills one row, each thread every
// (blockDim.x * gridDim.y)-th pixel; the reads of a row are coalesced at
// stride 1 and the writes always.
#include <stdint.h>

#include "common.cuh"

// Sums a and b over the block (whose size is a multiple of 32); thread 0
// gets the result.
__device__ __forceinline__ void block_sum2(float &a, float &b) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    a += __shfl_xor_sync(0xffffffff, a, offset);
    b += __shfl_xor_sync(0xffffffff, b, offset);
  }
  __shared__ float shared_a[32];
  __shared__ float shared_b[32];
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int warps = blockDim.x / 32;
  if (lane == 0) {
    shared_a[warp] = a;
    shared_b[warp] = b;
  }
  __syncthreads();
  if (warp == 0) {
    a = lane < warps ? shared_a[lane] : 0.f;
    b = lane < warps ? shared_b[lane] : 0.f;
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
      a += __shfl_xor_sync(0xffffffff, a, offset);
      b += __shfl_xor_sync(0xffffffff, b, offset);
    }
  }
}

template <typename T>
__device__ void group_norm_stats(const T *x, float *partial, const int64_t n,
                                 const int64_t chunk, const int vec) {
  const T *xg = x + (size_t)blockIdx.x * n;
  const int64_t begin = (int64_t)blockIdx.y * chunk;
  const int64_t end = min(n, begin + chunk);
  const float shift = to_f32(xg[0]);
  float s = 0.f;
  float ss = 0.f;
  if (vec) {
    constexpr int V = Lanes<T>::N;
    const uint4 *xv = reinterpret_cast<const uint4 *>(xg + begin);
    const int64_t nv = (end - begin) / V;
    for (int64_t i = threadIdx.x; i < nv; i += blockDim.x) {
      const uint4 raw = xv[i];
      const T *vals = reinterpret_cast<const T *>(&raw);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const float d = to_f32(vals[j]) - shift;
        s += d;
        ss += d * d;
      }
    }
  } else {
    for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
      const float d = to_f32(xg[i]) - shift;
      s += d;
      ss += d * d;
    }
  }
  block_sum2(s, ss);
  if (threadIdx.x == 0) {
    float *p = partial + ((size_t)blockIdx.x * gridDim.y + blockIdx.y) * 2;
    p[0] = s;
    p[1] = ss;
  }
}

// y = x * scale + offset, then SiLU when asked.
template <typename T>
__device__ __forceinline__ T normed(const T v, const float scale, const float offset,
                                    const int silu) {
  float r = to_f32(v) * scale + offset;
  if (silu) {
    r = r / (1.f + __expf(-r));
  }
  return from_f32<T>(r);
}

template <typename T>
__device__ void group_norm_apply(const T *x, const float *partial, const T *gamma,
                                 const T *beta, T *y, const int64_t n, const int64_t chunk,
                                 const int spatial, const int groups, const int cpg,
                                 const float eps, const int affine, const int silu,
                                 const int vec) {
  const size_t group = blockIdx.x;
  const T *xg = x + group * n;
  T *yg = y + group * n;
  __shared__ float stats[2];
  if (threadIdx.x == 0) {
    double s = 0.0;
    double ss = 0.0;
    for (unsigned k = 0; k < gridDim.y; ++k) {
      s += partial[(group * gridDim.y + k) * 2];
      ss += partial[(group * gridDim.y + k) * 2 + 1];
    }
    const double shifted_mean = s / (double)n;
    const double var = fmax(ss / (double)n - shifted_mean * shifted_mean, 0.0);
    stats[0] = (float)((double)to_f32(xg[0]) + shifted_mean);
    stats[1] = (float)(1.0 / sqrt(var + (double)eps));
  }
  __syncthreads();
  const float mean = stats[0];
  const float rstd = stats[1];
  const int first_channel = (int)(group % groups) * cpg;
  // The scale and offset of channel c: (x - mean) * rstd * gamma + beta.
  auto coefficients = [&](const int c, float &scale, float &offset) {
    scale = rstd;
    offset = -mean * rstd;
    if (affine) {
      const float g = to_f32(gamma[c]);
      scale *= g;
      offset = offset * g + to_f32(beta[c]);
    }
  };
  const int64_t begin = (int64_t)blockIdx.y * chunk;
  const int64_t end = min(n, begin + chunk);
  if (vec) {
    constexpr int V = Lanes<T>::N;
    const uint4 *xv = reinterpret_cast<const uint4 *>(xg + begin);
    uint4 *yv = reinterpret_cast<uint4 *>(yg + begin);
    const int64_t nv = (end - begin) / V;
    // One group fits 32 bits (the caller checks), so its offsets divide
    // in 32 bits: a 64-bit division is a long instruction sequence, once
    // per 16 bytes here.
    const unsigned base = (unsigned)begin;
    const unsigned per_channel = (unsigned)spatial;
    for (int64_t i = threadIdx.x; i < nv; i += blockDim.x) {
      float scale, offset;
      coefficients(first_channel + (int)((base + (unsigned)i * V) / per_channel), scale,
                   offset);
      const uint4 raw = xv[i];
      const T *vals = reinterpret_cast<const T *>(&raw);
      uint4 packed;
      T *out = reinterpret_cast<T *>(&packed);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        out[j] = normed(vals[j], scale, offset, silu);
      }
      yv[i] = packed;
    }
  } else {
    for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
      float scale, offset;
      coefficients(first_channel + (int)((unsigned)i / (unsigned)spatial), scale, offset);
      yg[i] = normed(xg[i], scale, offset, silu);
    }
  }
}

__device__ __forceinline__ float gelu_erf(const float g) {
  return 0.5f * g * (1.f + erff(g * 0.70710678118654752f));
}

template <typename T>
__device__ __forceinline__ T geglu_one(const T v, const T g, const T bv, const T bg) {
  return from_f32<T>((to_f32(v) + to_f32(bv)) * gelu_erf(to_f32(g) + to_f32(bg)));
}

template <typename T>
__device__ void geglu(const T *value, const T *gate, const T *value_bias, const T *gate_bias,
                      T *y, const int64_t n, const int64_t width, const int vec) {
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  const int64_t first = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (vec) {
    constexpr int V = Lanes<T>::N;
    const uint4 *vv = reinterpret_cast<const uint4 *>(value);
    const uint4 *gv = reinterpret_cast<const uint4 *>(gate);
    const uint4 *bvv = reinterpret_cast<const uint4 *>(value_bias);
    const uint4 *bgv = reinterpret_cast<const uint4 *>(gate_bias);
    uint4 *yv = reinterpret_cast<uint4 *>(y);
    const uint32_t width_v = (uint32_t)(width / V);
    for (int64_t i = first; i < n / V; i += stride) {
      const uint32_t col = (uint32_t)(i % width_v);
      const uint4 vraw = vv[i];
      const uint4 graw = gv[i];
      const uint4 bvraw = bvv[col];
      const uint4 bgraw = bgv[col];
      const T *vs = reinterpret_cast<const T *>(&vraw);
      const T *gs = reinterpret_cast<const T *>(&graw);
      const T *bvs = reinterpret_cast<const T *>(&bvraw);
      const T *bgs = reinterpret_cast<const T *>(&bgraw);
      uint4 packed;
      T *out = reinterpret_cast<T *>(&packed);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        out[j] = geglu_one(vs[j], gs[j], bvs[j], bgs[j]);
      }
      yv[i] = packed;
    }
  } else {
    for (int64_t i = first; i < n; i += stride) {
      const int64_t col = i % width;
      y[i] = geglu_one(value[i], gate[i], value_bias[col], gate_bias[col]);
    }
  }
}

template <typename T, typename I>
__device__ void add_bias_indexed(const T *x, const T *bias, const T *residual, T *y,
                                 const I n, const I inner, const I period, const int mode) {
  const I stride = (I)gridDim.x * blockDim.x;
  const I first = (I)blockIdx.x * blockDim.x + threadIdx.x;
  if (mode == 0) {
    for (I i = first; i < n; i += stride) {
      float r = to_f32(x[i]) + to_f32(bias[(i / inner) % period]);
      if (residual) r += to_f32(residual[i]);
      y[i] = from_f32<T>(r);
    }
    return;
  }
  constexpr int V = Lanes<T>::N;
  const uint4 *xv = reinterpret_cast<const uint4 *>(x);
  const uint4 *rv = reinterpret_cast<const uint4 *>(residual);
  uint4 *yv = reinterpret_cast<uint4 *>(y);
  for (I i = first; i < n / V; i += stride) {
    const uint4 xraw = xv[i];
    const T *xs = reinterpret_cast<const T *>(&xraw);
    float sum[V];
    if (mode == 1) {
      const uint4 braw = reinterpret_cast<const uint4 *>(bias)[i % (period / V)];
      const T *bs = reinterpret_cast<const T *>(&braw);
#pragma unroll
      for (int j = 0; j < V; ++j) sum[j] = to_f32(xs[j]) + to_f32(bs[j]);
    } else {
      const float b = to_f32(bias[(i * V / inner) % period]);
#pragma unroll
      for (int j = 0; j < V; ++j) sum[j] = to_f32(xs[j]) + b;
    }
    if (residual) {
      const uint4 rraw = rv[i];
      const T *rs = reinterpret_cast<const T *>(&rraw);
#pragma unroll
      for (int j = 0; j < V; ++j) sum[j] += to_f32(rs[j]);
    }
    uint4 packed;
    T *out = reinterpret_cast<T *>(&packed);
#pragma unroll
    for (int j = 0; j < V; ++j) out[j] = from_f32<T>(sum[j]);
    yv[i] = packed;
  }
}

template <typename T>
__device__ void add_bias(const T *x, const T *bias, const T *residual, T *y, const int64_t n,
                         const int64_t inner, const int64_t period, const int mode) {
  if (n <= (int64_t)UINT32_MAX - (int64_t)gridDim.x * blockDim.x) {
    add_bias_indexed<T, uint32_t>(x, bias, residual, y, (uint32_t)n, (uint32_t)inner,
                                  (uint32_t)period, mode);
  } else {
    add_bias_indexed<T, uint64_t>(x, bias, residual, y, (uint64_t)n, (uint64_t)inner,
                                  (uint64_t)period, mode);
  }
}

template <typename T>
__device__ void tokens_add_bias(const T *x, const T *bias, T *y, const int channels,
                                const int pixels) {
  __shared__ float tile[32][33];
  const size_t base = (size_t)blockIdx.z * channels * pixels;
  const int p0 = blockIdx.x * 32;
  const int c0 = blockIdx.y * 32;
  const int tx = threadIdx.x % 32;
  const int ty = threadIdx.x / 32;
  for (int j = ty; j < 32; j += 8) {
    const int c = c0 + j;
    const int p = p0 + tx;
    if (c < channels && p < pixels) {
      tile[j][tx] = to_f32(x[base + (size_t)c * pixels + p]) + to_f32(bias[c]);
    }
  }
  __syncthreads();
  for (int j = ty; j < 32; j += 8) {
    const int p = p0 + j;
    const int c = c0 + tx;
    if (c < channels && p < pixels) {
      y[base + (size_t)p * channels + c] = from_f32<T>(tile[tx][j]);
    }
  }
}

template <typename T>
__device__ void im2col(const T *x, T *col, const int channels, const int height,
                       const int width, const int kernel, const int stride, const int pad,
                       const int out_w, const int row0, const int rows) {
  const int taps = kernel * kernel;
  const int k_rows = channels * taps;
  const int image = blockIdx.x / k_rows;
  const int r = blockIdx.x - image * k_rows;
  const int c = r / taps;
  const int ky = (r - c * taps) / kernel;
  const int kx = r - c * taps - ky * kernel;
  const T *plane = x + ((size_t)image * channels + c) * height * width;
  T *out = col + (size_t)blockIdx.x * rows * out_w;
  const int n = rows * out_w;
  const T zero = from_f32<T>(0.f);
  for (int p = blockIdx.y * blockDim.x + threadIdx.x; p < n; p += gridDim.y * blockDim.x) {
    const int oy = p / out_w;
    const int ox = p - oy * out_w;
    const int iy = (row0 + oy) * stride - pad + ky;
    const int ix = ox * stride - pad + kx;
    const bool inside = iy >= 0 && iy < height && ix >= 0 && ix < width;
    out[p] = inside ? plane[(size_t)iy * width + ix] : zero;
  }
}

#define FUSED(SUFFIX, T)                                                                      \
  extern "C" __global__ void hallmark_group_norm_stats_##SUFFIX(                              \
      const T *x, float *partial, const int64_t n, const int64_t chunk, const int vec) {      \
    group_norm_stats(x, partial, n, chunk, vec);                                              \
  }                                                                                           \
  extern "C" __global__ void hallmark_group_norm_apply_##SUFFIX(                              \
      const T *x, const float *partial, const T *gamma, const T *beta, T *y, const int64_t n, \
      const int64_t chunk, const int spatial, const int groups, const int cpg,                \
      const float eps, const int affine, const int silu, const int vec) {                     \
    group_norm_apply(x, partial, gamma, beta, y, n, chunk, spatial, groups, cpg, eps, affine, \
                     silu, vec);                                                              \
  }                                                                                           \
  extern "C" __global__ void hallmark_geglu_##SUFFIX(                                         \
      const T *value, const T *gate, const T *value_bias, const T *gate_bias, T *y,            \
      const int64_t n, const int64_t width, const int vec) {                                    \
    geglu(value, gate, value_bias, gate_bias, y, n, width, vec);                              \
  }                                                                                           \
  extern "C" __global__ void hallmark_add_bias_##SUFFIX(                                      \
      const T *x, const T *bias, const T *residual, T *y, const int64_t n, const int64_t inner, \
      const int64_t period, const int mode) {                                                 \
    add_bias(x, bias, residual, y, n, inner, period, mode);                                   \
  }                                                                                           \
  extern "C" __global__ void hallmark_tokens_add_bias_##SUFFIX(                               \
      const T *x, const T *bias, T *y, const int channels, const int pixels) {                \
    tokens_add_bias(x, bias, y, channels, pixels);                                            \
  }                                                                                           \
  extern "C" __global__ void hallmark_im2col_##SUFFIX(                                        \
      const T *x, T *col, const int channels, const int height, const int width,              \
      const int kernel, const int stride, const int pad, const int out_w, const int row0,     \
      const int rows) {                                                                       \
    im2col(x, col, channels, height, width, kernel, stride, pad, out_w, row0, rows);          \
  }

FUSED(f32, float)
FUSED(f16, __half)
FUSED(bf16, __nv_bfloat16)
