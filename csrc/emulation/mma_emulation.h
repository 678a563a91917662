// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32 emulated from the PTX ISA's fragment
// layout ("Matrix Fragments for mma.m16n8k16 with floating point type"), for the host build of the
// kernels (selected explicitly by LORACUDA_MMA_EMULATION in csrc/cuda/mma.cuh). The 32 lanes meet in
// one warp collective; each lane then rebuilds A [16 x 16] and B [16 x 8] from every lane's registers
// and computes its own four elements of D. For lane l, g = l >> 2, t = l & 3:
//   A: a[0] = (row g, k 2t..2t+1)  a[1] = (row g+8, k 2t..2t+1)  a[2] = (row g, k 2t+8..2t+9)  a[3] = (row g+8, k 2t+8..2t+9)
//   B: b[0] = (k 2t..2t+1, col g)  b[1] = (k 2t+8..2t+9, col g)
//   C/D: c[0], c[1] = (row g, col 2t, 2t+1)  c[2], c[3] = (row g+8, col 2t, 2t+1)
// the lower-numbered element in the low 16 bits of each register. Numerics: every product of two
// 16-bit values is exact in float32; the emulation adds the 16 products to the accumulator in
// ascending k, rounding each sum to float32. The hardware's internal order and precision of that sum
// are not specified by the ISA; results agree to float32 rounding, not bit for bit.
#pragma once
#include <cstdint>
#include <cstring>

#include "cuda_emulation.h"

namespace loracuda_emu {

inline float mma_operand(uint32_t word, int half, bool fp16) {
  const unsigned short bits = static_cast<unsigned short>(half ? word >> 16 : word & 0xFFFFu);
  return fp16 ? __half2float(__half{bits}) : __bfloat162float(__nv_bfloat16{bits});
}

template <bool kHalf>
inline void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], Site site) {
  struct Fragments {
    uint32_t a[4];
    uint32_t b[2];
  } mine{{a[0], a[1], a[2], a[3]}, {b[0], b[1]}};
  const unsigned char* all = warp_collective(0xffffffffu, &mine, sizeof mine, "mma.sync.m16n8k16", site);
  const auto lane_fragments = [all](int lane) {
    Fragments f;
    std::memcpy(&f, all + 64 * lane, sizeof f);
    return f;
  };
  // A[row][k]: lane 4 (row % 8) + (k % 8) / 2, register (row >= 8) + 2 (k >= 8), half k % 2.
  const auto a_at = [&](int row, int k) {
    const Fragments f = lane_fragments(4 * (row & 7) + ((k & 7) >> 1));
    return mma_operand(f.a[(row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0)], k & 1, kHalf);
  };
  // B[k][col]: lane 4 col + (k % 8) / 2, register (k >= 8), half k % 2.
  const auto b_at = [&](int k, int col) {
    const Fragments f = lane_fragments(4 * col + ((k & 7) >> 1));
    return mma_operand(f.b[k >= 8 ? 1 : 0], k & 1, kHalf);
  };
  const int lane = static_cast<int>(thread_idx.x & 31u);
  const int g = lane >> 2, t = lane & 3;
  for (int e = 0; e < 4; ++e) {
    const int row = g + (e >= 2 ? 8 : 0), col = 2 * t + (e & 1);
    float acc = d[e];
    for (int k = 0; k < 16; ++k) acc = acc + a_at(row, k) * b_at(k, col);
    d[e] = acc;
  }
}

}  // namespace loracuda_emu
