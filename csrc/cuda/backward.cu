// backward of one LoRA linear layer (formulas in csrc/ops.cpp, DESIGN.md §3):
//   g      [M, R] = scale * grad_y[:, slice i] @ b[slice i]    (float32 scratch p.g)
//   grad_b [N, r] = scale * grad_y^T @ h (slice-wise)
//   grad_a [R, K] = g^T @ dropped(x)
//   grad_x [M, K] += dropped(g @ a)                           (when grad_x is given)
//
// g is the shrink kernel on grad_y with b read as a block-diagonal [R, N] operand (shrink.cu), each
// slice's rows reading only that slice's columns of grad_y, as the CPU kernel does (an inf in one
// slice of grad_y leaves the other slices' g finite);
// grad_x is the expand kernel with b = a^T and the dropout on the added term (expand.cu). The two
// reductions over M (grad_b, grad_a) are column reductions, done here deterministically in two
// stages: each block sums a fixed chunk of rows into the workspace, then a second kernel adds the
// chunks in ascending order and writes the adapter dtype. No float atomics: runs repeat bit for bit.
//
// Remaining (not done here): grad_y is read twice (g, grad_b) and x / grad_x twice (grad_a,
// grad_x); fusing each pair into one pass would save about half of backward's memory traffic.
#include "common.cuh"

