// The x pass of the CPU backward for float32 values, in one read of x and one read-modify-write of
// grad_x (AVX-512):
//
//   part[j, k]    += sum over m in [m0, m1) of g[m, j] * dropped(x)[m, k]     [R, K]  (grad_a's chunk sum)
//   grad_x[m, k]  += dropped(sum over j of g[m, j] * a[j, k])                 [M, K]
//
// dropped(v)[m, k] = keep(m * K + k) ? v * keep_scale : +0 (the identity without dropout). With dropout
// the mask of 16 columns is hashed in vector lanes (keep_x16, the hash of dropout_hash.h lane by lane)
// once per element and serves both products, so x is not widened into a masked copy first.
//
// The vector lanes are 16 consecutive columns k. A group of 8 rows keeps its x vectors and grad_x terms of
// one column chunk in registers while j runs over all R rows of a: each g[m, j] is broadcast once and
// feeds one FMA into part[j, chunk] (with x[m, chunk]) and one into grad_x[m, chunk] (with a[j, chunk]).
// part [R, K] and a [R, K] (128 KiB each at R = 16, K = 2048) stay in L2; x and grad_x stream.
//
// Why not BLAS (grad_a = g^T @ x, then grad_x += g @ a): that reads x once and grad_x twice (the
// base GEMM wrote it, then the rank-r update reads and writes it again), at rank 16 at about half the
// machine's FMA rate. The sums over m (part) and over j (grad_x) run in a fixed order, independent of
// the thread count.
#pragma once

#include <algorithm>
#include <cstdint>

#include "cpu/common.h"

#ifdef LORACUDA_X86_DISPATCH

