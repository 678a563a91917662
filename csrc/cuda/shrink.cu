// shrink: h [M, R] (float32) = dropped(x) [M, K] @ a^T, a [R, K].
//
// Memory-bound on reading x once (about R FLOP per byte of bf16 x). A block owns 32 rows of x and a
// tile of 16 ranks and streams K in tiles of 256 columns: the block stages a's [16 x 256] tile in
// shared memory as float32, every warp owns 4 rows and every lane 8 consecutive columns of each
// tile (one 16-byte load per row for bf16/fp16), so each a value read from shared memory feeds 4
// FMAs. Each lane accumulates its columns' products; a warp butterfly sums the 32 lanes at the end.
//
// Small M (decode): the grid of row x rank tiles would leave most of the chip idle, so K is split
// across blocks (grid.z). Each split writes its partial sums to the workspace and a second kernel
// adds the splits in ascending order: no float atomics, the result repeats bit for bit.
//
// Tensor cores (M >= 16, x bf16 / fp16 and a in x's dtype): one warp
// owns 32 tokens x 8, 16 or 32 rows of a (R <= 8, <= 16, larger) and streams its K range in steps
// of 32 columns, loading x and a straight from global memory (16 bytes per lane and row where the
// rows allow, one element at a time where they do not) into mma.sync m16n8k16 fragments
// (common.cuh: shrink_warp_mma; mma.cuh: the layouts). The warps share nothing (no shared memory,
// no barrier); split-K and its ordered reduction are as above. Dropout zeroes the dropped x elements
// (exact in 16 bits) and multiplies the float32 sums by the keep scale. float32 a with 16-bit x keeps
// the FMA path: rounding a to 16 bits would add an error plain PyTorch does not make (docs/design.md, section
// 'Tolerance rule').
// The MMA path is compiled (no spills on sm_80 / sm_90) but has not been run on a GPU yet.
//
// Remaining (not done here): x is re-read (from L2) once per rank tile when R > 16 (FMA) or R > 32
// (MMA); the MMA path does not stage x or a in shared memory (no cp.async pipeline).
#include "common.cuh"

