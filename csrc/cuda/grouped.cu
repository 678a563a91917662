// The grouped LoRA kernels (mixture-of-experts experts: one group per row; params in params.h):
//
//  - row shrink   out[m, j] = alpha * sum_k dropped(x)[m, k] * a(g_m, j, k)     (grouped_shrink, backward's g)
//  - row expand   y[m, n] += scale * dropped(sum_j h[m, j] * b(g_m, n, j))      (grouped_expand_add_, grad_x)
//  - grouped mm   out[m, n] = sum_k x[m, k] * w(g_m, n, k)                       (base GEMM, base dgrad)
//  - reduce       out[g, p, q] = alpha * sum_{m in g} p_rows[m, p] * q_rows[m, q] (weight grad, grad_a, grad_b)
//
// No host synchronisation: the kernels read the ids and treat one outside [0, G) as "no group".
// Factors and weights are read through their strides (GroupedOperand), so PEFT's permuted layout
// needs no copy. Every sum runs in a fixed order in float32 (no atomics): results repeat bit for bit.
//
// Structure. The row kernels (shrink, expand) work row by row (a warp per row for the shrink, a
// thread per output element for the expand): a row's group is read once, rows in any order cost the
// same. The grouped mm tiles 32 rows x 64 columns in shared memory; a tile whose rows span several
// groups makes one pass per distinct group (rows sorted by group: one pass, mostly). The reduce gives
// a block one group and a 64 x 64 output tile; it compacts that group's rows (a ballot over the ids,
// in ascending order) into shared memory chunk by chunk and accumulates 16 rows at a time from
// shared memory.
//
// Shared memory and launches go through device_api.cuh, so the emulation tier runs these kernels on the
// host (tests/emulation_driver.py, family 'grouped'). Compiled for sm_80 / sm_90 (no spills), not run on a GPU. Plain FMA (no tensor cores yet: the
// tensor-core paths of shrink.cu / multi_lora.cu are the model for a later version).
#include "common.cuh"

namespace loracuda {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kShrinkRowsPerStep = 8;  // rows of a per warp step (accumulators per lane)

// grouped mm tile
constexpr int kMmRows = 32;
constexpr int kMmCols = 64;
constexpr int kMmK = 32;
constexpr int kMmStride = kMmK + 1;  // shared row stride in floats: no bank conflicts along k

// reduce tile
constexpr int kRedTile = 64;          // output rows (p) and columns (q) per block
constexpr int kRedRows = 16;          // rows of the group staged per step
constexpr int kRedChunk = kThreads;   // ids scanned per compaction

__device__ __forceinline__ int group_of(const GroupIds& g, int64_t m) {
  const int64_t id = g.ids[m * g.stride];
  return id >= 0 && id < g.groups ? static_cast<int>(id) : -1;
}

template <typename T>
__device__ __forceinline__ float load_at(const void* base, int64_t offset) {
  return to_float(static_cast<const T*>(base)[offset]);
}

// Element (g, i, j) of a strided operand whose element type is TA.
template <typename TA>
__device__ __forceinline__ float operand_at(const GroupedOperand& o, int g, int64_t i, int64_t j) {
  return load_at<TA>(o.ptr, g * o.group_stride + i * o.row_stride + j * o.col_stride);
}

// A value-dtype or float32 element.
template <typename TV>
__device__ __forceinline__ float load_either(const void* base, bool is_float, int64_t offset) {
  return is_float ? static_cast<const float*>(base)[offset] : to_float(static_cast<const TV*>(base)[offset]);
}

template <typename TV>
__device__ __forceinline__ void store_either(void* base, bool is_float, int64_t offset, float v) {
  if (is_float) {
    static_cast<float*>(base)[offset] = v;
  } else {
    static_cast<TV*>(base)[offset] = from_float<TV>(v);
  }
}

// ---- row shrink -----------------------------------------------------------------------------------

// A warp per row (grid-stride over rows); lanes stride over K; kShrinkRowsPerStep rows of a at a time,
// each summed over the lanes by a butterfly in a fixed order.
template <typename TX, typename TA>
__global__ void __launch_bounds__(kThreads) grouped_row_shrink_kernel(const GroupedRowShrinkParams p) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarps;
  const DeviceDropout drop = make_device_dropout(p.dropout);
  for (int64_t m = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32; m < p.m; m += warps) {
    const int g = group_of(p.ids, m);
    float* out = p.out + m * p.out_row_stride;
    if (g < 0) {
      for (int64_t j = lane; j < p.j; j += 32) out[j] = 0.0f;
      continue;
    }
    const TX* xr = static_cast<const TX*>(p.x) + m * p.x_row_stride;
    for (int64_t j0 = 0; j0 < p.j; j0 += kShrinkRowsPerStep) {
      float acc[kShrinkRowsPerStep];
#pragma unroll
      for (int t = 0; t < kShrinkRowsPerStep; ++t) acc[t] = 0.0f;
      for (int64_t k = lane; k < p.k; k += 32) {
        const float xv = apply_dropout(drop, static_cast<uint64_t>(m) * static_cast<uint64_t>(p.k) + k, to_float(xr[k]));
#pragma unroll
        for (int t = 0; t < kShrinkRowsPerStep; ++t) {
          if (j0 + t < p.j) acc[t] = fmaf(xv, operand_at<TA>(p.a, g, j0 + t, k), acc[t]);
        }
      }
#pragma unroll
      for (int t = 0; t < kShrinkRowsPerStep; ++t) {
#pragma unroll
        for (int width = 16; width >= 1; width /= 2) acc[t] += __shfl_xor_sync(0xffffffffu, acc[t], width);
      }
      if (lane == 0) {
#pragma unroll
        for (int t = 0; t < kShrinkRowsPerStep; ++t) {
          if (j0 + t < p.j) out[j0 + t] = p.alpha * acc[t];
        }
      }
    }
  }
}

