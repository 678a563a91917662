"""LoRALinear: a frozen linear layer (nn.Linear, or transformers Conv1D whose weight is stored [K, N])
plus named LoRA adapters, whose forward is one loracuda.lora_linear call.

Parameters of adapter ``name``: ``lora_A.<name>`` [r, K] and ``lora_B.<name>`` [N, r] (so in a model
``<layer path>.lora_A.<name>``); the wrapped layer stays reachable as ``base_layer``, so its weight is
``<layer path>.base_layer.weight`` as in PEFT. Several active adapters are summed: their factors are
stacked along the rank (B scaled by each adapter's scale), which is again one lora_linear call.

``LoRALinear.impl`` chooses what that call runs: "kernels" (loracuda.lora_linear, the default) or
"reference" (the plain-PyTorch formula of loracuda.reference, with autograd: a yardstick for timing and
checking, never faster). ``use_impl(model, impl)`` switches every LoRALinear of a model for a block.
"""

import contextlib
import math
from typing import Iterator, Literal, Optional

import torch
from torch import Tensor, nn

from .linear_kinds import linear_layout
from .functional import autocast_inputs, lora_linear

_FACTOR_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

Impl = Literal["kernels", "reference"]
IMPLS: tuple[str, ...] = ("kernels", "reference")


def _check_impl(impl: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"loracuda.LoRALinear: argument 'impl' must be one of {IMPLS}, got {impl!r}")
    return impl


def reference_lora_linear(x, weight, bias, lora_a, lora_b, scale, dropout_p=0.0, training=False, seed=None,
                          slice_offsets=()) -> Tensor:
    """loracuda.reference.lora_linear with loracuda.lora_linear's signature (leading dims, dropout only in
    training, a fresh seed per call): what a LoRALinear with impl="reference" computes."""
    from . import reference  # plain PyTorch; imported only when a layer is asked for it

    p = dropout_p if training else 0.0
    if p > 0.0 and seed is None:
        seed = int(torch.randint(0, 2**62, (1,)))
    return reference.lora_linear(x, weight, bias, lora_a, lora_b, scale, p, seed, slice_offsets)


class BaseLayerView:
    """The wrapped layer's ``weight`` and ``bias`` as the wrapper's own, for code that reads them off a
    linear layer (a wrapper holds the frozen layer as ``base_layer``)."""

    base_layer: nn.Module

    @property
    def weight(self) -> Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> Optional[Tensor]:
        return self.base_layer.bias


