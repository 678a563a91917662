"""LoRALinear.impl: "kernels" runs loracuda.lora_linear, "reference" the plain-PyTorch formula; the two
agree within the tolerance rule, use_impl switches a whole model for a block and restores each layer's
choice afterwards (also on error), and an unknown impl is refused."""

import pytest
import torch
from torch import nn

import loracuda
from loracuda.layers import LoRALinear, use_impl

from conftest import FACTOR_GRADIENTS, assert_within_rule


def layer(impl="kernels", dtype=torch.float32):
    torch.manual_seed(0)
    out = LoRALinear(nn.Linear(24, 20, dtype=dtype), impl=impl)
    out.add_adapter("default", r=4, alpha=8, init="random", dtype=dtype)
    return out


def run(module, x):
    x = x.clone().requires_grad_(True)
    y = module(x)
    y.sum().backward()
    return y, x.grad, module.lora_A["default"].grad


def test_reference_and_kernels_agree_within_the_rule():
    x = torch.randn(7, 24)
    ours = run(layer("kernels"), x)
    plain = run(layer("reference"), x)
    ref64 = run(layer("reference", torch.float64), x.double())
    assert_within_rule("y", ours[0], plain[0], ref64[0])
    assert_within_rule("grad_x", ours[1], plain[1], ref64[1], FACTOR_GRADIENTS)
    assert_within_rule("grad_a", ours[2], plain[2], ref64[2], FACTOR_GRADIENTS)


def test_the_reference_does_not_call_the_kernel(monkeypatch):
    calls = []
    monkeypatch.setattr(loracuda.layers, "lora_linear", lambda *a, **k: calls.append(1))
    layer("reference")(torch.randn(3, 24))
    assert calls == []
    layer("kernels")(torch.randn(3, 24))
    assert calls == [1]


def test_use_impl_switches_every_layer_and_restores_on_error():
    model = nn.Sequential(layer("kernels"), nn.ReLU(), layer("reference"))
    with use_impl(model, "reference"):
        assert [m.impl for m in model if isinstance(m, LoRALinear)] == ["reference", "reference"]
    assert [m.impl for m in model if isinstance(m, LoRALinear)] == ["kernels", "reference"]
    with pytest.raises(RuntimeError, match="boom"):
        with use_impl(model, "kernels"):
            raise RuntimeError("boom")
    assert [m.impl for m in model if isinstance(m, LoRALinear)] == ["kernels", "reference"]


def test_an_unknown_impl_is_refused():
    with pytest.raises(ValueError, match="'impl' must be one of"):
        LoRALinear(nn.Linear(4, 4), impl="triton")
    with pytest.raises(ValueError, match="'impl'"):
        with use_impl(nn.Sequential(layer()), "fast"):
            pass
