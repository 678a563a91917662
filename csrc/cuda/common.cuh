// Device helpers shared by the loracuda kernels: dtype dispatch, float conversion, 16-byte vector
// access of 8 consecutive elements, the dropout of one element, the merge delta, and the inner
// products of the shrink and expand tiles (float32 FMA, and the tensor-core warp tile on mma.cuh).
// CUDA headers only (no torch), through device_api.cuh.
#pragma once
#include <cstdint>

#include "../dropout_hash.h"
#include "device_api.cuh"
#include "mma.cuh"
#include "params.h"

namespace loracuda {
namespace cuda {

// ---- dtype dispatch (host side) ------------------------------------------------------------------

template <typename T>
struct Tag {
  using type = T;
};

// Calls fn(Tag<T>{}) for the element type named by `dtype`.
template <typename Fn>
cudaError_t dispatch_dtype(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::kFloat32: return fn(Tag<float>{});
    case DType::kBFloat16: return fn(Tag<__nv_bfloat16>{});
    case DType::kFloat16: return fn(Tag<__half>{});
  }
  return cudaErrorInvalidValue;
}

// Calls fn(Tag<TV>{}, Tag<TA>{}) for a value dtype and an adapter dtype; the adapter is in the
// value dtype or float32 (csrc/checks.h), so five pairs are instantiated, not nine.
template <typename Fn>
cudaError_t dispatch_value_adapter(DType value, DType adapter, Fn&& fn) {
  if (adapter != value && adapter != DType::kFloat32) return cudaErrorInvalidValue;
  switch (value) {
    case DType::kFloat32: return fn(Tag<float>{}, Tag<float>{});
    case DType::kBFloat16:
      return adapter == DType::kFloat32 ? fn(Tag<__nv_bfloat16>{}, Tag<float>{})
                                        : fn(Tag<__nv_bfloat16>{}, Tag<__nv_bfloat16>{});
    case DType::kFloat16:
      return adapter == DType::kFloat32 ? fn(Tag<__half>{}, Tag<float>{}) : fn(Tag<__half>{}, Tag<__half>{});
  }
  return cudaErrorInvalidValue;
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// Whether rows of `elem_bytes`-sized elements starting at `base` with `row_stride` elements between
// rows can be read as 16-byte vectors at every multiple of 8 elements. `rows` <= 1 ignores the stride.
inline bool vector_rows_ok(const void* base, int64_t row_stride, int64_t rows, int elem_bytes) {
  return aligned16(base) && (rows <= 1 || (row_stride * elem_bytes) % 16 == 0);
}

inline unsigned grid_cap(int64_t blocks, int num_sms) {
  // Grid-stride kernels: a few waves of blocks are enough to fill the chip.
  const int64_t cap = static_cast<int64_t>(num_sms > 0 ? num_sms : 132) * 8;
  return static_cast<unsigned>(blocks < 1 ? 1 : (blocks < cap ? blocks : cap));
}

// ---- conversions -----------------------------------------------------------------------------------

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

// Round-to-nearest-even conversion from float32.
template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }

template <typename T>
__device__ __forceinline__ float load_float(const T* p) {
  return to_float(*p);
}

// ---- 8 consecutive elements ------------------------------------------------------------------------
// The kernels move data in chunks of 8 elements: one 16-byte access for bf16/fp16, two for fp32.
// `vec` must only be true when p is 16-byte aligned and all 8 elements exist; otherwise the first
// `count` elements are read one by one and the rest are zero.

template <typename T>
__device__ __forceinline__ void load8(const T* p, bool vec, int count, float (&out)[8]) {
  if (vec) {
    if constexpr (sizeof(T) == 4) {
      const float4 lo = __ldg(reinterpret_cast<const float4*>(p));
      const float4 hi = __ldg(reinterpret_cast<const float4*>(p) + 1);
      out[0] = lo.x; out[1] = lo.y; out[2] = lo.z; out[3] = lo.w;
      out[4] = hi.x; out[5] = hi.y; out[6] = hi.z; out[7] = hi.w;
    } else {
      const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
      const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int c = 0; c < 8; ++c) out[c] = to_float(e[c]);
    }
  } else {
#pragma unroll
    for (int c = 0; c < 8; ++c) out[c] = c < count ? to_float(p[c]) : 0.0f;
  }
}

