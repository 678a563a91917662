"""Adapter files: PEFT's naming, round trips, bad files refused with the model unchanged, failed saves
leaving the previous adapter intact, hot swap. Saving, loading and swapping run on every device; the
file and config refusals that no tensor reaches the model for stay on the CPU."""

import json
import os

import pytest
import safetensors.torch
import torch

import loracuda
from loracuda import LoraConfig, peft_io
from tiny_models import gpt2, ids, llama, logits, mlp, randomize_adapters


def saved(tmp_path, builder=llama, config=None, name="ad", seed=3, device="cpu"):
    model = builder(device=device)
    loracuda.inject(model, config or LoraConfig(r=4, alpha=8))
    randomize_adapters(model, seed=seed)
    folder = tmp_path / name
    loracuda.save_adapter(model, folder)
    return model, folder


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [type(m) for m in model.modules()]


def assert_unchanged(model, snap):
    state, types = snap
    assert [type(m) for m in model.modules()] == types
    now = model.state_dict()
    assert now.keys() == state.keys()
    for k in state:
        assert torch.equal(now[k], state[k]), k


def test_file_layout_matches_peft(tmp_path, device):
    model, folder = saved(tmp_path, gpt2, LoraConfig(r=4, target_modules=["c_proj"], bias="lora_only", modules_to_save=["ln_f"]),
                          device=device)
    assert sorted(os.listdir(folder)) == ["adapter_config.json", "adapter_model.safetensors"]
    with safetensors.safe_open(folder / "adapter_model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
        keys = set(f.keys())
        a = f.get_tensor("base_model.model.transformer.h.0.mlp.c_proj.lora_A.weight")
        b = f.get_tensor("base_model.model.transformer.h.0.mlp.c_proj.lora_B.weight")
    assert a.shape == (4, 128) and b.shape == (32, 4)  # [r, K] and [N, r] for a Conv1D too
    assert "base_model.model.transformer.h.1.attn.c_proj.base_layer.bias" in keys
    assert {"base_model.model.transformer.ln_f.weight", "base_model.model.transformer.ln_f.bias"} <= keys
    assert not any("default" in k for k in keys)
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["fan_in_fan_out"] is True and config["r"] == 4
    assert len(keys) == 4 * 3 + 2


def test_round_trip_and_unknown_config_keys(tmp_path, device):
    model, folder = saved(tmp_path, device=device)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["a_key_from_elsewhere"] = [1, "x"]
    (folder / "adapter_config.json").write_text(json.dumps(config))
    fresh = llama(device=device)
    loracuda.load_adapter(fresh, folder)
    tokens = ids()
    assert torch.equal(logits(fresh, tokens), logits(model, tokens))
    loracuda.save_adapter(fresh, tmp_path / "again")
    assert json.loads((tmp_path / "again" / "adapter_config.json").read_text())["a_key_from_elsewhere"] == [1, "x"]
    # Loading into an existing adapter replaces its values.
    other, folder2 = saved(tmp_path, seed=9, name="other", device=device)
    loracuda.load_adapter(fresh, folder2)
    assert torch.equal(logits(fresh, tokens), logits(other, tokens))


def test_file_without_prefix_and_partial_coverage(tmp_path, device):
    model, folder = saved(tmp_path, llama, LoraConfig(r=3, target_modules=["v_proj", "down_proj"], layers_to_transform=[1]),
                          device=device)
    file = folder / "adapter_model.safetensors"
    tensors = safetensors.torch.load_file(file)
    assert len(tensors) == 4  # only layer 1 is covered
    safetensors.torch.save_file({k.removeprefix("base_model.model."): v for k, v in tensors.items()}, file, {"format": "pt"})
    fresh = llama(device=device)
    loracuda.load_adapter(fresh, folder)
    tokens = ids()
    assert torch.equal(logits(fresh, tokens), logits(model, tokens))
    assert not isinstance(fresh.model.layers[0].self_attn.v_proj, loracuda.LoRALinear)


def rewrite(folder, change):
    file = folder / "adapter_model.safetensors"
    tensors = safetensors.torch.load_file(file)
    change(tensors)
    safetensors.torch.save_file(tensors, file, {"format": "pt"})


KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda t: t.pop(KEY), r"missing keys \[.model\.layers\.0\.self_attn\.q_proj\.lora_A\.weight"),
        (lambda t: t.__setitem__("base_model.model.model.layers.0.extra.lora_A.weight", torch.zeros(4, 32)), "unexpected keys.*extra"),
        (lambda t: t.__setitem__(KEY, torch.zeros(4, 31)), r"q_proj\.lora_A\.weight' has shape \[4, 31\]"),
        (lambda t: t.__setitem__(KEY, torch.zeros(4, 32, dtype=torch.int32)), r"q_proj\.lora_A\.weight' has dtype torch.int32"),
        (lambda t: t.__setitem__(KEY, torch.zeros(3, 32)), r"q_proj\.lora_A\.weight' has shape \[3, 32\]"),
    ],
)
@pytest.mark.parametrize("into_existing", [False, True])
def test_bad_tensors_are_refused_with_the_model_unchanged(tmp_path, change, message, into_existing, device):
    _, folder = saved(tmp_path)
    rewrite(folder, change)
    target = llama(seed=5, device=device)
    if into_existing:
        loracuda.inject(target, LoraConfig(r=4, alpha=8))
    snap = snapshot(target)
    with pytest.raises(ValueError, match=message):
        loracuda.load_adapter(target, folder)
    assert_unchanged(target, snap)


