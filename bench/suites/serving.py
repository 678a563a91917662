"""The `serving` suite: one forward of a Llama-style model over a batch whose sequences use different
LoRA adapters, loracuda's AdapterPool beside the base model alone and PEFT's mixed batch
(``adapter_names``), as ratios to the base model.

The model is loracuda's built-in byte-level Llama (loracuda.tiny_llama), adapters of rank 16 on every
linear layer but the head, written as PEFT-format files and loaded the way users load them. Full
size: hidden 1024, intermediate 2816, 4 layers, 32 sequences x 64 tokens, with 1, 8 and 32 distinct
adapters (sequence b uses adapter b mod n); --quick: hidden 256, 2 layers, 8 x 32 tokens, 1 and 8
adapters. Bytes and FLOPs count the base GEMMs (weights read once) plus the adapters' rank-16 GEMMs.
"""

import copy
import os
import tempfile

import torch

from loracuda import tiny_llama
from loracuda.config import LoraConfig
from loracuda.inject import inject, lora_layers
from loracuda.peft_io import save_adapter
from loracuda.serving import AdapterPool

from bench.harness import providers as P
from bench.harness.cases import Case, SuiteContext, element_size, register_suite
from bench.suites.train import TARGETS

RANK, ALPHA = 16, 32
# The project's goals for the pool's forward time over the base model's, by number of adapters.
SERVING_TARGETS = {8: 1.08, 32: 1.10}


def serving_shape(ctx: SuiteContext) -> dict:
    if ctx.tiny:
        return {"hidden": 64, "inter": 176, "layers": 1, "heads": 2, "seqs": 4, "tokens": 8, "adapters": [1, 4]}
    if ctx.quick:
        return {"hidden": 256, "inter": 704, "layers": 2, "heads": 4, "seqs": 8, "tokens": 32, "adapters": [1, 8]}
    return {"hidden": 1024, "inter": 2816, "layers": 4, "heads": 16, "seqs": 32, "tokens": 64, "adapters": [1, 8, 32]}


def write_adapters(base: torch.nn.Module, count: int, folder: str) -> list[str]:
    """``count`` PEFT-format adapter folders of rank RANK on every linear layer but the head, with
    random factors (A ~ N(0, 1 / K), B ~ N(0, 1e-4 / r): each adds about 1e-2 to a layer's output).
    The targets are named (not "all-linear"): PEFT knows the head of transformers models only, and
    would adapt this model's head too."""
    model = inject(copy.deepcopy(base), LoraConfig(r=RANK, alpha=ALPHA, target_modules=TARGETS))
    paths = []
    for i in range(count):
        g = torch.Generator().manual_seed(1000 + i)
        with torch.no_grad():
            for _, layer in lora_layers(model):
                a, b = layer.lora_A["default"], layer.lora_B["default"]
                a.copy_(torch.randn(a.shape, generator=g) / a.shape[1] ** 0.5)
                b.copy_(torch.randn(b.shape, generator=g) * 1e-2 / RANK**0.5)
        path = os.path.join(folder, f"adapter{i}")
        save_adapter(model, path)
        paths.append(path)
    return paths


def _forward_bench(model, ids, **kwargs) -> P.Bench:
    def forward() -> None:
        with torch.no_grad():
            model(ids, **kwargs)

    return P.Bench(forward)


def _pool_bench(pool: AdapterPool, ids, adapter_ids) -> P.Bench:
    def forward() -> None:
        with torch.no_grad(), pool.batch(adapter_ids):
            pool.model(ids)

    return P.Bench(forward)


def serving_benches(ctx: SuiteContext, s: dict, n: int) -> dict:
    """provider -> Bench for ``n`` distinct adapters: base, loracuda (the pool), peft (when installed)."""
    dev, dtype = ctx.device, ctx.dtype
    config = tiny_llama.TinyLlamaConfig(
        hidden_size=s["hidden"], intermediate_size=s["inter"], num_layers=s["layers"], num_heads=s["heads"],
        max_positions=s["tokens"],
    )
    base = tiny_llama.build(0, config, device=dev, dtype=dtype).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, config.vocab_size, (s["seqs"], s["tokens"]), generator=g).to(dev)
    which = [b % n for b in range(s["seqs"])]
    benches = {"base": _forward_bench(base, ids)}
    with tempfile.TemporaryDirectory() as folder:
        paths = write_adapters(base, n, folder)
        pool = AdapterPool(copy.deepcopy(base), max_adapters=n, max_rank=RANK)
        slots = [pool.load(p) for p in paths]
        adapter_ids = torch.tensor([slots[i] for i in which], device=dev)
        benches["loracuda"] = _pool_bench(pool, ids, adapter_ids)
        if ctx.with_peft and P.peft_available():
            import peft

            theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), paths[0], adapter_name="a0")
            for i, p in enumerate(paths[1:], start=1):
                theirs.load_adapter(p, adapter_name=f"a{i}")
            theirs.eval()
            benches["peft"] = _forward_bench(theirs, ids, adapter_names=[f"a{i}" for i in which])
    return benches


@register_suite("serving", "a mixed-adapter batch forward of a Llama-style model: AdapterPool, PEFT mixed batch, base")
def serving_suite(ctx: SuiteContext) -> list:
    s = serving_shape(ctx)
    h, inter, n_layers = s["hidden"], s["inter"], s["layers"]
    tokens = s["seqs"] * s["tokens"]
    linear_params = n_layers * (4 * h * h + 3 * h * inter)
    adapter_params = n_layers * RANK * (4 * (h + h) + 2 * (h + inter) + (inter + h))  # A and B of every layer
    es = element_size(ctx.dtype)
    factor_es = max(es, 4)  # the pool keeps float32 factors for bfloat16 / float16 models
    base_flops = 2.0 * linear_params * tokens
    base_bytes = float(linear_params * es)  # the base weights, read once per forward
    cases = []
    for n in s["adapters"]:
        shape = {"hidden": h, "inter": inter, "layers": n_layers, "seqs": s["seqs"], "tokens": s["tokens"], "r": RANK,
                 "adapters": n}

        def make(n=n):
            benches = serving_benches(ctx, s, n)
            benches["base"].bytes, benches["base"].flops = base_bytes, base_flops
            return benches

        flops = base_flops + 2.0 * adapter_params * tokens
        bytes_ = base_bytes + adapter_params * n * factor_es  # + every adapter's factors, read once
        case = Case("serving", "forward", shape, ctx.dtype, bytes_, flops, make, baseline="base",
                    target=SERVING_TARGETS.get(n))
        case.notes.append(f"{tokens} tokens per forward; sequence b uses adapter b mod {n}")
        cases.append(case)
    return cases
