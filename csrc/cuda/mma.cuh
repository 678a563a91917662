// One tensor-core instruction for the shrink kernels: the warp-wide matrix multiply-accumulate
//   mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32   D [16 x 8] = A [16 x 16] B [16 x 8] + C
// with bf16 or fp16 operands and float32 accumulators (products of two 16-bit values are exact in
// float32; the sums are float32). CUDA headers only (no torch): see docs/design.md, sections 'Architecture' and
// 'CUDA kernel notes'.
// Status: compiled for sm_80 / sm_90 (HMMA.16816.F32[.BF16] in the SASS), not yet run on a GPU.
//
// Fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type"). For lane
// l of the warp, g = l >> 2 (the group, 0..7) and t = l & 3 (the thread in the group, 0..3). Every
// 32-bit register holds two 16-bit elements, the lower-numbered column (A) / row (B) in the low half:
//
//   A (16 x 16, "row": element (row, k)), four registers:
//     a[0] = (row g,     k 2t, 2t+1)        a[1] = (row g + 8, k 2t, 2t+1)
//     a[2] = (row g,     k 2t+8, 2t+9)      a[3] = (row g + 8, k 2t+8, 2t+9)
//   B (16 x 8, "col": element (k, n), stored n-major, i.e. as rows of an [8 x 16] row-major matrix),
//   two registers:
//     b[0] = (k 2t, 2t+1, column n = g)      b[1] = (k 2t+8, 2t+9, column n = g)
//   C and D (16 x 8 float32), four registers:
//     c[0], c[1] = (row g, n 2t, 2t+1)       c[2], c[3] = (row g + 8, n 2t, 2t+1)
//
// For h = x . a^T the MMA rows are tokens (rows of x), the MMA columns n are rows of a (ranks) and the
// MMA k is the K dimension: a pair of A is two consecutive values of one row of x and a pair of B two
// consecutive values of one row of a, so both come straight from row-major storage as 32-bit words.
//
// Which K columns a k slot stands for is free, as long as A and B agree: the product sums over all 16
// slots. The kernels use that (common.cuh, shrink_warp_mma): lane (g, t) reads 8 consecutive columns
// 8t .. 8t+7 of a 32-column step with one 16-byte load per row and feeds them to two MMAs, slots
// (2t, 2t+1, 2t+8, 2t+9) of the first being columns 8t .. 8t+3 and of the second 8t+4 .. 8t+7. The
// lanes of A and of B that hold slot s have the same t, so both operands see the same permutation.
//
// Architectures: the instruction needs sm_80 or newer. For an older target (a TORCH_CUDA_ARCH_LIST
// below 8.0) the same function computes the same 16 x 8 result from the same fragments with warp
// shuffles and float32 FMAs, so every kernel built on it stays correct there, only slower; the
// default build (sm_80, sm_90) never compiles that branch.
#pragma once
#include <cstdint>
#include <type_traits>

#include "device_api.cuh"
#if defined(LORACUDA_MMA_EMULATION)
#include "../emulation/mma_emulation.h"
#endif