namespace loracuda {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kRowsPerWarp = 4;
constexpr int kBlockRows = (kThreads / 32) * kRowsPerWarp;  // 32 rows of x per block
constexpr int kRankTile = 16;                               // ranks per block (grid.y)
constexpr int kKTile = 256;                                 // columns of x per tile: 32 lanes x 8
// a_s row stride in floats: 16 ranks + 4 padding, so the 8 lanes of one 16-byte shared-memory
// phase (consecutive slots) hit 8 disjoint groups of 4 banks.
constexpr int kAStride = kRankTile + 4;

// The tensor-core path: 4 independent warps per block, each 32 tokens (2 MMA row tiles of 16) x
// 8 * nt rows of a, nt = mma_rank_ntiles(R) n-tiles of 8.
constexpr int kMmaThreads = 128;
constexpr int kMmaWarps = kMmaThreads / 32;
// 4 resident blocks (16 warps) per SM, the occupancy the split-K plan aims at: a 128-register cap,
// under which ptxas also fits the dropout variants without a spill (left free, it gave the sm_80
// bf16 / fp16 dropout kernel of 16 rows 167 registers and an 8-byte stack frame).
constexpr int kMmaMinBlocks = 4;
constexpr int kMmaRowTiles = 2;                  // 16-token MMA tiles per warp
constexpr int kMmaWarpRows = 16 * kMmaRowTiles;  // 32 tokens per warp
constexpr int64_t kMmaMinRows = 16;              // one full MMA row tile; fewer tokens keep the FMA path
// K columns per split-K tile of the tensor-core path: 4 steps of 32, two pipelined loads each. Finer
// than kKTile because one warp, not a block of 8, works through a tile: at small M (few warps) a
// split then costs about 2 memory latencies instead of 4.
constexpr int64_t kMmaKTile = 128;

int mma_rank_ntiles(int64_t rank) { return rank <= 8 ? 1 : (rank <= 16 ? 2 : 4); }

// Shapes and dtypes only (no alignment, no device memory), so the workspace size is fixed for a
// captured graph: 16-bit x with a of the same dtype, M >= 16.
bool use_mma(const ShrinkParams& p) {
  return p.x_dtype != DType::kFloat32 && p.a_dtype == p.x_dtype && p.m >= kMmaMinRows;
}

struct ShrinkPlan {
  bool mma;                 // the tensor-core kernel
  int ntiles;               // mma: n-tiles of 8 rows of a per warp
  int64_t rank_tiles;       // tiles of a's rows: kRankTile (FMA) or 8 * ntiles (mma) rows each
  int64_t row_tiles;        // tiles of x's rows: kBlockRows (FMA) or kMmaWarpRows (mma) rows each
  int64_t num_tiles;        // K tiles of kKTile (FMA) or kMmaKTile (mma) columns (at least 1)
  int64_t tiles_per_split;  // K tiles per block along grid.z
  int64_t splits;           // grid.z; 1 = no workspace
};

ShrinkPlan make_plan(const ShrinkParams& p) {
  ShrinkPlan plan;
  plan.mma = use_mma(p);
  plan.ntiles = plan.mma ? mma_rank_ntiles(p.rank) : 0;
  const int64_t rank_rows = plan.mma ? 8 * plan.ntiles : kRankTile;
  const int64_t tile_rows = plan.mma ? kMmaWarpRows : kBlockRows;
  plan.row_tiles = (p.m + tile_rows - 1) / tile_rows;
  plan.rank_tiles = (p.rank + rank_rows - 1) / rank_rows;
  const int64_t k_tile = plan.mma ? kMmaKTile : kKTile;
  plan.num_tiles = p.k > 0 ? (p.k + k_tile - 1) / k_tile : 1;
  // Work that runs side by side without a split, and how much fills the chip: blocks of 8 warps, 2
  // per SM (FMA); independent warps, 16 per SM (mma).
  const int64_t sms = p.num_sms > 0 ? p.num_sms : 132;
  const int64_t base = plan.row_tiles * plan.rank_tiles;
  const int64_t target = plan.mma ? 16 * sms : 2 * sms;
  int64_t splits = 1;
  if (base > 0 && base < target) {
    splits = (target + base - 1) / base;
    if (splits > plan.num_tiles) splits = plan.num_tiles;
    if (splits > 64) splits = 64;
  }
  plan.tiles_per_split = (plan.num_tiles + splits - 1) / splits;
  plan.splits = (plan.num_tiles + plan.tiles_per_split - 1) / plan.tiles_per_split;  // no empty split
  return plan;
}

// Two resident blocks per SM (a 128-register cap) for bf16/fp16 x, which fits in 128 registers;
// float32 x (twice the x registers) would spill under that cap and keeps one block per SM.
// out: p.h when the grid has one split; else the workspace, of which split blockIdx.z writes the
// slab out + blockIdx.z * M * R.
template <typename TX, typename TA>
__global__ void __launch_bounds__(kThreads, sizeof(TX) == 2 ? 2 : 1) shrink_kernel(const ShrinkParams p, int64_t tiles_per_split, bool x_vec,
                                                          float* __restrict__ out, bool final_output) {
  LORACUDA_SHARED(float, a_s, kKTile * kAStride);

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int64_t M = p.m, K = p.k, R = p.rank;
  // grid.x enumerates (row tile, rank tile) with the rank tile fastest, so the blocks that read the
  // same 32 rows of x run side by side and all but the first find x in L2.
  // The block's rows of a are j0 .. min(j0 + 16, R) - 1.
  const int64_t rank_tiles = (R + kRankTile - 1) / kRankTile;
  const int64_t row_tile = static_cast<int64_t>(blockIdx.x) / rank_tiles;
  const int64_t m_base = row_tile * kBlockRows + warp * kRowsPerWarp;
  const int64_t j0 = (static_cast<int64_t>(blockIdx.x) - row_tile * rank_tiles) * kRankTile;
  const int64_t num_tiles = (K + kKTile - 1) / kKTile;
  const int64_t t_begin = static_cast<int64_t>(blockIdx.z) * tiles_per_split;
  const int64_t t_end = t_begin + tiles_per_split < num_tiles ? t_begin + tiles_per_split : num_tiles;
  const TX* __restrict__ x = static_cast<const TX*>(p.x);
  const TA* __restrict__ a = static_cast<const TA*>(p.a);
  const DeviceDropout drop = make_device_dropout(p.dropout);

  float acc[kRowsPerWarp][kRankTile];
#pragma unroll
  for (int row = 0; row < kRowsPerWarp; ++row) {
#pragma unroll
    for (int j = 0; j < kRankTile; ++j) acc[row][j] = 0.0f;
  }

  for (int64_t t = t_begin; t < t_end; ++t) {
    const int64_t k_tile0 = t * kKTile;
    __syncthreads();  // every warp is done reading the previous tile of a_s
    // Stage a[j0 .. j0+15, k_tile0 .. k_tile0+255] as float32; zeros outside a. Column kl of the
    // tile is read by lane kl / 8 as its element kl % 8, so it is stored at slot (kl % 8) * 32 + kl / 8:
    // lanes then read consecutive slots.
    for (int q = threadIdx.x; q < kKTile * kRankTile; q += kThreads) {
      // Consecutive threads read consecutive addresses of a [R, K] (along k).
      const int jl = q / kKTile;
      const int kl = q % kKTile;
      const int64_t j = j0 + jl, k = k_tile0 + kl;
      const float v = j < R && k < K ? load_float(a + j * K + k) : 0.0f;
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
        if (drop.enabled) {
#pragma unroll
          for (int c = 0; c < 8; ++c) {
            if (c < count) xv[row][c] = apply_dropout(drop, static_cast<uint64_t>(m * K + k0 + c), xv[row][c]);
          }
        }
      } else {
#pragma unroll
        for (int c = 0; c < 8; ++c) xv[row][c] = 0.0f;
      }
    }

    shrink_tile_fma<kRowsPerWarp, kRankTile, kAStride>(acc, xv, a_s, lane);
  }

