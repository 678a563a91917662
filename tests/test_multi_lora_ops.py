"""The multi-LoRA serving ops (multi_shrink, multi_expand_add_) against loracuda.reference.

Adapters are stacked: lora_a_all [L, S*r_max, K], lora_b_all [L, N, r_max], ranks int32 [L], scales
float32 [L], one adapter id per token (int32 [M], -1 = no adapter). Every case puts garbage (NaN or
3e4) in the rows / columns beyond each adapter's rank and in the columns of h that multi_expand_add_
must not read, so a kernel that reads them fails. Each case checks: values (exactly where the math is
exact: integer-valued inputs and float64; else the tolerance rule of conftest), h exactly 0 for tokens
without an adapter and beyond each rank, y rows of tokens without an adapter bit for bit as before,
the guard buffer around y, no unwritten output element (poisoned allocations), and every read-only
input unchanged. Then: rejected input (each check of csrc/checks.h names its argument and nothing
changes), torch.library.opcheck on both ops, and torch.compile(fullgraph=True) against eager.
"""

from __future__ import annotations

import dataclasses
import zlib

import pytest
import torch

from loracuda import ops, reference

from conftest import (
    assert_guards_intact,
    assert_unchanged,
    check_result,
    poisoned_allocations,
    snapshot,
    to64,
    use_device,
)
from samples import BF16, DTYPE_NAMES, DTYPE_PAIRS, F16, F32, F64, LAYOUTS, _place, bit_pattern, draw_values, guarded

MULTI_OPS = ("multi_shrink", "multi_expand_add_")
ID_PATTERNS = ("none", "random", "segments", "distinct")
GARBAGE = 3.0e4  # finite in every value dtype (fp16's largest is 65504), alternating with NaN


@dataclasses.dataclass(frozen=True)
class MultiCase:
    m: int
    k: int
    n: int
    r_max: int
    adapters: int  # L
    dtype: torch.dtype
    adapter_dtype: torch.dtype
    ids: str  # one of ID_PATTERNS
    offsets: tuple = ()
    layout: str = "contiguous"
    values: str = "random"  # draw_values' meaning: "random" or "integers"

    @property
    def slices(self) -> int:
        return max(len(self.offsets) - 1, 1)

    @property
    def rank_total(self) -> int:
        return self.slices * self.r_max

    @property
    def exact(self) -> bool:
        return self.values == "integers" or self.dtype == F64

    def __str__(self) -> str:
        parts = [f"M{self.m}", f"K{self.k}", f"N{self.n}", f"r{self.r_max}", f"L{self.adapters}"]
        if self.offsets:
            parts.append("S" + "-".join(str(b - a) for a, b in zip(self.offsets[:-1], self.offsets[1:])))
        parts += [f"{DTYPE_NAMES[self.dtype]}.{DTYPE_NAMES[self.adapter_dtype]}", self.ids, self.layout, self.values]
        return "_".join(parts)


# (M, K, N, r_max, L, slice_offsets): M in {1, 3, 127, 1000} (and one M = 0), K and N not multiples of 8,
# r_max in {1, 8, 16, 64}, L in {1, 5, 64}, three of them with S = 3 unequal slices.
SHAPES = (
    (1, 13, 67, 8, 5, ()),
    (3, 250, 13, 1, 64, ()),
    (127, 67, 250, 16, 5, (0, 70, 150, 250)),
    (1000, 13, 67, 64, 64, ()),
    (1000, 250, 13, 16, 1, ()),
    (3, 67, 13, 8, 5, (0, 3, 7, 13)),
    (127, 250, 67, 64, 1, (0, 20, 45, 67)),
    (127, 1, 1, 1, 64, ()),
    (0, 13, 67, 8, 5, ()),
)

# Integer-valued cases: |x|, |a|, |b| <= 1, |y| <= 2, K <= 13 and rank <= 8 per slice, |scale| <= 1, so
# every h (<= 13) and y (<= 2 + 8 * 13) is an integer or half-integer below 128, exact in bfloat16.
INTEGER_SHAPES = (
    (127, 13, 13, 8, 5, ()),
    (3, 7, 9, 2, 64, (0, 2, 5, 9)),
    (1000, 13, 11, 4, 64, ()),
)