class LoRALinear(BaseLayerView, nn.Module):
    """base_layer: the wrapped nn.Linear or Conv1D (its parameters are not copied).

    Attributes: in_features K, out_features N, fan_in_fan_out (True for Conv1D), r / scaling / dropout_p
    per adapter (dicts), active_adapters (list of names), disabled (bool), merged (adapter name ->
    merge record, see loracuda.merge), impl ("kernels" or "reference": what forward runs; see the module
    docstring)."""

    def __init__(self, base_layer: nn.Module, impl: Impl = "kernels"):
        super().__init__()
        self.impl: str = _check_impl(impl)
        self.fan_in_fan_out, self.in_features, self.out_features = linear_layout(base_layer, "LoRALinear")
        self.base_layer = base_layer
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.r: dict[str, int] = {}
        self.alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.dropout_p: dict[str, float] = {}
        self.active_adapters: list[str] = []
        self.disabled = False
        self.merged: dict[str, object] = {}

    # ---- adapters -------------------------------------------------------------------------------

    @property
    def adapters(self) -> list[str]:
        return list(self.lora_A.keys())

    def add_adapter(
        self,
        name: str,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str = "default",
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        """Adds adapter ``name`` of rank r with scale alpha / r (alpha / sqrt(r) with rsLoRA).

        dtype: the factors' dtype; None means float32 for a low-precision base weight (the kernels read
        float32 factors directly, and training them in bf16 loses updates) and the weight's dtype otherwise.
        init "default": A Kaiming-uniform (a = sqrt(5), as nn.Linear), B zero, so the output is unchanged."""
        if name in self.lora_A:
            raise ValueError(f"loracuda.LoRALinear.add_adapter: adapter {name!r} already exists")
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(f"loracuda.LoRALinear.add_adapter: argument 'name' must be a non-empty string without '.', got {name!r}")
        weight = self.base_layer.weight
        if dtype is None:
            dtype = torch.float32 if weight.dtype in (torch.bfloat16, torch.float16) else weight.dtype
        if dtype not in _FACTOR_DTYPES:
            raise ValueError(f"loracuda.LoRALinear.add_adapter: argument 'dtype' must be a float dtype, got {dtype}")
        a = torch.empty(r, self.in_features, dtype=dtype, device=weight.device)
        b = torch.zeros(self.out_features, r, dtype=dtype, device=weight.device)
        if init == "default":
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        elif init == "gaussian":
            nn.init.normal_(a, std=1.0 / r)
        elif init == "random":
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            nn.init.normal_(b, std=1.0 / math.sqrt(r))
        else:
            raise ValueError(f"loracuda.LoRALinear.add_adapter: unknown init {init!r}")
        self.lora_A[name] = nn.Parameter(a)
        self.lora_B[name] = nn.Parameter(b)
        self.set_scale(name, r, alpha, use_rslora)
        self.dropout_p[name] = float(dropout)
        if not self.active_adapters:
            self.active_adapters = [name]

    def set_scale(self, name: str, r: int, alpha: float, use_rslora: bool = False) -> None:
        self.r[name] = int(r)
        self.alpha[name] = float(alpha)
        self.scaling[name] = float(alpha) / (math.sqrt(r) if use_rslora else r)

    def attach_adapter(self, name: str, lora_a: nn.Parameter, lora_b: nn.Parameter, scaling: float, dropout: float) -> None:
        """Adds adapter ``name`` holding the given Parameter objects (shared, not copied)."""
        if name in self.lora_A:
            raise ValueError(f"loracuda.LoRALinear.attach_adapter: adapter {name!r} already exists")
        self.lora_A[name] = lora_a
        self.lora_B[name] = lora_b
        self.r[name] = lora_a.shape[0]
        self.alpha[name] = float(scaling) * lora_a.shape[0]
        self.scaling[name] = float(scaling)
        self.dropout_p[name] = float(dropout)
        if not self.active_adapters:
            self.active_adapters = [name]

    def delete_adapter(self, name: str) -> None:
        if name in self.merged:
            raise RuntimeError(f"loracuda: adapter {name!r} is merged into the layer; unmerge before deleting it")
        del self.lora_A[name]
        del self.lora_B[name]
        for d in (self.r, self.alpha, self.scaling, self.dropout_p):
            d.pop(name, None)
        self.active_adapters = [a for a in self.active_adapters if a != name]

    # ---- forward --------------------------------------------------------------------------------

    def _unmerged_active(self) -> list[str]:
        return [a for a in self.active_adapters if a in self.lora_A and a not in self.merged]

    def forward(self, x: Tensor) -> Tensor:
        if self.disabled:
            if self.merged:
                raise RuntimeError(
                    "loracuda: adapters are disabled but merged into this layer's weight; unmerge them first"
                )
            return self.base_layer(x)
        # The common case (one active adapter, nothing merged) skips building the list: this runs once
        # per layer per step.
        names = self.active_adapters
        if len(names) != 1 or self.merged or names[0] not in self.lora_A:
            names = self._unmerged_active()
            if not names:
                return self.base_layer(x)
        weight = self.base_layer.weight
        weight = weight.t() if self.fan_in_fan_out else weight  # Conv1D stores [K, N]: a view, no copy
        # Under autocast x, weight and bias take the autocast dtype as in F.linear; the factors are kept
        # (float32 factors are read directly by the kernels: no cast copy of x for the adapter path).
        x, weight, bias = autocast_inputs(x, weight, self.base_layer.bias)
        if x.dtype != weight.dtype:
            x = x.to(weight.dtype)
        call = lora_linear if self.impl == "kernels" else reference_lora_linear
        p = self.dropout_p[names[0]]
        if len(names) == 1 or all(self.dropout_p[n] == p for n in names):
            a, b, scale = self._stacked(names, x.dtype)
            return call(x, weight, bias, a, b, scale, p, self.training)
        # Different dropout probabilities draw different masks: one call for the first adapter with the
        # base layer, then the others' contributions with a zero base (rare; correctness over speed).
        a, b, scale = self._stacked(names[:1], x.dtype)
        y = call(x, weight, bias, a, b, scale, p, self.training)
        zero = torch.zeros((), dtype=weight.dtype, device=weight.device).expand_as(weight)
        for n in names[1:]:
            a, b, scale = self._stacked([n], x.dtype)
            y = y + call(x, zero, None, a, b, scale, self.dropout_p[n], self.training)
        return y

    def _factor(self, t: Tensor, dtype: torch.dtype) -> Tensor:
        # The kernels take factors in the activations' dtype or float32; anything else is cast
        # (differentiably) to float32.
        return t if t.dtype in (dtype, torch.float32) else t.to(torch.float32)

    def _stacked(self, names: list[str], dtype: torch.dtype) -> tuple[Tensor, Tensor, float]:
        if len(names) == 1:
            n = names[0]
            return self._factor(self.lora_A[n], dtype), self._factor(self.lora_B[n], dtype), self.scaling[n]
        # Sum of adapters = one adapter of rank sum(r_i): A stacked along rows, B along columns with each
        # adapter's scale folded in (float32, or float64 for float64 activations, so that factors of
        # different dtypes can be stacked).
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        a = torch.cat([self.lora_A[n].to(acc) for n in names], dim=0)
        b = torch.cat([self.lora_B[n].to(acc) * self.scaling[n] for n in names], dim=1)
        return a, b, 1.0

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, fan_in_fan_out={self.fan_in_fan_out}, "
            f"adapters={ {n: self.r[n] for n in self.adapters} }, active={self.active_adapters}, merged={list(self.merged)}"
        )


@contextlib.contextmanager
def use_impl(model: nn.Module, impl: Impl) -> Iterator[nn.Module]:
    """Within the block, every LoRALinear in ``model`` (or ``model`` itself) runs ``impl`` ("kernels" or
    "reference"); each layer's previous choice is restored on exit, also on error."""
    _check_impl(impl)
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    previous = [m.impl for m in layers]
    for m in layers:
        m.impl = impl
    try:
        yield model
    finally:
        for m, old in zip(layers, previous):
            m.impl = old
