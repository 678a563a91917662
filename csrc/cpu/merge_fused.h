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

#ifdef LORACUDA_X86_DISPATCH

// GCC 12 warns, wrongly, that the undefined source operand inside its AVX-512 intrinsics may be used.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

// Every function here is compiled for the union of what the variants use (avx512bf16, avx512vbmi2:
// only the Hw variant issues their instructions, through intrinsics; the compiler does not generate
// them from plain code -- no __bf16 type is used -- so the other variants run on AVX-512 CPUs without).
#define LORACUDA_FUSED_TARGET "avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx512vbmi2,bmi2,popcnt"
#define LORACUDA_FUSED_INLINE __attribute__((target(LORACUDA_FUSED_TARGET), always_inline)) inline

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

// bf16 as 16 bit patterns in 16-bit lanes, rounded by vcvtneps2bf16: round to nearest even like c10,
// except that it flushes subnormal inputs to zero and keeps NaN payloads; a vector with a NaN or a
// subnormal lane (rare: a branch) is rounded by the bits instead (Lanes<c10::BFloat16>::round).
template <>
struct Lanes<c10::BFloat16, true> {
  using Raw = __m256i;
  LORACUDA_FUSED_INLINE static __m512 widen(__m256i raw) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
  }
  LORACUDA_FUSED_INLINE static __m512 load(const c10::BFloat16* p, __mmask16 m, Raw& raw) {
    raw = _mm256_maskz_loadu_epi16(m, p);
    return widen(raw);
  }
  LORACUDA_FUSED_INLINE static __m512 round(__m512 s, Raw& raw) {
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
  LORACUDA_FUSED_INLINE static void store(c10::BFloat16* p, __mmask16 m, Raw raw) { _mm256_mask_storeu_epi16(p, m, raw); }
  LORACUDA_FUSED_INLINE static Raw patch(Raw raw, __mmask16 esc, const c10::BFloat16* src) {
    return _mm256_mask_expandloadu_epi16(raw, esc, src);
  }
  using Saved = uint16_t;
  LORACUDA_FUSED_INLINE static void save(Saved* p, Raw raw) { _mm256_store_si256(reinterpret_cast<__m256i*>(p), raw); }
  static c10::BFloat16 from_saved(Saved v) { return c10::BFloat16(v, c10::BFloat16::from_bits()); }
  LORACUDA_FUSED_INLINE static void codes(Raw bw, Raw b2, __mmask16& lo, __mmask16& hi) { codes_u16(bw, b2, lo, hi); }
  LORACUDA_FUSED_INLINE static Raw adjust(Raw raw, __mmask16 up, __mmask16 down) {
    const __m256i one = _mm256_set1_epi16(1);
    return _mm256_mask_sub_epi16(_mm256_mask_add_epi16(raw, up, raw, one), down, raw, one);
  }
};

// fp16 as 16 bit patterns in 16-bit lanes. vcvtph2ps widens exactly; vcvtps2ph rounds to nearest even
// like c10's fp16_ieee_from_fp32_value for every non-NaN input (subnormal results included); NaN lanes
// (rare: a branch) get c10's sign | 0x7E00 instead of the instruction's payload-keeping NaN.
template <>
struct Lanes<c10::Half> {
  using Raw = __m256i;
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
  LORACUDA_FUSED_INLINE static void store(c10::Half* p, __mmask16 m, Raw raw) { _mm256_mask_storeu_epi16(p, m, raw); }
  LORACUDA_FUSED_INLINE static Raw patch(Raw raw, __mmask16 esc, const c10::Half* src) { return patch_u16(raw, esc, src); }
  using Saved = uint16_t;
  LORACUDA_FUSED_INLINE static void save(Saved* p, Raw raw) { _mm256_store_si256(reinterpret_cast<__m256i*>(p), raw); }
  static c10::Half from_saved(Saved v) { return c10::Half(v, c10::Half::from_bits()); }
  LORACUDA_FUSED_INLINE static void codes(Raw bw, Raw b2, __mmask16& lo, __mmask16& hi) { codes_u16(bw, b2, lo, hi); }
  LORACUDA_FUSED_INLINE static Raw adjust(Raw raw, __mmask16 up, __mmask16 down) {
    const __m256i one = _mm256_set1_epi16(1);
    return _mm256_mask_sub_epi16(_mm256_mask_add_epi16(raw, up, raw, one), down, raw, one);
  }
};

