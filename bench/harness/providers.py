"""The providers side by side: each one's way of computing an op or the LoRA layer, prepared on
given tensors and returned as a ``Bench`` (a callable to time, and an optional untimed setup).

loracuda   the compiled ops (torch.ops.loracuda) and loracuda.lora_linear
peft       PEFT's LoRA layer (peft.tuners.lora.Linear), when peft is installed
reference  the plain-PyTorch definitions in loracuda/reference.py (autograd for the layer; a model's
           layers switch to it with loracuda.layers.use_impl(model, "reference"))
addmm      the recipe of fast training libraries: the base GEMM, then the adapter folded in with
           addmm_ (alpha = scale) in forward and backward; dropout, where asked for, materialises a
           mask as any eager code does
base       (layer only) the frozen nn.Linear alone, the cost the adapter is added to

Every provider gets its own copies of the tensors it mutates, so one provider's in-place updates
never feed another's. In-place ops are timed repeatedly on the same buffers; the adapters are small
(scale * B A of about 1e-2 per call), so the drift over a run stays far from overflow.
"""

import importlib.util
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from loracuda import ops, reference
from loracuda.functional import lora_linear


@dataclass
class Bench:
    """fn(): the timed call (fn(setup()) when setup is given). flops / bytes override the case's
    figures for a provider that computes less (the base layer has no adapter)."""

    fn: Callable[..., Any]
    setup: Optional[Callable[[], Any]] = None
    flops: Optional[float] = None
    bytes: Optional[float] = None


def peft_available() -> bool:
    return importlib.util.find_spec("peft") is not None


# ---- PEFT's LoRA layer ------------------------------------------------------------------------


class _Holder(torch.nn.Module):
    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.proj = linear


def peft_linear(weight: Tensor, lora_a: Tensor, lora_b: Tensor, scale: float, dropout_p: float) -> torch.nn.Module:
    """PEFT's LoRA Linear wrapping a frozen nn.Linear whose weight is ``weight`` (used as is, not
    copied), with its adapter set to copies of lora_a [r, K] and lora_b [N, r] and scaling ``scale``.
    Built through peft.get_peft_model, the way users reach it, so it works across peft versions.
    The adapter is kept in lora_a's / lora_b's dtype (PEFT would upcast a bf16 adapter to float32),
    the same as every other provider here gets."""
    from peft import LoraConfig, get_peft_model

    n, k = weight.shape
    r = lora_a.shape[0]
    linear = torch.nn.utils.skip_init(torch.nn.Linear, k, n, bias=False, device=weight.device, dtype=weight.dtype)
    linear.weight = torch.nn.Parameter(weight, requires_grad=False)
    config = LoraConfig(r=r, lora_alpha=r, lora_dropout=dropout_p, target_modules=["proj"], bias="none")
    model = get_peft_model(_Holder(linear), config)
    layer = model.base_model.model.proj
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(lora_a)
        layer.lora_B["default"].weight.copy_(lora_b)
    layer.lora_A["default"].to(lora_a.dtype)
    layer.lora_B["default"].to(lora_b.dtype)
    layer.scaling["default"] = float(scale)
    return layer


def _peft_for_adapter(k: Optional[int], lora_a: Optional[Tensor], lora_b: Optional[Tensor]) -> torch.nn.Module:
    """A PEFT layer whose adapter holds lora_a and / or lora_b, for timing PEFT's adapter modules
    alone; the sizes it cannot know are taken as 1 (its base weight is never used)."""
    ref = lora_a if lora_a is not None else lora_b
    r = ref.shape[0] if lora_a is not None else ref.shape[1]
    k = k if k is not None else (lora_a.shape[1] if lora_a is not None else 1)
    n = lora_b.shape[0] if lora_b is not None else 1
    a = lora_a if lora_a is not None else torch.zeros(r, k, dtype=ref.dtype, device=ref.device)
    b = lora_b if lora_b is not None else torch.zeros(n, r, dtype=ref.dtype, device=ref.device)
    weight = torch.zeros(n, k, dtype=ref.dtype, device=ref.device)
    return peft_linear(weight, a, b, 1.0, 0.0)


# ---- ops: shrink, expand-add, merge, backward -------------------------------------------------


