// The AVX-512 path of the merge family (cpu/merge.cpp) for float32, bf16 and fp16 weights: one block of
// 8 weight rows at a time, its delta from the same multiply-add chain as delta_rows (cpu/common.h:
// b[i][0] * a, then fused multiply-adds over j = 1 .. r-1 in order, then * scale), and the element-wise
// part of the op done while the delta is still in registers -- widen w, add or subtract, round, store,
// restore codes packed 16 to a 32-bit word, escapes found by a lane mask -- with no delta buffer.
//
// The values are those of the generic path bit for bit: the same float32 operations per element, and
// roundings equal to c10's conversions (bf16: round to nearest even on the bits, NaN -> 0x7FC0; fp16:
// IEEE round to nearest even, NaN -> sign | 0x7E00, as c10's fp16_ieee_from_fp32_value).
//
// Requirements (checked by the caller, see fused::usable): AVX-512 F/BW/VL/DQ, BMI2 (pdep / pext pack
// the codes) and POPCNT, a row length that is a multiple of 4 (every row's codes start on a byte, so a
// row owns its code bytes and no atomics are needed), and 8 whole rows per block (the last partial
// block takes the generic path, whose values are the same). CPUs that also have AVX512_BF16 and
// AVX512_VBMI2 get the Hw variant for bf16 / fp16 (see Lanes).
//
// Cost per 16 elements (one vector) at r = 16: 17 vector multiply / fused multiply-add operations for
// the delta, then about 7 (merge_), 12 (unmerge_exact_) or 20 (merge_exact_) for the epilogue.
#pragma once
#include "cpu/common.h"

