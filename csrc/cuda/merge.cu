// merge_ / restore_codes / unmerge_exact_ on weight [N, K] contiguous, a [r, K], b [N, r].
// (A transposed weight [K, N] is handled by the binding: it passes a' = b^T and b' = a^T, so the
// kernels always see the [N, K] form; see csrc/cuda/bindings.cpp.)
//
// Memory-bound on one read (and, for merge/unmerge, one write) of the weight. The delta
// d[n, k] = scale * sum_j b[n, j] * a[j, k] is computed in float32 by merge_delta_step /
// merge_delta_finish (common.cuh), the same operations in the same order in both kernels below, so
// all three modes see identical bits.
//
// merge_rows_kernel: a block owns 32 rows x 256 columns; warp w owns rows 4w .. 4w+3 and lane l the
// 8 columns 8l .. 8l+7 of each (one 16-byte access for bf16/fp16). Per rank j the lane reads its 8
// values of a's row j (coalesced across the warp) and b[n, j] for its 4 rows (one address per warp),
// and updates a 4 x 8 register tile: each a value feeds 4 rows, each b value 8 columns.
// Restore codes pack 4 elements per byte by flat index e = n * K + k; when K % 4 == 0 a thread's 8
// columns (starting at a multiple of 8) are whole groups of 4 in one row, so every code byte has
// exactly one writer.
//
// merge_flat_kernel: codes modes with K % 4 != 0, where a group of 4 flat elements can span two
// rows. One thread per group of 4 flat elements (grid-stride), the delta per element.
#include "common.cuh"

namespace loracuda {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kRowsPerThread = 4;
constexpr int kBlockRows = (kThreads / 32) * kRowsPerThread;  // 32
constexpr int kBlockCols = 32 * 8;                            // 256

template <typename T, typename TA, MergeMode kMode>
__global__ void __launch_bounds__(kThreads) merge_rows_kernel(const MergeParams p, bool w_vec, bool a_vec) {
  const int tx = threadIdx.x & 31;
  const int ty = threadIdx.x >> 5;
  const int64_t N = p.n, K = p.k, r = p.r;
  const int64_t n_base = static_cast<int64_t>(blockIdx.x) * kBlockRows + ty * kRowsPerThread;
  const int64_t k0 = static_cast<int64_t>(blockIdx.y) * kBlockCols + tx * 8;
  const int count = K - k0 >= 8 ? 8 : (K - k0 > 0 ? static_cast<int>(K - k0) : 0);
  if (count == 0 || n_base >= N) return;  // no barrier in this kernel: idle threads may leave
  const TA* __restrict__ a = static_cast<const TA*>(p.a);
  const TA* __restrict__ b = static_cast<const TA*>(p.b);

  float acc[kRowsPerThread][8];
#pragma unroll
  for (int row = 0; row < kRowsPerThread; ++row) {
#pragma unroll
    for (int c = 0; c < 8; ++c) acc[row][c] = 0.0f;
  }
  const bool a_vec8 = a_vec && count == 8;
  for (int64_t j = 0; j < r; ++j) {
    float av[8];
    load8(a + j * K + k0, a_vec8, count, av);
#pragma unroll
    for (int row = 0; row < kRowsPerThread; ++row) {
      const int64_t n = n_base + row;
      const float bv = n < N ? load_float(b + n * r + j) : 0.0f;
#pragma unroll
      for (int c = 0; c < 8; ++c) acc[row][c] = merge_delta_step(acc[row][c], bv, av[c]);
    }
  }

  T* __restrict__ w = static_cast<T*>(p.weight);
  const bool vec = w_vec && count == 8;
#pragma unroll
  for (int row = 0; row < kRowsPerThread; ++row) {
    const int64_t n = n_base + row;
    if (n >= N) continue;
    T* wp = w + n * K + k0;
    T wv[8];
    load8_rw(wp, vec, count, wv);
    float d[8];
#pragma unroll
    for (int c = 0; c < 8; ++c) d[c] = merge_delta_finish(acc[row][c], p.scale);
    if constexpr (kMode == MergeMode::kMerge) {
#pragma unroll
      for (int c = 0; c < 8; ++c) wv[c] = merge_add(wv[c], d[c]);
      store8(wp, vec, count, wv);
    } else {
      // K % 4 == 0 here, so the flat index of column k0 is a multiple of 4 and count is 4 or 8.
      const int64_t byte0 = (n * K + k0) / 4;
      if constexpr (kMode == MergeMode::kRestoreCodes) {
        uint32_t lo = 0, hi = 0;
#pragma unroll
        for (int c = 0; c < 4; ++c) lo |= restore_code(wv[c], d[c]) << (2 * c);
#pragma unroll
        for (int c = 4; c < 8; ++c) hi |= restore_code(wv[c], d[c]) << (2 * (c - 4));
        p.codes[byte0] = static_cast<uint8_t>(lo);
        if (count > 4) p.codes[byte0 + 1] = static_cast<uint8_t>(hi);
      } else {  // kUnmergeExact
        const uint32_t lo = p.codes[byte0];
        const uint32_t hi = count > 4 ? p.codes[byte0 + 1] : 0u;
#pragma unroll
        for (int c = 0; c < 4; ++c) wv[c] = unmerge_exact(wv[c], d[c], (lo >> (2 * c)) & 3u);
#pragma unroll
        for (int c = 4; c < 8; ++c) wv[c] = unmerge_exact(wv[c], d[c], (hi >> (2 * (c - 4))) & 3u);
        store8(wp, vec, count, wv);
      }
    }
  }
}

template <typename T, typename TA, MergeMode kMode>
__global__ void __launch_bounds__(kThreads) merge_flat_kernel(const MergeParams p) {
  const int64_t K = p.k, r = p.r;
  const int64_t numel = p.n * K;
  const int64_t groups = (numel + 3) / 4;
  const TA* __restrict__ a = static_cast<const TA*>(p.a);
  const TA* __restrict__ b = static_cast<const TA*>(p.b);
  T* __restrict__ w = static_cast<T*>(p.weight);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < groups; g += stride) {
    const uint32_t in_codes = kMode == MergeMode::kUnmergeExact ? p.codes[g] : 0u;
    uint32_t out_codes = 0;
    for (int c = 0; c < 4; ++c) {
      const int64_t e = 4 * g + c;
      if (e >= numel) break;
      const int64_t n = e / K, k = e - n * K;
      const float d = merge_delta(a, b, n, k, r, K, p.scale);
      if constexpr (kMode == MergeMode::kMerge) {
        w[e] = merge_add(w[e], d);
      } else if constexpr (kMode == MergeMode::kRestoreCodes) {
        out_codes |= restore_code(w[e], d) << (2 * c);
      } else {
        w[e] = unmerge_exact(w[e], d, (in_codes >> (2 * c)) & 3u);
      }
    }
    if constexpr (kMode == MergeMode::kRestoreCodes) p.codes[g] = static_cast<uint8_t>(out_codes);
  }
}

