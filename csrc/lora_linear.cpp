// The LoRA linear layer's forward as one op, composed of the base GEMM and the loracuda ops:
//   y = x @ weight^T (+ bias)          the base GEMM (BLAS / cuBLAS), untouched
//   h = shrink(x, lora_a, p, seed)     [M, R] float32
//   expand_add_(y, h, lora_b, scale)   in place into y: one read-modify-write of y
// Returns (y, h); the autograd formula (csrc/lora_linear_autograd.cpp) saves x, h and the seed.
// Registered for CPU and CUDA alike: the ops it calls dispatch to the device's kernels.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "checks.h"

namespace loracuda {
namespace {

using at::Tensor;

Tensor call_shrink(const Tensor& x, const Tensor& lora_a, double dropout_p, const std::optional<Tensor>& seed) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("loracuda::shrink", "")
                       .typed<Tensor(const Tensor&, const Tensor&, double, const std::optional<Tensor>&)>();
  return op.call(x, lora_a, dropout_p, seed);
}

void call_expand_add(Tensor& y, const Tensor& h, const Tensor& lora_b, double scale, at::IntArrayRef offsets) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("loracuda::expand_add_", "")
                       .typed<void(Tensor&, const Tensor&, const Tensor&, double, at::IntArrayRef)>();
  op.call(y, h, lora_b, scale, offsets);
}

std::tuple<Tensor, Tensor> lora_linear(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                                       const Tensor& lora_a, const Tensor& lora_b, double scale, double dropout_p,
                                       const std::optional<Tensor>& seed, at::IntArrayRef slice_offsets) {
  const char* op = "lora_linear";
  check_dim(x, 2, op, "x", "[M, K]");
  check_dim(weight, 2, op, "weight", "[N, K]");
  check_value_dtype(x, op, "x");
  LORACUDA_CHECK_ARG_TYPE(weight.scalar_type() == x.scalar_type(), op, "weight", "must have the dtype of 'x' (",
                          x.scalar_type(), "), got ", weight.scalar_type());
  check_same_device(weight, x, op, "weight", "x");
  LORACUDA_CHECK_ARG(weight.size(1) == x.size(1), op, "weight", "must be [N, K] with K = ", x.size(1),
                     " (from 'x'), got shape ", weight.sizes());
  if (bias.has_value()) {
    LORACUDA_CHECK_ARG(bias->dim() == 1 && bias->size(0) == weight.size(0), op, "bias", "must be [N] with N = ",
                       weight.size(0), ", got shape ", bias->sizes());
    LORACUDA_CHECK_ARG_TYPE(bias->scalar_type() == x.scalar_type(), op, "bias", "must have the dtype of 'x' (",
                            x.scalar_type(), "), got ", bias->scalar_type());
    check_same_device(*bias, x, op, "bias", "x");
  }
  // Check the adapter arguments before the base GEMM runs, so a bad adapter costs nothing.
  check_shrink_args(x, lora_a, dropout_p, seed, op);
  check_finite_scalar(scale, op, "scale");
  LORACUDA_CHECK_ARG(lora_b.dim() == 2 && lora_b.size(0) == weight.size(0), op, "lora_b",
                     "must be [N, r] with N = ", weight.size(0), " (from 'weight'), got shape ", lora_b.sizes());
  const auto offsets = check_slice_offsets(slice_offsets, weight.size(0), op);
  LORACUDA_CHECK_ARG(lora_a.size(0) == (static_cast<int64_t>(offsets.size()) - 1) * lora_b.size(1), op, "lora_a",
                     "must have S * r = ", offsets.size() - 1, " * ", lora_b.size(1), " rows, got shape ",
                     lora_a.sizes());

  Tensor y = bias.has_value() ? at::addmm(*bias, x, weight.t()) : at::mm(x, weight.t());
  Tensor h = call_shrink(x, lora_a, dropout_p, seed);
  call_expand_add(y, h, lora_b, scale, slice_offsets);
  return {y, h};
}

}  // namespace

TORCH_LIBRARY_IMPL(loracuda, CPU, m) { m.impl("lora_linear", &lora_linear); }

#ifdef LORACUDA_WITH_CUDA
TORCH_LIBRARY_IMPL(loracuda, CUDA, m) { m.impl("lora_linear", &lora_linear); }
#endif

}  // namespace loracuda
