"""The issue's serving target, measured robustly on a noisy machine: one forward of loracuda's built-in
Llama (hidden 1024, intermediate 2816, 4 layers, fp32, CPU) over 32 sequences x 64 tokens, rank-16
adapters on every linear layer but the head, with 1, 8 and 32 distinct adapters in the batch
(sequence b uses adapter b mod n): loracuda's AdapterPool and PEFT's mixed batch (adapter_names)
beside the base model alone. The providers are timed in turns (one forward each per round), the ratio
to the base model is taken within each round, and the median and 20th/80th percentiles of those
per-round ratios are printed. Goal: pool / base <= 1.08 at 8 adapters and <= 1.10 at 32.

The same models and adapters as `loracuda bench --suite serving` (loracuda/benchmarking/serving_suite.py).

    python bench/serving.py [--quick] [--rounds N] [--threads T] [--adapters 1,8,32]

A first run, on a shared 2-core machine under heavy load from other builds (load average 5; the
per-round ratios spread by +-20%, so these are indications, not results), commit 7b926b0 kernels,
`--threads 1 --rounds 5`: pool / base 1.071 (1 adapter), 1.087 (8), 1.088 (32); PEFT / base 1.343,
1.197, 1.278. A quiet-machine run replaces these.
"""

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

import torch  # noqa: E402

from loracuda.benchmarking.serving_suite import SERVING_TARGETS, serving_benches, serving_shape  # noqa: E402
from loracuda.benchmarking.suites import SuiteContext  # noqa: E402
from loracuda.benchmarking.timer import ratio_quantiles, round_robin_samples  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the suite's --quick shape (hidden 256, 2 layers)")
    parser.add_argument("--rounds", type=int, default=15, help="timed rounds per adapter count (default 15)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    parser.add_argument("--adapters", default=None, help="comma-separated adapter counts (default: the suite's)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ctx = SuiteContext(torch.device("cpu"), torch.float32, quick=args.quick)
    shape = serving_shape(ctx)
    counts = [int(c) for c in args.adapters.split(",")] if args.adapters else shape["adapters"]
    print(
        f"threads {args.threads}, {args.rounds} rounds; hidden {shape['hidden']}, inter {shape['inter']}, "
        f"{shape['layers']} layers, {shape['seqs']} x {shape['tokens']} tokens, r = 16, fp32"
    )
    for n in counts:
        benches = serving_benches(ctx, shape, n)
        times = round_robin_samples({name: bench.fn for name, bench in benches.items()}, args.rounds)
        line = f"{n:3d} adapters: base {statistics.median(times['base']) * 1e3:8.1f} ms"
        for name in ("loracuda", "peft"):
            if name in times:
                med, p20, p80 = ratio_quantiles(times, name, "base")
                line += f" | {name} / base {med:.3f} (p20 {p20:.3f}, p80 {p80:.3f})"
        target = SERVING_TARGETS.get(n)
        print(line + (f"; target <= {target}" if target else ""))
        del benches


if __name__ == "__main__":
    main()
