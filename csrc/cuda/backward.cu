// backward of one LoRA linear layer (formulas in csrc/ops.cpp, docs/design.md, section 'Math and memory passes'), in
// two passes:
//
//   pass over grad_y:  g      [M, R] = scale * grad_y[:, slice i] @ b[slice i]    (float32 scratch p.g)
//                      grad_b [N, r] = scale * grad_y^T @ h (slice-wise)
//   pass over x:       grad_a [R, K] = g^T @ dropped(x)
//                      grad_x [M, K] += dropped(g @ a)                           (when grad_x is given)
//
// Bytes moved per element: grad_y is read once (2 or 4 bytes); x is read once and grad_x read and
// written once (2 or 4 bytes each). Besides these, the small operands (h, g, a, b, L2-resident) and
// float32 partial sums: g's sums per 256-column tile of grad_y (r floats per row for each slice that
// meets the tile: about 4 * r / 256 bytes per element of grad_y, written once and read once by the
// finalizer; 0.25 bytes at r = 16) and the per-chunk sums of grad_b and grad_a (about 2 * SMs /
// column tiles chunks, independent of M).
//
// Both passes share one shape. A block owns a tile of 256 columns (of grad_y or x) and a chunk of
// rows, which it walks in groups of 32 rows. Each group is loaded from global memory once, every
// element by exactly one thread (warp w: rows 4w .. 4w+3 of the group, lane l: columns 8l .. 8l+7,
// one 16-byte load per row for bf16 / fp16 where the rows allow it), and staged in shared memory as
// float32 (x with the dropout mask applied: the mask is computed once per element, element index
// m * K + k). The column reduction over rows (grad_b, grad_a) would need 8 * rank accumulators per
// thread if one thread covered every rank, so the ranks are tiled across the warps instead: each
// warp owns a tile of 8 ranks (64 accumulators: its lane's 8 columns x 8 ranks, in registers for
// the whole chunk) and reads every row of the group from shared memory; with fewer than 8 rank
// tiles, the warps of one tile split the group's rows by phase and their sums are added in phase
// order at the end of the chunk. A block covers up to 8 rank tiles (64 ranks, grid.z beyond: the
// only case in which grad_y or x is read again, once per further 64 ranks; grad_x is updated by the
// blocks of the first 64 only).
//
// Pass over grad_y: each warp keeps b's values for its columns and ranks in registers; per row it
// adds grad_y * h into grad_b's accumulators and sums grad_y * b over its columns into g's, which a
// warp reduction (fixed butterfly) adds over the tile's 256 columns; the tile's g sums go to the
// workspace, slice by slice for the slices that meet the tile (a column adds only to its own slice:
// an inf in one slice of grad_y leaves the other slices' g finite), and a finalize kernel adds the
// column tiles in ascending order and multiplies by scale.
// Pass over x: grad_a's accumulators as above (g read per row); the thread that loaded x[m, 8 cols]
// also computes the rank-R term of grad_x[m, 8 cols] for its 4 rows, streaming the ranks in chunks of
// 16 through shared memory (a's [256 x 16] tile and g's [32 x 16] tile, the expand kernel's inner
// product, common.cuh), applies the element's mask, and reads, adds to and writes grad_x once.
//
// Reductions over M: each block writes its chunk's sums, a second kernel adds the chunks in
// ascending order and writes the adapter dtype. No float atomics: runs repeat bit for bit.
//
// One resident block per SM (the 64 accumulators and, in the grad_y pass, 64 b values per thread do
// not fit a 128-register cap: ptxas spilled), so a block overlaps its own loads with its work: the
// next group's loads are issued into registers before the current group is computed.
// Compiled for sm_80 / sm_90 without spills (ptxas takes 220-250 registers under the 255 cap and still
// fits every kernel in 184 without a spill); not run on a GPU yet.
#include "common.cuh"