@pytest.mark.parametrize("patch, key", [({"use_dora": True}, "use_dora"), ({"peft_type": "LOHA"}, "peft_type")])
def test_bad_config_is_refused(tmp_path, patch, key):  # CPU only: refused before any tensor is read
    _, folder = saved(tmp_path)
    config = json.loads((folder / "adapter_config.json").read_text())
    config.update(patch)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    target = llama()
    snap = snapshot(target)
    with pytest.raises(ValueError, match=key):
        loracuda.load_adapter(target, folder)
    assert_unchanged(target, snap)


def test_pickle_and_truncated_files_are_refused(tmp_path):  # CPU only: refused before any tensor is read
    model, folder = saved(tmp_path)
    target = llama()
    snap = snapshot(target)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text((folder / "adapter_config.json").read_text())
    torch.save(safetensors.torch.load_file(folder / "adapter_model.safetensors"), pickled / "adapter_model.bin")
    with pytest.raises(ValueError, match="adapter_model.bin.*pickle"):
        loracuda.load_adapter(target, pickled)
    # A pickle under the safetensors name is refused too, without unpickling it.
    os.replace(pickled / "adapter_model.bin", pickled / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="pickle"):
        loracuda.load_adapter(target, pickled)
    data = (folder / "adapter_model.safetensors").read_bytes()
    for cut in (len(data) - 7, len(data) // 2, 20, 4):
        (folder / "adapter_model.safetensors").write_bytes(data[:cut])
        with pytest.raises(ValueError, match="truncated|not a safetensors|corrupt"):
            loracuda.load_adapter(target, folder)
    assert_unchanged(target, snap)


def test_failed_save_leaves_the_previous_adapter_intact(tmp_path, monkeypatch, device):
    model, folder = saved(tmp_path, device=device)
    before = {n: (folder / n).read_bytes() for n in os.listdir(folder)}
    randomize_adapters(model, seed=11)  # different values to save

    def failing_writer(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x10\x00\x00\x00\x00\x00\x00\x00{partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", failing_writer)
    with pytest.raises(OSError, match="No space"):
        loracuda.save_adapter(model, folder)
    monkeypatch.undo()
    assert {n: (folder / n).read_bytes() for n in os.listdir(folder)} == before  # no temporaries left
    # A config write failing part-way (after the weights' temporary was written) changes nothing either.
    def failing_text(path, text):
        with open(path, "w") as f:
            f.write(text[:10])
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(peft_io, "_write_text", failing_text)
    with pytest.raises(OSError, match="Input/output"):
        loracuda.save_adapter(model, folder)
    monkeypatch.undo()
    assert {n: (folder / n).read_bytes() for n in os.listdir(folder)} == before
    fresh = llama(device=device)
    loracuda.load_adapter(fresh, folder)  # still loadable
    if os.geteuid() != 0:  # root ignores permissions
        os.chmod(folder, 0o500)
        try:
            with pytest.raises(PermissionError):
                loracuda.save_adapter(model, folder)
        finally:
            os.chmod(folder, 0o700)
        assert {n: (folder / n).read_bytes() for n in os.listdir(folder)} == before


def test_save_unknown_adapter_raises(tmp_path):  # CPU only: a name check
    model = mlp()
    loracuda.inject(model, LoraConfig(r=2))
    with pytest.raises(ValueError, match="no adapter named 'x'"):
        loracuda.save_adapter(model, tmp_path / "x", adapter="x")


def test_hot_swap_in_place_with_smaller_rank(tmp_path, device):
    target = llama(device=device)
    loracuda.inject(target, LoraConfig(r=8, alpha=16))
    randomize_adapters(target, seed=1)
    ref, folder = saved(tmp_path, llama, LoraConfig(r=4, alpha=4), device=device)  # smaller rank, other scale
    params = {n: p for n, p in target.named_parameters()}
    loracuda.hot_swap(target, folder)
    after = dict(target.named_parameters())
    assert all(after[n] is params[n] for n in params)  # the same tensors, changed in place
    q = target.model.layers[0].self_attn.q_proj
    assert q.scaling["default"] == 2.0 and q.r["default"] == 8
    assert torch.all(q.lora_A["default"][4:] == 0) and torch.all(q.lora_B["default"][:, 4:] == 0)
    tokens = ids()
    torch.testing.assert_close(logits(target, tokens), logits(ref, tokens), rtol=1e-5, atol=1e-5)
    # Merged: swapped in place and merged again.
    loracuda.merge(target)
    _, folder2 = saved(tmp_path, llama, LoraConfig(r=8, alpha=16), name="second", seed=21)
    ref2 = llama(device=device)
    loracuda.load_adapter(ref2, folder2)
    loracuda.hot_swap(target, folder2)
    assert q.merged
    torch.testing.assert_close(logits(target, tokens), logits(ref2, tokens), rtol=1e-4, atol=1e-5)
    loracuda.unmerge(target)
    assert torch.equal(target.model.layers[0].self_attn.q_proj.base_layer.weight,
                       llama(device=device).model.layers[0].self_attn.q_proj.weight)


def test_hot_swap_refuses_other_targets_and_larger_rank(tmp_path, device):
    target = llama(device=device)
    loracuda.inject(target, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    snap = snapshot(target)
    _, other = saved(tmp_path, llama, LoraConfig(r=2, target_modules=["q_proj", "k_proj"]))
    with pytest.raises(ValueError, match="missing keys|unexpected keys"):
        loracuda.hot_swap(target, other)
    _, bigger = saved(tmp_path, llama, LoraConfig(r=6, target_modules=["q_proj", "v_proj"]), name="big")
    with pytest.raises(ValueError, match="at most"):
        loracuda.hot_swap(target, bigger)
    with pytest.raises(ValueError, match="no adapter named 'zz'"):
        loracuda.hot_swap(target, bigger, adapter="zz")
    assert_unchanged(target, snap)


def test_hot_swap_keeps_a_compiled_graph(tmp_path, device):
    import torch._dynamo

    target = mlp(device=device)
    loracuda.inject(target, LoraConfig(r=4, alpha=8))
    randomize_adapters(target)
    ref, folder = saved(tmp_path, mlp, LoraConfig(r=4, alpha=4), device=device)
    torch._dynamo.reset()
    frames = []

    def backend(gm, example_inputs):
        frames.append(gm)
        return gm.forward

    compiled = torch.compile(target, backend=backend, fullgraph=True)
    tokens = ids(device=device)
    with torch.no_grad():
        compiled(tokens)
        loracuda.hot_swap(target, folder)
        out = compiled(tokens)
    assert len(frames) == 1
    torch.testing.assert_close(out, logits(ref, tokens), rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()