// Like load8, but through the ordinary (coherent) path: for buffers the same kernel writes.
template <typename T>
__device__ __forceinline__ void load8_rw(const T* p, bool vec, int count, T (&out)[8]) {
  if (vec) {
    if constexpr (sizeof(T) == 4) {
      const float4 lo = load_vec16(float4, p);
      const float4 hi = load_vec16(float4, p + 4);
      out[0] = lo.x; out[1] = lo.y; out[2] = lo.z; out[3] = lo.w;
      out[4] = hi.x; out[5] = hi.y; out[6] = hi.z; out[7] = hi.w;
    } else {
      const uint4 raw = load_vec16(uint4, p);
      const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int c = 0; c < 8; ++c) out[c] = e[c];
    }
  } else {
#pragma unroll
    for (int c = 0; c < 8; ++c) out[c] = c < count ? p[c] : from_float<T>(0.0f);
  }
}

template <typename T>
__device__ __forceinline__ void store8(T* p, bool vec, int count, const T (&v)[8]) {
  if (vec) {
    if constexpr (sizeof(T) == 4) {
      store_vec16(reinterpret_cast<float4*>(p), make_float4(v[0], v[1], v[2], v[3]));
      store_vec16(reinterpret_cast<float4*>(p) + 1, make_float4(v[4], v[5], v[6], v[7]));
    } else {
      uint4 raw;
      T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
      for (int c = 0; c < 8; ++c) e[c] = v[c];
      store_vec16(reinterpret_cast<uint4*>(p), raw);
    }
  } else {
#pragma unroll
    for (int c = 0; c < 8; ++c) {
      if (c < count) p[c] = v[c];
    }
  }
}

// ---- dropout ---------------------------------------------------------------------------------------

// The per-launch view of DropoutParams: the key is derived once per thread from the seed (read from
// device memory when seed_ptr is set, so the host never waits for it).
struct DeviceDropout {
  bool enabled;
  uint32_t threshold;
  float keep_scale;
  DropoutKey key;
};

__device__ __forceinline__ DeviceDropout make_device_dropout(const DropoutParams& p) {
  DeviceDropout d;
  d.enabled = p.enabled;
  d.threshold = p.threshold;
  d.keep_scale = p.keep_scale;
  const uint64_t seed =
      !p.enabled ? 0 : (p.seed_ptr != nullptr ? static_cast<uint64_t>(*p.seed_ptr) : p.seed_value);
  d.key = dropout_key(seed);
  return d;
}

// mask * v / q for the element at logical row-major index `index` of the [M, K] input.
__device__ __forceinline__ float apply_dropout(const DeviceDropout& d, uint64_t index, float v) {
  if (!d.enabled) return v;
  return dropout_keep(d.key, index, d.threshold) ? v * d.keep_scale : 0.0f;
}

// ---- the merge delta ---------------------------------------------------------------------------------
// d[n, k] = scale * (sum_{j = 0 .. r-1} b[n, j] * a[j, k]) in float32: the sum starts at 0 and takes
// one fused multiply-add per j in ascending j, then one multiply by scale. The explicit _rn
// intrinsics keep the compiler from contracting or reordering anything, so merge_, restore_codes and
// unmerge_exact_ (and both merge kernels) compute the same bits for the same element.
// merge_delta_step/merge_delta_finish are the only arithmetic of the delta; merge_delta is the
// one-element form built from them, the tiled kernel applies the same steps to a register tile.

__device__ __forceinline__ float merge_delta_step(float acc, float b_nj, float a_jk) {
  return __fmaf_rn(b_nj, a_jk, acc);
}

__device__ __forceinline__ float merge_delta_finish(float acc, float scale) { return __fmul_rn(scale, acc); }

