"""The `train` suite: one LoRA training step (forward, backward, AdamW on the LoRA factors) of a
Llama-style model, loracuda beside PEFT and the plain-PyTorch reference layer; "peft+loracuda" is
PEFT's model with its LoRA layers run by loracuda (loracuda.apply_to_peft), the route of PEFT, TRL and
Trainer users.

The model is loracuda's built-in byte-level Llama (loracuda.tiny_llama; its linear layers are named as
in Llama), so the suite needs no download and no transformers. Full size: hidden 1024, intermediate
2816, 4 layers, r = 16 on every linear layer but the head, batch 4 x 256 tokens; --quick: hidden 256,
2 layers, 2 x 128 tokens. Bytes and FLOPs count the frozen base GEMMs (forward and input gradient).
"""

import copy

import torch
from torch.nn import functional as F

from loracuda import tiny_llama
from loracuda.config import LoraConfig
from loracuda.inject import inject
from loracuda.layers import use_impl

from bench.harness import providers as P
from bench.harness.cases import Case, SuiteContext, element_size, register_suite

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA = 16, 32


def train_shape(ctx: SuiteContext) -> dict:
    if ctx.tiny:
        return {"hidden": 64, "inter": 176, "layers": 1, "heads": 2, "batch": 2, "tokens": 16}
    if ctx.quick:
        return {"hidden": 256, "inter": 704, "layers": 2, "heads": 4, "batch": 2, "tokens": 128}
    return {"hidden": 1024, "inter": 2816, "layers": 4, "heads": 16, "batch": 4, "tokens": 256}


def build_models(s: dict, p: float, device: torch.device, dtype: torch.dtype, with_peft: bool,
                 with_reference: bool = False) -> tuple[dict, torch.Tensor]:
    """provider -> model in training mode (each its own copy of one base model, seed 0), and the token
    batch ids [batch, tokens + 1] (seed 3). The adapters start alike in every provider: A from
    torch.manual_seed(1) before injection, B zero."""
    config = tiny_llama.TinyLlamaConfig(
        hidden_size=s["hidden"], intermediate_size=s["inter"], num_layers=s["layers"], num_heads=s["heads"],
        max_positions=s["tokens"] + 1,
    )
    base = tiny_llama.build(0, config, device=device, dtype=dtype)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, config.vocab_size, (s["batch"], s["tokens"] + 1), generator=g).to(device)
    models = {}
    torch.manual_seed(1)
    models["loracuda"] = inject(copy.deepcopy(base), LoraConfig(r=RANK, alpha=ALPHA, dropout=p, target_modules=TARGETS))
    if with_peft and P.peft_available():
        import peft

        theirs = peft.get_peft_model(
            copy.deepcopy(base), peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=p, target_modules=TARGETS)
        )
        _copy_factors(models["loracuda"], theirs)
        models["peft"] = theirs
        # The PEFT route: the same PeftModel with its LoRA layers computed by loracuda (apply_to_peft).
        from loracuda.integrations.peft import apply_to_peft

        models["peft+loracuda"] = copy.deepcopy(theirs)
        apply_to_peft(models["peft+loracuda"])
    if with_reference:
        models["reference"] = copy.deepcopy(models["loracuda"])
    for model in models.values():
        model.train()
    return models, ids


@torch.no_grad()
def _copy_factors(ours: torch.nn.Module, theirs: torch.nn.Module) -> None:
    """PEFT's factors := loracuda's (parameter names <path>.lora_A.default vs ...lora_A.default.weight)."""
    mine = dict(ours.named_parameters())
    for name, param in theirs.named_parameters():
        if ".lora_A." in name or ".lora_B." in name:
            key = name.removeprefix("base_model.model.").removesuffix(".weight")
            param.copy_(mine[key])


