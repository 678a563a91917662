"""lora_linear: the LoRA linear layer as one differentiable call.

Forward is the op torch.ops.loracuda.lora_linear (base GEMM + shrink + expand-add in place); its
autograd formula is the op's own Autograd kernel (csrc/lora_linear_autograd.cpp). Saved for
backward: x, h [M, R] (float32) and the dropout seed, besides the parameters; no dropout mask and no
dropped copy of x. Backward: grad_x = grad_y @ weight by the base dgrad GEMM, then one
loracuda.backward call adds the LoRA part into it in place and returns the adapter gradients. Under
autocast the base inputs take the autocast dtype as in F.linear while the factors keep theirs
(autocast_inputs).
"""

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from . import ops

_SEED_HIGH = 2**62


def new_seed(device: torch.device) -> Tensor:
    """A fresh dropout seed drawn from torch's generator on ``device`` (no host synchronisation, so it
    traces under torch.compile; torch.utils.checkpoint replays it with the RNG state)."""
    return torch.randint(0, _SEED_HIGH, (1,), dtype=torch.int64, device=device)


def _autocast_enabled(device_type: str) -> bool:
    # Meta tensors (shape-only calls) have no autocast state; torch raises when asked about them.
    return device_type != "meta" and torch.is_autocast_enabled(device_type)


def autocast_inputs(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """(x, weight, bias) as F.linear sees them under autocast on x's device type: each floating tensor
    other than float64 cast to the autocast dtype (the rule autocast applies to linear), unchanged when
    autocast is off. The LoRA factors are not among them on purpose: the kernels read float32 factors
    with bfloat16 / float16 x directly, so the adapter path makes no cast copy of x (PEFT casts x to
    the factors' dtype, an extra [M, K] tensor per layer)."""
    device_type = x.device.type
    if not _autocast_enabled(device_type):
        return x, weight, bias
    dtype = torch.get_autocast_dtype(device_type)

    def cast(t: Optional[Tensor]) -> Optional[Tensor]:
        if t is None or t.dtype == dtype or t.dtype == torch.float64 or not t.is_floating_point():
            return t
        return t.to(dtype)

    return cast(x), cast(weight), cast(bias)


def lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_a: Tensor,
    lora_b: Tensor,
    scale: float,
    dropout_p: float = 0.0,
    training: bool = False,
    seed: Union[None, int, Tensor] = None,
    slice_offsets: Sequence[int] = (),
) -> Tensor:
    """y = x @ weight^T + bias + scale * (dropout(x) @ lora_a^T) @ lora_b^T.

    x [..., K] in float32 / bfloat16 / float16 (float64 on the CPU); weight [N, K] in x's dtype, frozen
    by convention (its gradient is computed only if it requires one); bias [N] or None; lora_a [R, K]
    and lora_b [N, r] in x's dtype or float32, with R = S * r for S slices (``slice_offsets``, S + 1
    output column offsets; empty for one). Dropout applies to the adapter's input only, when
    ``training`` and ``dropout_p > 0``; ``seed`` (int or int64 tensor) fixes the mask, else a fresh
    seed is drawn. Returns y [..., N] in x's dtype.

    Double backward (``torch.autograd.grad(..., create_graph=True)``, e.g. a gradient penalty) is
    supported: with grad mode on inside backward the gradients are computed by differentiable ATen ops
    (dropout mask regenerated from the seed), so second derivatives with respect to x, weight, bias,
    lora_a and lora_b are those of the plain-PyTorch layer. That path costs [M, K] temporaries.

    Under autocast (on x's device type) x, weight and bias are cast as F.linear's autocast rule casts
    them (see :func:`autocast_inputs`), the factors are kept, y comes out in the autocast dtype, and the
    op runs with autocast off so that the GEMMs inside it are not cast again (the op is opaque to
    autocast: it has no Autocast kernel, and the factors must stay float32).
    """
    if not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"loracuda.lora_linear: argument 'dropout_p' must be in [0, 1), got {dropout_p}")
    p = float(dropout_p) if training else 0.0
    if x.dim() < 1:
        raise ValueError("loracuda.lora_linear: argument 'x' must have at least one dimension [..., K]")
    seed_t = None
    if p > 0.0:
        # An int seed becomes a CPU tensor, which the kernels read on the host: a copy to the device
        # would be a blocking host-to-device copy (a host synchronisation).
        seed_t = new_seed(x.device) if seed is None else ops.seed_tensor(seed, op="lora_linear")
    device_type = x.device.type
    if _autocast_enabled(device_type):
        x, weight, bias = autocast_inputs(x, weight, bias)
        with torch.autocast(device_type, enabled=False):
            return _call(x, weight, bias, lora_a, lora_b, scale, p, seed_t, slice_offsets)
    return _call(x, weight, bias, lora_a, lora_b, scale, p, seed_t, slice_offsets)


def _call(x, weight, bias, lora_a, lora_b, scale, p, seed_t, slice_offsets) -> Tensor:
    # The op takes x [M, K]: leading dimensions are flattened (a view for contiguous x) and restored.
    k = x.shape[-1]
    x2 = x if x.dim() == 2 else x.reshape(-1, k)
    y, _ = torch.ops.loracuda.lora_linear(x2, weight, bias, lora_a, lora_b, float(scale), p, seed_t, list(slice_offsets))
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], y.shape[-1])


def grouped_lora_linear(
    x: Tensor,
    weight: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    group_ids: Tensor,
    scale: float,
    dropout_p: float = 0.0,
    training: bool = True,
    seed: Union[None, int, Tensor] = None,
) -> Tensor:
    """A mixture-of-experts linear layer with LoRA on every expert, over the routed rows:
    y[m] = weight[g_m] @ x[m] + scale * lora_b[g_m] @ lora_a[g_m] @ dropout(x[m]), 0 where g_m = -1.

    x [M, K] (the routed rows) in float32 / bfloat16 / float16 (float64 on the CPU); weight [G, N, K] in
    x's dtype (transformers' fused experts: gate_up_proj [E, 2I, H], down_proj [E, H, I]), its gradient
    computed only if it requires one; lora_a [G, r, K] and lora_b [G, N, r] in x's dtype or float32, any
    strided views (PEFT's target_parameters factors: see loracuda.ops.grouped_factor_views); group_ids
    int64 [M] in [-1, G), rows in any order. Dropout (``training`` and ``dropout_p > 0``) applies to the
    adapter's input only; ``seed`` fixes its mask, else a fresh seed is drawn as in :func:`lora_linear`.
    Returns y [M, N] in x's dtype; differentiable in x, weight, lora_a and lora_b. Under autocast x and
    weight take the autocast dtype, the factors keep theirs (as in :func:`lora_linear`).
    """
    if not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"loracuda.grouped_lora_linear: argument 'dropout_p' must be in [0, 1), got {dropout_p}")
    p = float(dropout_p) if training else 0.0
    seed_t = None
    if p > 0.0:
        # As in lora_linear: an int seed stays a CPU tensor (no host-to-device copy, no synchronisation).
        seed_t = new_seed(x.device) if seed is None else ops.seed_tensor(seed)
    device_type = x.device.type
    if _autocast_enabled(device_type):
        x, weight, _ = autocast_inputs(x, weight, None)
        with torch.autocast(device_type, enabled=False):
            y, _ = torch.ops.loracuda.grouped_lora_linear(x, weight, lora_a, lora_b, group_ids, float(scale), p, seed_t)
            return y
    y, _ = torch.ops.loracuda.grouped_lora_linear(x, weight, lora_a, lora_b, group_ids, float(scale), p, seed_t)
    return y