template <typename TA>
__device__ __forceinline__ float merge_delta(const TA* __restrict__ a, const TA* __restrict__ b, int64_t n,
                                             int64_t k, int64_t r, int64_t kdim, float scale) {
  float acc = 0.0f;
  for (int64_t j = 0; j < r; ++j) acc = merge_delta_step(acc, load_float(b + n * r + j), load_float(a + j * kdim + k));
  return merge_delta_finish(acc, scale);
}

// Raw bit patterns of the weight dtypes, as unsigned integers, and their width mask.
__device__ __forceinline__ uint32_t bits_of(float v) { return __float_as_uint(v); }
__device__ __forceinline__ uint32_t bits_of(__nv_bfloat16 v) { return __bfloat16_as_ushort(v); }
__device__ __forceinline__ uint32_t bits_of(__half v) { return __half_as_ushort(v); }

template <typename T>
__device__ __forceinline__ T from_bits(uint32_t b);
template <>
__device__ __forceinline__ float from_bits<float>(uint32_t b) { return __uint_as_float(b); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_bits<__nv_bfloat16>(uint32_t b) {
  return __ushort_as_bfloat16(static_cast<unsigned short>(b));
}
template <>
__device__ __forceinline__ __half from_bits<__half>(uint32_t b) { return __ushort_as_half(static_cast<unsigned short>(b)); }

template <typename T>
__host__ __device__ constexpr uint32_t bits_mask() {
  return sizeof(T) == 4 ? 0xFFFFFFFFu : 0xFFFFu;
}

// w1 = T(float(w) + d).
template <typename T>
__device__ __forceinline__ T merge_add(T w, float d) {
  return from_float<T>(__fadd_rn(to_float(w), d));
}

// The 2-bit restore code of one element (see csrc/ops.cpp): how w comes back from w2 = T(float(w1) - d).
template <typename T>
__device__ __forceinline__ uint32_t restore_code(T w, float d) {
  const T w1 = merge_add(w, d);
  const T w2 = from_float<T>(__fsub_rn(to_float(w1), d));
  const uint32_t bw = bits_of(w), b2 = bits_of(w2);
  constexpr uint32_t mask = bits_mask<T>();
  if (bw == b2) return 0u;
  if (bw == ((b2 + 1u) & mask)) return 1u;
  if (bw == ((b2 - 1u) & mask)) return 2u;
  return 3u;
}

// The exact inverse of merge_add given the element's restore code; code 3 leaves T(float(w) - d).
template <typename T>
__device__ __forceinline__ T unmerge_exact(T w1, float d, uint32_t code) {
  const T w2 = from_float<T>(__fsub_rn(to_float(w1), d));
  constexpr uint32_t mask = bits_mask<T>();
  const uint32_t b2 = bits_of(w2);
  if (code == 1u) return from_bits<T>((b2 + 1u) & mask);
  if (code == 2u) return from_bits<T>((b2 - 1u) & mask);
  return w2;
}

// ---- the inner products of the staged shrink and expand tiles (shrink.cu, expand.cu, multi_lora.cu) ----

// acc + h . b over 4 ranks, in ascending rank order.
__device__ __forceinline__ float dot4_add(const float4& h, const float4& b, float acc) {
  acc = fmaf(h.x, b.x, acc);
  acc = fmaf(h.y, b.y, acc);
  acc = fmaf(h.z, b.z, acc);
  return fmaf(h.w, b.w, acc);
}

// Shrink tile step: acc[row][j] += sum over kk < 8 of xv[row][kk] * a_s[(kk * 32 + lane) * kAStride + j],
// for the lane's 8 columns of x (xv) against a staged float32 tile a_s whose column kl = 8 * lane + kk
// sits at slot (kk * 32 + lane), kRankTile (a multiple of 4) values per slot, 16-byte aligned.
template <int kRows, int kRankTile, int kAStride>
__device__ __forceinline__ void shrink_tile_fma(float (&acc)[kRows][kRankTile], const float (&xv)[kRows][8],
                                                const float* __restrict__ a_s, int lane) {
#pragma unroll
  for (int kk = 0; kk < 8; ++kk) {
    const float* a_row = a_s + (kk * 32 + lane) * kAStride;
#pragma unroll
    for (int j4 = 0; j4 < kRankTile / 4; ++j4) {
      const float4 av = shared_load_float4(a_row + j4 * 4);
#pragma unroll
      for (int row = 0; row < kRows; ++row) {
        acc[row][j4 * 4 + 0] = fmaf(xv[row][kk], av.x, acc[row][j4 * 4 + 0]);
        acc[row][j4 * 4 + 1] = fmaf(xv[row][kk], av.y, acc[row][j4 * 4 + 1]);
        acc[row][j4 * 4 + 2] = fmaf(xv[row][kk], av.z, acc[row][j4 * 4 + 2]);
        acc[row][j4 * 4 + 3] = fmaf(xv[row][kk], av.w, acc[row][j4 * 4 + 3]);
      }
    }
  }
}

// Expand tile step over one staged rank chunk: acc[row][c] += h_s[row, slice sl[c], :] . b_s[column c, :]
// for the thread's kRows rows (tile rows row0 ..) and 8 columns (lane tx: column c at slot c * 32 + tx
// of b_s, kBStride floats per slot); h_s holds (row, slice, rank) at (row * S + slice) * kRankChunk + rank.
// uniform: all 8 columns lie in slice sl[0], so each h value is read once for the 8 columns.
template <int kRows, int kRankChunk, int kBStride>
__device__ __forceinline__ void expand_tile_fma(float (&acc)[kRows][8], const float* __restrict__ h_s,
                                                const float* __restrict__ b_s, int row0, int tx, int S,
                                                const int (&sl)[8], bool uniform) {
#pragma unroll
  for (int j4 = 0; j4 < kRankChunk / 4; ++j4) {
    if (uniform) {
      float4 hv[kRows];
#pragma unroll
      for (int row = 0; row < kRows; ++row) {
        hv[row] = shared_load_float4(h_s + ((row0 + row) * S + sl[0]) * kRankChunk + j4 * 4);
      }
#pragma unroll
      for (int c = 0; c < 8; ++c) {
        const float4 bv = shared_load_float4(b_s + (c * 32 + tx) * kBStride + j4 * 4);
#pragma unroll
        for (int row = 0; row < kRows; ++row) acc[row][c] = dot4_add(hv[row], bv, acc[row][c]);
      }
    } else {  // the thread's columns straddle a slice boundary
#pragma unroll
      for (int c = 0; c < 8; ++c) {
        const float4 bv = shared_load_float4(b_s + (c * 32 + tx) * kBStride + j4 * 4);
#pragma unroll
        for (int row = 0; row < kRows; ++row) {
          const float4 hv = shared_load_float4(h_s + ((row0 + row) * S + sl[c]) * kRankChunk + j4 * 4);
          acc[row][c] = dot4_add(hv, bv, acc[row][c]);
        }
      }
    }
  }
}

// ---- the tensor-core shrink warp tile (shrink.cu, multi_lora.cu; compiled, not run on a GPU yet) ----

// Eight consecutive 16-bit elements p[0 .. 7] as raw bits, element c in half (c & 1) of word c / 2
// (the low half first, as mma.cuh's registers hold them). One 16-byte load when `vec` (p 16-byte
// aligned and all 8 elements exist); otherwise the first `count` (0 .. 8) elements one by one and
// zero bits (+0.0) for the rest: nothing at or past p + count is read, whatever the alignment.
template <typename T>
__device__ __forceinline__ uint4 load8_bits(const T* p, bool vec, int count) {
  static_assert(sizeof(T) == 2, "load8_bits takes 16-bit elements");
  if (vec) return __ldg(reinterpret_cast<const uint4*>(p));
  const unsigned short* q = reinterpret_cast<const unsigned short*>(p);
  uint32_t w[4] = {0u, 0u, 0u, 0u};
#pragma unroll
  for (int c = 0; c < 8; ++c) {
    if (c < count) w[c >> 1] |= static_cast<uint32_t>(__ldg(q + c)) << (16 * (c & 1));
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}

// v (8 elements as load8_bits packs them) with each element c < count that the dropout mask drops at
// element index index0 + c set to +0.0. The keep scale is not applied here: the mask alone keeps the
// 16-bit values exact, and the caller multiplies the float32 sums by it.
__device__ __forceinline__ uint4 drop8_bits(const DeviceDropout& d, uint64_t index0, int count, uint4 v) {
  uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int c = 0; c < 8; ++c) {
    if (c < count && !dropout_keep(d.key, index0 + c, d.threshold)) w[c >> 1] &= (c & 1) ? 0x0000FFFFu : 0xFFFF0000u;
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}

// One warp, tensor cores: acc[i][j] += the C fragments (mma.cuh) of the [16 x 8] tile
//   sum over k in [k_begin, k_end) of x[m0 + 16 i + row, k] * a_rows[(8 j + col) * K + k]
// for i < kMT (16-token tiles), j < kNT (8-row tiles of a), row < 16, col < 8. Read as zeros, and
// never loaded: rows of x at or past M, rows 8 j + col of a whose bit in row_ok is clear, columns at
// or past K. x has x_row_stride elements between rows (column stride 1); a_rows points at the first of
// the tile's rows of a [., K] (row stride K). k_begin is a multiple of 32; k_end is K or a multiple
// of 32. x_vec / a_vec: the row starts and strides allow 16-byte loads at multiples of 8 columns
// (else every element is loaded alone). kDropout: x elements the mask drops (element index m * K + k)
// count as 0; the caller applies the keep scale to the sums.
//
// Each 32-column step, lane (g, t) (g = lane >> 2, t = lane & 3) loads columns kb + 8t .. kb + 8t + 7
// of x rows m0 + 16 i + g and m0 + 16 i + g + 8 and of a's row 8 j + g: 2 kMT + kNT loads of 16 bytes
// (element-wise ones in the last step of K or for unaligned rows), all issued before the first MMA. Then, per (i, j), two MMAs: the first takes the lane's columns
// 8t .. 8t+3 (words .x = k slots 2t, 2t+1 and .y = slots 2t+8, 2t+9), the second 8t+4 .. 8t+7
// (.z, .w): the same slot-to-column map in A and B, so their product is the sum over all 32 columns
// (see mma.cuh). The MMAs run in a fixed order, so the result repeats bit for bit.
template <typename T, int kMT, int kNT, bool kDropout>
__device__ __forceinline__ void shrink_warp_mma(float (&acc)[kMT][kNT][4], const T* __restrict__ x,
                                                int64_t x_row_stride, int64_t m0, int64_t M,
                                                const T* __restrict__ a_rows, uint32_t row_ok, int64_t K,
                                                int64_t k_begin, int64_t k_end, bool x_vec, bool a_vec,
                                                const DeviceDropout& drop, int lane) {
  static_assert(kMT >= 1 && kNT >= 1 && 8 * kNT <= 32, "row_ok has one bit per row of a");
  const int g = lane >> 2, t = lane & 3;
  // The lane's rows: x rows m0 + 16 i + g + 8 h (h = 0, 1) and a rows 8 j + g, each with whether it
  // is read at all (a row outside points at row 0 of the tile and is never dereferenced).
  const T* xr[kMT][2];
  int64_t xm[kMT][2];
  bool x_in[kMT][2];
#pragma unroll
  for (int i = 0; i < kMT; ++i) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      xm[i][h] = m0 + 16 * i + g + 8 * h;
      x_in[i][h] = xm[i][h] < M;
      xr[i][h] = x + (x_in[i][h] ? xm[i][h] : m0) * x_row_stride;
    }
  }
  const T* ar[kNT];
  bool a_in[kNT];
#pragma unroll
  for (int j = 0; j < kNT; ++j) {
    a_in[j] = (row_ok >> (8 * j + g)) & 1u;
    ar[j] = a_rows + (a_in[j] ? 8 * j + g : 0) * K;
  }

  // Issues the loads of the 32-column step at kb into xv / av (nothing waits for them here).
  const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
  const auto load_step = [&](int64_t kb, uint4 (&xv)[kMT][2], uint4 (&av)[kNT]) {
    const int64_t k0 = kb + 8 * t;
    const int count = K - k0 >= 8 ? 8 : (K - k0 > 0 ? static_cast<int>(K - k0) : 0);
    if (x_vec && a_vec && kb + 32 <= K) {
      // The common step (the same in every lane): all 32 columns exist and every row allows 16-byte
      // loads, so each row is one predicated load, without the element-wise branch.
#pragma unroll
      for (int i = 0; i < kMT; ++i) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          xv[i][h] = x_in[i][h] ? __ldg(reinterpret_cast<const uint4*>(xr[i][h] + k0)) : zero;
        }
      }
#pragma unroll
      for (int j = 0; j < kNT; ++j) av[j] = a_in[j] ? __ldg(reinterpret_cast<const uint4*>(ar[j] + k0)) : zero;
    } else {  // the last step of K, or rows that do not allow 16-byte loads
#pragma unroll
      for (int i = 0; i < kMT; ++i) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int c = x_in[i][h] ? count : 0;
          xv[i][h] = load8_bits(xr[i][h] + k0, x_vec && c == 8, c);
        }
      }
