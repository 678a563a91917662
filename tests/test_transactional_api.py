"""Every model-API call validates, then writes: an error leaves the model as it was. For each call, the
model's full state is snapshotted before the failing call and compared after: every state_dict tensor
bit for bit, the module tree (paths and types), requires_grad flags and loracuda's bookkeeping (configs,
per-layer ranks / alphas / scales / dropout / active adapters / merge records)."""

import json
import math

import pytest
import torch
from torch import nn

import loracuda
from loracuda import LoraConfig
from loracuda.inject import configs, lora_layers
from tiny_models import llama, mlp, randomize_adapters


def full_state(model: nn.Module) -> dict:
    layers = {}
    for path, layer in lora_layers(model):
        records = {n: (rec.adapters, rec.exact, rec.scale, id(rec)) for n, rec in layer.merged.items()}
        layers[path] = (dict(layer.r), dict(layer.alpha), dict(layer.scaling), dict(layer.dropout_p),
                        list(layer.active_adapters), layer.disabled, records, layer.training)
    return {
        "tensors": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "modules": [(p, type(m)) for p, m in model.named_modules()],
        "grad": {k: p.requires_grad for k, p in model.named_parameters()},
        "configs": {n: json.dumps(c.to_peft(), sort_keys=True, default=str) for n, c in configs(model).items()},
        "layers": layers,
    }


def assert_same_state(model: nn.Module, before: dict, context: str) -> None:
    after = full_state(model)
    assert after["modules"] == before["modules"], context
    assert after["tensors"].keys() == before["tensors"].keys(), context
    for k, v in before["tensors"].items():
        now = after["tensors"][k]
        assert now.dtype == v.dtype and torch.equal(now.view(-1).view(torch.uint8), v.view(-1).view(torch.uint8)), f"{context}: {k}"
    for key in ("grad", "configs", "layers"):
        assert after[key] == before[key], f"{context}: {key}"


def saved_folder(tmp_path, name="ad", config=None, seed=3, builder=mlp):
    model = builder()
    loracuda.inject(model, config or LoraConfig(r=4, alpha=8))
    randomize_adapters(model, seed=seed)
    folder = tmp_path / name
    loracuda.save_adapter(model, folder)
    return model, folder


def edit_config(folder, **changes):
    path = folder / "adapter_config.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def loaded_model(tmp_path, merged=False):
    """An mlp holding adapter "default" (and "other"), "default" merged exactly when ``merged``."""
    _, folder = saved_folder(tmp_path, "base_adapter", seed=5)
    model = mlp()
    loracuda.load_adapter(model, folder)
    loracuda.inject(model, LoraConfig(r=2, target_modules=["fc1"]), adapter="other")
    if merged:
        loracuda.merge(model, "default")
    return model


# ---- case 6 of the issue: load_adapter with a bad alpha_pattern, hot_swap over budget -------------


@pytest.mark.parametrize("into", ["fresh", "existing", "merged"])
@pytest.mark.parametrize("pattern", [{"fc2": "x"}, {"fc2": math.nan}, {"fc2": math.inf}])
def test_load_adapter_with_a_bad_alpha_pattern_changes_nothing(tmp_path, into, pattern):
    _, folder = saved_folder(tmp_path)
    edit_config(folder, alpha_pattern=pattern)
    model = mlp() if into == "fresh" else loaded_model(tmp_path, merged=into == "merged")
    before = full_state(model)
    with pytest.raises(ValueError, match=r"adapter_config.json.*'alpha_pattern' maps 'fc2'"):
        loracuda.load_adapter(model, folder)
    assert_same_state(model, before, f"load_adapter into {into}")
    with pytest.raises(ValueError, match="'alpha_pattern'"):
        loracuda.hot_swap(model, folder) if into != "fresh" else loracuda.load_adapter(model, folder, adapter="x")
    assert_same_state(model, before, f"hot_swap into {into}")


