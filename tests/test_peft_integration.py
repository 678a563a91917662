"""apply_to_peft: a PeftModel on loracuda's kernels keeps PEFT's behaviour, method by method, on Llama
(nn.Linear) and GPT-2 (Conv1D, fan_in_fan_out); the report; the process-wide switch; exact merges;
from_peft leaving the PeftModel working; to_peft; gradient checkpointing and torch.compile.

Each method runs three times on the same adapters: PEFT with loracuda (ours), plain PEFT in the same dtype
(plain) and plain PEFT in float64 (the reference). Floating results follow the tolerance rule of
docs/design.md, section 'Tolerance rule' (tests/tiny_models.assert_within_rule: ours' error against the
reference at most 2x plain's, 3x for gradients); files, names, token ids and printed text must be equal.
"""

import contextlib
import copy
import io
import json
import os
import warnings

import peft
import pytest
import safetensors.torch
import torch
from peft.tuners.lora.layer import Linear as PeftLinear
from torch import nn

import loracuda
from loracuda.integrations.peft import LoracudaLinear
from tiny_models import assert_within_rule, gpt2, ids, llama, logits, randomize_adapters

TARGETS = {"llama": "all-linear", "gpt2": ["c_attn", "c_proj", "c_fc"]}
BUILD = {"llama": llama, "gpt2": gpt2}


