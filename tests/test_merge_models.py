"""Model-level merge / unmerge: bit-exact restore over many cycles, record size, safe mode, guards; on
every device (the float64 reference of merge_and_unload stays on the CPU)."""

import pytest
import torch
from torch import nn

import loracuda
from loracuda import LoraConfig
from loracuda import layers as layers_module
from tiny_models import assert_within_rule, gpt2, ids, llama, logits, randomize_adapters


def one_layer(dtype, n=64, k=96, r=8, seed=0, b_scale=0.005, conv=False, device="cpu"):
    """A model holding one adapted 64x96 layer whose merged delta changes most weight elements."""
    torch.manual_seed(seed)
    if conv:
        from transformers.pytorch_utils import Conv1D

        base = Conv1D(n, k)
        nn.init.normal_(base.weight, std=0.05)
    else:
        base = nn.Linear(k, n)
    model = nn.Sequential(base.to(device=device, dtype=dtype))
    loracuda.inject(model, LoraConfig(r=r, alpha=2 * r, target_modules=["0"]))
    layer = model[0]
    with torch.no_grad():
        layer.lora_A["default"].normal_(0, 0.3)
        layer.lora_B["default"].normal_(0, b_scale)
    return model, layer


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("conv, cycles", [(False, 1000), (True, 200)])  # the Conv1D layout: same kernel path, fewer cycles
def test_many_cycles_restore_bit_exactly(dtype, conv, cycles, device):
    model, layer = one_layer(dtype, conv=conv, device=device)
    w0 = layer.weight.detach().clone()
    loracuda.merge(model)
    changed = (layer.weight != w0).float().mean().item()
    assert changed > 0.6, f"the adapter must change most elements when merged, changed {changed:.2f}"
    merged_once = layer.weight.detach().clone()
    loracuda.unmerge(model)
    assert torch.equal(layer.weight, w0)
    for _ in range(cycles - 1):
        loracuda.merge(model)
        loracuda.unmerge(model)
    assert torch.equal(layer.weight.view(torch.int16), w0.view(torch.int16))
    loracuda.merge(model)
    assert torch.equal(layer.weight, merged_once)  # merge is deterministic
    loracuda.unmerge(model)


def test_float32_restores_bit_exactly_and_plain_subtraction_would_not(device):
    model, layer = one_layer(torch.float32, b_scale=0.01, device=device)
    w0 = layer.weight.detach().clone()
    for _ in range(20):
        loracuda.merge(model)
        loracuda.unmerge(model)
    assert torch.equal(layer.weight.view(torch.int32), w0.view(torch.int32))
    # The inexact path subtracts: the restore record is what makes the difference.
    loracuda.merge(model, exact=False)
    loracuda.unmerge(model)
    assert not torch.equal(layer.weight, w0)


def test_record_is_at_most_a_quarter_and_reported(device):
    model = llama(dtype=torch.bfloat16, device=device)
    loracuda.inject(model, LoraConfig(r=4))
    randomize_adapters(model)
    report = loracuda.merge(model)
    assert isinstance(report, loracuda.MergeReport)
    assert len(report.layers) == 14 and report.exact
    assert report.total_record_bytes == sum(report.record_bytes.values()) > 0
    for path, layer in model.named_modules():
        if isinstance(layer, loracuda.LoRALinear):
            assert report.record_bytes[path] <= layer.weight.numel() * layer.weight.element_size() // 4
    loracuda.unmerge(model)


def test_merged_forward_runs_the_base_layer_only_and_matches(monkeypatch, device):
    model = llama(device=device)
    loracuda.inject(model, LoraConfig(r=4))
    randomize_adapters(model)
    tokens = ids()
    unmerged = logits(model, tokens)
    loracuda.merge(model)

    def refuse(*args, **kwargs):
        raise AssertionError("a merged layer must not run the LoRA path")

    monkeypatch.setattr(layers_module, "lora_linear", refuse)
    merged = logits(model, tokens)
    monkeypatch.undo()
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-5)
    loracuda.unmerge(model)
    assert torch.equal(logits(model, tokens), unmerged)


def test_record_too_large_raises_before_writing(device):
    # A delta far larger than the weights: most elements lose their low bits, nothing restores them.
    model, layer = one_layer(torch.float32, b_scale=50.0, device=device)
    w0 = layer.weight.detach().clone()
    with pytest.raises(ValueError, match=r"'0'.*exact=False"):
        loracuda.merge(model)
    assert torch.equal(layer.weight, w0) and not layer.merged
    loracuda.merge(model, exact=False)  # the documented way out
    assert layer.merged


