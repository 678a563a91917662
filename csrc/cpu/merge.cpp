// CPU kernels of the merge family: merge_, restore_codes, merge_exact_ and unmerge_exact_.
//
// All of them walk the contiguous weight in blocks of 8 rows and get the block's delta from the one
// micro-kernel of cpu/common.h (delta_rows: a fixed fused multiply-add chain over j, then * scale,
// in float32 -- float64 for float64 weights), so the three agree bit for bit and no full-size delta
// is allocated. On AVX-512 CPUs, whole blocks of float32 / bf16 / fp16 rows of a multiple of 4
// elements take cpu/merge_fused.h instead: the same chain, with the element-wise part done while the
// delta is in registers (same values; tests/test_merge_paths.py compares the paths). A transposed weight (stored [K, N]) is the plain case of weight [K, N] with
// a' = lora_b^T [r, N] and b' = lora_a^T [K, r]: the products b[n, j] * a[j, k] are the same numbers
// in the same order over j, so one kernel serves both layouts.
//
// Per element (w in the weight's dtype T, d the delta, float(.) the widening to F):
//   merge_:          w1 = T(float(w) + d)                        one rounding
//   restore_codes:   w2 = T(float(w1) - d); code 0 if bits(w2) == bits(w), 1 if bits(w) == bits(w2) + 1,
//                    2 if bits(w) == bits(w2) - 1, else 3 (unsigned bit patterns, no wrap-around)
//   unmerge_exact_:  w = T(float(w) - d), then bits + 1 for code 1, bits - 1 for code 2 (code 3: the
//                    caller's saved value, written by the op itself when escape_values is given)
//   merge_exact_:    restore_codes and merge_ in one pass, plus the original values of the code-3
//                    ("escape") elements in flat-index order
// Bit patterns, not float ==, decide, so -0 / +0 and NaN are exact.
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>
#include <utility>

#include "checks.h"
#include "cpu/common.h"
#include "cpu/merge_fused.h"

