"""Benchmark of the grouped LoRA op (mixture-of-experts experts): one training step's forward + backward of
loracuda.grouped_lora_linear beside a per-expert PyTorch loop doing the same work.

    python bench/grouped.py [--device cuda] [--dtype bfloat16] [--threads N] [--budget 2.0] [--sorted]

Shape: M = 512 tokens x top-8 = 4096 routed rows over G = 64 experts, K = N = 512, r = 16, frozen expert
weights [G, N, K], float32 LoRA factors in PEFT's target_parameters layout (views of A_flat [r*G, K] and
B_flat [N, r*G]); rows in routing order (unsorted) unless --sorted.
Providers, timed in turns (one call each per round, so load from elsewhere slows all alike):
  grouped    loracuda.grouped_lora_linear forward + backward (gradients for x, A_flat, B_flat)
  loop       per expert: index_select of its rows, x_e @ W_e^T + scale * (x_e @ A_e^T) @ B_e^T; the results
             concatenated and put back in row order by one index_copy; autograd backward (what a
             per-expert implementation without grouped ops runs)
  base_loop  the same loop without the LoRA term (x and nothing else requires grad): the frozen base cost
Prints the median (p20-p80) per provider in milliseconds and each provider's ratio to grouped.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

import torch  # noqa: E402

import loracuda  # noqa: E402
from loracuda import ops  # noqa: E402
from bench.harness.timer import TimerConfig, measure_interleaved  # noqa: E402

TOKENS, TOP_K, G, K, N, R = 512, 8, 64, 512, 512, 16
SCALE = 2.0


def providers(device: torch.device, dtype: torch.dtype, sort_rows: bool) -> dict:
    g = torch.Generator().manual_seed(0)
    m = TOKENS * TOP_K
    ids = torch.stack([torch.randperm(G, generator=g)[:TOP_K] for _ in range(TOKENS)]).flatten()
    if sort_rows:
        ids = ids.sort().values
    ids = ids.to(device)
    x0 = torch.randn(m, K, generator=g).to(device=device, dtype=dtype)
    dy = torch.randn(m, N, generator=g).to(device=device, dtype=dtype)
    w = (torch.randn(G, N, K, generator=g) * K**-0.5).to(device=device, dtype=dtype)
    a_flat = (torch.randn(R * G, K, generator=g) * K**-0.5).to(device).requires_grad_(True)
    b_flat = (torch.randn(N, R * G, generator=g) * 0.1).to(device).requires_grad_(True)
    rows = [(e, (ids == e).nonzero().flatten()) for e in range(G)]
    rows = [(e, r) for e, r in rows if r.numel() > 0]
    order = torch.cat([r for _, r in rows])  # the rows expert by expert

    def grouped():
        x = x0.detach().requires_grad_(True)
        la, lb = ops.grouped_factor_views(a_flat, b_flat, G)
        y = loracuda.grouped_lora_linear(x, w, la, lb, ids, SCALE)
        y.backward(dy)
        a_flat.grad = b_flat.grad = None

    def loop(with_lora: bool = True):
        def run():
            x = x0.detach().requires_grad_(True)
            la, lb = ops.grouped_factor_views(a_flat, b_flat, G)
            outs = []
            for e, r in rows:
                xe = x.index_select(0, r)
                ye = xe @ w[e].t()
                if with_lora:
                    ye = ye + SCALE * ((xe.to(la.dtype) @ la[e].t()) @ lb[e].t()).to(dtype)
                outs.append(ye)
            y = torch.zeros(m, N, device=device, dtype=dtype).index_copy(0, order, torch.cat(outs))
            y.backward(dy)
            a_flat.grad = b_flat.grad = None

        return run

    return {"grouped": (grouped, None), "loop": (loop(True), None), "base_loop": (loop(False), None)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--budget", type=float, default=2.0, help="seconds of timed calls")
    parser.add_argument("--sorted", action="store_true", help="rows sorted by expert")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    config = TimerConfig(warmup=2, repeats=50, min_repeats=3, budget_s=args.budget)
    print(f"grouped LoRA fwd+bwd: {TOKENS} tokens x top-{TOP_K} = {TOKENS * TOP_K} rows, G = {G}, K = {K}, "
          f"N = {N}, r = {R}, {args.dtype}, rows {'sorted' if args.sorted else 'unsorted'}, {device}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    timings, errors = measure_interleaved(providers(device, dtype, args.sorted), device, config)
    base = timings["grouped"].median_s if "grouped" in timings else None
    for provider, timing in timings.items():
        ratio = f" = {timing.median_s / base:.2f}x grouped" if base else ""
        print(f"  {provider:10s} {timing.median_s * 1e3:8.2f} ms ({timing.p20_s * 1e3:.2f}-{timing.p80_s * 1e3:.2f})"
              f"{ratio}")
    for provider, error in errors.items():
        print(f"  {provider:10s} failed: {error}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