// fp16 on the Hw variant: the same, with the escape values expanded by vpexpandw.
template <>
struct Lanes<c10::Half, true> : Lanes<c10::Half> {
  LORACUDA_FUSED_INLINE static Raw patch(Raw raw, __mmask16 esc, const c10::Half* src) {
    return _mm256_mask_expandloadu_epi16(raw, esc, src);
  }
};

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

// The codes of n <= 16 elements (n a multiple of 4) as a 32-bit word, to and from the row's bytes.
LORACUDA_FUSED_INLINE void put_codes(uint8_t* p, uint32_t word, int n) { std::memcpy(p, &word, n / 4); }
LORACUDA_FUSED_INLINE uint32_t get_codes(const uint8_t* p, int n) {
  uint32_t word = 0;
  std::memcpy(&word, p, n / 4);
  return word;
}

// The element-wise part of mode M on 16 elements of one row (mask m: the first n lanes), given their
// delta d (float32 lanes). k: the column of the first lane.
template <typename T, MergeMode M, bool Hw>
LORACUDA_FUSED_INLINE void epilogue(Block<T>& blk, int i, int64_t k, __mmask16 m, int n, __m512 d) {
  using L = Lanes<T, Hw>;
  T* p = blk.w[i] + k;
  typename L::Raw raw0, raw1, raw2;
  const __m512 f0 = L::load(p, m, raw0);
  if constexpr (M == MergeMode::unmerge) {
    L::round(_mm512_sub_ps(f0, d), raw1);
    const uint32_t word = get_codes(blk.codes[i] + k / 4, n);
    const uint32_t lo = _pext_u32(word, 0x55555555u), hi = _pext_u32(word, 0xAAAAAAAAu);
    // code 1: one pattern up, code 2: one down, code 3: the saved value when given (expanded into the
    // code-3 lanes, no branch), else left as rounded.
    typename L::Raw out = L::adjust(raw1, static_cast<__mmask16>(lo & ~hi), static_cast<__mmask16>(hi & ~lo));
    if (blk.patch[i] != nullptr) {
      const __mmask16 esc = static_cast<__mmask16>(lo & hi & m);
      out = L::patch(out, esc, blk.patch[i]);
      blk.patch[i] += __builtin_popcount(esc);
    }
    L::store(p, m, out);
  } else {
    const __m512 w1 = L::round(_mm512_add_ps(f0, d), raw1);  // merge_'s value
    if constexpr (M == MergeMode::merge || M == MergeMode::exact) L::store(p, m, raw1);
    if constexpr (M == MergeMode::codes || M == MergeMode::exact) {
      L::round(_mm512_sub_ps(w1, d), raw2);  // what the plain unmerge would give back
      __mmask16 lo, hi;
      L::codes(raw0, raw2, lo, hi);
      put_codes(blk.codes[i] + k / 4, _pdep_u32(lo, 0x55555555u) | _pdep_u32(hi, 0xAAAAAAAAu), n);
      if constexpr (M == MergeMode::exact) {
        // The originals of code-3 lanes, in column order. Whether a vector has one is hard to predict
        // (about 1 in 8 at 1% escapes), so the first is written without a branch: with none, slot
        // escapes[i][count] gets lane 16's (unused) value and the count stays; a second one is rare.
        alignas(64) typename L::Saved saved[32];
        L::save(saved, raw0);
        saved[16] = 0;
        uint32_t esc = static_cast<uint32_t>(lo & hi & m);
        T* out = blk.escapes[i];
        int64_t& count = blk.escape_count[i];
        out[count] = L::from_saved(saved[__builtin_ctz(esc | 0x10000u)]);
        count += esc != 0;
        for (esc &= esc - 1; esc != 0; esc &= esc - 1) out[count++] = L::from_saved(saved[__builtin_ctz(esc)]);
      }
    }
  }
}