namespace loracuda {
namespace cpu {
namespace {

// exact: merge_exact_ (codes and merge in one sweep of each row).
using Mode = MergeMode;

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
  // (e0 + k) % 4 == 0 here. Four codes as one little-endian word x (code q in bits 8q, 8q + 1): the low
  // byte of x | x >> 6 | x >> 12 | x >> 18 holds code q in bits 2q, 2q + 1 -- shifts and ORs on whole
  // words, which the compiler vectorises.
  uint8_t* out = codes + ((e0 + k) >> 2);
  const int64_t words = (n - k) >> 2;
  const uint8_t* src = c + k;
  for (int64_t q = 0; q < words; ++q) {
    uint32_t x;
    std::memcpy(&x, src + 4 * q, 4);
    out[q] = static_cast<uint8_t>(x | (x >> 6) | (x >> 12) | (x >> 18));
  }
  k += 4 * words;
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

// Escapes (code-3 elements) among c[0 .. n), each code one byte of 0..3, tested by words: a byte is
// 3 iff its bits 0 and 1 are both set, so x & (x >> 1) & 0x01.. is non-zero iff one of a word's eight
// bytes is (bit 0 of the next byte, shifted into bit 7, is masked away).
constexpr uint64_t kLowBits = UINT64_C(0x0101010101010101);

// Bit t set iff c[t] == 3, for the 32 codes c[0 .. 32): per word, y = x & (x >> 1) & 0x01.. keeps bit 0
// of each escape's byte, and the multiply gathers those eight bits into the top byte, in order.
inline uint32_t escape_mask32(const uint8_t* c) {
  uint32_t mask = 0;
  for (int q = 0; q < 4; ++q) {
    uint64_t x;
    std::memcpy(&x, c + 8 * q, 8);
    const uint64_t y = x & (x >> 1) & kLowBits;
    mask |= static_cast<uint32_t>((y * UINT64_C(0x0102040810204080)) >> 56) << (8 * q);
  }
  return mask;
}

// Appends w[k] for every k with c[k] == 3, in increasing k: 32 codes per mask, then one step per
// escape (rows without escapes, the usual case, cost a few instructions per 32 elements).
template <typename T>
inline void collect_escapes(const uint8_t* c, const T* w, int64_t n, std::vector<T>& out) {
  int64_t k = 0;
  for (; k + 32 <= n; k += 32) {
    for (uint32_t m = escape_mask32(c + k); m != 0; m &= m - 1) out.push_back(w[k + __builtin_ctz(m)]);
  }
  for (; k < n; ++k) {
    if (c[k] == 3) out.push_back(w[k]);
  }
}

// Writes values[next], values[next + 1], ... into w[k] for every k with c[k] == 3, in increasing k;
// returns the index after the last one used. Visits the escapes as collect_escapes does.
template <typename T>
inline int64_t patch_escapes(const uint8_t* c, T* w, int64_t n, const T* values, int64_t next) {
  int64_t k = 0;
  for (; k + 32 <= n; k += 32) {
    for (uint32_t m = escape_mask32(c + k); m != 0; m &= m - 1) w[k + __builtin_ctz(m)] = values[next++];
  }
  for (; k < n; ++k) {
    if (c[k] == 3) w[k] = values[next++];
  }
  return next;
}

// Number of code-3 elements among elements e0 .. e0+n of packed codes: the partial bytes at either
// end code by code, whole 8-byte words by a popcount, the remaining whole bytes by a table of the
// number of 3s among a byte's codes (__builtin_popcount only in a popcnt clone: without the
// instruction it is a library call).
constexpr std::array<uint8_t, 256> make_escape_count_table() {
  std::array<uint8_t, 256> t{};
  for (int b = 0; b < 256; ++b) {
    for (int q = 0; q < 4; ++q) t[b] = static_cast<uint8_t>(t[b] + (((b >> (2 * q)) & 3) == 3));
  }
  return t;
}
constexpr std::array<uint8_t, 256> kEscapesInByte = make_escape_count_table();

// kPopcnt: whole words counted by the popcnt instruction (the clone below), else by a SWAR popcount.
// No branch on a word's count: with escapes in a fair share of words it would be mispredicted often.
template <bool kPopcnt>
__attribute__((always_inline)) inline int64_t count_escapes_impl(const uint8_t* codes, int64_t e0, int64_t n) {
  auto code_at = [&](int64_t e) { return (codes[e >> 2] >> (2 * (e & 3))) & 3; };
  int64_t count = 0, k = 0;
  for (; k < n && ((e0 + k) & 3) != 0; ++k) count += code_at(e0 + k) == 3;
  // Whole 8-byte words (32 elements): bit 2q of h is set iff element q has code 3 (h has only even
  // bits, so the first step of the SWAR pairwise sum is a no-op).
  for (; k + 32 <= n; k += 32) {
    uint64_t x;
    std::memcpy(&x, codes + ((e0 + k) >> 2), 8);
    uint64_t h = x & (x >> 1) & UINT64_C(0x5555555555555555);
    if constexpr (kPopcnt) {
      count += __builtin_popcountll(h);
    } else {
      h = (h & UINT64_C(0x3333333333333333)) + ((h >> 2) & UINT64_C(0x3333333333333333));
      h = (h + (h >> 4)) & UINT64_C(0x0F0F0F0F0F0F0F0F);
      count += static_cast<int64_t>((h * kLowBits) >> 56);
    }
  }
  for (; k + 4 <= n; k += 4) count += kEscapesInByte[codes[(e0 + k) >> 2]];
  for (; k < n; ++k) count += code_at(e0 + k) == 3;
  return count;
}

#ifdef LORACUDA_X86_DISPATCH
__attribute__((target("popcnt"))) int64_t count_escapes_popcnt(const uint8_t* codes, int64_t e0, int64_t n) {
  return count_escapes_impl<true>(codes, e0, n);
}
#endif

inline int64_t count_escapes(const uint8_t* codes, int64_t e0, int64_t n) {
#ifdef LORACUDA_X86_DISPATCH
  static const bool popcnt = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("popcnt") != 0;
  }();
  if (popcnt) return count_escapes_popcnt(codes, e0, n);
#endif
  return count_escapes_impl<false>(codes, e0, n);
}

// The element-wise part of each op on one row of n elements, given the row's delta d. Always inlined
// into the ISA clones below, which let the compiler vectorise it with AVX-512 / AVX2 lanes.
// Mode::exact (merge_exact_) fuses codes and merge: c[k] = the code, saved[k] = the original w[k]
// (for the caller to collect the escapes from), w[k] = the merged value; `saved` is used only there.
template <typename T>
__attribute__((always_inline)) inline void row_generic(Mode mode, T* w, const acc_t<T>* d, int64_t n, uint8_t* c,
                                                       T* saved) {
  if (mode == Mode::merge) {
    for (int64_t k = 0; k < n; ++k) w[k] = from_acc<T>(to_acc(w[k]) + d[k]);
  } else if (mode == Mode::codes) {
    for (int64_t k = 0; k < n; ++k) c[k] = restore_code(w[k], d[k]);
  } else if (mode == Mode::exact) {
    for (int64_t k = 0; k < n; ++k) {
      const T w0 = w[k];
      saved[k] = w0;
      c[k] = restore_code(w0, d[k]);
      w[k] = from_acc<T>(to_acc(w0) + d[k]);  // the same expression as merge_ and restore_code's w1
    }
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
                                                                      uint8_t* c, T* saved) {
  row_generic<T>(mode, w, d, n, c, saved);
}
template <typename T>
__attribute__((target("avx2"))) void row_avx2(Mode mode, T* w, const acc_t<T>* d, int64_t n, uint8_t* c, T* saved) {
  row_generic<T>(mode, w, d, n, c, saved);
}
#endif

template <typename T>
inline void row_op(Mode mode, T* w, const acc_t<T>* d, int64_t n, uint8_t* c, T* saved = nullptr) {
#ifdef LORACUDA_X86_DISPATCH
  switch (detail::isa()) {
    case detail::Isa::avx512: return row_avx512<T>(mode, w, d, n, c, saved);
    case detail::Isa::avx2: return row_avx2<T>(mode, w, d, n, c, saved);
    default: break;
  }
#endif
  row_generic<T>(mode, w, d, n, c, saved);
}

// Escape handling of one call, per block of kRows rows (block blk: rows blk * kRows ..):
//   collect (merge_exact_): collect[blk] receives the block's original code-3 values, in flat order;
//   patch (unmerge_exact_ with values): block blk writes patch[patch_offset[blk]], ... into its
//   code-3 elements, in flat order (patch_offset: [blocks + 1], the last entry the total).
template <typename T>
struct Escapes {
  std::vector<std::vector<T>>* collect = nullptr;
  const T* patch = nullptr;
  const int64_t* patch_offset = nullptr;
};

template <typename T>
void merge_family(T* w, int64_t rows, int64_t cols, const Tensor& a, const Tensor& b, double scale, Mode mode,
                  uint8_t* codes, const Escapes<T>& esc = {}) {
  using F = acc_t<T>;
  const F* ap = a.const_data_ptr<F>();  // [r, cols]
  const F* bp = b.const_data_ptr<F>();  // [rows, r]
  const int r = static_cast<int>(a.size(0));
  const F s = static_cast<F>(scale);
  constexpr int kRows = detail::kDeltaRows;
  const int64_t blocks = (rows + kRows - 1) / kRows;
  // Whole blocks take the fused AVX-512 path where it applies (cpu/merge_fused.h: the same values).
  const bool fused_path = fused::usable<T>(cols);
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    // The generic path's buffers, allocated only if a block of this range takes it.
    std::vector<F> delta, spill, zero_b;
    std::vector<uint8_t> c;
    std::vector<T> saved;
    std::vector<T> row_escapes;  // the fused path's escapes of a block's rows, cols + 1 each
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t i0 = blk * kRows;
      const int nb = static_cast<int>(std::min<int64_t>(kRows, rows - i0));
      if constexpr (!std::is_same_v<T, double>) {
        if (fused_path && nb == kRows) {
          if (mode == Mode::exact && row_escapes.empty()) row_escapes.resize(static_cast<size_t>(kRows * (cols + 1)));
          fused::Block<T> fb;
          const F* brows[kRows];
          for (int i = 0; i < kRows; ++i) {
            const int64_t e0 = (i0 + i) * cols;  // a multiple of 4: the row's codes start on a byte
            fb.w[i] = w + e0;
            fb.codes[i] = codes != nullptr ? codes + e0 / 4 : nullptr;
            fb.escapes[i] = mode == Mode::exact ? row_escapes.data() + i * (cols + 1) : nullptr;
            fb.escape_count[i] = 0;
            fb.patch[i] = nullptr;
            brows[i] = bp + (i0 + i) * r;
          }
          if (esc.patch != nullptr) {  // where each row's escape values start
            int64_t next = esc.patch_offset[blk];
            for (int i = 0; i < kRows; ++i) {
              fb.patch[i] = esc.patch + next;
              next += count_escapes(codes, (i0 + i) * cols, cols);
            }
          }
          fused::block<T>(mode, ap, cols, brows, r, s, fb);
          if (mode == Mode::exact) {
            std::vector<T>& list = (*esc.collect)[blk];
            for (int i = 0; i < kRows; ++i) list.insert(list.end(), fb.escapes[i], fb.escapes[i] + fb.escape_count[i]);
          }
          continue;
        }
      }
      if (delta.empty()) {
        delta.resize(static_cast<size_t>(kRows * cols));
        spill.resize(static_cast<size_t>(cols));
        zero_b.assign(static_cast<size_t>(r), F(0));
        c.resize(mode == Mode::merge ? 0 : static_cast<size_t>(cols));
        saved.resize(mode == Mode::exact ? static_cast<size_t>(cols) : 0);
      }
      // Prefetch this block's weight rows: the delta arithmetic hides their DRAM latency.
      detail::Prefetch pf;
      pf.elem_bytes = sizeof(T);
      for (int i = 0; i < kRows; ++i) {
        pf.rows[i] = reinterpret_cast<const char*>(w + (i0 + std::min(i, nb - 1)) * cols);
      }
      delta_rows<F>(ap, cols, bp, r, i0, nb, s, delta.data(), zero_b.data(), spill.data(), pf);
      int64_t next = esc.patch != nullptr ? esc.patch_offset[blk] : 0;
      for (int i = 0; i < nb; ++i) {
        const int64_t e0 = (i0 + i) * cols;
        const F* d = delta.data() + i * cols;
        if (mode == Mode::unmerge) unpack_codes(codes, e0, cols, c.data());
        row_op<T>(mode, w + e0, d, cols, c.data(), saved.data());
        // The escapes from the row's saved originals (in L1): one read and one write of the weight.
        if (mode == Mode::exact) collect_escapes<T>(c.data(), saved.data(), cols, (*esc.collect)[blk]);
        if (mode == Mode::codes || mode == Mode::exact) pack_codes(c.data(), e0, cols, codes);
        if (esc.patch != nullptr) next = patch_escapes<T>(c.data(), w + e0, cols, esc.patch, next);
      }
    }
  });
}

