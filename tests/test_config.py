"""LoraConfig: validation, PEFT conversion, and target matching that agrees with PEFT's on real models.
None of these tests runs a kernel."""

import json
import math

import peft
import pytest
import torch

import loracuda
from loracuda import LoraConfig
from tiny_models import gpt2, llama, mlp


def peft_targets(model, **kwargs):
    """The module paths PEFT wraps for a PEFT LoraConfig built from kwargs."""
    pm = peft.get_peft_model(model, peft.LoraConfig(**kwargs))
    base = pm.base_model.model
    from peft.tuners.lora.layer import LoraLayer

    return sorted(p for p, m in base.named_modules() if isinstance(m, LoraLayer))


def test_defaults_and_scale():
    c = LoraConfig()
    assert (c.r, c.alpha, c.dropout, c.target_modules, c.bias, c.init) == (8, 16, 0.0, None, "none", "default")
    assert c.scale_for("x") == 2.0
    assert LoraConfig(r=16, alpha=8, use_rslora=True).scale_for("x") == 8 / math.sqrt(16)


@pytest.mark.parametrize(
    "kwargs, arg",
    [
        ({"r": 0}, "'r'"),
        ({"r": 2.5}, "'r'"),
        ({"alpha": float("nan")}, "'alpha'"),
        ({"dropout": 1.0}, "'dropout'"),
        ({"bias": "some"}, "'bias'"),
        ({"init": "pissa"}, "'init'"),
        ({"rank_pattern": {"q_proj": 0}}, "rank_pattern"),
        ({"rank_pattern": {"(": 4}}, "rank_pattern"),
        ({"target_modules": [1, 2]}, "'target_modules'"),
    ],
)
def test_invalid_arguments_name_the_argument(kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        LoraConfig(**kwargs)


def test_rank_and_alpha_pattern_first_match_wins():
    c = LoraConfig(r=4, alpha=8, rank_pattern={"q_proj": 2, r"layers\.1\..*": 6}, alpha_pattern={"v_proj": 3})
    assert c.rank_for("model.layers.0.self_attn.q_proj") == 2
    assert c.rank_for("model.layers.1.self_attn.q_proj") == 2  # first key wins
    assert c.rank_for("model.layers.1.mlp.up_proj") == 6
    assert c.rank_for("model.layers.0.mlp.up_proj") == 4
    assert c.scale_for("model.layers.0.self_attn.v_proj") == 3 / 4
    # A key matches at a segment boundary only.
    assert c.rank_for("model.layers.0.self_attn.xq_proj") == 4


@pytest.mark.parametrize(
    "builder, kwargs",
    [
        (llama, {"target_modules": ["q_proj", "v_proj"]}),
        (llama, {"target_modules": "all-linear"}),
        (llama, {"target_modules": r".*\.mlp\.(up|down)_proj"}),
        (llama, {"target_modules": ["q_proj", "down_proj"], "layers_to_transform": [1]}),
        (llama, {"target_modules": ["q_proj"], "layers_to_transform": 0, "layers_pattern": "layers"}),
        (llama, {"target_modules": ["model.layers.0.mlp.up_proj", "k_proj"], "layers_to_transform": [1]}),
        (llama, {"target_modules": "all-linear", "exclude_modules": ["k_proj", "o_proj"]}),
        (gpt2, {"target_modules": ["c_proj"]}),  # attention and MLP both have a c_proj
        (gpt2, {"target_modules": "all-linear"}),
        (gpt2, {"target_modules": ["c_attn", "c_fc"], "modules_to_save": ["ln_f"]}),
        (mlp, {"target_modules": ["fc1", "out"]}),
        (mlp, {"target_modules": "all-linear"}),
    ],
)
def test_target_paths_agree_with_peft(builder, kwargs):
    ours = LoraConfig(**{k: v for k, v in kwargs.items()}).target_paths(builder())
    assert ours, "the case must match something"
    assert sorted(ours) == peft_targets(builder(), **kwargs)


def test_all_linear_excludes_the_output_head_and_none_means_all_linear():
    model = llama()
    paths = LoraConfig().target_paths(model)
    assert "lm_head" not in paths
    assert len(paths) == 2 * 7  # q k v o gate up down per layer
    assert paths == LoraConfig(target_modules="ALL-LINEAR").target_paths(model)


def test_gpt2_c_proj_matches_attention_and_mlp():
    paths = LoraConfig(target_modules=["c_proj"]).target_paths(gpt2())
    assert sorted(paths) == sorted(f"transformer.h.{i}.{k}.c_proj" for i in range(2) for k in ("attn", "mlp"))


def test_non_linear_target_is_refused():
    with pytest.raises(ValueError, match="embed.*not an nn.Linear"):
        LoraConfig(target_modules=["embed"]).target_paths(mlp())


def test_from_peft_dict_and_back_keeps_unknown_keys(tmp_path):
    data = peft.LoraConfig(
        r=4, lora_alpha=12, target_modules=["q_proj"], rank_pattern={"q_proj": 2}, use_rslora=True, bias="lora_only"
    ).to_dict()
    data["some_future_key"] = {"x": [1, 2]}
    c = LoraConfig.from_peft(data)
    assert (c.r, c.alpha, c.target_modules, c.rank_pattern, c.use_rslora, c.bias) == (
        4,
        12,
        ["q_proj"],
        {"q_proj": 2},
        True,
        "lora_only",
    )
    out = c.to_peft()
    assert out["some_future_key"] == {"x": [1, 2]}
    assert out["peft_type"] == "LORA" and out["lora_alpha"] == 12 and out["use_dora"] is False
    json.dumps(out)  # writable as adapter_config.json
    # PEFT reads what we write.
    back = peft.LoraConfig.from_peft_type(**{k: v for k, v in out.items() if k != "some_future_key"})
    assert back.r == 4 and back.lora_alpha == 12 and back.use_rslora
    # A folder or a json path.
    (tmp_path / "adapter_config.json").write_text(json.dumps(out))
    for source in (tmp_path, tmp_path / "adapter_config.json"):
        again = LoraConfig.from_peft(source)
        assert again.to_peft() == out


@pytest.mark.parametrize(
    "patch, key",
    [({"use_dora": True}, "use_dora"), ({"peft_type": "IA3"}, "peft_type"), ({"lora_bias": True}, "lora_bias")],
)
def test_from_peft_refuses_unsupported(patch, key):
    data = peft.LoraConfig(r=4, target_modules=["q_proj"]).to_dict()
    data.update(patch)
    with pytest.raises(ValueError, match=key):
        LoraConfig.from_peft(data)


def test_init_lora_weights_mapping():
    assert LoraConfig.from_peft({"init_lora_weights": True}).init == "default"
    assert LoraConfig.from_peft({"init_lora_weights": "gaussian"}).init == "gaussian"
    assert LoraConfig.from_peft({"init_lora_weights": False}).init == "random"
    c = LoraConfig.from_peft({"init_lora_weights": "pissa"})
    assert c.to_peft()["init_lora_weights"] == "pissa"


def test_public_names():
    for name in ("LoraConfig", "LoRALinear", "inject", "merge", "unmerge", "save_adapter", "load_adapter", "hot_swap",
                 "from_peft", "merge_and_unload", "set_adapter", "delete_adapter", "disable_adapters",
                 "combine_adapters", "MergeReport"):
        assert hasattr(loracuda, name), name
    assert torch.nn.Module in loracuda.LoRALinear.__mro__