def test_hot_swap_whose_remerge_goes_over_budget_restores_the_model(tmp_path):
    """Exact merge of a small adapter, then hot_swap of one whose delta dwarfs the weights: its exact
    record would be over budget. The error names the real layer path, and the model keeps the old
    adapter, merged, with weights equal bit for bit and records that still unmerge exactly."""
    model = mlp(dtype=torch.bfloat16)
    loracuda.inject(model, LoraConfig(r=4, alpha=8, target_modules=["fc1", "fc2"]))
    randomize_adapters(model, seed=5)
    base = {p: l.weight.detach().clone() for p, l in lora_layers(model)}
    loracuda.merge(model)
    huge_model = mlp(dtype=torch.bfloat16)
    loracuda.inject(huge_model, LoraConfig(r=4, alpha=8, target_modules=["fc1", "fc2"]))
    randomize_adapters(huge_model, scale_b=50.0, seed=6)
    loracuda.save_adapter(huge_model, tmp_path / "huge")
    before = full_state(model)
    with pytest.raises(ValueError, match=r"hot_swap: .*layer 'fc1'.*previous adapter 'default', merged as before"):
        loracuda.hot_swap(model, tmp_path / "huge")
    # Same tensors and merge state; the records are new objects (the old adapter was merged again).
    after = full_state(model)
    for k, v in before["tensors"].items():
        assert torch.equal(after["tensors"][k].view(torch.int16) if v.dtype == torch.bfloat16 else after["tensors"][k],
                           v.view(torch.int16) if v.dtype == torch.bfloat16 else v), k
    assert {p: sorted(l[6]) for p, l in after["layers"].items()} == {p: sorted(l[6]) for p, l in before["layers"].items()}
    loracuda.unmerge(model)
    for p, layer in lora_layers(model):
        assert torch.equal(layer.weight.view(torch.int16), base[p].view(torch.int16)), p


# ---- every other call -----------------------------------------------------------------------------


def test_inject_that_fails_part_way_puts_every_layer_back(tmp_path, monkeypatch):
    model = loaded_model(tmp_path)
    before = full_state(model)
    real = loracuda.LoRALinear.add_adapter
    calls = []

    def failing_second(self, name, *args, **kwargs):  # the second layer's allocation runs out of memory
        calls.append(name)
        if len(calls) == 2:
            raise torch.OutOfMemoryError("simulated")
        return real(self, name, *args, **kwargs)

    monkeypatch.setattr(loracuda.LoRALinear, "add_adapter", failing_second)
    with pytest.raises(torch.OutOfMemoryError):
        loracuda.inject(model, LoraConfig(r=3, target_modules=["fc1", "fc2", "out"]), adapter="new")
    assert_same_state(model, before, "inject failing part-way")
    monkeypatch.undo()
    plain = mlp()
    before = full_state(plain)
    with pytest.raises(ValueError):
        loracuda.inject(plain, LoraConfig(r=3), adapter="a.b")
    assert_same_state(plain, before, "inject with a bad name")


def test_load_adapter_failing_part_way_undoes_the_injection(tmp_path, monkeypatch):
    _, folder = saved_folder(tmp_path)
    model = mlp()
    before = full_state(model)
    real = torch.Tensor.copy_
    count = []

    def failing_third_copy(self, src, *args, **kwargs):
        count.append(1)
        if len(count) == 3:
            raise RuntimeError("simulated write failure")
        return real(self, src, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "copy_", failing_third_copy)
    with pytest.raises(RuntimeError, match="simulated"):
        loracuda.load_adapter(model, folder)
    monkeypatch.undo()
    assert_same_state(model, before, "load_adapter failing part-way into a fresh model")
    model = loaded_model(tmp_path)
    before = full_state(model)
    count.clear()
    monkeypatch.setattr(torch.Tensor, "copy_", failing_third_copy)
    with pytest.raises(RuntimeError, match="simulated"):
        loracuda.load_adapter(model, folder)
    monkeypatch.undo()
    assert_same_state(model, before, "load_adapter failing part-way into an existing adapter")


