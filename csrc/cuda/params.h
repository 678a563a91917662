// Plain parameter structs shared by the CUDA host bindings (bindings.cpp, which sees torch) and the
// kernels (*.cu, which do not). Pointers are device pointers; sizes and strides count elements;
// every launcher runs on `stream`, makes no host synchronisation, and returns cudaGetLastError()
// after its launches so the binding can raise with C10_CUDA_CHECK.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace loracuda {
namespace cuda {

enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// Up to this many slices in one fused projection (q, k, v, ...).
constexpr int kMaxSlices = 8;

// Dropout as the kernels see it (see csrc/dropout_hash.h). enabled == false is the exact
// no-dropout path: no mask, no scaling.
struct DropoutParams {
  bool enabled = false;
  uint32_t threshold = 0;              // keep iff (bits >> 8) >= threshold
  float keep_scale = 1.0f;             // 1 / (1 - p), rounded to float32
  const int64_t* seed_ptr = nullptr;   // device seed (read in the kernel: no host sync), or null
  uint64_t seed_value = 0;             // the seed when it came from a CPU tensor
};

// h [M, R] (float32, row stride R) = (mask * x / q) [M, K] @ a^T, a [R, K] contiguous.
struct ShrinkParams {
  const void* x = nullptr;
  int64_t x_row_stride = 0;            // elements between rows of x; x's column stride is 1
  DType x_dtype = DType::kFloat32;
  const void* a = nullptr;
  DType a_dtype = DType::kFloat32;
  float* h = nullptr;
  int64_t m = 0, k = 0, rank = 0;      // rank = R = S * r
  DropoutParams dropout;
  float* workspace = nullptr;          // split-K partials, workspace_floats floats (may be null)
  int64_t workspace_floats = 0;
  int num_sms = 0;
  cudaStream_t stream = nullptr;
};

// y [M, N] (row stride y_row_stride) += scale * h[:, i*r:(i+1)*r] @ b[off[i]:off[i+1], :]^T.
struct ExpandParams {
  void* y = nullptr;
  int64_t y_row_stride = 0;
  DType y_dtype = DType::kFloat32;
  const float* h = nullptr;            // [M, S*r] contiguous float32
  const void* b = nullptr;             // [N, r] contiguous
  DType b_dtype = DType::kFloat32;
  int64_t m = 0, n = 0, r = 0;
  int num_slices = 1;
  int64_t slice_offsets[kMaxSlices + 1] = {0};
  float scale = 1.0f;
  int num_sms = 0;
  cudaStream_t stream = nullptr;
};

// weight [N, K] (transposed: [K, N]) contiguous; a [r, K], b [N, r] contiguous, same dtype.
// delta[n, k] = scale * sum_j b[n, j] * a[j, k], float32, in a fixed order (bit-identical in every
// kernel that computes it).
enum class MergeMode : int {
  kMerge = 0,          // weight = round(weight + delta)
  kRestoreCodes = 1,   // codes only; weight untouched
  kUnmergeExact = 2,   // weight = round(weight - delta), then the codes applied
};

struct MergeParams {
  void* weight = nullptr;
  DType weight_dtype = DType::kFloat32;
  const void* a = nullptr;
  const void* b = nullptr;
  DType adapter_dtype = DType::kFloat32;
  int64_t n = 0, k = 0, r = 0;
  bool transposed = false;
  float scale = 1.0f;
  MergeMode mode = MergeMode::kMerge;
  uint8_t* codes = nullptr;            // [ceil(N*K/4)] 2-bit codes, element e at byte e/4, bits 2*(e%4)
  int num_sms = 0;
  cudaStream_t stream = nullptr;
};

// The backward of one LoRA linear layer (see csrc/ops.cpp for the formulas).
struct BackwardParams {
  const void* grad_y = nullptr;        // [M, N], row stride grad_y_row_stride
  int64_t grad_y_row_stride = 0;
  const void* x = nullptr;             // [M, K], row stride x_row_stride
  int64_t x_row_stride = 0;
  DType value_dtype = DType::kFloat32; // dtype of grad_y, x, grad_x
  const float* h = nullptr;            // [M, R] contiguous
  const void* a = nullptr;             // [R, K] contiguous
  DType a_dtype = DType::kFloat32;
  const void* b = nullptr;             // [N, r] contiguous
  DType b_dtype = DType::kFloat32;
  void* grad_a = nullptr;              // [R, K] contiguous, a_dtype
  void* grad_b = nullptr;              // [N, r] contiguous, b_dtype
  void* grad_x = nullptr;              // [M, K] row stride grad_x_row_stride, or null
  int64_t grad_x_row_stride = 0;
  float* g = nullptr;                  // [M, R] float32 scratch: scale * grad_y @ b
  float* workspace = nullptr;          // deterministic two-stage reduction partials
  int64_t workspace_floats = 0;
  int64_t m = 0, n = 0, k = 0, r = 0;
  int num_slices = 1;
  int64_t slice_offsets[kMaxSlices + 1] = {0};
  float scale = 1.0f;
  DropoutParams dropout;
  int num_sms = 0;
  cudaStream_t stream = nullptr;
};

// Multi-LoRA serving (csrc/cuda/multi_lora.cu): L stacked adapters, one adapter id per token.
// An id outside [0, L) (or -1) means no adapter; ranks are clamped to [0, r_max]. Neither is checked
// on the host (that would read device memory), and no memory is accessed through an invalid id.
//
// h [M, R] float32 contiguous, R = S * r_max: h[m, i*r_max + j] = x[m] . a[id_m, i*r_max + j] for
// j < rank(id_m), 0 for the other columns and for every column of a row without an adapter.
struct MultiShrinkParams {
  const void* x = nullptr;
  int64_t x_row_stride = 0;            // elements between rows of x; x's column stride is 1
  DType x_dtype = DType::kFloat32;
  const void* a = nullptr;             // [L, R, K] contiguous
  DType a_dtype = DType::kFloat32;
  const int32_t* ranks = nullptr;      // [L]
  const int32_t* adapter_ids = nullptr;  // [M]
  float* h = nullptr;
  int64_t m = 0, k = 0, rank = 0;      // rank = R = S * r_max
  int64_t r_max = 0;                   // rows of one slice of one adapter
  int64_t num_adapters = 0;            // L
  float* workspace = nullptr;          // split-K partials, workspace_floats floats (may be null)
  int64_t workspace_floats = 0;
  int num_sms = 0;
  cudaStream_t stream = nullptr;
};

// y [M, N] (row stride y_row_stride) += scales[id_m] * h[m, i*r_max + j] * b[id_m, n, j] summed over
// j < rank(id_m), for n in slice i = [off[i], off[i+1]); rows without an adapter are not written.
struct MultiExpandParams {
  void* y = nullptr;
  int64_t y_row_stride = 0;
  DType y_dtype = DType::kFloat32;
  const float* h = nullptr;            // [M, S*r_max] contiguous float32
  const void* b = nullptr;             // [L, N, r_max] contiguous
  DType b_dtype = DType::kFloat32;
  const float* scales = nullptr;       // [L]
  const int32_t* ranks = nullptr;      // [L]
  const int32_t* adapter_ids = nullptr;  // [M]
  int64_t m = 0, n = 0, r_max = 0, num_adapters = 0;
  int num_slices = 1;
  int64_t slice_offsets[kMaxSlices + 1] = {0};
  int num_sms = 0;
  cudaStream_t stream = nullptr;
};

// ---- grouped LoRA (csrc/cuda/grouped.cu): one group (mixture-of-experts expert) per row ----------
// The host reads no id (no synchronisation): the kernels read them and treat an id outside [0, G)
// (the -1 of a row without a group included) as "no group", never forming an address from it.

// A [G, rows, cols] operand read through its element strides: any view, PEFT's permuted
// target_parameters layout included (and a transposed role, by swapping row and column strides).
struct GroupedOperand {
  const void* ptr = nullptr;
  DType dtype = DType::kFloat32;
  int64_t group_stride = 0, row_stride = 0, col_stride = 0;
};

struct GroupIds {
  const int64_t* ids = nullptr;        // [M], element m at ids[m * stride]
  int64_t stride = 1;
  int64_t groups = 0;                  // G
};

// out [M, J] float32 (row stride out_row_stride): out[m, j] = alpha * sum_k dropped(x)[m, k] * a(g_m, j, k),
// 0 for a row without a group. Dropout element index m * K + k. (grouped_shrink; and backward's
// g = scale * grad_y @ b_g with a = b's transposed view.)
struct GroupedRowShrinkParams {
  const void* x = nullptr;
  int64_t x_row_stride = 0;            // x's column stride is 1
  DType x_dtype = DType::kFloat32;
  GroupedOperand a;                    // [G, J, K]
  GroupIds ids;
  float* out = nullptr;
  int64_t out_row_stride = 0;
  int64_t m = 0, k = 0, j = 0;
  float alpha = 1.0f;
  DropoutParams dropout;
  int num_sms = 0;
  cudaStream_t stream = nullptr;
};

// y [M, N] (unit column stride) += scale * dropped(sum_j h[m, j] * b(g_m, n, j)) for the rows with a group
// (others untouched); dropout element index m * N + n. (grouped_expand_add_; and backward's grad_x
// += dropped(g @ a_g) with b = a's transposed view.)
struct GroupedRowExpandParams {
  void* y = nullptr;
  int64_t y_row_stride = 0;
  DType y_dtype = DType::kFloat32;
  const float* h = nullptr;            // [M, J], unit column stride
  int64_t h_row_stride = 0;
  GroupedOperand b;                    // [G, N, J]
  GroupIds ids;
  int64_t m = 0, n = 0, j = 0;
  float scale = 1.0f;
  DropoutParams dropout;
  int num_sms = 0;
  cudaStream_t stream = nullptr;
};

// The base grouped GEMM: out [M, N] (contiguous, x's dtype) = sum_k x[m, k] * w(g_m, n, k); 0 for a row
// without a group. w has x's dtype.
struct GroupedMmParams {
  const void* x = nullptr;
  int64_t x_row_stride = 0;            // unit column stride
  DType dtype = DType::kFloat32;
  GroupedOperand w;                    // [G, N, K]
  GroupIds ids;
  void* out = nullptr;
  int64_t m = 0, n = 0, k = 0;
  int num_sms = 0;
  cudaStream_t stream = nullptr;
};

// out [G, P, Q] contiguous = alpha * sum over the rows m of group g, in ascending order, of
// p_rows[m, p] * dropped(q_rows)[m, q] (dropout element index m * Q + q); exact zeros for a group
// without rows. p_rows, q_rows and out are each in value_dtype or float32. One thread owns each output
// element: no atomics, the same bits on every run. (Weight gradient, grad_a and grad_b.)
struct GroupedReduceParams {
  DType value_dtype = DType::kFloat32;
  const void* p_rows = nullptr;
  int64_t p_row_stride = 0;            // unit column stride
  bool p_float = true;                 // float32 (else value_dtype)
  const void* q_rows = nullptr;
  int64_t q_row_stride = 0;
  bool q_float = true;
  void* out = nullptr;
  bool out_float = true;
  GroupIds ids;
  int64_t m = 0, p_cols = 0, q_cols = 0;
  float alpha = 1.0f;
  DropoutParams q_dropout;
  cudaStream_t stream = nullptr;
};

cudaError_t launch_grouped_row_shrink(const GroupedRowShrinkParams& p);
cudaError_t launch_grouped_row_expand(const GroupedRowExpandParams& p);
cudaError_t launch_grouped_mm(const GroupedMmParams& p);
cudaError_t launch_grouped_reduce(const GroupedReduceParams& p);

// Launchers (csrc/cuda/{shrink,expand,merge,backward,multi_lora}.cu). The *_workspace_floats
// functions tell the binding how much scratch to allocate (through the caching allocator) before
// the launch.
int64_t shrink_workspace_floats(const ShrinkParams& p);
cudaError_t launch_shrink(const ShrinkParams& p);
cudaError_t launch_expand_add(const ExpandParams& p);
cudaError_t launch_merge(const MergeParams& p);
int64_t backward_workspace_floats(const BackwardParams& p);
cudaError_t launch_backward(const BackwardParams& p);
int64_t multi_shrink_workspace_floats(const MultiShrinkParams& p);
cudaError_t launch_multi_shrink(const MultiShrinkParams& p);
cudaError_t launch_multi_expand_add(const MultiExpandParams& p);

}  // namespace cuda
}  // namespace loracuda
