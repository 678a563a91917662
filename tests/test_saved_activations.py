"""Activation memory of one LoRA linear layer in training: the bytes autograd saves for backward,
counted with torch.autograd.graph.saved_tensors_hooks, leaving out the parameters and the layer's own
input x (the caller keeps x alive anyway).

loracuda saves h [M, r] (float32) and, with dropout, the seed (one int64): the mask is regenerated from
the seed in backward, so neither the mask nor a dropped copy of x is kept. PEFT's layer, measured the
same way at dropout 0.1, keeps its dropped copy of x (M * K * 4 bytes) for the adapter's first GEMM.
On every device.
"""

import pytest
import torch

import loracuda
from loracuda.benchmarking.providers import peft_linear

M, K, N, R = 2048, 2048, 2048, 16
SCALARS = 64  # bytes allowed beyond h: a few one-element tensors (the seed is 8)


def saved_bytes(layer: torch.nn.Module, x: torch.Tensor) -> tuple[int, list]:
    """Bytes of the distinct storages autograd saves during layer(x), not counting the storages of
    layer's parameters and of x; and the (shape, dtype) of each one counted."""
    excluded = {p.untyped_storage().data_ptr() for p in layer.parameters()} | {x.untyped_storage().data_ptr()}
    seen, kept = set(), []

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in excluded and ptr not in seen:
            seen.add(ptr)
            kept.append((tuple(t.shape), t.dtype, t.untyped_storage().nbytes()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    return sum(n for _, _, n in kept), kept


def make(dropout: float, device):
    g = torch.Generator().manual_seed(0)
    base = torch.nn.Linear(K, N, bias=False, device=device)
    with torch.no_grad():
        base.weight.copy_(torch.randn(N, K, generator=g) / K**0.5)
    base.requires_grad_(False)
    layer = loracuda.LoRALinear(base)
    layer.add_adapter("default", R, 2.0 * R, dropout=dropout)
    with torch.no_grad():
        layer.lora_B["default"].copy_(torch.randn(N, R, generator=g) * 0.01)
    x = torch.randn(M, K, generator=g).to(device).requires_grad_(True)
    return layer.train(), x


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_loracuda_saves_only_h_and_the_seed(dropout, device):
    layer, x = make(dropout, device)
    total, kept = saved_bytes(layer, x)
    assert total <= M * R * 4 + SCALARS, kept
    assert ((M, R), torch.float32, M * R * 4) in kept  # h itself is what backward needs
    assert not any(shape == (M, K) for shape, _, _ in kept)  # no mask, no dropped x


def test_peft_keeps_a_dropped_copy_of_x(device):
    layer, x = make(0.1, device)
    theirs = peft_linear(layer.weight, layer.lora_A["default"].detach(), layer.lora_B["default"].detach(),
                         layer.scaling["default"], 0.1).train()
    total, kept = saved_bytes(theirs, x)
    dropped = [n for shape, dtype, n in kept if shape == (M, K) and dtype == torch.float32]
    # ~16.8 MB each: dropout(x), the input of lora_A; on the CPU also the dropout's scaled float32 mask,
    # which the multiplication by x saves (CUDA's fused dropout saves a bool mask instead).
    assert dropped and all(n == M * K * 4 for n in dropped), kept
    ours, _ = saved_bytes(layer, x)
    assert total - ours >= M * K * 4
