"""inject and the adapter management API on whole models; from_peft; training lowers the loss. The tests
that run a model run on every device; those that only read names and configs stay on the CPU."""

import copy

import peft
import pytest
import torch

import loracuda
from loracuda import LoraConfig
from tiny_models import gpt2, ids, llama, logits, mlp, randomize_adapters


@pytest.mark.parametrize("builder", [llama, gpt2, mlp])
def test_inject_keeps_outputs_and_freezes_the_rest(builder, device):
    model = builder(device=device)
    tokens = ids()
    before = logits(model, tokens)
    out = loracuda.inject(model, LoraConfig(r=4, alpha=8))
    assert out is model
    assert torch.equal(logits(model, tokens), before)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A.default" in n or ".lora_B.default" in n for n in trainable)
    assert list(model.loracuda_configs) == ["default"]


def test_nothing_matched_names_the_patterns_and_changes_nothing():
    model = llama()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"target_modules=\['nope'\].*layers_to_transform=\[7\]"):
        loracuda.inject(model, LoraConfig(target_modules=["nope"], layers_to_transform=[7]))
    assert not any(isinstance(m, loracuda.LoRALinear) for m in model.modules())
    assert model.state_dict().keys() == state.keys()
    assert all(p.requires_grad for p in model.parameters())


