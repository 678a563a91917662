"""Double backward through loracuda.lora_linear (create_graph=True): a gradient penalty gets the
gradients of the plain-PyTorch reference (loracuda/reference.py), checked in float64 against
torch.autograd on the reference and by gradgradcheck, with and without dropout and slices.

With grad mode on inside backward the op's autograd formula (csrc/lora_linear_autograd.cpp) computes
its gradients by differentiable ATen ops, with the dropout mask regenerated from the seed.
"""

import pytest
import torch

import loracuda
from loracuda import reference

F64 = torch.float64


def make(m=5, k=6, n=7, r=2, slices=1, dtype=F64, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g, dtype=dtype)
    w = torch.randn(n, k, generator=g, dtype=dtype)
    bb = torch.randn(n, generator=g, dtype=dtype) if bias else None
    a = torch.randn(slices * r, k, generator=g, dtype=dtype)
    b = torch.randn(n, r, generator=g, dtype=dtype)
    return x, w, bb, a, b


def leafs(*ts):
    return [None if t is None else t.detach().clone().requires_grad_(True) for t in ts]


def penalty_grads(fn, x, w, bias, a, b):
    """The issue's gradient penalty: gx = d sum(y) / dx with create_graph, then d sum(gx^2) / d(A, B, x, W)."""
    y = fn(x, w, bias, a, b)
    gx, = torch.autograd.grad(y.sum(), x, create_graph=True)
    return torch.autograd.grad((gx**2).sum(), (a, b, x, w), allow_unused=True)


@pytest.mark.parametrize(
    "p, offsets, slices", [(0.0, (), 1), (0.3, (), 1), (0.0, (0, 3, 7), 2), (0.25, (0, 2, 5, 7), 3)]
)
def test_gradient_penalty_matches_reference(p, offsets, slices):
    x, w, bias, a, b = make(slices=slices, seed=1)
    seed = 1234

    def ours(x, w, bias, a, b):
        return loracuda.lora_linear(x, w, bias, a, b, 0.7, dropout_p=p, training=True, seed=seed,
                                    slice_offsets=offsets)

    def ref(x, w, bias, a, b):
        return reference.lora_linear(x, w, bias, a, b, 0.7, p, seed, offsets)

    got = penalty_grads(ours, *leafs(x, w, bias, a, b))
    want = penalty_grads(ref, *leafs(x, w, bias, a, b))
    # gx = d sum(y) / dx does not depend on x (y is linear in x): both give None for x.
    assert got[2] is None and want[2] is None
    for name, g, e in zip(("lora_a", "lora_b", "weight"), got[:2] + got[3:], want[:2] + want[3:]):
        assert g is not None, f"d penalty / d {name} is None"
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10, msg=f"d penalty / d {name}")


def test_gradient_penalty_is_not_none_for_factors():
    # The repro: grad((gx**2).sum(), (A, B)) used to return None for both.
    x, w, _, a, b = leafs(*make(seed=2, bias=False))
    y = loracuda.lora_linear(x, w, None, a, b, 1.0)
    gx, = torch.autograd.grad(y.sum(), x, create_graph=True)
    ga, gb = torch.autograd.grad((gx**2).sum(), (a, b))
    assert ga is not None and gb is not None
    assert float(ga.abs().sum()) > 0 and float(gb.abs().sum()) > 0


@pytest.mark.parametrize("p, offsets, slices", [(0.0, (), 1), (0.4, (0, 3, 7), 2)])
def test_gradgradcheck(p, offsets, slices):
    x, w, bias, a, b = leafs(*make(m=3, k=4, n=7, r=2, slices=slices, seed=3))

    def fn(x, w, bias, a, b):
        return loracuda.lora_linear(x, w, bias, a, b, 0.9, dropout_p=p, training=True, seed=77, slice_offsets=offsets)

    assert torch.autograd.gradcheck(fn, (x, w, bias, a, b))
    assert torch.autograd.gradgradcheck(fn, (x, w, bias, a, b))


def test_float32_master_factors_with_float32_x():
    # Mixed float32 path: the second derivatives are computed, within float32 rounding of the reference.
    x, w, bias, a, b = make(dtype=torch.float32, seed=4)
    got = penalty_grads(lambda *t: loracuda.lora_linear(*t, 0.5), *leafs(x, w, bias, a, b))
    want = penalty_grads(lambda *t: reference.lora_linear(*t, 0.5), *leafs(*(to.double() for to in (x, w, bias, a, b))))
    for g, e in zip(got, want):
        assert (g is None) == (e is None)
        if g is not None:
            torch.testing.assert_close(g.double(), e, rtol=1e-4, atol=1e-4)


def test_first_order_path_unchanged_without_create_graph():
    # Without create_graph the fused kernel runs; its gradients agree with the differentiable path.
    x, w, bias, a, b = make(seed=5)
    t1 = leafs(x, w, bias, a, b)
    loracuda.lora_linear(*t1, 0.6).pow(2).sum().backward()
    t2 = leafs(x, w, bias, a, b)
    y = loracuda.lora_linear(*t2, 0.6)
    grads = torch.autograd.grad(y.pow(2).sum(), t2, create_graph=True)
    for u, g in zip(t1, grads):
        torch.testing.assert_close(u.grad, g.detach(), rtol=1e-12, atol=1e-12)
