// Fused attention, softmax(scale · Q Kᵀ) V, without materialising the
// scores (the FlashAttention-2 scheme): each block takes 64 queries of one
// head of one sample, four warps of 16 queries each, and walks the keys in
// tiles of 64, keeping per query the running maximum, the running sum of
// exponentials and the output accumulator, rescaled whenever the maximum
// grows. Both products run on the tensor cores (mma.sync m16n8k16, f16 or
// bf16 in, f32 accumulation); the probabilities go from the score
// accumulators straight into the second product's operand registers (the
// accumulator layout of two 16×8 tiles is the operand layout of one 16×16).
//
// Q, K and V are (batch, tokens, heads, d) with any strides (the caller
// passes them in elements; the last dimension is contiguous), so the
// self-attention's q/k/v are read straight out of the one projection's
// output. The output is (batch, queries, heads, d), contiguous.
// Constraints the caller checks: d a multiple of 8, at most DP (the head
// size padded to a multiple of 16: 48, 64, 80, 96, 128, 160), every stride
// and start a multiple of 8 elements (16-byte loads).
#include <stdint.h>

#include "common.cuh"

constexpr int BM = 64;      // queries per block
constexpr int BN = 64;      // keys per tile
constexpr int WARPS = 4;    // 16 queries each
constexpr int PAD = 8;      // shared-memory row padding (no bank conflicts)

template <typename T> __device__ __forceinline__ uint32_t pack2(float a, float b);
template <> __device__ __forceinline__ uint32_t pack2<__half>(float a, float b) {
  __half2 h = __floats2half2_rn(a, b);
  return *reinterpret_cast<uint32_t *>(&h);
}
template <> __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float a, float b) {
  __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
  return *reinterpret_cast<uint32_t *>(&h);
}

template <typename T> __device__ __forceinline__ float2 unpack2(uint32_t v);
template <> __device__ __forceinline__ float2 unpack2<__half>(uint32_t v) {
  return __half22float2(*reinterpret_cast<__half2 *>(&v));
}
template <> __device__ __forceinline__ float2 unpack2<__nv_bfloat16>(uint32_t v) {
  return __bfloat1622float2(*reinterpret_cast<__nv_bfloat162 *>(&v));
}

// c += a · b for one 16×8×16 tile (a row-major 16×16, b column-major 16×8;
// the host simulation of tests/cuda_sim computes it from the lanes'
// fragments instead).
#ifdef HALLMARK_CUDA_SIM
__device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                    uint32_t b1, __half) {
  hallmark_sim_mma<__half>(c, a, b0, b1);
}
__device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                    uint32_t b1, __nv_bfloat16) {
  hallmark_sim_mma<__nv_bfloat16>(c, a, b0, b1);
}
#else
__device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                    uint32_t b1, __half) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                    uint32_t b1, __nv_bfloat16) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
#endif

// Two 16-bit values as one operand register, `lo` in the low half (the
// lower k index, as a 32-bit load of two neighbours would give).
template <typename T> __device__ __forceinline__ uint32_t pair_bits(const T &lo, const T &hi) {
  return (uint32_t)*reinterpret_cast<const uint16_t *>(&lo) |
         ((uint32_t)*reinterpret_cast<const uint16_t *>(&hi) << 16);
}

__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffff, v, 2));
}
__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffff, v, 1);
  return v + __shfl_xor_sync(0xffffffff, v, 2);
}

