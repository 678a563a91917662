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
#include <cstdlib>
#include <cstring>
#include <optional>
#include <type_traits>
#include <utility>
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

// bf16 by its bits: the same values as c10::BFloat16's conversions (widening is exact; narrowing
// rounds to nearest even, NaN -> 0x7FC0), written without branches so that row loops vectorise.
template <>
inline float to_acc<c10::BFloat16>(c10::BFloat16 v) {
  const uint32_t u = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

template <>
inline c10::BFloat16 from_acc<c10::BFloat16>(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  const uint32_t rounded = (u + UINT32_C(0x7FFF) + ((u >> 16) & 1)) >> 16;
  const uint16_t bits = f != f ? UINT16_C(0x7FC0) : static_cast<uint16_t>(rounded);
  return c10::BFloat16(bits, c10::BFloat16::from_bits());
}

// Calls fn(T{}) with T the C++ type of a kernel value dtype (fn is a generic lambda over T).
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

// Calls fn(std::integral_constant<int, nr>{}) for a run-time row count 1 <= nr <= kMax, so that a
// register-blocked loop can be instantiated for exactly the rows of a tail group (padding rows would
// multiply their values by zero, and inf * 0 is NaN).
template <int kMax, typename Fn>
inline void with_row_count(int nr, Fn&& fn) {
  if constexpr (kMax > 0) {
    if (nr == kMax) return fn(std::integral_constant<int, kMax>{});
    return with_row_count<kMax - 1>(nr, std::forward<Fn>(fn));
  }
}

// A reduction over M (grad_a, grad_b) is summed per fixed chunk of rows, then the chunk partials in
// order, so the result depends only on the shapes, never on the thread count. The partials
// ([chunks, partial_elems] of elem_bytes each) are capped at about 64 MiB and 64 chunks.
inline int64_t reduction_chunk_rows(int64_t m, int64_t block, int64_t partial_elems, int64_t elem_bytes) {
  const int64_t budget = int64_t{64} << 20;
  const int64_t max_chunks = std::clamp<int64_t>(budget / std::max<int64_t>(1, partial_elems * elem_bytes), 2, 64);
  const int64_t min_rows = std::max<int64_t>(block, 256);
  const int64_t rows = std::max<int64_t>(min_rows, (m + max_chunks - 1) / max_chunks);
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

// The widest path the CPU supports, lowered by the environment variable LORACUDA_CPU_ISA=generic or
// avx2 (read once, at the first kernel call), so that tests can compare the paths' results on one
// machine; other values, or a path the CPU lacks, leave the choice to the CPU.
inline Isa detect_isa() {
  Isa best = Isa::generic;
#ifdef LORACUDA_X86_DISPATCH
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl")) {
    best = Isa::avx512;
  } else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    best = Isa::avx2;
  }
#endif
  const char* limit = std::getenv("LORACUDA_CPU_ISA");
  if (limit != nullptr && std::strcmp(limit, "generic") == 0) return Isa::generic;
  if (limit != nullptr && std::strcmp(limit, "avx2") == 0 && best == Isa::avx512) return Isa::avx2;
  return best;
}

inline Isa isa() {
  static const Isa value = detect_isa();
  return value;
}

}  // namespace detail

// Splits the n flat indices starting at `start` into segments within which the index's high 32-bit
// word is constant (the segment kernels hash the low word as a running uint32), calling
// fn(lo, hi, offset, seg) for each: offset is the segment's position among the n elements.
template <typename Fn>
inline void for_each_index_segment(uint64_t start, int64_t n, Fn&& fn) {
  int64_t offset = 0;
  while (offset < n) {
    const uint32_t lo = static_cast<uint32_t>(start);
    const uint32_t hi = static_cast<uint32_t>(start >> 32);
    const int64_t seg = std::min<int64_t>(n - offset, static_cast<int64_t>((uint64_t{1} << 32) - lo));
    fn(lo, hi, offset, seg);
    start += static_cast<uint64_t>(seg);
    offset += seg;
  }
}

// keep[k] for the n elements starting at the logical flat index `start` (= m * K + k0).
inline void dropout_keep_row(const Dropout& d, uint64_t start, int64_t n, uint8_t* keep) {
  for_each_index_segment(start, n, [&](uint32_t lo, uint32_t hi, int64_t offset, int64_t seg) {
    uint8_t* out = keep + offset;
#ifdef LORACUDA_X86_DISPATCH
    switch (detail::isa()) {
      case detail::Isa::avx512: detail::keep_segment_avx512(d.key, d.threshold, lo, hi, seg, out); break;
      case detail::Isa::avx2: detail::keep_segment_avx2(d.key, d.threshold, lo, hi, seg, out); break;
      default: detail::keep_segment_generic(d.key, d.threshold, lo, hi, seg, out);
    }
#else
    detail::keep_segment_generic(d.key, d.threshold, lo, hi, seg, out);
#endif
  });
}