def _grid() -> list[MultiCase]:
    cases = []
    for i, (m, k, n, r, adapters, offsets) in enumerate(SHAPES):
        for j, (dtype, adapter_dtype) in enumerate(DTYPE_PAIRS):
            cases.append(MultiCase(m, k, n, r, adapters, dtype, adapter_dtype, ID_PATTERNS[(i + j) % 4], offsets,
                                   LAYOUTS[(i + j) % 3]))
    pairs = ((F32, F32), (BF16, BF16), (BF16, F32), (F16, F16))
    for i, (m, k, n, r, adapters, offsets) in enumerate(INTEGER_SHAPES):
        for j, (dtype, adapter_dtype) in enumerate(pairs):
            cases.append(MultiCase(m, k, n, r, adapters, dtype, adapter_dtype, ID_PATTERNS[1 + (i + j) % 3], offsets,
                                   LAYOUTS[(i + j) % 3], "integers"))
    # float32 / float64 rows are used in place: runs longer than one item (256 rows) and one adapter
    # with both runs and scattered tokens.
    cases += [
        MultiCase(1000, 67, 45, 16, 5, F32, F32, "segments", (), "padded"),
        MultiCase(1000, 13, 67, 8, 3, F64, F64, "segments", (0, 20, 45, 67), "transposed"),
        MultiCase(1000, 67, 45, 16, 1, F32, F32, "random", (), "contiguous"),
    ]
    return cases


CASES = _grid()


def _longest_run(ids: torch.Tensor) -> int:
    """The longest run of one adapter id (>= 0) among consecutive tokens."""
    values = ids.tolist()
    best, run = 0, 0
    for i, v in enumerate(values):
        run = run + 1 if i > 0 and v == values[i - 1] else 1
        if v >= 0:
            best = max(best, run)
    return best


def _params(cases):
    out = []
    for case in cases:
        out.append(pytest.param("cpu", case, id=f"cpu-{case}"))
        if case.dtype != F64:
            out.append(pytest.param("cuda", case, id=f"cuda-{case}", marks=pytest.mark.cuda))
    return out


# ---- inputs -------------------------------------------------------------------------------------


def _generator(case, salt: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(f"{case}/{salt}".encode()))


def _segments(m: int, adapters: int, shortest: int, longest: int, g: torch.Generator) -> torch.Tensor:
    """Ids [m] in consecutive runs of one id each (-1 or an adapter), run lengths in [shortest, longest)."""
    ids = torch.empty(m, dtype=torch.int64)
    pos = 0
    while pos < m:
        length = int(torch.randint(shortest, longest, (1,), generator=g))
        ids[pos : pos + length] = int(torch.randint(-1, adapters, (1,), generator=g))
        pos += length
    return ids