  // Sum the 32 lanes (xor butterfly: every lane ends with the same total), then lane (idx % 32)
  // writes value idx = row * 16 + j.
  float* __restrict__ dst = final_output ? out : out + static_cast<int64_t>(blockIdx.z) * M * R;
#pragma unroll
  for (int row = 0; row < kRowsPerWarp; ++row) {
#pragma unroll
    for (int j = 0; j < kRankTile; ++j) {
      float v = acc[row][j];
#pragma unroll
      for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
      const int idx = row * kRankTile + j;
      const int64_t m = m_base + row, jj = j0 + j;
      if ((idx & 31) == lane && m < M && jj < R) dst[m * R + jj] = v;
    }
  }
}

// Tensor cores: warp w of block b owns item 4b + w = row tile * rank_tiles + rank tile (the rank
// tile fastest, so the warps that read the same 32 rows of x run side by side and all but the first
// find them in L2): tokens m0 .. m0+31, rows j0 .. j0 + 8 kNT - 1 of a, K tiles of kMmaKTile
// columns [blockIdx.z * tiles_per_split, ..). out and final_output as in shrink_kernel. x_vec / a_vec: see shrink_warp_mma.
template <typename T, int kNT, bool kDropout>
__global__ void __launch_bounds__(kMmaThreads, kMmaMinBlocks) shrink_mma_kernel(const ShrinkParams p, int64_t tiles_per_split,
                                                                  bool x_vec, bool a_vec, float* __restrict__ out,
                                                                  bool final_output) {
  const int lane = threadIdx.x & 31;
  const int64_t M = p.m, K = p.k, R = p.rank;
  int64_t m0, j0;
  if (!mma_warp_item<kMmaWarpRows, 8 * kNT>(M, R, m0, j0)) return;  // a whole warp leaves; no barrier follows
  const int64_t num_tiles = (K + kMmaKTile - 1) / kMmaKTile;
  const int64_t t_begin = static_cast<int64_t>(blockIdx.z) * tiles_per_split;
  const int64_t t_end = t_begin + tiles_per_split < num_tiles ? t_begin + tiles_per_split : num_tiles;
  const int64_t k_begin = t_begin * kMmaKTile;  // a multiple of 32, as shrink_warp_mma needs
  const int64_t k_end = t_end * kMmaKTile < K ? t_end * kMmaKTile : K;
  uint32_t row_ok = 0;  // rows j0 + r of a that exist
#pragma unroll
  for (int r = 0; r < 8 * kNT; ++r) {
    if (j0 + r < R) row_ok |= 1u << r;
  }
  const DeviceDropout drop = make_device_dropout(p.dropout);
  const T* __restrict__ x = static_cast<const T*>(p.x);
  const T* __restrict__ a_rows = static_cast<const T*>(p.a) + j0 * K;

  float acc[kMmaRowTiles][kNT][4];
#pragma unroll
  for (int i = 0; i < kMmaRowTiles; ++i) {
#pragma unroll
    for (int j = 0; j < kNT; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;
    }
  }
  shrink_warp_mma<T, kMmaRowTiles, kNT, kDropout>(acc, x, p.x_row_stride, m0, M, a_rows, row_ok, K, k_begin, k_end,
                                                  x_vec, a_vec, drop, lane);

  // Token m0 + row, row j0 + col of a.
  const float keep = kDropout ? drop.keep_scale : 1.0f;
  float* __restrict__ dst = final_output ? out : out + static_cast<int64_t>(blockIdx.z) * M * R;
  for_each_c_element(acc, lane, [&](int row, int col, float sum) {
    const int64_t m = m0 + row, jj = j0 + col;
    if (m < M && jj < R) dst[m * R + jj] = keep * sum;
  });
}

