// Shared helpers of the CPU kernels: element conversions, row-block sizes, the dropout row mask,
// and the rank-r delta micro-kernel that merge_, restore_codes and unmerge_exact_ all call.
//
// Notation as in csrc/ops.cpp: x [M, K], lora_a [R, K], lora_b [N, r], h [M, R] in the accumulation
// dtype (float32, float64 for float64 values). Strides are in elements.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "dropout_hash.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define LORACUDA_X86_DISPATCH 1
#endif

namespace loracuda {
namespace cpu {

using at::Tensor;

// ---- conversions ------------------------------------------------------------------------------

// The accumulation type of a value type: double for double, float for everything else.
template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// float32 -> bf16 / fp16 conversions go through c10's constructors, which round to nearest even
// (the rounding of every torch cast), so a kernel result equals `tensor.to(dtype)` of its float.
template <typename T>
inline acc_t<T> to_acc(T v) {
  return static_cast<acc_t<T>>(v);
}

template <typename T>
inline T from_acc(acc_t<T> v) {
  return static_cast<T>(v);
}

// Calls fn.template operator()<T>() with T the C++ type of a kernel value dtype.
template <typename Fn>
inline void dispatch_value_type(at::ScalarType t, Fn&& fn) {
  switch (t) {
    case at::kFloat: fn(float{}); break;
    case at::kDouble: fn(double{}); break;
    case at::kBFloat16: fn(c10::BFloat16{}); break;
    case at::kHalf: fn(c10::Half{}); break;
    default: TORCH_CHECK(false, "loracuda: unsupported dtype ", t);  // the checks reject it first
  }
}

// A row of `n` values starting at `src` (column stride `cs`) into accumulation-type `dst`.
template <typename T>
inline void load_row(const T* src, int64_t cs, int64_t n, acc_t<T>* dst) {
  if (cs == 1) {
    for (int64_t k = 0; k < n; ++k) dst[k] = to_acc(src[k]);
  } else {
    for (int64_t k = 0; k < n; ++k) dst[k] = to_acc(src[k * cs]);
  }
}

// dst (column stride `cs`) = T(src): one rounding per element.
template <typename T>
inline void store_row(const acc_t<T>* src, int64_t n, T* dst, int64_t cs) {
  if (cs == 1) {
    for (int64_t k = 0; k < n; ++k) dst[k] = from_acc<T>(src[k]);
  } else {
    for (int64_t k = 0; k < n; ++k) dst[k * cs] = from_acc<T>(src[k]);
  }
}

// The column stride to use for a 2-D tensor: a dimension of size 1 may carry any stride.
inline int64_t col_stride(const Tensor& t) { return t.size(1) == 1 ? 1 : t.stride(1); }
inline int64_t row_stride(const Tensor& t) { return t.size(0) == 1 ? t.size(1) : t.stride(0); }

// A small adapter factor in the accumulation dtype, contiguous (adapters are r x K or N x r: cheap).
inline Tensor adapter_as(const Tensor& t, at::ScalarType acc) { return t.to(acc).contiguous(); }

// ---- blocking ---------------------------------------------------------------------------------

// Rows per block of the blocked paths (converted or dropped rows feeding a GEMM): about 256 KiB of
// accumulation-type values, so a block and its GEMM operands stay in the 1-2 MiB L2 of a core;
// between 8 and 64 rows so that the GEMM per block is not degenerate.
inline int64_t block_rows(int64_t width, int64_t elem_bytes) {
  const int64_t rows = (int64_t{256} * 1024) / std::max<int64_t>(1, width * elem_bytes);
  return std::clamp<int64_t>(rows, 8, 64);
}

// A reduction over M (grad_a, grad_b) is summed per fixed chunk of rows, then the chunk partials in
// order, so the result depends only on M, never on the thread count. At most 64 partials.
inline int64_t reduction_chunk_rows(int64_t m, int64_t block) {
  const int64_t min_rows = std::max<int64_t>(block, 256);
  const int64_t rows = std::max<int64_t>(min_rows, (m + 63) / 64);
  return (rows + block - 1) / block * block;  // whole blocks per chunk
}

// ---- dropout ----------------------------------------------------------------------------------

// The dropout of one launch: key, threshold and the float32-rounded 1 / (1 - p).
struct Dropout {
  bool active = false;
  DropoutKey key{0, 0};
  uint32_t threshold = 0;
  float keep_scale = 1.0f;
};

inline Dropout make_dropout(double p, const std::optional<Tensor>& seed) {
  Dropout d;
  if (p <= 0.0) return d;  // p == 0: the exact no-dropout path (no mask, no scaling)
  d.active = true;
  d.key = dropout_key(static_cast<uint64_t>(seed->item<int64_t>()));
  d.threshold = dropout_threshold(p);
  d.keep_scale = static_cast<float>(1.0 / (1.0 - p));
  return d;
}

namespace detail {

// keep[i] = 1 where element (lo + i, hi) of the hash is kept, for i < n. uint32 arithmetic without
// branches, so the compiler vectorises it (the target clones below give it AVX2 / AVX-512 lanes).
__attribute__((always_inline)) inline void keep_segment_generic(DropoutKey key, uint32_t threshold, uint32_t lo, uint32_t hi, int64_t n,
                                 uint8_t* keep) {
  const uint32_t hi_key = hi + key.hi;
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t first = mix32(lo + static_cast<uint32_t>(i) + key.lo);
    keep[i] = static_cast<uint8_t>((mix32(first ^ hi_key) >> 8) >= threshold);
  }
}

#ifdef LORACUDA_X86_DISPATCH
__attribute__((target("avx512f,avx512bw"))) inline void keep_segment_avx512(DropoutKey key, uint32_t threshold,
                                                                            uint32_t lo, uint32_t hi, int64_t n,
                                                                            uint8_t* keep) {
  keep_segment_generic(key, threshold, lo, hi, n, keep);
}
__attribute__((target("avx2,fma"))) inline void keep_segment_avx2(DropoutKey key, uint32_t threshold, uint32_t lo,
                                                                  uint32_t hi, int64_t n, uint8_t* keep) {
  keep_segment_generic(key, threshold, lo, hi, n, keep);
}
#endif

enum class Isa { generic, avx2, avx512 };

inline Isa detect_isa() {
#ifdef LORACUDA_X86_DISPATCH
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")) return Isa::avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::avx2;
#endif
  return Isa::generic;
}

inline Isa isa() {
  static const Isa value = detect_isa();
  return value;
}

}  // namespace detail

// keep[k] for the n elements starting at the logical flat index `start` (= m * K + k0).
inline void dropout_keep_row(const Dropout& d, uint64_t start, int64_t n, uint8_t* keep) {
  while (n > 0) {
    const uint32_t lo = static_cast<uint32_t>(start);
    const uint32_t hi = static_cast<uint32_t>(start >> 32);
    // Within one segment the high word is constant: split where the low word wraps.
    const int64_t seg = std::min<int64_t>(n, static_cast<int64_t>((uint64_t{1} << 32) - lo));
#ifdef LORACUDA_X86_DISPATCH
    switch (detail::isa()) {
      case detail::Isa::avx512: detail::keep_segment_avx512(d.key, d.threshold, lo, hi, seg, keep); break;
      case detail::Isa::avx2: detail::keep_segment_avx2(d.key, d.threshold, lo, hi, seg, keep); break;
      default: detail::keep_segment_generic(d.key, d.threshold, lo, hi, seg, keep);
    }
#else
    detail::keep_segment_generic(d.key, d.threshold, lo, hi, seg, keep);
#endif
    start += static_cast<uint64_t>(seg);
    n -= seg;
    keep += seg;
  }
}

// dst[k] = keep[k] ? src[k] * keep_scale : 0, in the accumulation type (for float64 values the
// float32 keep_scale is widened, as the reference multiplies a float64 x by it).
template <typename A>
inline void apply_keep(const uint8_t* keep, float keep_scale, int64_t n, A* row) {
  const A ks = static_cast<A>(keep_scale);
  for (int64_t k = 0; k < n; ++k) row[k] = keep[k] ? row[k] * ks : A(0);
}

// ---- the rank-r delta micro-kernel -------------------------------------------------------------
//
// delta[i, k] = scale * sum_{j = 0 .. r-1} b[i, j] * a[j, k] for `rows` consecutive rows i of b.
// a [r, K] and b [rows, r] are contiguous, in F (float, or double for float64 weights); out is
// [rows, K] contiguous. Each sum runs j = 0, 1, ... r-1 as a chain of fused multiply-adds and is
// then multiplied by scale once: every code path (AVX-512, AVX2, scalar) performs the identical
// sequence of correctly rounded operations, so delta is bit-identical on every path and run --
// what exact unmerge needs. No BLAS: its blocking may reorder the sum.

namespace detail {

constexpr int kDeltaRows = 8;  // rows of b per register block: each load of a feeds 8 FMAs

// Scalar columns [k0, k1) of the rows; std::fma is the same correctly rounded operation as a lane of
// the vector FMA.
template <typename F>
inline void delta_cols_scalar(const F* a, int64_t K, const F* const* b, int r, F scale, F* const* out,
                              int64_t k0, int64_t k1) {
  for (int i = 0; i < kDeltaRows; ++i) {
    for (int64_t k = k0; k < k1; ++k) {
      F acc = b[i][0] * a[k];
      for (int j = 1; j < r; ++j) acc = std::fma(b[i][j], a[j * K + k], acc);
      out[i][k] = acc * scale;
    }
  }
}

// One register block: kDeltaRows rows x (2 vectors of columns), accumulators in registers.
#define LORACUDA_DELTA_KERNEL(NAME, TARGET, F, V, W, LOADU, STOREU, SET1, MUL, FMA)                            \
  __attribute__((target(TARGET))) inline void NAME(const F* a, int64_t K, const F* const* b, int r, F scale,  \
                                                   F* const* out) {                                           \
    const V vs = SET1(scale);                                                                                 \
    int64_t k = 0;                                                                                            \
    for (; k + 2 * (W) <= K; k += 2 * (W)) {                                                                  \
      V acc0[kDeltaRows], acc1[kDeltaRows];                                                                   \
      const V a0 = LOADU(a + k), a1 = LOADU(a + k + (W));                                                     \
      for (int i = 0; i < kDeltaRows; ++i) {                                                                  \
        const V bi = SET1(b[i][0]);                                                                           \
        acc0[i] = MUL(bi, a0);                                                                                \
        acc1[i] = MUL(bi, a1);                                                                                \
      }                                                                                                       \
      for (int j = 1; j < r; ++j) {                                                                           \
        const V aj0 = LOADU(a + j * K + k), aj1 = LOADU(a + j * K + k + (W));                                 \
        for (int i = 0; i < kDeltaRows; ++i) {                                                                \
          const V bi = SET1(b[i][j]);                                                                         \
          acc0[i] = FMA(bi, aj0, acc0[i]);                                                                    \
          acc1[i] = FMA(bi, aj1, acc1[i]);                                                                    \
        }                                                                                                     \
      }                                                                                                       \
      for (int i = 0; i < kDeltaRows; ++i) {                                                                  \
        STOREU(out[i] + k, MUL(acc0[i], vs));                                                                 \
        STOREU(out[i] + k + (W), MUL(acc1[i], vs));                                                           \
      }                                                                                                       \
    }                                                                                                         \
    delta_cols_scalar<F>(a, K, b, r, scale, out, k, K);                                                       \
  }

#ifdef LORACUDA_X86_DISPATCH
LORACUDA_DELTA_KERNEL(delta_block_avx512_f, "avx512f", float, __m512, 16, _mm512_loadu_ps, _mm512_storeu_ps,
                      _mm512_set1_ps, _mm512_mul_ps, _mm512_fmadd_ps)
LORACUDA_DELTA_KERNEL(delta_block_avx512_d, "avx512f", double, __m512d, 8, _mm512_loadu_pd, _mm512_storeu_pd,
                      _mm512_set1_pd, _mm512_mul_pd, _mm512_fmadd_pd)
LORACUDA_DELTA_KERNEL(delta_block_avx2_f, "avx2,fma", float, __m256, 8, _mm256_loadu_ps, _mm256_storeu_ps,
                      _mm256_set1_ps, _mm256_mul_ps, _mm256_fmadd_ps)
LORACUDA_DELTA_KERNEL(delta_block_avx2_d, "avx2,fma", double, __m256d, 4, _mm256_loadu_pd, _mm256_storeu_pd,
                      _mm256_set1_pd, _mm256_mul_pd, _mm256_fmadd_pd)
#endif
#undef LORACUDA_DELTA_KERNEL

}  // namespace detail

// delta rows [i0, i0 + rows) (rows <= 8) of scale * b @ a into out [rows, K] contiguous.
// `zero_b` is a row of r zeros (padding of a partial block); `spill` is a scratch row of K values.
template <typename F>
inline void delta_rows(const F* a, int64_t K, const F* b, int r, int64_t i0, int rows, F scale, F* out,
                       const F* zero_b, F* spill) {
  const F* bp[detail::kDeltaRows];
  F* op[detail::kDeltaRows];
  for (int i = 0; i < detail::kDeltaRows; ++i) {
    bp[i] = i < rows ? b + (i0 + i) * r : zero_b;
    op[i] = i < rows ? out + i * K : spill;
  }
#ifdef LORACUDA_X86_DISPATCH
  const detail::Isa isa = detail::isa();
  if constexpr (std::is_same_v<F, float>) {
    if (isa == detail::Isa::avx512) return detail::delta_block_avx512_f(a, K, bp, r, scale, op);
    if (isa == detail::Isa::avx2) return detail::delta_block_avx2_f(a, K, bp, r, scale, op);
  } else {
    if (isa == detail::Isa::avx512) return detail::delta_block_avx512_d(a, K, bp, r, scale, op);
    if (isa == detail::Isa::avx2) return detail::delta_block_avx2_d(a, K, bp, r, scale, op);
  }
#endif
  detail::delta_cols_scalar<F>(a, K, bp, r, scale, op, 0, K);
}

}  // namespace cpu
}  // namespace loracuda
