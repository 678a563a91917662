"""LoRA on experts (target_parameters) against PEFT: the same adapter gives the same logits and the same
gradient of every LoRA factor, whichever side wrote the file, on Qwen3-MoE-style and Mixtral-style
models in float32 and bfloat16 (the tolerance rule of docs/design.md, section 'Tolerance rule'; the
float64 reference is PEFT's model in float64 over the same, already rounded, base weights)."""

import peft
import pytest
import torch

import loracuda
from loracuda.inject import lora_layers
from loracuda import experts as lx
from moe_models import BUILDERS, EXPERT_TARGETS, randomize, tokens
from tiny_models import assert_within_rule

# (builder, model kwargs, PEFT config kwargs): hidden 64-128, 4-16 experts, top-k 1-4, attention and
# experts in one adapter, one or both experts parameters, rank / alpha patterns on experts.
CASES = {
    # Layer 0 dense, layer 1 sparse. (PEFT rewrites target_modules entries named like the experts'
    # pre-fusion projections, gate_proj / up_proj / down_proj on Qwen3-MoE, into target_parameters, so
    # on such a model it cannot adapt the dense MLP by those names; loracuda adapts what the list names.)
    "qwen3-e8-k2": ("qwen3_moe", {"experts": 8, "top_k": 2, "dense_layers": [0]},
                    {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
                     "target_parameters": EXPERT_TARGETS}),
    "qwen3-e16-k4-h128": ("qwen3_moe", {"experts": 16, "top_k": 4, "hidden": 128, "intermediate": 48},
                          {"r": 8, "lora_alpha": 4, "target_modules": ["o_proj"], "target_parameters": EXPERT_TARGETS,
                           "rank_pattern": {"down_proj": 2}, "alpha_pattern": {r"layers\.1\.mlp\.experts\.gate_up_proj": 3}}),
    "mixtral-e4-k1-down-only": ("mixtral", {"experts": 4, "top_k": 1},
                                {"r": 3, "lora_alpha": 6, "target_parameters": ["mlp.experts.down_proj"]}),
    "mixtral-e8-k2-rslora": ("mixtral", {"experts": 8, "top_k": 2},
                             {"r": 4, "lora_alpha": 8, "target_modules": ["k_proj"], "target_parameters": EXPERT_TARGETS,
                              "use_rslora": True}),
}


def build(case, dtype, double=False):
    name, model_kwargs, _ = CASES[case]
    model = BUILDERS[name](dtype=dtype, **model_kwargs)
    if double:  # transformers' default grouped_mm takes no float64
        model = model.double()
        model.set_experts_implementation("eager")
    return model


def peft_model(case, dtype, folder=None, double=False):
    base = build(case, dtype, double)
    if folder is not None:
        return peft.PeftModel.from_pretrained(base, folder, is_trainable=True).eval()
    return peft.get_peft_model(base, peft.LoraConfig(**CASES[case][2])).eval()


def run(model, ids):
    """(logits float64, {file key: gradient of that factor in PEFT's flat layout, float64}) of a
    cross-entropy step."""
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=ids)
    out.loss.backward()
    return out.logits.detach().double(), factor_grads(model)


def factor_grads(model):
    grads = {}
    for name, p in model.named_parameters():  # PEFT: <path>.lora_A.<adapter>.weight
        if name.startswith("base_model.model.") and ".lora_" in name and p.grad is not None:
            grads[name[len("base_model.model."):].replace(".default.weight", ".weight")] = p.grad.double()
    for path, layer in lora_layers(model):  # loracuda linear layers
        grads[f"{path}.lora_A.weight"] = layer.lora_A["default"].grad.double()
        grads[f"{path}.lora_B.weight"] = layer.lora_B["default"].grad.double()
    for path, m in lx.expert_layers(model):  # loracuda experts: to PEFT's layout
        params = m.params_of("default")
        for p in params:
            a, b = lx.peft_factors(m.lora_A[p]["default"].grad, m.lora_B[p]["default"].grad)
            stem = lx.peft_key(path, params, p)
            grads[f"{stem}.lora_A.weight"], grads[f"{stem}.lora_B.weight"] = a.double(), b.double()
    return grads


def check(ours, plain, reference):
    logits, grads = ours
    assert_within_rule(logits, plain[0], reference[0])
    assert set(grads) == set(plain[1]) == set(reference[1]), sorted(set(grads) ^ set(plain[1]))
    assert any("experts" in k for k in grads)
    for key in grads:
        assert grads[key].shape == plain[1][key].shape, key
        assert float(grads[key].abs().max()) > 0, f"{key}: zero gradient"
        assert_within_rule(grads[key], plain[1][key], reference[1][key], factor=3.0)


# Every case in float32; bfloat16 on two of them (the suite's time budget).
PEFT_INTO_OURS = [(c, torch.float32) for c in CASES] + [("qwen3-e16-k4-h128", torch.bfloat16),
                                                          ("mixtral-e4-k1-down-only", torch.bfloat16)]


@pytest.mark.parametrize("case,dtype", PEFT_INTO_OURS, ids=[f"{c}-{'fp32' if d == torch.float32 else 'bf16'}" for c, d in PEFT_INTO_OURS])
def test_peft_file_into_loracuda(tmp_path, case, dtype):
    pm = peft_model(case, dtype)
    randomize(pm, seed=5)
    pm.save_pretrained(tmp_path)
    ids = tokens()
    plain = run(pm, ids)
    reference = run(peft_model(case, dtype, tmp_path, double=True), ids)
    model = build(case, dtype)
    loracuda.load_adapter(model, tmp_path)
    assert any(isinstance(m, lx.LoRAExperts) for m in model.modules())
    check(run(model, ids), plain, reference)


@pytest.mark.parametrize("case,dtype", [("qwen3-e8-k2", torch.bfloat16), ("mixtral-e8-k2-rslora", torch.float32)],
                         ids=["qwen3-e8-k2-bf16", "mixtral-e8-k2-rslora-fp32"])
def test_loracuda_file_into_peft(tmp_path, case, dtype):
    model = build(case, dtype)
    loracuda.inject(model, loracuda.LoraConfig.from_peft(peft.LoraConfig(**CASES[case][2]).to_dict()))
    randomize(model, seed=6)
    loracuda.save_adapter(model, tmp_path)
    ids = tokens()
    ours = run(model, ids)
    plain = run(peft_model(case, dtype, tmp_path), ids)
    reference = run(peft_model(case, dtype, tmp_path, double=True), ids)
    check(ours, plain, reference)


def test_loracuda_config_round_trip(tmp_path):
    """LoraConfig(target_parameters=...) without target_modules adapts the experts only, as in PEFT, and
    the written config says so."""
    model = build("qwen3-e8-k2", torch.float32)
    loracuda.inject(model, loracuda.LoraConfig(r=2, alpha=4, target_parameters=EXPERT_TARGETS))
    assert not list(lora_layers(model))
    assert len(list(lx.expert_layers(model))) == 1  # layer 0 of this case is dense
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    loracuda.save_adapter(model, tmp_path)
    config = peft.LoraConfig.from_pretrained(tmp_path)
    assert config.target_modules is None and sorted(config.target_parameters) == sorted(EXPERT_TARGETS)