def test_merge_unmerge_and_bookkeeping_errors_change_nothing(tmp_path):
    model = loaded_model(tmp_path)
    for call, pattern in [
        (lambda: loracuda.merge(model, ["nope"]), "no adapter named"),
        (lambda: loracuda.merge(model, [5]), "argument 'adapter'"),
        (lambda: loracuda.set_adapter(model, ["default", "nope"]), "no adapter named"),
        (lambda: loracuda.delete_adapter(model, "nope"), "no adapter named"),
        (lambda: loracuda.combine_adapters(model, {"default": 1.0}, "a.b"), "argument 'name'"),
        (lambda: loracuda.combine_adapters(model, {"default": math.nan, "other": 1.0}, "mix"), "finite"),
        (lambda: loracuda.combine_adapters(model, {"default": 1.0, "other": 1.0}, "mix", method="linear"), "equal ranks"),
        (lambda: loracuda.combine_adapters(model, {"default": 1.0}, "other"), "already has"),
    ]:
        before = full_state(model)
        with pytest.raises((ValueError, TypeError), match=pattern):
            call()
        assert_same_state(model, before, pattern)
    loracuda.merge(model, "default")
    for call, pattern in [
        (lambda: loracuda.delete_adapter(model, "default"), "merged"),
        (lambda: loracuda.load_adapter(model, tmp_path / "base_adapter"), "merged"),
        (lambda: loracuda.inject(model, LoraConfig(r=2, target_modules=["fc2"]), adapter="third"), "merged"),
        (lambda: loracuda.unmerge(model, "nope"), None),
    ]:
        before = full_state(model)
        if pattern is None:
            assert call() == []  # nothing merged under that name: a no-op
        else:
            with pytest.raises((ValueError, RuntimeError), match=pattern):
                call()
        assert_same_state(model, before, str(pattern))


# ---- case 8 of the issue: merging a name twice, and unmerging after the factors changed -------------


def test_merge_of_a_repeated_name_merges_once(tmp_path):
    once, twice = loaded_model(tmp_path), loaded_model(tmp_path)
    loracuda.merge(once, "default", exact=False)
    report = loracuda.merge(twice, ["default", "default"], exact=False)
    assert all(names == ["default"] for names in report.layers.values())
    for (p, a), (_, b) in zip(lora_layers(once), lora_layers(twice)):
        assert torch.equal(a.weight, b.weight), p
    loracuda.set_adapter(twice, ["other", "other"])
    assert all(layer.active_adapters in (["other"], []) for _, layer in lora_layers(twice))


@pytest.mark.parametrize("exact", [True, False])
def test_unmerge_refuses_after_the_factors_changed(tmp_path, exact):
    model = loaded_model(tmp_path)
    loracuda.merge(model, "default", exact=exact)
    with torch.no_grad():
        model.fc2.lora_A["default"].mul_(2)
    before = full_state(model)
    with pytest.raises(RuntimeError, match=r"adapter \['default'\] of layer 'fc2' was modified after it was merged"):
        loracuda.unmerge(model)
    assert_same_state(model, before, f"unmerge after a change (exact={exact})")


# ---- AdapterPool -------------------------------------------------------------------------------------


def test_pool_load_of_bad_values_changes_nothing(tmp_path):
    _, good = saved_folder(tmp_path, "good")
    pool = loracuda.AdapterPool(mlp(), max_adapters=2, max_rank=4)
    pool.load(good, slot=1)
    before = full_state(pool.model)
    buffers = {k: v.clone() for k, v in pool.model.named_buffers()}
    for name, change, pattern in [
        ("nan_alpha", dict(alpha_pattern={"fc2": math.nan}), "'alpha_pattern' maps 'fc2' to nan"),
        ("inf_alpha", dict(lora_alpha=math.inf), "'lora_alpha' must be a finite number"),
        ("huge_alpha", dict(lora_alpha=1e300), "not a finite float32"),
        ("r_float", dict(r=4.5), "'r' must be a positive integer, got 4.5"),
    ]:
        _, folder = saved_folder(tmp_path, name)
        edit_config(folder, **change)
        for slot in (None, 1):
            with pytest.raises(ValueError, match=pattern):
                pool.load(folder, slot=slot)
            assert_same_state(pool.model, before, name)
            assert all(torch.equal(v, buffers[k]) for k, v in pool.model.named_buffers()), name
            assert pool.slots == {1: str(good)}
