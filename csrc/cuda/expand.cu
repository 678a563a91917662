// expand_add_: y[m, n] += scale * sum_j h[m, i(n) * r + j] * b[n, j], in place, where i(n) is the
// slice that holds column n (slice i owns columns [off[i], off[i+1])).
//
// Memory-bound on the one read-modify-write of y (h and b are small). A block owns 32 rows x 256
// columns of y: warp w owns rows 4w .. 4w+3 of the tile and lane l columns 8l .. 8l+7 (one 16-byte
// access per row for bf16/fp16). The rank is streamed in chunks of 16: the block stages b's
// [256 x 16] chunk and h's [32 rows x S slices x 16] chunk in shared memory as float32 and every
// thread accumulates its 4 x 8 outputs in registers; y is then read, added to once in float32 and
// rounded once to its dtype.
#include "common.cuh"

namespace loracuda {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kRowsPerThread = 4;
constexpr int kBlockRows = (kThreads / 32) * kRowsPerThread;  // 32
constexpr int kBlockCols = 32 * 8;                            // 256
constexpr int kRankChunk = 16;
// b_s row stride in floats (16 + 4 padding): lanes read consecutive slots without bank conflicts.
constexpr int kBStride = kRankChunk + 4;

template <typename TY, typename TB>
__global__ void __launch_bounds__(kThreads) expand_kernel(const ExpandParams p, bool y_vec) {
  LORACUDA_SHARED(float, b_s, kBlockCols * kBStride);
  LORACUDA_SHARED(float, h_s, kBlockRows * kMaxSlices * kRankChunk);

  const int tx = threadIdx.x & 31;
  const int ty = threadIdx.x >> 5;
  const int64_t M = p.m, N = p.n, r = p.r;
  const int S = p.num_slices;
  const int64_t h_width = static_cast<int64_t>(S) * r;
  const int64_t m_tile0 = static_cast<int64_t>(blockIdx.x) * kBlockRows;
  const int64_t n_tile0 = static_cast<int64_t>(blockIdx.y) * kBlockCols;
  const int64_t m_base = m_tile0 + ty * kRowsPerThread;
  const int64_t n0 = n_tile0 + tx * 8;
  const TB* __restrict__ b = static_cast<const TB*>(p.b);
  const float* __restrict__ h = p.h;

  // The slice of each of this thread's 8 columns (columns past N take the last slice; they are
  // never stored).
  int sl[8];
#pragma unroll
  for (int c = 0; c < 8; ++c) {
    const int64_t n = n0 + c < N ? n0 + c : N - 1;
    int s = 0;
    while (s + 1 < S && n >= p.slice_offsets[s + 1]) ++s;
    sl[c] = s;
  }
  const bool uniform = sl[0] == sl[7];

  float acc[kRowsPerThread][8];
#pragma unroll
  for (int row = 0; row < kRowsPerThread; ++row) {
#pragma unroll
    for (int c = 0; c < 8; ++c) acc[row][c] = 0.0f;
  }

  for (int64_t j0 = 0; j0 < r; j0 += kRankChunk) {
    __syncthreads();  // the previous chunk is no longer read
    // b chunk: column nl of the tile at slot (nl % 8) * 32 + nl / 8 (lane nl / 8 reads it as its
    // column nl % 8). Consecutive threads follow b [N, r]'s unit stride (along j).
    for (int q = threadIdx.x; q < kBlockCols * kRankChunk; q += kThreads) {
      const int jj = q % kRankChunk;
      const int nl = q / kRankChunk;
      const int64_t n = n_tile0 + nl, j = j0 + jj;
      const float v = (n < N && j < r) ? load_float(b + n * r + j) : 0.0f;
      shared_store(b_s + ((nl & 7) * 32 + (nl >> 3)) * kBStride + jj, v);
    }
    // h chunk: (row, slice, jj) at (row * S + slice) * 16 + jj.
    const int h_count = kBlockRows * S * kRankChunk;
    for (int q = threadIdx.x; q < h_count; q += kThreads) {
      const int row = q / (S * kRankChunk);
      const int rem = q - row * (S * kRankChunk);
      const int s = rem / kRankChunk;
      const int jj = rem - s * kRankChunk;
      const int64_t m = m_tile0 + row, j = j0 + jj;
      shared_store(h_s + q, (m < M && j < r) ? h[m * h_width + s * r + j] : 0.0f);
    }
    __syncthreads();

    expand_tile_fma<kRowsPerThread, kRankChunk, kBStride>(acc, h_s, b_s, ty * kRowsPerThread, tx, S, sl, uniform);
  }

  const int count = N - n0 >= 8 ? 8 : (N - n0 > 0 ? static_cast<int>(N - n0) : 0);
  TY* __restrict__ y = static_cast<TY*>(p.y);
#pragma unroll
  for (int row = 0; row < kRowsPerThread; ++row) {
    const int64_t m = m_base + row;
    if (m >= M || count == 0) continue;
    TY* yp = y + m * p.y_row_stride + n0;
    const bool vec = y_vec && count == 8;
    TY yv[8];
    load8_rw(yp, vec, count, yv);
#pragma unroll
    for (int c = 0; c < 8; ++c) {
      yv[c] = from_float<TY>(to_float(yv[c]) + p.scale * acc[row][c]);
    }
    store8(yp, vec, count, yv);
  }
}

}  // namespace

cudaError_t launch_expand_add(const ExpandParams& p) {
  if (p.m <= 0 || p.n <= 0) return cudaSuccess;  // nothing to update
  if (p.r <= 0 || p.num_slices < 1 || p.num_slices > kMaxSlices) return cudaErrorInvalidValue;
  const int64_t row_tiles = (p.m + kBlockRows - 1) / kBlockRows;
  const int64_t col_tiles = (p.n + kBlockCols - 1) / kBlockCols;
  if (row_tiles > 0x7fffffff || col_tiles > 65535) return cudaErrorInvalidConfiguration;
  const int y_bytes = p.y_dtype == DType::kFloat32 ? 4 : 2;
  const bool y_vec = vector_rows_ok(p.y, p.y_row_stride, p.m, y_bytes);
  const dim3 grid(static_cast<unsigned>(row_tiles), static_cast<unsigned>(col_tiles));
  return dispatch_value_adapter(p.y_dtype, p.b_dtype, [&](auto ty, auto tb) {
    using TY = typename decltype(ty)::type;
    using TB = typename decltype(tb)::type;
    return launch_kernel(LORACUDA_KERNEL(expand_kernel<TY, TB>), grid, kThreads, p.stream, p, y_vec);
  });
}

}  // namespace cuda
}  // namespace loracuda
