// The autograd formula of loracuda::grouped_lora_linear, registered for the Autograd key (as
// csrc/lora_linear_autograd.cpp does for lora_linear) so that the op is differentiable wherever it is
// called: loracuda.grouped_lora_linear, torch.compile'd graphs, C++.
//
// Forward: the CPU / CUDA kernel below autograd. Saved: x, weight, lora_a, lora_b, group_ids, h [M, r]
// (float32) and the dropout seed; no mask, no gathered copy of x.
// Backward (rows with id -1 get no gradient: y did not depend on them):
//   grad_x  = grouped_mm(grad_y, weight, ids, transpose_weight=true)   the base dgrad, per group
//   grouped_backward(grad_y, x, h, lora_a, lora_b, ids, ..., grad_x)    adds the LoRA part in place and
//                                                                       returns grad_a, grad_b per group
//   grad_weight = grouped_weight_grad(grad_y, x, ids, G)                only when the weight requires grad
// with autocast off, as in lora_linear's backward.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace loracuda {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::tuple<Tensor, Tensor> call_forward(const Tensor& x, const Tensor& weight, const Tensor& lora_a,
                                        const Tensor& lora_b, const Tensor& ids, double scale, double dropout_p,
                                        const std::optional<Tensor>& seed) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("loracuda::grouped_lora_linear", "")
                       .typed<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                         const Tensor&, double, double,
                                                         const std::optional<Tensor>&)>();
  return op.call(x, weight, lora_a, lora_b, ids, scale, dropout_p, seed);
}

Tensor call_grouped_mm(const Tensor& x, const Tensor& weight, const Tensor& ids, bool transpose_weight) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("loracuda::grouped_mm", "")
                       .typed<Tensor(const Tensor&, const Tensor&, const Tensor&, bool)>();
  return op.call(x, weight, ids, transpose_weight);
}

Tensor call_weight_grad(const Tensor& grad_y, const Tensor& x, const Tensor& ids, int64_t groups) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("loracuda::grouped_weight_grad", "")
                       .typed<Tensor(const Tensor&, const Tensor&, const Tensor&, int64_t)>();
  return op.call(grad_y, x, ids, groups);
}

std::tuple<Tensor, Tensor> call_backward(const Tensor& grad_y, const Tensor& x, const Tensor& h, const Tensor& lora_a,
                                         const Tensor& lora_b, const Tensor& ids, double scale, double dropout_p,
                                         const std::optional<Tensor>& seed, const std::optional<Tensor>& grad_x) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("loracuda::grouped_backward", "")
                       .typed<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                         const Tensor&, const Tensor&, double, double,
                                                         const std::optional<Tensor>&, const std::optional<Tensor>&)>();
  return op.call(grad_y, x, h, lora_a, lora_b, ids, scale, dropout_p, seed, grad_x);
}

class GroupedLoraLinearFunction : public torch::autograd::Function<GroupedLoraLinearFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight, const Tensor& lora_a,
                               const Tensor& lora_b, const Tensor& group_ids, double scale, double dropout_p,
                               const std::optional<Tensor>& seed) {
    Tensor y, h;
    {
      const at::AutoDispatchBelowADInplaceOrView below_autograd;
      std::tie(y, h) = call_forward(x, weight, lora_a, lora_b, group_ids, scale, dropout_p, seed);
    }
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["dropout_p"] = dropout_p;
    ctx->save_for_backward({x, weight, lora_a, lora_b, group_ids, h, seed.has_value() ? *seed : Tensor()});
    ctx->mark_non_differentiable({h});
    ctx->set_materialize_grads(false);
    return {y, h};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    const variable_list saved = ctx->get_saved_variables();
    const Tensor& x = saved[0];
    const Tensor& weight = saved[1];
    const Tensor& lora_a = saved[2];
    const Tensor& lora_b = saved[3];
    const Tensor& ids = saved[4];
    const Tensor& h = saved[5];
    const std::optional<Tensor> seed = saved[6].defined() ? std::optional<Tensor>(saved[6]) : std::nullopt;
    const bool need_x = ctx->needs_input_grad(0), need_w = ctx->needs_input_grad(1);
    const bool need_a = ctx->needs_input_grad(2), need_b = ctx->needs_input_grad(3);
    const double scale = ctx->saved_data["scale"].toDouble();
    const double dropout_p = ctx->saved_data["dropout_p"].toDouble();
    // One slot per forward argument: x, weight, lora_a, lora_b, group_ids, scale, dropout_p, seed.
    variable_list out(8);
    const Tensor& grad_y = grads[0];
    if (!grad_y.defined()) return out;
    Tensor grad_x;
    if (need_x) grad_x = call_grouped_mm(grad_y, weight, ids, true);  // base dgrad; LoRA part added in place
    if (need_x || need_a || need_b) {
      auto [grad_a, grad_b] = call_backward(grad_y, x, h, lora_a, lora_b, ids, scale, dropout_p, seed,
                                            need_x ? std::optional<Tensor>(grad_x) : std::nullopt);
      if (need_a) out[2] = grad_a;
      if (need_b) out[3] = grad_b;
    }
    if (need_x) out[0] = grad_x;
    if (need_w) out[1] = call_weight_grad(grad_y, x, ids, weight.size(0));
    return out;
  }
};

std::tuple<Tensor, Tensor> grouped_lora_linear_autograd(const Tensor& x, const Tensor& weight, const Tensor& lora_a,
                                                        const Tensor& lora_b, const Tensor& group_ids, double scale,
                                                        double dropout_p, const std::optional<Tensor>& seed) {
  variable_list outputs =
      GroupedLoraLinearFunction::apply(x, weight, lora_a, lora_b, group_ids, scale, dropout_p, seed);
  return {outputs[0], outputs[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(loracuda, Autograd, m) { m.impl("grouped_lora_linear", &grouped_lora_linear_autograd); }

}  // namespace loracuda