def shrink_providers(x: Tensor, lora_a: Tensor, with_peft: bool) -> dict[str, Bench]:
    """h [M, r] = x [M, K] @ lora_a [r, K]^T (dropout 0: the op's cost without the mask)."""
    benches = {
        "loracuda": Bench(lambda: ops.shrink(x, lora_a)),
        "reference": Bench(lambda: reference.shrink(x, lora_a)),
        "addmm": Bench(lambda: torch.mm(x, lora_a.t())),
    }
    if with_peft:
        layer = _peft_for_adapter(x.shape[1], lora_a, None)
        down, dropout = layer.lora_A["default"], layer.lora_dropout["default"]
        # PEFT's forward: lora_A(dropout(x)) after casting x to the adapter's dtype.
        benches["peft"] = Bench(lambda: down(dropout(x.to(down.weight.dtype))))
    return benches


def expand_providers(y: Tensor, h: Tensor, lora_b: Tensor, scale: float, with_peft: bool) -> dict[str, Bench]:
    """y [M, N] += scale * h [M, r] @ lora_b [N, r]^T (h float32, as shrink leaves it)."""
    y_ops, y_addmm = y.clone(), y.clone()
    h_low = h.to(y.dtype)  # the recipe and PEFT keep h in the activations' dtype
    benches = {
        "loracuda": Bench(lambda: ops.expand_add_(y_ops, h, lora_b, scale)),
        "reference": Bench(lambda: reference.expand_add(y, h, lora_b, scale)),
        "addmm": Bench(lambda: y_addmm.addmm_(h_low, lora_b.t(), alpha=scale)),
    }
    if with_peft:
        layer = _peft_for_adapter(None, None, lora_b)
        up = layer.lora_B["default"]
        benches["peft"] = Bench(lambda: y + up(h_low) * scale)  # PEFT's forward: result + lora_B(.) * scaling
    return benches


def merge_providers(
    weight: Tensor, lora_a: Tensor, lora_b: Tensor, scale: float, with_peft: bool
) -> dict[str, Bench]:
    """weight [N, K] += scale * lora_b [N, r] @ lora_a [r, K], in place."""
    w_ops, w_addmm = weight.clone(), weight.clone()
    benches = {
        "loracuda": Bench(lambda: ops.merge_(w_ops, lora_a, lora_b, scale)),
        "reference": Bench(lambda: reference.merge(weight, lora_a, lora_b, scale)),
        "addmm": Bench(lambda: w_addmm.addmm_(lora_b, lora_a, alpha=scale)),
    }
    if with_peft:
        layer = peft_linear(weight.clone(), lora_a, lora_b, scale, 0.0)

        def peft_merge() -> None:
            layer.merge()
            # PEFT refuses to merge an adapter twice; forgetting that it did lets the same merge be
            # timed again (the weight keeps drifting by one small delta per call, as for the others).
            layer.merged_adapters.clear()

        benches["peft"] = Bench(peft_merge)
    return benches


def backward_providers(
    grad_y: Tensor, x: Tensor, h: Tensor, lora_a: Tensor, lora_b: Tensor, scale: float
) -> dict[str, Bench]:
    """The LoRA part of the backward: grad_a [r, K], grad_b [N, r], grad_x [M, K] += its LoRA term."""
    gx_ops, gx_addmm = torch.zeros_like(x), torch.zeros_like(x)
    h_low = h.to(x.dtype)

    def addmm_backward() -> tuple[Tensor, Tensor]:
        g = torch.mm(grad_y, lora_b).mul_(scale)  # [M, r]
        grad_b = torch.mm(grad_y.t(), h_low).mul_(scale)  # [N, r]
        grad_a = torch.mm(g.t(), x)  # [r, K]
        gx_addmm.addmm_(g, lora_a)
        return grad_a, grad_b

    return {
        "loracuda": Bench(lambda: ops.backward(grad_y, x, h, lora_a, lora_b, scale, grad_x=gx_ops)),
        "reference": Bench(lambda: reference.backward(grad_y, x, h, lora_a, lora_b, scale)),
        "addmm": Bench(addmm_backward),
    }


# ---- the layer: forward, backward, forward + backward ----------------------------------------


