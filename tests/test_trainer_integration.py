"""Training through the stack users run: TRL's SFTTrainer(peft_config=...) with loracuda's process-wide
PEFT switch, transformers' Trainer with a PeftModel on loracuda, and the Trainer with a loracuda.inject-ed
model. For each: the loss curve against plain PEFT's (same seed; the tolerance rule of docs/design.md,
section 'Tolerance rule', with plain PEFT in float64 as the reference), checkpoints that hold the adapter,
resume_from_checkpoint continuing from it (factor norms equal to the uninterrupted run's), the saved
folder loading with equal logits, and merge_and_unload against PEFT's.

Everything is built here: a tiny Llama from a config, a character-level tokenizer, a few lines of text.
"""

import contextlib
import copy
import os

import peft
import pytest
import safetensors.torch
import torch

import loracuda
from tiny_models import assert_within_rule, ids, llama, logits, randomize_adapters

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

TEXT = [
    "the cat sat on the mat and looked at the door",
    "a kernel reads the input once and writes the output once",
    "low rank adapters change a few numbers in every layer",
    "the quick brown fox jumps over the lazy dog again",
    "merging adds the update into the weight in one pass",
    "the tokenizer splits every line into single characters",
    "training lowers the loss a little at every step",
    "resume from a checkpoint and continue where it stopped",
]
STEPS = 4
SAVE_STEPS = 2
LORA_PARAMS = 2 * 7 * 2  # 2 decoder layers x 7 linear layers x (A, B)


def tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    chars = sorted(set("".join(TEXT)))
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    assert len(vocab) <= 128  # the tiny Llama's vocabulary
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def args(cls, out, **extra):
    extra.setdefault("max_steps", STEPS)
    return cls(
        output_dir=str(out), per_device_train_batch_size=2, learning_rate=1e-2,
        lr_scheduler_type="constant", logging_steps=1, save_steps=SAVE_STEPS, save_strategy="steps",
        report_to="none", use_cpu=True, seed=0, data_seed=0, dataloader_num_workers=0, disable_tqdm=True,
        bf16=False, fp16=False, **extra,  # float32 (TRL turns bf16 autocast on where the CPU has it)
    )


def losses(trainer) -> torch.Tensor:
    return torch.tensor([h["loss"] for h in trainer.state.log_history if "loss" in h], dtype=torch.float64)


def factor_norms(model) -> torch.Tensor:
    return torch.stack([p.detach().double().norm() for n, p in sorted(model.named_parameters()) if "lora_" in n])


def assert_checkpoint_holds_adapter(folder, trained_names=LORA_PARAMS):
    tensors = safetensors.torch.load_file(os.path.join(folder, "adapter_model.safetensors"))
    assert len(tensors) == trained_names, sorted(tensors)
    # B starts at zero: a checkpoint after training steps has moved every B.
    assert all(float(t.norm()) > 0 for k, t in tensors.items() if "lora_B" in k)


@contextlib.contextmanager
def process_wide_switch():
    """loracuda.apply_to_peft() for the block, off again afterwards whatever happens."""
    loracuda.apply_to_peft()
    try:
        yield
    finally:
        loracuda.remove_from_peft()


# ---- TRL's SFTTrainer ---------------------------------------------------------------------------------


def sft_run(out, *, dtype=torch.float32, switch=False, resume=None, max_steps=STEPS):
    from trl import SFTConfig, SFTTrainer

    torch.manual_seed(0)
    data = datasets.Dataset.from_dict({"text": TEXT})
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    with process_wide_switch() if switch else contextlib.nullcontext():
        trainer = SFTTrainer(
            model=llama().to(dtype).train(), args=args(SFTConfig, out, max_length=48), train_dataset=data,
            processing_class=tokenizer(), peft_config=config,
        )
        trainer.args.max_steps = max_steps
        trainer.train(resume_from_checkpoint=resume)
    return trainer


@pytest.fixture(scope="module")
def sft(tmp_path_factory):
    """{label: trainer}: plain PEFT, its float64 reference, and the same with the switch on."""
    root = tmp_path_factory.mktemp("sft")
    return {
        "plain": sft_run(root / "plain"),
        "ref": sft_run(root / "ref", dtype=torch.float64),
        "ours": sft_run(root / "ours", switch=True),
        "root": root,
    }