def test_a_later_layer_over_budget_rolls_back_the_earlier_layers(device):
    """The budget is enforced by the merge op itself, so earlier layers are already merged when a later
    one fails: merge must unmerge them exactly and leave every weight, and every earlier record, usable."""
    model = llama(dtype=torch.bfloat16, device=device)
    # Two adapters on every layer: "first" is merged earlier, and its record must still apply afterwards.
    loracuda.inject(model, LoraConfig(r=4), adapter="first")
    loracuda.inject(model, LoraConfig(r=4))
    randomize_adapters(model)
    lora_layers = [(n, m) for n, m in model.named_modules() if isinstance(m, loracuda.LoRALinear)]
    assert len(lora_layers) > 2
    base_weights = {n: m.weight.detach().clone() for n, m in lora_layers}
    loracuda.merge(model, "first")
    after_first = {n: m.weight.detach().clone() for n, m in lora_layers}
    last_name, last = lora_layers[-1]
    with torch.no_grad():
        last.lora_B["default"].normal_(0, 50.0)  # far larger than the weights: most elements escape
    with pytest.raises(ValueError, match=rf"{last_name!r}.*exact=False"):
        loracuda.merge(model, "default")
    for n, m in lora_layers:
        assert torch.equal(m.weight.view(torch.int16), after_first[n].view(torch.int16)), f"layer {n} not rolled back"
        assert list(m.merged) == ["first"], f"layer {n} records {list(m.merged)}"
    loracuda.unmerge(model, "first")  # the earlier records still apply (version counters re-armed)
    for n, m in lora_layers:
        assert torch.equal(m.weight.view(torch.int16), base_weights[n].view(torch.int16)), f"layer {n} not restored"


def test_safe_mode_raises_with_every_layer_unchanged(device):
    model = llama(dtype=torch.float16, device=device)
    loracuda.inject(model, LoraConfig(r=4))
    randomize_adapters(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    last = [m for m in model.modules() if isinstance(m, loracuda.LoRALinear)][-1]
    with torch.no_grad():
        last.lora_B["default"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="inf/NaN"):
        loracuda.merge(model, safe=True)
    with torch.no_grad():
        last.lora_B["default"][0, 0] = 1e4  # finite, but the merged fp16 weight overflows
        last.lora_A["default"][0, :] = 1e4
    with pytest.raises(ValueError, match="would give inf/NaN"):
        loracuda.merge(model, safe=True)
    for n, p in model.named_parameters():
        if "base_layer" in n:
            assert torch.equal(p, before[n]), n
    assert not any(m.merged for m in model.modules() if isinstance(m, loracuda.LoRALinear))


def test_unmerge_refuses_when_the_adapter_changed_after_merge(device):
    model, layer = one_layer(torch.bfloat16, device=device)
    loracuda.merge(model)
    merged = layer.weight.detach().clone()
    with torch.no_grad():
        layer.lora_B["default"].mul_(2)
    with pytest.raises(RuntimeError, match="modified after"):
        loracuda.unmerge(model)
    assert torch.equal(layer.weight, merged)
    with torch.no_grad():
        layer.weight.add_(1)  # the merged weight itself changed
        layer.lora_B["default"].div_(2)
    with pytest.raises(RuntimeError, match="modified after"):
        loracuda.unmerge(model)


def test_several_adapters_merge_and_unmerge_in_order(device):
    model = gpt2(device=device)
    loracuda.inject(model, LoraConfig(r=4, target_modules=["c_attn", "c_fc"]), adapter="a")
    loracuda.inject(model, LoraConfig(r=2, target_modules=["c_fc"]), adapter="b")
    randomize_adapters(model)
    loracuda.set_adapter(model, ["a", "b"])
    w0 = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    tokens = ids()
    both = logits(model, tokens)
    loracuda.merge(model, "a")
    loracuda.merge(model, "b")
    torch.testing.assert_close(logits(model, tokens), both, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="later ones"):
        loracuda.unmerge(model, "a")
    loracuda.unmerge(model, "b")
    loracuda.unmerge(model, "a")
    for n, p in model.named_parameters():
        if "base_layer" in n:
            assert torch.equal(p, w0[n]), n
    with pytest.raises(ValueError, match="no adapter named"):
        loracuda.merge(model, "zzz")
    # Both active adapters in one call: merged as their sum under one record, taken off together.
    report = loracuda.merge(model)
    assert report.layers["transformer.h.0.mlp.c_fc"] == ["a", "b"]
    torch.testing.assert_close(logits(model, tokens), both, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="merged together"):
        loracuda.unmerge(model, "a")
    loracuda.unmerge(model)
    for n, p in model.named_parameters():
        if "base_layer" in n:
            assert torch.equal(p, w0[n]), n


def test_merge_and_unload_gives_plain_layers_with_equal_logits(device):
    for builder in (llama, gpt2):
        model = builder(device=device)
        loracuda.inject(model, LoraConfig(r=4))
        randomize_adapters(model)
        tokens = ids()
        ref64 = logits(loracuda_double(model), tokens)
        unmerged = logits(model, tokens)
        plain = loracuda.merge_and_unload(model)
        assert plain is model
        assert not any(isinstance(m, loracuda.LoRALinear) for m in model.modules())
        assert not any("lora" in n for n, _ in model.named_parameters())
        assert_within_rule(logits(model, tokens), unmerged, ref64)


def loracuda_double(model):
    """A float64 copy on the CPU (the kernels take float64 on the CPU only)."""
    import copy

    return copy.deepcopy(model).to(device="cpu", dtype=torch.float64)
