// grouped_lora_linear on CUDA as a composite of the grouped ops (the CPU kernel, csrc/cpu/grouped.cpp,
// fuses them on each item's gathered rows instead):
//   y = grouped_mm(x, weight, group_ids)                 the base expert GEMM, rows with id -1 give 0
//   h = grouped_shrink(x, lora_a, group_ids, p, seed)    [M, r] float32
//   grouped_expand_add_(y, h, lora_b, group_ids, scale)  in place into y
// Returns (y, h); the autograd formula (csrc/grouped_lora_linear_autograd.cpp) saves h.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "grouped_checks.h"

namespace loracuda {
namespace {

using at::Tensor;

[[maybe_unused]] std::tuple<Tensor, Tensor> grouped_lora_linear_composite(
    const Tensor& x, const Tensor& weight, const Tensor& lora_a, const Tensor& lora_b, const Tensor& group_ids,
    double scale, double dropout_p, const std::optional<Tensor>& seed) {
  // Every argument is checked before the base GEMM runs, so a bad adapter costs nothing.
  check_grouped_lora_linear_args(x, weight, lora_a, lora_b, group_ids, scale, dropout_p, seed);
  static auto mm = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("loracuda::grouped_mm", "")
                       .typed<Tensor(const Tensor&, const Tensor&, const Tensor&, bool)>();
  static auto shrink = c10::Dispatcher::singleton()
                           .findSchemaOrThrow("loracuda::grouped_shrink", "")
                           .typed<Tensor(const Tensor&, const Tensor&, const Tensor&, double,
                                         const std::optional<Tensor>&)>();
  static auto expand = c10::Dispatcher::singleton()
                           .findSchemaOrThrow("loracuda::grouped_expand_add_", "")
                           .typed<void(Tensor&, const Tensor&, const Tensor&, const Tensor&, double)>();
  Tensor y = mm.call(x, weight, group_ids, false);
  Tensor h = shrink.call(x, lora_a, group_ids, dropout_p, seed);
  expand.call(y, h, lora_b, group_ids, scale);
  return {y, h};
}

}  // namespace

#ifdef LORACUDA_WITH_CUDA
TORCH_LIBRARY_IMPL(loracuda, CUDA, m) { m.impl("grouped_lora_linear", &grouped_lora_linear_composite); }
#endif

}  // namespace loracuda
