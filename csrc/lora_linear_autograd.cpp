// The autograd formula of loracuda::lora_linear (docs/design.md, section 'Math and memory passes'),
// registered for the Autograd key so that the op is differentiable wherever it is called
// (loracuda.lora_linear, torch.compile'd graphs, C++).
//
// Forward: the CPU / CUDA kernel (csrc/lora_linear.cpp) below autograd. Saved: x, weight, lora_a,
// lora_b, h [M, R] (float32) and the dropout seed; no dropout mask and no dropped copy of x.
// Backward: grad_x = grad_y @ weight by the base dgrad GEMM, then one loracuda::backward call adds the
// LoRA part into it in place and returns the adapter gradients; the frozen weight's gradient and the
// bias's only when they require one. The backward runs with autocast off: its GEMM takes the dtypes
// the forward ran in, and the float32 factors and their gradients are not cast.
//
// Why C++ and not torch.library.register_autograd: the Python formula costs about 70 us of
// interpreter and wrapper time per layer and step (measured on the README's machine: a tiny layer's
// forward + backward took 157 us with it, 84 us with a plain autograd.Function), which is a few
// percent of a layer's step at a few hundred tokens.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

namespace loracuda {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::tuple<Tensor, Tensor> call_forward(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                                        const Tensor& lora_a, const Tensor& lora_b, double scale, double dropout_p,
                                        const std::optional<Tensor>& seed, at::IntArrayRef offsets) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("loracuda::lora_linear", "")
                       .typed<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const std::optional<Tensor>&,
                                                         const Tensor&, const Tensor&, double, double,
                                                         const std::optional<Tensor>&, at::IntArrayRef)>();
  return op.call(x, weight, bias, lora_a, lora_b, scale, dropout_p, seed, offsets);
}

std::tuple<Tensor, Tensor> call_backward(const Tensor& grad_y, const Tensor& x, const Tensor& h, const Tensor& lora_a,
                                         const Tensor& lora_b, double scale, double dropout_p,
                                         const std::optional<Tensor>& seed, at::IntArrayRef offsets,
                                         const std::optional<Tensor>& grad_x) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("loracuda::backward", "")
                       .typed<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                         const Tensor&, double, double, const std::optional<Tensor>&,
                                                         at::IntArrayRef, const std::optional<Tensor>&)>();
  return op.call(grad_y, x, h, lora_a, lora_b, scale, dropout_p, seed, offsets, grad_x);
}

class LoraLinearFunction : public torch::autograd::Function<LoraLinearFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight,
                               const std::optional<Tensor>& bias, const Tensor& lora_a, const Tensor& lora_b,
                               double scale, double dropout_p, const std::optional<Tensor>& seed,
                               at::IntArrayRef slice_offsets) {
    Tensor y, h;
    {
      const at::AutoDispatchBelowADInplaceOrView below_autograd;
      std::tie(y, h) = call_forward(x, weight, bias, lora_a, lora_b, scale, dropout_p, seed, slice_offsets);
    }
    // The node's input edges are its tensor arguments in order, an absent bias skipped.
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["dropout_p"] = dropout_p;
    ctx->saved_data["offsets"] = slice_offsets.vec();
    ctx->save_for_backward({x, weight, lora_a, lora_b, h, seed.has_value() ? *seed : Tensor()});
    ctx->mark_non_differentiable({h});
    ctx->set_materialize_grads(false);  // no zeros for h's (never used) gradient
    return {y, h};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    // Autocast off: see the file comment.
    const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    const variable_list saved = ctx->get_saved_variables();
    const Tensor& x = saved[0];
    const Tensor& weight = saved[1];
    const Tensor& lora_a = saved[2];
    const Tensor& lora_b = saved[3];
    const Tensor& h = saved[4];
    const std::optional<Tensor> seed = saved[5].defined() ? std::optional<Tensor>(saved[5]) : std::nullopt;
    const int64_t after_bias = ctx->saved_data["has_bias"].toBool() ? 1 : 0;  // edges: x, weight, [bias], lora_a, lora_b
    const bool need_x = ctx->needs_input_grad(0), need_w = ctx->needs_input_grad(1);
    const bool need_bias = after_bias == 1 && ctx->needs_input_grad(2);
    const bool need_a = ctx->needs_input_grad(2 + after_bias), need_b = ctx->needs_input_grad(3 + after_bias);
    const double scale = ctx->saved_data["scale"].toDouble();
    const double dropout_p = ctx->saved_data["dropout_p"].toDouble();
    const std::vector<int64_t> offsets = ctx->saved_data["offsets"].toIntVector();

    // One gradient slot per forward argument: x, weight, bias, lora_a, lora_b, scale, dropout_p, seed,
    // slice_offsets (undefined where none is wanted).
    variable_list out(9);
    const Tensor& grad_y = grads[0];
    if (!grad_y.defined()) return out;  // y took no part in the loss: every gradient is zero
    Tensor grad_x;
    if (need_x) grad_x = at::mm(grad_y, weight);  // base dgrad GEMM; the LoRA part is added in place
    if (need_x || need_a || need_b) {
      auto [grad_a, grad_b] = call_backward(grad_y, x, h, lora_a, lora_b, scale, dropout_p, seed, offsets,
                                            need_x ? std::optional<Tensor>(grad_x) : std::nullopt);
      if (need_a) out[3] = grad_a;
      if (need_b) out[4] = grad_b;
    }
    if (need_x) out[0] = grad_x;
    if (need_w) out[1] = at::mm(grad_y.t(), x);
    if (need_bias) out[2] = grad_y.sum(0);
    return out;
  }
};

std::tuple<Tensor, Tensor> lora_linear_autograd(const Tensor& x, const Tensor& weight,
                                                const std::optional<Tensor>& bias, const Tensor& lora_a,
                                                const Tensor& lora_b, double scale, double dropout_p,
                                                const std::optional<Tensor>& seed, at::IntArrayRef slice_offsets) {
  variable_list outputs =
      LoraLinearFunction::apply(x, weight, bias, lora_a, lora_b, scale, dropout_p, seed, slice_offsets);
  return {outputs[0], outputs[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(loracuda, Autograd, m) { m.impl("lora_linear", &lora_linear_autograd); }

}  // namespace loracuda
