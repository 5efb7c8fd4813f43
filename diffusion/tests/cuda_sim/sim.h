// A host simulation of the CUDA execution model, enough to run the crate's
// own kernels (src/kernels/*.cu) unchanged on a CPU: every thread of a block
// is an OS thread, `__shared__` variables are statics (blocks run one after
// another, so a static is the running block's shared memory),
// `__syncthreads` is a barrier of the block, a warp shuffle is an exchange
// through memory between two barriers of the warp, and the tensor-core
// `mma.sync.m16n8k16` is computed from the 32 lanes' fragments as the PTX
// ISA lays them out. Compiled with -DHALLMARK_CUDA_SIM and force-included
// before the kernels (see tests/cuda_kernels_simulated.rs).
#pragma once
#include <math.h>
#include <stdint.h>
#include <string.h>

#include <barrier>
#include <memory>
#include <thread>
#include <vector>

#include "vector_types.h"

#define __device__
#define __global__
#define __forceinline__ inline
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)

inline thread_local dim3 threadIdx;
inline thread_local dim3 blockIdx;
inline dim3 blockDim;
inline dim3 gridDim;

template <typename T> inline T min(T a, T b) { return b < a ? b : a; }
inline float __expf(float v) { return expf(v); }
inline float rsqrtf(float v) { return 1.f / sqrtf(v); }

namespace sim {

struct Warp {
  std::barrier<> barrier{32};
  uint64_t slot[32];
  uint32_t a[32][4];
  uint32_t b[32][2];
};

struct Block {
  explicit Block(unsigned threads) : barrier(threads), warps((threads + 31) / 32) {
    for (auto &w : warps) {
      w = std::make_unique<Warp>();
    }
  }
  std::barrier<> barrier;
  std::vector<std::unique_ptr<Warp>> warps;
};

inline thread_local Block *block = nullptr;

inline Warp &warp() { return *block->warps[threadIdx.x / 32]; }

// Runs `kernel` on every thread of every block of `grid`, one block at a
// time.
template <typename F> void launch(dim3 grid, dim3 threads, F kernel) {
  gridDim = grid;
  blockDim = threads;
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        Block b(threads.x);
        std::vector<std::thread> running;
        for (unsigned i = 0; i < threads.x; ++i) {
          running.emplace_back([&, i] {
            threadIdx = {i, 0, 0};
            blockIdx = {x, y, z};
            block = &b;
            kernel();
          });
        }
        for (auto &t : running) {
          t.join();
        }
      }
    }
  }
}

}  // namespace sim

inline void __syncthreads() { sim::block->barrier.arrive_and_wait(); }

template <typename V> V __shfl_xor_sync(unsigned, V v, int offset) {
  static_assert(sizeof(V) <= 8, "a shuffled value fits a slot");
  sim::Warp &w = sim::warp();
  const unsigned lane = threadIdx.x % 32;
  memcpy(&w.slot[lane], &v, sizeof(V));
  w.barrier.arrive_and_wait();
  V r;
  memcpy(&r, &w.slot[lane ^ (unsigned)offset], sizeof(V));
  w.barrier.arrive_and_wait();
  return r;
}

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}: c += A · B, A 16×16
// and B 16×8 spread over the warp's lanes (lane = 4 g + t): register r of
// A holds elements a(2r), a(2r+1), element i at row g + 8 ((i / 2) % 2),
// column 2 t + (i % 2) + 8 (i / 4); register r of B holds b(2r), b(2r+1),
// element i at row 2 t + (i % 2) + 8 (i / 2), column g; c0, c1 are row g,
// columns 2 t, 2 t + 1, and c2, c3 row g + 8.
template <typename T>
void hallmark_sim_mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  sim::Warp &w = sim::warp();
  const unsigned lane = threadIdx.x % 32;
  memcpy(w.a[lane], a, sizeof(w.a[lane]));
  w.b[lane][0] = b0;
  w.b[lane][1] = b1;
  w.barrier.arrive_and_wait();
  auto element = [](uint32_t reg, int high) {
    T h;
    const uint16_t bits = (uint16_t)(high ? reg >> 16 : reg & 0xffffu);
    memcpy(&h, &bits, 2);
    return to_f32(h);
  };
  float A[16][16];
  float B[16][8];
  for (int l = 0; l < 32; ++l) {
    const int g = l / 4;
    const int t = l % 4;
    for (int i = 0; i < 8; ++i) {
      A[g + 8 * ((i / 2) % 2)][2 * t + (i % 2) + 8 * (i / 4)] = element(w.a[l][i / 2], i % 2);
    }
    for (int i = 0; i < 4; ++i) {
      B[2 * t + (i % 2) + 8 * (i / 2)][g] = element(w.b[l][i / 2], i % 2);
    }
  }
  const int g = lane / 4;
  const int t = lane % 4;
  for (int j = 0; j < 4; ++j) {
    const int row = g + 8 * (j / 2);
    const int col = 2 * t + (j % 2);
    float sum = 0.f;
    for (int k = 0; k < 16; ++k) {
      sum += A[row][k] * B[k][col];
    }
    c[j] += sum;
  }
  w.barrier.arrive_and_wait();
}
