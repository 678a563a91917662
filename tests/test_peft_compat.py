"""Same adapter, same logits: loracuda against PEFT on Llama, GPT-2 and a plain MLP, in float32 and
bfloat16, whichever side wrote the adapter file (the tolerance rule, DESIGN.md §7; the float64
reference is PEFT's model in float64 over the same, already rounded, base weights, on the CPU). On every
device: ours and PEFT's same-dtype model run on the device under test."""

import copy

import peft
import pytest
import torch

import loracuda
from loracuda import LoraConfig
from tiny_models import BUILDERS, assert_within_rule, ids, logits

CASES = {
    "llama-all-linear": ("llama", {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"}),
    "llama-patterns-layers": (
        "llama",
        {
            "r": 4,
            "lora_alpha": 8,
            "target_modules": ["q_proj", "v_proj", "up_proj"],
            "rank_pattern": {"v_proj": 2},
            "alpha_pattern": {r"layers\.1\.mlp\.up_proj": 3},
            "layers_to_transform": [1],
        },
    ),
    "llama-rslora": ("llama", {"r": 8, "lora_alpha": 4, "target_modules": ["k_proj", "o_proj", "down_proj"], "use_rslora": True}),
    "gpt2-c_proj-bias-save": ("gpt2", {"r": 4, "lora_alpha": 8, "target_modules": ["c_proj"], "bias": "lora_only", "modules_to_save": ["ln_f"]}),
    "gpt2-all-bias-all": ("gpt2", {"r": 3, "lora_alpha": 6, "target_modules": ["c_attn", "c_fc"], "bias": "all"}),
    "mlp": ("mlp", {"r": 5, "lora_alpha": 10, "target_modules": ["fc1", "fc2", "out"], "lora_dropout": 0.1}),
}


def ours_config(kwargs):
    return LoraConfig.from_peft(peft.LoraConfig(**kwargs).to_dict())


def perturb(model, seed):
    """Random adapter factors (B small), and a nudge to every other trainable tensor (biases,
    modules_to_save), so that each of them must travel through the file."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if not p.requires_grad:
                continue
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if "lora_A" in name:
                p.copy_(noise * 0.3)
            elif "lora_B" in name:
                p.copy_(noise * 0.002)
            else:
                p.add_((noise * 0.05).to(device=p.device, dtype=p.dtype))


def peft_load(builder, dtype, folder, as_double=False, device="cpu"):
    base = builder(dtype=dtype, device=device)
    if as_double:
        base = base.double()
    return peft.PeftModel.from_pretrained(base, folder).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_loracuda_file_into_peft(tmp_path, case, dtype, device):
    name, kwargs = CASES[case]
    builder = BUILDERS[name]
    model = builder(dtype=dtype, device=device)
    loracuda.inject(model, ours_config(kwargs))
    perturb(model, seed=4)
    loracuda.save_adapter(model, tmp_path)
    tokens = ids()
    ours = logits(model, tokens)
    plain = logits(peft_load(builder, dtype, tmp_path, device=device), tokens)
    reference = logits(peft_load(builder, dtype, tmp_path, as_double=True), tokens)
    assert_within_rule(ours, plain, reference)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_peft_file_into_loracuda(tmp_path, case, dtype, device):
    name, kwargs = CASES[case]
    builder = BUILDERS[name]
    pm = peft.get_peft_model(builder(dtype=dtype, device=device), peft.LoraConfig(**kwargs))
    perturb(pm, seed=5)
    pm.save_pretrained(tmp_path)
    tokens = ids()
    plain = logits(pm.eval(), tokens)
    reference = logits(peft_load(builder, dtype, tmp_path, as_double=True), tokens)
    model = builder(dtype=dtype, device=device)
    loracuda.load_adapter(model, tmp_path)
    ours = logits(model, tokens)
    assert_within_rule(ours, plain, reference)
    # Merged and unloaded for deployment: against PEFT's merge_and_unload in the same dtype.
    deployed = loracuda.merge_and_unload(copy.deepcopy(model))
    assert not any(isinstance(m, loracuda.LoRALinear) for m in deployed.modules())
    plain_merged = logits(copy.deepcopy(pm).merge_and_unload(), tokens)
    assert_within_rule(logits(deployed, tokens), plain_merged, reference)
