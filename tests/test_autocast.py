"""LoRALinear under autocast with float32 adapter factors.

What autocast means for the layer (loracuda.functional.autocast_inputs): x, the base weight and bias
are cast to the autocast dtype exactly as F.linear's autocast rule casts them, the base GEMM runs in
that dtype, and the factors stay float32: the kernels read bfloat16 / float16 x with float32 factors
directly, so the adapter path adds no cast copy of x (PEFT casts x to the factors' dtype). Checked by
counting the copies of x-sized tensors (aten._to_copy, aten.copy_) with a TorchDispatchMode, against
the frozen nn.Linear alone; and the results against a float64 reference of that meaning under the
tolerance rule (DESIGN.md §7), plain PyTorch under autocast being the same computation in the same
dtype.
"""

import pytest
import torch
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import loracuda
from conftest import FACTOR_GRADIENTS, LORA_LINEAR_OPS, assert_within_rule, use_device

CASES = [
    pytest.param("cpu", torch.bfloat16, id="cpu-bf16"),
    pytest.param("cuda", torch.bfloat16, id="cuda-bf16", marks=pytest.mark.cuda),
    pytest.param("cuda", torch.float16, id="cuda-fp16", marks=pytest.mark.cuda),
]
COPY_OPS = (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default)
M, K, N, R, ALPHA = 37, 48, 40, 8, 16.0


class CountCopies(TorchDispatchMode):
    """Counts aten._to_copy / aten.copy_ calls whose result has ``shape``."""

    def __init__(self, shape):
        super().__init__()
        self.shape = tuple(shape)
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in COPY_OPS and isinstance(out, torch.Tensor) and tuple(out.shape) == self.shape:
            self.count += 1
        return out


def make_layer(device, base_dtype, dropout=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.nn.Linear(K, N).to(device=device, dtype=base_dtype)
    with torch.no_grad():
        base.weight.copy_(torch.randn(N, K, generator=g) / K**0.5)
        base.bias.copy_(torch.randn(N, generator=g) * 0.1)
    base.requires_grad_(False)
    layer = loracuda.LoRALinear(base)
    layer.add_adapter("default", R, ALPHA, dropout=dropout, dtype=torch.float32)
    with torch.no_grad():
        layer.lora_A["default"].copy_(torch.randn(R, K, generator=g) / K**0.5)
        layer.lora_B["default"].copy_(torch.randn(N, R, generator=g) * 0.3)
    return layer


def copies(fn, x, autocast_dtype, backward):
    mode = CountCopies(x.shape)
    with mode:
        with torch.autocast(x.device.type, dtype=autocast_dtype):
            y = fn(x)
        if backward:
            y.float().sum().backward(retain_graph=True)
    return mode.count


def peft_layer(layer):
    """PEFT's LoRA layer over the same base layer, with the same float32 factors."""
    from loracuda.benchmarking.providers import peft_linear

    return peft_linear(layer.weight, layer.lora_A["default"].detach(), layer.lora_B["default"].detach(),
                       layer.scaling["default"], layer.dropout_p["default"])


@pytest.mark.parametrize("device_name,dtype", CASES)
@pytest.mark.parametrize("base_in_low_precision", [False, True], ids=["fp32-base", "low-base"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
def test_adapter_path_makes_no_copy_of_x(device_name, dtype, base_in_low_precision, dropout, backward):
    device = use_device(device_name, *LORA_LINEAR_OPS)
    base_dtype = dtype if base_in_low_precision else torch.float32
    layer = make_layer(device, base_dtype, dropout).train()
    # A layer's input is an activation, not a leaf: autocast caches the casts of leaves that require
    # grad, which would hide repeated casts of x.
    leaf = torch.randn(M, K, device=device, dtype=base_dtype, requires_grad=True)
    x = leaf * 1.0
    ours = copies(layer, x, dtype, backward)
    base_only = copies(layer.base_layer, x, dtype, backward)
    # The frozen linear alone casts x (and its gradient) only when x is float32; the adapter adds nothing.
    assert base_only == (0 if base_in_low_precision else (2 if backward else 1))
    assert ours == base_only
    if device_name == "cpu" and not backward:
        # PEFT's layer, for contrast: its adapter path casts x to the float32 factors' dtype, and the
        # adapter's nn.Linear under autocast casts it back.
        assert copies(peft_layer(layer).train(), x, dtype, False) > ours


def test_outside_autocast_low_precision_x_is_read_directly(device):
    use_device(device.type, *LORA_LINEAR_OPS)
    layer = make_layer(device, torch.bfloat16).train()
    x = torch.randn(M, K, dtype=torch.bfloat16, device=device)
    mode = CountCopies(x.shape)
    with mode:
        y = layer(x)
    assert mode.count == 0 and y.dtype == torch.bfloat16


def _reference64(layer, x, dy, dtype):
    """float64 values and gradients of what autocast to ``dtype`` means: x, W, bias rounded to it (the
    base GEMM's inputs), the float32 factors as they are."""
    x64 = x.detach().to(dtype).double().requires_grad_(True)
    w64 = layer.weight.detach().to(dtype).double()
    b64 = layer.bias.detach().to(dtype).double()
    a64 = layer.lora_A["default"].detach().double().requires_grad_(True)
    bb64 = layer.lora_B["default"].detach().double().requires_grad_(True)
    y = x64 @ w64.t() + b64 + layer.scaling["default"] * (x64 @ a64.t()) @ bb64.t()
    (y * dy.double()).sum().backward()
    return y.detach(), x64.grad, a64.grad, bb64.grad


def _run(fn, layer, x, dy, dtype):
    layer.zero_grad(set_to_none=True)
    xg = x.detach().clone().requires_grad_(True)
    with torch.autocast(x.device.type, dtype=dtype):
        y = fn(xg)
    (y.float() * dy).sum().backward()
    return y.detach(), xg.grad, layer.lora_A["default"].grad, layer.lora_B["default"].grad


@pytest.mark.parametrize("device_name,dtype", CASES)
def test_values_and_gradients_within_the_rule(device_name, dtype):
    device = use_device(device_name, *LORA_LINEAR_OPS)
    layer = make_layer(device, torch.float32)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(M, K, generator=g).to(device)
    dy = torch.randn(M, N, generator=g).to(device)
    a, b, s = layer.lora_A["default"], layer.lora_B["default"], layer.scaling["default"]

    def plain(xg):  # plain PyTorch under autocast: PEFT's computation without its casts
        return F.linear(xg, layer.weight, layer.bias) + s * F.linear(F.linear(xg, a), b)

    got = _run(layer, layer, x, dy, dtype)
    ref = _run(plain, layer, x, dy, dtype)
    ref64 = _reference64(layer, x, dy, dtype)
    assert got[0].dtype == dtype and ref[0].dtype == dtype
    assert layer.lora_A["default"].dtype == torch.float32  # the factors were not cast
    assert_within_rule("y", got[0], ref[0], ref64[0])
    for what, gv, pv, rv in zip(("grad_x", "grad_a", "grad_b"), got[1:], ref[1:], ref64[1:]):
        assert_within_rule(what, gv, pv, rv, FACTOR_GRADIENTS)
