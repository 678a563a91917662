// Argument checks of the grouped ops (grouped_shrink, grouped_expand_add_, grouped_backward, grouped_mm,
// grouped_weight_grad, grouped_lora_linear), shared by the CPU and CUDA implementations.
//
// Notation: G groups; group_ids int64 [M] in [-1, G); x [M, K]; lora_a [G, r, K]; lora_b [G, N, r];
// weight [G, N, K]; h [M, r] in the accumulation dtype; y [M, N]. Factors and weights may be any strided
// view (PEFT's target_parameters layout is a permuted view); the kernels read them through their strides.
// As in checks.h, every check runs before anything is allocated or written, and each message names the op
// and the argument (loracuda/ops.py's fake implementations repeat the shape messages). The written
// arguments (grouped_expand_add_'s y, grouped_backward's grad_x) follow checks.h's overlap rule; the
// other grouped ops return fresh tensors.
#pragma once
#include "checks.h"

namespace loracuda {

// group_ids: int64 [M] on the device of `ref` (any stride). Its values are checked by check_group_values_cpu.
inline void check_group_ids(const at::Tensor& ids, int64_t m, const at::Tensor& ref, const char* op,
                            const char* ref_arg) {
  check_dim(ids, 1, op, "group_ids", "[M]");
  LORACUDA_CHECK_ARG_TYPE(ids.scalar_type() == at::kLong, op, "group_ids", "must be int64, got ", ids.scalar_type());
  LORACUDA_CHECK_ARG(ids.size(0) == m, op, "group_ids", "must have M = ", m, " entries (one per row of '", ref_arg,
                     "'), got shape ", ids.sizes());
  check_same_device(ids, ref, op, "group_ids", ref_arg);
}

// CPU only (reading device memory would be a host synchronisation): every id in [-1, G).
inline void check_group_values_cpu(const at::Tensor& ids, int64_t groups, const char* op) {
  const int64_t* p = ids.const_data_ptr<int64_t>();
  const int64_t s = ids.stride(0);
  for (int64_t i = 0; i < ids.size(0); ++i) {
    const int64_t v = p[i * s];
    LORACUDA_CHECK_ARG(v >= -1 && v < groups, op, "group_ids", "must hold ids in [-1, G = ", groups, "), got ", v,
                       " at row ", i);
  }
}

// lora_a [G, r, K] with K = k (G, r >= 1), in value_dtype or float32, on ref's device.
inline void check_grouped_a(const at::Tensor& a, int64_t k, at::ScalarType value_dtype, const at::Tensor& ref,
                            const char* op, const char* value_arg) {
  check_dim(a, 3, op, "lora_a", "[G, r, K]");
  check_adapter_dtype(a, value_dtype, op, "lora_a", value_arg);
  check_same_device(a, ref, op, "lora_a", value_arg);
  LORACUDA_CHECK_ARG(a.size(0) >= 1 && a.size(1) >= 1 && a.size(2) == k, op, "lora_a",
                     "must be [G, r, K] with G >= 1, r >= 1 and K = ", k, ", got shape ", a.sizes());
}

// lora_b [G, N, r] with N = n and (when given, >= 0) G = groups, r = rank.
inline void check_grouped_b(const at::Tensor& b, int64_t n, int64_t groups, int64_t rank, at::ScalarType value_dtype,
                            const at::Tensor& ref, const char* op, const char* value_arg) {
  check_dim(b, 3, op, "lora_b", "[G, N, r]");
  check_adapter_dtype(b, value_dtype, op, "lora_b", value_arg);
  check_same_device(b, ref, op, "lora_b", value_arg);
  LORACUDA_CHECK_ARG(b.size(0) >= 1 && b.size(1) == n && b.size(2) >= 1, op, "lora_b",
                     "must be [G, N, r] with G >= 1, r >= 1 and N = ", n, ", got shape ", b.sizes());
  if (groups >= 0) {
    LORACUDA_CHECK_ARG(b.size(0) == groups && b.size(2) == rank, op, "lora_b", "must be [G, N, r] = [", groups, ", ",
                       n, ", ", rank, "] (G and r from 'lora_a'), got shape ", b.sizes());
  }
}

// grouped_shrink: x [M, K], lora_a [G, r, K], group_ids [M].
inline void check_grouped_shrink_args(const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& group_ids,
                                      double dropout_p, const std::optional<at::Tensor>& seed,
                                      const char* op = "grouped_shrink") {
  check_dim(x, 2, op, "x", "[M, K]");
  check_value_dtype(x, op, "x");
  LORACUDA_CHECK_ARG(x.size(1) >= 1, op, "x", "must have K >= 1 columns, got shape ", x.sizes());
  check_grouped_a(lora_a, x.size(1), x.scalar_type(), x, op, "x");
  check_group_ids(group_ids, x.size(0), x, op, "x");
  check_dropout(dropout_p, seed, x, op);
}

// grouped_expand_add_: y [M, N] += scale * h [M, r] @ lora_b[g]^T.
inline void check_grouped_expand_args(const at::Tensor& y, const at::Tensor& h, const at::Tensor& lora_b,
                                      const at::Tensor& group_ids, double scale) {
  const char* op = "grouped_expand_add_";
  check_dim(y, 2, op, "y", "[M, N]");
  check_dim(h, 2, op, "h", "[M, r]");
  check_value_dtype(y, op, "y");
  LORACUDA_CHECK_ARG_TYPE(h.scalar_type() == accumulate_dtype(y.scalar_type()), op, "h", "must be ",
                          accumulate_dtype(y.scalar_type()), " (the accumulation dtype for 'y' of dtype ",
                          y.scalar_type(), "), got ", h.scalar_type());
  check_same_device(h, y, op, "h", "y");
  check_grouped_b(lora_b, y.size(1), -1, -1, y.scalar_type(), y, op, "y");
  check_finite_scalar(scale, op, "scale");
  check_row_major_output(y, op, "y");
  LORACUDA_CHECK_ARG(h.size(0) == y.size(0) && h.size(1) == lora_b.size(2), op, "h", "must be [M, r] = [", y.size(0),
                     ", ", lora_b.size(2), "] (M from 'y', r from 'lora_b'), got shape ", h.sizes());
  check_group_ids(group_ids, y.size(0), y, op, "y");
  check_written_alone(y, "y", {{"h", &h}, {"lora_b", &lora_b}, {"group_ids", &group_ids}}, op);
}

// grouped_backward: grad_y [M, N], x [M, K], h [M, r], lora_a [G, r, K], lora_b [G, N, r], grad_x [M, K] or None.
inline void check_grouped_backward_args(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& h,
                                        const at::Tensor& lora_a, const at::Tensor& lora_b,
                                        const at::Tensor& group_ids, double scale, double dropout_p,
                                        const std::optional<at::Tensor>& seed,
                                        const std::optional<at::Tensor>& grad_x) {
  const char* op = "grouped_backward";
  check_dim(grad_y, 2, op, "grad_y", "[M, N]");
  check_dim(x, 2, op, "x", "[M, K]");
  check_dim(h, 2, op, "h", "[M, r]");
  check_value_dtype(x, op, "x");
  LORACUDA_CHECK_ARG_TYPE(grad_y.scalar_type() == x.scalar_type(), op, "grad_y", "must have the dtype of 'x' (",
                          x.scalar_type(), "), got ", grad_y.scalar_type());
  LORACUDA_CHECK_ARG_TYPE(h.scalar_type() == accumulate_dtype(x.scalar_type()), op, "h", "must be ",
                          accumulate_dtype(x.scalar_type()), ", got ", h.scalar_type());
  check_same_device(grad_y, x, op, "grad_y", "x");
  check_same_device(h, x, op, "h", "x");
  const int64_t m = x.size(0), k = x.size(1), n = grad_y.size(1);
  LORACUDA_CHECK_ARG(k >= 1, op, "x", "must have K >= 1 columns, got shape ", x.sizes());
  LORACUDA_CHECK_ARG(grad_y.size(0) == m, op, "grad_y", "must have M = ", m, " rows (from 'x'), got shape ",
                     grad_y.sizes());
  check_grouped_a(lora_a, k, x.scalar_type(), x, op, "x");
  check_grouped_b(lora_b, n, lora_a.size(0), lora_a.size(1), x.scalar_type(), x, op, "x");
  LORACUDA_CHECK_ARG(h.size(0) == m && h.size(1) == lora_a.size(1), op, "h", "must be [M, r] = [", m, ", ",
                     lora_a.size(1), "], got shape ", h.sizes());
  check_group_ids(group_ids, m, x, op, "x");
  check_finite_scalar(scale, op, "scale");
  check_dropout(dropout_p, seed, x, op);
  if (grad_x.has_value()) {
    check_grad_x(*grad_x, x,
                 {{"grad_y", &grad_y}, {"x", &x}, {"h", &h}, {"lora_a", &lora_a}, {"lora_b", &lora_b},
                  {"group_ids", &group_ids}, {"seed", optional_ptr(seed)}},
                 op);
  }
}

// weight [G, N, K] in x's dtype on x's device; `k_in` is x's width (K, or N when transposed).
inline void check_grouped_weight(const at::Tensor& weight, const at::Tensor& x, int64_t k_in, bool transposed,
                                 const char* op) {
  check_dim(weight, 3, op, "weight", "[G, N, K]");
  LORACUDA_CHECK_ARG_TYPE(weight.scalar_type() == x.scalar_type(), op, "weight", "must have the dtype of 'x' (",
                          x.scalar_type(), "), got ", weight.scalar_type());
  check_same_device(weight, x, op, "weight", "x");
  const int64_t width = transposed ? weight.size(1) : weight.size(2);
  LORACUDA_CHECK_ARG(weight.size(0) >= 1 && width == k_in, op, "weight", "must be [G, N, K] with G >= 1 and ",
                     (transposed ? "N = " : "K = "), k_in, " (from 'x'), got shape ", weight.sizes());
}

inline void check_grouped_mm_args(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& group_ids,
                                  bool transposed) {
  const char* op = "grouped_mm";
  check_dim(x, 2, op, "x", transposed ? "[M, N]" : "[M, K]");
  check_value_dtype(x, op, "x");
  check_grouped_weight(weight, x, x.size(1), transposed, op);
  check_group_ids(group_ids, x.size(0), x, op, "x");
}

inline void check_grouped_weight_grad_args(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& group_ids,
                                           int64_t num_groups) {
  const char* op = "grouped_weight_grad";
  check_dim(grad_y, 2, op, "grad_y", "[M, N]");
  check_dim(x, 2, op, "x", "[M, K]");
  check_value_dtype(x, op, "x");
  LORACUDA_CHECK_ARG_TYPE(grad_y.scalar_type() == x.scalar_type(), op, "grad_y", "must have the dtype of 'x' (",
                          x.scalar_type(), "), got ", grad_y.scalar_type());
  check_same_device(grad_y, x, op, "grad_y", "x");
  LORACUDA_CHECK_ARG(grad_y.size(0) == x.size(0), op, "grad_y", "must have M = ", x.size(0),
                     " rows (from 'x'), got shape ", grad_y.sizes());
  LORACUDA_CHECK_ARG(num_groups >= 1, op, "num_groups", "must be >= 1, got ", num_groups);
  check_group_ids(group_ids, x.size(0), x, op, "x");
}

// grouped_lora_linear: x [M, K], weight [G, N, K], lora_a [G, r, K], lora_b [G, N, r], group_ids [M].
inline void check_grouped_lora_linear_args(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_a,
                                           const at::Tensor& lora_b, const at::Tensor& group_ids, double scale,
                                           double dropout_p, const std::optional<at::Tensor>& seed) {
  const char* op = "grouped_lora_linear";
  check_dim(x, 2, op, "x", "[M, K]");
  check_value_dtype(x, op, "x");
  LORACUDA_CHECK_ARG(x.size(1) >= 1, op, "x", "must have K >= 1 columns, got shape ", x.sizes());
  check_grouped_weight(weight, x, x.size(1), false, op);
  check_grouped_a(lora_a, x.size(1), x.scalar_type(), x, op, "x");
  LORACUDA_CHECK_ARG(lora_a.size(0) == weight.size(0), op, "lora_a", "must have G = ", weight.size(0),
                     " groups (from 'weight'), got shape ", lora_a.sizes());
  check_grouped_b(lora_b, weight.size(1), lora_a.size(0), lora_a.size(1), x.scalar_type(), x, op, "x");
  check_group_ids(group_ids, x.size(0), x, op, "x");
  check_finite_scalar(scale, op, "scale");
  check_dropout(dropout_p, seed, x, op);
}

}  // namespace loracuda
