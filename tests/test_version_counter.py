"""The loracuda ops that write into an argument bump its version counter, as PyTorch's in-place ops do,
so autograd refuses a backward through a tensor that loracuda overwrote after it was saved."""

import pytest
import torch

from loracuda import ops

from conftest import use_device


def _adapter(k, n, r, device, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(r, k, generator=g, dtype=dtype).to(device)
    b = torch.randn(n, r, generator=g, dtype=dtype).to(device)
    return a, b


@pytest.mark.parametrize("name", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_every_writing_op_bumps_the_version_of_what_it_wrote(name):
    device = use_device(name, "expand_add_", "merge_", "merge_exact_", "unmerge_exact_", "backward")
    m, k, n, r = 5, 7, 6, 2
    a, b = _adapter(k, n, r, device)
    x = torch.randn(m, k, device=device)

    y = torch.zeros(m, n, device=device)
    before = y._version
    ops.expand_add_(y, ops.shrink(x, a), b, 0.5)
    assert y._version > before, "expand_add_ left y's version unchanged"

    w = torch.randn(n, k, device=device)
    for step in ("merge_", "merge_exact_", "unmerge_exact_"):
        before = w._version
        if step == "merge_":
            ops.merge_(w, a, b, 0.5)
        elif step == "merge_exact_":
            codes, escapes = ops.merge_exact_(w, a, b, 0.5)
        else:
            ops.unmerge_exact_(w, a, b, 0.5, codes, escape_values=escapes)
        assert w._version > before, f"{step} left weight's version unchanged"

    grad_y = torch.randn(m, n, device=device)
    grad_x = torch.zeros(m, k, device=device)
    h = ops.shrink(x, a)
    before_x, before_gx = x._version, grad_x._version
    ops.backward(grad_y, x, h, a, b, 0.5, grad_x=grad_x)
    assert grad_x._version > before_gx, "backward left grad_x's version unchanged"
    assert x._version == before_x, "backward bumped the version of x, which it only reads"
    ops.backward(grad_y, x, h, a, b, 0.5)  # no grad_x: nothing to bump, and no error


def test_autograd_refuses_a_saved_tensor_that_expand_add_overwrote():
    x = torch.randn(4, 3, requires_grad=True)
    y = torch.zeros(4, 6)
    out = (x.sum(1, keepdim=True) * y).sum()  # saves y for the gradient of x
    a, b = _adapter(5, 6, 2, "cpu")
    ops.expand_add_(y, ops.shrink(torch.randn(4, 5), a), b, 1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.backward()


def test_a_rejected_call_does_not_bump_the_version():
    y = torch.zeros(4, 6)
    a, b = _adapter(5, 6, 2, "cpu")
    before = y._version
    with pytest.raises(ValueError, match="argument 'h'"):
        ops.expand_add_(y, torch.zeros(3, 2), b, 1.0)
    assert y._version == before