namespace detail {

template <typename A>
using mask_t = std::conditional_t<sizeof(A) == 8, uint64_t, uint32_t>;

// v where keep != 0, +0 elsewhere, by a bit mask: exact for any v (inf and NaN included, unlike
// v * 0) and branch-free, so the loops below vectorise.
template <typename A>
__attribute__((always_inline)) inline A kept(uint8_t keep, A v) {
  mask_t<A> bits;
  std::memcpy(&bits, &v, sizeof(A));
  bits &= mask_t<A>(0) - static_cast<mask_t<A>>(keep != 0);
  std::memcpy(&v, &bits, sizeof(A));
  return v;
}

// accumulate == false: row[k] = kept(row[k] * ks); true: row[k] += kept(src[k] * ks).
template <typename A>
__attribute__((always_inline)) inline void keep_rows_generic(const uint8_t* keep, A ks, int64_t n, const A* src,
                                                             A* row, bool accumulate) {
  if (accumulate) {
    for (int64_t k = 0; k < n; ++k) row[k] += kept(keep[k], src[k] * ks);
  } else {
    for (int64_t k = 0; k < n; ++k) row[k] = kept(keep[k], row[k] * ks);
  }
}

#ifdef LORACUDA_X86_DISPATCH
template <typename A>
__attribute__((target("avx512f,avx512bw,avx512vl"))) void keep_rows_avx512(const uint8_t* keep, A ks, int64_t n,
                                                                            const A* src, A* row, bool accumulate) {
  keep_rows_generic<A>(keep, ks, n, src, row, accumulate);
}
template <typename A>
__attribute__((target("avx2"))) void keep_rows_avx2(const uint8_t* keep, A ks, int64_t n, const A* src, A* row,
                                                    bool accumulate) {
  keep_rows_generic<A>(keep, ks, n, src, row, accumulate);
}
#endif

template <typename A>
inline void keep_rows(const uint8_t* keep, A ks, int64_t n, const A* src, A* row, bool accumulate) {
#ifdef LORACUDA_X86_DISPATCH
  switch (isa()) {
    case Isa::avx512: return keep_rows_avx512<A>(keep, ks, n, src, row, accumulate);
    case Isa::avx2: return keep_rows_avx2<A>(keep, ks, n, src, row, accumulate);
    default: break;
  }
#endif
  keep_rows_generic<A>(keep, ks, n, src, row, accumulate);
}

}  // namespace detail

// row[k] = keep[k] ? row[k] * keep_scale : 0, in the accumulation type (for float64 values the
// float32 keep_scale is widened, as the reference multiplies a float64 x by it).
template <typename A>
inline void apply_keep(const uint8_t* keep, float keep_scale, int64_t n, A* row) {
  detail::keep_rows<A>(keep, static_cast<A>(keep_scale), n, nullptr, row, false);
}

// row[k] += keep[k] ? src[k] * keep_scale : 0.
template <typename A>
inline void add_kept(const uint8_t* keep, float keep_scale, int64_t n, const A* src, A* row) {
  detail::keep_rows<A>(keep, static_cast<A>(keep_scale), n, src, row, true);
}

namespace detail {

// The fused dropout load of a unit-stride row segment: dst[i] = kept(keep_i, float(src[i]) * ks),
// keep_i from the hash of element (lo + i, hi); keep_i stored too when `keep` is not null. One pass,
// uint32 arithmetic and bit masks only, so it vectorises.
template <typename T>
__attribute__((always_inline)) inline void dropped_segment_generic(const T* src, int64_t n, DropoutKey key,
                                                                   uint32_t threshold, uint32_t lo, uint32_t hi,
                                                                   acc_t<T> ks, acc_t<T>* dst, uint8_t* keep) {
  const uint32_t hi_key = hi + key.hi;
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t first = mix32(lo + static_cast<uint32_t>(i) + key.lo);
    const uint8_t kp = static_cast<uint8_t>((mix32(first ^ hi_key) >> 8) >= threshold);
    if (keep != nullptr) keep[i] = kp;
    dst[i] = kept(kp, to_acc(src[i]) * ks);
  }
}

#ifdef LORACUDA_X86_DISPATCH
template <typename T>
__attribute__((target("avx512f,avx512bw,avx512vl"))) void dropped_segment_avx512(
    const T* src, int64_t n, DropoutKey key, uint32_t threshold, uint32_t lo, uint32_t hi, acc_t<T> ks,
    acc_t<T>* dst, uint8_t* keep) {
  if (keep != nullptr) return dropped_segment_generic<T>(src, n, key, threshold, lo, hi, ks, dst, keep);
  dropped_segment_generic<T>(src, n, key, threshold, lo, hi, ks, dst, nullptr);
}
template <typename T>
__attribute__((target("avx2"))) void dropped_segment_avx2(const T* src, int64_t n, DropoutKey key, uint32_t threshold,
                                                          uint32_t lo, uint32_t hi, acc_t<T> ks, acc_t<T>* dst,
                                                          uint8_t* keep) {
  if (keep != nullptr) return dropped_segment_generic<T>(src, n, key, threshold, lo, hi, ks, dst, keep);
  dropped_segment_generic<T>(src, n, key, threshold, lo, hi, ks, dst, nullptr);
}
#endif

}  // namespace detail