def test_bias_and_modules_to_save_are_trainable():
    model = gpt2()
    loracuda.inject(model, LoraConfig(r=2, target_modules=["c_attn"], bias="lora_only", modules_to_save=["ln_f"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "transformer.h.0.attn.c_attn.base_layer.bias" in trainable
    assert "transformer.h.0.attn.c_proj.bias" not in trainable
    assert {"transformer.ln_f.weight", "transformer.ln_f.bias"} <= trainable
    model = gpt2()
    loracuda.inject(model, LoraConfig(r=2, target_modules=["c_attn"], bias="all"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "transformer.h.0.attn.c_proj.bias" in trainable and "transformer.h.0.ln_1.bias" in trainable


def test_rank_pattern_alpha_pattern_rslora_reach_the_layers():
    model = llama()
    cfg = LoraConfig(r=4, alpha=8, rank_pattern={"q_proj": 2}, alpha_pattern={r"layers\.1\.mlp\..*": 3})
    loracuda.inject(model, cfg)
    q = model.model.layers[0].self_attn.q_proj
    up1 = model.model.layers[1].mlp.up_proj
    assert q.r["default"] == 2 and q.scaling["default"] == 4.0
    assert up1.r["default"] == 4 and up1.scaling["default"] == 3 / 4
    model = llama()
    loracuda.inject(model, LoraConfig(r=16, alpha=8, use_rslora=True))
    assert model.model.layers[0].self_attn.q_proj.scaling["default"] == 2.0


def test_several_adapters_set_delete_disable(device):
    model = llama(device=device)
    tokens = ids()
    base = logits(model, tokens)
    loracuda.inject(model, LoraConfig(r=4), adapter="a")
    loracuda.inject(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]), adapter="b")
    randomize_adapters(model)
    with pytest.raises(ValueError, match="already has an adapter"):
        loracuda.inject(model, LoraConfig(r=2), adapter="b")
    loracuda.set_adapter(model, "a")
    ya = logits(model, tokens)
    loracuda.set_adapter(model, "b")
    yb = logits(model, tokens)
    loracuda.set_adapter(model, ["a", "b"])
    yab = logits(model, tokens)
    assert not torch.allclose(ya, yb) and not torch.allclose(yab, ya) and not torch.allclose(yab, yb)
    with loracuda.disable_adapters(model):
        assert torch.equal(logits(model, tokens), base)
    assert torch.equal(logits(model, tokens), yab)
    with pytest.raises(ValueError, match="no adapter named"):
        loracuda.set_adapter(model, "c")
    loracuda.delete_adapter(model, "b")
    assert not any("lora_A.b" in n for n, _ in model.named_parameters())
    assert torch.equal(logits(model, tokens), ya)
    loracuda.delete_adapter(model, "a")
    assert not any(isinstance(m, loracuda.LoRALinear) for m in model.modules())
    assert torch.equal(logits(model, tokens), base)


def test_combined_adapter_saves_and_loads(tmp_path, device):
    model = llama(device=device)
    loracuda.inject(model, LoraConfig(r=3, alpha=6, target_modules=["q_proj", "v_proj"]), adapter="a")
    loracuda.inject(model, LoraConfig(r=2, alpha=2, target_modules=["v_proj", "up_proj"]), adapter="b")
    randomize_adapters(model)
    loracuda.combine_adapters(model, {"a": 0.5, "b": -1.0}, "ab")
    loracuda.set_adapter(model, "ab")
    tokens = ids()
    expected = logits(model, tokens)
    loracuda.save_adapter(model, tmp_path, adapter="ab")
    fresh = llama(device=device)
    loracuda.load_adapter(fresh, tmp_path)
    assert fresh.model.layers[0].self_attn.v_proj.r["default"] == 5
    assert fresh.model.layers[0].self_attn.q_proj.r["default"] == 3
    torch.testing.assert_close(logits(fresh, tokens), expected, rtol=1e-5, atol=1e-5)
    pm = peft.PeftModel.from_pretrained(llama(device=device), tmp_path).eval()
    torch.testing.assert_close(logits(pm, tokens), expected, rtol=1e-5, atol=1e-5)


def test_combine_adapters_cat_is_the_weighted_sum():
    # CPU only: float64, so that the combination is checked to float64 rounding (no float64 CUDA kernels);
    # combining on the device is covered by test_combined_adapter_saves_and_loads.
    model = mlp().double()
    tokens = ids()
    base = logits(model, tokens)
    loracuda.inject(model, LoraConfig(r=3, alpha=6), adapter="a")
    loracuda.inject(model, LoraConfig(r=2, alpha=2), adapter="b")
    randomize_adapters(model)
    outs = {}
    for name in ("a", "b"):
        loracuda.set_adapter(model, name)
        outs[name] = logits(model, tokens)
    loracuda.combine_adapters(model, {"a": 0.7, "b": 0.3}, "ab", method="cat")
    loracuda.set_adapter(model, "ab")
    assert model.fc1.r["ab"] == 5
    # The layers' deltas combine exactly: compare layer outputs on one input.
    x = torch.randn(4, model.fc1.in_features, dtype=torch.float64)
    layer = model.fc1
    parts = {}
    for name in ("a", "b", "ab"):
        layer.active_adapters = [name]
        parts[name] = layer(x) - layer.base_layer(x)
    torch.testing.assert_close(parts["ab"], 0.7 * parts["a"] + 0.3 * parts["b"])
    with pytest.raises(ValueError, match="equal ranks"):
        loracuda.combine_adapters(model, {"a": 0.5, "b": 0.5}, "lin", method="linear")
    loracuda.combine_adapters(model, {"a": 0.5, "ab": 0.0}, "lin2", method="cat")
    with pytest.raises(ValueError, match="already has"):
        loracuda.combine_adapters(model, {"a": 1.0}, "ab")


def test_combine_adapters_linear_same_rank():
    model = mlp().double()  # CPU only: float64, as above
    loracuda.inject(model, LoraConfig(r=3, alpha=6), adapter="a")
    loracuda.inject(model, LoraConfig(r=3, alpha=3), adapter="b")
    randomize_adapters(model)
    loracuda.combine_adapters(model, {"a": 1.0, "b": 0.0}, "only_a", method="linear")
    x = torch.randn(4, model.fc1.in_features, dtype=torch.float64)
    layer = model.fc1
    layer.active_adapters = ["a"]
    ya = layer(x)
    layer.active_adapters = ["only_a"]
    assert layer.r["only_a"] == 3
    torch.testing.assert_close(layer(x), ya)  # weight 1 on one adapter reproduces it


def test_training_lowers_the_loss(device):
    for builder in (llama, gpt2):
        model = builder(device=device)
        loracuda.inject(model, LoraConfig(r=4, alpha=8, dropout=0.05))
        model.train()
        tokens = ids(batch=4, length=12, seed=7, device=device)
        params = [p for p in model.parameters() if p.requires_grad]
        # A larger learning rate for B, picked by name as PEFT users do.
        groups = [
            {"params": [p for n, p in model.named_parameters() if "lora_A" in n], "lr": 1e-2},
            {"params": [p for n, p in model.named_parameters() if "lora_B" in n], "lr": 3e-2},
        ]
        assert sum(len(g["params"]) for g in groups) == len(params)
        opt = torch.optim.Adam(groups)
        losses = []
        for _ in range(12):
            out = model(tokens, labels=tokens)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
            losses.append(out.loss.item())
        assert losses[-1] < losses[0] - 0.1, losses


def test_from_peft_shares_parameters_and_outputs(device):
    torch.manual_seed(0)
    pm = peft.get_peft_model(gpt2(device=device), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], modules_to_save=["ln_f"]))
    randomize_adapters(pm)
    pm.eval()
    tokens = ids()
    expected = logits(pm, tokens)
    lora_a = pm.base_model.model.transformer.h[0].attn.c_attn.lora_A["default"].weight
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.1)
    model = loracuda.from_peft(pm)
    assert model.transformer.h[0].attn.c_attn.lora_A["default"] is lora_a
    assert isinstance(model.transformer.h[0].attn.c_attn, loracuda.LoRALinear)
    torch.testing.assert_close(logits(model, tokens), expected, rtol=1e-5, atol=1e-5)
    # The optimizer built on the PEFT model's parameters keeps training the converted model.
    model.train()
    tokens = tokens.to(device)
    loss = model(tokens, labels=tokens).loss
    opt.zero_grad()
    loss.backward()
    before = lora_a.detach().clone()
    opt.step()
    assert not torch.equal(lora_a, before)
    assert lora_a.grad is not None


def test_from_peft_refuses_dora():
    pm = peft.get_peft_model(llama(), peft.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(ValueError, match="use_dora|DoRA"):
        loracuda.from_peft(pm)


def test_from_peft_keeps_several_adapters_and_the_active_one(device):
    pm = peft.get_peft_model(llama(device=device), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    pm.add_adapter("second", peft.LoraConfig(r=2, lora_alpha=6, target_modules=["v_proj"], use_rslora=True))
    randomize_adapters(pm)
    pm.set_adapter("second")
    pm.eval()
    tokens = ids()
    expected = logits(pm, tokens)
    model = loracuda.from_peft(pm)
    v = model.model.layers[0].self_attn.v_proj
    assert sorted(v.adapters) == ["default", "second"] and v.active_adapters == ["second"]
    assert v.scaling["second"] == 6 / 2**0.5
    assert sorted(model.loracuda_configs) == ["default", "second"]
    torch.testing.assert_close(logits(model, tokens), expected, rtol=1e-5, atol=1e-5)
    loracuda.set_adapter(model, "default")
    pm_default = logits(model, tokens)
    assert not torch.allclose(pm_default, expected)
