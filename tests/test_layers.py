"""LoRALinear: forward and gradients against the plain-PyTorch reference, Conv1D layout, several
active adapters, dropout, and bad arguments; on every device, except the float64 gradient and sum
checks (float64 runs on the CPU kernels only) and the naming checks."""

import pytest
import torch
from torch import nn

import loracuda
from loracuda import LoRALinear, reference


def make(kind, k=37, n=29, dtype=torch.float32, seed=0, device="cpu"):
    torch.manual_seed(seed)
    if kind == "conv1d":
        from transformers.pytorch_utils import Conv1D

        base = Conv1D(n, k)
        nn.init.normal_(base.weight, std=0.1)
        nn.init.normal_(base.bias, std=0.1)
    else:
        base = nn.Linear(k, n, bias=(kind == "linear"))
    base = base.to(device=device, dtype=dtype)
    for p in base.parameters():
        p.requires_grad_(False)
    return LoRALinear(base)


def weight_nk(layer):
    w = layer.base_layer.weight
    return w.t() if layer.fan_in_fan_out else w


def randomize(layer, name="default"):
    with torch.no_grad():
        layer.lora_A[name].normal_(0, 0.3)
        layer.lora_B[name].normal_(0, 0.3)


@pytest.mark.parametrize("kind", ["linear", "linear_nobias", "conv1d"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_matches_reference(kind, dtype, device):
    layer = make(kind, dtype=dtype, device=device)
    layer.add_adapter("default", r=5, alpha=10)
    randomize(layer)
    x = torch.randn(3, 4, layer.in_features, dtype=dtype, device=device)
    y = layer(x)
    assert y.shape == (3, 4, layer.out_features) and y.dtype == dtype
    w, b = weight_nk(layer), layer.base_layer.bias
    a, bb = layer.lora_A["default"], layer.lora_B["default"]
    args64 = [t.double() if t is not None else None for t in (x, w, b, a, bb)]
    ref = reference.lora_linear(*args64, 2.0)
    plain = reference.lora_linear(x, w, b, a.to(dtype), bb.to(dtype), 2.0)
    err = (y.double() - ref).abs().max().item()
    err_plain = (plain.double() - ref).abs().max().item()
    assert err <= 2 * err_plain or err < 1e-12, (err, err_plain)


def test_default_init_leaves_outputs_unchanged(device):
    for kind in ("linear", "conv1d"):
        layer = make(kind, device=device)
        x = torch.randn(7, layer.in_features, device=device)
        before = layer.base_layer(x)
        layer.add_adapter("default", r=4, alpha=8)
        assert layer.lora_A["default"].abs().sum() > 0 and layer.lora_B["default"].abs().sum() == 0
        torch.testing.assert_close(layer(x), before, rtol=0, atol=0)


def test_low_precision_base_gets_float32_factors(device):
    layer = make("linear", dtype=torch.bfloat16, device=device)
    layer.add_adapter("default", r=4, alpha=8)
    for factor in (layer.lora_A["default"], layer.lora_B["default"]):
        assert factor.dtype == torch.float32 and factor.device == layer.base_layer.weight.device


def test_gradients_reach_only_the_factors():
    # CPU only: float64, checked against autograd through the reference to float64 rounding (the CUDA
    # kernels take no float64; gradients on CUDA are checked in test_functional and test_autocast).
    layer = make("conv1d")
    layer.add_adapter("default", r=3, alpha=3)
    randomize(layer)
    x = torch.randn(5, layer.in_features, dtype=torch.float64, requires_grad=True)
    layer = layer.double()
    y = layer(x)
    (y * torch.linspace(-1, 1, y.numel(), dtype=torch.float64).reshape(y.shape)).sum().backward()
    a, b = layer.lora_A["default"], layer.lora_B["default"]
    assert layer.base_layer.weight.grad is None
    # Against autograd through the reference definition.
    a2, b2 = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    y2 = reference.lora_linear(x2, weight_nk(layer), layer.base_layer.bias, a2, b2, 1.0)
    (y2 * torch.linspace(-1, 1, y2.numel(), dtype=torch.float64).reshape(y2.shape)).sum().backward()
    torch.testing.assert_close(a.grad, a2.grad)
    torch.testing.assert_close(b.grad, b2.grad)
    torch.testing.assert_close(x.grad, x2.grad)


def test_two_active_adapters_are_summed():
    # CPU only: float64, so that the sum is checked to float64 rounding.
    layer = make("linear")
    layer.add_adapter("a", r=3, alpha=6)
    layer.add_adapter("b", r=2, alpha=1, use_rslora=True)
    randomize(layer, "a")
    randomize(layer, "b")
    x = torch.randn(6, layer.in_features, dtype=torch.float64)
    layer = layer.double()
    layer.active_adapters = ["a"]
    ya = layer(x)
    layer.active_adapters = ["b"]
    yb = layer(x)
    layer.active_adapters = ["a", "b"]
    yab = layer(x)
    base = layer.base_layer(x)
    torch.testing.assert_close(yab - base, (ya - base) + (yb - base))
    assert layer.scaling["b"] == 1 / 2**0.5
    layer.disabled = True
    torch.testing.assert_close(layer(x), base, rtol=0, atol=0)


def test_two_adapters_with_different_dropout_in_eval_mode(device):
    layer = make("linear", device=device)
    layer.add_adapter("a", r=3, alpha=6, dropout=0.1)
    layer.add_adapter("b", r=2, alpha=4, dropout=0.3)
    randomize(layer, "a")
    randomize(layer, "b")
    layer.eval()
    x = torch.randn(4, layer.in_features, device=device)
    layer.active_adapters = ["a", "b"]
    y = layer(x)
    w = layer.base_layer.weight
    ref = reference.lora_linear(x, w, layer.base_layer.bias, layer.lora_A["a"], layer.lora_B["a"], 2.0)
    ref = ref + reference.lora_linear(x, torch.zeros_like(w), None, layer.lora_A["b"], layer.lora_B["b"], 2.0)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


def test_dropout_applies_in_training_only(device):
    layer = make("linear", device=device)
    layer.add_adapter("default", r=4, alpha=4, dropout=0.5)
    randomize(layer)
    x = torch.randn(16, layer.in_features, device=device)
    layer.eval()
    y_eval = layer(x)
    torch.testing.assert_close(layer(x), y_eval, rtol=0, atol=0)
    layer.train()
    torch.manual_seed(5)
    y1 = layer(x)
    torch.manual_seed(5)
    y2 = layer(x)
    torch.manual_seed(6)
    y3 = layer(x)
    assert torch.equal(y1, y2) and not torch.equal(y1, y3) and not torch.equal(y1, y_eval)


def test_bad_arguments(device):
    with pytest.raises(TypeError, match="base_layer"):
        LoRALinear(nn.Conv2d(3, 3, 1))
    layer = make("linear", device=device)
    layer.add_adapter("default", r=2, alpha=2)
    with pytest.raises(ValueError, match="already exists"):
        layer.add_adapter("default", r=2, alpha=2)
    with pytest.raises(ValueError, match="'name'"):
        layer.add_adapter("a.b", r=2, alpha=2)
    with pytest.raises(ValueError, match="'weight'.*K = 38"):
        layer(torch.randn(3, layer.in_features + 1, device=device))


def test_parameter_names_follow_the_adapter_name():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    loracuda.inject(model, loracuda.LoraConfig(r=2, target_modules=["0", "2"]), adapter="task")
    names = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert names == ["0.lora_A.task", "0.lora_B.task", "2.lora_A.task", "2.lora_B.task"]
    assert "0.base_layer.weight" in dict(model.named_parameters())