namespace loracuda {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kTileCols = 32 * 8;                  // columns per block: 8 per lane
constexpr int kLoadRows = 4;                       // rows of a group each warp loads
constexpr int kGroupRows = kWarps * kLoadRows;     // 32 rows staged at a time
constexpr int kRankTile = 8;                       // ranks per warp (its accumulators: 8 columns x 8)
constexpr int kGroupTiles = kWarps;                // rank tiles per block (grid.z tiles the rest)
constexpr int kGroupRanks = kRankTile * kGroupTiles;  // 64
constexpr int kStageFloats = kGroupRows * kTileCols;  // 8192: the staged group, 32 KiB
// grad_x's rank chunk and a's staged tile (as in expand.cu): 16 ranks, slot stride 20 floats so that
// lanes reading consecutive slots hit disjoint banks.
constexpr int kXRankChunk = 16;
constexpr int kAStride = kXRankChunk + 4;
// The warps of one rank tile are at most kWarps / 2 phases apart only when the block has at most 4
// tiles; their phase sums then fit the staging buffer (tile, column, rank, lane).
static_assert(4 * 8 * kRankTile * 32 <= kStageFloats, "phase sums fit the staging buffer");
static_assert(kTileCols * kAStride + kGroupRows * kXRankChunk <= kStageFloats, "a and g tiles fit the staging buffer");

// ---- index helpers ---------------------------------------------------------------------------------

// Where lane `lane`'s column 8 * lane + cc of staged row `row` sits: lanes are the fastest index, so
// a warp's 32 lanes read 32 consecutive words (no bank conflicts).
__device__ __forceinline__ int stage_slot(int row, int cc, int lane) { return row * kTileCols + cc * 32 + lane; }

// The number of the 8 columns c0 .. c0+7 that exist (0 .. 8) in a row of C columns.
__device__ __forceinline__ int columns_in_row(int64_t c0, int64_t C) {
  return C - c0 >= 8 ? 8 : (C - c0 > 0 ? static_cast<int>(C - c0) : 0);
}

// ---- the loads of a group --------------------------------------------------------------------------

// The 8 elements a thread loads from one row of a group, as loaded: raw bits for 16-bit values (one
// uint4), two float4 for float32. The next group's loads are issued before the current group is
// computed and converted only when it is staged, so their latency hides behind that work.
template <typename T>
struct Row8 {
  uint4 bits;
};
template <>
struct Row8<float> {
  float4 lo, hi;
};

// Elements p[0 .. count-1] (count 0 .. 8; the rest zero, nothing past p + count read); one 16-byte
// load per 8 bytes x 2 when `vec` (p 16-byte aligned and count == 8).
template <typename T>
__device__ __forceinline__ Row8<T> load_row8(const T* p, bool vec, int count) {
  Row8<T> row;
  row.bits = load8_bits(p, vec, count);
  return row;
}
template <>
__device__ __forceinline__ Row8<float> load_row8<float>(const float* p, bool vec, int count) {
  float v[8];
  load8(p, vec, count, v);
  Row8<float> row;
  row.lo = make_float4(v[0], v[1], v[2], v[3]);
  row.hi = make_float4(v[4], v[5], v[6], v[7]);
  return row;
}

// The 8 loaded elements as float32 (element c of 16-bit values: half c & 1 of word c / 2).
template <typename T>
__device__ __forceinline__ void row8_floats(const Row8<T>& row, float (&v)[8]) {
  const uint32_t w[4] = {row.bits.x, row.bits.y, row.bits.z, row.bits.w};
#pragma unroll
  for (int c = 0; c < 8; ++c) v[c] = to_float(from_bits<T>((w[c >> 1] >> (16 * (c & 1))) & 0xFFFFu));
}
template <>
__device__ __forceinline__ void row8_floats<float>(const Row8<float>& row, float (&v)[8]) {
  v[0] = row.lo.x; v[1] = row.lo.y; v[2] = row.lo.z; v[3] = row.lo.w;
  v[4] = row.hi.x; v[5] = row.hi.y; v[6] = row.hi.z; v[7] = row.hi.w;
}

// Issues the thread's loads of the group at row g0: rows g0 + 4 * warp + i (i < 4) before m_end, its
// columns c0 .. c0 + count - 1 of a [., C] operand with `row_stride` elements between rows. Rows and
// columns outside are zeros and are not read.
template <typename T>
__device__ __forceinline__ void load_group(Row8<T> (&rows8)[kLoadRows], const T* __restrict__ base,
                                           int64_t row_stride, int64_t g0, int64_t m_end, int warp, int64_t c0,
                                           int count, bool vec) {
#pragma unroll
  for (int i = 0; i < kLoadRows; ++i) {
    const int64_t m = g0 + warp * kLoadRows + i;
    const bool in = m < m_end && count > 0;
    rows8[i] = load_row8(base + (in ? m : g0) * row_stride + c0, vec && in && count == 8, in ? count : 0);
  }
}

// The slice that holds column c (offsets off[0 .. S], strictly increasing, off[0] = 0): the number of
// slice starts off[1 .. S-1] at or before c. Constant indices only, so a kernel parameter's offsets
// stay in the parameter space (a loop to a run-time bound copied them to local memory).
__device__ __forceinline__ int slice_of(int64_t c, int S, const int64_t (&off)[kMaxSlices + 1]) {
  int s = 0;
#pragma unroll
  for (int i = 1; i < kMaxSlices; ++i) s += i < S && c >= off[i] ? 1 : 0;
  return s;
}

// off[s] for a run-time s in [0, kMaxSlices], with constant indices (see slice_of).
__device__ __forceinline__ int64_t offset_at(int s, const int64_t (&off)[kMaxSlices + 1]) {
  int64_t v = 0;
#pragma unroll
  for (int i = 0; i <= kMaxSlices; ++i) v = i == s ? off[i] : v;
  return v;
}

// The rank tile of one warp. Tiles `first` .. `first + tiles - 1` of ceil(rank / 8) belong to this
// block (grid.z); with tiles < kWarps, `phases` = kWarps / tiles warps share a tile and warp w takes
// the group rows i with i % phases == phase. Warps past tiles * phases have no tile (active false).
struct WarpTile {
  int64_t j0;     // first rank of the tile
  int tile;       // 0 .. tiles - 1 within the block
  int phase;
  int phases;
  bool active;
};

__device__ __forceinline__ WarpTile warp_tile(int64_t rank, int warp) {
  const int64_t rank_tiles = (rank + kRankTile - 1) / kRankTile;
  const int64_t first = static_cast<int64_t>(blockIdx.z) * kGroupTiles;
  const int tiles = rank_tiles - first < kGroupTiles ? static_cast<int>(rank_tiles - first) : kGroupTiles;
  WarpTile t;
  t.phases = kWarps / tiles;
  t.tile = warp % tiles;
  t.phase = warp / tiles;
  t.active = t.phase < t.phases;
  t.j0 = (first + t.tile) * kRankTile;
  return t;
}

// ---- the warp's sums ---------------------------------------------------------------------------------

// The sum over the 32 lanes of p[v] for v = sum8_index(lane), in a fixed butterfly: lanes 16 apart
// swap halves (each keeps 4 values), then 8 apart (2), 4 apart (1), then plain butterflies over 2 and
// 1. Every addition pairs the same lanes in every run, so the result repeats bit for bit, and the 4
// lanes that hold one value hold the same bits (IEEE addition is commutative).
__device__ __forceinline__ int sum8_index(int lane) { return ((lane >> 4) & 1) * 4 + ((lane >> 3) & 1) * 2 + ((lane >> 2) & 1); }

__device__ __forceinline__ float warp_sum8(const float (&p)[8], int lane) {
  constexpr unsigned kAll = 0xffffffffu;
  const bool up16 = (lane & 16) != 0, up8 = (lane & 8) != 0, up4 = (lane & 4) != 0;
  float q4[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float keep = up16 ? p[4 + i] : p[i];
    const float give = up16 ? p[i] : p[4 + i];
    q4[i] = keep + __shfl_xor_sync(kAll, give, 16);
  }
  float q2[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const float keep = up8 ? q4[2 + i] : q4[i];
    const float give = up8 ? q4[i] : q4[2 + i];
    q2[i] = keep + __shfl_xor_sync(kAll, give, 8);
  }
  float q = (up4 ? q2[1] : q2[0]) + __shfl_xor_sync(kAll, up4 ? q2[0] : q2[1], 4);
  q += __shfl_xor_sync(kAll, q, 2);
  q += __shfl_xor_sync(kAll, q, 1);
  return q;
}

// acc[cc][jj] += v[cc] * w[jj]: one row's step of the column reduction.
__device__ __forceinline__ void column_step(float (&acc)[8][kRankTile], const float (&v)[8], const float (&w)[kRankTile]) {
#pragma unroll
  for (int cc = 0; cc < 8; ++cc) {
#pragma unroll
    for (int jj = 0; jj < kRankTile; ++jj) acc[cc][jj] = fmaf(v[cc], w[jj], acc[cc][jj]);
  }
}

// w[jj] = row[jj] for the ranks j0 + jj < rank, else 0 (row points at rank j0's value).
__device__ __forceinline__ void load_rank_row(const float* __restrict__ row, int64_t j0, int64_t rank,
                                              float (&w)[kRankTile]) {
#pragma unroll
  for (int jj = 0; jj < kRankTile; ++jj) w[jj] = j0 + jj < rank ? __ldg(row + jj) : 0.0f;
}

// The end of a chunk: part[c * rank + j] = this block's sum over the chunk's rows, for its columns
// c0 + cc < C (count of them) and ranks j0 + jj < rank. Warps that share a tile add their sums in
// phase order through `red` (the staging buffer, free by now); warp phase 0 writes.
__device__ __forceinline__ void write_chunk_sums(const float (&acc)[8][kRankTile], const WarpTile& t, float* red,
                                                 float* __restrict__ part, int64_t c0, int count, int64_t rank,
                                                 int lane) {
  if (t.phases > 1) {
    for (int p = 0; p < t.phases; ++p) {  // the same trip count in every warp: t.phases is block-wide
      if (t.active && t.phase == p) {
#pragma unroll
        for (int cc = 0; cc < 8; ++cc) {
#pragma unroll
          for (int jj = 0; jj < kRankTile; ++jj) {
            float* slot = red + ((t.tile * 8 + cc) * kRankTile + jj) * 32 + lane;
            shared_store(slot, p == 0 ? acc[cc][jj] : shared_load(slot) + acc[cc][jj]);
          }
        }
      }
      __syncthreads();
    }
  }
  if (!t.active || t.phase != 0) return;
#pragma unroll
  for (int cc = 0; cc < 8; ++cc) {
#pragma unroll
    for (int jj = 0; jj < kRankTile; ++jj) {
      const int64_t j = t.j0 + jj;
      if (cc < count && j < rank) {
        const float v = t.phases > 1 ? shared_load(red + ((t.tile * 8 + cc) * kRankTile + jj) * 32 + lane) : acc[cc][jj];
        part[(c0 + cc) * rank + j] = v;
      }
    }
  }
}

// ---- pass over grad_y ---------------------------------------------------------------------------------

struct GradYPass {
  const void* grad_y = nullptr;  // [M, N], row stride grad_y_row_stride
  int64_t grad_y_row_stride = 0;
  const float* h = nullptr;      // [M, R] contiguous
  const void* b = nullptr;       // [N, r] contiguous
  int64_t m = 0, n = 0, r = 0;
  int num_slices = 1;
  int64_t slice_offsets[kMaxSlices + 1] = {0};
  int64_t chunk_rows = 0;        // rows per block along grid.y (a multiple of kGroupRows)
  float* g_part = nullptr;       // [col_tiles, M, R]: tile t's sums of the slices that meet it
  float* b_part = nullptr;       // [chunks, N, r]
};

template <typename TV, typename TB>
__global__ void __launch_bounds__(kThreads, 1) grad_y_pass_kernel(const GradYPass q, bool dy_vec) {
  LORACUDA_SHARED(float, stage, kStageFloats);

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int64_t M = q.m, N = q.n, r = q.r;
  const int S = q.num_slices;
  const int64_t R = static_cast<int64_t>(S) * r;
  const int64_t tile0 = static_cast<int64_t>(blockIdx.x) * kTileCols;
  const int64_t c0 = tile0 + lane * 8;
  const int count = columns_in_row(c0, N);
  const int64_t m_begin = static_cast<int64_t>(blockIdx.y) * q.chunk_rows;
  const int64_t m_end = m_begin + q.chunk_rows < M ? m_begin + q.chunk_rows : M;
  const TV* __restrict__ dy = static_cast<const TV*>(q.grad_y);
  const TB* __restrict__ b = static_cast<const TB*>(q.b);
  const WarpTile t = warp_tile(r, warp);

  // The slice of each of the lane's columns (columns past N take the last one; they hold zeros),
  // and the slices that meet the block's tile.
  int sl[8];
#pragma unroll
  for (int cc = 0; cc < 8; ++cc) sl[cc] = slice_of(c0 + cc < N ? c0 + cc : N - 1, S, q.slice_offsets);
  const bool lane_uniform = sl[0] == sl[7];
  const int s_first = slice_of(tile0, S, q.slice_offsets);
  const int s_last = slice_of(tile0 + kTileCols - 1 < N ? tile0 + kTileCols - 1 : N - 1, S, q.slice_offsets);

  // b[c0 + cc, j0 + jj], the lane's columns x the warp's ranks, for the whole chunk.
  float bv[8][kRankTile];
#pragma unroll
  for (int cc = 0; cc < 8; ++cc) {
#pragma unroll
    for (int jj = 0; jj < kRankTile; ++jj) {
      const int64_t j = t.j0 + jj;
      bv[cc][jj] = t.active && cc < count && j < r ? load_float(b + (c0 + cc) * r + j) : 0.0f;
    }
  }
  float acc[8][kRankTile];
#pragma unroll
  for (int cc = 0; cc < 8; ++cc) {
#pragma unroll
    for (int jj = 0; jj < kRankTile; ++jj) acc[cc][jj] = 0.0f;
  }

  Row8<TV> loaded[kLoadRows];
  load_group(loaded, dy, q.grad_y_row_stride, m_begin, m_end, warp, c0, count, dy_vec);
  for (int64_t g0 = m_begin; g0 < m_end; g0 += kGroupRows) {
    const int rows = m_end - g0 < kGroupRows ? static_cast<int>(m_end - g0) : kGroupRows;
    __syncthreads();  // the previous group is no longer read
#pragma unroll
    for (int i = 0; i < kLoadRows; ++i) {
      float v[8];
      row8_floats(loaded[i], v);
#pragma unroll
      for (int cc = 0; cc < 8; ++cc) shared_store(stage + stage_slot(warp * kLoadRows + i, cc, lane), v[cc]);
    }
    __syncthreads();
    if (g0 + kGroupRows < m_end) {  // the next group's loads, in flight while this one is computed
      load_group(loaded, dy, q.grad_y_row_stride, g0 + kGroupRows, m_end, warp, c0, count, dy_vec);
    }
    if (!t.active) continue;

    for (int i = t.phase; i < rows; i += t.phases) {
      const int64_t m = g0 + i;
      float d[8];
#pragma unroll
      for (int cc = 0; cc < 8; ++cc) d[cc] = shared_load(stage + stage_slot(i, cc, lane));
      // grad_b: acc[cc][jj] += grad_y[m, c] * h[m, slice(c) * r + j].
      const float* hrow = q.h + m * R + t.j0;
      if (lane_uniform) {
        float hv[kRankTile];
        load_rank_row(hrow + sl[0] * r, t.j0, r, hv);
        column_step(acc, d, hv);
      } else {  // the lane's columns straddle slices sl[0] .. sl[7]: one slice's h row at a time
#pragma unroll 1
        for (int s = sl[0]; s <= sl[7]; ++s) {
          float hv[kRankTile];
          load_rank_row(hrow + s * r, t.j0, r, hv);
#pragma unroll
          for (int cc = 0; cc < 8; ++cc) {
#pragma unroll
            for (int jj = 0; jj < kRankTile; ++jj) acc[cc][jj] = sl[cc] == s ? fmaf(d[cc], hv[jj], acc[cc][jj]) : acc[cc][jj];
          }
        }
      }
      // g: the tile's sum of grad_y[m, c] * b[c, j] over the columns c of each slice s that meets it.
      float* gout = q.g_part + (static_cast<int64_t>(blockIdx.x) * M + m) * R;
      const int jj_out = sum8_index(lane);
      const bool writer = (lane & 3) == 0 && t.j0 + jj_out < r;
      for (int s = s_first; s <= s_last; ++s) {  // the same in every lane
        float p[kRankTile];
#pragma unroll
        for (int jj = 0; jj < kRankTile; ++jj) p[jj] = 0.0f;
        if (s_first == s_last) {  // the whole tile lies in slice s
#pragma unroll
          for (int cc = 0; cc < 8; ++cc) {
#pragma unroll
            for (int jj = 0; jj < kRankTile; ++jj) p[jj] = fmaf(d[cc], bv[cc][jj], p[jj]);
          }
        } else {  // only the columns of slice s: a select, so another slice's inf * 0 never enters
#pragma unroll
          for (int cc = 0; cc < 8; ++cc) {
#pragma unroll
            for (int jj = 0; jj < kRankTile; ++jj) p[jj] = sl[cc] == s ? fmaf(d[cc], bv[cc][jj], p[jj]) : p[jj];
          }
        }
        const float sum = warp_sum8(p, lane);
        if (writer) gout[s * r + t.j0 + jj_out] = sum;
      }
    }
  }

  __syncthreads();  // the staging buffer becomes the phase-sum buffer
  write_chunk_sums(acc, t, stage, q.b_part + static_cast<int64_t>(blockIdx.y) * N * r, c0, count, r, lane);
}

// g[m, s * r + j] = scale * sum over the column tiles t that meet slice s, in ascending t, of
// g_part[t, m, s * r + j]. A slice without columns (N = 0) gives 0.
struct GFinalize {
  const float* g_part = nullptr;
  float* g = nullptr;
  int64_t m = 0, r = 0;
  int num_slices = 1;
  int64_t slice_offsets[kMaxSlices + 1] = {0};
  float scale = 1.0f;
};

__global__ void __launch_bounds__(256) g_finalize_kernel(const GFinalize f) {
  const int64_t R = static_cast<int64_t>(f.num_slices) * f.r;
  const int64_t count = f.m * R;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += stride) {
    const int s = static_cast<int>((i % R) / f.r);
    const int64_t begin = offset_at(s, f.slice_offsets), end = offset_at(s + 1, f.slice_offsets);
    const int64_t t_first = begin / kTileCols;
    const int64_t t_end = end > begin ? (end - 1) / kTileCols + 1 : t_first;
    float sum = 0.0f;
    for (int64_t t = t_first; t < t_end; ++t) sum += f.g_part[t * count + i];
    f.g[i] = f.scale * sum;
  }
}