namespace loracuda {
namespace cpu {

// merge_, restore_codes, unmerge_exact_, merge_exact_ (codes and merge in one sweep).
enum class MergeMode { merge, codes, unmerge, exact };

namespace fused {

constexpr int kRows = detail::kDeltaRows;  // rows per block, as delta_rows

// The rows of one block: weight rows, their code bytes (element k of row i: byte k / 4 of codes[i],
// bits 2 * (k % 4)), and for merge_exact_ each row's escapes in column order: escapes[i][0 ..
// escape_count[i]), room for a row's elements + 1 (the slot after the last escape is written too); for
// unmerge_exact_ with escape values, where each row's values start.
template <typename T>
struct Block {
  T* w[kRows];
  uint8_t* codes[kRows];
  T* escapes[kRows];
  int64_t escape_count[kRows];
  const T* patch[kRows];  // unmerge_exact_ with values: row i's next escape value (16 readable); or null
};

#ifdef LORACUDA_X86_DISPATCH

// GCC 12 warns, wrongly, that the undefined source operand inside its AVX-512 intrinsics may be used.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

// Two instruction sets: the base one (AVX-512 F/BW/VL/DQ, BMI2, POPCNT) for every variant, and the Hw
// one (also AVX512_BF16 and AVX512_VBMI2) for the Hw variant only. The block loops are compiled once for
// each (cpu/merge_fused_blocks.inc, included twice below), so that code which runs on a CPU without
// AVX512_BF16 / AVX512_VBMI2 is never compiled with them enabled: the compiler may use an enabled
// instruction anywhere, not only where an intrinsic names it.
#define LORACUDA_FUSED_BASE_TARGET "avx512f,avx512bw,avx512vl,avx512dq,bmi2,popcnt"
#define LORACUDA_FUSED_HW_TARGET LORACUDA_FUSED_BASE_TARGET ",avx512bf16,avx512vbmi2"
#define LORACUDA_FUSED_INLINE __attribute__((target(LORACUDA_FUSED_BASE_TARGET), always_inline)) inline
#define LORACUDA_FUSED_HW_INLINE __attribute__((target(LORACUDA_FUSED_HW_TARGET), always_inline)) inline

// Codes from the bit patterns of the original (bw) and restored (b2) values of 16 elements, as two
// lane masks: lo = bit 0 of each code, hi = bit 1 (code 0: bw == b2; 1: bw == b2 + 1; 2: bw + 1 == b2;
// 3: otherwise, unsigned, no wrap-around -- restore_code in cpu/merge.cpp). One bit pattern is `step`
// units of the lanes (bf16 is held as its float32 bits, so step 0x10000 there).
// Bit 0 is clear (code 0 or 2) iff b2 >= bw and b2 - bw <= step; bit 1 is clear (code 0 or 1) iff
// bw >= b2 and bw - b2 <= step.
LORACUDA_FUSED_INLINE void codes_u32(__m512i bw, __m512i b2, uint32_t step, __mmask16& lo, __mmask16& hi) {
  const __m512i st = _mm512_set1_epi32(static_cast<int>(step));
  const __mmask16 lo_clear = _mm512_mask_cmp_epu32_mask(_mm512_cmp_epu32_mask(b2, bw, _MM_CMPINT_NLT),
                                                        _mm512_sub_epi32(b2, bw), st, _MM_CMPINT_LE);
  const __mmask16 hi_clear = _mm512_mask_cmp_epu32_mask(_mm512_cmp_epu32_mask(bw, b2, _MM_CMPINT_NLT),
                                                        _mm512_sub_epi32(bw, b2), st, _MM_CMPINT_LE);
  lo = static_cast<__mmask16>(~lo_clear);
  hi = static_cast<__mmask16>(~hi_clear);
}

// The same for 16-bit patterns where b2 comes from a rounding to bf16 / fp16, in 4 operations instead of
// 6: without the order tests, a difference of 0 or 1 modulo 2^16 could also be a wrap-around, which
// needs bw = 0xFFFF, b2 = 0 (bit 0) or bw = 0, b2 = 0xFFFF (bit 1). 0xFFFF is a NaN pattern, which a
// rounding never gives (NaN becomes c10's canonical NaN), and a NaN w (bw = 0xFFFF) rounds to that
// canonical NaN, never to 0: neither occurs.
LORACUDA_FUSED_INLINE void codes_u16(__m256i bw, __m256i b2, __mmask16& lo, __mmask16& hi) {
  const __m256i one = _mm256_set1_epi16(1);
  const __m256i up = _mm256_sub_epi16(b2, bw);  // 0 or 1: bit 0 clear
  lo = static_cast<__mmask16>(~_mm256_cmp_epu16_mask(up, one, _MM_CMPINT_LE));
  hi = static_cast<__mmask16>(~_mm256_cmp_epu16_mask(_mm256_add_epi16(up, one), one, _MM_CMPINT_LE));  // b2 - bw in {-1, 0}
}

// Lanes `esc` of 16 16-bit patterns replaced by src[0], src[1], ... in lane order, by a 32-bit expand
// (the 16-bit one needs AVX512_VBMI2). Reads 16 values at src.
LORACUDA_FUSED_INLINE __m256i patch_u16(__m256i raw, __mmask16 esc, const void* src) {
  const __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256(static_cast<const __m256i*>(src)));
  return _mm256_mask_mov_epi16(raw, esc, _mm512_cvtepi32_epi16(_mm512_maskz_expand_epi32(esc, v)));
}

// 16 elements of a weight dtype in float32 lanes. Raw: their bit patterns in the form the codes compare
// and the stores write. load: masked (lanes off the mask read 0); round: float32 -> the dtype, giving
// the rounded value widened back (exact) and its Raw; adjust: one bit pattern up on `up`, down on `down`.
// Hw: the variant for CPUs with AVX512_BF16 and AVX512_VBMI2 (bf16 rounded by the conversion
// instruction, escape values expanded 16 bits at a time), for bf16 and fp16.
template <typename T, bool Hw = false>
struct Lanes;

template <>
struct Lanes<float> {
  using Raw = __m512i;  // the float32 bits
  LORACUDA_FUSED_INLINE static __m512 load(const float* p, __mmask16 m, Raw& raw) {
    raw = _mm512_maskz_loadu_epi32(m, p);
    return _mm512_castsi512_ps(raw);
  }
  LORACUDA_FUSED_INLINE static __m512 round(__m512 s, Raw& raw) {
    raw = _mm512_castps_si512(s);
    return s;
  }
  LORACUDA_FUSED_INLINE static void store(float* p, __mmask16 m, Raw raw) { _mm512_mask_storeu_epi32(p, m, raw); }
  // raw with the `esc` lanes replaced by src[0], src[1], ... in lane order (src: 16 readable values).
  LORACUDA_FUSED_INLINE static Raw patch(Raw raw, __mmask16 esc, const float* src) {
    return _mm512_mask_expandloadu_epi32(raw, esc, src);
  }
  using Saved = uint32_t;  // an element as the escape collection keeps it (save / from_saved)
  LORACUDA_FUSED_INLINE static void save(Saved* p, Raw raw) { _mm512_store_si512(p, raw); }
  static float from_saved(Saved v) {
    float f;
    std::memcpy(&f, &v, sizeof(f));
    return f;
  }
  LORACUDA_FUSED_INLINE static void codes(Raw bw, Raw b2, __mmask16& lo, __mmask16& hi) { codes_u32(bw, b2, 1, lo, hi); }
  LORACUDA_FUSED_INLINE static Raw adjust(Raw raw, __mmask16 up, __mmask16 down) {
    const __m512i one = _mm512_set1_epi32(1);
    return _mm512_mask_sub_epi32(_mm512_mask_add_epi32(raw, up, raw, one), down, raw, one);
  }
};

// bf16 held as its float32 value's bits (bits << 16): widening is the load itself, and the rounding
// keeps the float32 form, so the codes compare those with one bit pattern = 0x10000.
template <>
struct Lanes<c10::BFloat16> {
  using Raw = __m512i;
  static constexpr uint32_t kStep = 0x10000;
  LORACUDA_FUSED_INLINE static __m512 load(const c10::BFloat16* p, __mmask16 m, Raw& raw) {
    raw = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16);
    return _mm512_castsi512_ps(raw);
  }
  // c10's round_to_nearest_even: (u + 0x7FFF + ((u >> 16) & 1)) >> 16 on the bits (no overflow for
  // non-NaN u), NaN -> 0x7FC0; here kept in the high half.
  LORACUDA_FUSED_INLINE static __m512 round(__m512 s, Raw& raw) {
    const __m512i u = _mm512_castps_si512(s);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i t = _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb);
    t = _mm512_and_si512(t, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u)));
    t = _mm512_mask_mov_epi32(t, _mm512_cmp_ps_mask(s, s, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC00000));
    raw = t;
    return _mm512_castsi512_ps(t);
  }
  LORACUDA_FUSED_INLINE static void store(c10::BFloat16* p, __mmask16 m, Raw raw) {
    _mm512_mask_cvtepi32_storeu_epi16(p, m, _mm512_srli_epi32(raw, 16));
  }
  LORACUDA_FUSED_INLINE static Raw patch(Raw raw, __mmask16 esc, const c10::BFloat16* src) {
    const __m512i v = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src))), 16);
    return _mm512_mask_expand_epi32(raw, esc, v);
  }
  using Saved = uint32_t;  // the float32 form
  LORACUDA_FUSED_INLINE static void save(Saved* p, Raw raw) { _mm512_store_si512(p, raw); }
  static c10::BFloat16 from_saved(Saved v) {
    return c10::BFloat16(static_cast<uint16_t>(v >> 16), c10::BFloat16::from_bits());
  }
  LORACUDA_FUSED_INLINE static void codes(Raw bw, Raw b2, __mmask16& lo, __mmask16& hi) {
    codes_u32(bw, b2, kStep, lo, hi);
  }
  LORACUDA_FUSED_INLINE static Raw adjust(Raw raw, __mmask16 up, __mmask16 down) {
    const __m512i step = _mm512_set1_epi32(static_cast<int>(kStep));
    return _mm512_mask_sub_epi32(_mm512_mask_add_epi32(raw, up, raw, step), down, raw, step);
  }
};

