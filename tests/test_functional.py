"""loracuda.lora_linear, the differentiable layer call: forward with any leading dims, gradients of
every input against the reference's autograd, float64 gradcheck, torch.compile(fullgraph=True),
and what autograd keeps for backward."""

import pytest
import torch

import loracuda
from loracuda import reference

from conftest import (
    FACTOR_GRADIENTS,
    LORA_LINEAR_OPS,
    check_result,
    device_cases,
    to64,
    use_device,
)
from samples import F64, LORA_LINEAR_CASES, draw_values, lora_linear_sample, pick

# Leading dims of x for each M of the grid: x [*lead, K] flattens to [M, K].
LEAD = {0: (2, 0), 1: (), 3: (1, 3, 1), 127: (127,), 1000: (8, 125)}

FORWARD_CASES = pick(LORA_LINEAR_CASES, 24)
GRADIENT_CASES = pick([c for c in LORA_LINEAR_CASES if c.m != 1000], 16) + pick(
    [c for c in LORA_LINEAR_CASES if c.m == 1000 and c.dtype != F64], 2
)


def _inputs(case, device):
    s = lora_linear_sample(case, device)
    x, weight, bias, lora_a, lora_b, scale, p, seed, offsets = s.args
    x = x.reshape(*LEAD[case.m], case.k)
    return x, weight, bias, lora_a, lora_b, scale, p, seed, offsets


@pytest.mark.parametrize("device_name, case", device_cases(FORWARD_CASES))
def test_forward_matches_reference(device_name, case):
    device = use_device(device_name, *LORA_LINEAR_OPS)
    x, weight, bias, lora_a, lora_b, scale, p, seed, offsets = _inputs(case, device)
    y = loracuda.lora_linear(x, weight, bias, lora_a, lora_b, scale, p, training=True, seed=seed,
                             slice_offsets=offsets)
    assert y.dtype == case.dtype and tuple(y.shape) == (*LEAD[case.m], case.n)
    ref64 = reference.lora_linear(to64(x), to64(weight), to64(bias), to64(lora_a), to64(lora_b), scale, p, seed,
                                  offsets)
    plain = reference.lora_linear(x, weight, bias, lora_a, lora_b, scale, p, seed, offsets)
    check_result(f"lora_linear [{case}] y", case, y, plain, ref64)


def _grads(fn, leaves: dict, grad_y):
    # detach() keeps the storage and strides (padded / column-major layouts stay as sampled).
    leaves = {k: v.detach().requires_grad_(True) for k, v in leaves.items()}
    y = fn(**leaves)
    grads = torch.autograd.grad(y, list(leaves.values()), grad_y)
    return y, dict(zip(leaves, grads))


@pytest.mark.parametrize("device_name, case", device_cases(GRADIENT_CASES))
def test_gradients_match_reference(device_name, case):
    """Gradients of x, lora_a, lora_b, bias (and weight in every other case, though frozen by convention)."""
    device = use_device(device_name, *LORA_LINEAR_OPS)
    x, weight, bias, lora_a, lora_b, scale, p, seed, offsets = _inputs(case, device)
    train_weight = GRADIENT_CASES.index(case) % 2 == 1
    grad_y = draw_values(case, "grad_y", (case.m, case.n), case.dtype)
    grad_y = grad_y.to(device=device, dtype=case.dtype).reshape(*LEAD[case.m], case.n)

    def run(impl, cast):
        leaves = {"x": cast(x), "lora_a": cast(lora_a), "lora_b": cast(lora_b)}
        if bias is not None:
            leaves["bias"] = cast(bias)
        if train_weight:
            leaves["weight"] = cast(weight)

        def fn(**t):
            return impl(t["x"], t.get("weight", cast(weight)), t.get("bias"), t["lora_a"], t["lora_b"])

        return _grads(fn, leaves, cast(grad_y))

    def ours(*a):
        return loracuda.lora_linear(*a, scale, p, training=True, seed=seed, slice_offsets=offsets)

    def plain(*a):
        return reference.lora_linear(*a, scale, p, seed, offsets)

    _, got = run(ours, lambda t: t)
    _, plain_grads = run(plain, lambda t: t)
    _, ref_grads = run(plain, to64)
    for name, grad in got.items():
        assert grad.dtype == {"lora_a": lora_a, "lora_b": lora_b}.get(name, x).dtype, f"grad of {name}: {grad.dtype}"
        check_result(f"lora_linear [{case}] grad of {name}", case, grad, plain_grads[name], ref_grads[name],
                     FACTOR_GRADIENTS)