#pragma unroll
      for (int j = 0; j < kNT; ++j) {
        const int c = a_in[j] ? count : 0;
        av[j] = load8_bits(ar[j] + k0, a_vec && c == 8, c);
      }
    }
  };

  // The MMAs of the step at kb on its loaded fragments (dropout applied first).
  const auto mma_step = [&](int64_t kb, uint4 (&xv)[kMT][2], const uint4 (&av)[kNT]) {
    if constexpr (kDropout) {
      const int64_t k0 = kb + 8 * t;
      const int count = K - k0 >= 8 ? 8 : (K - k0 > 0 ? static_cast<int>(K - k0) : 0);
#pragma unroll
      for (int i = 0; i < kMT; ++i) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          xv[i][h] = drop8_bits(drop, static_cast<uint64_t>(xm[i][h] * K + k0), x_in[i][h] ? count : 0, xv[i][h]);
        }
      }
    }
#pragma unroll
    for (int i = 0; i < kMT; ++i) {
#pragma unroll
      for (int j = 0; j < kNT; ++j) {
        const uint32_t a_lo[4] = {xv[i][0].x, xv[i][1].x, xv[i][0].y, xv[i][1].y};
        const uint32_t b_lo[2] = {av[j].x, av[j].y};
        mma_m16n8k16<T>(acc[i][j], a_lo, b_lo);
        const uint32_t a_hi[4] = {xv[i][0].z, xv[i][1].z, xv[i][0].w, xv[i][1].w};
        const uint32_t b_hi[2] = {av[j].z, av[j].w};
        mma_m16n8k16<T>(acc[i][j], a_hi, b_hi);
      }
    }
  };

  // Up to 8 rows of a (2 kMT + kNT <= 6 loads a step): two steps in flight, the loads of step
  // kb + 32 issued before the MMAs of step kb wait for theirs. With 32 rows the second set of
  // fragments does not fit 128 registers (ptxas spilled), so each step loads, then multiplies.
  // Either way the MMAs run in ascending k: the sums are the same.
  if constexpr (kNT <= 2) {
    if (k_begin >= k_end) return;
    uint4 xv[kMT][2];
    uint4 av[kNT];
    load_step(k_begin, xv, av);
    for (int64_t kb = k_begin; kb < k_end; kb += 32) {
      uint4 xn[kMT][2];
      uint4 an[kNT];
      const bool more = kb + 32 < k_end;  // the same in every lane
      if (more) load_step(kb + 32, xn, an);
      mma_step(kb, xv, av);
      if (more) {
#pragma unroll
        for (int i = 0; i < kMT; ++i) {
          xv[i][0] = xn[i][0];
          xv[i][1] = xn[i][1];
        }
#pragma unroll
        for (int j = 0; j < kNT; ++j) av[j] = an[j];
      }
    }
  } else {
    for (int64_t kb = k_begin; kb < k_end; kb += 32) {
      uint4 xv[kMT][2];
      uint4 av[kNT];
      load_step(kb, xv, av);
      mma_step(kb, xv, av);
    }
  }
}

}  // namespace cuda
}  // namespace loracuda
