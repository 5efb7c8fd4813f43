// Host stand-in for CUDA's cuda_bf16.h, for the kernel simulation: bfloat16
// (the top half of an f32) with round-to-nearest-even conversions.
#pragma once
#include <stdint.h>
#include <string.h>

#include "vector_types.h"

struct __nv_bfloat16 {
  uint16_t bits;
};
struct __nv_bfloat162 {
  __nv_bfloat16 x, y;
};

inline float __bfloat162float(__nv_bfloat16 h) {
  const uint32_t bits = (uint32_t)h.bits << 16;
  float f;
  memcpy(&f, &bits, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16(float v) {
  uint32_t bits;
  memcpy(&bits, &v, 4);
  __nv_bfloat16 h;
  if ((bits & 0x7fffffffu) > 0x7f800000u) {
    h.bits = 0x7fc0;  // NaN
  } else {
    h.bits = (uint16_t)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
  }
  return h;
}
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) {
  return {__float2bfloat16(a), __float2bfloat16(b)};
}
inline float2 __bfloat1622float2(__nv_bfloat162 h) {
  return {__bfloat162float(h.x), __bfloat162float(h.y)};
}
