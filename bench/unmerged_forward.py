"""Unmerged LoRA forward against the merged (base-only) forward, with PEFT's unmerged forward beside it.

Model: a Llama config with hidden 2048, intermediate 5632, 2 layers, random weights, float32; rank 16
on every linear layer but the output head; a batch of 4 x 256 tokens; inference (no_grad). The
vocabulary is kept small (default 256) so the unadapted output head does not dilute the comparison;
--vocab changes it. Prints the median and 20th/80th percentiles (seconds) and the ratios.

    python bench/unmerged_forward.py [--reps 5] [--vocab 256] [--threads N]
"""

import argparse
import copy
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from bench.model_setup import randomize_lora_b  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--no-peft", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import LlamaConfig, LlamaForCausalLM

    import loracuda

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=2,
        num_attention_heads=16,
        num_key_value_heads=16,
        vocab_size=args.vocab,
        max_position_embeddings=max(512, args.tokens),
    )
    base = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, args.vocab, (args.batch, args.tokens))

    ours = copy.deepcopy(base)
    loracuda.inject(ours, loracuda.LoraConfig(r=16, alpha=32))
    randomize_lora_b(ours)

    def run(model):
        def f():
            with torch.no_grad():
                model(ids)

        return f

    merged = copy.deepcopy(ours)
    loracuda.merge(merged)
    providers = {"loracuda unmerged": ours, "loracuda merged (base only)": merged}
    if not args.no_peft:
        import peft

        pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")).eval()
        randomize_lora_b(pm)
        providers["peft unmerged"] = pm
    providers["plain base model"] = base
    # Round robin (one forward of each provider per round, the order rotating), so that a drift in the
    # machine's load affects every provider alike.
    times = {name: [] for name in providers}
    names = list(providers)
    for name in names:
        run(providers[name])()  # warm-up
    for i in range(args.reps):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            start = time.perf_counter()
            run(providers[name])()
            times[name].append(time.perf_counter() - start)
    results = {}
    for name, ts in times.items():
        ts.sort()
        q = statistics.quantiles(ts, n=5) if len(ts) >= 2 else [ts[0]] * 4
        results[name] = (statistics.median(ts), q[0], q[3], ts[0])

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, hidden {args.hidden}, intermediate "
          f"{args.intermediate}, 2 layers, r=16 all linear, fp32, batch {args.batch}x{args.tokens}, vocab {args.vocab}")
    for name, (med, p20, p80, best) in results.items():
        print(f"  {name:30s} median {med * 1e3:9.1f} ms   p20 {p20 * 1e3:9.1f}   p80 {p80 * 1e3:9.1f}   min {best * 1e3:9.1f}")
    # Ratios of medians, and of minima (the least disturbed run of each, on a shared machine).
    for i, label in ((0, "median"), (3, "min")):
        merged = results["loracuda merged (base only)"][i]
        line = f"  [{label}] loracuda unmerged / merged: {results['loracuda unmerged'][i] / merged:.3f} (target <= 1.05)"
        if "peft unmerged" in results:
            line += f";  peft unmerged / merged: {results['peft unmerged'][i] / merged:.3f}"
            line += f";  peft / loracuda unmerged: {results['peft unmerged'][i] / results['loracuda unmerged'][i]:.3f}"
        print(line)


if __name__ == "__main__":
    main()
