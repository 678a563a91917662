"""Oracles independent of the code they check (issue 13 case 10).

(a) Serving: per-token adapter ids of an AdapterPool against each token computed alone through a plain
    model holding only that token's adapter (loracuda.load_adapter into a fresh copy; the model is
    token-wise, so a token's output depends on nothing else), and a pooled layer against per-token
    float64 math W x + b + s_l B_l A_l x. Routing each sequence by its first id (or any other mix-up)
    fails: neighbouring tokens carry different adapters whose deltas are far above rounding.
(b) Merging: merged weights against W + s * B A computed in float64 and rounded once, under the
    tolerance rule (docs/design.md, section 'Tolerance rule'); a delta added twice, or not at all, or
    with the wrong scale, is far outside it.
"""

import copy

import pytest
import torch
from torch import nn

import loracuda
from loracuda import LoraConfig
from loracuda.inject import lora_layers
from loracuda.serving import PooledLinear
from loracuda.serving.layer import BatchState
from tiny_models import assert_within_rule, double_copy, gpt2, llama, mlp, randomize_adapters

CONFIGS = [LoraConfig(r=2, alpha=4), LoraConfig(r=5, alpha=3, target_modules=["fc2", "out"]),
           LoraConfig(r=3, alpha=9, use_rslora=True, target_modules=["fc1"])]


def adapters(tmp_path, base):
    folders = []
    for i, config in enumerate(CONFIGS):
        model = copy.deepcopy(base)
        loracuda.inject(model, config)
        randomize_adapters(model, scale_b=0.2, seed=40 + i)
        loracuda.save_adapter(model, tmp_path / f"a{i}")
        folders.append(tmp_path / f"a{i}")
    return folders


def alone(base, folder, tokens, dtype):
    """The output of ``tokens`` through a fresh copy of ``base`` (in ``dtype``) holding only the
    adapter in ``folder`` (None: no adapter)."""
    model = copy.deepcopy(base).to(dtype)
    if folder is not None:
        loracuda.load_adapter(model, folder)
    with torch.no_grad():
        return model(tokens)


def test_per_token_ids_match_each_token_computed_alone(tmp_path):
    base = mlp()
    folders = adapters(tmp_path, base)
    pool = loracuda.AdapterPool(copy.deepcopy(base), max_adapters=5, max_rank=8)
    slots = [pool.load(f, slot=s) for f, s in zip(folders, (3, 0, 4))]  # slots are not adapter indices
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 50, (3, 11), generator=g)
    which = torch.randint(-1, len(folders), tokens.shape, generator=g)  # adapter index per token, -1: none
    which[:, 1] = (which[:, 0] + 2) % len(folders)  # every sequence mixes adapters from its first tokens on
    ids = torch.where(which >= 0, torch.tensor(slots)[which.clamp(min=0)], torch.tensor(-1))
    with pool.batch(ids), torch.no_grad():
        got = pool.model(tokens)
    outputs = {i: (alone(base, folders[i] if i >= 0 else None, tokens, torch.float32),
                   alone(base, folders[i] if i >= 0 else None, tokens, torch.float64)) for i in range(-1, len(folders))}
    # The oracle batch: token [b, t] taken from the run of its own adapter alone (float32: loracuda's
    # own single-adapter path, float64: the reference).
    plain, reference = torch.empty_like(got), torch.empty_like(got, dtype=torch.float64)
    for b in range(tokens.shape[0]):
        for t in range(tokens.shape[1]):
            i = int(which[b, t])
            plain[b, t], reference[b, t] = outputs[i][0][b, t], outputs[i][1][b, t]
            if i < 0:
                assert torch.equal(got[b, t], plain[b, t]), (b, t)  # no adapter: the base model bit for bit
    assert_within_rule(got, plain, reference)
    # Guard against a test that cannot fail: the adapters do change each token's output clearly.
    for i in range(len(folders)):
        assert (outputs[i][0] - outputs[-1][0]).abs().max() > 1e-2