// What a variant that holds 16-bit values as their bit patterns in 16-bit lanes does the same way for
// bf16 and fp16: store, save and recover the originals, the restore codes, the one-unit adjustment.
template <typename T>
struct Lanes16 {
  using Raw = __m256i;
  using Saved = uint16_t;
  LORACUDA_FUSED_INLINE static void store(T* p, __mmask16 m, Raw raw) { _mm256_mask_storeu_epi16(p, m, raw); }
  LORACUDA_FUSED_INLINE static void save(Saved* p, Raw raw) { _mm256_store_si256(reinterpret_cast<__m256i*>(p), raw); }
  static T from_saved(Saved v) { return T(v, T::from_bits()); }
  LORACUDA_FUSED_INLINE static void codes(Raw bw, Raw b2, __mmask16& lo, __mmask16& hi) { codes_u16(bw, b2, lo, hi); }
  LORACUDA_FUSED_INLINE static Raw adjust(Raw raw, __mmask16 up, __mmask16 down) {
    const __m256i one = _mm256_set1_epi16(1);
    return _mm256_mask_sub_epi16(_mm256_mask_add_epi16(raw, up, raw, one), down, raw, one);
  }
};

// bf16 as 16 bit patterns in 16-bit lanes, rounded by vcvtneps2bf16: round to nearest even like c10,
// except that it flushes subnormal inputs to zero and keeps NaN payloads; a vector with a NaN or a
// subnormal lane (rare: a branch) is rounded by the bits instead (Lanes<c10::BFloat16>::round).
template <>
struct Lanes<c10::BFloat16, true> : Lanes16<c10::BFloat16> {
  LORACUDA_FUSED_HW_INLINE static __m512 widen(__m256i raw) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
  }
  LORACUDA_FUSED_HW_INLINE static __m512 load(const c10::BFloat16* p, __mmask16 m, Raw& raw) {
    raw = _mm256_maskz_loadu_epi16(m, p);
    return widen(raw);
  }
  LORACUDA_FUSED_HW_INLINE static __m512 round(__m512 s, Raw& raw) {
    const __m256bh h = _mm512_cvtneps_pbh(s);
    std::memcpy(&raw, &h, sizeof(raw));
    constexpr int kQuietNan = 0x01, kSubnormal = 0x20, kSignallingNan = 0x80;
    if (_mm512_fpclass_ps_mask(s, kQuietNan | kSubnormal | kSignallingNan) != 0) {
      __m512i bits;
      Lanes<c10::BFloat16>::round(s, bits);
      raw = _mm512_cvtepi32_epi16(_mm512_srli_epi32(bits, 16));
    }
    return widen(raw);
  }
  LORACUDA_FUSED_HW_INLINE static Raw patch(Raw raw, __mmask16 esc, const c10::BFloat16* src) {
    return _mm256_mask_expandloadu_epi16(raw, esc, src);
  }
};

