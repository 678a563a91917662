"""One LoRA training step of a small Qwen3-MoE-style model, loracuda and PEFT (target_parameters) beside
the same model's frozen step, at E = 8 / top-2 and E = 64 / top-8.

    python bench/moe_train_step.py [--quick] [--rounds 9] [--warmup 2] [--threads N] [--experts 8:2,64:8]

The issue's case: hidden 512, expert intermediate 256, 2 layers (every layer sparse), vocabulary 1000,
batch 2 x 256 tokens, float32, on the CPU; r = 16, alpha 32 on q/k/v/o_proj and on the experts'
gate_up_proj and down_proj. Steps:
  frozen    the model without LoRA, every parameter frozen, the embeddings' output requiring grad so that
            backward runs through every layer (transformers' default experts implementation)
  loracuda  loracuda.inject(target_modules=q/k/v/o, target_parameters=experts): forward, cross-entropy,
            backward, AdamW on the LoRA factors
  peft      peft.get_peft_model with the same LoraConfig: the same step
All steps of one expert count are timed in interleaved rounds (round_robin_samples; the order rotates
each round), and the goal line gives the median of the per-round ratios to the frozen step (with the
20th / 80th percentiles). Peak memory: the resident-set growth of one step above its start (VmHWM on
the CPU; a lower bound once the allocator has grown) and, exact, the bytes autograd saves for backward.
Goal: loracuda <= 1.15x the frozen step at both expert counts. --quick: hidden 64, 2 x 32 tokens, a smoke
run of the script only (its numbers mean nothing).
"""

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import loracuda  # noqa: E402
from bench.harness import memory  # noqa: E402
from bench.harness.timer import ratio_quantiles  # noqa: E402

GOAL = 1.15
RANK, ALPHA = 16, 32
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def build(shape: dict, experts: int, top_k: int, seed: int = 0):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    config = Qwen3MoeConfig(
        hidden_size=shape["hidden"], intermediate_size=2 * shape["hidden"], moe_intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"], num_attention_heads=8, num_key_value_heads=4,
        head_dim=shape["hidden"] // 8, num_experts=experts, num_experts_per_tok=top_k, vocab_size=shape["vocab"],
        max_position_embeddings=shape["tokens"] + 1, norm_topk_prob=True,
    )
    return Qwen3MoeForCausalLM(config).train()


def make_step(model, ids, trainable: bool):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3) if trainable else None

    def step():
        logits = model(ids[:, :-1]).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if optimizer is not None:
            optimizer.step()
        return loss.detach()

    return step


def steps_for(shape: dict, experts: int, top_k: int, ids) -> dict:
    import peft

    frozen = build(shape, experts, top_k)
    frozen.requires_grad_(False)
    frozen.enable_input_require_grads()  # backward through every layer, no parameter gradient
    ours = build(shape, experts, top_k)
    loracuda.inject(ours, loracuda.LoraConfig(r=RANK, alpha=ALPHA, target_modules=ATTENTION, target_parameters=EXPERTS))
    theirs = peft.get_peft_model(
        build(shape, experts, top_k),
        peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=ATTENTION, target_parameters=EXPERTS),
    )
    return {
        "frozen": make_step(frozen, ids, trainable=False),
        "loracuda": make_step(ours, ids, trainable=True),
        "peft": make_step(theirs, ids, trainable=True),
    }


def saved_bytes(step) -> int:
    """Bytes of the distinct storages autograd saves during one step (parameters included once)."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(seen.values())


def rotated_samples(fns: dict, rounds: int, warmup: int) -> dict:
    """round_robin_samples with the order rotated each round (load from elsewhere falls on all alike)."""
    import time

    for fn in fns.values():
        for _ in range(warmup):
            fn()
    names = list(fns)
    samples = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names):] + names[: r % len(names)]:
            t0 = time.perf_counter()
            fns[n]()
            samples[n].append(time.perf_counter() - t0)
    return samples


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks that the script runs")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    parser.add_argument("--experts", default="8:2,64:8", help="E:top_k pairs, comma-separated")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = {"hidden": 512, "intermediate": 256, "layers": 2, "vocab": 1000, "batch": 2, "tokens": 256}
    if args.quick:
        shape.update(hidden=64, intermediate=32, batch=2, tokens=32)
    device = torch.device("cpu")
    print(f"shape {shape}, r={RANK}, float32, {torch.get_num_threads()} threads, torch {torch.__version__}")
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, shape["vocab"], (shape["batch"], shape["tokens"] + 1), generator=g)
    ok = True
    for pair in args.experts.split(","):
        experts, top_k = (int(v) for v in pair.split(":"))
        steps = steps_for(shape, experts, top_k, ids)
        samples = rotated_samples(steps, args.rounds, args.warmup)
        peaks = {n: memory.peak_extra_bytes(fn, device) for n, fn in steps.items()}
        saved = {n: saved_bytes(fn) for n, fn in steps.items()}
        print(f"\nE={experts}, top-{top_k}")
        print(f"{'step':<9} {'median ms':>10} {'x frozen (p20-p80)':>22} {'peak MB':>8} {'saved MB':>9}")
        for n in steps:
            med = statistics.median(samples[n])
            ratio, p20, p80 = ratio_quantiles(samples, n, "frozen")
            peak = f"{peaks[n] / 2**20:8.1f}" if peaks[n] is not None else "       -"
            print(f"{n:<9} {med * 1e3:10.1f} {ratio:8.3f} ({p20:.3f}-{p80:.3f}) {peak} {saved[n] / 2**20:9.1f}")
        ratio = ratio_quantiles(samples, "loracuda", "frozen")[0]
        vs_peft = ratio_quantiles(samples, "peft", "loracuda")[0]
        met = ratio <= GOAL
        ok &= met
        print(f"loracuda {ratio:.3f}x the frozen step (goal <= {GOAL}x: {'met' if met else 'missed'}); "
              f"PEFT {ratio_quantiles(samples, 'peft', 'frozen')[0]:.3f}x; loracuda {vs_peft:.2f}x PEFT's speed "
              "(medians of per-round ratios)")
    print("(interleaved rounds on one machine; other load makes them noisy. peak MB: resident-set growth of\n"
          " one step, a lower bound once the allocator has grown; saved MB: storages autograd keeps for backward)")
    return 0 if ok or args.quick else 1


if __name__ == "__main__":
    sys.exit(main())