@pytest.mark.parametrize("dropout_p", (0.0, 0.3))
@pytest.mark.parametrize("offsets", ((), (0, 3, 4, 7)))
def test_gradcheck_float64(dropout_p, offsets):
    """Numerical vs analytical gradients of every input (weight included), float64 on the CPU."""
    use_device("cpu", *LORA_LINEAR_OPS)
    g = torch.Generator().manual_seed(5)
    r = 2
    slices = max(len(offsets) - 1, 1)
    shapes = {"x": (2, 3, 5), "weight": (7, 5), "bias": (7,), "lora_a": (slices * r, 5), "lora_b": (7, r)}
    t = {k: torch.randn(v, generator=g, dtype=F64, requires_grad=True) for k, v in shapes.items()}

    def fn(x, weight, bias, lora_a, lora_b):
        return loracuda.lora_linear(x, weight, bias, lora_a, lora_b, 1.3, dropout_p, training=True, seed=99,
                                    slice_offsets=offsets)

    assert torch.autograd.gradcheck(fn, (t["x"], t["weight"], t["bias"], t["lora_a"], t["lora_b"]))
    if dropout_p:  # the mask really applies: the gradient differs from the no-dropout one
        y = fn(t["x"], t["weight"], t["bias"], t["lora_a"], t["lora_b"])
        y0 = loracuda.lora_linear(t["x"], t["weight"], t["bias"], t["lora_a"], t["lora_b"], 1.3,
                                  slice_offsets=offsets)
        assert not torch.equal(y, y0)


def test_compile_fullgraph_matches_eager(device):
    """torch.compile(fullgraph=True) of forward + backward (dropout with a fixed seed, three slices,
    leading dims, bias) gives the eager results bit for bit: the compiled graph calls the same ops."""
    use_device(device.type, *LORA_LINEAR_OPS)
    g = torch.Generator().manual_seed(8)
    k, n, r, offsets = 19, 17, 4, (0, 5, 11, 17)
    inputs = {
        "x": torch.randn(2, 9, k, generator=g),
        "weight": torch.randn(n, k, generator=g) / k**0.5,
        "bias": torch.randn(n, generator=g),
        "lora_a": torch.randn(3 * r, k, generator=g) / k**0.5,
        "lora_b": torch.randn(n, r, generator=g) / r**0.5,
    }
    grad_y = torch.randn(2, 9, n, generator=g).to(device)

    def step(x, weight, bias, lora_a, lora_b):
        y = loracuda.lora_linear(x, weight, bias, lora_a, lora_b, 0.8, 0.1, training=True, seed=77,
                                 slice_offsets=offsets)
        return y

    def run(fn):
        leaves = {k: v.to(device).requires_grad_(k != "weight") for k, v in inputs.items()}
        y = fn(**leaves)
        y.backward(grad_y)
        return y.detach(), {k: v.grad for k, v in leaves.items() if v.requires_grad}

    torch._dynamo.reset()
    y_eager, grads_eager = run(step)
    y_compiled, grads_compiled = run(torch.compile(step, fullgraph=True))
    assert torch.equal(y_compiled, y_eager), "compiled forward differs from eager"
    for name in grads_eager:
        assert torch.equal(grads_compiled[name], grads_eager[name]), f"compiled grad of {name} differs from eager"


@pytest.mark.parametrize("dropout_p", (0.0, 0.2))
def test_saved_tensors_are_x_h_seed_and_parameters(device, dropout_p):
    """Autograd keeps x, h [M, R] float32, the seed (with dropout) and the parameters, nothing else:
    no [M, K] mask, no dropped copy of x, no [M, N] tensor."""
    use_device(device.type, *LORA_LINEAR_OPS)
    m, k, n, r = 12, 10, 9, 3
    x = torch.randn(3, 4, k, device=device, requires_grad=True)
    weight = torch.randn(n, k, device=device)
    bias = torch.randn(n, device=device, requires_grad=True)
    lora_a = torch.randn(r, k, device=device, requires_grad=True)
    lora_b = torch.randn(n, r, device=device, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = loracuda.lora_linear(x, weight, bias, lora_a, lora_b, 0.5, dropout_p, training=True, seed=4)
    known = {"x": x, "weight": weight, "lora_a": lora_a, "lora_b": lora_b}
    kinds = []
    for t in saved:
        name = next((nm for nm, ref in known.items() if t.data_ptr() == ref.data_ptr() and t.numel() == ref.numel()),
                    None)
        if name is None and tuple(t.shape) == (m, r) and t.dtype == torch.float32:
            name = "h"
        elif name is None and t.numel() == 1 and t.dtype == torch.int64:
            name = "seed"
        kinds.append(name or f"unexpected {t.dtype} {tuple(t.shape)}")
    expected = ["x", "weight", "lora_a", "lora_b", "h"] + (["seed"] if dropout_p else [])
    assert sorted(kinds) == sorted(expected), f"saved for backward: {kinds}"
    y.backward(torch.ones_like(y))  # the saved tensors suffice for backward
    assert x.grad is not None and lora_a.grad is not None and lora_b.grad is not None and bias.grad is not None