def no_base_dropout(model: nn.Module) -> nn.Module:
    """GPT-2's attention / residual / embedding dropout off, so training steps are comparable."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return model


def peft_model(arch: str, seed: int = 3, r: int = 4, alpha: int = 8, scale_b: float = 0.05) -> peft.PeftModel:
    base = no_base_dropout(BUILD[arch]())
    pm = peft.get_peft_model(base, peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=TARGETS[arch]))
    randomize_adapters(pm, scale_b=scale_b, seed=seed)
    return pm.eval()


@pytest.fixture(scope="module")
def other_adapter(tmp_path_factory):
    """{arch: folder} of a second adapter (rank 4, another seed) written by plain PEFT."""
    out = {}
    for arch in BUILD:
        folder = tmp_path_factory.mktemp(f"other-{arch}")
        peft_model(arch, seed=11).save_pretrained(folder)
        out[arch] = str(folder)
    return out


def triple(arch: str):
    """(ours, plain, reference): the same PeftModel with loracuda, without, and without in float64."""
    plain = peft_model(arch)
    ours = copy.deepcopy(plain)
    report = loracuda.apply_to_peft(ours)
    assert report.accelerated and not report.left_to_peft, str(report)
    return ours, plain, copy.deepcopy(plain).double()


# ---- the methods ----------------------------------------------------------------------------------
# Each takes (model, folder to write to, the second adapter's folder) and returns what is compared.


def m_forward(pm, tmp, other):
    return logits(pm, ids())


def m_train_step(pm, tmp, other):
    pm.train()
    tokens = ids()
    loss = pm(tokens, labels=tokens).loss
    loss.backward()
    out = {"loss": loss.detach().reshape(1)}
    out.update({n: p.grad for n, p in pm.named_parameters() if p.requires_grad})
    return out


def m_save_pretrained(pm, tmp, other):
    pm.save_pretrained(tmp)
    with open(os.path.join(tmp, "adapter_config.json")) as f:
        config = json.load(f)
    # PEFT keeps resolved targets in a set: their order in the file varies from model to model.
    config["target_modules"] = sorted(config["target_modules"])
    tensors = safetensors.torch.load_file(os.path.join(tmp, "adapter_model.safetensors"))
    return {"config": json.dumps(config, sort_keys=True), **{k: v.double() for k, v in tensors.items()}}


def m_load_adapter_and_set_adapter(pm, tmp, other):
    pm.load_adapter(other, adapter_name="other")
    pm.set_adapter("other")
    first = logits(pm, ids())
    pm.set_adapter("default")
    return {"other": first, "default": logits(pm, ids()), "active": pm.active_adapter}


def m_multiple_active_adapters(pm, tmp, other):
    pm.load_adapter(other, adapter_name="other")
    pm.base_model.set_adapter(["default", "other"])
    return logits(pm, ids())


def m_disable_adapter(pm, tmp, other):
    with pm.disable_adapter():
        off = logits(pm, ids())
    return {"off": off, "on": logits(pm, ids())}


def m_merge_unmerge_adapter(pm, tmp, other):
    pm.merge_adapter()
    merged = logits(pm, ids())
    weights = {n: p.detach().clone() for n, p in pm.named_parameters() if "base_layer.weight" in n}
    pm.unmerge_adapter()
    after = {n: p.detach().clone() for n, p in pm.named_parameters() if "base_layer.weight" in n}
    return {"merged": merged, "unmerged": logits(pm, ids()), **{"merged " + k: v for k, v in weights.items()},
            **{"unmerged " + k: v for k, v in after.items()}}


def m_merge_and_unload(pm, tmp, other):
    model = pm.merge_and_unload()
    assert not any(isinstance(m, peft.tuners.lora.LoraLayer) for m in model.modules())
    return {"logits": logits(model, ids()), **{n: p for n, p in model.named_parameters()}}


def m_unload(pm, tmp, other):
    model = pm.unload()
    assert not any(isinstance(m, peft.tuners.lora.LoraLayer) for m in model.modules())
    return logits(model, ids())


def _weighted(pm, other, how):
    pm.load_adapter(other, adapter_name="other")
    pm.add_weighted_adapter(["default", "other"], [0.7, 0.4], "combo", combination_type=how)
    pm.set_adapter("combo")
    return logits(pm, ids())


def m_add_weighted_adapter_cat(pm, tmp, other):
    return _weighted(pm, other, "cat")


def m_add_weighted_adapter_linear(pm, tmp, other):
    return _weighted(pm, other, "linear")


def m_add_weighted_adapter_svd(pm, tmp, other):
    torch.manual_seed(0)
    return _weighted(pm, other, "svd")


def m_delete_adapter(pm, tmp, other):
    pm.load_adapter(other, adapter_name="other")
    pm.delete_adapter("other")
    return {"names": " ".join(sorted(n for n, _ in pm.named_parameters())), "logits": logits(pm, ids())}


def m_get_peft_model_state_dict(pm, tmp, other):
    return peft.get_peft_model_state_dict(pm)


def m_generate(pm, tmp, other):
    with torch.no_grad():
        return pm.generate(input_ids=ids(batch=1), max_new_tokens=6, do_sample=False, pad_token_id=0)


def m_print_trainable_parameters(pm, tmp, other):
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        pm.print_trainable_parameters()
    return buffer.getvalue()


METHODS = {name[2:]: fn for name, fn in dict(globals()).items() if name.startswith("m_")}


def compare(what, ours, plain, ref, grads=False):
    if isinstance(ours, dict):
        assert sorted(ours) == sorted(plain) == sorted(ref), what
        for key in ours:
            compare(f"{what}[{key}]", ours[key], plain[key], ref[key], grads)
    elif isinstance(ours, str):
        assert ours == plain, what
    elif isinstance(ours, torch.Tensor) and not ours.is_floating_point():
        assert torch.equal(ours, plain), what
    else:
        assert ours.dtype == plain.dtype, what
        assert_within_rule(ours.detach(), plain.detach(), ref.detach(), factor=3.0 if grads else 2.0)


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_peft_methods_behave_as_without_loracuda(arch, method, tmp_path, other_adapter):
    ours, plain, ref = triple(arch)
    results = []
    for label, pm in (("ours", ours), ("plain", plain), ("ref", ref)):
        folder = tmp_path / label
        folder.mkdir()
        results.append(METHODS[method](pm, str(folder), other_adapter[arch]))
    if method == "print_trainable_parameters":  # float64 and float32 models count the same parameters
        assert results[0] == results[1] == results[2]
        return
    if method == "save_pretrained":
        results[2]["config"] = results[1]["config"]
    if method == "generate":  # greedy tokens: exact (the float64 run must agree too, or the case is a tie)
        assert torch.equal(results[0], results[1]) and torch.equal(results[1], results[2])
        return
    compare(f"{arch} {method}", *results, grads=method == "train_step")


# ---- which code ran -------------------------------------------------------------------------------


def count_loracuda_calls(monkeypatch):
    from loracuda.integrations import peft as lp

    calls = []
    original = lp.lora_linear
    monkeypatch.setattr(lp, "lora_linear", lambda *a, **k: (calls.append(1), original(*a, **k))[1])
    return calls


def test_forward_and_merge_run_on_loracuda(monkeypatch):
    calls = count_loracuda_calls(monkeypatch)
    merges = []
    original_merge = loracuda.ops.merge_
    monkeypatch.setattr(loracuda.ops, "merge_", lambda *a, **k: (merges.append(1), original_merge(*a, **k))[1])
    pm = peft_model("llama")
    loracuda.apply_to_peft(pm)
    logits(pm, ids())
    assert len(calls) == 14  # 2 decoder layers x 7 linear layers
    pm.merge_adapter()
    assert len(merges) == 14
    calls.clear()
    logits(pm, ids())  # merged: the base layers alone, as in PEFT
    assert calls == []


def test_report_lists_what_peft_keeps():
    base = llama()
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "embed_tokens"])
    pm = peft.get_peft_model(base, config)
    pm.add_adapter("dora", peft.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    report = loracuda.apply_to_peft(pm)
    assert len(report.accelerated) == 4 and all(v == ["default"] for v in report.accelerated.values())
    left = report.left_to_peft
    assert "base_model.model.model.embed_tokens" in left and "linear layers only" in left["base_model.model.model.embed_tokens"]
    assert left["base_model.model.model.layers.0.self_attn.q_proj [dora]"] == "LoRA variant DoRA"
    assert "4 LoRA layers run on loracuda, 3 left to PEFT" in str(report)
    # DoRA active: PEFT's forward, same outputs as plain PEFT.
    plain = copy.deepcopy(pm)
    loracuda.remove_from_peft(plain)
    assert not any(type(m) is LoracudaLinear for m in plain.modules())
    pm.base_model.set_adapter("dora")
    plain.base_model.set_adapter("dora")
    assert torch.equal(logits(pm, ids()), logits(plain, ids()))


def test_process_wide_switch_and_its_removal():
    report = loracuda.apply_to_peft()
    try:
        pm = peft.get_peft_model(gpt2(), peft.LoraConfig(r=4, target_modules=["c_attn"]))
        layers = [m for m in pm.modules() if isinstance(m, PeftLinear)]
        assert layers and all(type(m) is LoracudaLinear for m in layers)
        assert any(path.endswith("c_attn") for path in report.accelerated)
        # A later adapter on new targets (PEFT's own add_adapter) is accelerated too.
        pm.add_adapter("mlp", peft.LoraConfig(r=2, target_modules=["c_fc"]))
        assert type(pm.base_model.model.transformer.h[0].mlp.c_fc) is LoracudaLinear
    finally:
        loracuda.remove_from_peft()
    pm = peft.get_peft_model(gpt2(), peft.LoraConfig(r=4, target_modules=["c_attn"]))
    assert type(pm.base_model.model.transformer.h[0].attn.c_attn) is PeftLinear


def test_per_model_switch_covers_adapters_added_later(tmp_path):
    pm = peft_model("llama")
    loracuda.apply_to_peft(pm)
    pm.add_adapter("late", peft.LoraConfig(r=2, target_modules=["lm_head"]))
    assert type(pm.base_model.model.lm_head) is LoracudaLinear
    other = peft_model("llama")  # a model apply_to_peft was not given stays PEFT's
    other.add_adapter("late", peft.LoraConfig(r=2, target_modules=["lm_head"]))
    assert type(other.base_model.model.lm_head) is PeftLinear


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_exact_merge_round_trip_is_bit_exact(arch, dtype):
    # B small, as after training: the record stays within its budget (a quarter of the weight's bytes).
    pm = peft_model(arch, scale_b=0.002).to(dtype)
    loracuda.apply_to_peft(pm, exact_merge=True)
    before = {n: p.detach().clone() for n, p in pm.named_parameters() if "base_layer.weight" in n}
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a merge without a record would warn
        pm.merge_adapter()
        pm.unmerge_adapter()
    for _ in range(2):
        pm.merge_adapter()
        assert any(not torch.equal(p, before[n]) for n, p in pm.named_parameters() if n in before)
        pm.unmerge_adapter()
        for n, p in pm.named_parameters():
            if n in before:
                assert torch.equal(p.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                                   before[n].view(torch.int16 if dtype == torch.bfloat16 else torch.int32)), n


def test_safe_merge_refuses_non_finite_and_changes_nothing():
    pm = peft_model("llama")
    loracuda.apply_to_peft(pm)
    layer = pm.base_model.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.lora_B["default"].weight[0, 0] = float("inf")
    before = layer.base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match="NaNs detected"):
        layer.merge(safe_merge=True)
    assert torch.equal(layer.base_layer.weight, before) and not layer.merged


# ---- from_peft / to_peft ----------------------------------------------------------------------------


def test_from_peft_leaves_the_peft_model_working(tmp_path):
    pm = peft_model("gpt2")
    expected = logits(pm, ids())
    view = loracuda.from_peft(pm)
    # The PeftModel still saves its adapter (every tensor) and still merges / unloads; it now runs on loracuda.
    assert type(pm.base_model.model.transformer.h[0].attn.c_attn) is LoracudaLinear
    pm.save_pretrained(tmp_path)
    saved = safetensors.torch.load_file(tmp_path / "adapter_model.safetensors")
    assert len(saved) == 2 * 4 * 2  # 2 blocks x (c_attn, attn.c_proj, c_fc, mlp.c_proj) x (A, B)
    for key, value in saved.items():
        assert torch.equal(value, pm.state_dict()[key.replace(".weight", ".default.weight")]), key
    torch.testing.assert_close(logits(view, ids()), expected, rtol=1e-5, atol=1e-5)
    merged = copy.deepcopy(pm).merge_and_unload()
    assert_within_rule(logits(merged, ids()), expected, logits(copy.deepcopy(pm).double(), ids()))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_to_peft_shares_parameters_and_outputs(arch, tmp_path):
    model = no_base_dropout(BUILD[arch]())
    loracuda.inject(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[arch]))
    loracuda.inject(model, loracuda.LoraConfig(r=2, lora_alpha=3, target_modules=["lm_head"]), adapter="head")
    randomize_adapters(model, scale_b=0.05)
    loracuda.set_adapter(model, ["default", "head"])
    pm = loracuda.to_peft(model)
    assert isinstance(pm, peft.PeftModel)
    assert torch.equal(logits(pm, ids()), logits(model, ids()))
    shared = {id(p) for p in model.parameters()}
    assert all(id(p) in shared for n, p in pm.named_parameters() if "lora_" in n)
    loracuda.set_adapter(model, "default")
    pm.set_adapter("default")
    pm.save_pretrained(tmp_path)
    back = peft.PeftModel.from_pretrained(no_base_dropout(BUILD[arch]()), tmp_path)
    assert_within_rule(logits(back, ids()), logits(model, ids()), logits(copy.deepcopy(back).double(), ids()))


# ---- training machinery -----------------------------------------------------------------------------


def test_gradient_checkpointing_gives_the_same_gradients_with_dropout():
    def grads(checkpointing: bool):
        pm = peft.get_peft_model(llama(), peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules="all-linear"))
        randomize_adapters(pm, scale_b=0.05)
        loracuda.apply_to_peft(pm)
        if checkpointing:
            pm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            pm.enable_input_require_grads()
        pm.train()
        torch.manual_seed(7)
        tokens = ids()
        pm(tokens, labels=tokens).loss.backward()
        return {n: p.grad for n, p in pm.named_parameters() if p.requires_grad}

    off, on = grads(False), grads(True)
    assert sorted(off) == sorted(on)
    for name in off:
        torch.testing.assert_close(on[name], off[name], rtol=0, atol=0, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("accelerated", [True, False], ids=["loracuda", "plain-peft"])
def test_compile_fullgraph_traces_and_matches_eager(accelerated):
    torch._dynamo.reset()
    pm = peft_model("llama")
    if accelerated:
        loracuda.apply_to_peft(pm)
    tokens = ids()
    eager = logits(pm, tokens)
    compiled = torch.compile(pm, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        out = compiled(input_ids=tokens).logits
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
