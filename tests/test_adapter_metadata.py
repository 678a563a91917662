"""What a loracuda adapter folder says about its model (task_type, base_model_name_or_path), so that
PEFT's AutoPeftModelFor* load it; LoraConfig under PEFT's argument names; inject with a peft.LoraConfig."""

import json

import peft
import pytest
import torch

import loracuda
from loracuda.integrations.transformers import task_type
from tiny_models import assert_within_rule, gpt2, ids, llama, logits, mlp, randomize_adapters


def test_save_adapter_fills_task_type_and_base_model_path_and_auto_peft_loads_it(tmp_path):
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    llama().save_pretrained(base_dir)  # a "hub" model, on disk: nothing is downloaded
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    loracuda.inject(model, loracuda.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    randomize_adapters(model, scale_b=0.05)
    loracuda.save_adapter(model, adapter_dir)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM"
    assert config["base_model_name_or_path"] == str(base_dir)
    loaded = peft.AutoPeftModelForCausalLM.from_pretrained(adapter_dir).eval()
    ref = peft.AutoPeftModelForCausalLM.from_pretrained(adapter_dir).double().eval()
    assert_within_rule(logits(model.eval(), ids()), logits(loaded, ids()), logits(ref, ids()))


def test_task_type_from_the_model_class():
    assert task_type(llama()) == "CAUSAL_LM"
    assert task_type(gpt2()) == "CAUSAL_LM"
    assert task_type(mlp()) is None
    from transformers import LlamaConfig, LlamaForSequenceClassification

    cls = LlamaForSequenceClassification(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                     num_attention_heads=2, vocab_size=64, pad_token_id=0))
    assert task_type(cls) == "SEQ_CLS"


def test_metadata_already_in_a_loaded_config_is_kept(tmp_path):
    pm = peft.get_peft_model(llama(), peft.LoraConfig(r=2, target_modules=["q_proj"], task_type="FEATURE_EXTRACTION"))
    pm.save_pretrained(tmp_path / "a")
    model = loracuda.load_adapter(llama(), tmp_path / "a")
    loracuda.save_adapter(model, tmp_path / "b")
    assert json.loads((tmp_path / "b" / "adapter_config.json").read_text())["task_type"] == "FEATURE_EXTRACTION"


def test_lora_config_takes_peft_names():
    c = loracuda.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05)
    assert (c.alpha, c.dropout, c.lora_alpha, c.lora_dropout) == (16, 0.05, 16, 0.05)
    assert loracuda.LoraConfig(alpha=16, lora_alpha=16).alpha == 16
    with pytest.raises(ValueError, match="disagree"):
        loracuda.LoraConfig(alpha=3, lora_alpha=4)
    with pytest.raises(ValueError, match="dropout"):
        loracuda.LoraConfig(lora_dropout=1.5)


def test_inject_takes_a_peft_lora_config():
    kwargs = dict(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], use_rslora=True)
    ours = loracuda.inject(llama(), peft.LoraConfig(**kwargs))
    assert ours.model.layers[0].self_attn.q_proj.scaling["default"] == 8 / 2
    theirs = peft.get_peft_model(llama(), peft.LoraConfig(**kwargs))
    assert sorted(p for p, m in ours.named_modules() if isinstance(m, loracuda.LoRALinear)) == sorted(
        p.removeprefix("base_model.model.") for p, m in theirs.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer))
    with pytest.raises(ValueError, match="use_dora"):
        loracuda.inject(llama(), peft.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(TypeError, match="LoraConfig"):
        loracuda.inject(llama(), {"r": 2})