// h[i] = the sum over splits s = 0, 1, ... of partial[s][i], in that order.
__global__ void __launch_bounds__(256) shrink_reduce_kernel(const float* __restrict__ partial, float* __restrict__ h,
                                                            int64_t count, int64_t splits) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += stride) {
    float s = 0.0f;
    for (int64_t sp = 0; sp < splits; ++sp) s += partial[sp * count + i];
    h[i] = s;
  }
}

}  // namespace

int64_t shrink_workspace_floats(const ShrinkParams& p) {
  if (p.m <= 0 || p.rank <= 0) return 0;
  const ShrinkPlan plan = make_plan(p);
  return plan.splits > 1 ? plan.splits * p.m * p.rank : 0;
}

cudaError_t launch_shrink(const ShrinkParams& p) {
  if (p.m <= 0 || p.rank <= 0) return cudaSuccess;  // nothing to write
  if (p.k < 0) return cudaErrorInvalidValue;
  const ShrinkPlan plan = make_plan(p);
  const int64_t items = plan.row_tiles * plan.rank_tiles;  // blocks (FMA) or warps (mma)
  const int64_t blocks = plan.mma ? (items + kMmaWarps - 1) / kMmaWarps : items;
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  float* out = p.h;
  if (plan.splits > 1) {
    if (p.workspace == nullptr || p.workspace_floats < plan.splits * p.m * p.rank) return cudaErrorInvalidValue;
    out = p.workspace;
  }
  const dim3 grid(static_cast<unsigned>(blocks), 1, static_cast<unsigned>(plan.splits));
  const int x_bytes = p.x_dtype == DType::kFloat32 ? 4 : 2;
  const bool x_vec = vector_rows_ok(p.x, p.x_row_stride, p.m, x_bytes);
  const bool final_output = plan.splits == 1;
  cudaError_t err = dispatch_value_adapter(p.x_dtype, p.a_dtype, [&](auto tx, auto ta) {
    using TX = typename decltype(tx)::type;
    using TA = typename decltype(ta)::type;
    if constexpr (std::is_same<TX, TA>::value && MmaOperand<TX>::kSupported) {
      if (plan.mma) {
        // a [R, K] contiguous: 16-byte row starts iff a is 16-byte aligned and K * 2 bytes is a multiple of 16.
        const bool a_vec = vector_rows_ok(p.a, p.k, p.rank, 2);
        const auto launch = [&](auto kernel) {
          return launch_kernel(kernel, grid, kMmaThreads, p.stream, p, plan.tiles_per_split, x_vec, a_vec, out,
                               final_output);
        };
        // The dropout variant is its own kernel: its hashing would otherwise raise the register count
        // (and lower the occupancy) of the plain one.
        const bool drop = p.dropout.enabled;
        if (plan.ntiles == 1) {
          return drop ? launch(LORACUDA_KERNEL(shrink_mma_kernel<TX, 1, true>))
                      : launch(LORACUDA_KERNEL(shrink_mma_kernel<TX, 1, false>));
        } else if (plan.ntiles == 2) {
          return drop ? launch(LORACUDA_KERNEL(shrink_mma_kernel<TX, 2, true>))
                      : launch(LORACUDA_KERNEL(shrink_mma_kernel<TX, 2, false>));
        }
        return drop ? launch(LORACUDA_KERNEL(shrink_mma_kernel<TX, 4, true>))
                    : launch(LORACUDA_KERNEL(shrink_mma_kernel<TX, 4, false>));
      }
    }
    return launch_kernel(LORACUDA_KERNEL(shrink_kernel<TX, TA>), grid, kThreads, p.stream, p,
                         plan.tiles_per_split, x_vec, out, final_output);
  });
  if (err != cudaSuccess || plan.splits == 1) return err;
  const int64_t count = p.m * p.rank;
  return launch_kernel(LORACUDA_KERNEL(shrink_reduce_kernel), grid_cap((count + 255) / 256, p.num_sms), 256, p.stream,
                       p.workspace, p.h, count, plan.splits);
}

}  // namespace cuda
}  // namespace loracuda
