// CPU kernels of the merge family: merge_, restore_codes and unmerge_exact_.
//
// All three walk the contiguous weight in blocks of 8 rows and get the block's delta from the one
// micro-kernel of cpu/common.h (delta_rows: a fixed fused multiply-add chain over j, then * scale,
// in float32 -- float64 for float64 weights), so the three agree bit for bit and no full-size delta
// is allocated. A transposed weight (stored [K, N]) is the plain case of weight [K, N] with
// a' = lora_b^T [r, N] and b' = lora_a^T [K, r]: the products b[n, j] * a[j, k] are the same numbers
// in the same order over j, so one kernel serves both layouts.
//
// Per element (w in the weight's dtype T, d the delta, float(.) the widening to F):
//   merge_:          w1 = T(float(w) + d)                        one rounding
//   restore_codes:   w2 = T(float(w1) - d); code 0 if bits(w2) == bits(w), 1 if bits(w) == bits(w2) + 1,
//                    2 if bits(w) == bits(w2) - 1, else 3 (unsigned bit patterns, no wrap-around)
//   unmerge_exact_:  w = T(float(w) - d), then bits + 1 for code 1, bits - 1 for code 2
// Bit patterns, not float ==, decide, so -0 / +0 and NaN are exact.
#include <torch/library.h>

#include <array>

#include "checks.h"
#include "cpu/common.h"

