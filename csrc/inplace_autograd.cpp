// Autograd kernels of the loracuda ops that write into an argument (expand_add_, merge_, merge_exact_,
// unmerge_exact_, multi_expand_add_, grouped_expand_add_, and backward's / grouped_backward's grad_x). None of them has a derivative formula, so
// with grad mode on each applies torch's rules for in-place ops, then redispatches below autograd:
//
//  - the written tensor may not be a leaf that requires grad, nor a view of one: torch raises "a leaf
//    Variable that requires grad is being used in an in-place operation", and so do these ops;
//  - no tensor the op reads may require grad: the op would record no graph, and that tensor's gradient
//    would be silently missing (expand_add_ inside a graph gave h and lora_b none). The message says
//    what to use instead. A written tensor that requires grad as a non-leaf is fine when nothing it
//    reads does: the op adds a constant to it, whose gradient is the identity autograd already applies.
//
// Under torch.no_grad() / inference_mode (how merges and serving run) nothing is checked.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <initializer_list>
#include <optional>
#include <tuple>
#include <utility>

namespace loracuda {
namespace {

using at::Tensor;
using c10::DispatchKeySet;

constexpr DispatchKeySet kBelowAutograd = c10::after_autograd_keyset;

template <typename Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

using Named = std::pair<const char*, const Tensor*>;

inline const Tensor* optional_ptr(const std::optional<Tensor>& t) { return t.has_value() ? &*t : nullptr; }

// `written`: the tensor the op writes (or null); `read`: every tensor the op reads to compute what it
// writes or returns; `instead`: what to use for a differentiable result.
void check_grad_rules(const char* op, const Tensor* written, const char* written_arg, std::initializer_list<Named> read,
                      const char* instead) {
  if (!at::GradMode::is_enabled()) return;
  if (written != nullptr && written->defined() && written->requires_grad()) {
    TORCH_CHECK(!written->is_leaf(), "loracuda.", op,
                ": a leaf Variable that requires grad is being used in an in-place operation (argument '", written_arg,
                "'); call it under torch.no_grad() or on a tensor that does not require grad");
    TORCH_CHECK(!(written->is_view() && written->_base().is_leaf()), "loracuda.", op,
                ": a view of a leaf Variable that requires grad is being used in an in-place operation (argument '",
                written_arg, "'); call it under torch.no_grad() or on a tensor that does not require grad");
  }
  for (const auto& [name, t] : read) {
    TORCH_CHECK(t == nullptr || !t->defined() || !t->requires_grad(), "loracuda.", op,
                " is not differentiable, but argument '", name,
                "' requires grad: its gradient would be silently missing. ", instead);
  }
}

constexpr const char* kUseLoraLinear =
    "Use loracuda.lora_linear (differentiable) for a LoRA layer inside a graph, or call this op under "
    "torch.no_grad() / on detached tensors.";
constexpr const char* kMergeNoGrad =
    "Merging is not differentiable: call it under torch.no_grad() (loracuda.merge does) or on detached tensors.";
constexpr const char* kBackwardInstead =
    "For gradients of gradients (create_graph=True) use loracuda.lora_linear, whose backward is differentiable.";
constexpr const char* kMultiInstead =
    "Multi-LoRA serving is inference only: call it under torch.no_grad() / torch.inference_mode() or on detached "
    "tensors; for training use loracuda.lora_linear.";

void expand_add_(DispatchKeySet ks, Tensor& y, const Tensor& h, const Tensor& lora_b, double scale,
                 c10::IntArrayRef slice_offsets) {
  static auto op =
      find_op<void(Tensor&, const Tensor&, const Tensor&, double, c10::IntArrayRef)>("loracuda::expand_add_");
  check_grad_rules("expand_add_", &y, "y", {{"h", &h}, {"lora_b", &lora_b}}, kUseLoraLinear);
  op.redispatch(ks & kBelowAutograd, y, h, lora_b, scale, slice_offsets);
}

void merge_(DispatchKeySet ks, Tensor& weight, const Tensor& lora_a, const Tensor& lora_b, double scale,
            bool transposed) {
  static auto op = find_op<void(Tensor&, const Tensor&, const Tensor&, double, bool)>("loracuda::merge_");
  check_grad_rules("merge_", &weight, "weight", {{"lora_a", &lora_a}, {"lora_b", &lora_b}}, kMergeNoGrad);
  op.redispatch(ks & kBelowAutograd, weight, lora_a, lora_b, scale, transposed);
}

void unmerge_exact_(DispatchKeySet ks, Tensor& weight, const Tensor& lora_a, const Tensor& lora_b, double scale,
                    bool transposed, const Tensor& codes, const std::optional<Tensor>& escape_values) {
  static auto op = find_op<void(Tensor&, const Tensor&, const Tensor&, double, bool, const Tensor&,
                                const std::optional<Tensor>&)>("loracuda::unmerge_exact_");
  check_grad_rules("unmerge_exact_", &weight, "weight",
                   {{"lora_a", &lora_a}, {"lora_b", &lora_b}, {"escape_values", optional_ptr(escape_values)}},
                   kMergeNoGrad);
  op.redispatch(ks & kBelowAutograd, weight, lora_a, lora_b, scale, transposed, codes, escape_values);
}

std::tuple<Tensor, Tensor> merge_exact_(DispatchKeySet ks, Tensor& weight, const Tensor& lora_a, const Tensor& lora_b,
                                        double scale, bool transposed, int64_t max_record_bytes) {
  static auto op = find_op<std::tuple<Tensor, Tensor>(Tensor&, const Tensor&, const Tensor&, double, bool, int64_t)>(
      "loracuda::merge_exact_");
  // The escape values it returns are copies of the weight: a weight that requires grad is refused too.
  check_grad_rules("merge_exact_", &weight, "weight", {{"lora_a", &lora_a}, {"lora_b", &lora_b}, {"weight", &weight}},
                   kMergeNoGrad);
  return op.redispatch(ks & kBelowAutograd, weight, lora_a, lora_b, scale, transposed, max_record_bytes);
}

std::tuple<Tensor, Tensor> backward(DispatchKeySet ks, const Tensor& grad_y, const Tensor& x, const Tensor& h,
                                    const Tensor& lora_a, const Tensor& lora_b, double scale, double dropout_p,
                                    const std::optional<Tensor>& seed, c10::IntArrayRef slice_offsets,
                                    const std::optional<Tensor>& grad_x) {
  static auto op = find_op<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                      const Tensor&, double, double, const std::optional<Tensor>&,
                                                      c10::IntArrayRef, const std::optional<Tensor>&)>(
      "loracuda::backward");
  check_grad_rules("backward", optional_ptr(grad_x), "grad_x",
                   {{"grad_y", &grad_y}, {"x", &x}, {"h", &h}, {"lora_a", &lora_a}, {"lora_b", &lora_b}},
                   kBackwardInstead);
  return op.redispatch(ks & kBelowAutograd, grad_y, x, h, lora_a, lora_b, scale, dropout_p, seed, slice_offsets,
                       grad_x);
}

void multi_expand_add_(DispatchKeySet ks, Tensor& y, const Tensor& h, const Tensor& lora_b_all, const Tensor& scales,
                       const Tensor& ranks, const Tensor& adapter_ids, c10::IntArrayRef slice_offsets) {
  static auto op = find_op<void(Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                c10::IntArrayRef)>("loracuda::multi_expand_add_");
  check_grad_rules("multi_expand_add_", &y, "y", {{"h", &h}, {"lora_b_all", &lora_b_all}, {"scales", &scales}},
                   kMultiInstead);
  op.redispatch(ks & kBelowAutograd, y, h, lora_b_all, scales, ranks, adapter_ids, slice_offsets);
}

constexpr const char* kUseGroupedLoraLinear =
    "Use loracuda.grouped_lora_linear (differentiable) for a mixture-of-experts LoRA layer inside a graph, or call "
    "this op under torch.no_grad() / on detached tensors.";

void grouped_expand_add_(DispatchKeySet ks, Tensor& y, const Tensor& h, const Tensor& lora_b, const Tensor& group_ids,
                         double scale) {
  static auto op = find_op<void(Tensor&, const Tensor&, const Tensor&, const Tensor&, double)>(
      "loracuda::grouped_expand_add_");
  check_grad_rules("grouped_expand_add_", &y, "y", {{"h", &h}, {"lora_b", &lora_b}}, kUseGroupedLoraLinear);
  op.redispatch(ks & kBelowAutograd, y, h, lora_b, group_ids, scale);
}

std::tuple<Tensor, Tensor> grouped_backward(DispatchKeySet ks, const Tensor& grad_y, const Tensor& x, const Tensor& h,
                                            const Tensor& lora_a, const Tensor& lora_b, const Tensor& group_ids,
                                            double scale, double dropout_p, const std::optional<Tensor>& seed,
                                            const std::optional<Tensor>& grad_x) {
  static auto op = find_op<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                      const Tensor&, const Tensor&, double, double,
                                                      const std::optional<Tensor>&, const std::optional<Tensor>&)>(
      "loracuda::grouped_backward");
  check_grad_rules("grouped_backward", optional_ptr(grad_x), "grad_x",
                   {{"grad_y", &grad_y}, {"x", &x}, {"h", &h}, {"lora_a", &lora_a}, {"lora_b", &lora_b}},
                   kUseGroupedLoraLinear);
  return op.redispatch(ks & kBelowAutograd, grad_y, x, h, lora_a, lora_b, group_ids, scale, dropout_p, seed, grad_x);
}

}  // namespace

TORCH_LIBRARY_IMPL(loracuda, Autograd, m) {
  m.impl("expand_add_", TORCH_FN(expand_add_));
  m.impl("merge_", TORCH_FN(merge_));
  m.impl("unmerge_exact_", TORCH_FN(unmerge_exact_));
  m.impl("merge_exact_", TORCH_FN(merge_exact_));
  m.impl("backward", TORCH_FN(backward));
  m.impl("multi_expand_add_", TORCH_FN(multi_expand_add_));
  m.impl("grouped_expand_add_", TORCH_FN(grouped_expand_add_));
  m.impl("grouped_backward", TORCH_FN(grouped_backward));
}

}  // namespace loracuda
