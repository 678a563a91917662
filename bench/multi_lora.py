"""Benchmark of the multi-LoRA serving ops: multi_shrink + multi_expand_add_ on a batch of tokens that
each pick an adapter from a stacked pool, beside the single-adapter ops on the same number of tokens.

    python bench/multi_lora.py [--device cuda] [--dtype bfloat16] [--threads N] [--budget 2.0]

Shapes: K = N = 1024, r = 16, a pool of L = 32 adapters; decode (M = 32 tokens, each its own adapter),
a batch of M = 128 tokens whose every 32-token tile mixes adapters, and prefill (32 sequences x 64
tokens, one adapter per sequence, 1 / 8 / 32 distinct adapters).
Providers, timed in turns (one call each per round, so load from elsewhere slows all alike):
  multi      loracuda.ops.multi_shrink + multi_expand_add_ (one call each for the whole batch)
  single     loracuda.ops.shrink + expand_add_ with one adapter for all M tokens: the floor of the
             same GEMM work without any grouping
  loop       shrink + expand_add_ per adapter on its tokens' rows (index_select / index_add_): what a
             caller without the multi ops would run
  reference  loracuda.reference.multi_shrink + multi_expand_add (gathers an [M, r, K] copy)
Prints the median (p20-p80) per provider in microseconds and the ratio of each to multi.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

import torch  # noqa: E402

from loracuda import ops, reference  # noqa: E402
from loracuda.benchmarking.timer import TimerConfig, measure_interleaved  # noqa: E402

K = N = 1024
R = 16
POOL = 32
SEQ_LEN = 64
SEQUENCES = 32

# (name, adapter ids as a function of the pool size)
CASES = [
    ("decode M=32, 32 adapters", lambda: torch.arange(32)),
    # Batched decode past the decode path's 64 tokens: every 32-token tile mixes adapters (the prefill
    # path's mixed-tiles launch of the gather kernel).
    ("batch M=128, 32 adapters mixed", lambda: torch.arange(128) % POOL),
    ("prefill 32x64, 1 adapter", lambda: torch.zeros(SEQUENCES * SEQ_LEN, dtype=torch.int64)),
    ("prefill 32x64, 8 adapters", lambda: (torch.arange(SEQUENCES) % 8).repeat_interleave(SEQ_LEN)),
    ("prefill 32x64, 32 adapters", lambda: torch.arange(SEQUENCES).repeat_interleave(SEQ_LEN)),
]


def providers(ids: torch.Tensor, device: torch.device, dtype: torch.dtype) -> dict:
    g = torch.Generator().manual_seed(0)
    m = ids.numel()
    x = torch.randn(m, K, generator=g).to(device=device, dtype=dtype)
    y = torch.randn(m, N, generator=g).to(device=device, dtype=dtype)
    a_all = (torch.randn(POOL, R, K, generator=g) * K**-0.5).to(device=device, dtype=dtype)
    b_all = (torch.randn(POOL, N, R, generator=g) * R**-0.5).to(device=device, dtype=dtype)
    ranks = torch.full((POOL,), R, dtype=torch.int32, device=device)
    scales = torch.full((POOL,), 0.5, dtype=torch.float32, device=device)
    ids32 = ids.to(device=device, dtype=torch.int32)
    groups = [(int(l), (ids == l).nonzero().flatten().to(device)) for l in ids.unique().tolist() if l >= 0]

    def multi():
        h = ops.multi_shrink(x, a_all, ranks, ids32)
        ops.multi_expand_add_(y, h, b_all, scales, ranks, ids32)

    def single():
        h = ops.shrink(x, a_all[0])
        ops.expand_add_(y, h, b_all[0], 0.5)

    def loop():
        for l, rows in groups:
            h = ops.shrink(x.index_select(0, rows), a_all[l])
            part = y.index_select(0, rows)
            ops.expand_add_(part, h, b_all[l], 0.5)
            y.index_copy_(0, rows, part)

    def ref():
        h = reference.multi_shrink(x, a_all, ranks, ids32)
        y.copy_(reference.multi_expand_add(y, h, b_all, scales, ranks, ids32))

    return {"multi": (multi, None), "single": (single, None), "loop": (loop, None), "reference": (ref, None)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--budget", type=float, default=2.0, help="seconds of timed calls per case")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    config = TimerConfig(warmup=3, repeats=200, min_repeats=10, budget_s=args.budget)
    print(f"multi-LoRA ops: K = N = {K}, r = {R}, pool L = {POOL}, {args.dtype}, {device}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    for name, make_ids in CASES:
        timings, errors = measure_interleaved(providers(make_ids(), device, dtype), device, config)
        base = timings["multi"].median_s if "multi" in timings else None
        cells = []
        for provider, timing in timings.items():
            ratio = f" = {timing.median_s / base:.2f}x" if base else ""
            cells.append(f"{provider} {timing.median_s * 1e6:.0f} us ({timing.p20_s * 1e6:.0f}-"
                         f"{timing.p80_s * 1e6:.0f}){ratio}")
        cells += [f"{provider} failed: {error}" for provider, error in errors.items()]
        print(f"{name:28s} " + "; ".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
