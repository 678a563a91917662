"""The dropout mask: the counter-based hash of (seed, m * K + k) of csrc/dropout_hash.h.

The mask is read off the kernels exactly: with x = ones and lora_a = the identity [K, K], shrink's
h is mask * (float32-rounded 1 / (1 - p)); with lora_b = identity too and grad_y = ones, backward's
grad_x contribution is the same. Both must equal loracuda.reference.dropout_mask bit for bit, on
every device, for every dtype, whatever the strides of x.
"""

import math

import pytest
import torch

import loracuda
from loracuda import ops, reference

from conftest import LORA_LINEAR_OPS, use_device
from samples import BF16, F16, F32, bit_pattern


def keep_scale(p: float) -> float:
    """The float32-rounded 1 / (1 - p) that kernels and reference multiply kept elements by."""
    return float(torch.tensor(1.0 / (1.0 - p), dtype=torch.float32))


def mask_from_shrink(m: int, k: int, p: float, seed, device, dtype=F32, layout: str = "contiguous") -> torch.Tensor:
    """bool [m, k]: the mask shrink applies, read off h = shrink(ones, identity)."""
    x = torch.ones(m, k, device=device, dtype=dtype)
    if layout == "transposed":
        x = x.t().contiguous().t()
    elif layout == "padded":
        x = torch.ones(m + 1, k + 3, device=device, dtype=dtype)[1:, 2 : k + 2]
    h = ops.shrink(x, torch.eye(k, device=device, dtype=dtype), p, seed)
    mask = h != 0
    wrong = int((h[mask] != keep_scale(p)).sum())
    assert wrong == 0, f"{wrong} kept elements are not scaled by the float32 1 / (1 - p) = {keep_scale(p)!r}"
    return mask.cpu()


@pytest.mark.parametrize("dtype", (F32, BF16, F16))
@pytest.mark.parametrize("layout", ("contiguous", "transposed", "padded"))
def test_shrink_mask_is_the_reference_mask(device, dtype, layout):
    use_device(device.type, "shrink")
    seed = 0x1234_5678_9ABC
    mask = mask_from_shrink(301, 67, 0.3, seed, device, dtype, layout)
    expected = reference.dropout_mask(seed, 301, 67, 0.3)
    assert torch.equal(mask, expected), f"{int((mask != expected).sum())} of {mask.numel()} mask elements differ"


def test_backward_regenerates_the_forward_mask(device):
    """grad_x += mask * (g @ lora_a) / q with the same mask as shrink: g = ones, lora_a = identity."""
    use_device(device.type, "shrink", "backward")
    m, k, p, seed = 257, 67, 0.25, 987654321
    eye = torch.eye(k, device=device)
    x = torch.ones(m, k, device=device)
    h = ops.shrink(x, eye, p, seed)
    grad_x = torch.zeros(m, k, device=device)
    ops.backward(torch.ones(m, k, device=device), x, h, eye, eye, 1.0, p, seed, (), grad_x)
    mask_backward = (grad_x != 0).cpu()
    assert torch.equal(mask_backward, (h != 0).cpu()), "backward's mask differs from shrink's"
    assert torch.equal(mask_backward, reference.dropout_mask(seed, m, k, p))
    assert int((grad_x[grad_x != 0] != keep_scale(p)).sum()) == 0


@pytest.mark.parametrize("p", (0.05, 0.5, 0.9))
def test_kept_fraction_is_one_minus_p(device, p):
    """Over 2^20 elements the kept count lies within 5 binomial standard deviations of n * (1 - p')
    (p' = round(p * 2^24) / 2^24, the quantised p), and equals the reference mask exactly."""
    use_device(device.type, "shrink")
    m, k, seed = 16384, 64, 2024
    n = m * k
    mask = mask_from_shrink(m, k, p, seed, device)
    q = 1.0 - reference.dropout_threshold(p) / 2**24
    kept = int(mask.sum())
    sigma = math.sqrt(n * q * (1.0 - q))
    assert abs(kept - n * q) <= 5 * sigma, f"kept {kept} of {n}, expected {n * q:.0f} +- {5 * sigma:.0f}"
    assert torch.equal(mask, reference.dropout_mask(seed, m, k, p))


@pytest.mark.parametrize("seed_pair", ((1, 2), (1, 1 + 2**32), (-1, 2**63 - 1), (0, 2**32)))
def test_different_seeds_give_independent_masks(device, seed_pair):
    """Two seeds (differing in the low half, in the high half only, or at the int64 extremes): the
    masks agree where independent fair coins would, within 5 binomial standard deviations; and
    the same seed twice gives the same mask."""
    use_device(device.type, "shrink")
    m, k, p = 300, 64, 0.5
    first = mask_from_shrink(m, k, p, seed_pair[0], device)
    second = mask_from_shrink(m, k, p, seed_pair[1], device)
    n = m * k
    q = 1.0 - reference.dropout_threshold(p) / 2**24
    disagree_p = 2 * q * (1 - q)
    disagree = int((first != second).sum())
    sigma = math.sqrt(n * disagree_p * (1 - disagree_p))
    assert abs(disagree - n * disagree_p) <= 5 * sigma, f"masks of seeds {seed_pair} disagree in {disagree} of {n}"
    assert torch.equal(first, mask_from_shrink(m, k, p, seed_pair[0], device)), "same seed, different mask"
    assert torch.equal(second, reference.dropout_mask(seed_pair[1], m, k, p))


