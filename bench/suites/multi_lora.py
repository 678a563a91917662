"""The `multi_lora` suite: the serving ops multi_shrink + multi_expand_add_ on a batch of tokens that
each pick an adapter from a stacked pool, beside what a caller could run instead.

Shapes: K = N = 1024, r = 16, a pool of L = 32 adapters; decode (M = 32 tokens, each its own adapter),
a batch of M = 128 tokens whose every 32-token tile mixes adapters (past the decode path's 64 tokens:
the prefill path's mixed-tile launch), and prefill (32 sequences x 64 tokens, one adapter per sequence,
1 / 8 / 32 distinct adapters); tiny (tests): K = N = 96, r = 4, L = 4, M = 4, 128 and 4 x 8.
Providers:
  loracuda   multi_shrink + multi_expand_add_ (one call each for the whole batch)
  single     shrink + expand_add_ with one adapter for all M tokens: the same GEMM work without any
             grouping, the floor the multi ops are measured against (the case's baseline)
  loop       shrink + expand_add_ per adapter on its tokens' rows (index_select / index_add_): what a
             caller without the multi ops would run
  reference  loracuda.reference.multi_shrink + multi_expand_add (gathers an [M, r, K] copy)
"""

import torch

from loracuda import ops, reference

from bench.harness.cases import Case, SuiteContext, element_size, register_suite
from bench.harness.providers import Bench


def multi_lora_shape(ctx: SuiteContext) -> dict:
    if ctx.tiny:
        return {"K": 96, "N": 96, "r": 4, "pool": 4, "seqs": 4, "tokens": 8}
    return {"K": 1024, "N": 1024, "r": 16, "pool": 32, "seqs": 32, "tokens": 64}


def batches(s: dict, quick: bool) -> list[tuple[str, int, torch.Tensor]]:
    """(mode, distinct adapters, adapter id per token [M] int64)."""
    seqs, tokens, pool = s["seqs"], s["tokens"], s["pool"]
    out = [("decode", min(32, pool), torch.arange(min(32, pool))), ("mixed", pool, torch.arange(128) % pool)]
    for n in ([1, pool] if quick else [1, min(8, pool), pool]):
        out.append(("prefill", n, (torch.arange(seqs) % n).repeat_interleave(tokens)))
    return out


def multi_lora_benches(s: dict, ids: torch.Tensor, device: torch.device, dtype: torch.dtype) -> dict:
    k, n, r, pool = s["K"], s["N"], s["r"], s["pool"]
    g = torch.Generator().manual_seed(0)
    m = ids.numel()
    x = torch.randn(m, k, generator=g).to(device=device, dtype=dtype)
    y = torch.randn(m, n, generator=g).to(device=device, dtype=dtype)
    a_all = (torch.randn(pool, r, k, generator=g) * k**-0.5).to(device=device, dtype=dtype)
    b_all = (torch.randn(pool, n, r, generator=g) * 1e-2 * r**-0.5).to(device=device, dtype=dtype)
    ranks = torch.full((pool,), r, dtype=torch.int32, device=device)
    scales = torch.full((pool,), 0.5, dtype=torch.float32, device=device)
    ids32 = ids.to(device=device, dtype=torch.int32)
    groups = [(int(i), (ids == i).nonzero().flatten().to(device)) for i in ids.unique().tolist() if i >= 0]

    def multi():
        h = ops.multi_shrink(x, a_all, ranks, ids32)
        ops.multi_expand_add_(y, h, b_all, scales, ranks, ids32)

    def single():
        h = ops.shrink(x, a_all[0])
        ops.expand_add_(y, h, b_all[0], 0.5)

    def loop():
        for i, rows in groups:
            h = ops.shrink(x.index_select(0, rows), a_all[i])
            part = y.index_select(0, rows)
            ops.expand_add_(part, h, b_all[i], 0.5)
            y.index_copy_(0, rows, part)

    def ref():
        h = reference.multi_shrink(x, a_all, ranks, ids32)
        reference.multi_expand_add(y, h, b_all, scales, ranks, ids32)

    return {"loracuda": Bench(multi), "single": Bench(single), "loop": Bench(loop), "reference": Bench(ref)}


@register_suite("multi_lora", "the serving ops multi_shrink + multi_expand_add_ over a mixed batch (decode, prefill)")
def multi_lora_suite(ctx: SuiteContext) -> list:
    s = multi_lora_shape(ctx)
    k, n, r = s["K"], s["N"], s["r"]
    es = element_size(ctx.dtype)
    cases = []
    for mode, distinct, ids in batches(s, ctx.quick):
        m = ids.numel()
        # x, y read and y written once; each distinct adapter's factors read once; h [M, r] float32 twice.
        bytes_ = (m * k + 2 * m * n) * es + distinct * r * (k + n) * es + 2 * 4 * m * r
        flops = 2.0 * m * r * (k + n)
        shape = {"mode": mode, "M": m, "K": k, "N": n, "r": r, "adapters": distinct}
        case = Case("multi_lora", "shrink+expand", shape, ctx.dtype, bytes_, flops,
                    lambda ids=ids: multi_lora_benches(s, ids, ctx.device, ctx.dtype), baseline="single")
        cases.append(case)
    return cases
