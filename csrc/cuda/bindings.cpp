// CUDA implementations of the loracuda ops: argument checks (csrc/checks.h), device guard, current
// stream, the plain parameter structs of csrc/cuda/params.h, outputs and workspaces from the caching
// allocator (at::empty: no host synchronisation), then the launchers of csrc/cuda/*.cu.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "../checks.h"
#include "../grouped_checks.h"
#include "../dropout_hash.h"
#include "params.h"

namespace loracuda {
namespace {

using at::Tensor;
namespace kc = loracuda::cuda;

kc::DType kernel_dtype(const Tensor& t, const char* op, const char* arg) {
  switch (t.scalar_type()) {
    case at::kFloat: return kc::DType::kFloat32;
    case at::kBFloat16: return kc::DType::kBFloat16;
    case at::kHalf: return kc::DType::kFloat16;
    default: break;
  }
  LORACUDA_CHECK_ARG_TYPE(false, op, arg, "must be float32, bfloat16 or float16 on CUDA, got ", t.scalar_type());
  return kc::DType::kFloat32;  // not reached
}

// The kernels read 2-D operands with unit column stride and any row stride; anything else is
// copied first (inputs only: they are read, never written).
Tensor unit_columns(const Tensor& t) { return t.size(1) <= 1 || t.stride(1) == 1 ? t : t.contiguous(); }

// Elements between rows of a tensor with unit column stride (any value will do for one row).
int64_t row_stride(const Tensor& t) { return t.size(0) <= 1 ? t.size(1) : t.stride(0); }

int num_sms() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

kc::DropoutParams dropout_params(double p, const std::optional<Tensor>& seed) {
  kc::DropoutParams d;
  if (!(p > 0.0)) return d;  // the exact no-dropout path
  d.enabled = true;
  d.threshold = dropout_threshold(p);
  d.keep_scale = static_cast<float>(1.0 / (1.0 - p));
  if (seed->is_cpu()) {
    d.seed_value = host_seed(seed);  // a CPU tensor: reading it does not wait for the device
  } else {
    d.seed_ptr = seed->data_ptr<int64_t>();  // read by the kernel itself
  }
  return d;
}

void check_slice_count(const std::vector<int64_t>& offsets, const char* op) {
  const int64_t slices = static_cast<int64_t>(offsets.size()) - 1;
  LORACUDA_CHECK_ARG(slices <= kc::kMaxSlices, op, "slice_offsets", "must describe at most ", kc::kMaxSlices,
                     " slices on CUDA, got ", slices);
}

void copy_offsets(const std::vector<int64_t>& offsets, int64_t (&out)[kc::kMaxSlices + 1]) {
  for (size_t i = 0; i < offsets.size(); ++i) out[i] = offsets[i];
}

// ---- shrink -------------------------------------------------------------------------------------

Tensor shrink_cuda(const Tensor& x_in, const Tensor& lora_a, double dropout_p, const std::optional<Tensor>& seed) {
  check_shrink_args(x_in, lora_a, dropout_p, seed);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const Tensor x = unit_columns(x_in);
  const Tensor a = lora_a.contiguous();
  const int64_t m = x.size(0), k = x.size(1), rank = a.size(0);
  Tensor h = at::empty({m, rank}, x.options().dtype(at::kFloat));
  if (m == 0) return h;

  kc::ShrinkParams p;
  p.x = x.data_ptr();
  p.x_row_stride = row_stride(x);
  p.x_dtype = kernel_dtype(x, "shrink", "x");
  p.a = a.data_ptr();
  p.a_dtype = kernel_dtype(a, "shrink", "lora_a");
  p.h = h.data_ptr<float>();
  p.m = m;
  p.k = k;
  p.rank = rank;
  p.dropout = dropout_params(dropout_p, seed);
  p.num_sms = num_sms();
  p.stream = at::cuda::getCurrentCUDAStream().stream();
  Tensor workspace;
  const int64_t floats = kc::shrink_workspace_floats(p);
  if (floats > 0) {
    workspace = at::empty({floats}, x.options().dtype(at::kFloat));
    p.workspace = workspace.data_ptr<float>();
    p.workspace_floats = floats;
  }
  C10_CUDA_CHECK(kc::launch_shrink(p));
  return h;
}

// ---- expand_add_ ----------------------------------------------------------------------------------

void expand_add_cuda(Tensor& y, const Tensor& h_in, const Tensor& lora_b, double scale,
                     at::IntArrayRef slice_offsets) {
  const char* op = "expand_add_";
  const auto offsets = check_expand_add_args(y, h_in, lora_b, scale, slice_offsets);
  check_slice_count(offsets, op);
  const c10::cuda::CUDAGuard guard(y.device());
  const int64_t m = y.size(0), n = y.size(1);
  if (m == 0 || n == 0) return;
  const Tensor h = h_in.contiguous();
  const Tensor b = lora_b.contiguous();
  // A one-row y may have any column stride (csrc/checks.h): update a unit-stride copy, copy back.
  Tensor target = y.size(1) <= 1 || y.stride(1) == 1 ? y : y.contiguous();

  kc::ExpandParams p;
  p.y = target.data_ptr();
  p.y_row_stride = row_stride(target);
  p.y_dtype = kernel_dtype(target, op, "y");
  p.h = h.data_ptr<float>();
  p.b = b.data_ptr();
  p.b_dtype = kernel_dtype(b, op, "lora_b");
  p.m = m;
  p.n = n;
  p.r = b.size(1);
  p.num_slices = static_cast<int>(offsets.size()) - 1;
  copy_offsets(offsets, p.slice_offsets);
  p.scale = static_cast<float>(scale);
  p.num_sms = num_sms();
  p.stream = at::cuda::getCurrentCUDAStream().stream();
  C10_CUDA_CHECK(kc::launch_expand_add(p));
  if (!target.is_same(y)) y.copy_(target);
}

// ---- merge family -----------------------------------------------------------------------------------

// The kernels see weight [N, K] with a [r, K], b [N, r]. A transposed weight [K, N] is the same
// problem with a' = b^T [r, N] and b' = a^T [K, r] (small copies; the products a[j,k] * b[n,j]
// are the same, so the delta is the same bits).
kc::MergeParams merge_params(const Tensor& weight, const Tensor& lora_a, const Tensor& lora_b, double scale,
                             bool transposed, kc::MergeMode mode, const char* op, Tensor& a_keep, Tensor& b_keep) {
  a_keep = transposed ? lora_b.t().contiguous() : lora_a.contiguous();
  b_keep = transposed ? lora_a.t().contiguous() : lora_b.contiguous();
  kc::MergeParams p;
  p.weight = weight.data_ptr();
  p.weight_dtype = kernel_dtype(weight, op, "weight");
  p.a = a_keep.data_ptr();
  p.b = b_keep.data_ptr();
  p.adapter_dtype = kernel_dtype(lora_a, op, "lora_a");
  p.n = weight.size(0);
  p.k = weight.size(1);
  p.r = a_keep.size(0);
  p.transposed = false;  // already folded into a' and b'
  p.scale = static_cast<float>(scale);
  p.mode = mode;
  p.num_sms = num_sms();
  p.stream = at::cuda::getCurrentCUDAStream().stream();
  return p;
}

void merge_cuda(Tensor& weight, const Tensor& lora_a, const Tensor& lora_b, double scale, bool transposed) {
  const char* op = "merge_";
  check_merge_args(weight, lora_a, lora_b, scale, transposed, op);
  check_merge_written(weight, lora_a, lora_b, nullptr, nullptr, op);
  const c10::cuda::CUDAGuard guard(weight.device());
  if (weight.numel() == 0) return;
  Tensor a, b;
  const kc::MergeParams p = merge_params(weight, lora_a, lora_b, scale, transposed, kc::MergeMode::kMerge, op, a, b);
  C10_CUDA_CHECK(kc::launch_merge(p));
}

Tensor restore_codes_cuda(const Tensor& weight, const Tensor& lora_a, const Tensor& lora_b, double scale,
                          bool transposed) {
  const char* op = "restore_codes";
  check_merge_args(weight, lora_a, lora_b, scale, transposed, op);
  const c10::cuda::CUDAGuard guard(weight.device());
  Tensor codes = at::empty({restore_code_bytes(weight.numel())}, weight.options().dtype(at::kByte));
  if (weight.numel() == 0) return codes;
  Tensor a, b;
  kc::MergeParams p =
      merge_params(weight, lora_a, lora_b, scale, transposed, kc::MergeMode::kRestoreCodes, op, a, b);
  p.codes = codes.data_ptr<uint8_t>();
  C10_CUDA_CHECK(kc::launch_merge(p));
  return codes;
}

// Flat indices (int64, ascending) of the code-3 elements of packed codes for `numel` elements, by ATen
// ops on the device: hit = c & (c >> 1) & 0x55 has bit 2q set iff element q of the byte has code 3;
// only the bytes with a hit are expanded. nonzero synchronises with the host (it sizes its output).
Tensor escape_positions(const Tensor& codes, int64_t numel) {
  const Tensor hit = at::bitwise_and(at::bitwise_and(codes, at::bitwise_right_shift(codes, 1)), 0x55);
  const Tensor byte_index = at::nonzero(hit).squeeze(1);
  if (byte_index.numel() == 0) return byte_index;
  const Tensor shifts = at::arange(0, 8, 2, codes.options());
  const Tensor is_escape =
      at::bitwise_and(at::bitwise_right_shift(hit.index_select(0, byte_index).unsqueeze(1), shifts), 1).to(at::kBool);
  const Tensor pos = (byte_index.unsqueeze(1) * 4 + at::arange(4, byte_index.options())).masked_select(is_escape);
  return pos.masked_select(pos < numel);  // codes past the last element are 0; kept for safety
}

void unmerge_exact_cuda(Tensor& weight, const Tensor& lora_a, const Tensor& lora_b, double scale, bool transposed,
                        const Tensor& codes, const std::optional<Tensor>& escape_values) {
  const char* op = "unmerge_exact_";
  check_merge_args(weight, lora_a, lora_b, scale, transposed, op);
  check_restore_codes(weight, codes, op);
  if (escape_values.has_value()) check_escape_values(weight, *escape_values, op);
  check_merge_written(weight, lora_a, lora_b, &codes, optional_ptr(escape_values), op);
  const c10::cuda::CUDAGuard guard(weight.device());
  Tensor pos;
  if (escape_values.has_value()) {
    pos = escape_positions(codes, weight.numel());
    check_escape_count(*escape_values, pos.numel(), op);  // before anything is written
  }
  if (weight.numel() == 0) return;
  Tensor a, b;
  kc::MergeParams p =
      merge_params(weight, lora_a, lora_b, scale, transposed, kc::MergeMode::kUnmergeExact, op, a, b);
  p.codes = codes.data_ptr<uint8_t>();  // read only in this mode
  C10_CUDA_CHECK(kc::launch_merge(p));
  if (pos.defined() && pos.numel() > 0) weight.view(-1).index_put_({pos}, *escape_values);
}

// restore_codes, then the escapes located and saved (host synchronisations: their number sizes the outputs),
// the record size checked, then merge_: the weight is written only after every check has passed.
std::tuple<Tensor, Tensor> merge_exact_cuda(Tensor& weight, const Tensor& lora_a, const Tensor& lora_b, double scale,
                                            bool transposed, int64_t max_record_bytes) {
  const char* op = "merge_exact_";
  check_merge_args(weight, lora_a, lora_b, scale, transposed, op);
  check_merge_written(weight, lora_a, lora_b, nullptr, nullptr, op);
  const int64_t code_bytes = restore_code_bytes(weight.numel());
  check_record_bytes(code_bytes, 0, weight.element_size(), max_record_bytes, op);
  const c10::cuda::CUDAGuard guard(weight.device());
  Tensor codes = restore_codes_cuda(weight, lora_a, lora_b, scale, transposed);
  const Tensor pos = escape_positions(codes, weight.numel());
  check_record_bytes(code_bytes, pos.numel(), weight.element_size(), max_record_bytes, op);
  Tensor values = weight.view(-1).index_select(0, pos);  // a new tensor: the originals
  merge_cuda(weight, lora_a, lora_b, scale, transposed);
  return {codes, values};
}

// ---- backward ------------------------------------------------------------------------------------------

std::tuple<Tensor, Tensor> backward_cuda(const Tensor& grad_y_in, const Tensor& x_in, const Tensor& h_in,
                                         const Tensor& lora_a, const Tensor& lora_b, double scale, double dropout_p,
                                         const std::optional<Tensor>& seed, at::IntArrayRef slice_offsets,
                                         const std::optional<Tensor>& grad_x) {
  const char* op = "backward";
  const auto offsets =
      check_backward_args(grad_y_in, x_in, h_in, lora_a, lora_b, scale, dropout_p, seed, slice_offsets, grad_x);
  check_slice_count(offsets, op);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const Tensor grad_y = unit_columns(grad_y_in);
  const Tensor x = unit_columns(x_in);
  const Tensor h = h_in.contiguous();
  const Tensor a = lora_a.contiguous();
  const Tensor b = lora_b.contiguous();
  const int64_t m = x.size(0), k = x.size(1), n = grad_y.size(1), r = b.size(1), rank = a.size(0);
  Tensor grad_a = at::empty({rank, k}, a.options());
  Tensor grad_b = at::empty({n, r}, b.options());
  Tensor g = at::empty({m, rank}, x.options().dtype(at::kFloat));  // scale * grad_y @ b, float32
  Tensor gx_target;
  if (grad_x.has_value()) {
    const Tensor& gx = *grad_x;
    gx_target = gx.size(1) <= 1 || gx.stride(1) == 1 ? gx : gx.contiguous();
  }

  kc::BackwardParams p;
  p.grad_y = grad_y.data_ptr();
  p.grad_y_row_stride = row_stride(grad_y);
  p.x = x.data_ptr();
  p.x_row_stride = row_stride(x);
  p.value_dtype = kernel_dtype(x, op, "x");
  p.h = h.data_ptr<float>();
  p.a = a.data_ptr();
  p.a_dtype = kernel_dtype(a, op, "lora_a");
  p.b = b.data_ptr();
  p.b_dtype = kernel_dtype(b, op, "lora_b");
  p.grad_a = grad_a.data_ptr();
  p.grad_b = grad_b.data_ptr();
  if (gx_target.defined()) {
    p.grad_x = gx_target.data_ptr();
    p.grad_x_row_stride = row_stride(gx_target);
  }
  p.g = g.data_ptr<float>();
  p.m = m;
  p.n = n;
  p.k = k;
  p.r = r;
  p.num_slices = static_cast<int>(offsets.size()) - 1;
  copy_offsets(offsets, p.slice_offsets);
  p.scale = static_cast<float>(scale);
  p.dropout = dropout_params(dropout_p, seed);
  p.num_sms = num_sms();
  p.stream = at::cuda::getCurrentCUDAStream().stream();
  Tensor workspace;
  const int64_t floats = kc::backward_workspace_floats(p);
  if (floats > 0) {
    workspace = at::empty({floats}, x.options().dtype(at::kFloat));
    p.workspace = workspace.data_ptr<float>();
    p.workspace_floats = floats;
  }
  C10_CUDA_CHECK(kc::launch_backward(p));
  if (gx_target.defined() && !gx_target.is_same(*grad_x)) grad_x->copy_(gx_target);
  return {grad_a, grad_b};
}

// ---- multi-LoRA serving -----------------------------------------------------------------------------
// No host synchronisation: the values of ranks and adapter_ids are not read here (the kernels clamp
// ranks and treat ids outside [0, L) as no adapter), and the workspace size depends on shapes only,
// so both ops can be captured in a CUDA graph.

Tensor multi_shrink_cuda(const Tensor& x_in, const Tensor& lora_a_all, const Tensor& ranks, const Tensor& adapter_ids,
                         int64_t num_slices) {
  const char* op = "multi_shrink";
  check_multi_shrink_args(x_in, lora_a_all, ranks, adapter_ids, num_slices);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const Tensor x = unit_columns(x_in);
  const int64_t m = x.size(0), k = x.size(1), rank = lora_a_all.size(1);
  Tensor h = at::empty({m, rank}, x.options().dtype(at::kFloat));
  if (m == 0) return h;

  kc::MultiShrinkParams p;
  p.x = x.data_ptr();
  p.x_row_stride = row_stride(x);
  p.x_dtype = kernel_dtype(x, op, "x");
  p.a = lora_a_all.data_ptr();  // contiguous (checked)
  p.a_dtype = kernel_dtype(lora_a_all, op, "lora_a_all");
  p.ranks = ranks.data_ptr<int32_t>();
  p.adapter_ids = adapter_ids.data_ptr<int32_t>();
  p.h = h.data_ptr<float>();
  p.m = m;
  p.k = k;
  p.rank = rank;
  p.r_max = rank / num_slices;
  p.num_adapters = lora_a_all.size(0);
  p.num_sms = num_sms();
  p.stream = at::cuda::getCurrentCUDAStream().stream();
  Tensor workspace;
  const int64_t floats = kc::multi_shrink_workspace_floats(p);
  if (floats > 0) {
    workspace = at::empty({floats}, x.options().dtype(at::kFloat));
    p.workspace = workspace.data_ptr<float>();
    p.workspace_floats = floats;
  }
  C10_CUDA_CHECK(kc::launch_multi_shrink(p));
  return h;
}

void multi_expand_add_cuda(Tensor& y, const Tensor& h_in, const Tensor& lora_b_all, const Tensor& scales,
                           const Tensor& ranks, const Tensor& adapter_ids, at::IntArrayRef slice_offsets) {
  const char* op = "multi_expand_add_";
  const auto offsets = check_multi_expand_add_args(y, h_in, lora_b_all, scales, ranks, adapter_ids, slice_offsets);
  check_slice_count(offsets, op);
  const c10::cuda::CUDAGuard guard(y.device());
  const int64_t m = y.size(0), n = y.size(1);
  if (m == 0 || n == 0) return;
  const Tensor h = h_in.contiguous();
  // A one-row y may have any column stride (csrc/checks.h): update a unit-stride copy, copy back.
  Tensor target = y.size(1) <= 1 || y.stride(1) == 1 ? y : y.contiguous();

  kc::MultiExpandParams p;
  p.y = target.data_ptr();
  p.y_row_stride = row_stride(target);
  p.y_dtype = kernel_dtype(target, op, "y");
  p.h = h.data_ptr<float>();
  p.b = lora_b_all.data_ptr();  // contiguous (checked)
  p.b_dtype = kernel_dtype(lora_b_all, op, "lora_b_all");
  p.scales = scales.data_ptr<float>();
  p.ranks = ranks.data_ptr<int32_t>();
  p.adapter_ids = adapter_ids.data_ptr<int32_t>();
  p.m = m;
  p.n = n;
  p.r_max = lora_b_all.size(2);
  p.num_adapters = lora_b_all.size(0);
  p.num_slices = static_cast<int>(offsets.size()) - 1;
  copy_offsets(offsets, p.slice_offsets);
  p.num_sms = num_sms();
  p.stream = at::cuda::getCurrentCUDAStream().stream();
  C10_CUDA_CHECK(kc::launch_multi_expand_add(p));
  if (!target.is_same(y)) y.copy_(target);
}

// ---- grouped LoRA (mixture-of-experts experts) ---------------------------------------------------------
// No host synchronisation: the ids are not read here (the kernels treat an id outside [0, G) as -1),
// factors and weights are passed with their strides (no copy of a PEFT-layout view).

kc::GroupIds group_ids_params(const Tensor& ids, int64_t groups) {
  kc::GroupIds g;
  g.ids = ids.data_ptr<int64_t>();
  g.stride = ids.size(0) <= 1 ? 1 : ids.stride(0);
  g.groups = groups;
  return g;
}

// A [G, rows, cols] tensor as the kernels' strided operand; `swap` reads it as [G, cols, rows].
kc::GroupedOperand operand(const Tensor& t, bool swap, const char* op, const char* arg) {
  kc::GroupedOperand o;
  o.ptr = t.data_ptr();
  o.dtype = kernel_dtype(t, op, arg);
  o.group_stride = t.stride(0);
  o.row_stride = swap ? t.stride(2) : t.stride(1);
  o.col_stride = swap ? t.stride(1) : t.stride(2);
  return o;
}

Tensor grouped_shrink_cuda(const Tensor& x_in, const Tensor& lora_a, const Tensor& group_ids, double dropout_p,
                           const std::optional<Tensor>& seed) {
  const char* op = "grouped_shrink";
  check_grouped_shrink_args(x_in, lora_a, group_ids, dropout_p, seed);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const Tensor x = unit_columns(x_in);
  const int64_t m = x.size(0), r = lora_a.size(1);
  Tensor h = at::empty({m, r}, x.options().dtype(at::kFloat));
  if (m == 0) return h;
  kc::GroupedRowShrinkParams p;
  p.x = x.data_ptr();
  p.x_row_stride = row_stride(x);
  p.x_dtype = kernel_dtype(x, op, "x");
  p.a = operand(lora_a, false, op, "lora_a");
  p.ids = group_ids_params(group_ids, lora_a.size(0));
  p.out = h.data_ptr<float>();
  p.out_row_stride = r;
  p.m = m;
  p.k = x.size(1);
  p.j = r;
  p.dropout = dropout_params(dropout_p, seed);
  p.num_sms = num_sms();
  p.stream = at::cuda::getCurrentCUDAStream().stream();
  C10_CUDA_CHECK(kc::launch_grouped_row_shrink(p));
  return h;
}

void grouped_expand_add_cuda(Tensor& y, const Tensor& h_in, const Tensor& lora_b, const Tensor& group_ids,
                             double scale) {
  const char* op = "grouped_expand_add_";
  check_grouped_expand_args(y, h_in, lora_b, group_ids, scale);
  const c10::cuda::CUDAGuard guard(y.device());
  if (y.size(0) == 0 || y.size(1) == 0) return;
  const Tensor h = unit_columns(h_in);
  Tensor target = y.size(1) <= 1 || y.stride(1) == 1 ? y : y.contiguous();
  kc::GroupedRowExpandParams p;
  p.y = target.data_ptr();
  p.y_row_stride = row_stride(target);
  p.y_dtype = kernel_dtype(target, op, "y");
  p.h = h.data_ptr<float>();
  p.h_row_stride = row_stride(h);
  p.b = operand(lora_b, false, op, "lora_b");
  p.ids = group_ids_params(group_ids, lora_b.size(0));
  p.m = y.size(0);
  p.n = y.size(1);
  p.j = lora_b.size(2);
  p.scale = static_cast<float>(scale);
  p.num_sms = num_sms();
  p.stream = at::cuda::getCurrentCUDAStream().stream();
  C10_CUDA_CHECK(kc::launch_grouped_row_expand(p));
  if (!target.is_same(y)) y.copy_(target);
}

// out [G, P, Q] (dtype out_dtype) = alpha * per-group sum of p_rows^T q_rows (q_rows dropped when p > 0).
Tensor grouped_reduce(const Tensor& p_rows, const Tensor& q_rows, const Tensor& group_ids, int64_t groups,
                      at::ScalarType value_dtype, at::ScalarType out_dtype, double alpha, double dropout_p,
                      const std::optional<Tensor>& seed, const char* op) {
  const Tensor pr = unit_columns(p_rows), qr = unit_columns(q_rows);
  Tensor out = at::empty({groups, pr.size(1), qr.size(1)}, pr.options().dtype(out_dtype));
  kc::GroupedReduceParams p;
  p.value_dtype = value_dtype == at::kBFloat16 ? kc::DType::kBFloat16
                  : value_dtype == at::kHalf   ? kc::DType::kFloat16
                                               : kc::DType::kFloat32;  // checked by the caller
  p.p_rows = pr.data_ptr();
  p.p_row_stride = row_stride(pr);
  p.p_float = pr.scalar_type() == at::kFloat;
  p.q_rows = qr.data_ptr();
  p.q_row_stride = row_stride(qr);
  p.q_float = qr.scalar_type() == at::kFloat;
  p.out = out.data_ptr();
  p.out_float = out_dtype == at::kFloat;
  p.ids = group_ids_params(group_ids, groups);
  p.m = pr.size(0);
  p.p_cols = pr.size(1);
  p.q_cols = qr.size(1);
  p.alpha = static_cast<float>(alpha);
  p.q_dropout = dropout_params(dropout_p, seed);
  p.stream = at::cuda::getCurrentCUDAStream().stream();
  C10_CUDA_CHECK(kc::launch_grouped_reduce(p));
  return out;
}

std::tuple<Tensor, Tensor> grouped_backward_cuda(const Tensor& grad_y_in, const Tensor& x_in, const Tensor& h_in,
                                                 const Tensor& lora_a, const Tensor& lora_b, const Tensor& group_ids,
                                                 double scale, double dropout_p, const std::optional<Tensor>& seed,
                                                 const std::optional<Tensor>& grad_x) {
  const char* op = "grouped_backward";
  check_grouped_backward_args(grad_y_in, x_in, h_in, lora_a, lora_b, group_ids, scale, dropout_p, seed, grad_x);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const Tensor grad_y = unit_columns(grad_y_in), x = unit_columns(x_in), h = unit_columns(h_in);
  const int64_t m = x.size(0), k = x.size(1), n = grad_y.size(1), r = lora_a.size(1), groups = lora_a.size(0);
  const auto stream = at::cuda::getCurrentCUDAStream().stream();
  // g [M, r] = scale * grad_y @ b_g (b read as [G, r, N] through its strides).
  Tensor g = at::empty({m, r}, x.options().dtype(at::kFloat));
  if (m > 0) {
    kc::GroupedRowShrinkParams p;
    p.x = grad_y.data_ptr();
    p.x_row_stride = row_stride(grad_y);
    p.x_dtype = kernel_dtype(grad_y, op, "grad_y");
    p.a = operand(lora_b, true, op, "lora_b");
    p.ids = group_ids_params(group_ids, groups);
    p.out = g.data_ptr<float>();
    p.out_row_stride = r;
    p.m = m;
    p.k = n;
    p.j = r;
    p.alpha = static_cast<float>(scale);
    p.num_sms = num_sms();
    p.stream = stream;
    C10_CUDA_CHECK(kc::launch_grouped_row_shrink(p));
  }
  const at::ScalarType value = x.scalar_type();
  Tensor grad_b = grouped_reduce(grad_y, h, group_ids, groups, value, lora_b.scalar_type(), scale, 0.0, std::nullopt, op);
  Tensor grad_a = grouped_reduce(g, x, group_ids, groups, value, lora_a.scalar_type(), 1.0, dropout_p, seed, op);
  if (grad_x.has_value() && m > 0) {
    Tensor target = k <= 1 || grad_x->stride(1) == 1 ? *grad_x : grad_x->contiguous();
    kc::GroupedRowExpandParams p;
    p.y = target.data_ptr();
    p.y_row_stride = row_stride(target);
    p.y_dtype = kernel_dtype(target, op, "grad_x");
    p.h = g.data_ptr<float>();
    p.h_row_stride = r;
    p.b = operand(lora_a, true, op, "lora_a");  // a read as [G, K, r]
    p.ids = group_ids_params(group_ids, groups);
    p.m = m;
    p.n = k;
    p.j = r;
    p.scale = 1.0f;
    p.dropout = dropout_params(dropout_p, seed);
    p.num_sms = num_sms();
    p.stream = stream;
    C10_CUDA_CHECK(kc::launch_grouped_row_expand(p));
    if (!target.is_same(*grad_x)) grad_x->copy_(target);
  }
  return {grad_a, grad_b};
}

Tensor grouped_mm_cuda(const Tensor& x_in, const Tensor& weight, const Tensor& group_ids, bool transpose_weight) {
  const char* op = "grouped_mm";
  check_grouped_mm_args(x_in, weight, group_ids, transpose_weight);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const Tensor x = unit_columns(x_in);
  const int64_t width = transpose_weight ? weight.size(2) : weight.size(1);
  Tensor out = at::empty({x.size(0), width}, x.options());
  if (x.size(0) == 0 || width == 0) return out;
  kc::GroupedMmParams p;
  p.x = x.data_ptr();
  p.x_row_stride = row_stride(x);
  p.dtype = kernel_dtype(x, op, "x");
  p.w = operand(weight, transpose_weight, op, "weight");  // read as [G, width, x's columns]
  p.ids = group_ids_params(group_ids, weight.size(0));
  p.out = out.data_ptr();
  p.m = x.size(0);
  p.n = width;
  p.k = x.size(1);
  p.num_sms = num_sms();
  p.stream = at::cuda::getCurrentCUDAStream().stream();
  C10_CUDA_CHECK(kc::launch_grouped_mm(p));
  return out;
}

Tensor grouped_weight_grad_cuda(const Tensor& grad_y, const Tensor& x, const Tensor& group_ids, int64_t num_groups) {
  const char* op = "grouped_weight_grad";
  check_grouped_weight_grad_args(grad_y, x, group_ids, num_groups);
  const c10::cuda::CUDAGuard guard(x.device());
  return grouped_reduce(grad_y, x, group_ids, num_groups, x.scalar_type(), x.scalar_type(), 1.0, 0.0, std::nullopt,
                        op);
}

}  // namespace

// The host build of this file (csrc/emulation/ops.cpp) exposes these functions to its own module instead.
#if !defined(LORACUDA_EMULATION)
TORCH_LIBRARY_IMPL(loracuda, CUDA, m) {
  m.impl("shrink", &shrink_cuda);
  m.impl("expand_add_", &expand_add_cuda);
  m.impl("merge_", &merge_cuda);
  m.impl("restore_codes", &restore_codes_cuda);
  m.impl("unmerge_exact_", &unmerge_exact_cuda);
  m.impl("merge_exact_", &merge_exact_cuda);
  m.impl("backward", &backward_cuda);
  m.impl("multi_shrink", &multi_shrink_cuda);
  m.impl("multi_expand_add_", &multi_expand_add_cuda);
  m.impl("grouped_shrink", &grouped_shrink_cuda);
  m.impl("grouped_expand_add_", &grouped_expand_add_cuda);
  m.impl("grouped_backward", &grouped_backward_cuda);
  m.impl("grouped_mm", &grouped_mm_cuda);
  m.impl("grouped_weight_grad", &grouped_weight_grad_cuda);
}
#endif

}  // namespace loracuda
