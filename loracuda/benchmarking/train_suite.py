"""The `train` suite: one LoRA training step (forward, backward, AdamW on the LoRA factors) of a
Llama-style model, loracuda beside PEFT and the plain-PyTorch reference layer.

The model is loracuda's built-in byte-level Llama (loracuda.tiny_llama; its linear layers are named as
in Llama), so the suite needs no download and no transformers. Full size: hidden 1024, intermediate
2816, 4 layers, r = 16 on every linear layer but the head, batch 4 x 256 tokens; --quick: hidden 256,
2 layers, 2 x 128 tokens. Bytes and FLOPs count the frozen base GEMMs (forward and input gradient).
"""

import contextlib
import copy

import torch
from torch.nn import functional as F

from .. import tiny_llama
from ..config import LoraConfig
from ..inject import inject
from . import providers as P
from .suites import Case, SuiteContext, element_size, register_suite

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA = 16, 32


def train_shape(ctx: SuiteContext) -> dict:
    if ctx.tiny:
        return {"hidden": 64, "inter": 176, "layers": 1, "heads": 2, "batch": 2, "tokens": 16}
    if ctx.quick:
        return {"hidden": 256, "inter": 704, "layers": 2, "heads": 4, "batch": 2, "tokens": 128}
    return {"hidden": 1024, "inter": 2816, "layers": 4, "heads": 16, "batch": 4, "tokens": 256}


def _step_bench(model, ids, call=None) -> P.Bench:
    """One training step; ``call`` replaces the layers' lora_linear while the step runs (reference)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)

    def step() -> None:
        with P.lora_layers_calling(call) if call is not None else contextlib.nullcontext():
            logits = model(ids[:, :-1])
            loss = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    return P.Bench(step)


@register_suite("train", "a LoRA training step (forward, backward, AdamW) of a Llama-style model")
def train_suite(ctx: SuiteContext) -> list:
    s = train_shape(ctx)
    dev, dtype = ctx.device, ctx.dtype
    h, inter, n_layers = s["hidden"], s["inter"], s["layers"]
    tokens = s["batch"] * s["tokens"]
    linear_params = n_layers * (4 * h * h + 3 * h * inter)
    flops = 4.0 * linear_params * tokens  # forward + input gradient of the frozen base GEMMs
    bytes_ = 2.0 * linear_params * element_size(dtype)  # the base weights, read in forward and backward
    cases = []
    for p in (0.0, 0.1):

        def make(p=p):
            config = tiny_llama.TinyLlamaConfig(
                hidden_size=h, intermediate_size=inter, num_layers=n_layers, num_heads=s["heads"],
                max_positions=s["tokens"] + 1,
            )
            base = tiny_llama.build(0, config, device=dev, dtype=dtype)
            g = torch.Generator().manual_seed(3)
            ids = torch.randint(0, config.vocab_size, (s["batch"], s["tokens"] + 1), generator=g).to(dev)
            ours = inject(copy.deepcopy(base), LoraConfig(r=RANK, alpha=ALPHA, dropout=p, target_modules=TARGETS))
            ours.train()
            benches = {"loracuda": _step_bench(ours, ids)}
            if ctx.with_peft and P.peft_available():
                import peft

                theirs = peft.get_peft_model(
                    copy.deepcopy(base),
                    peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=p, target_modules=TARGETS),
                )
                theirs.train()
                benches["peft"] = _step_bench(theirs, ids)
            if not (ctx.quick and p > 0.0 and not ctx.tiny):
                ref = inject(copy.deepcopy(base), LoraConfig(r=RANK, alpha=ALPHA, dropout=p, target_modules=TARGETS))
                ref.train()
                benches["reference"] = _step_bench(ref, ids, P.reference_layer_call)
            return benches

        shape = {"hidden": h, "inter": inter, "layers": n_layers, "tokens": tokens, "r": RANK, "p": p}
        case = Case("train", "step", shape, dtype, bytes_, flops, make)
        case.notes.append(f"{tokens} tokens per step: tokens/s = {tokens} / time")
        cases.append(case)
    return cases