// ---- pass over x and grad_x ------------------------------------------------------------------------

struct XPass {
  const void* x = nullptr;       // [M, K], row stride x_row_stride
  int64_t x_row_stride = 0;
  void* grad_x = nullptr;        // [M, K], row stride grad_x_row_stride, or null
  int64_t grad_x_row_stride = 0;
  const float* g = nullptr;      // [M, R] contiguous (scale applied)
  const void* a = nullptr;       // [R, K] contiguous
  int64_t m = 0, k = 0, rank = 0;  // rank = R
  DropoutParams dropout;
  int64_t chunk_rows = 0;
  float* a_part = nullptr;       // [chunks, K, R]
};

// v as the mask leaves it: v unchanged without dropout, else v / q where kept and 0 where dropped.
__device__ __forceinline__ float masked(const DeviceDropout& d, bool keep, float v) {
  if (!d.enabled) return v;
  return keep ? v * d.keep_scale : 0.0f;
}

// lora[i][cc] = sum over all R ranks, ascending, of g[m, j] * a[j, c] for the thread's rows
// m = g0 + row0 + i (zero past `rows`) and columns c = c0 + cc of the tile at tile0, in chunks of 16
// ranks staged in `buf` (a's tile at slot (cc * 32 + lane) per column, then g's [32 x 16] tile).
template <typename TA>
__device__ __forceinline__ void grad_x_term(float (&lora)[kLoadRows][8], const XPass& q, float* buf, int64_t g0,
                                            int rows, int64_t tile0, int row0, int lane) {
  const int64_t K = q.k, R = q.rank;
  const TA* __restrict__ a = static_cast<const TA*>(q.a);
  float* a_s = buf;
  float* g_s = buf + kTileCols * kAStride;
  const int sl[8] = {0, 0, 0, 0, 0, 0, 0, 0};  // one slice: every rank meets every column
#pragma unroll
  for (int i = 0; i < kLoadRows; ++i) {
#pragma unroll
    for (int cc = 0; cc < 8; ++cc) lora[i][cc] = 0.0f;
  }
  for (int64_t j0 = 0; j0 < R; j0 += kXRankChunk) {
    __syncthreads();  // the previous chunk (or the staged x) is no longer read
    // a[j0 + jj, tile0 + kl]: consecutive threads follow a's unit stride along k. Unrolled by 2, not
    // fully (16 trips): 16 loads in flight took about 50 registers more than the FMA loop needs.
#pragma unroll 2
    for (int e = threadIdx.x; e < kXRankChunk * kTileCols; e += kThreads) {
      const int jj = e / kTileCols, kl = e % kTileCols;
      const int64_t j = j0 + jj, k = tile0 + kl;
      shared_store(a_s + ((kl & 7) * 32 + (kl >> 3)) * kAStride + jj, j < R && k < K ? load_float(a + j * K + k) : 0.0f);
    }
    for (int e = threadIdx.x; e < kGroupRows * kXRankChunk; e += kThreads) {
      const int row = e / kXRankChunk, jj = e % kXRankChunk;
      const int64_t j = j0 + jj;
      shared_store(g_s + e, row < rows && j < R ? q.g[(g0 + row) * R + j] : 0.0f);
    }
    __syncthreads();
    expand_tile_fma<kLoadRows, kXRankChunk, kAStride>(lora, g_s, a_s, row0, lane, 1, sl, true);
  }
}