namespace loracuda {
namespace cpu {
namespace x_pass_avx512 {

constexpr int kGroupRows = 8;

// mix32 (dropout_hash.h) on 16 uint32 lanes.
__attribute__((target("avx512f"), always_inline)) inline __m512i mix32_x16(__m512i v) {
  v = _mm512_xor_si512(v, _mm512_srli_epi32(v, 16));
  v = _mm512_mullo_epi32(v, _mm512_set1_epi32(0x7feb352d));
  v = _mm512_xor_si512(v, _mm512_srli_epi32(v, 15));
  v = _mm512_mullo_epi32(v, _mm512_set1_epi32(static_cast<int>(0x846ca68bu)));
  return _mm512_xor_si512(v, _mm512_srli_epi32(v, 16));
}

// dropout_keep (dropout_hash.h) of the 16 elements with flat indices start .. start + 15, as a lane mask.
// A lane whose low index word wrapped past 2^32 carries into the high word, as the scalar index does.
__attribute__((target("avx512f"), always_inline)) inline __mmask16 keep_x16(const Dropout& d, uint64_t start) {
  const uint32_t lo0 = static_cast<uint32_t>(start), hi0 = static_cast<uint32_t>(start >> 32);
  const __m512i base = _mm512_set1_epi32(static_cast<int>(lo0));
  const __m512i lo = _mm512_add_epi32(base, _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  const __mmask16 carry = _mm512_cmplt_epu32_mask(lo, base);
  const __m512i hi_word = _mm512_set1_epi32(static_cast<int>(hi0));
  const __m512i hi = _mm512_mask_add_epi32(hi_word, carry, hi_word, _mm512_set1_epi32(1));
  const __m512i first = mix32_x16(_mm512_add_epi32(lo, _mm512_set1_epi32(static_cast<int>(d.key.lo))));
  const __m512i bits =
      mix32_x16(_mm512_xor_si512(first, _mm512_add_epi32(hi, _mm512_set1_epi32(static_cast<int>(d.key.hi)))));
  return _mm512_cmp_epu32_mask(_mm512_srli_epi32(bits, 8), _mm512_set1_epi32(static_cast<int>(d.threshold)),
                               _MM_CMPINT_NLT);
}

// The columns one call covers: `width` columns of x and grad_x from the pointers given, of a (row
// stride a_stride) and of part (row stride part_stride); for the dropout index, column 0 is the
// logical column `first` of rows of `index_width` elements (a call may take a column range of x).
struct Columns {
  int64_t width;
  int64_t a_stride;
  int64_t part_stride;
  int64_t index_width;
  int64_t first;
};

// One group of kRows rows (x row i at x + i * xs, grad_x row i at gx + i * gxs, g row i at g + i * gs;
// unit column strides), the columns `cols`, all R rows of a: part [R, ...] and the grad_x rows updated
// (kGradX; without it only part, by the same sums: grad_a does not depend on whether grad_x is asked
// for). kDrop: dropout `drop`, row i's element k at flat index (row0 + i) * index_width + first + k.
template <int kRows, bool kGradX, bool kDrop>
__attribute__((target("avx512f"))) void group(const float* x, int64_t xs, float* gx, int64_t gxs, const float* g,
                                              int64_t gs, const float* a, int64_t big_r, float* part,
                                              const Columns& cols, const Dropout& drop, int64_t row0) {
  const int64_t k_len = cols.width, as = cols.a_stride, ps = cols.part_stride;
  const __m512 ks = _mm512_set1_ps(drop.keep_scale);
  for (int64_t k = 0; k < k_len; k += 16) {
    const __mmask16 mask =
        k + 16 <= k_len ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (k_len - k)) - 1u);
    // lora[i] = the rank-R term of grad_x's row, summed from zero and added to grad_x once at the end
    // (as g @ a, then +=): R roundings at the term's magnitude, not at grad_x's.
    __m512 xv[kRows], lora[kRows];
    __mmask16 keep[kRows];  // the lanes dropout keeps (all of `mask` without dropout)
#pragma GCC unroll 8
    for (int i = 0; i < kRows; ++i) {
      keep[i] = mask;
      if constexpr (kDrop) {
        const uint64_t index = static_cast<uint64_t>(row0 + i) * static_cast<uint64_t>(cols.index_width) +
                               static_cast<uint64_t>(cols.first + k);
        keep[i] = static_cast<__mmask16>(keep_x16(drop, index) & mask);
        xv[i] = _mm512_maskz_mul_ps(keep[i], _mm512_maskz_loadu_ps(mask, x + i * xs + k), ks);
      } else {
        xv[i] = _mm512_maskz_loadu_ps(mask, x + i * xs + k);
      }
      lora[i] = _mm512_setzero_ps();
    }
    for (int64_t j = 0; j < big_r; ++j) {
      const __m512 av = kGradX ? _mm512_maskz_loadu_ps(mask, a + j * as + k) : _mm512_setzero_ps();
      // part[j, chunk] += the group's rows in two chains (even rows onto the stored value, odd rows
      // from zero), joined at the end: half the dependent-FMA latency of one chain.
      __m512 even = _mm512_maskz_loadu_ps(mask, part + j * ps + k), odd = _mm512_setzero_ps();
#pragma GCC unroll 8
      for (int i = 0; i < kRows; ++i) {
        const __m512 gij = _mm512_set1_ps(g[i * gs + j]);
        if constexpr (kGradX) lora[i] = _mm512_fmadd_ps(gij, av, lora[i]);
        if (i % 2 == 0) {
          even = _mm512_fmadd_ps(gij, xv[i], even);
        } else {
          odd = _mm512_fmadd_ps(gij, xv[i], odd);
        }
      }
      _mm512_mask_storeu_ps(part + j * ps + k, mask, kRows > 1 ? _mm512_add_ps(even, odd) : even);
    }
    if constexpr (!kGradX) continue;
#pragma GCC unroll 8
    for (int i = 0; i < kRows; ++i) {
      float* out = gx + i * gxs + k;
      const __m512 term = kDrop ? _mm512_maskz_mul_ps(keep[i], lora[i], ks) : lora[i];
      _mm512_mask_storeu_ps(out, mask, _mm512_add_ps(_mm512_maskz_loadu_ps(mask, out), term));
    }
  }
}

// Rows [m0, m1): x (row stride xs), grad_x (row stride gxs; null: grad_a only), g [M, R] (row stride
// gs), a [R, ...], the columns `cols`; part [R, ...] += this chunk's sums over those columns; dropout
// `drop` (inactive: none).
template <bool kGradX, bool kDrop>
void rows_of(const float* x, int64_t xs, float* gx, int64_t gxs, const float* g, int64_t gs, const float* a,
             int64_t big_r, const Columns& cols, int64_t m0, int64_t m1, float* part, const Dropout& drop) {
  for (int64_t i0 = m0; i0 < m1; i0 += kGroupRows) {
    const int nr = static_cast<int>(std::min<int64_t>(kGroupRows, m1 - i0));
    const float* xr = x + i0 * xs;
    float* gxr = kGradX ? gx + i0 * gxs : nullptr;
    const float* gr = g + i0 * gs;
    with_row_count<kGroupRows>(nr, [&](auto rows_c) {
      group<decltype(rows_c)::value, kGradX, kDrop>(xr, xs, gxr, gxs, gr, gs, a, big_r, part, cols, drop, i0);
    });
  }
}

inline void rows(const float* x, int64_t xs, float* gx, int64_t gxs, const float* g, int64_t gs, const float* a,
                 int64_t big_r, const Columns& cols, int64_t m0, int64_t m1, float* part, const Dropout& drop) {
  if (gx != nullptr) {
    if (drop.active) return rows_of<true, true>(x, xs, gx, gxs, g, gs, a, big_r, cols, m0, m1, part, drop);
    return rows_of<true, false>(x, xs, gx, gxs, g, gs, a, big_r, cols, m0, m1, part, drop);
  }
  if (drop.active) return rows_of<false, true>(x, xs, gx, gxs, g, gs, a, big_r, cols, m0, m1, part, drop);
  rows_of<false, false>(x, xs, gx, gxs, g, gs, a, big_r, cols, m0, m1, part, drop);
}

}  // namespace x_pass_avx512
}  // namespace cpu
}  // namespace loracuda
#endif