def adapter_ids(case) -> torch.Tensor:
    """int32 [M] in [-1, L) by the case's pattern: "none" all -1; "random" uniform with about a quarter
    -1; "segments" runs of one id (prefill: one sequence, one adapter), some of them -1; "runs" the
    same with runs of at least 40 tokens (the tensor-core cases: most 32-token tiles uniform); "distinct"
    the adapters in shuffled cycles of L (every token its own adapter when M <= L)."""
    g = _generator(case, "ids")
    m, adapters = case.m, case.adapters
    if case.ids == "none":
        ids = torch.full((m,), -1)
    elif case.ids == "random":
        ids = torch.randint(0, adapters, (m,), generator=g)
        ids[torch.rand(m, generator=g) < 0.25] = -1
    elif case.ids == "segments":
        ids = _segments(m, adapters, 1, max(2, m // 3), g)
    elif case.ids == "runs":  # segments of 40 tokens or more: most 32-token tiles share one adapter
        ids = _segments(m, adapters, 40, max(41, m // 2), g)
    elif case.ids == "distinct":
        ids = torch.randperm(adapters, generator=g).repeat(m // adapters + 1)[:m]
        if adapters == 1:  # one adapter cannot alternate: alternate it with "no adapter"
            ids[1::2] = -1
    else:
        raise ValueError(case.ids)
    return ids.to(torch.int32)


def adapter_ranks(case) -> torch.Tensor:
    """int32 [L] in [0, r_max]; with L > 1 adapter 0 has the full rank and the others random ranks
    (0 included); a single adapter has rank about r_max / 2, so its padding is exercised too."""
    g = _generator(case, "ranks")
    ranks = torch.randint(0, case.r_max + 1, (case.adapters,), generator=g)
    ranks[0] = case.r_max if case.adapters > 1 else max(1, case.r_max // 2)
    return ranks.to(torch.int32)


def scales_for(case) -> torch.Tensor:
    g = _generator(case, "scales")
    if case.values == "integers":
        choice = torch.tensor([1.0, -0.5, 0.5, -1.0])
        return choice[torch.randint(0, 4, (case.adapters,), generator=g)]
    if case.dtype == F64:  # powers of two: the float64 math stays exact
        choice = torch.tensor([0.5, -2.0, 1.0, -0.25])
        return choice[torch.randint(0, 4, (case.adapters,), generator=g)]
    return (torch.rand(case.adapters, generator=g) * 3.0 - 1.5).to(F32)


def rank_mask(ranks: torch.Tensor, ids: torch.Tensor, r_max: int, slices: int) -> torch.Tensor:
    """bool [M, S*r_max]: True where column i*r_max + j is within token m's rank (False for id -1)."""
    j = torch.arange(r_max).repeat(slices)
    r_m = torch.where(ids >= 0, ranks.long()[ids.long().clamp(min=0)], 0)
    return j[None, :] < r_m[:, None]


def _poison(t: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """t with the elements where `where` is True set to NaN / GARBAGE alternately (by flat index)."""
    garbage = torch.full(t.shape, GARBAGE, dtype=t.dtype)
    garbage.view(-1)[::2] = float("nan")
    return torch.where(where, garbage, t)


def stacked_a(case) -> torch.Tensor:
    """lora_a_all [L, S*r_max, K] (float64 values of the adapter dtype) with garbage beyond each rank."""
    a = draw_values(case, "lora_a", (case.adapters, case.rank_total, case.k), case.adapter_dtype, std=case.k**-0.5)
    a = a.to(case.adapter_dtype).to(F64)
    pad = torch.arange(case.r_max).repeat(case.slices)[None, :] >= adapter_ranks(case).long()[:, None]
    return _poison(a, pad[:, :, None].expand_as(a))


def stacked_b(case) -> torch.Tensor:
    """lora_b_all [L, N, r_max] with garbage in the columns beyond each rank."""
    b = draw_values(case, "lora_b", (case.adapters, case.n, case.r_max), case.adapter_dtype, std=case.r_max**-0.5)
    b = b.to(case.adapter_dtype).to(F64)
    pad = torch.arange(case.r_max)[None, :] >= adapter_ranks(case).long()[:, None]
    return _poison(b, pad[:, None, :].expand_as(b))


def exact_h(case) -> torch.Tensor:
    """h [M, S*r_max] float64 as multi_shrink defines it for the case's x and adapters, with garbage in
    every element multi_expand_add_ must ignore (tokens without an adapter, columns beyond the rank)."""
    x = draw_values(case, "x", (case.m, case.k), case.dtype).to(case.dtype).to(F64)
    ids, ranks = adapter_ids(case), adapter_ranks(case)
    h = reference.multi_shrink(x, stacked_a(case), ranks, ids, case.slices)
    return _poison(h, ~rank_mask(ranks, ids, case.r_max, case.slices))


def shrink_args(case, device):
    x = _place(draw_values(case, "x", (case.m, case.k), case.dtype), case.layout, device, case.dtype)
    lora_a_all = stacked_a(case).to(device=device, dtype=case.adapter_dtype)
    return x, lora_a_all, adapter_ranks(case).to(device), adapter_ids(case).to(device), case.slices


def expand_args(case, device):
    """(y guard, h, lora_b_all, scales, ranks, adapter_ids, slice_offsets)."""
    y = guarded(draw_values(case, "y", (case.m, case.n), case.dtype, magnitude=2), case.layout, device, case.dtype)
    acc = F64 if case.dtype == F64 else F32
    h = _place(exact_h(case), case.layout, device, acc)
    lora_b_all = stacked_b(case).to(device=device, dtype=case.adapter_dtype)
    return (y, h, lora_b_all, scales_for(case).to(device), adapter_ranks(case).to(device),
            adapter_ids(case).to(device), list(case.offsets))


# ---- values -------------------------------------------------------------------------------------


@pytest.mark.parametrize("device_name, case", _params(CASES))
def test_multi_shrink(device_name, case):
    device = use_device(device_name, *MULTI_OPS)
    x, lora_a_all, ranks, ids, slices = shrink_args(case, device)
    inputs = {"x": x, "lora_a_all": lora_a_all, "ranks": ranks, "adapter_ids": ids}
    before = snapshot(inputs)
    with poisoned_allocations():
        h = ops.multi_shrink(x, lora_a_all, ranks, ids, slices)
    acc = F64 if case.dtype == F64 else F32
    assert h.dtype == acc and h.device == device, f"h: {h.dtype} on {h.device}"
    assert tuple(h.shape) == (case.m, case.rank_total)
    ref64 = reference.multi_shrink(to64(x), to64(lora_a_all), ranks, ids, slices)
    plain = reference.multi_shrink(x, lora_a_all, ranks, ids, slices)
    check_result(f"multi_shrink [{case}] h", case, h, plain, ref64)
    outside = ~rank_mask(ranks.cpu(), ids.cpu(), case.r_max, case.slices)
    nonzero = int((h.cpu()[outside] != 0).sum())
    assert nonzero == 0, f"multi_shrink [{case}]: {nonzero} elements of h outside the ranks / without adapter != 0"
    assert_unchanged(before, inputs, f"multi_shrink [{case}]")


def _mma_cases() -> list[MultiCase]:
    """Shapes of the CUDA tensor-core prefill shrink (M > 64, bf16 / fp16 x with lora_a_all of x's
    dtype; M = 16 and 17 run the decode path beside it): every M in {16, 17, 65, 255, 1000} with every
    K in {16, 24, 1000, 4104} for each dtype, r_max in {1, 8, 16, 64} rotating (a Latin square over M
    and K), S = 3 slices on every third case, ids in long runs (32-token tiles that share an adapter,
    some without one) and on every fourth case random (mixed tiles: the per-token path). The float64
    reference gathers one [R, K] adapter per token, so S and then r_max are lowered where M * R * K
    would pass 4e7 elements (M = 1000 with K = 4104 keeps r_max <= 8). Two integer-valued cases must
    come out exact."""
    cases = []
    shapes = [(m, k) for m in (16, 17, 65, 255, 1000) for k in (16, 24, 1000, 4104)]
    for i, (m, k) in enumerate(shapes):
        for j, dtype in enumerate((BF16, F16)):
            ranks = (1, 8, 16, 64)
            r = ranks[(i // 4 + i + j) % 4]
            offsets = (0, 5, 9, 16) if (i + j) % 3 == 0 else ()
            while m * r * k * max(len(offsets) - 1, 1) > 4e7:
                if offsets:
                    offsets = ()
                else:
                    r = ranks[ranks.index(r) - 1]
            ids = "random" if (i + j) % 4 == 3 else "runs"
            cases.append(MultiCase(m, k, 16, r, 3, dtype, dtype, ids, offsets, LAYOUTS[(i + 2 * j) % 3]))
    cases.append(MultiCase(255, 24, 16, 8, 5, BF16, BF16, "runs", (0, 5, 9, 16), "padded", "integers"))
    cases.append(MultiCase(1000, 13, 16, 16, 3, F16, F16, "runs", (), "contiguous", "integers"))
    return cases


MMA_CASES = _mma_cases()


@pytest.mark.parametrize("device_name, case", _params(MMA_CASES))
def test_multi_shrink_tensor_core_shapes(device_name, case):
    """The tensor-core prefill path's shapes (see _mma_cases), checked as test_multi_shrink checks the grid."""
    test_multi_shrink(device_name, case)


def test_mma_cases_cover_the_contract():
    assert {c.m for c in MMA_CASES} >= {16, 17, 65, 255, 1000} and {c.k for c in MMA_CASES} >= {16, 24, 1000, 4104}
    assert {c.r_max for c in MMA_CASES} == {1, 8, 16, 64} and {c.slices for c in MMA_CASES} == {1, 3}
    assert {c.dtype for c in MMA_CASES} == {BF16, F16} and all(c.adapter_dtype == c.dtype for c in MMA_CASES)
    assert {c.ids for c in MMA_CASES} == {"runs", "random"} and {c.layout for c in MMA_CASES} == set(LAYOUTS)
    prefill = {(c.m, c.k) for c in MMA_CASES if c.m > 64 and c.values == "random"}
    assert prefill >= {(m, k) for m in (65, 255, 1000) for k in (16, 24, 1000, 4104)}


@pytest.mark.parametrize("device_name, case", _params(CASES))
def test_multi_expand_add(device_name, case):
    device = use_device(device_name, *MULTI_OPS)
    guard, h, lora_b_all, scales, ranks, ids, offsets = expand_args(case, device)
    y = guard.view
    y0 = y.clone()
    inputs = {"h": h, "lora_b_all": lora_b_all, "scales": scales, "ranks": ranks, "adapter_ids": ids}
    before = snapshot(inputs)
    with poisoned_allocations():
        result = ops.multi_expand_add_(y, h, lora_b_all, scales, ranks, ids, offsets)
    assert result is None
    ref64 = reference.multi_expand_add(to64(y0), to64(h), to64(lora_b_all), scales, ranks, ids, offsets)
    plain = reference.multi_expand_add(y0, h, lora_b_all, scales, ranks, ids, offsets)
    check_result(f"multi_expand_add_ [{case}] y", case, y, plain, ref64)
    none = (ids < 0).cpu()
    changed = int((bit_pattern(y)[none] != bit_pattern(y0)[none]).sum())
    assert changed == 0, f"multi_expand_add_ [{case}]: {changed} elements of rows without an adapter changed"
    assert guard.changed_outside() == 0, f"multi_expand_add_ [{case}]: guard elements around 'y' were written"
    assert_unchanged(before, inputs, f"multi_expand_add_ [{case}]")


def test_grid_covers_the_contract():
    """The grid has what the cases above promise to test (a guard against an edited-away grid)."""
    assert {c.m for c in CASES} >= {1, 3, 127, 1000}
    assert {c.r_max for c in CASES} >= {1, 8, 16, 64}
    assert {c.adapters for c in CASES} >= {1, 5, 64}
    assert {c.ids for c in CASES} == set(ID_PATTERNS)
    assert {c.slices for c in CASES} == {1, 3}
    assert {(c.dtype, c.adapter_dtype) for c in CASES} >= set(DTYPE_PAIRS)
    assert {c.layout for c in CASES} == set(LAYOUTS)
    assert any(c.exact and c.dtype != F64 for c in CASES)
    assert all(c.k % 8 and c.n % 8 for c in CASES)
    distinct = next(c for c in CASES if c.ids == "distinct" and 1 < c.m <= c.adapters)
    assert len(set(adapter_ids(distinct).tolist())) == distinct.m
    assert any(c.dtype in (F32, F64) and _longest_run(adapter_ids(c)) > 256 for c in CASES)
    padded = [c for c in CASES if c.r_max > 1 and bool((adapter_ranks(c) < c.r_max).any())]
    assert len(padded) > len(CASES) // 2


# ---- rejected input -----------------------------------------------------------------------------

M, K, N, R_MAX, L = 4, 6, 5, 2, 3
SHRINK_NAMES = ("x", "lora_a_all", "ranks", "adapter_ids", "num_slices")
EXPAND_NAMES = ("y", "h", "lora_b_all", "scales", "ranks", "adapter_ids", "slice_offsets")


def base_args() -> dict:
    """A valid value of every argument of both ops (M = 4, K = 6, N = 5, r_max = 2, L = 3), fresh each call."""
    g = torch.Generator().manual_seed(1)

    def rand(*shape, dtype=F32):
        return torch.randn(shape, generator=g).to(dtype)

    return {
        "x": rand(M, K), "lora_a_all": rand(L, R_MAX, K), "lora_b_all": rand(L, N, R_MAX), "h": rand(M, R_MAX),
        "y": rand(M, N), "scales": rand(L), "ranks": torch.tensor([2, 1, 0], dtype=torch.int32),
        "adapter_ids": torch.tensor([0, -1, 2, 1], dtype=torch.int32), "num_slices": 1, "slice_offsets": [],
    }


def _t(*shape, dtype=F32):
    return torch.randn(shape).to(dtype)


def _strided(t: torch.Tensor) -> torch.Tensor:
    """t's values as a non-contiguous view (every other element of a buffer)."""
    buf = torch.zeros((t.numel() * 2,), dtype=t.dtype)
    view = buf[::2].view(t.shape) if t.dim() <= 1 else buf.view(*t.shape[:-1], t.shape[-1] * 2)[..., ::2]
    view.copy_(t)
    return view


def _ids(*values):
    return torch.tensor(values, dtype=torch.int32)


V, T = ValueError, TypeError

# (op, overrides of base_args, exception, argument named, checked on CUDA too). The value checks of
# ranks and adapter_ids are CPU-only (CUDA clamps them instead of synchronising with the host).
REJECTED = [
    ("multi_shrink", lambda a: {"x": _t(K)}, V, "x", True),
    ("multi_shrink", lambda a: {"x": _t(M, K, dtype=torch.int32)}, T, "x", True),
    ("multi_shrink", lambda a: {"x": _t(M, 0), "lora_a_all": _t(L, R_MAX, 0)}, V, "x", True),
    ("multi_shrink", lambda a: {"lora_a_all": _t(R_MAX, K)}, V, "lora_a_all", True),
    ("multi_shrink", lambda a: {"lora_a_all": _t(L, R_MAX, K + 1)}, V, "lora_a_all", True),
    ("multi_shrink", lambda a: {"lora_a_all": _t(0, R_MAX, K), "ranks": _ids()}, V, "lora_a_all", True),
    ("multi_shrink", lambda a: {"x": _t(M, K, dtype=BF16), "lora_a_all": _t(L, R_MAX, K, dtype=F16)}, T,
     "lora_a_all", True),
    ("multi_shrink", lambda a: {"lora_a_all": _strided(_t(L, R_MAX, K))}, V, "lora_a_all", True),
    ("multi_shrink", lambda a: {"num_slices": 0}, V, "num_slices", True),
    ("multi_shrink", lambda a: {"num_slices": 3}, V, "num_slices", True),
    ("multi_shrink", lambda a: {"ranks": _ids(2, 1)}, V, "ranks", True),
    ("multi_shrink", lambda a: {"ranks": a["ranks"].long()}, T, "ranks", True),
    ("multi_shrink", lambda a: {"ranks": a["ranks"][None]}, V, "ranks", True),
    ("multi_shrink", lambda a: {"ranks": _strided(a["ranks"])}, V, "ranks", True),
    ("multi_shrink", lambda a: {"adapter_ids": _ids(0, 1, 2)}, V, "adapter_ids", True),
    ("multi_shrink", lambda a: {"adapter_ids": a["adapter_ids"].long()}, T, "adapter_ids", True),
    ("multi_shrink", lambda a: {"adapter_ids": _strided(a["adapter_ids"])}, V, "adapter_ids", True),
    ("multi_shrink", lambda a: {"adapter_ids": _ids(0, 3, 1, 1)}, V, "adapter_ids", False),
    ("multi_shrink", lambda a: {"adapter_ids": _ids(0, -2, 1, 1)}, V, "adapter_ids", False),
    ("multi_shrink", lambda a: {"ranks": _ids(2, 3, 0)}, V, "ranks", False),
    ("multi_shrink", lambda a: {"ranks": _ids(2, -1, 0)}, V, "ranks", False),
    ("multi_expand_add_", lambda a: {"y": _t(M * N)}, V, "y", True),
    ("multi_expand_add_", lambda a: {"y": _t(M, N, dtype=torch.int32)}, T, "y", True),
    ("multi_expand_add_", lambda a: {"y": _t(N, M).t()}, V, "y", True),
    ("multi_expand_add_", lambda a: {"h": _t(M, R_MAX, dtype=BF16)}, T, "h", True),
    ("multi_expand_add_", lambda a: {"h": _t(M + 1, R_MAX)}, V, "h", True),
    ("multi_expand_add_", lambda a: {"h": _t(M, R_MAX + 1)}, V, "h", True),
    ("multi_expand_add_", lambda a: {"h": _t(M)}, V, "h", True),
    ("multi_expand_add_", lambda a: {"lora_b_all": _t(N, R_MAX)}, V, "lora_b_all", True),
    ("multi_expand_add_", lambda a: {"lora_b_all": _t(L, N + 1, R_MAX)}, V, "lora_b_all", True),
    ("multi_expand_add_", lambda a: {"lora_b_all": _t(L, N, R_MAX, dtype=BF16)}, T, "lora_b_all", True),
    ("multi_expand_add_", lambda a: {"lora_b_all": _strided(_t(L, N, R_MAX))}, V, "lora_b_all", True),
    ("multi_expand_add_", lambda a: {"scales": _t(L + 1)}, V, "scales", True),
    ("multi_expand_add_", lambda a: {"scales": _t(L, dtype=F64)}, T, "scales", True),
    ("multi_expand_add_", lambda a: {"ranks": _ids(2, 1, 0, 0)}, V, "ranks", True),
    ("multi_expand_add_", lambda a: {"ranks": a["ranks"].float()}, T, "ranks", True),
    ("multi_expand_add_", lambda a: {"adapter_ids": _ids(0, 1)}, V, "adapter_ids", True),
    ("multi_expand_add_", lambda a: {"adapter_ids": a["adapter_ids"].to(torch.int16)}, T, "adapter_ids", True),
    ("multi_expand_add_", lambda a: {"slice_offsets": [0, 2]}, V, "slice_offsets", True),
    ("multi_expand_add_", lambda a: {"slice_offsets": [0, 2, N]}, V, "h", True),
    ("multi_expand_add_", lambda a: {"adapter_ids": _ids(0, 1, 3, -1)}, V, "adapter_ids", False),
    ("multi_expand_add_", lambda a: {"adapter_ids": _ids(-5, 1, 2, -1)}, V, "adapter_ids", False),
    ("multi_expand_add_", lambda a: {"ranks": _ids(2, 1, 3)}, V, "ranks", False),
]


def _call(op: str, args: dict):
    names = SHRINK_NAMES if op == "multi_shrink" else EXPAND_NAMES
    return getattr(torch.ops.loracuda, op)(*(args[name] for name in names))


def _on(value, device):
    """value on device with its strides kept (a non-contiguous view stays non-contiguous)."""
    if not isinstance(value, torch.Tensor) or value.device == device:
        return value
    base = value if value._base is None else value._base
    return base.to(device).as_strided(value.size(), value.stride(), value.storage_offset())


def _expect_rejection(op: str, args: dict, exc, arg: str) -> None:
    tensors = {n: v for n, v in args.items() if isinstance(v, torch.Tensor)}
    before = snapshot(tensors)
    with pytest.raises(exc, match=rf"loracuda\.{op}: argument '{arg}'"):
        _call(op, args)
    assert_unchanged(before, tensors, f"{op} after rejecting '{arg}'")


@pytest.mark.parametrize("device_name", ("cpu", pytest.param("cuda", marks=pytest.mark.cuda)))
@pytest.mark.parametrize("case", REJECTED, ids=[f"{c[0]}-{c[3]}-{i}" for i, c in enumerate(REJECTED)])
def test_rejected(device_name, case):
    op, overrides, exc, arg, on_cuda = case
    device = use_device(device_name, *MULTI_OPS)
    if device.type == "cuda" and not on_cuda:
        pytest.skip("value check of the CPU kernels only (CUDA treats the value as documented instead)")
    args = base_args()
    args.update(overrides(args))
    _expect_rejection(op, {n: _on(v, device) for n, v in args.items()}, exc, arg)


DEVICE_MIX = [("multi_shrink", n) for n in ("lora_a_all", "ranks", "adapter_ids")] + [
    ("multi_expand_add_", n) for n in ("h", "lora_b_all", "scales", "ranks", "adapter_ids")
]


@pytest.mark.parametrize("other", ("meta", pytest.param("cuda", marks=pytest.mark.cuda)))
@pytest.mark.parametrize("op, arg", DEVICE_MIX, ids=[f"{o}-{a}" for o, a in DEVICE_MIX])
def test_rejected_device_mix(op, arg, other):
    """One argument on another device than the rest (CPU): meta without a GPU; with one, the CUDA kernel."""
    if other == "cuda":
        use_device("cuda", *MULTI_OPS)
    use_device("cpu", *MULTI_OPS)
    args = base_args()
    args[arg] = args[arg].to(other)
    _expect_rejection(op, args, ValueError, arg)


def test_valid_base_args_are_accepted():
    """The rejections above are each caused by their one override: the base arguments run."""
    use_device("cpu", *MULTI_OPS)
    args = base_args()
    h = _call("multi_shrink", args)
    args["h"] = h
    _call("multi_expand_add_", args)


# ---- opcheck and torch.compile ------------------------------------------------------------------

OPCHECK_CASES = [c for c in CASES if c.m in (3, 127) and c.m * c.rank_total * c.k <= 3_000_000][::5]


@pytest.mark.parametrize("device_name, case", _params(OPCHECK_CASES))
def test_opcheck(device_name, case):
    """torch.library.opcheck: schema (only y mutated, nothing aliased), fake (shapes, dtypes, strides),
    autograd registration and AOT dispatch with dynamic shapes, on both ops."""
    device = use_device(device_name, *MULTI_OPS)
    torch.library.opcheck(torch.ops.loracuda.multi_shrink.default, shrink_args(case, device))
    guard, *rest = expand_args(case, device)
    torch.library.opcheck(torch.ops.loracuda.multi_expand_add_.default, (guard.view, *rest))


def test_opcheck_covers_both_value_kinds():
    assert {c.values for c in OPCHECK_CASES} == {"random", "integers"}
    assert {c.slices for c in OPCHECK_CASES} == {1, 3}
    assert {c.dtype for c in OPCHECK_CASES} == {F32, BF16, F16, F64}


@pytest.mark.parametrize("device_name", ("cpu", pytest.param("cuda", marks=pytest.mark.cuda)))
def test_compile_fullgraph_matches_eager(device_name):
    """torch.compile(fullgraph=True) of shrink + expand-add (three slices, bf16 y, fp32 adapters, ids
    with -1 and ranks below r_max) gives the eager result bit for bit: the graph calls the same ops."""
    device = use_device(device_name, *MULTI_OPS)
    case = MultiCase(9, 19, 17, 4, 3, BF16, F32, "random", (0, 5, 11, 17), "padded")
    x, lora_a_all, ranks, ids, slices = shrink_args(case, device)
    lora_b_all = stacked_b(case).to(device=device, dtype=F32)
    scales = scales_for(case).to(device)
    y0 = draw_values(case, "y", (case.m, case.n), BF16).to(device=device, dtype=BF16)

    def step(x, y, lora_a_all, lora_b_all, scales, ranks, ids):
        h = ops.multi_shrink(x, lora_a_all, ranks, ids, 3)
        ops.multi_expand_add_(y, h, lora_b_all, scales, ranks, ids, [0, 5, 11, 17])
        return h

    def run(fn):
        y = y0.clone()
        h = fn(x, y, lora_a_all, lora_b_all, scales, ranks, ids)
        return h, y

    torch._dynamo.reset()
    h_eager, y_eager = run(step)
    h_compiled, y_compiled = run(torch.compile(step, fullgraph=True))
    assert not torch.equal(y_eager, y0), "the sample adds nothing: the comparison would be vacuous"
    assert torch.equal(h_compiled, h_eager), "compiled h differs from eager"
    assert torch.equal(bit_pattern(y_compiled), bit_pattern(y_eager)), "compiled y differs from eager"
