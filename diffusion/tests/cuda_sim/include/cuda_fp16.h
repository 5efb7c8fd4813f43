// Host stand-in for CUDA's cuda_fp16.h, for the kernel simulation
// (`../sim.h`): IEEE binary16 with round-to-nearest-even conversions,
// through the compiler's _Float16.
#pragma once
#include <stdint.h>
#include <string.h>

#include "vector_types.h"

struct __half {
  uint16_t bits;
};
struct __half2 {
  __half x, y;
};

inline float __half2float(__half h) {
  _Float16 f;
  memcpy(&f, &h.bits, 2);
  return (float)f;
}
inline __half __float2half(float v) {
  const _Float16 f = (_Float16)v;
  __half h;
  memcpy(&h.bits, &f, 2);
  return h;
}
inline __half2 __floats2half2_rn(float a, float b) { return {__float2half(a), __float2half(b)}; }
inline float2 __half22float2(__half2 h) { return {__half2float(h.x), __half2float(h.y)}; }