template <typename TV, typename TA>
__global__ void __launch_bounds__(kThreads, 1) x_pass_kernel(const XPass q, bool x_vec, bool gx_vec) {
  LORACUDA_SHARED(float, stage, kStageFloats);

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int64_t M = q.m, K = q.k, R = q.rank;
  const int64_t tile0 = static_cast<int64_t>(blockIdx.x) * kTileCols;
  const int64_t c0 = tile0 + lane * 8;
  const int count = columns_in_row(c0, K);
  const int64_t m_begin = static_cast<int64_t>(blockIdx.y) * q.chunk_rows;
  const int64_t m_end = m_begin + q.chunk_rows < M ? m_begin + q.chunk_rows : M;
  const TV* __restrict__ x = static_cast<const TV*>(q.x);
  const DeviceDropout drop = make_device_dropout(q.dropout);
  const WarpTile t = warp_tile(R, warp);
  // grad_x is updated once, by the blocks of the first rank group (its term sums over all R ranks).
  const bool update_grad_x = q.grad_x != nullptr && blockIdx.z == 0;

  float acc[8][kRankTile];
#pragma unroll
  for (int cc = 0; cc < 8; ++cc) {
#pragma unroll
    for (int jj = 0; jj < kRankTile; ++jj) acc[cc][jj] = 0.0f;
  }

  Row8<TV> loaded[kLoadRows];
  load_group(loaded, x, q.x_row_stride, m_begin, m_end, warp, c0, count, x_vec);
  for (int64_t g0 = m_begin; g0 < m_end; g0 += kGroupRows) {
    const int rows = m_end - g0 < kGroupRows ? static_cast<int>(m_end - g0) : kGroupRows;
    __syncthreads();  // the previous group is no longer read
    // Stage dropped(x) and keep the mask of the thread's 4 x 8 elements (bit i * 8 + cc) for grad_x.
    uint32_t keep_bits = 0u;
#pragma unroll
    for (int i = 0; i < kLoadRows; ++i) {
      const int row = warp * kLoadRows + i;
      const int64_t m = g0 + row;
      float v[8];
      row8_floats(loaded[i], v);
#pragma unroll
      for (int cc = 0; cc < 8; ++cc) {
        const bool keep =
            !drop.enabled || (row < rows && cc < count &&
                              dropout_keep(drop.key, static_cast<uint64_t>(m * K + c0 + cc), drop.threshold));
        if (keep) keep_bits |= 1u << (i * 8 + cc);
        shared_store(stage + stage_slot(row, cc, lane), masked(drop, keep, v[cc]));
      }
    }
    __syncthreads();
    if (g0 + kGroupRows < m_end) {  // the next group's loads, in flight while this one is computed
      load_group(loaded, x, q.x_row_stride, g0 + kGroupRows, m_end, warp, c0, count, x_vec);
    }

    // grad_a: acc[cc][jj] += dropped(x)[m, c] * g[m, j].
    if (t.active) {
      for (int i = t.phase; i < rows; i += t.phases) {
        const int64_t m = g0 + i;
        float v[8];
#pragma unroll
        for (int cc = 0; cc < 8; ++cc) v[cc] = shared_load(stage + stage_slot(i, cc, lane));
        float gv[kRankTile];
        load_rank_row(q.g + m * R + t.j0, t.j0, R, gv);
        column_step(acc, v, gv);
      }
    }

    if (update_grad_x) {  // the same in every thread of the block
      float lora[kLoadRows][8];
      grad_x_term<TA>(lora, q, stage, g0, rows, tile0, warp * kLoadRows, lane);
      TV* __restrict__ gx = static_cast<TV*>(q.grad_x);
#pragma unroll
      for (int i = 0; i < kLoadRows; ++i) {
        const int row = warp * kLoadRows + i;
        if (row >= rows || count == 0) continue;
        TV* out = gx + (g0 + row) * q.grad_x_row_stride + c0;
        const bool vec = gx_vec && count == 8;
        TV yv[8];
        load8_rw(out, vec, count, yv);
#pragma unroll
        for (int cc = 0; cc < 8; ++cc) {
          yv[cc] = from_float<TV>(to_float(yv[cc]) + masked(drop, (keep_bits >> (i * 8 + cc)) & 1u, lora[i][cc]));
        }
        store8(out, vec, count, yv);
      }
    }
  }

  __syncthreads();  // the staging buffer becomes the phase-sum buffer
  write_chunk_sums(acc, t, stage, q.a_part + static_cast<int64_t>(blockIdx.y) * K * R, c0, count, R, lane);
}