// Fragment coordinates (PTX ISA, mma.m16n8k16): lane = 4 * g + t. The
// operand a holds rows g and g + 8, columns 2t, 2t + 1 and 2t + 8, 2t + 9;
// b holds column g, rows 2t, 2t + 1 and 2t + 8, 2t + 9; the accumulator c
// holds rows g (c0, c1) and g + 8 (c2, c3), columns 2t and 2t + 1.
template <typename T, int DP>
__device__ void attention(const T *__restrict__ q, const T *__restrict__ k,
                          const T *__restrict__ v, T *__restrict__ o, const int nq,
                          const int nk, const int d, const int heads, const int64_t q_sb,
                          const int64_t q_st, const int64_t q_sh, const int64_t k_sb,
                          const int64_t k_st, const int64_t k_sh, const int64_t v_sb,
                          const int64_t v_st, const int64_t v_sh, const float scale_log2) {
  static_assert(DP % 16 == 0, "the padded head size is a multiple of 16");
  constexpr int KS = DP / 16;  // k-steps of the score product
  constexpr int DT = DP / 8;   // 8-wide output tiles
  constexpr int NT = BN / 8;   // 8-wide score tiles per key tile
  __shared__ __align__(16) T ks[BN][DP + PAD];   // keys, row-major
  __shared__ __align__(16) T vs[BN][DP + PAD];   // values, row-major

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int g = lane / 4;
  const int t = lane % 4;
  const int head = blockIdx.y;
  const int batch = blockIdx.z;
  const T *qb = q + batch * q_sb + head * q_sh;
  const T *kb = k + batch * k_sb + head * k_sh;
  const T *vb = v + batch * v_sb + head * v_sh;
  const int row0 = blockIdx.x * BM + warp * 16 + g;  // and row0 + 8

  // The warp's queries as operand fragments, zero past the head size and
  // past the last query.
  uint32_t qa[KS][4];
  auto q_pair = [&](int row, int col) -> uint32_t {
    if (row >= nq || col >= d) {
      return 0u;
    }
    return *reinterpret_cast<const uint32_t *>(qb + row * q_st + col);
  };
#pragma unroll
  for (int s = 0; s < KS; ++s) {
    const int col = s * 16 + 2 * t;
    qa[s][0] = q_pair(row0, col);
    qa[s][1] = q_pair(row0 + 8, col);
    qa[s][2] = q_pair(row0, col + 8);
    qa[s][3] = q_pair(row0 + 8, col + 8);
  }

  float acc[DT][4];
#pragma unroll
  for (int i = 0; i < DT; ++i) {
    acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
  }
  // Rows g and g + 8: running maximum (log2 domain) and this thread's part
  // of the running sum.
  float row_max[2] = {-INFINITY, -INFINITY};
  float row_sum[2] = {0.f, 0.f};

  for (int key0 = 0; key0 < nk; key0 += BN) {
    // Keys and values of this tile into shared memory, zero past the head
    // size and past the last key (so no stale value meets a zero weight).
    constexpr int VECS = DP / 8;
    for (int i = threadIdx.x; i < BN * VECS; i += WARPS * 32) {
      const int r = i / VECS;
      const int col = (i % VECS) * 8;
      const int key = key0 + r;
      uint4 kv = make_uint4(0, 0, 0, 0);
      uint4 vv = make_uint4(0, 0, 0, 0);
      if (key < nk && col < d) {
        kv = *reinterpret_cast<const uint4 *>(kb + key * k_st + col);
        vv = *reinterpret_cast<const uint4 *>(vb + key * v_st + col);
      }
      *reinterpret_cast<uint4 *>(&ks[r][col]) = kv;
      *reinterpret_cast<uint4 *>(&vs[r][col]) = vv;
    }
    __syncthreads();

    // Scores of the warp's 16 queries against the tile's 64 keys.
    float s[NT][4];
#pragma unroll
    for (int n = 0; n < NT; ++n) {
      s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < KS; ++kk) {
        const T *kr = &ks[n * 8 + g][kk * 16 + 2 * t];
        mma(s[n], qa[kk], *reinterpret_cast<const uint32_t *>(kr),
            *reinterpret_cast<const uint32_t *>(kr + 8), T());
      }
    }
    // Scale into the log2 domain, mask keys past the last, new maxima.
    float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int n = 0; n < NT; ++n) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int key = key0 + n * 8 + 2 * t + (j & 1);
        s[n][j] = key < nk ? s[n][j] * scale_log2 : -INFINITY;
        tile_max[j / 2] = fmaxf(tile_max[j / 2], s[n][j]);
      }
    }
    float alpha[2];
    float base[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float m = fmaxf(row_max[r], quad_max(tile_max[r]));
      // Every tile has a key, so m is finite from the first tile on.
      alpha[r] = exp2f(row_max[r] - m);
      row_max[r] = m;
      base[r] = m;
      row_sum[r] *= alpha[r];
    }