// fp16 as 16 bit patterns in 16-bit lanes. vcvtph2ps widens exactly; vcvtps2ph rounds to nearest even
// like c10's fp16_ieee_from_fp32_value for every non-NaN input (subnormal results included); NaN lanes
// (rare: a branch) get c10's sign | 0x7E00 instead of the instruction's payload-keeping NaN.
template <>
struct Lanes<c10::Half> : Lanes16<c10::Half> {
  LORACUDA_FUSED_INLINE static __m512 load(const c10::Half* p, __mmask16 m, Raw& raw) {
    raw = _mm256_maskz_loadu_epi16(m, p);
    return _mm512_cvtph_ps(raw);
  }
  LORACUDA_FUSED_INLINE static __m512 round(__m512 s, Raw& raw) {
    raw = _mm512_cvtps_ph(s, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __mmask16 nan = _mm512_cmp_ps_mask(s, s, _CMP_UNORD_Q);
    if (nan != 0) {
      const __m256i sign = _mm256_and_si256(_mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(s), 16)),
                                            _mm256_set1_epi16(static_cast<short>(0x8000)));
      raw = _mm256_mask_mov_epi16(raw, nan, _mm256_or_si256(sign, _mm256_set1_epi16(0x7E00)));
    }
    return _mm512_cvtph_ps(raw);
  }
  LORACUDA_FUSED_INLINE static Raw patch(Raw raw, __mmask16 esc, const c10::Half* src) { return patch_u16(raw, esc, src); }
};

// fp16 on the Hw variant: the same, with the escape values expanded by vpexpandw.
template <>
struct Lanes<c10::Half, true> : Lanes<c10::Half> {
  LORACUDA_FUSED_HW_INLINE static Raw patch(Raw raw, __mmask16 esc, const c10::Half* src) {
    return _mm256_mask_expandloadu_epi16(raw, esc, src);
  }
};


// The codes of n <= 16 elements (n a multiple of 4) as a 32-bit word, to and from the row's bytes.
LORACUDA_FUSED_INLINE void put_codes(uint8_t* p, uint32_t word, int n) { std::memcpy(p, &word, n / 4); }
LORACUDA_FUSED_INLINE uint32_t get_codes(const uint8_t* p, int n) {
  uint32_t word = 0;
  std::memcpy(&word, p, n / 4);
  return word;
}