// dst[k] = mask * float(src[k]) * keep_scale for the n elements of a row starting at the logical flat
// index `start` (= m * K); src has column stride cs. keep (optional) receives the mask.
template <typename T>
inline void load_dropped_row(const Dropout& d, uint64_t start, const T* src, int64_t cs, int64_t n, acc_t<T>* dst,
                             uint8_t* keep) {
  using A = acc_t<T>;
  const A ks = static_cast<A>(d.keep_scale);
  if (cs != 1) {  // gather first, then mask
    std::vector<uint8_t> local(keep == nullptr ? static_cast<size_t>(n) : 0);
    uint8_t* kp = keep != nullptr ? keep : local.data();
    load_row(src, cs, n, dst);
    dropout_keep_row(d, start, n, kp);
    apply_keep(kp, d.keep_scale, n, dst);
    return;
  }
  for_each_index_segment(start, n, [&](uint32_t lo, uint32_t hi, int64_t offset, int64_t seg) {
    const T* in = src + offset;
    A* out = dst + offset;
    uint8_t* kp = keep != nullptr ? keep + offset : nullptr;
#ifdef LORACUDA_X86_DISPATCH
    switch (detail::isa()) {
      case detail::Isa::avx512:
        detail::dropped_segment_avx512<T>(in, seg, d.key, d.threshold, lo, hi, ks, out, kp);
        break;
      case detail::Isa::avx2:
        detail::dropped_segment_avx2<T>(in, seg, d.key, d.threshold, lo, hi, ks, out, kp);
        break;
      default: detail::dropped_segment_generic<T>(in, seg, d.key, d.threshold, lo, hi, ks, out, kp);
    }
#else
    detail::dropped_segment_generic<T>(in, seg, d.key, d.threshold, lo, hi, ks, out, kp);
#endif
  });
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

// Rows of memory (the weight rows the caller works on next) to pull into L2 while the delta
// arithmetic runs, so that the compute of one block overlaps the DRAM traffic of the next.
// rows[i] == nullptr: nothing to prefetch. Column units are elements of `elem_bytes` bytes.
struct Prefetch {
  const char* rows[kDeltaRows] = {};
  int64_t elem_bytes = 0;
  inline void lines(int64_t k, int64_t cols) const {
#ifdef LORACUDA_X86_DISPATCH
    if (rows[0] == nullptr) return;
    for (int64_t byte = k * elem_bytes; byte < (k + cols) * elem_bytes; byte += 64) {
      for (int i = 0; i < kDeltaRows; ++i) _mm_prefetch(rows[i] + byte, _MM_HINT_T1);
    }
#else
    (void)k;
    (void)cols;
#endif
  }
};

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
                                                   F* const* out, const Prefetch& pf) {                       \
    const V vs = SET1(scale);                                                                                 \
    int64_t k = 0;                                                                                            \
    for (; k + 2 * (W) <= K; k += 2 * (W)) {                                                                  \
      pf.lines(k, 2 * (W));                                                                                   \
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
// `zero_b` is a row of r zeros (padding of a partial block); `spill` is a scratch row of K values;
// `pf` names memory to prefetch meanwhile (no effect on the values).
template <typename F>
inline void delta_rows(const F* a, int64_t K, const F* b, int r, int64_t i0, int rows, F scale, F* out,
                       const F* zero_b, F* spill, const detail::Prefetch& pf = {}) {
  const F* bp[detail::kDeltaRows];
  F* op[detail::kDeltaRows];
  for (int i = 0; i < detail::kDeltaRows; ++i) {
    bp[i] = i < rows ? b + (i0 + i) * r : zero_b;
    op[i] = i < rows ? out + i * K : spill;
  }
#ifdef LORACUDA_X86_DISPATCH
  const detail::Isa isa = detail::isa();
  if constexpr (std::is_same_v<F, float>) {
    if (isa == detail::Isa::avx512) return detail::delta_block_avx512_f(a, K, bp, r, scale, op, pf);
    if (isa == detail::Isa::avx2) return detail::delta_block_avx2_f(a, K, bp, r, scale, op, pf);
  } else {
    if (isa == detail::Isa::avx512) return detail::delta_block_avx512_d(a, K, bp, r, scale, op, pf);
    if (isa == detail::Isa::avx2) return detail::delta_block_avx2_d(a, K, bp, r, scale, op, pf);
  }
#endif
  detail::delta_cols_scalar<F>(a, K, bp, r, scale, op, 0, K);
}

}  // namespace cpu
}  // namespace loracuda