// ---- row expand -----------------------------------------------------------------------------------

// A thread per output element: blockIdx.x tiles the columns, blockIdx.y strides over the rows.
template <typename TY, typename TB>
__global__ void __launch_bounds__(kThreads) grouped_row_expand_kernel(const GroupedRowExpandParams p) {
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const DeviceDropout drop = make_device_dropout(p.dropout);
  for (int64_t m = blockIdx.y; m < p.m; m += gridDim.y) {
    const int g = group_of(p.ids, m);  // uniform over the block
    if (g < 0 || n >= p.n) continue;
    const float* hr = p.h + m * p.h_row_stride;
    float acc = 0.0f;
    for (int64_t j = 0; j < p.j; ++j) acc = fmaf(hr[j], operand_at<TB>(p.b, g, n, j), acc);
    const float add = apply_dropout(drop, static_cast<uint64_t>(m) * static_cast<uint64_t>(p.n) + n, acc);
    TY* y = static_cast<TY*>(p.y) + m * p.y_row_stride + n;
    *y = from_float<TY>(to_float(*y) + p.scale * add);
  }
}

// ---- grouped mm -----------------------------------------------------------------------------------

// Block tile: kMmRows rows x kMmCols columns; thread t computes rows (t / 16) + {0, 16} and columns
// (t % 16) + {0, 16, 32, 48}. One pass per distinct group among the tile's rows, in ascending order.
template <typename T>
__global__ void __launch_bounds__(kThreads) grouped_mm_kernel(const GroupedMmParams p) {
  LORACUDA_SHARED(float, x_s, kMmRows * kMmStride);  // [row][k], row stride kMmStride
  LORACUDA_SHARED(float, w_s, kMmCols * kMmStride);  // [column][k], row stride kMmStride
  LORACUDA_SHARED(int, ids_s, kMmRows);              // the tile's group per row (-1: none or past M)
  LORACUDA_SHARED(int, pass_group, 1);               // the group of the current pass (-1: done)
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kMmRows;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kMmCols;
  const int tid = threadIdx.x, tr = tid / 16, tc = tid % 16;
  if (tid < kMmRows) shared_store(ids_s + tid, m0 + tid < p.m ? group_of(p.ids, m0 + tid) : -1);
  __syncthreads();
  T* out = static_cast<T*>(p.out);
  // Rows without a group: 0.
#pragma unroll
  for (int a = 0; a < 2; ++a) {
    const int row = tr + 16 * a;
    if (shared_load(ids_s + row) >= 0 || m0 + row >= p.m) continue;
#pragma unroll
    for (int b = 0; b < 4; ++b) {
      const int64_t col = n0 + tc + 16 * b;
      if (col < p.n) out[(m0 + row) * p.n + col] = from_float<T>(0.0f);
    }
  }
  int previous = -1;
  while (true) {
    if (tid == 0) {
      int next = -1;
      for (int i = 0; i < kMmRows; ++i) {
        const int g = shared_load(ids_s + i);
        if (g > previous && (next < 0 || g < next)) next = g;
      }
      shared_store(pass_group, next);
    }
    __syncthreads();
    const int g = shared_load(pass_group);
    __syncthreads();  // every thread has read pass_group before thread 0 may write it again
    if (g < 0) break;
    previous = g;
    float acc[2][4];
#pragma unroll
    for (int a = 0; a < 2; ++a) {
#pragma unroll
      for (int b = 0; b < 4; ++b) acc[a][b] = 0.0f;
    }
    for (int64_t k0 = 0; k0 < p.k; k0 += kMmK) {
      // x tile [32 rows x 32 k]: 4 elements per thread; w tile [64 columns x 32 k]: 8 per thread.
#pragma unroll
      for (int e = 0; e < (kMmRows * kMmK) / kThreads; ++e) {
        const int idx = tid + e * kThreads, row = idx / kMmK, kk = idx % kMmK;
        const int64_t m = m0 + row, k = k0 + kk;
        shared_store(x_s + row * kMmStride + kk,
                     m < p.m && k < p.k && shared_load(ids_s + row) == g
                         ? to_float(static_cast<const T*>(p.x)[m * p.x_row_stride + k])
                         : 0.0f);
      }
#pragma unroll
      for (int e = 0; e < (kMmCols * kMmK) / kThreads; ++e) {
        const int idx = tid + e * kThreads, col = idx / kMmK, kk = idx % kMmK;
        const int64_t n = n0 + col, k = k0 + kk;
        shared_store(w_s + col * kMmStride + kk, n < p.n && k < p.k ? operand_at<T>(p.w, g, n, k) : 0.0f);
      }
      __syncthreads();
#pragma unroll 8
      for (int kk = 0; kk < kMmK; ++kk) {
        const float x0 = shared_load(x_s + tr * kMmStride + kk), x1 = shared_load(x_s + (tr + 16) * kMmStride + kk);
#pragma unroll
        for (int b = 0; b < 4; ++b) {
          const float w = shared_load(w_s + (tc + 16 * b) * kMmStride + kk);
          acc[0][b] = fmaf(x0, w, acc[0][b]);
          acc[1][b] = fmaf(x1, w, acc[1][b]);
        }
      }
      __syncthreads();
    }
#pragma unroll
    for (int a = 0; a < 2; ++a) {
      const int row = tr + 16 * a;
      if (shared_load(ids_s + row) != g || m0 + row >= p.m) continue;
#pragma unroll
      for (int b = 0; b < 4; ++b) {
        const int64_t col = n0 + tc + 16 * b;
        if (col < p.n) out[(m0 + row) * p.n + col] = from_float<T>(acc[a][b]);
      }
    }
  }
}