template <typename T, typename TA, MergeMode kMode>
cudaError_t launch_mode(const MergeParams& p) {
  const int elem_bytes = static_cast<int>(sizeof(T));
  if (kMode == MergeMode::kMerge || p.k % 4 == 0) {
    const int64_t row_tiles = (p.n + kBlockRows - 1) / kBlockRows;
    const int64_t col_tiles = (p.k + kBlockCols - 1) / kBlockCols;
    if (row_tiles > 0x7fffffff || col_tiles > 65535) return cudaErrorInvalidConfiguration;
    const bool w_vec = vector_rows_ok(p.weight, p.k, p.n, elem_bytes);
    const bool a_vec = vector_rows_ok(p.a, p.k, p.r, static_cast<int>(sizeof(TA)));
    const dim3 grid(static_cast<unsigned>(row_tiles), static_cast<unsigned>(col_tiles));
    return launch_kernel(LORACUDA_KERNEL(merge_rows_kernel<T, TA, kMode>), grid, kThreads, p.stream, p, w_vec, a_vec);
  }
  const int64_t groups = (p.n * p.k + 3) / 4;
  return launch_kernel(LORACUDA_KERNEL(merge_flat_kernel<T, TA, kMode>),
                       grid_cap((groups + kThreads - 1) / kThreads, p.num_sms), kThreads, p.stream, p);
}

}  // namespace

cudaError_t launch_merge(const MergeParams& p) {
  if (p.n <= 0 || p.k <= 0) return cudaSuccess;  // empty weight
  if (p.r <= 0 || (p.mode != MergeMode::kMerge && p.codes == nullptr)) return cudaErrorInvalidValue;
  return dispatch_value_adapter(p.weight_dtype, p.adapter_dtype, [&](auto tw, auto ta) {
    using T = typename decltype(tw)::type;
    using TA = typename decltype(ta)::type;
    switch (p.mode) {
      case MergeMode::kMerge: return launch_mode<T, TA, MergeMode::kMerge>(p);
      case MergeMode::kRestoreCodes: return launch_mode<T, TA, MergeMode::kRestoreCodes>(p);
      case MergeMode::kUnmergeExact: return launch_mode<T, TA, MergeMode::kUnmergeExact>(p);
    }
    return cudaErrorInvalidValue;
  });
}

}  // namespace cuda
}  // namespace loracuda
