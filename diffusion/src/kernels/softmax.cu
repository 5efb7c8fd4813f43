// Row softmax over the last dimension of a contiguous tensor: one block per
// row, the maximum and the sum of exponentials found in one pass (an online
// softmax: the running sum is rescaled whenever the maximum grows), then one
// pass that writes exp(x - max) / sum. Statistics in f32 whatever the type.
// `vec` (set by the caller when the row length and the start are multiples
// of 16 bytes) moves 16 bytes per load and store.
#include <math.h>

#include "common.cuh"

// Merges the running (max, sum) pair (m2, s2) into (m, s).
__device__ __forceinline__ void merge(float &m, float &s, float m2, float s2) {
  const float mx = fmaxf(m, m2);
  const float a = m == -INFINITY ? 0.f : s * __expf(m - mx);
  const float b = m2 == -INFINITY ? 0.f : s2 * __expf(m2 - mx);
  m = mx;
  s = a + b;
}

__device__ __forceinline__ void warp_merge(float &m, float &s) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const float m2 = __shfl_xor_sync(0xffffffff, m, offset);
    const float s2 = __shfl_xor_sync(0xffffffff, s, offset);
    merge(m, s, m2, s2);
  }
}

// Merges the (max, sum) pairs of a whole block; every thread gets the result.
__device__ __forceinline__ void block_merge(float &m, float &s) {
  warp_merge(m, s);
  __shared__ float shared_m[32];
  __shared__ float shared_s[32];
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int warps = blockDim.x / 32;
  if (warps == 1) {
    return;
  }
  if (lane == 0) {
    shared_m[warp] = m;
    shared_s[warp] = s;
  }
  __syncthreads();
  if (warp == 0) {
    m = lane < warps ? shared_m[lane] : -INFINITY;
    s = lane < warps ? shared_s[lane] : 0.f;
    warp_merge(m, s);
    if (lane == 0) {
      shared_m[0] = m;
      shared_s[0] = s;
    }
  }
  __syncthreads();
  m = shared_m[0];
  s = shared_s[0];
}

// Any row length: one element per load.
template <typename T>
__device__ void row_softmax(const T *x, T *y, const int ncols) {
  const T *xr = x + (size_t)blockIdx.x * ncols;
  T *yr = y + (size_t)blockIdx.x * ncols;
  float m = -INFINITY;
  float s = 0.f;
  for (int i = threadIdx.x; i < ncols; i += blockDim.x) {
    const float v = to_f32(xr[i]);
    if (v > m) {
      s = (m == -INFINITY ? 0.f : s * __expf(m - v)) + 1.f;
      m = v;
    } else {
      s += __expf(v - m);
    }
  }
  block_merge(m, s);
  const float inv = 1.f / s;
  for (int i = threadIdx.x; i < ncols; i += blockDim.x) {
    yr[i] = from_f32<T>(__expf(to_f32(xr[i]) - m) * inv);
  }
}

// Rows whose length and start are multiples of 16 bytes: 16-byte loads and
// stores (8 halves or 4 floats at a time).
template <typename T>
__device__ void row_softmax_vec(const T *x, T *y, const int ncols) {
  constexpr int V = 16 / sizeof(T);
  const uint4 *xr = reinterpret_cast<const uint4 *>(x + (size_t)blockIdx.x * ncols);
  uint4 *yr = reinterpret_cast<uint4 *>(y + (size_t)blockIdx.x * ncols);
  const int nvec = ncols / V;
  float m = -INFINITY;
  float s = 0.f;
  for (int i = threadIdx.x; i < nvec; i += blockDim.x) {
    const uint4 raw = xr[i];
    const T *vals = reinterpret_cast<const T *>(&raw);
    float local_max = -INFINITY;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      local_max = fmaxf(local_max, to_f32(vals[j]));
    }
    float local_sum = 0.f;
    if (local_max != -INFINITY) {
#pragma unroll
      for (int j = 0; j < V; ++j) {
        local_sum += __expf(to_f32(vals[j]) - local_max);
      }
    }
    merge(m, s, local_max, local_sum);
  }
  block_merge(m, s);
  const float inv = 1.f / s;
  for (int i = threadIdx.x; i < nvec; i += blockDim.x) {
    const uint4 raw = xr[i];
    const T *vals = reinterpret_cast<const T *>(&raw);
    uint4 packed;
    T *out = reinterpret_cast<T *>(&packed);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      out[j] = from_f32<T>(__expf(to_f32(vals[j]) - m) * inv);
    }
    yr[i] = packed;
  }
}

#define SOFTMAX(NAME, T)                                                              \
  extern "C" __global__ void NAME(const T *x, T *y, const int ncols, const int vec) { \
    if (vec) {                                                                        \
      row_softmax_vec(x, y, ncols);                                                   \
    } else {                                                                          \
      row_softmax(x, y, ncols);                                                       \
    }                                                                                 \
  }

SOFTMAX(hallmark_softmax_f32, float)
SOFTMAX(hallmark_softmax_f16, __half)
SOFTMAX(hallmark_softmax_bf16, __nv_bfloat16)