@pytest.mark.parametrize("ids_shape", ["per_token", "flattened"])
def test_pooled_layer_matches_float64_math_per_token(ids_shape):
    torch.manual_seed(0)
    k, n, slots, r_max = 24, 20, 4, 6
    base = nn.Linear(k, n).double()
    state = BatchState()
    layer = PooledLinear(base, slots, r_max, state)
    factors = {}
    for slot, r in zip(range(slots), (1, 6, 3, 0)):
        if r == 0:
            continue
        a, b, s = torch.randn(r, k, dtype=torch.float64), torch.randn(n, r, dtype=torch.float64), 0.5 + slot
        layer.write_slot(slot, a, b, s)
        factors[slot] = (a, b, s)
    x = torch.randn(3, 7, k, dtype=torch.float64)
    ids = torch.randint(-1, 3, (3, 7), dtype=torch.int32)
    ids[ids == 3] = 2
    state.ids = ids
    with torch.no_grad():
        got = layer(x if ids_shape == "per_token" else x.reshape(-1, k)).reshape(3, 7, n)
    state.ids = None
    for bi in range(3):
        for t in range(7):
            want = base.weight @ x[bi, t] + base.bias
            slot = int(ids[bi, t])
            if slot >= 0:
                a, b, s = factors[slot]
                want = want + s * (b @ (a @ x[bi, t]))
            torch.testing.assert_close(got[bi, t], want, rtol=1e-12, atol=1e-12, msg=f"token {bi, t} slot {slot}")


# ---- (b) merged weights against float64 math ----------------------------------------------------------


def delta64(layer, names):
    """sum over names of s * B A in float64, in the weight's layout ([N, K], or [K, N] for Conv1D)."""
    d = sum(layer.scaling[n] * (layer.lora_B[n].double() @ layer.lora_A[n].double()) for n in names)
    return d.t() if layer.fan_in_fan_out else d


def check_merged(model, base_weights, names_per_layer):
    for path, layer in lora_layers(model):
        names = names_per_layer(layer)
        w0 = base_weights[path]
        reference = w0.double() + delta64(layer, names)
        # plain PyTorch in the weight's dtype: the delta formed and added in that dtype.
        d = sum(layer.scaling[n] * (layer.lora_B[n].to(w0.dtype) @ layer.lora_A[n].to(w0.dtype)) for n in names)
        plain = w0 + (d.t() if layer.fan_in_fan_out else d)
        assert_within_rule(layer.weight, plain, reference)


@pytest.mark.parametrize("builder", [mlp, llama, gpt2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("exact", [True, False])
def test_merged_weights_equal_float64_math(builder, dtype, exact):
    model = builder(dtype=dtype)
    loracuda.inject(model, LoraConfig(r=4, alpha=8), adapter="one")
    loracuda.inject(model, LoraConfig(r=3, alpha=5, use_rslora=True), adapter="two")
    randomize_adapters(model, scale_b=0.002, seed=7)  # small deltas: exact records stay in budget
    base = {p: layer.weight.detach().clone() for p, layer in lora_layers(model)}
    loracuda.merge(model, "one", exact=exact)
    check_merged(model, base, lambda layer: ["one"])
    after_one = {p: layer.weight.detach().clone() for p, layer in lora_layers(model)}
    loracuda.merge(model, "two", exact=exact)
    check_merged(model, after_one, lambda layer: ["two"])
    loracuda.unmerge(model, "two")
    for path, layer in lora_layers(model):
        if exact:  # the restore record gives back the weight "one" left, bit for bit
            assert torch.equal(layer.weight.view(torch.uint8), after_one[path].view(torch.uint8)), path
        else:  # a subtraction: against plain PyTorch adding then subtracting the same delta
            w0 = after_one[path]
            d = layer.scaling["two"] * (layer.lora_B["two"].to(w0.dtype) @ layer.lora_A["two"].to(w0.dtype))
            d = d.t() if layer.fan_in_fan_out else d
            assert_within_rule(layer.weight, (w0 + d) - d, base[path].double() + delta64(layer, ["one"]))
    loracuda.unmerge(model)
    if exact:
        for path, layer in lora_layers(model):
            assert torch.equal(layer.weight.view(torch.uint8), base[path].view(torch.uint8)), path
    # (after inexact unmerges the weights have drifted by a few roundings: the next merge starts from them)
    before_both = {p: layer.weight.detach().clone() for p, layer in lora_layers(model)}
    loracuda.merge(model, ["one", "two"], exact=exact)  # merged together, as one sum
    check_merged(model, before_both, lambda layer: ["one", "two"])