// out[c * out_c_stride + j * out_j_stride] = TO(alpha * sum_{z = 0 .. chunks-1} partial[z, c, j]).
template <typename TO>
__global__ void __launch_bounds__(256) chunk_finalize_kernel(const float* __restrict__ partial, int64_t chunks,
                                                             int64_t C, int64_t r, float alpha, TO* __restrict__ out,
                                                             int64_t out_c_stride, int64_t out_j_stride) {
  const int64_t count = C * r;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += stride) {
    float s = 0.0f;
    for (int64_t z = 0; z < chunks; ++z) s += partial[z * count + i];
    const int64_t c = i / r, j = i - c * r;
    out[c * out_c_stride + j * out_j_stride] = from_float<TO>(alpha * s);
  }
}

// ---- host side: the plan of each pass and the workspace -----------------------------------------------

// A pass over `rows` x `cols` values with `rank` ranks: tiles of 256 columns (grid.x), chunks of rows
// (grid.y), groups of 64 ranks (grid.z). Enough chunks that the grid fills the chip about twice (one
// resident block per SM), each a multiple of the 32-row group.
struct PassPlan {
  int64_t col_tiles = 0, chunks = 0, chunk_rows = 0, rank_groups = 0;
};

PassPlan plan_pass(int64_t rows, int64_t cols, int64_t rank, int num_sms) {
  PassPlan plan;
  plan.col_tiles = (cols + kTileCols - 1) / kTileCols;
  plan.rank_groups = (rank + kGroupRanks - 1) / kGroupRanks;
  if (rows <= 0 || cols <= 0 || rank <= 0) return plan;  // no blocks (chunks 0)
  const int64_t base = plan.col_tiles * plan.rank_groups;
  const int64_t target = 2 * static_cast<int64_t>(num_sms > 0 ? num_sms : 132);
  const int64_t want_chunks = base < target ? (target + base - 1) / base : 1;
  int64_t chunk = (rows + want_chunks - 1) / want_chunks;
  chunk = ((chunk + kGroupRows - 1) / kGroupRows) * kGroupRows;
  plan.chunk_rows = chunk;
  plan.chunks = (rows + chunk - 1) / chunk;
  return plan;
}