#pragma unroll
    for (int i = 0; i < DT; ++i) {
      acc[i][0] *= alpha[0];
      acc[i][1] *= alpha[0];
      acc[i][2] *= alpha[1];
      acc[i][3] *= alpha[1];
    }
    // Probabilities, rounded to the operand type once: the sum counts
    // what the product uses.
    uint32_t p[NT][2];
#pragma unroll
    for (int n = 0; n < NT; ++n) {
      p[n][0] = pack2<T>(exp2f(s[n][0] - base[0]), exp2f(s[n][1] - base[0]));
      p[n][1] = pack2<T>(exp2f(s[n][2] - base[1]), exp2f(s[n][3] - base[1]));
      const float2 top = unpack2<T>(p[n][0]);
      const float2 bottom = unpack2<T>(p[n][1]);
      row_sum[0] += top.x + top.y;
      row_sum[1] += bottom.x + bottom.y;
    }
    // acc += P · V, 16 keys at a time. The operand b of V holds keys
    // 2t, 2t + 1 (and + 8) of value column g: two rows of the row-major
    // tile, paired from 16-bit loads (conflict-free: lanes g and g + 1
    // share a word; a transposed tile would cost scalar stores with
    // six-way bank conflicts at every fill instead).
#pragma unroll
    for (int c = 0; c < BN / 16; ++c) {
      const uint32_t a[4] = {p[2 * c][0], p[2 * c][1], p[2 * c + 1][0], p[2 * c + 1][1]};
      const int key = c * 16 + 2 * t;
#pragma unroll
      for (int i = 0; i < DT; ++i) {
        const int col = i * 8 + g;
        mma(acc[i], a, pair_bits(vs[key][col], vs[key + 1][col]),
            pair_bits(vs[key + 8][col], vs[key + 9][col]), T());
      }
    }
    __syncthreads();
  }

  const float inv[2] = {1.f / quad_sum(row_sum[0]), 1.f / quad_sum(row_sum[1])};
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = row0 + 8 * r;
    if (row >= nq) {
      continue;
    }
    T *orow = o + (((int64_t)batch * nq + row) * heads + head) * d;
#pragma unroll
    for (int i = 0; i < DT; ++i) {
      const int col = i * 8 + 2 * t;
      if (col < d) {
        *reinterpret_cast<uint32_t *>(orow + col) =
            pack2<T>(acc[i][2 * r] * inv[r], acc[i][2 * r + 1] * inv[r]);
      }
    }
  }
}

// Blocks per SM the register allocation must leave room for (65536
// registers, 128 threads a block): five at a head size of 48 (at most 102
// registers a thread), four up to 80 (128), three up to 128, two above —
// what each size reached before the values' tile went row-major. Without
// it the compiler takes a few registers more and a block less.
constexpr int min_blocks(int dp) { return dp <= 48 ? 5 : dp <= 80 ? 4 : dp <= 128 ? 3 : 2; }

#define ATTENTION(NAME, T, DP)                                                                  \
  extern "C" __global__ void __launch_bounds__(WARPS * 32, min_blocks(DP))                      \
      NAME(const T *q, const T *k, const T *v, T *o, const int nq, const int nk, const int d,   \
           const int heads, const int64_t q_sb, const int64_t q_st, const int64_t q_sh,         \
           const int64_t k_sb, const int64_t k_st, const int64_t k_sh, const int64_t v_sb,      \
           const int64_t v_st, const int64_t v_sh, const float scale_log2) {                    \
    attention<T, DP>(q, k, v, o, nq, nk, d, heads, q_sb, q_st, q_sh, k_sb, k_st, k_sh, v_sb,    \
                     v_st, v_sh, scale_log2);                                                   \
  }

#define ATTENTION_SIZES(SUFFIX, T)                   \
  ATTENTION(hallmark_attention_##SUFFIX##_48, T, 48) \
  ATTENTION(hallmark_attention_##SUFFIX##_64, T, 64) \
  ATTENTION(hallmark_attention_##SUFFIX##_80, T, 80) \
  ATTENTION(hallmark_attention_##SUFFIX##_96, T, 96) \
  ATTENTION(hallmark_attention_##SUFFIX##_128, T, 128) \
  ATTENTION(hallmark_attention_##SUFFIX##_160, T, 160)

ATTENTION_SIZES(f16, __half)
ATTENTION_SIZES(bf16, __nv_bfloat16)
