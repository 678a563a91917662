// multi_shrink and multi_expand_add_: LoRA for a batch whose tokens use different adapters
// (multi-LoRA serving). Adapter l's factors are a[l] [R, K] (R = S * r_max rows; slice i owns rows
// [i*r_max, (i+1)*r_max)) and b[l] [N, r_max]; token m uses adapter ids[m], of rank
// clamp(ranks[l], 0, r_max). The host reads neither ids nor ranks (no synchronisation, so both ops
// can be captured in a CUDA graph): the kernels read them, treat an id outside [0, L) as "no
// adapter", and never form an address from such an id.
//
// The host picks one of two paths from M alone (and for prefill shrink, from the dtypes, the
// tensor-core kernel below):
//  - decode (M <= kDecodeMaxRows: few tokens, typically each with its own adapter) is a gather
//    matrix-vector product. Shrink gives one warp one work item (token, 8-row tile of its
//    adapter's a, range of K chunks) and splits K until the chip has enough warps; expand gives
//    one thread 8 consecutive output columns of one token.
//  - prefill (larger M: segments of tokens that share an adapter): a block owns a tile of 32
//    tokens (and 16 rows of a, or 256 columns of y). When every token of the tile uses the same
//    adapter (decided in the kernel from the ids) the adapter's tile is staged in shared memory
//    once for all 32 tokens, with the layouts of shrink.cu and expand.cu; otherwise (expand) each
//    token does the decode path's per-token work. Shrink splits K here too when the tiles leave the
//    chip idle.
//  - prefill shrink with bf16 / fp16 x and a of the same dtype runs on tensor cores instead: one
//    warp owns 32 tokens x 8, 16 or 32 rows of a (as shrink.cu's tensor-core path) and checks on its
//    own (a warp vote over the 32 ids) whether its tokens share an adapter. If they do, it streams
//    K through mma.sync m16n8k16 (common.cuh: shrink_warp_mma), reading only the rows within the
//    adapter's rank. No shared memory, no barrier.
//  - prefill shrink, tiles whose 32 tokens do not share an adapter (batched decode of many requests
//    with distinct adapters, or a tile without any adapter): the prefill kernels leave them alone and
//    a second launch of the decode kernel, in its "mixed tiles only" mode, gives every token of such a
//    tile its own warps (8 rows of a each, K split as the prefill plan splits it), so the chip stays
//    busy whatever the batch looks like; its warps of a shared-adapter tile leave at once. float32 a
//    keeps the FMA kernel (rounding it to 16 bits would add an error plain PyTorch does not make,
//    docs/design.md, section 'Tolerance rule'). Compiled (no spills on sm_80 / sm_90), not yet run
//    on a GPU.
//
// Split-K partials of shrink go to a workspace [splits, M, R] whose size depends on the shapes and
// dtypes only; a second kernel adds them in ascending split order: no float atomics, results repeat
// bit for bit.
//
// Remaining (not done here): the decode expand reads b from L1/L2 once per token instead of sharing
// it between tokens; the prefill expand kernel takes 178 registers (one block of 8 warps per SM),
// where expand.cu's fits 128, and its mixed tiles update their tokens one thread per 8 columns.
#include "common.cuh"