// The adapter factors as the kernel reads them: a [r, cols] and b [rows, r] of the stored layout
// [rows, cols] (see the file comment), in the accumulation dtype.
std::pair<Tensor, Tensor> kernel_factors(const Tensor& weight, const Tensor& lora_a, const Tensor& lora_b,
                                         bool transposed) {
  const at::ScalarType acc = accumulate_dtype(weight.scalar_type());
  if (transposed) return {adapter_as(lora_b.t(), acc), adapter_as(lora_a.t(), acc)};
  return {adapter_as(lora_a, acc), adapter_as(lora_b, acc)};
}

// Runs one op of the family on a checked, contiguous, non-empty weight of element type T. `codes`:
// output of restore_codes / merge_exact_ (zero-initialised) or input of unmerge_exact_; null for merge_.
template <typename T>
void run_typed(const Tensor& weight, const Tensor& lora_a, const Tensor& lora_b, double scale, bool transposed,
               Mode mode, uint8_t* codes, const Escapes<T>& escapes) {
  // The ATen calls below are this kernel's internals: keep them out of autograd (the op's formula
  // is registered separately) even when the op is reached by a redispatch without a guard.
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const auto [a, b] = kernel_factors(weight, lora_a, lora_b, transposed);
  merge_family<T>(const_cast<T*>(weight.const_data_ptr<T>()), weight.size(0), weight.size(1), a, b, scale, mode, codes,
                  escapes);
}