PassPlan grad_y_plan(const BackwardParams& p) { return plan_pass(p.m, p.n, p.r, p.num_sms); }
PassPlan x_plan(const BackwardParams& p) { return plan_pass(p.m, p.k, static_cast<int64_t>(p.num_slices) * p.r, p.num_sms); }

// Workspace floats of each partial: g's [col_tiles, M, R] and grad_b's [chunks, N, r] live through the
// grad_y pass and its finalizers; grad_a's [chunks, K, R] is written after those have run (same
// stream), so it reuses the start of the workspace.
int64_t g_part_floats(const BackwardParams& p, const PassPlan& plan) {
  return plan.chunks > 0 ? plan.col_tiles * p.m * static_cast<int64_t>(p.num_slices) * p.r : 0;
}
int64_t b_part_floats(const BackwardParams& p, const PassPlan& plan) { return plan.chunks * p.n * p.r; }
int64_t a_part_floats(const BackwardParams& p, const PassPlan& plan) {
  return plan.chunks * p.k * static_cast<int64_t>(p.num_slices) * p.r;
}

bool grid_fits(const PassPlan& plan) {
  return plan.col_tiles <= 0x7fffffff && plan.chunks <= 65535 && plan.rank_groups <= 65535;
}

int value_bytes(DType d) { return d == DType::kFloat32 ? 4 : 2; }