namespace loracuda {
namespace cuda {
namespace {

// Up to this many tokens (M) the decode path runs; above it the prefill path.
constexpr int64_t kDecodeMaxRows = 64;

constexpr int kPrefillThreads = 256;
constexpr int kRowsPerWarp = 4;
constexpr int kTileRows = (kPrefillThreads / 32) * kRowsPerWarp;  // 32 tokens per prefill block

// shrink
constexpr int kRankTile = 16;               // rows of a per prefill block (grid.x)
// Rows of a per warp work item of the decode kernel (8 rows x 8 values of a in flight per lane fit
// the registers for float32 a).
constexpr int kWarpRows = 8;
constexpr int kKChunk = 32 * 8;             // columns of x per step: 32 lanes x 8
constexpr int kAStride = kRankTile + 4;     // a_s row stride in floats (see shrink.cu: no bank conflicts)
constexpr int kDecodeShrinkThreads = 128;   // 4 warps = 4 independent work items
constexpr int kWarpsPerDecodeBlock = kDecodeShrinkThreads / 32;

// shrink on tensor cores (prefill, 16-bit x and a): 4 independent warps per block, each 32 tokens
// (2 MMA row tiles of 16) x 8 * nt rows of a, nt = mma_rank_ntiles(R).
constexpr int kMmaThreads = 128;
constexpr int kMmaWarps = kMmaThreads / 32;
// 4 resident blocks (16 warps) per SM, the occupancy the split-K plan aims at (a 128-register cap).
constexpr int kMmaMinBlocks = 4;
constexpr int kMmaRowTiles = 2;
constexpr int kMmaWarpRows = 16 * kMmaRowTiles;  // 32 tokens: one id per lane for the vote

// expand
constexpr int kBlockCols = 32 * 8;          // columns of y per prefill block: 32 lanes x 8
constexpr int kRankChunk = 16;              // ranks staged per step
constexpr int kBStride = kRankChunk + 4;    // b_s row stride in floats (see expand.cu)
constexpr int kDecodeExpandThreads = 128;

// ---- ids and ranks ------------------------------------------------------------------------------------

// Token m's adapter, or -1 for an id outside [0, L).
__device__ __forceinline__ int adapter_of(const int32_t* __restrict__ ids, int64_t m, int64_t num_adapters) {
  const int32_t id = ids[m];
  return id >= 0 && id < num_adapters ? id : -1;
}

__device__ __forceinline__ int clamp_rank(int32_t rank, int64_t r_max) {
  return rank < 0 ? 0 : (rank > r_max ? static_cast<int>(r_max) : rank);
}

// The adapter shared by every token of the tile [m0, min(m0 + kTileRows, M)), or -1 when they differ
// or none has one. Block-wide (a barrier inside): every thread of the block gets the same answer.
__device__ __forceinline__ int tile_adapter(const int32_t* __restrict__ ids, int64_t m0, int64_t M,
                                            int64_t num_adapters) {
  const int first = adapter_of(ids, m0, num_adapters);
  const int64_t m = m0 + threadIdx.x;
  const bool same = threadIdx.x >= kTileRows || m >= M || adapter_of(ids, m, num_adapters) == first;
  return __syncthreads_and(same) ? first : -1;
}

// ---- multi_shrink ---------------------------------------------------------------------------------------

// Bit j (j < kRows) is set iff row j0 + j of an adapter's a exists (< R) and its index within its
// slice is below the rank: only those rows are read, all others give h = 0.
template <int kRows>
__device__ __forceinline__ uint32_t used_rows(int64_t j0, int64_t R, int64_t r_max, int rank) {
  uint32_t used = 0;
#pragma unroll
  for (int j = 0; j < kRows; ++j) {
    const int64_t row = j0 + j;
    if (row < R && row % r_max < rank) used |= 1u << j;
  }
  return used;
}

// One warp: dst[m * R + j0 + j] for j < kRows (<= 32) with j0 + j < R = the sum over the K chunks
// [c_begin, c_end) (kKChunk columns each) of x[m, k] * a[id_m, j0 + j, k]; exactly 0 for unused rows
// and for a token without an adapter (nothing is read then). Lane l reads columns 8l .. 8l+7 of each
// chunk (one 16-byte load per row for bf16/fp16); a warp butterfly sums the lanes.
// All 32 lanes must call it with the same arguments but `lane`.
template <typename TX, typename TA, int kRows>
__device__ __forceinline__ void shrink_row_warp(const MultiShrinkParams& p, int64_t m, int64_t j0, int64_t c_begin,
                                                int64_t c_end, bool x_vec, bool a_vec, float* __restrict__ dst,
                                                int lane) {
  const int64_t K = p.k, R = p.rank;
  const int id = adapter_of(p.adapter_ids, m, p.num_adapters);
  const uint32_t used = id >= 0 ? used_rows<kRows>(j0, R, p.r_max, clamp_rank(p.ranks[id], p.r_max)) : 0u;
  float acc[kRows];
#pragma unroll
  for (int j = 0; j < kRows; ++j) acc[j] = 0.0f;
  if (used != 0u) {
    const TX* __restrict__ xr = static_cast<const TX*>(p.x) + m * p.x_row_stride;
    const TA* __restrict__ ar = static_cast<const TA*>(p.a) + (static_cast<int64_t>(id) * R + j0) * K;
    for (int64_t c = c_begin; c < c_end; ++c) {
      const int64_t k0 = c * kKChunk + lane * 8;
      const int count = K - k0 >= 8 ? 8 : (K - k0 > 0 ? static_cast<int>(K - k0) : 0);
      float xv[8];
      load8(xr + k0, x_vec && count == 8, count, xv);
#pragma unroll
      for (int j = 0; j < kRows; ++j) {
        const int cj = (used >> j) & 1u ? count : 0;  // an unused row reads nothing (zeros)
        float av[8];
        load8(ar + j * K + k0, a_vec && cj == 8, cj, av);
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[j] = fmaf(xv[e], av[e], acc[j]);
      }
    }
  }
#pragma unroll
  for (int j = 0; j < kRows; ++j) {
    float v = acc[j];
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    if (lane == j && j0 + j < R) dst[m * R + j0 + j] = (used >> j) & 1u ? v : 0.0f;
  }
}

// Whether the 32-token tile [m0, min(m0 + 32, M)) (m0 a multiple of 32) shares one adapter: the
// prefill kernels' test (tile_adapter, and the tensor-core kernel's vote), as a warp vote. Warp-wide.
__device__ __forceinline__ bool tile_shares_adapter(const int32_t* __restrict__ ids, int64_t m0, int64_t M,
                                                   int64_t num_adapters, int lane) {
  const int first = adapter_of(ids, m0, num_adapters);
  const bool same = m0 + lane >= M || adapter_of(ids, m0 + lane, num_adapters) == first;
  return __all_sync(0xffffffffu, same) && first >= 0;
}

// Decode: warp w of block b does work item 4b + w = ((m * rank_tiles) + tile) * splits + split (tiles
// of kWarpRows rows of a) and writes the slab out + split * M * R (out = h when splits == 1).
// mixed_only (the prefill path's second launch): only tokens of 32-token tiles that do not share an
// adapter; the warps of the other tokens leave (the prefill kernel wrote those).
template <typename TX, typename TA>
__global__ void __launch_bounds__(kDecodeShrinkThreads)
    multi_shrink_decode_kernel(const MultiShrinkParams p, int64_t chunks_per_split, int64_t splits, bool x_vec,
                               bool a_vec, float* __restrict__ out, bool mixed_only) {
  const int lane = threadIdx.x & 31;
  const int64_t item = static_cast<int64_t>(blockIdx.x) * kWarpsPerDecodeBlock + (threadIdx.x >> 5);
  const int64_t rank_tiles = (p.rank + kWarpRows - 1) / kWarpRows;
  if (item >= p.m * rank_tiles * splits) return;  // a whole warp leaves; no block barrier follows
  const int64_t split = item % splits;
  const int64_t rest = item / splits;
  const int64_t m = rest / rank_tiles;
  if (mixed_only && tile_shares_adapter(p.adapter_ids, m & ~int64_t(31), p.m, p.num_adapters, lane)) return;
  const int64_t j0 = (rest - m * rank_tiles) * kWarpRows;
  const int64_t num_chunks = (p.k + kKChunk - 1) / kKChunk;
  const int64_t c_begin = split * chunks_per_split;
  const int64_t c_end = c_begin + chunks_per_split < num_chunks ? c_begin + chunks_per_split : num_chunks;
  shrink_row_warp<TX, TA, kWarpRows>(p, m, j0, c_begin, c_end, x_vec, a_vec, out + split * p.m * p.rank, lane);
}

// Prefill: block (grid.x = row tile * rank_tiles + rank tile, grid.z = split) owns 32 tokens x 16
// rows of a over its K chunks and writes the slab out + blockIdx.z * M * R. A uniform tile stages
// a's [16 x 256] chunk in shared memory as float32 (each value then feeds 4 rows); warp w owns tokens
// 4w .. 4w+3 and lane l columns 8l .. 8l+7 of the chunk, as in shrink.cu.
// Two resident blocks per SM (128 registers) for bf16/fp16 x; float32 x needs more and keeps one.
template <typename TX, typename TA>
__global__ void __launch_bounds__(kPrefillThreads, sizeof(TX) == 2 ? 2 : 1)
    multi_shrink_prefill_kernel(const MultiShrinkParams p, int64_t chunks_per_split, bool x_vec, bool a_vec,
                                float* __restrict__ out) {
  LORACUDA_SHARED(float, a_s, kKChunk * kAStride);

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int64_t M = p.m, K = p.k, R = p.rank;
  const int64_t rank_tiles = (R + kRankTile - 1) / kRankTile;
  const int64_t row_tile = static_cast<int64_t>(blockIdx.x) / rank_tiles;
  const int64_t m_tile0 = row_tile * kTileRows;
  const int64_t m_base = m_tile0 + warp * kRowsPerWarp;
  const int64_t j0 = (static_cast<int64_t>(blockIdx.x) - row_tile * rank_tiles) * kRankTile;
  const int64_t num_chunks = (K + kKChunk - 1) / kKChunk;
  const int64_t c_begin = static_cast<int64_t>(blockIdx.z) * chunks_per_split;
  const int64_t c_end = c_begin + chunks_per_split < num_chunks ? c_begin + chunks_per_split : num_chunks;
  const int id = tile_adapter(p.adapter_ids, m_tile0, M, p.num_adapters);
  // Mixed adapters, or none: the decode kernel's mixed-tiles launch writes these tokens.
  if (id < 0) return;  // `id` is the same in every thread: no thread is left waiting at a barrier below
  const uint32_t used = used_rows<kRankTile>(j0, R, p.r_max, clamp_rank(p.ranks[id], p.r_max));
  if (used == 0u) {  // the rank tile lies past the adapter's rank: h is 0 there, nothing is read
    float* __restrict__ dst = out + static_cast<int64_t>(blockIdx.z) * M * R;
    for (int e = threadIdx.x; e < kTileRows * kRankTile; e += kPrefillThreads) {
      const int64_t m = m_tile0 + e / kRankTile, j = j0 + e % kRankTile;
      if (m < M && j < R) dst[m * R + j] = 0.0f;
    }
    return;  // as above, the same in every thread
  }

  const TX* __restrict__ x = static_cast<const TX*>(p.x);
  const TA* __restrict__ a = static_cast<const TA*>(p.a) + static_cast<int64_t>(id) * R * K;
  float acc[kRowsPerWarp][kRankTile];
#pragma unroll
  for (int row = 0; row < kRowsPerWarp; ++row) {
#pragma unroll
    for (int j = 0; j < kRankTile; ++j) acc[row][j] = 0.0f;
  }

  for (int64_t c = c_begin; c < c_end; ++c) {
    const int64_t k_tile0 = c * kKChunk;
    __syncthreads();  // every warp is done reading the previous chunk of a_s
    // a[id, j0 + jl, k_tile0 + kl] as float32 (0 for unused rows and k >= K) at slot
    // (kl % 8) * 32 + kl / 8: lane kl / 8 reads it as its element kl % 8. Consecutive threads read
    // consecutive k.
    for (int q = threadIdx.x; q < kKChunk * kRankTile; q += kPrefillThreads) {
      const int jl = q / kKChunk;
      const int kl = q - jl * kKChunk;
      const int64_t k = k_tile0 + kl;
      const float v = ((used >> jl) & 1u) && k < K ? load_float(a + (j0 + jl) * K + k) : 0.0f;
      shared_store(a_s + ((kl & 7) * 32 + (kl >> 3)) * kAStride + jl, v);
    }
    __syncthreads();

    const int64_t k0 = k_tile0 + lane * 8;
    const int count = K - k0 >= 8 ? 8 : (K - k0 > 0 ? static_cast<int>(K - k0) : 0);
    float xv[kRowsPerWarp][8];
#pragma unroll
    for (int row = 0; row < kRowsPerWarp; ++row) {
      const int64_t m = m_base + row;
      if (m < M && count > 0) {
        load8(x + m * p.x_row_stride + k0, x_vec && count == 8, count, xv[row]);
      } else {
#pragma unroll
        for (int e = 0; e < 8; ++e) xv[row][e] = 0.0f;
      }
    }

    shrink_tile_fma<kRowsPerWarp, kRankTile, kAStride>(acc, xv, a_s, lane);
  }

  // Sum the 32 lanes (xor butterfly: every lane ends with the total), then lane idx % 32 writes
  // value idx = row * 16 + j.
  float* __restrict__ dst = out + static_cast<int64_t>(blockIdx.z) * M * R;
#pragma unroll
  for (int row = 0; row < kRowsPerWarp; ++row) {
#pragma unroll
    for (int j = 0; j < kRankTile; ++j) {
      float v = acc[row][j];
#pragma unroll
      for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
      const int idx = row * kRankTile + j;
      const int64_t m = m_base + row;
      if ((idx & 31) == lane && m < M && j0 + j < R) dst[m * R + j0 + j] = (used >> j) & 1u ? v : 0.0f;
    }
  }
}

// Prefill on tensor cores: warp w of block b owns item 4b + w = row tile * rank_tiles + rank tile:
// tokens m0 .. m0+31 (m0 = 32 * row tile), rows j0 .. j0 + 8 kNT - 1 of the adapters' a, K chunks
// [blockIdx.z * chunks_per_split, ..), written to the slab out + blockIdx.z * M * R.
template <typename T, int kNT>
__global__ void __launch_bounds__(kMmaThreads, kMmaMinBlocks)
    multi_shrink_prefill_mma_kernel(const MultiShrinkParams p, int64_t chunks_per_split, bool x_vec, bool a_vec,
                                    float* __restrict__ out) {
  const int lane = threadIdx.x & 31;
  const int64_t M = p.m, K = p.k, R = p.rank;
  int64_t m0, j0;
  if (!mma_warp_item<kMmaWarpRows, 8 * kNT>(M, R, m0, j0)) return;  // a whole warp leaves; no barrier follows

  // The warp's adapter: lane l votes for token m0 + l (tokens past M agree with anything). Mixed
  // adapters, or none: the decode kernel's mixed-tiles launch writes these tokens (its test,
  // tile_shares_adapter, is this one).
  const int first = adapter_of(p.adapter_ids, m0, p.num_adapters);
  const bool same = m0 + lane >= M || adapter_of(p.adapter_ids, m0 + lane, p.num_adapters) == first;
  const int id = __all_sync(0xffffffffu, same) ? first : -1;
  if (id < 0) return;
  const int64_t num_chunks = (K + kKChunk - 1) / kKChunk;
  const int64_t c_begin = static_cast<int64_t>(blockIdx.z) * chunks_per_split;
  const int64_t c_end = c_begin + chunks_per_split < num_chunks ? c_begin + chunks_per_split : num_chunks;
  const uint32_t used = used_rows<8 * kNT>(j0, R, p.r_max, clamp_rank(p.ranks[id], p.r_max));

  float acc[kMmaRowTiles][kNT][4];
#pragma unroll
  for (int i = 0; i < kMmaRowTiles; ++i) {
#pragma unroll
    for (int j = 0; j < kNT; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;
    }
  }
  if (used != 0u) {  // warp-uniform: id, j0 and the ranks are the same in every lane
    const T* __restrict__ a_rows = static_cast<const T*>(p.a) + (static_cast<int64_t>(id) * R + j0) * K;
    const DeviceDropout no_dropout{};
    shrink_warp_mma<T, kMmaRowTiles, kNT, false>(acc, static_cast<const T*>(p.x), p.x_row_stride, m0, M, a_rows,
                                                 used, K, c_begin * kKChunk,
                                                 c_end * kKChunk < K ? c_end * kKChunk : K, x_vec, a_vec,
                                                 no_dropout, lane);
  }

  // Token m0 + row, row j0 + col of a; rows beyond the adapter's rank are written as exactly 0.
  float* __restrict__ dst = out + static_cast<int64_t>(blockIdx.z) * M * R;
  // Row j of a is used iff j % r_max < the rank: tested again here rather than through `used` kept
  // across the MMA loop (with it, ptxas spilled 8 bytes in the kNT = 2 variants under the 128-register cap).
  const int64_t rank_end = clamp_rank(p.ranks[id], p.r_max);
  for_each_c_element(acc, lane, [&](int row, int col, float v) {
    const int64_t m = m0 + row;
    const int64_t j = j0 + col;
    if (m < M && j < R) dst[m * R + j] = j % p.r_max < rank_end ? v : 0.0f;
  });
}

// h[i] = sum over splits s = 0, 1, ... of partial[s * count + i], in that order.
__global__ void __launch_bounds__(256) multi_shrink_reduce_kernel(const float* __restrict__ partial,
                                                                  float* __restrict__ h, int64_t count,
                                                                  int64_t splits) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += stride) {
    float s = 0.0f;
    for (int64_t sp = 0; sp < splits; ++sp) s += partial[sp * count + i];
    h[i] = s;
  }
}

// Tensor-core n-tiles of 8 rows of a per warp for R rows.
int mma_rank_ntiles(int64_t rank) { return rank <= 8 ? 1 : (rank <= 16 ? 2 : 4); }

struct MultiShrinkPlan {
  bool decode;
  bool mma;                  // prefill on tensor cores (16-bit x, a in x's dtype)
  int ntiles;                // mma: n-tiles of 8 rows of a per warp
  int64_t rank_tiles;        // tiles of a's rows: kWarpRows (decode), kRankTile (prefill), 8 * ntiles (mma)
  int64_t row_tiles;         // prefill: tiles of kTileRows (FMA) or kMmaWarpRows (mma) tokens
  int64_t num_chunks;        // K chunks of kKChunk columns (at least 1)
  int64_t chunks_per_split;  // K chunks per work item / block
  int64_t splits;            // 1 = no workspace
};

// Shapes and dtypes only (M, K, R, the dtypes and the SM count; no pointer, no device memory), so the
// workspace size is fixed for a captured graph.
MultiShrinkPlan make_plan(const MultiShrinkParams& p) {
  MultiShrinkPlan plan;
  plan.decode = p.m <= kDecodeMaxRows;
  plan.mma = !plan.decode && p.x_dtype != DType::kFloat32 && p.a_dtype == p.x_dtype;
  plan.ntiles = plan.mma ? mma_rank_ntiles(p.rank) : 0;
  const int64_t tile = plan.decode ? kWarpRows : (plan.mma ? 8 * plan.ntiles : kRankTile);
  plan.rank_tiles = (p.rank + tile - 1) / tile;
  const int64_t tile_rows = plan.mma ? kMmaWarpRows : kTileRows;
  plan.row_tiles = (p.m + tile_rows - 1) / tile_rows;
  plan.num_chunks = p.k > 0 ? (p.k + kKChunk - 1) / kKChunk : 1;
  const int64_t sms = p.num_sms > 0 ? p.num_sms : 132;
  // Work that runs side by side without a split, and how much fills the chip: warps for decode and
  // the tensor-core prefill (16 per SM: 4 blocks of 4 warps), blocks of 8 warps for the FMA prefill
  // (2 per SM, as shrink.cu).
  const int64_t base = plan.decode ? p.m * plan.rank_tiles : plan.row_tiles * plan.rank_tiles;
  const int64_t target = plan.decode || plan.mma ? 16 * sms : 2 * sms;
  int64_t splits = 1;
  if (base > 0 && base < target) {
    splits = (target + base - 1) / base;
    if (splits > plan.num_chunks) splits = plan.num_chunks;
    if (splits > 64) splits = 64;
  }
  plan.chunks_per_split = (plan.num_chunks + splits - 1) / splits;
  plan.splits = (plan.num_chunks + plan.chunks_per_split - 1) / plan.chunks_per_split;  // no empty split
  return plan;
}

// ---- multi_expand_add_ ------------------------------------------------------------------------------------

// The slice (0 .. S-1) that holds column n: slice i owns [off[i], off[i+1]).
__device__ __forceinline__ int slice_of(const MultiExpandParams& p, int64_t n) {
  int s = 0;
  while (s + 1 < p.num_slices && n >= p.slice_offsets[s + 1]) ++s;
  return s;
}

// One thread, one token m, columns n0 .. n0+7 (those < N): for a token with an adapter,
// y[m, n] += scale * sum_{j < rank} h[m, slice(n) * r_max + j] * b[id, n, j], added once in float32
// and rounded once; a token without an adapter is not touched. b's 8 rows are contiguous
// (8 * r_max elements) and read straight from global memory; h columns j >= rank are never read.
template <typename TY, typename TB>
__device__ __forceinline__ void expand_row8(const MultiExpandParams& p, int64_t m, int64_t n0, bool y_vec, bool b_vec,
                                            bool h_vec) {
  const int64_t N = p.n, r_max = p.r_max;
  const int count = N - n0 >= 8 ? 8 : (N - n0 > 0 ? static_cast<int>(N - n0) : 0);
  const int id = adapter_of(p.adapter_ids, m, p.num_adapters);
  if (id < 0 || count == 0) return;
  const int rank = clamp_rank(p.ranks[id], r_max);
  const float scale = p.scales[id];
  int sl[8];
#pragma unroll
  for (int c = 0; c < 8; ++c) sl[c] = slice_of(p, n0 + c < N ? n0 + c : N - 1);
  const bool uniform = sl[0] == sl[7];
  const float* __restrict__ hr = p.h + m * p.num_slices * r_max;
  const TB* __restrict__ br = static_cast<const TB*>(p.b) + (static_cast<int64_t>(id) * N + n0) * r_max;

  float acc[8];
#pragma unroll
  for (int c = 0; c < 8; ++c) acc[c] = 0.0f;
  for (int j0 = 0; j0 < rank; j0 += 8) {
    const int cj = rank - j0 >= 8 ? 8 : rank - j0;
    float hv[8];
    if (uniform) load8(hr + sl[0] * r_max + j0, h_vec && cj == 8, cj, hv);  // shared by the 8 columns
#pragma unroll
    for (int c = 0; c < 8; ++c) {
      if (c < count) {
        if (!uniform) load8(hr + sl[c] * r_max + j0, h_vec && cj == 8, cj, hv);
        float bv[8];
        load8(br + c * r_max + j0, b_vec && cj == 8, cj, bv);
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[c] = fmaf(hv[e], bv[e], acc[c]);
      }
    }
  }

  TY* yp = static_cast<TY*>(p.y) + m * p.y_row_stride + n0;
  const bool vec = y_vec && count == 8;
  TY yv[8];
  load8_rw(yp, vec, count, yv);
#pragma unroll
  for (int c = 0; c < 8; ++c) yv[c] = from_float<TY>(to_float(yv[c]) + scale * acc[c]);
  store8(yp, vec, count, yv);
}

// Decode: thread item = m * ceil(N / 8) + column chunk; consecutive threads update consecutive
// 16-byte pieces of one row of y.
template <typename TY, typename TB>
__global__ void __launch_bounds__(kDecodeExpandThreads)
    multi_expand_decode_kernel(const MultiExpandParams p, bool y_vec, bool b_vec, bool h_vec) {
  const int64_t col_chunks = (p.n + 7) / 8;
  const int64_t item = static_cast<int64_t>(blockIdx.x) * kDecodeExpandThreads + threadIdx.x;
  if (item >= p.m * col_chunks) return;
  const int64_t m = item / col_chunks;
  expand_row8<TY, TB>(p, m, (item - m * col_chunks) * 8, y_vec, b_vec, h_vec);
}

// Prefill: block grid.x = row tile * col_tiles + column tile owns 32 tokens x 256 columns of y; warp w
// owns tokens 4w .. 4w+3 and lane l columns 8l .. 8l+7. A uniform tile streams the rank in chunks of
// 16: b's [256 x 16] chunk and h's [32 x S x 16] chunk are staged in shared memory as float32 and
// every thread accumulates its 4 x 8 outputs in registers, as in expand.cu.
template <typename TY, typename TB>
// One resident block per SM, said explicitly: without the minimum, ptxas for sm_80 capped the bf16 /
// fp16 variants at 128 registers and spilled (about 180-226 are needed; see the file header).
__global__ void __launch_bounds__(kPrefillThreads, 1)
    multi_expand_prefill_kernel(const MultiExpandParams p, bool y_vec, bool b_vec, bool h_vec) {
  LORACUDA_SHARED(float, b_s, kBlockCols * kBStride);
  LORACUDA_SHARED(float, h_s, kTileRows * kMaxSlices * kRankChunk);

  const int tx = threadIdx.x & 31;
  const int ty = threadIdx.x >> 5;
  const int64_t M = p.m, N = p.n, r_max = p.r_max;
  const int S = p.num_slices;
  const int64_t h_width = S * r_max;
  const int64_t col_tiles = (N + kBlockCols - 1) / kBlockCols;
  const int64_t row_tile = static_cast<int64_t>(blockIdx.x) / col_tiles;
  const int64_t m_tile0 = row_tile * kTileRows;
  const int64_t n_tile0 = (static_cast<int64_t>(blockIdx.x) - row_tile * col_tiles) * kBlockCols;
  const int64_t m_base = m_tile0 + ty * kRowsPerWarp;
  const int64_t n0 = n_tile0 + tx * 8;

  const int id = tile_adapter(p.adapter_ids, m_tile0, M, p.num_adapters);
  if (id < 0) {
    // Mixed adapters, or none: each thread updates its tokens one by one (skipping those without).
#pragma unroll 1
    for (int row = 0; row < kRowsPerWarp; ++row) {
      const int64_t m = m_base + row;
      if (m < M) expand_row8<TY, TB>(p, m, n0, y_vec, b_vec, h_vec);
    }
    return;  // `id` is the same in every thread, so no thread is left waiting at a barrier below
  }
  const int rank = clamp_rank(p.ranks[id], r_max);
  const float scale = p.scales[id];
  const TB* __restrict__ b = static_cast<const TB*>(p.b) + static_cast<int64_t>(id) * N * r_max;
  const float* __restrict__ h = p.h;

  // The slice of each of this thread's 8 columns (columns past N take the last one; never stored).
  int sl[8];
#pragma unroll
  for (int c = 0; c < 8; ++c) sl[c] = slice_of(p, n0 + c < N ? n0 + c : N - 1);
  const bool uniform = sl[0] == sl[7];

  float acc[kRowsPerWarp][8];
#pragma unroll
  for (int row = 0; row < kRowsPerWarp; ++row) {
#pragma unroll
    for (int c = 0; c < 8; ++c) acc[row][c] = 0.0f;
  }

  for (int j0 = 0; j0 < rank; j0 += kRankChunk) {
    __syncthreads();  // the previous chunk is no longer read
    // b chunk: b[id, n_tile0 + nl, j0 + jj] (0 for n >= N or j >= rank) at slot (nl % 8) * 32 + nl / 8
    // (lane nl / 8 reads it as its column nl % 8). Consecutive threads follow j, b's unit stride.
    for (int q = threadIdx.x; q < kBlockCols * kRankChunk; q += kPrefillThreads) {
      const int nl = q / kRankChunk;
      const int jj = q - nl * kRankChunk;
      const int64_t n = n_tile0 + nl;
      const int j = j0 + jj;
      const float v = n < N && j < rank ? load_float(b + n * r_max + j) : 0.0f;
      shared_store(b_s + ((nl & 7) * 32 + (nl >> 3)) * kBStride + jj, v);
    }
    // h chunk: (row, slice, jj) at (row * S + slice) * 16 + jj; 0 for m >= M or j >= rank.
    const int h_count = kTileRows * S * kRankChunk;
    for (int q = threadIdx.x; q < h_count; q += kPrefillThreads) {
      const int row = q / (S * kRankChunk);
      const int rem = q - row * (S * kRankChunk);
      const int s = rem / kRankChunk;
      const int jj = rem - s * kRankChunk;
      const int64_t m = m_tile0 + row;
      const int j = j0 + jj;
      shared_store(h_s + q, m < M && j < rank ? h[m * h_width + s * r_max + j] : 0.0f);
    }
    __syncthreads();

    expand_tile_fma<kRowsPerWarp, kRankChunk, kBStride>(acc, h_s, b_s, ty * kRowsPerWarp, tx, S, sl, uniform);
  }

  const int count = N - n0 >= 8 ? 8 : (N - n0 > 0 ? static_cast<int>(N - n0) : 0);
  TY* __restrict__ y = static_cast<TY*>(p.y);
#pragma unroll
  for (int row = 0; row < kRowsPerWarp; ++row) {
    const int64_t m = m_base + row;
    if (m >= M || count == 0) continue;
    TY* yp = y + m * p.y_row_stride + n0;
    const bool vec = y_vec && count == 8;
    TY yv[8];
    load8_rw(yp, vec, count, yv);
#pragma unroll
    for (int c = 0; c < 8; ++c) yv[c] = from_float<TY>(to_float(yv[c]) + scale * acc[row][c]);
    store8(yp, vec, count, yv);
  }
}

}  // namespace

