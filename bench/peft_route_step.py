"""One LoRA training step through the PEFT route: a transformers Llama wrapped by peft.get_peft_model,
run by PEFT's own layers and by loracuda (loracuda.apply_to_peft on the same PeftModel), at dropout 0
and 0.1.

    python bench/peft_route_step.py [--quick] [--rounds 15] [--warmup 2] [--threads N]

Shape: hidden 1024, intermediate 2816, 4 layers, 16 heads, vocabulary 4096, r = 16 (alpha 32) on every
linear layer but the head ("all-linear"), float32, batch 4 x 256 tokens, on the CPU (--quick: hidden 256,
2 layers, 2 x 128 tokens). A step is forward with labels (the model's own cross-entropy), backward and
AdamW on the LoRA factors (lr 1e-3). The two providers start from one PeftModel (seed 0; B random so
that every factor gets gradients) copied before loracuda is applied. All four (provider, dropout) steps
are timed in interleaved rounds (loracuda.benchmarking.timer.round_robin_samples), after the first
step's losses at dropout 0 are checked to agree. Printed: median step time and tokens/s per case, and
loracuda's tokens/s over PEFT's as the median of the per-round ratios with their 20th / 80th percentiles.
"""

import argparse
import copy
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

import torch  # noqa: E402

import loracuda  # noqa: E402
from loracuda.benchmarking.timer import ratio_quantiles, round_robin_samples  # noqa: E402

DROPOUTS = (0.0, 0.1)
RANK, ALPHA = 16, 32


def shape(quick: bool) -> dict:
    if quick:
        return {"hidden": 256, "inter": 704, "layers": 2, "heads": 4, "batch": 2, "tokens": 128}
    return {"hidden": 1024, "inter": 2816, "layers": 4, "heads": 16, "batch": 4, "tokens": 256}


def build(s: dict, dropout: float):
    """(PEFT's PeftModel, the same copied and run on loracuda, token ids [batch, tokens])."""
    import peft
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=s["hidden"], intermediate_size=s["inter"], num_hidden_layers=s["layers"],
                         num_attention_heads=s["heads"], num_key_value_heads=s["heads"], vocab_size=4096,
                         max_position_embeddings=s["tokens"])
    base = LlamaForCausalLM(config)
    theirs = peft.get_peft_model(base, peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=dropout,
                                                       target_modules="all-linear"))
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 1e-3)
    ours = copy.deepcopy(theirs)
    report = loracuda.apply_to_peft(ours)
    assert not report.left_to_peft, str(report)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, config.vocab_size, (s["batch"], s["tokens"]), generator=g)
    return theirs.train(), ours.train(), ids


def make_step(model, ids):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="hidden 256, 2 layers, 2 x 128 tokens")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved timing rounds (one step each)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per case before the rounds")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    s = shape(args.quick)
    tokens = s["batch"] * s["tokens"]
    print(f"shape {s}, r={RANK}, float32, {torch.get_num_threads()} threads, torch {torch.__version__}")
    steps = {}
    for p in DROPOUTS:
        theirs, ours, ids = build(s, p)
        steps[("peft", p)], steps[("loracuda", p)] = make_step(theirs, ids), make_step(ours, ids)
        if p == 0.0:  # the same first step: the same loss (float32 rounding apart)
            a, b = steps[("peft", p)](), steps[("loracuda", p)]()
            if not torch.allclose(a, b, rtol=1e-5, atol=1e-6):
                print(f"first-step losses disagree: PEFT {a.item():.7f}, loracuda {b.item():.7f}")
                return 1
    samples = round_robin_samples({f"{n} p={p}": fn for (n, p), fn in steps.items()}, args.rounds, args.warmup)
    for name, times in samples.items():
        times = sorted(times)
        median = times[len(times) // 2]
        print(f"{name:16s} median {median * 1e3:8.1f} ms  {tokens / median:9.0f} tokens/s")
    for p in DROPOUTS:
        # tokens/s ratio = PEFT's time / loracuda's time, per round
        mid, lo, hi = ratio_quantiles(samples, f"peft p={p}", f"loracuda p={p}")
        print(f"dropout {p}: loracuda tokens/s / PEFT's = {mid:.3f}x (p20 {lo:.3f}, p80 {hi:.3f}) over {args.rounds} rounds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