namespace loracuda {
namespace cpu {
namespace {

enum class Mode { merge, codes, unmerge };

template <typename T>
using bits_t = std::conditional_t<sizeof(T) == 8, uint64_t, std::conditional_t<sizeof(T) == 4, uint32_t, uint16_t>>;

template <typename T>
inline bits_t<T> bits_of(T v) {
  bits_t<T> b;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}

template <typename T>
inline T from_bits(bits_t<T> b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}

// The restore code of one element (see the file comment).
template <typename T>
inline uint8_t restore_code(T w, acc_t<T> d) {
  const T w1 = from_acc<T>(to_acc(w) + d);
  const T w2 = from_acc<T>(to_acc(w1) - d);
  const bits_t<T> bw = bits_of(w), b2 = bits_of(w2);
  const bits_t<T> up = static_cast<bits_t<T>>(bw - b2), down = static_cast<bits_t<T>>(b2 - bw);
  // Selects rather than branches, so the loop over a row vectorises; bw > b2 excludes a wrap-around.
  const uint8_t code = (bw > b2 && up == 1) ? 1 : ((b2 > bw && down == 1) ? 2 : 3);
  return bw == b2 ? 0 : code;
}

inline void atomic_or_byte(uint8_t* p, uint8_t v) { __atomic_fetch_or(p, v, __ATOMIC_RELAXED); }

// Packs the codes c[0 .. n) of elements e0 .. e0+n into `codes` (element e: byte e / 4, bits 2 * (e % 4)).
// A byte shared with a neighbouring row, which another thread may be packing, is ORed in atomically;
// the bytes wholly inside this row are stored.
inline void pack_codes(const uint8_t* c, int64_t e0, int64_t n, uint8_t* codes) {
  int64_t k = 0;
  if (e0 & 3) {
    const int64_t head = std::min<int64_t>(n, 4 - (e0 & 3));
    uint8_t v = 0;
    for (int64_t t = 0; t < head; ++t) v |= static_cast<uint8_t>(c[t] << (2 * ((e0 + t) & 3)));
    atomic_or_byte(codes + (e0 >> 2), v);
    k = head;
  }
  for (; k + 4 <= n; k += 4) {  // (e0 + k) % 4 == 0 here
    codes[(e0 + k) >> 2] = static_cast<uint8_t>(c[k] | (c[k + 1] << 2) | (c[k + 2] << 4) | (c[k + 3] << 6));
  }
  if (k < n) {
    uint8_t v = 0;
    for (int64_t t = k; t < n; ++t) v |= static_cast<uint8_t>(c[t] << (2 * ((e0 + t) & 3)));
    atomic_or_byte(codes + ((e0 + k) >> 2), v);
  }
}

// The four 2-bit codes of a byte as four bytes, for unpacking a row four codes at a time.
using CodeQuad = std::array<uint8_t, 4>;
constexpr std::array<CodeQuad, 256> make_unpack_table() {
  std::array<CodeQuad, 256> t{};
  for (int b = 0; b < 256; ++b) {
    for (int q = 0; q < 4; ++q) t[b][q] = static_cast<uint8_t>((b >> (2 * q)) & 3);
  }
  return t;
}
constexpr std::array<CodeQuad, 256> kUnpack = make_unpack_table();

// c[k] = code of element e0 + k, for k < n.
inline void unpack_codes(const uint8_t* codes, int64_t e0, int64_t n, uint8_t* c) {
  int64_t k = 0;
  for (; k < n && ((e0 + k) & 3) != 0; ++k) c[k] = (codes[(e0 + k) >> 2] >> (2 * ((e0 + k) & 3))) & 3;
  for (; k + 4 <= n; k += 4) std::memcpy(c + k, kUnpack[codes[(e0 + k) >> 2]].data(), 4);
  for (; k < n; ++k) c[k] = (codes[(e0 + k) >> 2] >> (2 * ((e0 + k) & 3))) & 3;
}

// The element-wise part of each op on one row of n elements, given the row's delta d. Always inlined
// into the ISA clones below, which let the compiler vectorise it with AVX-512 / AVX2 lanes.
template <typename T>
__attribute__((always_inline)) inline void row_generic(Mode mode, T* w, const acc_t<T>* d, int64_t n,
                                                       uint8_t* c) {
  if (mode == Mode::merge) {
    for (int64_t k = 0; k < n; ++k) w[k] = from_acc<T>(to_acc(w[k]) + d[k]);
  } else if (mode == Mode::codes) {
    for (int64_t k = 0; k < n; ++k) c[k] = restore_code(w[k], d[k]);
  } else {
    for (int64_t k = 0; k < n; ++k) {
      const bits_t<T> bits = bits_of(from_acc<T>(to_acc(w[k]) - d[k]));
      w[k] = from_bits<T>(static_cast<bits_t<T>>(bits + (c[k] == 1) - (c[k] == 2)));
    }
  }
}

#ifdef LORACUDA_X86_DISPATCH
template <typename T>
__attribute__((target("avx512f,avx512bw,avx512vl"))) void row_avx512(Mode mode, T* w, const acc_t<T>* d, int64_t n,
                                                                      uint8_t* c) {
  row_generic<T>(mode, w, d, n, c);
}
template <typename T>
__attribute__((target("avx2"))) void row_avx2(Mode mode, T* w, const acc_t<T>* d, int64_t n, uint8_t* c) {
  row_generic<T>(mode, w, d, n, c);
}
#endif

template <typename T>
inline void row_op(Mode mode, T* w, const acc_t<T>* d, int64_t n, uint8_t* c) {
#ifdef LORACUDA_X86_DISPATCH
  switch (detail::isa()) {
    case detail::Isa::avx512: return row_avx512<T>(mode, w, d, n, c);
    case detail::Isa::avx2: return row_avx2<T>(mode, w, d, n, c);
    default: break;
  }
#endif
  row_generic<T>(mode, w, d, n, c);
}

template <typename T>
void merge_family(T* w, int64_t rows, int64_t cols, const Tensor& a, const Tensor& b, double scale, Mode mode,
                  uint8_t* codes) {
  using F = acc_t<T>;
  const F* ap = a.const_data_ptr<F>();  // [r, cols]
  const F* bp = b.const_data_ptr<F>();  // [rows, r]
  const int r = static_cast<int>(a.size(0));
  const F s = static_cast<F>(scale);
  constexpr int kRows = detail::kDeltaRows;
  const int64_t blocks = (rows + kRows - 1) / kRows;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<F> delta(static_cast<size_t>(kRows * cols)), spill(static_cast<size_t>(cols));
    std::vector<F> zero_b(static_cast<size_t>(r), F(0));
    std::vector<uint8_t> c(mode == Mode::merge ? 0 : static_cast<size_t>(cols));
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t i0 = blk * kRows;
      const int nb = static_cast<int>(std::min<int64_t>(kRows, rows - i0));
      // Prefetch this block's weight rows: the delta arithmetic hides their DRAM latency.
      detail::Prefetch pf;
      pf.elem_bytes = sizeof(T);
      for (int i = 0; i < kRows; ++i) {
        pf.rows[i] = reinterpret_cast<const char*>(w + (i0 + std::min(i, nb - 1)) * cols);
      }
      delta_rows<F>(ap, cols, bp, r, i0, nb, s, delta.data(), zero_b.data(), spill.data(), pf);
      for (int i = 0; i < nb; ++i) {
        const int64_t e0 = (i0 + i) * cols;
        if (mode == Mode::unmerge) unpack_codes(codes, e0, cols, c.data());
        row_op<T>(mode, w + e0, delta.data() + i * cols, cols, c.data());
        if (mode == Mode::codes) pack_codes(c.data(), e0, cols, codes);
      }
    }
  });
}