// The same without escape handling, for any weight dtype (empty weights included).
void run(const Tensor& weight, const Tensor& lora_a, const Tensor& lora_b, double scale, bool transposed, Mode mode,
         uint8_t* codes) {
  if (weight.numel() == 0) return;
  dispatch_value_type(weight.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    run_typed<T>(weight, lora_a, lora_b, scale, transposed, mode, codes, Escapes<T>{});
  });
}

int64_t row_blocks(const Tensor& weight) { return (weight.size(0) + detail::kDeltaRows - 1) / detail::kDeltaRows; }

// Escapes per block of kRows rows counted from the codes, as exclusive offsets [blocks + 1] (the
// last entry is the total). Each block counts its own elements, so the count splits across threads.
// Counting the escapes of fewer than kSerialPassElems elements (a pass over at most 2 MiB of codes,
// tens of microseconds) is cheaper on the calling thread than in a parallel region, whose start can
// cost far more on a busy machine: such a pass gets a grain of all its blocks, so at::parallel_for
// runs it inline.
constexpr int64_t kSerialPassElems = int64_t{1} << 23;

inline int64_t serial_grain(int64_t blocks, int64_t elems) { return elems < kSerialPassElems ? std::max<int64_t>(1, blocks) : 1; }

std::vector<int64_t> escape_offsets(const Tensor& weight, const uint8_t* codes) {
  const int64_t blocks = row_blocks(weight), cols = weight.size(1), rows = weight.size(0);
  std::vector<int64_t> offsets(static_cast<size_t>(blocks + 1), 0);
  at::parallel_for(0, blocks, serial_grain(blocks, weight.numel()), [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t r0 = blk * detail::kDeltaRows, r1 = std::min<int64_t>(rows, r0 + detail::kDeltaRows);
      offsets[blk + 1] = count_escapes(codes, r0 * cols, (r1 - r0) * cols);
    }
  });
  for (int64_t blk = 0; blk < blocks; ++blk) offsets[blk + 1] += offsets[blk];
  return offsets;
}