int64_t multi_shrink_workspace_floats(const MultiShrinkParams& p) {
  if (p.m <= 0 || p.rank <= 0) return 0;
  const MultiShrinkPlan plan = make_plan(p);
  return plan.splits > 1 ? plan.splits * p.m * p.rank : 0;
}

cudaError_t launch_multi_shrink(const MultiShrinkParams& p) {
  if (p.m <= 0 || p.rank <= 0) return cudaSuccess;  // nothing to write
  if (p.k <= 0 || p.r_max <= 0 || p.rank % p.r_max != 0 || p.num_adapters <= 0) return cudaErrorInvalidValue;
  const MultiShrinkPlan plan = make_plan(p);
  float* out = p.h;
  if (plan.splits > 1) {
    if (p.workspace == nullptr || p.workspace_floats < plan.splits * p.m * p.rank) return cudaErrorInvalidValue;
    out = p.workspace;
  }
  const int x_bytes = p.x_dtype == DType::kFloat32 ? 4 : 2;
  const int a_bytes = p.a_dtype == DType::kFloat32 ? 4 : 2;
  const bool x_vec = vector_rows_ok(p.x, p.x_row_stride, p.m, x_bytes);
  const bool a_vec = vector_rows_ok(p.a, p.k, p.num_adapters * p.rank, a_bytes);
  // The decode kernel's warps: every (token, 8 rows of a, split); with the prefill path, the same
  // count for its mixed-tiles launch (all but the tokens of mixed tiles leave at once).
  const int64_t gather_rank_tiles = (p.rank + kWarpRows - 1) / kWarpRows;
  const int64_t gather_blocks =
      (p.m * gather_rank_tiles * plan.splits + kWarpsPerDecodeBlock - 1) / kWarpsPerDecodeBlock;
  const int64_t prefill_items = plan.row_tiles * plan.rank_tiles;  // blocks (FMA) or warps (mma)
  const int64_t prefill_blocks = plan.mma ? (prefill_items + kMmaWarps - 1) / kMmaWarps : prefill_items;
  if (gather_blocks > 0x7fffffff || prefill_blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  cudaError_t err = dispatch_value_adapter(p.x_dtype, p.a_dtype, [&](auto tx, auto ta) {
    using TX = typename decltype(tx)::type;
    using TA = typename decltype(ta)::type;
    const auto gather = [&](bool mixed_only) {
      return launch_kernel(LORACUDA_KERNEL(multi_shrink_decode_kernel<TX, TA>), static_cast<unsigned>(gather_blocks),
                           kDecodeShrinkThreads, p.stream, p, plan.chunks_per_split, plan.splits, x_vec, a_vec, out,
                           mixed_only);
    };
    if (plan.decode) return gather(false);
    const dim3 grid(static_cast<unsigned>(prefill_blocks), 1, static_cast<unsigned>(plan.splits));
    cudaError_t prefill_err = cudaSuccess;
    bool launched = false;
    if constexpr (std::is_same<TX, TA>::value && MmaOperand<TX>::kSupported) {
      if (plan.mma) {
        const auto launch = [&](auto kernel) {
          return launch_kernel(kernel, grid, kMmaThreads, p.stream, p, plan.chunks_per_split, x_vec, a_vec, out);
        };
        prefill_err = plan.ntiles == 1   ? launch(LORACUDA_KERNEL(multi_shrink_prefill_mma_kernel<TX, 1>))
                      : plan.ntiles == 2 ? launch(LORACUDA_KERNEL(multi_shrink_prefill_mma_kernel<TX, 2>))
                                         : launch(LORACUDA_KERNEL(multi_shrink_prefill_mma_kernel<TX, 4>));
        launched = true;
      }
    }
    if (!launched) {
      prefill_err = launch_kernel(LORACUDA_KERNEL(multi_shrink_prefill_kernel<TX, TA>), grid, kPrefillThreads,
                                  p.stream, p, plan.chunks_per_split, x_vec, a_vec, out);
    }
    if (prefill_err != cudaSuccess) return prefill_err;
    return gather(true);  // the tokens of the tiles the prefill kernel left alone
  });
  if (err != cudaSuccess || plan.splits == 1) return err;
  const int64_t count = p.m * p.rank;
  return launch_kernel(LORACUDA_KERNEL(multi_shrink_reduce_kernel), grid_cap((count + 255) / 256, p.num_sms), 256,
                       p.stream, p.workspace, p.h, count, plan.splits);
}

cudaError_t launch_multi_expand_add(const MultiExpandParams& p) {
  if (p.m <= 0 || p.n <= 0) return cudaSuccess;  // nothing to update
  if (p.r_max <= 0 || p.num_slices < 1 || p.num_slices > kMaxSlices || p.num_adapters <= 0) {
    return cudaErrorInvalidValue;
  }
  const int y_bytes = p.y_dtype == DType::kFloat32 ? 4 : 2;
  const int b_bytes = p.b_dtype == DType::kFloat32 ? 4 : 2;
  const bool y_vec = vector_rows_ok(p.y, p.y_row_stride, p.m, y_bytes);
  // b rows of r_max elements and h rows of S * r_max floats, read 8 ranks at a time from rank 0.
  const bool b_vec = aligned16(p.b) && (p.r_max * b_bytes) % 16 == 0;
  const bool h_vec = aligned16(p.h) && p.r_max % 4 == 0;
  const bool decode = p.m <= kDecodeMaxRows;
  const int64_t blocks = decode ? (p.m * ((p.n + 7) / 8) + kDecodeExpandThreads - 1) / kDecodeExpandThreads
                                : ((p.m + kTileRows - 1) / kTileRows) * ((p.n + kBlockCols - 1) / kBlockCols);
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  return dispatch_value_adapter(p.y_dtype, p.b_dtype, [&](auto ty, auto tb) {
    using TY = typename decltype(ty)::type;
    using TB = typename decltype(tb)::type;
    if (decode) {
      return launch_kernel(LORACUDA_KERNEL(multi_expand_decode_kernel<TY, TB>), static_cast<unsigned>(blocks),
                           kDecodeExpandThreads, p.stream, p, y_vec, b_vec, h_vec);
    }
    return launch_kernel(LORACUDA_KERNEL(multi_expand_prefill_kernel<TY, TB>), static_cast<unsigned>(blocks),
                         kPrefillThreads, p.stream, p, y_vec, b_vec, h_vec);
  });
}

}  // namespace cuda
}  // namespace loracuda