// Runs one op of the family on a checked, contiguous weight. `codes`: output of restore_codes
// (zero-initialised) or input of unmerge_exact_; null for merge_.
void run(const Tensor& weight, const Tensor& lora_a, const Tensor& lora_b, double scale, bool transposed, Mode mode,
         uint8_t* codes) {
  if (weight.numel() == 0) return;
  // The ATen calls below are this kernel's internals: keep them out of autograd (the op's formula
  // is registered separately) even when the op is reached by a redispatch without a guard.
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::ScalarType acc = accumulate_dtype(weight.scalar_type());
  // a [r, cols] and b [rows, r] of the stored layout [rows, cols] (see the file comment).
  const Tensor a = transposed ? adapter_as(lora_b.t(), acc) : adapter_as(lora_a, acc);
  const Tensor b = transposed ? adapter_as(lora_a.t(), acc) : adapter_as(lora_b, acc);
  const int64_t rows = weight.size(0), cols = weight.size(1);
  dispatch_value_type(weight.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    merge_family<T>(const_cast<T*>(weight.const_data_ptr<T>()), rows, cols, a, b, scale, mode, codes);
  });
}

void merge_(Tensor& weight, const Tensor& lora_a, const Tensor& lora_b, double scale, bool transposed) {
  check_merge_args(weight, lora_a, lora_b, scale, transposed, "merge_");
  run(weight, lora_a, lora_b, scale, transposed, Mode::merge, nullptr);
}

Tensor restore_codes(const Tensor& weight, const Tensor& lora_a, const Tensor& lora_b, double scale,
                     bool transposed) {
  check_merge_args(weight, lora_a, lora_b, scale, transposed, "restore_codes");
  Tensor codes = at::zeros({restore_code_bytes(weight.numel())}, weight.options().dtype(at::kByte));
  run(weight, lora_a, lora_b, scale, transposed, Mode::codes, codes.data_ptr<uint8_t>());
  return codes;
}

void unmerge_exact_(Tensor& weight, const Tensor& lora_a, const Tensor& lora_b, double scale, bool transposed,
                    const Tensor& codes) {
  const char* op = "unmerge_exact_";
  check_merge_args(weight, lora_a, lora_b, scale, transposed, op);
  check_restore_codes(weight, codes, op);
  run(weight, lora_a, lora_b, scale, transposed, Mode::unmerge, const_cast<uint8_t*>(codes.const_data_ptr<uint8_t>()));
}

}  // namespace

TORCH_LIBRARY_IMPL(loracuda, CPU, m) {
  m.impl("merge_", &merge_);
  m.impl("restore_codes", &restore_codes);
  m.impl("unmerge_exact_", &unmerge_exact_);
}

}  // namespace cpu
}  // namespace loracuda
