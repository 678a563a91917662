"""One validation of adapter values for every loading path (load_adapter, hot_swap, AdapterPool.load):
config fields range-checked (r a positive integer, never truncated; finite alphas; target lists),
factors and scales finite, malformed safetensors headers and oversized pools refused, each with a
message naming the file, the key and the bad value, and nothing changed (issue 13 cases 5 and 9)."""

import json
import math
import struct

import pytest
import safetensors.torch
import torch

import loracuda
from loracuda import LoraConfig
from test_transactional_api import assert_same_state, full_state, loaded_model, saved_folder
from tiny_models import mlp


def loaders(tmp_path):
    """(name, call(folder)) for every loading path, each into its own model / pool."""
    existing = loaded_model(tmp_path)
    pool = loracuda.AdapterPool(mlp(), max_adapters=2, max_rank=8)
    return [
        ("load_adapter", mlp(), lambda m, f: loracuda.load_adapter(m, f)),
        ("load_adapter_existing", existing, lambda m, f: loracuda.load_adapter(m, f)),
        ("hot_swap", existing, lambda m, f: loracuda.hot_swap(m, f)),
        ("pool.load", pool.model, lambda m, f: pool.load(f)),
    ]


CONFIG_CASES = [
    (dict(r=None), r"key 'r' must be a positive integer, got None"),
    (dict(r=4.9), r"key 'r' must be a positive integer, got 4.9"),
    (dict(r=0), r"key 'r' must be a positive integer, got 0"),
    (dict(r="4"), r"key 'r' must be a positive integer, got '4'"),
    (dict(target_modules=5), r"key 'target_modules' must be a string or a list of strings, got 5"),
    (dict(alpha_pattern={"fc2": "x"}), r"key 'alpha_pattern' maps 'fc2' to 'x'"),
    (dict(alpha_pattern={"fc2": math.nan}), r"key 'alpha_pattern' maps 'fc2' to nan"),
    (dict(rank_pattern={"fc2": 2.5}), r"key 'rank_pattern' maps 'fc2' to 2.5"),
    (dict(lora_alpha=math.inf), r"key 'lora_alpha' must be a finite number, got inf"),
    (dict(lora_dropout=1.5), r"key 'lora_dropout' must be a number in \[0, 1\), got 1.5"),
    (dict(use_rslora="yes"), r"key 'use_rslora' must be true or false"),
    (dict(lora_alpha=1e300), r"scale .* not a finite float32"),
]


@pytest.mark.parametrize("change, pattern", CONFIG_CASES)
def test_bad_config_values_are_refused_on_every_path(tmp_path, change, pattern):
    _, folder = saved_folder(tmp_path)
    path = folder / "adapter_config.json"
    data = json.loads(path.read_text())
    data.update(change)
    path.write_text(json.dumps(data))
    for name, model, call in loaders(tmp_path):
        before = full_state(model)
        with pytest.raises(ValueError, match=pattern) as info:
            call(model, folder)
        assert "adapter_config.json" in str(info.value) or "adapter_model" in str(info.value), (name, str(info.value))
        assert_same_state(model, before, name)


def test_r_1e400_in_the_json_text_is_refused(tmp_path):
    _, folder = saved_folder(tmp_path)
    path = folder / "adapter_config.json"
    text = path.read_text()
    path.write_text(text.replace('"r": 4', '"r": 1e400'))
    with pytest.raises(ValueError, match=r"key 'r' must be a positive integer, got inf"):
        loracuda.load_adapter(mlp(), folder)
    with pytest.raises(ValueError, match=r"'r' must be an int"):
        LoraConfig(r=4.9)


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_factors_are_refused_on_every_path(tmp_path, value):
    _, folder = saved_folder(tmp_path)
    file = folder / "adapter_model.safetensors"
    tensors = safetensors.torch.load_file(file)
    key = "base_model.model.fc2.lora_B.weight"
    tensors[key][1, 2] = value
    safetensors.torch.save_file(tensors, file, metadata={"format": "pt"})
    for name, model, call in loaders(tmp_path):
        before = full_state(model)
        with pytest.raises(ValueError, match=r"adapter_model.safetensors.*'fc2.lora_B.weight' holds NaN or infinite"):
            call(model, folder)
        assert_same_state(model, before, name)


def write_header(file, header: object, data: bytes = b"") -> None:
    raw = json.dumps(header).encode()
    file.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


@pytest.mark.parametrize("header, pattern", [
    ([1, 2], r"header that is a JSON list, not an object"),
    ({"fc2.lora_A.weight": {"dtype": "F32", "shape": [1]}}, r"entry 'fc2.lora_A.weight' has data_offsets None"),
    ({"fc2.lora_A.weight": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, r"data_offsets \[4, 0\]"),
    ({"fc2.lora_A.weight": 7}, r"entry 'fc2.lora_A.weight' is 7, not an object"),
])
def test_malformed_safetensors_headers_name_the_file_and_key(tmp_path, header, pattern):
    _, folder = saved_folder(tmp_path)
    write_header(folder / "adapter_model.safetensors", header, b"\0" * 8)
    for name, model, call in loaders(tmp_path):
        before = full_state(model)
        with pytest.raises(ValueError, match=r"adapter_model.safetensors.*" + pattern):
            call(model, folder)
        assert_same_state(model, before, name)


def test_rank_of_the_file_must_agree_with_its_config(tmp_path):
    _, folder = saved_folder(tmp_path)
    path = folder / "adapter_config.json"
    data = json.loads(path.read_text())
    data["rank_pattern"] = {"fc2": 2}  # the file's fc2 factors have rank 4
    path.write_text(json.dumps(data))
    model = mlp()
    before = full_state(model)
    with pytest.raises(ValueError, match=r"rank"):
        loracuda.load_adapter(model, folder)
    assert_same_state(model, before, "rank mismatch")


def test_oversized_pools_are_refused_with_the_bytes_they_need():
    model = mlp()
    before = full_state(model)
    with pytest.raises(ValueError, match=r"max_adapters = 1000000000000 .* need \d+ bytes"):
        loracuda.AdapterPool(model, max_adapters=10**12)
    with pytest.raises(ValueError, match=r"need \d+ bytes .* lower max_adapters or max_rank"):
        loracuda.AdapterPool(model, max_adapters=10**6, max_rank=10**6)

    assert_same_state(model, before, "refused pool")
