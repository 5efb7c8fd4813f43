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
// GEGLU: y = value * gelu(gate), the exact (erf) GELU, in f32.
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
    for (int64_t i = threadIdx.x; i < nv; i += blockDim.x) {
      float scale, offset;
      coefficients(first_channel + (int)((begin + i * V) / spatial), scale, offset);
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
      coefficients(first_channel + (int)(i / spatial), scale, offset);
      yg[i] = normed(xg[i], scale, offset, silu);
    }
  }
}

__device__ __forceinline__ float gelu_erf(const float g) {
  return 0.5f * g * (1.f + erff(g * 0.70710678118654752f));
}

template <typename T>
__device__ void geglu(const T *value, const T *gate, T *y, const int64_t n, const int vec) {
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  const int64_t first = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (vec) {
    constexpr int V = Lanes<T>::N;
    const uint4 *vv = reinterpret_cast<const uint4 *>(value);
    const uint4 *gv = reinterpret_cast<const uint4 *>(gate);
    uint4 *yv = reinterpret_cast<uint4 *>(y);
    for (int64_t i = first; i < n / V; i += stride) {
      const uint4 vraw = vv[i];
      const uint4 graw = gv[i];
      const T *vs = reinterpret_cast<const T *>(&vraw);
      const T *gs = reinterpret_cast<const T *>(&graw);
      uint4 packed;
      T *out = reinterpret_cast<T *>(&packed);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        out[j] = from_f32<T>(to_f32(vs[j]) * gelu_erf(to_f32(gs[j])));
      }
      yv[i] = packed;
    }
  } else {
    for (int64_t i = first; i < n; i += stride) {
      y[i] = from_f32<T>(to_f32(value[i]) * gelu_erf(to_f32(gate[i])));
    }
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
  extern "C" __global__ void hallmark_geglu_##SUFFIX(const T *value, const T *gate, T *y,    \
                                                     const int64_t n, const int vec) {        \
    geglu(value, gate, y, n, vec);                                                            \
  }

FUSED(f32, float)
FUSED(f16, __half)
FUSED(bf16, __nv_bfloat16)