@pytest.mark.cuda
def test_mask_is_the_same_on_cpu_and_cuda():
    """The same seed draws the same mask on both devices, with the seed tensor on the CPU or on the GPU."""
    device = use_device("cuda", "shrink")
    m, k, p, seed = 513, 67, 0.2, 0xDEAD_BEEF_0042
    on_cpu = mask_from_shrink(m, k, p, seed, torch.device("cpu"))
    cpu_seed = torch.tensor([seed], dtype=torch.int64)
    assert torch.equal(on_cpu, mask_from_shrink(m, k, p, cpu_seed, device)), "CUDA with a CPU seed tensor"
    assert torch.equal(on_cpu, mask_from_shrink(m, k, p, cpu_seed.to(device), device)), "CUDA with a GPU seed tensor"


def _adapter_inputs(device, m=37, k=29, n=23, r=4, dtype=F32):
    g = torch.Generator().manual_seed(11)
    x = torch.randn(m, k, generator=g).to(device, dtype)
    a = (torch.randn(r, k, generator=g) / k**0.5).to(device, dtype)
    b = (torch.randn(n, r, generator=g) / r**0.5).to(device, dtype)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(device, dtype)
    dy = torch.randn(m, n, generator=g).to(device, dtype)
    return x, a, b, w, dy


@pytest.mark.parametrize("dtype", (F32, BF16))
def test_p_zero_is_the_no_dropout_path(device, dtype):
    """dropout_p = 0 with a seed gives the same bits as no seed at all, in shrink and backward."""
    use_device(device.type, "shrink", "backward")
    x, a, b, _, dy = _adapter_inputs(device, dtype=dtype)
    seed = torch.tensor([5], dtype=torch.int64)
    h = ops.shrink(x, a, 0.0, None)
    assert torch.equal(bit_pattern(ops.shrink(x, a, 0.0, seed)), bit_pattern(h))
    gx_1, gx_2 = torch.zeros_like(x), torch.zeros_like(x)
    ga_1, gb_1 = ops.backward(dy, x, h, a, b, 0.7, 0.0, None, (), gx_1)
    ga_2, gb_2 = ops.backward(dy, x, h, a, b, 0.7, 0.0, seed, (), gx_2)
    for name, one, two in (("grad_a", ga_1, ga_2), ("grad_b", gb_1, gb_2), ("grad_x", gx_1, gx_2)):
        assert torch.equal(bit_pattern(one), bit_pattern(two)), f"{name}: p = 0 with a seed differs"


def test_lora_linear_dropout_only_in_training(device):
    """training=False ignores dropout_p; training=True with p = 0 is the same path; with p > 0 the
    output changes and a fixed seed makes it repeatable."""
    use_device(device.type, *LORA_LINEAR_OPS)
    x, a, b, w, _ = _adapter_inputs(device)
    plain = loracuda.lora_linear(x, w, None, a, b, 2.0)
    assert torch.equal(loracuda.lora_linear(x, w, None, a, b, 2.0, dropout_p=0.4, training=False), plain)
    assert torch.equal(loracuda.lora_linear(x, w, None, a, b, 2.0, dropout_p=0.0, training=True, seed=3), plain)
    dropped_1 = loracuda.lora_linear(x, w, None, a, b, 2.0, dropout_p=0.4, training=True, seed=3)
    dropped_2 = loracuda.lora_linear(x, w, None, a, b, 2.0, dropout_p=0.4, training=True, seed=3)
    assert not torch.equal(dropped_1, plain)
    assert torch.equal(dropped_1, dropped_2)


def test_fresh_seeds_follow_torch_rng(device):
    """Without a seed, training draws one from torch's generator: a new mask per call, and the same
    mask again after resetting the generator (what activation checkpointing relies on)."""
    use_device(device.type, *LORA_LINEAR_OPS)
    x, a, b, w, _ = _adapter_inputs(device)
    torch.manual_seed(1234)
    first = loracuda.lora_linear(x, w, None, a, b, 2.0, dropout_p=0.4, training=True)
    second = loracuda.lora_linear(x, w, None, a, b, 2.0, dropout_p=0.4, training=True)
    torch.manual_seed(1234)
    again = loracuda.lora_linear(x, w, None, a, b, 2.0, dropout_p=0.4, training=True)
    assert not torch.equal(first, second), "two calls without a seed drew the same mask"
    assert torch.equal(first, again), "the same generator state drew a different mask"