class _AddmmLoRA(torch.autograd.Function):
    """y = x W^T, then y.addmm_(dropout(x) A^T, B^T, alpha=s); backward with addmm_ likewise."""

    @staticmethod
    def forward(ctx, x, weight, lora_a, lora_b, scale, dropout_p):
        if dropout_p > 0.0:
            mask = torch.rand_like(x) >= dropout_p  # bool [M, K], kept for backward
            xd = x * mask * (1.0 / (1.0 - dropout_p))
        else:
            mask, xd = None, x
        h = torch.mm(xd, lora_a.t())
        y = torch.mm(x, weight.t())
        y.addmm_(h, lora_b.t(), alpha=scale)
        ctx.save_for_backward(xd, weight, lora_a, lora_b, h, mask)
        ctx.scale, ctx.dropout_p = scale, dropout_p
        return y

    @staticmethod
    def backward(ctx, grad_y):
        xd, weight, lora_a, lora_b, h, mask = ctx.saved_tensors
        s = ctx.scale
        g = torch.mm(grad_y, lora_b)  # [M, r], unscaled
        grad_b = torch.mm(grad_y.t(), h).mul_(s)
        grad_a = torch.mm(g.t(), xd).mul_(s)
        grad_x = torch.mm(grad_y, weight)
        if mask is None:
            grad_x.addmm_(g, lora_a, alpha=s)
        else:
            grad_x.add_(torch.mm(g, lora_a).mul_(mask), alpha=s / (1.0 - ctx.dropout_p))
        return grad_x, None, grad_a, grad_b, None, None


def layer_forwards(
    weight: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    scale: float,
    dropout_p: float,
    with_peft: bool,
    with_reference: bool = True,
) -> dict[str, tuple[Callable[[Tensor], Tensor], list[Tensor]]]:
    """provider -> (forward(x) -> y, its trainable tensors). weight [N, K] is frozen; each provider
    trains its own copies of lora_a [r, K] and lora_b [N, r]."""

    def params() -> tuple[Tensor, Tensor]:
        return lora_a.clone().requires_grad_(True), lora_b.clone().requires_grad_(True)

    forwards: dict[str, tuple[Callable[[Tensor], Tensor], list[Tensor]]] = {}
    forwards["base"] = (lambda x: F.linear(x, weight), [])

    a1, b1 = params()
    forwards["loracuda"] = (
        lambda x: lora_linear(x, weight, None, a1, b1, scale, dropout_p=dropout_p, training=True),
        [a1, b1],
    )
    if with_peft:
        layer = peft_linear(weight, lora_a, lora_b, scale, dropout_p)
        layer.train()
        forwards["peft"] = (layer, [layer.lora_A["default"].weight, layer.lora_B["default"].weight])
    if with_reference:
        a2, b2 = params()
        seed = torch.randint(0, 2**62, (1,), dtype=torch.int64, device=weight.device)
        forwards["reference"] = (
            lambda x: reference.lora_linear(x, weight, None, a2, b2, scale, dropout_p, seed),
            [a2, b2],
        )
    a3, b3 = params()
    forwards["addmm"] = (lambda x: _AddmmLoRA.apply(x, weight, a3, b3, scale, dropout_p), [a3, b3])
    return forwards


def layer_bench(
    forward: Callable[[Tensor], Tensor], trainable: list[Tensor], x: Tensor, grad_y: Tensor, mode: str
) -> Bench:
    """mode "forward": forward with autograd recording (as in training); "backward": backward alone
    after an untimed forward; "fwd+bwd": both. x requires grad (an inner layer's input does); the
    gradients are reset to None before each call, as optimizer.zero_grad() leaves them."""
    x = x.detach().clone().requires_grad_(True)

    def reset() -> None:
        x.grad = None
        for t in trainable:
            t.grad = None

    if mode == "forward":
        return Bench(lambda: forward(x))
    if mode == "backward":

        def setup() -> Tensor:
            reset()
            return forward(x)

        return Bench(lambda y: y.backward(grad_y), setup=setup)
    if mode == "fwd+bwd":

        def step() -> None:
            reset()
            forward(x).backward(grad_y)

        return Bench(step)
    raise ValueError(f"unknown layer mode {mode!r}")
