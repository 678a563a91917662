"""The layer's forward+backward at few tokens, where fixed per-call costs and single-threaded passes
show: loracuda and PEFT's LoRA layer, each over a frozen nn.Linear's forward+backward, fp32, r = 16.

    python bench/small_batch.py [--threads 2] [--rounds 200]

Shapes (M tokens, K = N): (4, 16) measures the per-call overhead alone (its times are printed in us);
(32, 4096), (128, 1024), (128, 4096) and (512, 1024) are micro-batches of a 1B-7B model's layers. The
three are timed in turns, one call each per round, and the ratio to the base layer is taken within
each round; printed: the median and 20th / 80th percentiles of those ratios. x requires grad, the
gradients are reset before every call (as optimizer.zero_grad() leaves them).
"""

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

import torch  # noqa: E402

from bench.harness import providers as P  # noqa: E402
from bench.harness import timer as T  # noqa: E402

SHAPES = [(4, 16), (32, 4096), (128, 1024), (128, 4096), (512, 1024)]
RANK = 16


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"fp32, r={RANK}, {torch.get_num_threads()} threads, torch {torch.__version__}, {args.rounds} rounds")
    with_peft = P.peft_available()
    for m, kn in SHAPES:
        gen = torch.Generator().manual_seed(0)
        weight = torch.randn(kn, kn, generator=gen) / kn**0.5
        lora_a = torch.randn(RANK, kn, generator=gen) / kn**0.5
        lora_b = torch.randn(kn, RANK, generator=gen) * 0.01
        x = torch.randn(m, kn, generator=gen)
        grad_y = torch.randn(m, kn, generator=gen)
        forwards = P.layer_forwards(weight, lora_a, lora_b, 2.0, 0.0, with_peft, with_reference=False)
        forwards.pop("addmm")
        calls = {name: P.layer_bench(f, params, x, grad_y, "fwd+bwd").fn for name, (f, params) in forwards.items()}
        times = T.round_robin_samples(calls, args.rounds, warmup=10)
        base = statistics.median(times["base"])
        unit, factor = ("us", 1e6) if base < 1e-3 else ("ms", 1e3)
        line = f"M={m:4d} K=N={kn:4d}: base {base * factor:8.3f} {unit}"
        for name in calls:
            if name == "base":
                continue
            med, p20, p80 = T.ratio_quantiles(times, name, "base")
            line += (f" | {name} {statistics.median(times[name]) * factor:8.3f} {unit},"
                     f" x{med:.3f} (p20 {p20:.3f}, p80 {p80:.3f})")
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