def make_step(model: torch.nn.Module, ids: torch.Tensor, impl: str = "kernels"):
    """One training step (forward, cross-entropy, backward, AdamW on the trainable parameters; lr 1e-3)
    as a function returning the loss (a 0-dim tensor); ``impl`` is the LoRA layers' implementation
    while the step runs ("reference": the plain-PyTorch formula, see loracuda.layers.use_impl)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)

    def step() -> torch.Tensor:
        with use_impl(model, impl):
            logits = model(ids[:, :-1])
            loss = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return loss.detach()

    return step


def saved_activation_bytes(model: torch.nn.Module, ids: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd saves for backward during one forward and loss, not
    counting parameters: the activation memory a step holds at its peak (exact, unlike the resident-set
    growth the CPU timer can see once the allocator has grown)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(ids[:, :-1])
        F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
    return sum(seen.values())


def loss_curves(s: dict, p: float, device: torch.device, dtype: torch.dtype, steps: int = 20) -> dict:
    """provider -> the losses of ``steps`` training steps from the same models and seed (fresh models)."""
    models, ids = build_models(s, p, device, dtype, with_peft=True)
    curves = {}
    for name, model in models.items():
        step = make_step(model, ids)
        torch.manual_seed(1234)
        curves[name] = [float(step()) for _ in range(steps)]
    return curves


def compare_curves(curves: dict, p: float) -> tuple[bool, str]:
    """Whether loracuda's loss curve agrees with PEFT's, and a line that says how. At dropout 0 the
    two compute the same function: the curves must agree to float32 rounding amplified by 20 Adam steps
    (relative 1e-3). With dropout the masks differ (loracuda hashes a seed, PEFT draws bernoulli), so
    the curves agree only in law: both must fall, and end within 5% of each other."""
    ours, theirs = curves["loracuda"], curves["peft"]
    rel = max(abs(a - b) / abs(b) for a, b in zip(ours, theirs))
    if p == 0.0:
        ok = rel <= 1e-3
        rule = "max relative difference <= 1e-3"
    else:
        ok = ours[-1] < ours[0] and theirs[-1] < theirs[0] and abs(ours[-1] - theirs[-1]) <= 0.05 * theirs[-1]
        rule = "both fall, final losses within 5% (masks differ)"
    line = (f"loss curves over {len(ours)} steps, p={p}: loracuda {ours[0]:.4f} -> {ours[-1]:.4f}, "
            f"PEFT {theirs[0]:.4f} -> {theirs[-1]:.4f}, max relative difference {rel:.2e} "
            f"[{rule}: {'agree' if ok else 'DISAGREE'}]")
    return ok, line


# The project's goal: loracuda's step at least 1.15x (dropout 0.1) and 1.05x (dropout 0) PEFT's tokens/s,
# i.e. at most 1 / 1.15 and 1 / 1.05 of PEFT's step time.
TARGETS_VS_PEFT = {0.0: 1.0 / 1.05, 0.1: 1.0 / 1.15}


@register_suite("train", "a LoRA training step (forward, backward, AdamW) of a Llama-style model")
def train_suite(ctx: SuiteContext) -> list:
    s = train_shape(ctx)
    dev, dtype = ctx.device, ctx.dtype
    h, inter, n_layers = s["hidden"], s["inter"], s["layers"]
    tokens = s["batch"] * s["tokens"]
    linear_params = n_layers * (4 * h * h + 3 * h * inter)
    flops = 4.0 * linear_params * tokens  # forward + input gradient of the frozen base GEMMs
    bytes_ = 2.0 * linear_params * element_size(dtype)  # the base weights, read in forward and backward
    with_peft = ctx.with_peft and P.peft_available()
    cases = []
    for p in (0.0, 0.1):
        with_reference = not (ctx.quick and p > 0.0 and not ctx.tiny)

        def make(p=p, with_reference=with_reference):
            models, ids = build_models(s, p, dev, dtype, with_peft, with_reference)
            benches = {}
            for name, model in models.items():
                step = make_step(model, ids, "reference" if name == "reference" else "kernels")
                benches[name] = P.Bench(step)
            return benches

        shape = {"hidden": h, "inter": inter, "layers": n_layers, "tokens": tokens, "r": RANK, "p": p}
        case = Case("train", "step", shape, dtype, bytes_, flops, make, measure_memory=True,
                    baseline="peft" if with_peft else None, target=TARGETS_VS_PEFT[p] if with_peft else None)
        case.notes.append(f"{tokens} tokens per step: tokens/s = {tokens} / time; 'x base' is the ratio to PEFT's step")
        case.notes.append("loss curves: python bench/train_step.py checks loracuda's against PEFT's over 20 steps")
        cases.append(case)
    return cases
