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
// Double backward (create_graph=True, e.g. a gradient penalty): with grad mode on inside backward the
// gradients are computed by differentiable ATen ops instead of the fused kernel -- the formulas below,
// linear in each factor, with h recomputed from x and the dropout mask regenerated from the seed
// (dropout_keep_scale) -- so autograd records them and every second derivative (x, weight, bias,
// lora_a, lora_b, grad_y) is exact. That path builds [M, K] temporaries (the mask: a few int64 tensors
// of M * K elements) and is meant for double backward, not for speed.
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

#include "dropout_hash.h"

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

// ---- the differentiable backward (create_graph) ----------------------------------------------------

// (v * c) mod 2^32 for int64 tensors holding values in [0, 2^32): split so that no product overflows.
Tensor mul32(const Tensor& v, int64_t c) {
  const Tensor low = v * (c & 0xFFFF);
  const Tensor high = at::bitwise_left_shift(at::bitwise_and(v * (c >> 16), 0xFFFF), 16);
  return at::bitwise_and(low + high, 0xFFFFFFFFLL);
}

// mix32 of csrc/dropout_hash.h on int64 tensors holding uint32 values.
Tensor mix32(Tensor v) {
  v = at::bitwise_xor(v, at::bitwise_right_shift(v, 16));
  v = mul32(v, 0x7FEB352D);
  v = at::bitwise_xor(v, at::bitwise_right_shift(v, 15));
  v = mul32(v, 0x846CA68B);
  return at::bitwise_xor(v, at::bitwise_right_shift(v, 16));
}

// mask / (1 - p) as a [M, K] tensor of `dtype` on `device`: the kernels' keep rule (dropout_keep of
// csrc/dropout_hash.h for element m * K + k) and their float32-rounded keep scale, from the seed
// tensor wherever it lives (ATen integer ops: no host synchronisation for a device seed).
Tensor dropout_keep_scale(const Tensor& seed, int64_t m, int64_t k, double p, at::ScalarType dtype,
                          const at::Device& device) {
  constexpr int64_t kMask32 = 0xFFFFFFFFLL;
  const Tensor s = seed.reshape({1}).to(device, at::kLong);
  const Tensor key_lo = mix32(at::bitwise_xor(at::bitwise_and(s, kMask32), 0x243F6A88LL));
  const Tensor key_hi =
      mix32(at::bitwise_xor(at::bitwise_and(at::bitwise_right_shift(s, 32), kMask32), 0x85A308D3LL));
  const Tensor index = at::arange(m * k, at::TensorOptions().dtype(at::kLong).device(device));
  const Tensor first = mix32(at::bitwise_and(index + key_lo, kMask32));
  const Tensor bits = mix32(at::bitwise_xor(first, at::bitwise_and(at::bitwise_right_shift(index, 32) + key_hi, kMask32)));
  const int64_t threshold = static_cast<int64_t>(dropout_threshold(p));
  const Tensor keep = at::ge(at::bitwise_right_shift(bits, 8), threshold).reshape({m, k});
  const double keep_scale = static_cast<float>(1.0 / (1.0 - p));
  return keep.to(dtype) * keep_scale;
}

// Every gradient of lora_linear by differentiable ATen ops, in the accumulation dtype (float64 for
// float64 x, else float32), each cast to its argument's dtype. Slice i of S: h_i = h[:, i*r:(i+1)*r],
// columns [off[i], off[i+1]) of y.
//   xd = mask * x / q        h = xd @ A^T        g_i = scale * grad_y_i @ B_i        g = [g_0 .. g_S-1]
//   grad_x = grad_y @ W + mask * (g @ A) / q     grad_A = g^T @ xd     grad_B_i = scale * grad_y_i^T @ h_i
//   grad_W = grad_y^T @ x                         grad_bias = sum of grad_y over rows
variable_list differentiable_backward(const Tensor& grad_y, const Tensor& x, const Tensor& weight,
                                      const Tensor& lora_a, const Tensor& lora_b, double scale, double dropout_p,
                                      const std::optional<Tensor>& seed, const std::vector<int64_t>& offsets,
                                      bool need_x, bool need_w, bool need_bias, bool need_a, bool need_b) {
  variable_list out(9);
  const at::ScalarType acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t m = x.size(0), k = x.size(1), n = grad_y.size(1), r = lora_b.size(1);
  const Tensor gy = grad_y.to(acc), a = lora_a.to(acc), b = lora_b.to(acc);
  Tensor keep;  // mask / q, or undefined without dropout
  if (dropout_p > 0.0) keep = dropout_keep_scale(*seed, m, k, dropout_p, acc, x.device());
  const Tensor xd = keep.defined() ? x.to(acc) * keep : x.to(acc);
  const std::vector<int64_t> off = offsets.empty() ? std::vector<int64_t>{0, n} : offsets;
  std::vector<Tensor> g_parts, gb_parts;
  const Tensor h = need_b ? at::mm(xd, a.t()) : Tensor();
  for (size_t i = 0; i + 1 < off.size(); ++i) {
    const Tensor gy_i = gy.narrow(1, off[i], off[i + 1] - off[i]);
    if (need_x || need_a) g_parts.push_back(at::mm(gy_i, b.narrow(0, off[i], off[i + 1] - off[i])));
    if (need_b) gb_parts.push_back(at::mm(gy_i.t(), h.narrow(1, static_cast<int64_t>(i) * r, r)));
  }
  if (need_x || need_a) {
    const Tensor g = at::cat(g_parts, 1) * scale;  // [M, R]
    if (need_a) out[3] = at::mm(g.t(), xd).to(lora_a.scalar_type());
    if (need_x) {
      Tensor lora_part = at::mm(g, a);
      if (keep.defined()) lora_part = lora_part * keep;
      out[0] = at::mm(grad_y, weight) + lora_part.to(x.scalar_type());
    }
  }
  if (need_b) out[4] = (at::cat(gb_parts, 0) * scale).to(lora_b.scalar_type());
  if (need_w) out[1] = at::mm(grad_y.t(), x);
  if (need_bias) out[2] = grad_y.sum(0);
  return out;
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
    if (at::GradMode::is_enabled()) {   // create_graph: a backward that autograd can differentiate
      return differentiable_backward(grad_y, x, weight, lora_a, lora_b, scale, dropout_p, seed, offsets, need_x,
                                     need_w, need_bias, need_a, need_b);
    }
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
