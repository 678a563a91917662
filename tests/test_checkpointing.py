"""torch.utils.checkpoint around loracuda-patched blocks (use_reentrant False and True): the same
gradients as without it, and the recomputed forward draws the same dropout seed, hence the same mask.

The seed is drawn by torch.randint from torch's generator (loracuda.functional.new_seed);
checkpoint (preserve_rng_state=True, its default) restores the generator's state before recomputing,
so the recomputation draws the same seed. Every call of the loracuda.lora_linear op is recorded with a
TorchDispatchMode (it sees the op below autograd, in forward and in the recomputation during
backward), with its seed and its h output (h = dropout(x) @ A^T depends on the mask): the recomputed
calls must repeat the original ones bit for bit. On every device (on CUDA the model's attention is
transformers' eager one, whose backward is deterministic, so that bit equality tests loracuda alone).
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import loracuda
from loracuda import LoraConfig
from tiny_models import ids, llama, randomize_adapters


class RecordLoraCalls(TorchDispatchMode):
    """Records (seed value or None, a copy of h) of every loracuda.lora_linear call."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.loracuda.lora_linear.default:
            seed = args[7]
            self.calls.append((None if seed is None else int(seed.item()), out[1].clone()))
        return out


def model_for(dropout: float, checkpointing, input_grads: bool, device) -> torch.nn.Module:
    model = llama(seed=0, layers=3, device=device, attention="eager" if device.type == "cuda" else None)
    loracuda.inject(model, LoraConfig(r=4, alpha=8, dropout=dropout, target_modules="all-linear"))
    randomize_adapters(model, scale_b=0.05)
    if checkpointing is not None:
        # transformers wraps each decoder layer's call in torch.utils.checkpoint.checkpoint(**kwargs).
        kwargs = {"use_reentrant": checkpointing}
        if hasattr(model, "activation_checkpointing_enable"):  # the newer name of the same switch
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if input_grads:
            # Reentrant checkpoint passes gradients only through inputs that require grad; with a frozen
            # embedding the hidden states do not, so they are made to (as transformers does for adapters).
            model.enable_input_require_grads()
    return model.train()


def run(model, tokens, seed):
    model.zero_grad(set_to_none=True)
    mode = RecordLoraCalls()
    torch.manual_seed(seed)
    with mode:
        out = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, mode.calls


@pytest.mark.parametrize("dropout", [0.0, 0.2])
@pytest.mark.parametrize("use_reentrant", [False, True])
def test_checkpoint_gives_the_same_gradients_and_masks(use_reentrant, dropout, device):
    tokens = ids(batch=2, length=9, device=device)
    loss_0, grads_0, calls_0 = run(model_for(dropout, None, False, device), tokens, seed=3)
    loss_c, grads_c, calls_c = run(model_for(dropout, use_reentrant, use_reentrant, device), tokens, seed=3)
    n_layers = 3 * 7  # q, k, v, o, gate, up, down per decoder layer
    assert len(calls_0) == n_layers
    # Checkpointed: the forward calls, then each decoder layer's calls again in backward.
    assert len(calls_c) == 2 * n_layers
    assert grads_0.keys() == grads_c.keys()
    assert torch.equal(loss_c, loss_0)
    for name in grads_0:
        assert torch.equal(grads_c[name], grads_0[name]), name
    forward, recomputed = calls_c[:n_layers], calls_c[n_layers:]
    for (seed_f, h_f), (seed_0, h_0) in zip(forward, calls_0):
        assert seed_f == seed_0 and torch.equal(h_f, h_0)
    # Backward recomputes the layers last to first; within a layer, in forward order.
    per_layer = 7
    original = [forward[i * per_layer : (i + 1) * per_layer] for i in range(3)]
    again = [recomputed[i * per_layer : (i + 1) * per_layer] for i in range(3)][::-1]
    for layer_calls, layer_again in zip(original, again):
        for (seed_f, h_f), (seed_r, h_r) in zip(layer_calls, layer_again):
            assert seed_r == seed_f
            assert torch.equal(h_r, h_f)  # h is computed from the mask: the same mask
    if dropout > 0:
        seeds = [s for s, _ in calls_0]
        assert all(s is not None for s in seeds) and len(set(seeds)) == len(seeds)  # a fresh seed per layer call