// The block loops, once per instruction set: base_isa for every variant, hw_isa for the Hw one.
#define LORACUDA_FUSED_BLOCK_TARGET LORACUDA_FUSED_BASE_TARGET
#define LORACUDA_FUSED_BLOCK_INLINE LORACUDA_FUSED_INLINE
namespace base_isa {
#include "cpu/merge_fused_blocks.inc"
}  // namespace base_isa
#undef LORACUDA_FUSED_BLOCK_TARGET
#undef LORACUDA_FUSED_BLOCK_INLINE
#define LORACUDA_FUSED_BLOCK_TARGET LORACUDA_FUSED_HW_TARGET
#define LORACUDA_FUSED_BLOCK_INLINE LORACUDA_FUSED_HW_INLINE
namespace hw_isa {
#include "cpu/merge_fused_blocks.inc"
}  // namespace hw_isa
#undef LORACUDA_FUSED_BLOCK_TARGET
#undef LORACUDA_FUSED_BLOCK_INLINE

#undef LORACUDA_FUSED_INLINE
#undef LORACUDA_FUSED_HW_INLINE
#undef LORACUDA_FUSED_BASE_TARGET
#undef LORACUDA_FUSED_HW_TARGET
#pragma GCC diagnostic pop

// The CPU features of this path beyond detail::isa()'s AVX-512 F/BW/VL: BMI2, POPCNT and AVX-512DQ always,
// AVX512_BF16 and AVX512_VBMI2 for the Hw variant, which LORACUDA_CPU_ISA=avx512-base also turns off
// (so that tests reach the other variant on such a CPU).
struct Features {
  bool base = false, hw = false;
};

inline Features features() {
  static const Features value = [] {
    __builtin_cpu_init();
    Features f;
    f.base = __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("popcnt") && __builtin_cpu_supports("avx512dq");
    const char* limit = std::getenv("LORACUDA_CPU_ISA");
    const bool base_only = limit != nullptr && std::strcmp(limit, "avx512-base") == 0;
    f.hw = f.base && !base_only && __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512vbmi2");
    return f;
  }();
  return value;
}

// Whether this path runs for weights of type T with rows of `cols` elements.
template <typename T>
inline bool usable(int64_t cols) {
  if constexpr (std::is_same_v<T, double>) {
    return false;
  } else {
    return cols % 4 == 0 && detail::isa() == detail::Isa::avx512 && features().base;
  }
}

template <typename T, bool Hw>
inline void block_mode(MergeMode mode, const float* a, int64_t K, const float* const* b, int r, float scale,
                       Block<T>& blk) {
  if constexpr (Hw) {
    switch (mode) {
      case MergeMode::merge: return hw_isa::block_avx512<T, MergeMode::merge, true>(a, K, b, r, scale, blk);
      case MergeMode::codes: return hw_isa::block_avx512<T, MergeMode::codes, true>(a, K, b, r, scale, blk);
      case MergeMode::unmerge: return hw_isa::block_avx512<T, MergeMode::unmerge, true>(a, K, b, r, scale, blk);
      case MergeMode::exact: return hw_isa::block_avx512<T, MergeMode::exact, true>(a, K, b, r, scale, blk);
    }
  } else {
    switch (mode) {
      case MergeMode::merge: return base_isa::block_avx512<T, MergeMode::merge, false>(a, K, b, r, scale, blk);
      case MergeMode::codes: return base_isa::block_avx512<T, MergeMode::codes, false>(a, K, b, r, scale, blk);
      case MergeMode::unmerge: return base_isa::block_avx512<T, MergeMode::unmerge, false>(a, K, b, r, scale, blk);
      case MergeMode::exact: return base_isa::block_avx512<T, MergeMode::exact, false>(a, K, b, r, scale, blk);
    }
  }
}

template <typename T>
inline void block(MergeMode mode, const float* a, int64_t K, const float* const* b, int r, float scale,
                  Block<T>& blk) {
  if constexpr (std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, c10::Half>) {
    if (features().hw) return block_mode<T, true>(mode, a, K, b, r, scale, blk);
  }
  block_mode<T, false>(mode, a, K, b, r, scale, blk);
}

#else  // no x86 dispatch: never usable

template <typename T>
inline bool usable(int64_t) {
  return false;
}

template <typename T>
inline void block(MergeMode, const float*, int64_t, const float* const*, int, float, Block<T>&) {}

#endif

}  // namespace fused
}  // namespace cpu
}  // namespace loracuda