void merge_(Tensor& weight, const Tensor& lora_a, const Tensor& lora_b, double scale, bool transposed) {
  check_merge_args(weight, lora_a, lora_b, scale, transposed, "merge_");
  check_merge_written(weight, lora_a, lora_b, nullptr, nullptr, "merge_");
  run(weight, lora_a, lora_b, scale, transposed, Mode::merge, nullptr);
}

Tensor restore_codes(const Tensor& weight, const Tensor& lora_a, const Tensor& lora_b, double scale,
                     bool transposed) {
  check_merge_args(weight, lora_a, lora_b, scale, transposed, "restore_codes");
  Tensor codes = at::zeros({restore_code_bytes(weight.numel())}, weight.options().dtype(at::kByte));
  run(weight, lora_a, lora_b, scale, transposed, Mode::codes, codes.data_ptr<uint8_t>());
  return codes;
}

// Writes escape_values into the code-3 elements of the weight in flat order (after the unmerge pass
// of those blocks); `offsets` from escape_offsets.
template <typename T>
void unmerge_with_escapes(Tensor& weight, const Tensor& lora_a, const Tensor& lora_b, double scale, bool transposed,
                          const uint8_t* codes, const Tensor& values, const std::vector<int64_t>& offsets) {
  // The fused path reads the values 16 at a time from each row's first one: a copy with 16 elements
  // of padding (the values are about 1% of the weight).
  const int64_t count = values.numel();
  Tensor padded = at::zeros({count + 16}, values.options());
  padded.narrow(0, 0, count).copy_(values);
  Escapes<T> e;
  e.patch = padded.const_data_ptr<T>();
  e.patch_offset = offsets.data();
  run_typed<T>(weight, lora_a, lora_b, scale, transposed, Mode::unmerge, const_cast<uint8_t*>(codes), e);
}