// ---- reduce ---------------------------------------------------------------------------------------

// grid (q tiles, p tiles, G). Thread t owns outputs p = p0 + (t / 16) * 4 + {0..3}, q = q0 + (t % 16) * 4 + {0..3}.
template <typename TV>
__global__ void __launch_bounds__(kThreads, 2) grouped_reduce_kernel(const GroupedReduceParams p) {
  LORACUDA_SHARED(int, rows_s, kRedChunk);              // the chunk's rows of group g, ascending (offsets in the chunk)
  LORACUDA_SHARED(int, warp_count_s, kWarps);           // rows of group g per warp of the chunk
  LORACUDA_SHARED(float, p_s, kRedRows * kRedTile);     // [row][p column]
  LORACUDA_SHARED(float, q_s, kRedRows * kRedTile);     // [row][q column]
  const int g = blockIdx.z;
  const int64_t q0 = static_cast<int64_t>(blockIdx.x) * kRedTile, p0 = static_cast<int64_t>(blockIdx.y) * kRedTile;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid / 32, tp = tid / 16, tq = tid % 16;
  const DeviceDropout drop = make_device_dropout(p.q_dropout);
  float acc[4][4];
#pragma unroll
  for (int a = 0; a < 4; ++a) {
#pragma unroll
    for (int b = 0; b < 4; ++b) acc[a][b] = 0.0f;
  }
  for (int64_t c0 = 0; c0 < p.m; c0 += kRedChunk) {
    // Compact this chunk's rows of group g into rows_s, ascending.
    const int64_t m = c0 + tid;
    const bool mine = m < p.m && group_of(p.ids, m) == g;
    const unsigned ballot = __ballot_sync(0xffffffffu, mine);
    if (lane == 0) shared_store(warp_count_s + warp, __popc(ballot));
    __syncthreads();
    int offset = 0, count = 0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const int warp_count = shared_load(warp_count_s + w);
      offset += w < warp ? warp_count : 0;
      count += warp_count;
    }
    if (mine) shared_store(rows_s + offset + __popc(ballot & ((1u << lane) - 1u)), static_cast<int>(tid));
    __syncthreads();
    for (int r0 = 0; r0 < count; r0 += kRedRows) {
      // Stage kRedRows rows x 64 columns of p_rows and of q_rows (4 + 4 elements per thread).
#pragma unroll
      for (int e = 0; e < (kRedRows * kRedTile) / kThreads; ++e) {
        const int idx = tid + e * kThreads, i = idx / kRedTile, c = idx % kRedTile;
        float pv = 0.0f, qv = 0.0f;
        if (r0 + i < count) {
          const int64_t row = c0 + shared_load(rows_s + r0 + i);
          if (p0 + c < p.p_cols) pv = load_either<TV>(p.p_rows, p.p_float, row * p.p_row_stride + p0 + c);
          if (q0 + c < p.q_cols) {
            qv = apply_dropout(drop, static_cast<uint64_t>(row) * static_cast<uint64_t>(p.q_cols) + q0 + c,
                               load_either<TV>(p.q_rows, p.q_float, row * p.q_row_stride + q0 + c));
          }
        }
        shared_store(p_s + i * kRedTile + c, pv);
        shared_store(q_s + i * kRedTile + c, qv);
      }
      __syncthreads();
#pragma unroll 4
      for (int i = 0; i < kRedRows; ++i) {
        float pv[4], qv[4];
#pragma unroll
        for (int a = 0; a < 4; ++a) pv[a] = shared_load(p_s + i * kRedTile + tp * 4 + a);
#pragma unroll
        for (int b = 0; b < 4; ++b) qv[b] = shared_load(q_s + i * kRedTile + tq * 4 + b);
#pragma unroll
        for (int a = 0; a < 4; ++a) {
#pragma unroll
          for (int b = 0; b < 4; ++b) acc[a][b] = fmaf(pv[a], qv[b], acc[a][b]);
        }
      }
      __syncthreads();
    }
  }