// out [C, r] (strides out_c_stride, out_j_stride) = alpha * the chunk sums of partial [chunks, C, r];
// chunks == 0 (M == 0) writes zeros.
cudaError_t finalize_chunks(const float* partial, int64_t chunks, int64_t C, int64_t r, float alpha, void* out,
                            DType out_dtype, int64_t out_c_stride, int64_t out_j_stride, int num_sms,
                            cudaStream_t stream) {
  const int64_t count = C * r;
  if (count <= 0) return cudaSuccess;
  return dispatch_dtype(out_dtype, [&](auto to) {
    using TO = typename decltype(to)::type;
    return launch_kernel(LORACUDA_KERNEL(chunk_finalize_kernel<TO>), grid_cap((count + 255) / 256, num_sms), 256,
                         stream, partial, chunks, C, r, alpha, static_cast<TO*>(out), out_c_stride, out_j_stride);
  });
}

// g and grad_b.
cudaError_t run_grad_y_pass(const BackwardParams& p) {
  const PassPlan plan = grad_y_plan(p);
  const int64_t R = static_cast<int64_t>(p.num_slices) * p.r;
  const int64_t g_floats = g_part_floats(p, plan);
  float* g_part = p.workspace;
  float* b_part = p.workspace + g_floats;
  if (plan.chunks > 0) {
    if (!grid_fits(plan)) return cudaErrorInvalidConfiguration;
    if (p.workspace == nullptr || p.workspace_floats < g_floats + b_part_floats(p, plan)) return cudaErrorInvalidValue;
    GradYPass q;
    q.grad_y = p.grad_y;
    q.grad_y_row_stride = p.grad_y_row_stride;
    q.h = p.h;
    q.b = p.b;
    q.m = p.m;
    q.n = p.n;
    q.r = p.r;
    q.num_slices = p.num_slices;
    for (int i = 0; i <= kMaxSlices; ++i) q.slice_offsets[i] = p.slice_offsets[i];
    q.chunk_rows = plan.chunk_rows;
    q.g_part = g_part;
    q.b_part = b_part;
    const bool dy_vec = vector_rows_ok(p.grad_y, p.grad_y_row_stride, p.m, value_bytes(p.value_dtype));
    const dim3 grid(static_cast<unsigned>(plan.col_tiles), static_cast<unsigned>(plan.chunks),
                    static_cast<unsigned>(plan.rank_groups));
    const cudaError_t err = dispatch_value_adapter(p.value_dtype, p.b_dtype, [&](auto tv, auto tb) {
      using TV = typename decltype(tv)::type;
      using TB = typename decltype(tb)::type;
      return launch_kernel(LORACUDA_KERNEL(grad_y_pass_kernel<TV, TB>), grid, kThreads, p.stream, q, dy_vec);
    });
    if (err != cudaSuccess) return err;
  }
  if (p.m > 0) {  // g = scale * the column tiles' sums (0 for N = 0: no tile meets a slice)
    GFinalize f;
    f.g_part = g_part;
    f.g = p.g;
    f.m = p.m;
    f.r = p.r;
    f.num_slices = p.num_slices;
    for (int i = 0; i <= kMaxSlices; ++i) f.slice_offsets[i] = p.slice_offsets[i];
    f.scale = p.scale;
    const cudaError_t err =
        launch_kernel(LORACUDA_KERNEL(g_finalize_kernel), grid_cap((p.m * R + 255) / 256, p.num_sms), 256, p.stream, f);
    if (err != cudaSuccess) return err;
  }
  // grad_b [N, r] = scale * the chunk sums: out[n * r + j].
  return finalize_chunks(b_part, plan.chunks, p.n, p.r, p.scale, p.grad_b, p.b_dtype, p.r, 1, p.num_sms, p.stream);
}