void unmerge_exact_(Tensor& weight, const Tensor& lora_a, const Tensor& lora_b, double scale, bool transposed,
                    const Tensor& codes, const std::optional<Tensor>& escape_values) {
  const char* op = "unmerge_exact_";
  check_merge_args(weight, lora_a, lora_b, scale, transposed, op);
  check_restore_codes(weight, codes, op);
  check_merge_written(weight, lora_a, lora_b, &codes, optional_ptr(escape_values), op);
  const uint8_t* c = codes.const_data_ptr<uint8_t>();
  if (!escape_values.has_value()) {
    run(weight, lora_a, lora_b, scale, transposed, Mode::unmerge, const_cast<uint8_t*>(c));
    return;
  }
  check_escape_values(weight, *escape_values, op);
  if (weight.numel() == 0) {
    check_escape_count(*escape_values, 0, op);
    return;
  }
  const std::vector<int64_t> offsets = escape_offsets(weight, c);
  check_escape_count(*escape_values, offsets.back(), op);  // before anything is written
  const Tensor values = escape_values->contiguous();
  dispatch_value_type(weight.scalar_type(), [&](auto tag) {
    unmerge_with_escapes<decltype(tag)>(weight, lora_a, lora_b, scale, transposed, c, values, offsets);
  });
}

std::tuple<Tensor, Tensor> merge_exact_(Tensor& weight, const Tensor& lora_a, const Tensor& lora_b, double scale,
                                        bool transposed, int64_t max_record_bytes) {
  const char* op = "merge_exact_";
  check_merge_args(weight, lora_a, lora_b, scale, transposed, op);
  check_merge_written(weight, lora_a, lora_b, nullptr, nullptr, op);
  const int64_t code_bytes = restore_code_bytes(weight.numel());
  // The codes alone already too large: refuse before any work.
  check_record_bytes(code_bytes, 0, weight.element_size(), max_record_bytes, op);
  Tensor codes = at::zeros({code_bytes}, weight.options().dtype(at::kByte));
  if (weight.numel() == 0) return {codes, at::empty({0}, weight.options())};
  uint8_t* c = codes.data_ptr<uint8_t>();
  const int64_t blocks = row_blocks(weight);
  Tensor values;
  std::vector<int64_t> offsets(static_cast<size_t>(blocks + 1), 0);
  dispatch_value_type(weight.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    // One list per block of kRows rows: whichever thread runs a block fills only its own list, and
    // joining them in block order gives flat-index order whatever the thread count.
    std::vector<std::vector<T>> lists(static_cast<size_t>(blocks));
    Escapes<T> e;
    e.collect = &lists;
    run_typed<T>(weight, lora_a, lora_b, scale, transposed, Mode::exact, c, e);
    for (int64_t blk = 0; blk < blocks; ++blk) offsets[blk + 1] = offsets[blk] + static_cast<int64_t>(lists[blk].size());
    values = at::empty({offsets.back()}, weight.options());
    T* out = values.data_ptr<T>();
    // Under 1 MiB of values (a few tens of microseconds of copying) on the calling thread, as above.
    const bool small = offsets.back() * static_cast<int64_t>(sizeof(T)) < (int64_t{1} << 20);
    at::parallel_for(0, blocks, small ? std::max<int64_t>(1, blocks) : 16, [&](int64_t b0, int64_t b1) {
      for (int64_t blk = b0; blk < b1; ++blk) {
        if (!lists[blk].empty()) std::memcpy(out + offsets[blk], lists[blk].data(), lists[blk].size() * sizeof(T));
      }
    });
  });
  const int64_t escapes = offsets.back();
  if (!record_fits(code_bytes, escapes, weight.element_size(), max_record_bytes)) {
    // Over budget: the record just made restores the weight bit for bit; undo, then raise.
    dispatch_value_type(weight.scalar_type(), [&](auto tag) {
      unmerge_with_escapes<decltype(tag)>(weight, lora_a, lora_b, scale, transposed, c, values, offsets);
    });
    check_record_bytes(code_bytes, escapes, weight.element_size(), max_record_bytes, op);
  }
  return {codes, values};
}

}  // namespace

TORCH_LIBRARY_IMPL(loracuda, CPU, m) {
  m.impl("merge_", &merge_);
  m.impl("restore_codes", &restore_codes);
  m.impl("unmerge_exact_", &unmerge_exact_);
  m.impl("merge_exact_", &merge_exact_);
}

}  // namespace cpu
}  // namespace loracuda