@pytest.mark.slow
def test_sft_trainer_with_the_switch_follows_plain_peft(sft):
    ours, plain, ref = sft["ours"], sft["plain"], sft["ref"]
    # TRL built the PeftModel; every LoRA layer of it computes with loracuda, with gradient checkpointing on
    # (TRL's default).
    layers = [m for m in ours.model.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    assert layers and all(type(m).__name__ == "LoracudaLinear" for m in layers)
    assert ours.args.gradient_checkpointing
    curve = losses(ours)
    assert len(curve) == STEPS
    ref_curve = losses(ref)
    err = float((curve - ref_curve).norm())
    err_plain = float((losses(plain) - ref_curve).norm())
    assert err <= 2.0 * err_plain + 4 * 2.0**-24 * float(ref_curve.norm()), (curve, losses(plain), ref_curve)


@pytest.mark.slow
def test_sft_trainer_checkpoints_hold_the_adapter_and_resume_from_it(sft):
    root = sft["root"]
    checkpoint = root / "ours" / f"checkpoint-{SAVE_STEPS}"
    assert_checkpoint_holds_adapter(checkpoint)
    resumed = sft_run(root / "ours", switch=True, resume=str(checkpoint))
    assert resumed.state.global_step == STEPS
    torch.testing.assert_close(factor_norms(resumed.model), factor_norms(sft["ours"].model), rtol=1e-6, atol=0)


def test_sft_trainer_output_loads_in_peft_and_merges_as_peft_does(sft, tmp_path):
    ours = sft["ours"]
    ours.save_model(str(tmp_path))
    assert_checkpoint_holds_adapter(tmp_path)
    model = ours.model.eval()
    tokens = ids()
    plain = peft.PeftModel.from_pretrained(llama(), tmp_path).eval()
    ref = peft.PeftModel.from_pretrained(llama().double(), tmp_path).eval()
    assert_within_rule(logits(model, tokens), logits(plain, tokens), logits(ref, tokens))
    merged = copy.deepcopy(model).merge_and_unload()  # loracuda's merge kernel, through PEFT's method
    assert_within_rule(logits(merged, tokens), logits(copy.deepcopy(plain).merge_and_unload(), tokens),
                       logits(copy.deepcopy(ref).merge_and_unload(), tokens))


@pytest.mark.slow
def test_from_peft_inside_sft_trainer_loses_nothing(tmp_path):
    """The way in that used to write empty adapters: from_peft(trainer.model) now accelerates the
    PeftModel in place and leaves it a PeftModel, so saves and resume keep the adapter."""
    from trl import SFTConfig, SFTTrainer

    torch.manual_seed(0)
    trainer = SFTTrainer(
        model=llama().train(), args=args(SFTConfig, tmp_path, max_length=48, max_steps=SAVE_STEPS),
        train_dataset=datasets.Dataset.from_dict({"text": TEXT}), processing_class=tokenizer(),
        peft_config=peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    loracuda.from_peft(trainer.model)
    assert isinstance(trainer.model, peft.PeftModel)
    trainer.train()
    assert_checkpoint_holds_adapter(tmp_path / f"checkpoint-{SAVE_STEPS}")
    trainer.save_model(str(tmp_path / "final"))
    assert_checkpoint_holds_adapter(tmp_path / "final")


# ---- transformers' Trainer -------------------------------------------------------------------------------


def lm_dataset():
    tok = tokenizer()
    data = datasets.Dataset.from_dict({"text": TEXT})
    return data.map(lambda row: tok(row["text"]), remove_columns=["text"]), tok


@pytest.fixture(scope="module")
def initial_adapter(tmp_path_factory):
    """A PEFT adapter folder every Trainer run starts from (PEFT's initialisation, seed 0)."""
    folder = tmp_path_factory.mktemp("initial")
    torch.manual_seed(0)
    peft.get_peft_model(llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")).save_pretrained(folder)
    return folder


def trainer_run(out, initial, *, kind, dtype=torch.float32, resume=None, callbacks=None):
    """kind: "plain" (PeftModel), "ours" (PeftModel + apply_to_peft) or "inject" (loracuda.inject-ed)."""
    data, tok = lm_dataset()
    if kind == "inject":
        model = loracuda.load_adapter(llama().to(dtype), initial)
    else:
        model = peft.PeftModel.from_pretrained(llama().to(dtype), initial, is_trainable=True)
        if kind == "ours":
            loracuda.apply_to_peft(model)
    trainer = transformers.Trainer(
        model=model.train(), args=args(transformers.TrainingArguments, out), train_dataset=data,
        data_collator=transformers.DataCollatorForLanguageModeling(tok, mlm=False), callbacks=callbacks,
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer


@pytest.fixture(scope="module")
def trained(tmp_path_factory, initial_adapter):
    root = tmp_path_factory.mktemp("trainer")
    return {
        kind: trainer_run(root / kind, initial_adapter, kind=kind, dtype=torch.float64 if kind == "ref" else torch.float32)
        for kind in ("plain", "ref", "ours", "inject")
    } | {"root": root}


@pytest.mark.parametrize("kind", ["ours", "inject"])
@pytest.mark.slow
def test_trainer_loss_curve_follows_plain_peft(trained, kind):
    ref_curve = losses(trained["ref"])
    curve, plain = losses(trained[kind]), losses(trained["plain"])
    assert len(curve) == STEPS
    err, err_plain = float((curve - ref_curve).norm()), float((plain - ref_curve).norm())
    assert err <= 2.0 * err_plain + 4 * 2.0**-24 * float(ref_curve.norm()), (curve, plain, ref_curve)


@pytest.mark.parametrize("kind", ["ours", "inject"])
def test_trainer_checkpoints_hold_the_adapter_and_resume_from_it(trained, initial_adapter, kind):
    checkpoint = trained["root"] / kind / f"checkpoint-{SAVE_STEPS}"
    assert_checkpoint_holds_adapter(checkpoint)
    resumed = trainer_run(trained["root"] / kind, initial_adapter, kind=kind, resume=str(checkpoint))
    assert resumed.state.global_step == STEPS
    torch.testing.assert_close(factor_norms(resumed.model), factor_norms(trained[kind].model), rtol=1e-6, atol=0)


def test_trainer_peft_output_loads_in_peft_and_merges_as_peft_does(trained, tmp_path):
    trainer = trained["ours"]
    trainer.save_model(str(tmp_path))
    tokens = ids()
    model = trainer.model.eval()
    plain = peft.PeftModel.from_pretrained(llama(), tmp_path).eval()
    ref = peft.PeftModel.from_pretrained(llama().double(), tmp_path).eval()
    assert_within_rule(logits(model, tokens), logits(plain, tokens), logits(ref, tokens))
    assert_within_rule(logits(copy.deepcopy(model).merge_and_unload(), tokens),
                       logits(copy.deepcopy(plain).merge_and_unload(), tokens),
                       logits(copy.deepcopy(ref).merge_and_unload(), tokens))


def test_trainer_inject_output_loads_back_in_transformers(trained, tmp_path):
    """Trainer.save_model of an injected model: transformers' from_pretrained gives the fine-tuned model
    (base weights under transformers' names, the adapter beside them), PEFT and loracuda load the adapter,
    and AutoPeftModelForCausalLM finds the base model from base_model_name_or_path."""
    trainer = trained["inject"]
    trainer.save_model(str(tmp_path))
    model = trainer.model.eval()
    tokens = ids()
    expected = logits(model, tokens)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ref = peft.PeftModel.from_pretrained(llama().double(), tmp_path).eval()
    assert_within_rule(expected, logits(back, tokens), logits(ref, tokens))
    again = loracuda.load_adapter(llama(), tmp_path)
    assert torch.equal(logits(again, tokens), expected)
    merged = loracuda.merge_and_unload(copy.deepcopy(model))
    assert_within_rule(logits(merged, tokens), logits(copy.deepcopy(ref).float().merge_and_unload(), tokens),
                       logits(copy.deepcopy(ref).merge_and_unload(), tokens))


def test_save_adapter_callback_writes_adapters_for_plain_modules(tmp_path):
    """SaveAdapterCallback: the adapter folder beside each checkpoint and in output_dir at the end."""
    from loracuda.integrations.transformers import SaveAdapterCallback

    model = loracuda.inject(llama(), loracuda.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    state = transformers.TrainerState(global_step=3)
    control = transformers.TrainerControl()
    targs = args(transformers.TrainingArguments, tmp_path)
    callback = SaveAdapterCallback()
    callback.on_save(targs, state, control, model=model)
    callback.on_train_end(targs, state, control, model=model)
    for folder in (tmp_path / "checkpoint-3", tmp_path):
        tensors = safetensors.torch.load_file(os.path.join(folder, "adapter_model.safetensors"))
        assert sorted(tensors) == sorted(f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_{f}.weight"
                                         for i in range(2) for f in "AB")


def test_full_save_of_a_merged_injected_model_is_refused(tmp_path):
    model = loracuda.inject(llama(), loracuda.LoraConfig(r=2, target_modules=["q_proj"]))
    loracuda.merge(model)
    with pytest.raises(RuntimeError, match="merged adapters"):
        model.save_pretrained(tmp_path)
    assert not os.listdir(tmp_path)


def test_accelerate_save_model_of_an_injected_model_loads_back(tmp_path):
    """accelerate's save_model writes model.state_dict() (loracuda's names, no config): it loads back with
    load_state_dict into an injected model, base weights and adapter alike."""
    import accelerate

    model = loracuda.inject(llama(), loracuda.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    randomize_adapters(model, scale_b=0.05)
    accelerate.Accelerator(cpu=True).save_model(model, tmp_path)
    fresh = loracuda.inject(llama(seed=5), loracuda.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    fresh.load_state_dict(safetensors.torch.load_file(tmp_path / "model.safetensors"))
    assert torch.equal(logits(fresh, ids()), logits(model, ids()))