// grad_a and grad_x.
cudaError_t run_x_pass(const BackwardParams& p) {
  const PassPlan plan = x_plan(p);
  const int64_t R = static_cast<int64_t>(p.num_slices) * p.r;
  float* a_part = p.workspace;
  if (plan.chunks > 0) {
    if (!grid_fits(plan)) return cudaErrorInvalidConfiguration;
    if (p.workspace == nullptr || p.workspace_floats < a_part_floats(p, plan)) return cudaErrorInvalidValue;
    XPass q;
    q.x = p.x;
    q.x_row_stride = p.x_row_stride;
    q.grad_x = p.grad_x;
    q.grad_x_row_stride = p.grad_x_row_stride;
    q.g = p.g;
    q.a = p.a;
    q.m = p.m;
    q.k = p.k;
    q.rank = R;
    q.dropout = p.dropout;
    q.chunk_rows = plan.chunk_rows;
    q.a_part = a_part;
    const int bytes = value_bytes(p.value_dtype);
    const bool x_vec = vector_rows_ok(p.x, p.x_row_stride, p.m, bytes);
    const bool gx_vec = p.grad_x != nullptr && vector_rows_ok(p.grad_x, p.grad_x_row_stride, p.m, bytes);
    const dim3 grid(static_cast<unsigned>(plan.col_tiles), static_cast<unsigned>(plan.chunks),
                    static_cast<unsigned>(plan.rank_groups));
    const cudaError_t err = dispatch_value_adapter(p.value_dtype, p.a_dtype, [&](auto tv, auto ta) {
      using TV = typename decltype(tv)::type;
      using TA = typename decltype(ta)::type;
      return launch_kernel(LORACUDA_KERNEL(x_pass_kernel<TV, TA>), grid, kThreads, p.stream, q, x_vec, gx_vec);
    });
    if (err != cudaSuccess) return err;
  }
  // grad_a [R, K]: column k, rank j of the partials is out[j * K + k].
  return finalize_chunks(a_part, plan.chunks, p.k, R, 1.0f, p.grad_a, p.a_dtype, 1, p.k, p.num_sms, p.stream);
}

}  // namespace

int64_t backward_workspace_floats(const BackwardParams& p) {
  const PassPlan gy = grad_y_plan(p), xp = x_plan(p);
  const int64_t grad_y_floats = g_part_floats(p, gy) + b_part_floats(p, gy);
  const int64_t x_floats = a_part_floats(p, xp);
  return grad_y_floats > x_floats ? grad_y_floats : x_floats;
}

cudaError_t launch_backward(const BackwardParams& p) {
  if (p.m < 0 || p.n < 0 || p.k < 0 || p.r <= 0 || p.num_slices < 1 || p.num_slices > kMaxSlices) {
    return cudaErrorInvalidValue;
  }
  // The x pass reads g, which the grad_y pass's finalizer writes: they run in this order on one stream.
  const cudaError_t err = run_grad_y_pass(p);
  if (err != cudaSuccess) return err;
  return run_x_pass(p);
}

}  // namespace cuda
}  // namespace loracuda