// Columns [k, k + 16 * NV) of the block, NV = 1 or 2 (the last vector masked by m_last, n_last lanes):
// the delta in kRows x NV accumulators, then the epilogue of each. Lanes off the mask load a as 0 and
// are not stored. (Two one-dimensional accumulator arrays: the compiler keeps those in registers.)
template <typename T, MergeMode M, bool Hw, int NV>
LORACUDA_FUSED_INLINE void columns(const float* a, int64_t K, const float* const* b, int r, __m512 vs,
                                   Block<T>& blk, int64_t k, __mmask16 m_last, int n_last) {
  static_assert(NV == 1 || NV == 2, "one or two vectors of columns");
  const __mmask16 m0 = NV == 1 ? m_last : 0xFFFF;
  __m512 acc0[kRows], acc1[kRows];
  {
    const __m512 a0 = _mm512_maskz_loadu_ps(m0, a + k);
    const __m512 a1 = NV == 2 ? _mm512_maskz_loadu_ps(m_last, a + k + 16) : a0;
    for (int i = 0; i < kRows; ++i) {
      const __m512 bi = _mm512_set1_ps(b[i][0]);
      acc0[i] = _mm512_mul_ps(bi, a0);
      if constexpr (NV == 2) acc1[i] = _mm512_mul_ps(bi, a1);
    }
  }
  for (int j = 1; j < r; ++j) {
    const __m512 a0 = _mm512_maskz_loadu_ps(m0, a + j * K + k);
    const __m512 a1 = NV == 2 ? _mm512_maskz_loadu_ps(m_last, a + j * K + k + 16) : a0;
    for (int i = 0; i < kRows; ++i) {
      const __m512 bi = _mm512_set1_ps(b[i][j]);
      acc0[i] = _mm512_fmadd_ps(bi, a0, acc0[i]);
      if constexpr (NV == 2) acc1[i] = _mm512_fmadd_ps(bi, a1, acc1[i]);
    }
  }
  // The deltas (rounded float32 products, as delta_rows stores them) go through 1 KiB of stack: with
  // all accumulators live across the epilogues the compiler would spill them inside the loop over j
  // instead. The empty asm with a memory clobber makes the stores and loads real, which also keeps the
  // compiler from contracting the multiply by scale with the epilogue's add into one fused multiply-add.
  alignas(64) float delta[2 * kRows][16];
  for (int i = 0; i < kRows; ++i) {
    _mm512_store_ps(delta[2 * i], _mm512_mul_ps(acc0[i], vs));
    if constexpr (NV == 2) _mm512_store_ps(delta[2 * i + 1], _mm512_mul_ps(acc1[i], vs));
  }
  asm volatile("" : : "r"(delta) : "memory");
  for (int i = 0; i < kRows; ++i) {
    epilogue<T, M, Hw>(blk, i, k, m0, NV == 1 ? n_last : 16, _mm512_load_ps(delta[2 * i]));
    if constexpr (NV == 2) epilogue<T, M, Hw>(blk, i, k + 16, m_last, n_last, _mm512_load_ps(delta[2 * i + 1]));
  }
}

// One block of kRows whole rows of K columns: a [r, K] and b (row i's r factors at b[i]) in float32.
template <typename T, MergeMode M, bool Hw>
__attribute__((target(LORACUDA_FUSED_TARGET))) void block_avx512(const float* a, int64_t K, const float* const* b,
                                                                 int r, float scale, Block<T>& block) {
  // A local copy: no store through a weight or code pointer can alias it, so its pointers and counts
  // stay in registers instead of being reloaded after every store.
  Block<T> blk = block;
  const __m512 vs = _mm512_set1_ps(scale);
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    // The weight lines of the chunk after next, so that the 8 row streams are in L1 when the epilogue
    // needs them (each chunk's arithmetic takes longer than fetching them).
    for (int i = 0; i < kRows; ++i) {
      for (size_t byte = 0; byte < 32 * sizeof(T); byte += 64) {
        _mm_prefetch(reinterpret_cast<const char*>(blk.w[i] + k + 64) + byte, _MM_HINT_T0);
      }
    }
    columns<T, M, Hw, 2>(a, K, b, r, vs, blk, k, 0xFFFF, 16);
  }
  for (; k < K; k += 16) {
    const int n = static_cast<int>(std::min<int64_t>(16, K - k));
    columns<T, M, Hw, 1>(a, K, b, r, vs, blk, k, static_cast<__mmask16>((1u << n) - 1), n);
  }
  block = blk;
}

#undef LORACUDA_FUSED_INLINE
#undef LORACUDA_FUSED_TARGET
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
  switch (mode) {
    case MergeMode::merge: return block_avx512<T, MergeMode::merge, Hw>(a, K, b, r, scale, blk);
    case MergeMode::codes: return block_avx512<T, MergeMode::codes, Hw>(a, K, b, r, scale, blk);
    case MergeMode::unmerge: return block_avx512<T, MergeMode::unmerge, Hw>(a, K, b, r, scale, blk);
    case MergeMode::exact: return block_avx512<T, MergeMode::exact, Hw>(a, K, b, r, scale, blk);
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
struct Block {
  T* w[kRows];
  uint8_t* codes[kRows];
  T* escapes[kRows];
  int64_t escape_count[kRows];
  const T* patch[kRows];  // unmerge_exact_ with values: row i's next escape value (16 readable); or null
};

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
