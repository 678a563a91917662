// The grad_y pass of the CPU backward for float32 values, in one read of grad_y (AVX-512):
//
//   g[m, s*r + j]  = sum over n in slice s of grad_y[m, n] * b[n, j]        [M, R]  (unscaled)
//   part[n, j]    += sum over m in [m0, m1) of grad_y[m, n] * h[m, s*r + j]  [N, r]  (unscaled)
//
// Both products read the same element grad_y[m, n], so one loop over grad_y serves both: each element is
// broadcast once and feeds one FMA into its row's g accumulator (b[n, :] as the other operand) and one
// into part[n, :] (h[m, :] as the other operand). The r lanes of j are the vector lanes (r <= 64: up to
// four 16-lane vectors, the last one masked), so no horizontal sums are needed. A group of kRows rows of
// grad_y keeps its h rows and g accumulators in registers for the whole slice, and loads and stores each
// part[n, :] once per group: part [N, r] and b [N, r] (128 KiB each at N = 2048, r = 16) stay in L2.
//
// Why not two BLAS calls (g = grad_y @ b, grad_b^T = h^T @ grad_y): they read grad_y twice and, at
// rank 16, run at about half the machine's FMA rate (measured, 2048 x 2048, r 16, 2 threads: 0.83 and
// 0.89 ms). The sums over n (g) and over m (part) are in a fixed order, independent of threads.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>


#include "cpu/common.h"

#ifdef LORACUDA_X86_DISPATCH

namespace loracuda {
namespace cpu {
namespace grad_y_avx512 {

constexpr int kMaxRank = 64;  // four 16-lane vectors of j

// Rows per group for kVec vectors of j: the h rows and g accumulators (2 * kRows * kVec registers)
// plus the broadcasts leave room in the 32 vector registers.
template <int kVec>
constexpr int rows_per_group() {
  return kVec == 1 ? 8 : (kVec == 2 ? 4 : 2);
}

// One group of kRows rows (dy row i at dy + i * rs, unit column stride; h row i at h + i * hs), the
// columns [0, ns) of one slice: g rows written at g + i * gs (unscaled), part [ns, r] updated.
// `last` masks the last vector of j (lanes j < r).
template <int kRows, int kVec>
__attribute__((target("avx512f"))) void group(const float* dy, int64_t rs, const float* h, int64_t hs,
                                              const float* b, int r, int64_t ns, float* part, float* g,
                                              int64_t gs, __mmask16 last) {
  __mmask16 mask[kVec];
  for (int c = 0; c < kVec; ++c) mask[c] = c == kVec - 1 ? last : static_cast<__mmask16>(0xFFFF);
  __m512 hv[kRows][kVec], acc[kRows][kVec];
#pragma GCC unroll 8
  for (int i = 0; i < kRows; ++i) {
#pragma GCC unroll 4
    for (int c = 0; c < kVec; ++c) {
      hv[i][c] = _mm512_maskz_loadu_ps(mask[c], h + i * hs + 16 * c);
      acc[i][c] = _mm512_setzero_ps();
    }
  }
  for (int64_t n = 0; n < ns; ++n) {
    __m512 d[kRows];
#pragma GCC unroll 8
    for (int i = 0; i < kRows; ++i) d[i] = _mm512_set1_ps(dy[i * rs + n]);
    const float* bn = b + n * r;
    float* pn = part + n * r;
#pragma GCC unroll 4
    for (int c = 0; c < kVec; ++c) {
      const __m512 bv = _mm512_maskz_loadu_ps(mask[c], bn + 16 * c);
      // part[n, :] += the group's rows in two chains (even rows onto the stored value, odd rows from
      // zero), joined at the end: half the dependent-FMA latency of one chain of kRows.
      __m512 even = _mm512_maskz_loadu_ps(mask[c], pn + 16 * c), odd = _mm512_setzero_ps();
#pragma GCC unroll 8
      for (int i = 0; i < kRows; ++i) {
        acc[i][c] = _mm512_fmadd_ps(d[i], bv, acc[i][c]);
        if (i % 2 == 0) {
          even = _mm512_fmadd_ps(d[i], hv[i][c], even);
        } else {
          odd = _mm512_fmadd_ps(d[i], hv[i][c], odd);
        }
      }
      _mm512_mask_storeu_ps(pn + 16 * c, mask[c], kRows > 1 ? _mm512_add_ps(even, odd) : even);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < kRows; ++i) {
#pragma GCC unroll 4
    for (int c = 0; c < kVec; ++c) _mm512_mask_storeu_ps(g + i * gs + 16 * c, mask[c], acc[i][c]);
  }
}

// Rows [m0, m1) of dy [M, N] (row stride rs, unit column stride), all slices (`off`, S + 1 column
// offsets): g rows [m0, m1) of [M, S * r] (row stride gs) and part [N, r] += this chunk's sums.
template <int kVec>
void rows(const float* dy, int64_t rs, const float* h, int64_t hs, const float* b, int r,
          const std::vector<int64_t>& off, int64_t m0, int64_t m1, float* part, float* g, int64_t gs) {
  constexpr int kRows = rows_per_group<kVec>();
  const int tail = r - 16 * (kVec - 1);
  const __mmask16 last = static_cast<__mmask16>(tail >= 16 ? 0xFFFFu : (1u << tail) - 1u);
  const int64_t slices = static_cast<int64_t>(off.size()) - 1;
  for (int64_t i0 = m0; i0 < m1; i0 += kRows) {
    const int nr = static_cast<int>(std::min<int64_t>(kRows, m1 - i0));
    for (int64_t s = 0; s < slices; ++s) {
      const int64_t n0 = off[s], ns = off[s + 1] - off[s];
      const float* dys = dy + i0 * rs + n0;
      const float* hs_ = h + i0 * hs + s * r;
      float* gs_ = g + i0 * gs + s * r;
      with_row_count<kRows>(nr, [&](auto rows_c) {
        group<decltype(rows_c)::value, kVec>(dys, rs, hs_, hs, b + n0 * r, r, ns, part + n0 * r, gs_, gs, last);
      });
    }
  }
}

// Dispatch on the vector count of r (1 <= r <= kMaxRank).
inline void run(const float* dy, int64_t rs, const float* h, int64_t hs, const float* b, int r,
                const std::vector<int64_t>& off, int64_t m0, int64_t m1, float* part, float* g, int64_t gs) {
  switch ((r + 15) / 16) {
    case 1: return rows<1>(dy, rs, h, hs, b, r, off, m0, m1, part, g, gs);
    case 2: return rows<2>(dy, rs, h, hs, b, r, off, m0, m1, part, g, gs);
    case 3: return rows<3>(dy, rs, h, hs, b, r, off, m0, m1, part, g, gs);
    default: return rows<4>(dy, rs, h, hs, b, r, off, m0, m1, part, g, gs);
  }
}

}  // namespace grad_y_avx512
}  // namespace cpu
}  // namespace loracuda
#endif