namespace loracuda {
namespace cuda {

// The 16-bit operand types the instruction takes, and the PTX type name of each.
template <typename T>
struct MmaOperand {
  static constexpr bool kSupported = false;
};
template <>
struct MmaOperand<__nv_bfloat16> {
  static constexpr bool kSupported = true;
};
template <>
struct MmaOperand<__half> {
  static constexpr bool kSupported = true;
};

#if !(defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800) && !defined(LORACUDA_MMA_EMULATION)
// The fallback's view of one 32-bit register: its two elements as float32 (low half first).
template <typename T>
__device__ __forceinline__ float2 mma_unpack(uint32_t w) {
  const unsigned short lo = static_cast<unsigned short>(w & 0xFFFFu), hi = static_cast<unsigned short>(w >> 16);
  if constexpr (sizeof(T) == 2 && MmaOperand<T>::kSupported) {
    T l, h;
    *reinterpret_cast<unsigned short*>(&l) = lo;
    *reinterpret_cast<unsigned short*>(&h) = hi;
    if constexpr (std::is_same<T, __half>::value) {
      return make_float2(__half2float(l), __half2float(h));
    } else {
      return make_float2(__bfloat162float(l), __bfloat162float(h));
    }
  }
  return make_float2(0.0f, 0.0f);
}
#endif

// d += A B for one m16n8k16 tile (layouts above). All 32 lanes of the warp must call it together
// (converged, same instruction): it is one warp-wide operation.
template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  static_assert(MmaOperand<T>::kSupported, "mma_m16n8k16 takes __nv_bfloat16 or __half operands");
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  // volatile: mma.sync needs the whole warp converged, so the compiler must not treat it as a pure
  // value it may sink into a lane-dependent branch (the guarded stores that use its result).
  if constexpr (std::is_same<T, __half>::value) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#elif defined(LORACUDA_MMA_EMULATION)
  // The host build of the kernels (csrc/emulation): the instruction emulated lane by lane from the PTX
  // fragment layout above, as a warp collective (every lane must arrive at this call together).
  ::loracuda_emu::mma_m16n8k16<std::is_same<T, __half>::value>(d, a, b, LORACUDA_EMU_SITE);
#else
  // Lane (g, t) needs D rows g and g + 8, columns n = 2t and 2t + 1, summed over the 16 k slots. Slot
  // pair (2u, 2u+1) and (2u+8, 2u+9) of A row g sits in lane 4g + u (a[0] / a[2]; row g + 8: a[1] /
  // a[3]); the same slots of B column n sit in lane 4n + u (b[0] / b[1]).
  // Unrolled by 2 only: the fallback only has to be correct, and this keeps its register use low
  // enough that the kernels built on it do not spill for sm_75 (fully unrolled, or not at all, they
  // did: ptxas of CUDA 13.0).
  const int lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
#pragma unroll 2
  for (int u = 0; u < 4; ++u) {
    const int src_a = 4 * g + u, src_b0 = 4 * (2 * t) + u, src_b1 = 4 * (2 * t + 1) + u;
    const float2 r0_lo = mma_unpack<T>(__shfl_sync(0xffffffffu, a[0], src_a));
    const float2 r8_lo = mma_unpack<T>(__shfl_sync(0xffffffffu, a[1], src_a));
    const float2 r0_hi = mma_unpack<T>(__shfl_sync(0xffffffffu, a[2], src_a));
    const float2 r8_hi = mma_unpack<T>(__shfl_sync(0xffffffffu, a[3], src_a));
    const float2 n0_lo = mma_unpack<T>(__shfl_sync(0xffffffffu, b[0], src_b0));
    const float2 n0_hi = mma_unpack<T>(__shfl_sync(0xffffffffu, b[1], src_b0));
    const float2 n1_lo = mma_unpack<T>(__shfl_sync(0xffffffffu, b[0], src_b1));
    const float2 n1_hi = mma_unpack<T>(__shfl_sync(0xffffffffu, b[1], src_b1));
    d[0] = fmaf(r0_lo.x, n0_lo.x, fmaf(r0_lo.y, n0_lo.y, fmaf(r0_hi.x, n0_hi.x, fmaf(r0_hi.y, n0_hi.y, d[0]))));
    d[1] = fmaf(r0_lo.x, n1_lo.x, fmaf(r0_lo.y, n1_lo.y, fmaf(r0_hi.x, n1_hi.x, fmaf(r0_hi.y, n1_hi.y, d[1]))));
    d[2] = fmaf(r8_lo.x, n0_lo.x, fmaf(r8_lo.y, n0_lo.y, fmaf(r8_hi.x, n0_hi.x, fmaf(r8_hi.y, n0_hi.y, d[2]))));
    d[3] = fmaf(r8_lo.x, n1_lo.x, fmaf(r8_lo.y, n1_lo.y, fmaf(r8_hi.x, n1_hi.x, fmaf(r8_hi.y, n1_hi.y, d[3]))));
  }
#endif
}

// The work item of the calling warp in a tensor-core shrink kernel: warp w of block b owns item
// b * (blockDim.x / 32) + w = row tile * rank tiles + rank tile (the rank tile fastest, so that the
// warps reading the same rows of x run side by side), i.e. tokens m0 .. m0 + kWarpRows - 1 and rows
// j0 .. j0 + kRankRows - 1 of a. False when the item lies past the last tile (the whole warp leaves).
template <int kWarpRows, int kRankRows>
__device__ __forceinline__ bool mma_warp_item(int64_t M, int64_t R, int64_t& m0, int64_t& j0) {
  const int64_t rank_tiles = (R + kRankRows - 1) / kRankRows;
  const int64_t row_tiles = (M + kWarpRows - 1) / kWarpRows;
  const int64_t item = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + (threadIdx.x >> 5);
  if (item >= row_tiles * rank_tiles) return false;
  const int64_t row_tile = item / rank_tiles;
  m0 = row_tile * kWarpRows;
  j0 = (item - row_tile * rank_tiles) * kRankRows;
  return true;
}

// Calls fn(row, col, value) for each of the lane's elements of kMT x kNT accumulator tiles (C layout
// above: tile (i, j) covers rows 16 i .. 16 i + 15 and columns 8 j .. 8 j + 7), row and col relative to
// the first tile: element e of tile (i, j) is row 16 i + g (+ 8 for e >= 2), column 8 j + 2t + (e & 1).
template <int kMT, int kNT, typename Fn>
__device__ __forceinline__ void for_each_c_element(const float (&acc)[kMT][kNT][4], int lane, Fn&& fn) {
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int i = 0; i < kMT; ++i) {
#pragma unroll
    for (int j = 0; j < kNT; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) fn(16 * i + g + (e >= 2 ? 8 : 0), 8 * j + 2 * t + (e & 1), acc[i][j][e]);
    }
  }
}

}  // namespace cuda
}  // namespace loracuda