namespace loracuda {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kBlockCols = 32 * 8;  // columns of X per block: 8 per lane
constexpr int kRankTile = 8;        // j values per block (grid.y)
constexpr int kRedStride = 8 * kRankTile + 1;  // 65: the cross-warp sum buffer without bank conflicts
// Two resident blocks per SM (a 128-register cap) on sm_90, where ptxas fits the kernel in 128
// registers without spilling; sm_80's ptxas would spill under that cap, so it keeps one.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
constexpr int kColumnReduceMinBlocks = 2;
#else
constexpr int kColumnReduceMinBlocks = 1;
#endif

// out[c, j] = alpha * sum_m X[m, c] * H[m, i(c) * r + j] for c in [0, C), j in [0, r), where i(c)
// is the slice of column c; X is optionally dropped out (element index m * C + c).
struct ColumnReduce {
  const void* x = nullptr;
  int64_t x_row_stride = 0;
  const float* h = nullptr;
  int64_t h_row_stride = 0;
  int64_t m = 0, c = 0, r = 0;
  int num_slices = 1;
  int64_t slice_offsets[kMaxSlices + 1] = {0};
  DropoutParams dropout;
  int64_t chunk_rows = 0;  // rows of X per block along grid.z
  int64_t chunks = 0;
  float* partial = nullptr;  // [chunks, C, r]
};

void plan_column_reduce(ColumnReduce& q, int num_sms) {
  if (q.m <= 0 || q.c <= 0) {
    q.chunk_rows = 0;
    q.chunks = 0;
    return;
  }
  const int64_t base = ((q.c + kBlockCols - 1) / kBlockCols) * ((q.r + kRankTile - 1) / kRankTile);
  const int64_t target = 4 * static_cast<int64_t>(num_sms > 0 ? num_sms : 132);
  const int64_t want_chunks = base < target ? (target + base - 1) / base : 1;
  int64_t rows = (q.m + want_chunks - 1) / want_chunks;
  rows = ((rows + kWarps - 1) / kWarps) * kWarps;  // a multiple of the warps, so they share the rows evenly
  q.chunk_rows = rows;
  q.chunks = (q.m + rows - 1) / rows;
}

template <typename TX>
__global__ void __launch_bounds__(kThreads, kColumnReduceMinBlocks) column_reduce_kernel(const ColumnReduce q, bool x_vec) {
  __shared__ float red[32 * kRedStride];

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int64_t C = q.c, r = q.r;
  const int S = q.num_slices;
  const int64_t c_tile0 = static_cast<int64_t>(blockIdx.x) * kBlockCols;
  const int64_t c0 = c_tile0 + lane * 8;
  const int64_t j0 = static_cast<int64_t>(blockIdx.y) * kRankTile;
  const int64_t m_begin = static_cast<int64_t>(blockIdx.z) * q.chunk_rows;
  const int64_t m_end = m_begin + q.chunk_rows < q.m ? m_begin + q.chunk_rows : q.m;
  const int count = C - c0 >= 8 ? 8 : (C - c0 > 0 ? static_cast<int>(C - c0) : 0);
  const TX* __restrict__ x = static_cast<const TX*>(q.x);
  const DeviceDropout drop = make_device_dropout(q.dropout);

  int sl[8];
#pragma unroll
  for (int cc = 0; cc < 8; ++cc) {
    const int64_t c = c0 + cc < C ? c0 + cc : C - 1;
    int s = 0;
    while (s + 1 < S && c >= q.slice_offsets[s + 1]) ++s;
    sl[cc] = s;
  }
  const bool uniform = sl[0] == sl[7];

  float acc[8][kRankTile];
#pragma unroll
  for (int cc = 0; cc < 8; ++cc) {
#pragma unroll
    for (int jj = 0; jj < kRankTile; ++jj) acc[cc][jj] = 0.0f;
  }

  // Warp w takes rows m_begin + w, m_begin + w + 8, ... of the chunk.
  for (int64_t m = m_begin + warp; m < m_end; m += kWarps) {
    float xv[8];
    if (count > 0) {
      load8(x + m * q.x_row_stride + c0, x_vec && count == 8, count, xv);
      if (drop.enabled) {
#pragma unroll
        for (int cc = 0; cc < 8; ++cc) {
          if (cc < count) xv[cc] = apply_dropout(drop, static_cast<uint64_t>(m * C + c0 + cc), xv[cc]);
        }
      }
    } else {
#pragma unroll
      for (int cc = 0; cc < 8; ++cc) xv[cc] = 0.0f;
    }
    const float* __restrict__ hrow = q.h + m * q.h_row_stride;
    if (uniform) {
      float hv[kRankTile];
#pragma unroll
      for (int jj = 0; jj < kRankTile; ++jj) hv[jj] = j0 + jj < r ? __ldg(hrow + sl[0] * r + j0 + jj) : 0.0f;
#pragma unroll
      for (int cc = 0; cc < 8; ++cc) {
#pragma unroll
        for (int jj = 0; jj < kRankTile; ++jj) acc[cc][jj] = fmaf(xv[cc], hv[jj], acc[cc][jj]);
      }
    } else {
#pragma unroll
      for (int cc = 0; cc < 8; ++cc) {
#pragma unroll
        for (int jj = 0; jj < kRankTile; ++jj) {
          const float hv = j0 + jj < r ? __ldg(hrow + sl[cc] * r + j0 + jj) : 0.0f;
          acc[cc][jj] = fmaf(xv[cc], hv, acc[cc][jj]);
        }
      }
    }
  }

  // Sum the 8 warps in a fixed order: warp 0 stores, warps 1 .. 7 add, one at a time.
  for (int w = 0; w < kWarps; ++w) {
    if (warp == w) {
#pragma unroll
      for (int v = 0; v < 8 * kRankTile; ++v) {
        float* slot = red + lane * kRedStride + v;
        *slot = (w == 0 ? 0.0f : *slot) + acc[v / kRankTile][v % kRankTile];
      }
    }
    __syncthreads();
  }
  // Write the block's [256 columns x 8 j] partial sums; value v of lane ln is column
  // c_tile0 + ln * 8 + v / 8, j = j0 + v % 8.
  float* __restrict__ part = q.partial + static_cast<int64_t>(blockIdx.z) * C * r;
  for (int e = threadIdx.x; e < 32 * 8 * kRankTile; e += kThreads) {
    const int ln = e / (8 * kRankTile), v = e % (8 * kRankTile);
    const int64_t c = c_tile0 + ln * 8 + v / kRankTile, j = j0 + v % kRankTile;
    if (c < C && j < r) part[c * r + j] = red[ln * kRedStride + v];
  }
}

// out[c * out_c_stride + j * out_j_stride] = TO(alpha * sum_{z = 0 .. chunks-1} partial[z, c, j]).
template <typename TO>
__global__ void __launch_bounds__(256) column_reduce_finalize_kernel(const float* __restrict__ partial,
                                                                     int64_t chunks, int64_t C, int64_t r,
                                                                     float alpha, TO* __restrict__ out,
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

cudaError_t run_column_reduce(ColumnReduce q, DType x_dtype, float* workspace, int64_t workspace_floats,
                              float alpha, void* out, DType out_dtype, int64_t out_c_stride, int64_t out_j_stride,
                              int num_sms, cudaStream_t stream) {
  if (q.c <= 0 || q.r <= 0) return cudaSuccess;  // empty output
  plan_column_reduce(q, num_sms);
  if (q.chunks > 0) {
    if (workspace == nullptr || workspace_floats < q.chunks * q.c * q.r) return cudaErrorInvalidValue;
    q.partial = workspace;
    const int64_t col_tiles = (q.c + kBlockCols - 1) / kBlockCols;
    const int64_t rank_tiles = (q.r + kRankTile - 1) / kRankTile;
    if (col_tiles > 0x7fffffff || rank_tiles > 65535 || q.chunks > 65535) return cudaErrorInvalidConfiguration;
    const dim3 grid(static_cast<unsigned>(col_tiles), static_cast<unsigned>(rank_tiles),
                    static_cast<unsigned>(q.chunks));
    const int x_bytes = x_dtype == DType::kFloat32 ? 4 : 2;
    const bool x_vec = vector_rows_ok(q.x, q.x_row_stride, q.m, x_bytes);
    const cudaError_t err = dispatch_dtype(x_dtype, [&](auto tx) {
      using TX = typename decltype(tx)::type;
      column_reduce_kernel<TX><<<grid, kThreads, 0, stream>>>(q, x_vec);
      return cudaGetLastError();
    });
    if (err != cudaSuccess) return err;
  }
  // chunks == 0 (M == 0): the sums are empty and the output is written as zeros.
  const int64_t count = q.c * q.r;
  return dispatch_dtype(out_dtype, [&](auto to) {
    using TO = typename decltype(to)::type;
    column_reduce_finalize_kernel<TO><<<grid_cap((count + 255) / 256, num_sms), 256, 0, stream>>>(
        q.partial, q.chunks, q.c, q.r, alpha, static_cast<TO*>(out), out_c_stride, out_j_stride);
    return cudaGetLastError();
  });
}

// The three sub-problems of backward, described once for the workspace query and the launch.
ShrinkParams g_params(const BackwardParams& p) {
  ShrinkParams s;
  s.x = p.grad_y;
  s.x_row_stride = p.grad_y_row_stride;
  s.x_dtype = p.value_dtype;
  s.a = p.b;
  s.a_dtype = p.b_dtype;
  s.h = p.g;
  s.m = p.m;
  s.k = p.n;
  s.rank = static_cast<int64_t>(p.num_slices) * p.r;
  s.workspace = p.workspace;
  s.workspace_floats = p.workspace_floats;
  s.num_sms = p.num_sms;
  s.stream = p.stream;
  s.alpha = p.scale;
  s.num_slices = p.num_slices;
  s.slice_rank = p.r;
  for (int i = 0; i <= kMaxSlices; ++i) s.slice_offsets[i] = p.slice_offsets[i];
  return s;  // dropout stays disabled: grad_y is not dropped
}

ColumnReduce grad_b_params(const BackwardParams& p) {
  ColumnReduce q;
  q.x = p.grad_y;
  q.x_row_stride = p.grad_y_row_stride;
  q.h = p.h;
  q.h_row_stride = static_cast<int64_t>(p.num_slices) * p.r;
  q.m = p.m;
  q.c = p.n;
  q.r = p.r;
  q.num_slices = p.num_slices;
  for (int i = 0; i <= kMaxSlices; ++i) q.slice_offsets[i] = p.slice_offsets[i];
  return q;
}

ColumnReduce grad_a_params(const BackwardParams& p) {
  ColumnReduce q;
  q.x = p.x;
  q.x_row_stride = p.x_row_stride;
  q.h = p.g;
  q.h_row_stride = static_cast<int64_t>(p.num_slices) * p.r;
  q.m = p.m;
  q.c = p.k;
  q.r = q.h_row_stride;  // R = S * r columns of g, one slice over all of K
  q.num_slices = 1;
  q.slice_offsets[0] = 0;
  q.slice_offsets[1] = p.k;
  q.dropout = p.dropout;
  return q;
}

int64_t column_reduce_floats(ColumnReduce q, int num_sms) {
  plan_column_reduce(q, num_sms);
  return q.chunks * q.c * q.r;
}

}  // namespace

int64_t backward_workspace_floats(const BackwardParams& p) {
  // The three stages run one after another on one stream, so they share one workspace.
  int64_t floats = shrink_workspace_floats(g_params(p));
  const int64_t b_floats = column_reduce_floats(grad_b_params(p), p.num_sms);
  const int64_t a_floats = column_reduce_floats(grad_a_params(p), p.num_sms);
  if (b_floats > floats) floats = b_floats;
  if (a_floats > floats) floats = a_floats;
  return floats;
}

cudaError_t launch_backward(const BackwardParams& p) {
  if (p.m < 0 || p.n < 0 || p.k < 0 || p.r <= 0 || p.num_slices < 1 || p.num_slices > kMaxSlices) {
    return cudaErrorInvalidValue;
  }
  // 1. g = scale * grad_y @ b (slice-wise), float32 [M, R].
  cudaError_t err = launch_shrink(g_params(p));
  if (err != cudaSuccess) return err;
  // 2. grad_b [N, r] = scale * grad_y^T @ h (slice-wise): out[n * r + j].
  err = run_column_reduce(grad_b_params(p), p.value_dtype, p.workspace, p.workspace_floats, p.scale, p.grad_b,
                          p.b_dtype, p.r, 1, p.num_sms, p.stream);
  if (err != cudaSuccess) return err;
  // 3. grad_a [R, K] = g^T @ dropped(x): column k, j = row of grad_a, out[j * K + k].
  err = run_column_reduce(grad_a_params(p), p.value_dtype, p.workspace, p.workspace_floats, 1.0f, p.grad_a,
                          p.a_dtype, 1, p.k, p.num_sms, p.stream);
  if (err != cudaSuccess || p.grad_x == nullptr) return err;
  // 4. grad_x += dropped(g @ a): the expand kernel with b = a^T (b(n = k, j) = a[j * K + k]).
  ExpandParams e;
  e.y = p.grad_x;
  e.y_row_stride = p.grad_x_row_stride;
  e.y_dtype = p.value_dtype;
  e.h = p.g;
  e.b = p.a;
  e.b_dtype = p.a_dtype;
  e.m = p.m;
  e.n = p.k;
  e.r = static_cast<int64_t>(p.num_slices) * p.r;
  e.num_slices = 1;
  e.slice_offsets[0] = 0;
  e.slice_offsets[1] = p.k;
  e.scale = 1.0f;
  e.num_sms = p.num_sms;
  e.stream = p.stream;
  e.b_n_stride = 1;
  e.b_j_stride = p.k;
  e.dropout = p.dropout;
  return launch_expand_add(e);
}

}  // namespace cuda
}  // namespace loracuda