#pragma unroll
  for (int a = 0; a < 4; ++a) {
    const int64_t pi = p0 + tp * 4 + a;
    if (pi >= p.p_cols) continue;
#pragma unroll
    for (int b = 0; b < 4; ++b) {
      const int64_t qi = q0 + tq * 4 + b;
      if (qi < p.q_cols) {
        store_either<TV>(p.out, p.out_float, (static_cast<int64_t>(g) * p.p_cols + pi) * p.q_cols + qi,
                         p.alpha * acc[a][b]);
      }
    }
  }
}

}  // namespace

cudaError_t launch_grouped_row_shrink(const GroupedRowShrinkParams& p) {
  if (p.m <= 0 || p.j <= 0) return cudaSuccess;
  const unsigned blocks = grid_cap((p.m + kWarps - 1) / kWarps, p.num_sms);
  return dispatch_value_adapter(p.x_dtype, p.a.dtype, [&](auto tx, auto ta) {
    using TX = typename decltype(tx)::type;
    using TA = typename decltype(ta)::type;
    return launch_kernel(LORACUDA_KERNEL(grouped_row_shrink_kernel<TX, TA>), blocks, kThreads, p.stream, p);
  });
}

cudaError_t launch_grouped_row_expand(const GroupedRowExpandParams& p) {
  if (p.m <= 0 || p.n <= 0) return cudaSuccess;
  const int64_t col_tiles = (p.n + kThreads - 1) / kThreads;
  if (col_tiles > 0x7fffffff) return cudaErrorInvalidConfiguration;
  const int64_t row_blocks = p.m < 65535 ? p.m : 65535;
  const dim3 grid(static_cast<unsigned>(col_tiles), static_cast<unsigned>(row_blocks));
  return dispatch_value_adapter(p.y_dtype, p.b.dtype, [&](auto ty, auto tb) {
    using TY = typename decltype(ty)::type;
    using TB = typename decltype(tb)::type;
    return launch_kernel(LORACUDA_KERNEL(grouped_row_expand_kernel<TY, TB>), grid, kThreads, p.stream, p);
  });
}

cudaError_t launch_grouped_mm(const GroupedMmParams& p) {
  if (p.m <= 0 || p.n <= 0) return cudaSuccess;
  const int64_t row_tiles = (p.m + kMmRows - 1) / kMmRows, col_tiles = (p.n + kMmCols - 1) / kMmCols;
  if (row_tiles > 65535 || col_tiles > 0x7fffffff) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(col_tiles), static_cast<unsigned>(row_tiles));
  return dispatch_dtype(p.dtype, [&](auto t) {
    using T = typename decltype(t)::type;
    return launch_kernel(LORACUDA_KERNEL(grouped_mm_kernel<T>), grid, kThreads, p.stream, p);
  });
}

cudaError_t launch_grouped_reduce(const GroupedReduceParams& p) {
  if (p.ids.groups <= 0 || p.p_cols <= 0 || p.q_cols <= 0) return cudaSuccess;
  const int64_t q_tiles = (p.q_cols + kRedTile - 1) / kRedTile, p_tiles = (p.p_cols + kRedTile - 1) / kRedTile;
  if (p.ids.groups > 65535 || p_tiles > 65535 || q_tiles > 0x7fffffff) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(q_tiles), static_cast<unsigned>(p_tiles), static_cast<unsigned>(p.ids.groups));
  return dispatch_dtype(p.value_dtype, [&](auto t) {
    using TV = typename decltype(t)::type;
    return launch_kernel(LORACUDA_KERNEL(grouped_reduce_kernel<TV>), grid, kThreads, p.stream, p);
  });
}

}  // namespace cuda
}  // namespace loracuda
