// The dropout mask of loracuda: a counter-based hash of (seed, element index).
//
// Forward and backward regenerate the same mask from the seed instead of storing an M x K mask,
// and CPU and CUDA draw the identical mask for the same seed because both compile this one
// definition. loracuda/reference.py reimplements it with integer tensor ops; tests compare the two.
//
// Element index: the row-major position m * K + k of the element in the logical [M, K] input
// (independent of the tensor's strides). Keep rule: keep iff (bits >> 8) >= threshold, with
// threshold = round(p * 2^24), so the kept fraction is 1 - threshold / 2^24 (p quantised to 2^-24).
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define LORACUDA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define LORACUDA_HOST_DEVICE inline
#endif

namespace loracuda {

// A 32-bit avalanche mix (xor-shift-multiply); every input bit affects every output bit.
LORACUDA_HOST_DEVICE uint32_t mix32(uint32_t v) {
  v ^= v >> 16;
  v *= 0x7feb352dU;
  v ^= v >> 15;
  v *= 0x846ca68bU;
  v ^= v >> 16;
  return v;
}

// Per-seed keys, computed once per launch, not per element.
struct DropoutKey {
  uint32_t lo;
  uint32_t hi;
};

LORACUDA_HOST_DEVICE DropoutKey dropout_key(uint64_t seed) {
  DropoutKey key;
  key.lo = mix32(static_cast<uint32_t>(seed) ^ 0x243f6a88U);
  key.hi = mix32(static_cast<uint32_t>(seed >> 32) ^ 0x85a308d3U);
  return key;
}

// 32 random bits for one element.
LORACUDA_HOST_DEVICE uint32_t dropout_bits(DropoutKey key, uint64_t index) {
  const uint32_t first = mix32(static_cast<uint32_t>(index) + key.lo);
  return mix32(first ^ (static_cast<uint32_t>(index >> 32) + key.hi));
}

// threshold = round(p * 2^24); p in [0, 1).
inline uint32_t dropout_threshold(double p) {
  return static_cast<uint32_t>(p * 16777216.0 + 0.5);
}

LORACUDA_HOST_DEVICE bool dropout_keep(DropoutKey key, uint64_t index, uint32_t threshold) {
  return (dropout_bits(key, index) >> 8) >= threshold;
}

}  // namespace loracuda
