// ADInplaceOrView kernels of the loracuda ops that write into an argument (the Tensor(a!) ones):
// each runs the op below this key and then bumps the version counter of every tensor it wrote, as
// PyTorch's own in-place ops do. Autograd compares that counter with the one it recorded when it
// saved a tensor, so writing with loracuda into a tensor that a graph still needs (y saved by a later
// layer, a weight saved by a matmul) raises at backward instead of silently giving wrong gradients.
// One kernel per op, all device types alike: the key sits above CPU and CUDA in the dispatcher.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace loracuda {
namespace {

using at::Tensor;
using c10::DispatchKeySet;

template <typename Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// Runs `body` (a redispatch) with the ADInplaceOrView key excluded, then bumps each written tensor.
template <typename Body, typename... Written>
auto run_then_bump(Body&& body, Written&... written) {
  auto bump = [&] { (torch::autograd::impl::bump_version(written), ...); };
  if constexpr (std::is_void_v<decltype(body())>) {
    {
      const at::AutoDispatchBelowADInplaceOrView below;
      body();
    }
    bump();
  } else {
    auto result = [&] {
      const at::AutoDispatchBelowADInplaceOrView below;
      return body();
    }();
    bump();
    return result;
  }
}

constexpr DispatchKeySet kBelow = c10::after_ADInplaceOrView_keyset;

void expand_add_(DispatchKeySet ks, Tensor& y, const Tensor& h, const Tensor& lora_b, double scale,
                 c10::IntArrayRef slice_offsets) {
  static auto op = find_op<void(Tensor&, const Tensor&, const Tensor&, double, c10::IntArrayRef)>("loracuda::expand_add_");
  run_then_bump([&] { op.redispatch(ks & kBelow, y, h, lora_b, scale, slice_offsets); }, y);
}

void merge_(DispatchKeySet ks, Tensor& weight, const Tensor& lora_a, const Tensor& lora_b, double scale,
            bool transposed) {
  static auto op = find_op<void(Tensor&, const Tensor&, const Tensor&, double, bool)>("loracuda::merge_");
  run_then_bump([&] { op.redispatch(ks & kBelow, weight, lora_a, lora_b, scale, transposed); }, weight);
}

void unmerge_exact_(DispatchKeySet ks, Tensor& weight, const Tensor& lora_a, const Tensor& lora_b, double scale,
                    bool transposed, const Tensor& codes, const std::optional<Tensor>& escape_values) {
  static auto op = find_op<void(Tensor&, const Tensor&, const Tensor&, double, bool, const Tensor&,
                                const std::optional<Tensor>&)>("loracuda::unmerge_exact_");
  run_then_bump([&] { op.redispatch(ks & kBelow, weight, lora_a, lora_b, scale, transposed, codes, escape_values); },
                weight);
}

std::tuple<Tensor, Tensor> merge_exact_(DispatchKeySet ks, Tensor& weight, const Tensor& lora_a, const Tensor& lora_b,
                                        double scale, bool transposed, int64_t max_record_bytes) {
  static auto op = find_op<std::tuple<Tensor, Tensor>(Tensor&, const Tensor&, const Tensor&, double, bool, int64_t)>(
      "loracuda::merge_exact_");
  return run_then_bump(
      [&] { return op.redispatch(ks & kBelow, weight, lora_a, lora_b, scale, transposed, max_record_bytes); }, weight);
}

std::tuple<Tensor, Tensor> backward(DispatchKeySet ks, const Tensor& grad_y, const Tensor& x, const Tensor& h,
                                    const Tensor& lora_a, const Tensor& lora_b, double scale, double dropout_p,
                                    const std::optional<Tensor>& seed, c10::IntArrayRef slice_offsets,
                                    const std::optional<Tensor>& grad_x) {
  static auto op = find_op<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                      const Tensor&, double, double, const std::optional<Tensor>&,
                                                      c10::IntArrayRef, const std::optional<Tensor>&)>(
      "loracuda::backward");
  auto result = [&] {
    const at::AutoDispatchBelowADInplaceOrView below;
    return op.redispatch(ks & kBelow, grad_y, x, h, lora_a, lora_b, scale, dropout_p, seed, slice_offsets, grad_x);
  }();
  if (grad_x.has_value()) torch::autograd::impl::bump_version(*grad_x);
  return result;
}

void multi_expand_add_(DispatchKeySet ks, Tensor& y, const Tensor& h, const Tensor& lora_b_all, const Tensor& scales,
                       const Tensor& ranks, const Tensor& adapter_ids, c10::IntArrayRef slice_offsets) {
  static auto op = find_op<void(Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                c10::IntArrayRef)>("loracuda::multi_expand_add_");
  run_then_bump([&] { op.redispatch(ks & kBelow, y, h, lora_b_all, scales, ranks, adapter_ids, slice_offsets); }, y);
}

}  // namespace

TORCH_LIBRARY_IMPL(loracuda, ADInplaceOrView, m) {
  m.impl("expand_add_", TORCH_FN(expand_add_));
  m.impl("merge_", TORCH_FN(merge_));
  m.impl("unmerge_exact_", TORCH_FN(unmerge_exact_));
  m.impl("merge_exact_", TORCH_FN(merge_exact_));
  m.impl("backward", TORCH_FN(backward));
  m.impl("multi_expand_add_", TORCH_FN(multi_expand_add_));
}

}  // namespace loracuda
