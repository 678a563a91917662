"""The grouped LoRA ops (mixture-of-experts experts: one group per row) against loracuda.reference.

Ops: grouped_shrink, grouped_expand_add_, grouped_backward, grouped_mm, grouped_weight_grad and the
differentiable grouped_lora_linear. Layout: G groups, group_ids int64 [M] in [-1, G) (rows in any order,
groups of any size, empty groups), lora_a [G, r, K], lora_b [G, N, r], weight [G, N, K].

Each case checks values (exactly where the math is exact: integer-valued inputs, and float64 with dyadic
values; else the tolerance rule of conftest), rows with id -1 (h exactly 0, y untouched / 0), groups
without rows (exactly zero gradients), no unwritten output element (poisoned allocations), guard buffers
around in-place outputs, and unchanged read-only inputs. The grid covers M = 0, one group, all rows -1,
groups with no rows, r in {1, 16, 65}, K and N not multiples of 8, sorted and unsorted rows, groups of
more than one work item (> 256 rows), x padded / transposed, factors stacked or as PEFT's
target_parameters views, and every (value, factor) dtype pair. Then: gradcheck in float64, bit-for-bit
repeatability across thread counts, opcheck, torch.compile(fullgraph=True), and rejected input.
"""

from __future__ import annotations

import dataclasses
import zlib

import pytest
import torch

import loracuda
from loracuda import ops, reference

from conftest import (
    FACTOR_GRADIENTS,
    assert_exact,
    assert_unchanged,
    assert_within_rule,
    poisoned_allocations,
    snapshot,
    to64,
    use_device,
)
from samples import BF16, DTYPE_NAMES, DTYPE_PAIRS, F16, F32, F64, _place, bit_pattern, guarded

GROUPED_OPS = ("grouped_shrink", "grouped_expand_add_", "grouped_backward", "grouped_mm", "grouped_weight_grad",
               "grouped_lora_linear")
ID_PATTERNS = ("random", "sorted", "single", "none")
SEED = 0x5EED_0017_ABCD


@dataclasses.dataclass(frozen=True)
class GroupedCase:
    m: int
    k: int
    n: int
    r: int
    groups: int
    dtype: torch.dtype
    adapter_dtype: torch.dtype
    ids: str  # ID_PATTERNS
    layout: str = "contiguous"  # of x, grad_y and in-place outputs (samples.LAYOUTS)
    factors: str = "stacked"  # "stacked" [G, r, K] / [G, N, r] contiguous, or "peft" (flat factors' views)
    p: float = 0.0
    values: str = "random"
    scale: float = 1.0

    @property
    def exact(self) -> bool:
        return self.values == "integers" or self.dtype == F64

    def __str__(self) -> str:
        return "_".join([f"M{self.m}", f"K{self.k}", f"N{self.n}", f"r{self.r}", f"G{self.groups}",
                         f"{DTYPE_NAMES[self.dtype]}.{DTYPE_NAMES[self.adapter_dtype]}", self.ids, self.layout,
                         self.factors, f"p{self.p}", self.values, f"s{self.scale}"])


# (M, K, N, r, G, ids): M = 0; one group; r in {1, 16, 65}; K, N not multiples of 8; G = 64 with most
# groups empty or small; groups of more than 256 rows (several backward items), sorted and unsorted.
SHAPES = (
    (0, 13, 67, 8, 4, "random"),
    (1, 13, 67, 16, 1, "random"),
    (37, 67, 13, 1, 5, "sorted"),
    (300, 250, 67, 16, 64, "random"),
    (300, 67, 250, 65, 3, "sorted"),
    (90, 13, 1, 8, 8, "none"),
    (129, 1, 13, 4, 2, "single"),
    (700, 67, 45, 16, 2, "random"),
    (600, 45, 67, 16, 3, "sorted"),
)
# Integer-valued cases: |x|, |factors|, |weight|, |grad_y| <= 1 and few rows per group, so every sum (h, y,
# and the per-group gradient sums) stays an integer or half-integer below 128: exact even in bfloat16.
INTEGER_SHAPES = ((40, 13, 11, 4, 5, "random"), (300, 7, 9, 2, 64, "sorted"), (3, 13, 13, 8, 2, "single"))


def _grid() -> list[GroupedCase]:
    cases = []
    layouts = ("contiguous", "padded", "transposed")
    for i, (m, k, n, r, g, ids) in enumerate(SHAPES):
        for j, (dtype, adapter_dtype) in enumerate(DTYPE_PAIRS):
            exact = dtype == F64
            p = (0.5 if exact else 0.1) if (i + j) % 2 == 1 else 0.0
            scale = (0.5 if exact else 1.7) if j % 2 == 0 else (-2.0 if exact else -0.45)
            cases.append(GroupedCase(m, k, n, r, g, dtype, adapter_dtype, ids, layouts[(i + j) % 3],
                                     ("stacked", "peft")[(i + j) % 2], p, "random", scale))
    pairs = ((F32, F32), (BF16, BF16), (BF16, F32), (F16, F16))
    for i, (m, k, n, r, g, ids) in enumerate(INTEGER_SHAPES):
        for j, (dtype, adapter_dtype) in enumerate(pairs):
            cases.append(GroupedCase(m, k, n, r, g, dtype, adapter_dtype, ids, layouts[(i + j) % 3],
                                     ("stacked", "peft")[j % 2], 0.5 if (i + j) % 2 == 0 else 0.0, "integers",
                                     (1.0, -0.5, 0.5, -1.0)[(i + j) % 4]))
    return cases


CASES = _grid()


def _params(cases):
    out = []
    for case in cases:
        out.append(pytest.param("cpu", case, id=f"cpu-{case}"))
        if case.dtype != F64:
            out.append(pytest.param("cuda", case, id=f"cuda-{case}", marks=pytest.mark.cuda))
    return out


# ---- inputs -------------------------------------------------------------------------------------


def _gen(case, salt: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(f"{case}/{salt}".encode()))


def draw(case, salt: str, shape, dtype, std: float = 1.0, magnitude: int = 1) -> torch.Tensor:
    """float64 CPU values: integers in [-magnitude, magnitude] (integer cases), dyadic k / 8 (float64
    cases: exact products and sums), else normal * std."""
    g = _gen(case, salt)
    if case.values == "integers":
        return torch.randint(-magnitude, magnitude + 1, shape, generator=g).to(F64)
    if dtype == F64:
        return torch.randint(-16, 17, shape, generator=g).to(F64) / 8
    return torch.randn(shape, generator=g, dtype=F64) * std


def group_ids(case) -> torch.Tensor:
    """int64 [M]: "random" uniform ids with about a quarter -1; "sorted" the same sorted ascending (-1
    first), with group 1 left empty when G > 2; "single" every row in the last group; "none" all -1."""
    g = _gen(case, "ids")
    m, groups = case.m, case.groups
    if case.ids == "none":
        return torch.full((m,), -1, dtype=torch.int64)
    if case.ids == "single":
        return torch.full((m,), groups - 1, dtype=torch.int64)
    ids = torch.randint(0, groups, (m,), generator=g)
    ids[torch.rand(m, generator=g) < 0.25] = -1
    if case.ids == "sorted":
        if groups > 2:
            ids[ids == 1] = 2
        ids = ids.sort().values
    return ids


def factors(case, device):
    """(lora_a [G, r, K], lora_b [G, N, r]) in the adapter dtype; "peft": views of the flat
    target_parameters factors A_flat [r*G, K] and B_flat [N, r*G] (strides of lora_b: (1, r*G, G))."""
    g, r, k, n = case.groups, case.r, case.k, case.n
    a = draw(case, "lora_a", (g, r, k), case.adapter_dtype, std=k**-0.5)
    b = draw(case, "lora_b", (g, n, r), case.adapter_dtype, std=r**-0.5)
    if case.factors == "stacked":
        return a.to(device=device, dtype=case.adapter_dtype), b.to(device=device, dtype=case.adapter_dtype)
    a_flat = a.reshape(g * r, k).to(device=device, dtype=case.adapter_dtype)
    b_flat = b.permute(1, 2, 0).reshape(n, r * g).to(device=device, dtype=case.adapter_dtype)
    la, lb = ops.grouped_factor_views(a_flat, b_flat, g)
    assert torch.equal(lb.to(F64).cpu(), b.to(case.adapter_dtype).to(F64)), "test defect: PEFT view of lora_b"
    return la, lb


def weight_for(case, device) -> torch.Tensor:
    w = draw(case, "weight", (case.groups, case.n, case.k), case.dtype, std=case.k**-0.5)
    return w.to(device=device, dtype=case.dtype)


def x_for(case, device, salt="x", width=None) -> torch.Tensor:
    return _place(draw(case, salt, (case.m, width or case.k), case.dtype), case.layout, device, case.dtype)


def seed_for(case):
    return torch.tensor([SEED], dtype=torch.int64) if case.p > 0 else None


def h_for(case, device, x, lora_a, ids) -> torch.Tensor:
    """h as grouped_shrink defines it (float64 reference, rounded to the accumulation dtype)."""
    acc = F64 if case.dtype == F64 else F32
    h = reference.grouped_shrink(to64(x).cpu(), to64(lora_a).cpu(), ids, case.p, seed_for(case))
    return h.to(device=device, dtype=acc)


def check(what, case, got, plain, ref64, factor=2.0):
    if case.exact:
        assert_exact(what, got, ref64.to(got.device) if ref64.device != got.device else ref64)
    else:
        assert_within_rule(what, got, plain, ref64, factor)


def _empty_groups(ids: torch.Tensor, groups: int) -> list[int]:
    present = set(ids[ids >= 0].tolist())
    return [g for g in range(groups) if g not in present]


# ---- values -------------------------------------------------------------------------------------


@pytest.mark.parametrize("device_name, case", _params(CASES))
def test_grouped_shrink(device_name, case):
    device = use_device(device_name, "grouped_shrink")
    x = x_for(case, device)
    lora_a, _ = factors(case, device)
    ids = group_ids(case).to(device)
    seed = seed_for(case)
    inputs = {"x": x, "lora_a": lora_a, "group_ids": ids}
    before = snapshot(inputs)
    with poisoned_allocations():
        h = ops.grouped_shrink(x, lora_a, ids, case.p, seed)
    acc = F64 if case.dtype == F64 else F32
    assert h.dtype == acc and tuple(h.shape) == (case.m, case.r)
    ref64 = reference.grouped_shrink(to64(x), to64(lora_a), ids, case.p, seed)
    plain = reference.grouped_shrink(x, lora_a, ids, case.p, seed)
    check(f"grouped_shrink [{case}] h", case, h, plain, ref64)
    nonzero = int((h[ids < 0] != 0).sum())
    assert nonzero == 0, f"grouped_shrink [{case}]: {nonzero} elements of rows with id -1 are not 0"
    assert_unchanged(before, inputs, f"grouped_shrink [{case}]")


@pytest.mark.parametrize("device_name, case", _params(CASES))
def test_grouped_expand_add(device_name, case):
    device = use_device(device_name, "grouped_expand_add_")
    _, lora_b = factors(case, device)
    ids = group_ids(case).to(device)
    acc = F64 if case.dtype == F64 else F32
    h = _place(draw(case, "h", (case.m, case.r), acc, magnitude=1), case.layout, device, acc)
    guard = guarded(draw(case, "y", (case.m, case.n), case.dtype, magnitude=2), case.layout, device, case.dtype)
    y = guard.view
    y0 = y.clone()
    inputs = {"h": h, "lora_b": lora_b, "group_ids": ids}
    before = snapshot(inputs)
    with poisoned_allocations():
        assert ops.grouped_expand_add_(y, h, lora_b, ids, case.scale) is None
    ref64 = reference.grouped_expand_add(to64(y0), to64(h), to64(lora_b), ids, case.scale)
    plain = reference.grouped_expand_add(y0, h, lora_b, ids, case.scale)
    check(f"grouped_expand_add_ [{case}] y", case, y, plain, ref64)
    none = (ids < 0).cpu()
    changed = int((bit_pattern(y)[none] != bit_pattern(y0)[none]).sum())
    assert changed == 0, f"grouped_expand_add_ [{case}]: {changed} elements of rows with id -1 changed"
    assert guard.changed_outside() == 0, f"grouped_expand_add_ [{case}]: guard elements around 'y' were written"
    assert_unchanged(before, inputs, f"grouped_expand_add_ [{case}]")


@pytest.mark.parametrize("device_name, case", _params(CASES))
def test_grouped_backward(device_name, case):
    device = use_device(device_name, "grouped_backward")
    x = x_for(case, device)
    grad_y = x_for(case, device, "grad_y", case.n)
    lora_a, lora_b = factors(case, device)
    ids = group_ids(case).to(device)
    seed = seed_for(case)
    h = h_for(case, device, x, lora_a, ids.cpu())
    guard = guarded(draw(case, "grad_x", (case.m, case.k), case.dtype, magnitude=2), case.layout, device, case.dtype)
    grad_x = guard.view
    gx0 = grad_x.clone()
    inputs = {"grad_y": grad_y, "x": x, "h": h, "lora_a": lora_a, "lora_b": lora_b, "group_ids": ids}
    before = snapshot(inputs)
    with poisoned_allocations():
        grad_a, grad_b = ops.grouped_backward(grad_y, x, h, lora_a, lora_b, ids, case.scale, case.p, seed, grad_x)
    assert grad_a.dtype == lora_a.dtype and grad_b.dtype == lora_b.dtype
    assert grad_a.is_contiguous() and grad_b.is_contiguous()
    assert tuple(grad_a.shape) == tuple(lora_a.shape) and tuple(grad_b.shape) == tuple(lora_b.shape)
    r64 = reference.grouped_backward(to64(grad_y), to64(x), to64(h), to64(lora_a), to64(lora_b), ids, case.scale,
                                     case.p, seed)
    rp = reference.grouped_backward(grad_y, x, h, lora_a, lora_b, ids, case.scale, case.p, seed)
    check(f"grouped_backward [{case}] grad_a", case, grad_a, rp[0], r64[0], FACTOR_GRADIENTS)
    check(f"grouped_backward [{case}] grad_b", case, grad_b, rp[1], r64[1], FACTOR_GRADIENTS)
    gx_plain = (gx0.to(rp[2].dtype) + rp[2]).to(case.dtype)
    check(f"grouped_backward [{case}] grad_x", case, grad_x, gx_plain, to64(gx0) + r64[2], FACTOR_GRADIENTS)
    for g in _empty_groups(ids.cpu(), case.groups):
        assert int((grad_a[g] != 0).sum()) == 0 and int((grad_b[g] != 0).sum()) == 0, (
            f"grouped_backward [{case}]: group {g} has no rows but a non-zero gradient")
    assert guard.changed_outside() == 0, f"grouped_backward [{case}]: guard elements around 'grad_x' were written"
    assert_unchanged(before, inputs, f"grouped_backward [{case}]")


def test_grouped_backward_without_grad_x():
    case = next(c for c in CASES if c.m == 300 and c.dtype == BF16 and c.adapter_dtype == F32)
    device = use_device("cpu", "grouped_backward")
    x, grad_y = x_for(case, device), x_for(case, device, "grad_y", case.n)
    lora_a, lora_b = factors(case, device)
    ids = group_ids(case)
    h = h_for(case, device, x, lora_a, ids)
    with_gx = ops.grouped_backward(grad_y, x, h, lora_a, lora_b, ids, case.scale, case.p, seed_for(case),
                                   torch.zeros(case.m, case.k, dtype=case.dtype))
    without = ops.grouped_backward(grad_y, x, h, lora_a, lora_b, ids, case.scale, case.p, seed_for(case))
    assert torch.equal(with_gx[0], without[0]) and torch.equal(with_gx[1], without[1])


@pytest.mark.parametrize("device_name, case", _params(CASES[::2]))
def test_grouped_mm_and_weight_grad(device_name, case):
    device = use_device(device_name, "grouped_mm", "grouped_weight_grad")
    x = x_for(case, device)
    dy = x_for(case, device, "grad_y", case.n)
    w = weight_for(case, device)
    ids = group_ids(case).to(device)
    with poisoned_allocations():
        y = ops.grouped_mm(x, w, ids)
        dx = ops.grouped_mm(dy, w, ids, transpose_weight=True)
        dw = ops.grouped_weight_grad(dy, x, ids, case.groups)
    for what, got, fn, args in (
        ("y", y, reference.grouped_mm, (x, w, ids)),
        ("dx", dx, reference.grouped_mm, (dy, w, ids, True)),
        ("dw", dw, reference.grouped_weight_grad, (dy, x, ids, case.groups)),
    ):
        ref64 = fn(*(to64(a) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args))
        check(f"grouped_mm [{case}] {what}", case, got, fn(*args), ref64)
    assert int((y[ids < 0] != 0).sum()) == 0 and int((dx[ids < 0] != 0).sum()) == 0
    for g in _empty_groups(ids.cpu(), case.groups):
        assert int((dw[g] != 0).sum()) == 0, f"grouped_weight_grad [{case}]: empty group {g} not exactly 0"


def _leaves(case, device, weight_grad: bool):
    x = x_for(case, device).detach().requires_grad_(True)
    w = weight_for(case, device).requires_grad_(weight_grad)
    a, b = factors(case, device)
    a_leaf = a.detach().clone().requires_grad_(True) if case.factors == "stacked" else None
    return x, w, a, b, a_leaf


@pytest.mark.parametrize("device_name, case", _params(CASES))
def test_grouped_lora_linear(device_name, case):
    """Forward and backward of loracuda.grouped_lora_linear against the reference's autograd."""
    device = use_device(device_name, *GROUPED_OPS)
    ids = group_ids(case).to(device)
    seed = seed_for(case)
    weight_grad = case.m % 2 == 0

    def run(fn, cast):
        x = cast(x_for(case, device)).detach().requires_grad_(True)
        w = cast(weight_for(case, device)).detach().requires_grad_(weight_grad)
        a, b = factors(case, device)
        a_flat = cast(a).detach().requires_grad_(True)
        b_flat = cast(b).detach().requires_grad_(True)
        y = fn(x, w, a_flat, b_flat)
        dy = cast(draw(case, "dy", (case.m, case.n), case.dtype).to(device=device, dtype=case.dtype))
        if y.requires_grad:  # the reference's y depends on no input when no row has a group
            y.backward(dy)
        leaves = (x, w, a_flat, b_flat)
        grads = [t.grad if t.grad is not None or not t.requires_grad else torch.zeros_like(t) for t in leaves]
        return (y, *grads)

    def ours(x, w, a, b):
        with poisoned_allocations():
            return loracuda.grouped_lora_linear(x, w, a, b, ids, case.scale, case.p, training=True, seed=seed)

    def ref(x, w, a, b):
        return reference.grouped_lora_linear(x, w, a, b, ids, case.scale, case.p, seed)

    got = [t.detach() if t is not None else None for t in run(ours, lambda t: t)]
    plain = [t.detach() if t is not None else None for t in run(ref, lambda t: t)]
    ref64 = [t.detach() if t is not None else None for t in run(ref, to64)]
    for i, what in enumerate(("y", "grad_x", "grad_weight", "grad_a", "grad_b")):
        if got[i] is None:
            assert what == "grad_weight" and not weight_grad, f"{what} missing"
            continue
        check(f"grouped_lora_linear [{case}] {what}", case, got[i], plain[i], ref64[i],
              2.0 if i == 0 else FACTOR_GRADIENTS)
    none = ids < 0
    assert int((got[0][none] != 0).sum()) == 0 and int((got[1][none] != 0).sum()) == 0
    for g in _empty_groups(ids.cpu(), case.groups):
        for grad in got[2:]:
            if grad is not None:
                assert int((grad[g] != 0).sum()) == 0, f"[{case}] group {g} has no rows but a non-zero gradient"


def test_grid_covers_the_contract():
    assert {c.r for c in CASES} >= {1, 16, 65} and 0 in {c.m for c in CASES}
    assert 1 in {c.groups for c in CASES} and 64 in {c.groups for c in CASES}
    assert {c.ids for c in CASES} == set(ID_PATTERNS)
    assert {(c.dtype, c.adapter_dtype) for c in CASES} >= set(DTYPE_PAIRS)
    assert {c.layout for c in CASES} == {"contiguous", "padded", "transposed"}
    assert {c.factors for c in CASES} == {"stacked", "peft"}
    assert any(c.p > 0 for c in CASES) and any(c.exact and c.dtype != F64 for c in CASES)
    assert any(c.k % 8 and c.n % 8 for c in CASES)
    # groups of more than one backward item (256 rows), sorted and unsorted
    def largest_group(c):
        ids = group_ids(c)
        return int(torch.bincount(ids[ids >= 0], minlength=1).max())

    big = [c for c in CASES if largest_group(c) > 256]
    assert {c.ids for c in big} >= {"sorted", "random"}
    assert any(_empty_groups(group_ids(c), c.groups) and c.m > 0 for c in CASES)


# ---- gradcheck, zero gradients, determinism -------------------------------------------------------


@pytest.mark.parametrize("p", (0.0, 0.5))
@pytest.mark.parametrize("layout", ("stacked", "peft"))
def test_gradcheck_float64(p, layout):
    use_device("cpu", *GROUPED_OPS)
    case = GroupedCase(11, 7, 5, 3, 4, F64, F64, "random", factors=layout, p=p, scale=0.7)
    ids = torch.tensor([2, -1, 0, 2, 3, 0, -1, 2, 0, 3, 2])  # group 1 has no rows
    x = draw(case, "x", (11, 7), F64).requires_grad_(True)
    w = draw(case, "weight", (4, 5, 7), F64).requires_grad_(True)
    g = torch.Generator().manual_seed(3)
    if layout == "stacked":
        a = torch.randn(4, 3, 7, generator=g, dtype=F64).requires_grad_(True)
        b = torch.randn(4, 5, 3, generator=g, dtype=F64).requires_grad_(True)
        fn = lambda x, w, a, b: loracuda.grouped_lora_linear(x, w, a, b, ids, 0.7, p, seed=SEED)  # noqa: E731
    else:
        a = torch.randn(12, 7, generator=g, dtype=F64).requires_grad_(True)
        b = torch.randn(5, 12, generator=g, dtype=F64).requires_grad_(True)

        def fn(x, w, a, b):
            la, lb = ops.grouped_factor_views(a, b, 4)
            return loracuda.grouped_lora_linear(x, w, la, lb, ids, 0.7, p, seed=SEED)

    assert torch.autograd.gradcheck(fn, (x, w, a, b), eps=1e-6, atol=1e-8)


def test_groups_without_rows_get_exact_zero_gradient():
    use_device("cpu", *GROUPED_OPS)
    case = GroupedCase(64, 24, 40, 8, 6, F32, F32, "random", factors="peft")
    ids = torch.tensor([0, 3, 5] * 21 + [3])  # groups 1, 2, 4 get no row
    x = draw(case, "x", (64, 24), F32).float().requires_grad_(True)
    w = draw(case, "weight", (6, 40, 24), F32).float().requires_grad_(True)
    a_flat = torch.randn(48, 24).requires_grad_(True)
    b_flat = torch.randn(40, 48).requires_grad_(True)
    la, lb = ops.grouped_factor_views(a_flat, b_flat, 6)
    loracuda.grouped_lora_linear(x, w, la, lb, ids, 2.0, 0.1, seed=5).square().sum().backward()
    ga, gb = ops.grouped_factor_views(a_flat.grad, b_flat.grad, 6)
    for g in (1, 2, 4):
        assert torch.equal(ga[g], torch.zeros_like(ga[g])) and torch.equal(gb[g], torch.zeros_like(gb[g]))
        assert torch.equal(w.grad[g], torch.zeros_like(w.grad[g]))
    for g in (0, 3, 5):
        assert ga[g].abs().sum() > 0 and gb[g].abs().sum() > 0 and w.grad[g].abs().sum() > 0


@pytest.mark.parametrize("dtype", (F32, BF16))
@pytest.mark.parametrize("ids_kind", ("random", "sorted"))
def test_repeatable_across_thread_counts(dtype, ids_kind):
    """Forward, backward and every gradient bit for bit the same with 1 and 2 threads (and again)."""
    use_device("cpu", *GROUPED_OPS)
    case = GroupedCase(900, 96, 80, 16, 4, dtype, F32, ids_kind, p=0.1)
    ids = group_ids(case)

    def step():
        x = draw(case, "x", (900, 96), dtype).to(dtype).requires_grad_(True)
        w = draw(case, "weight", (4, 80, 96), dtype, std=0.1).to(dtype).requires_grad_(True)
        a = draw(case, "lora_a", (4, 16, 96), F32, std=0.1).float().requires_grad_(True)
        b = draw(case, "lora_b", (4, 80, 16), F32, std=0.25).float().requires_grad_(True)
        y = loracuda.grouped_lora_linear(x, w, a, b, ids, 1.3, 0.1, seed=9)
        y.backward(draw(case, "dy", (900, 80), dtype).to(dtype))
        return [bit_pattern(t) for t in (y, x.grad, w.grad, a.grad, b.grad)]

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = step()
        torch.set_num_threads(2)
        two = step()
        again = step()
    finally:
        torch.set_num_threads(threads)
    for name, u, v, w in zip(("y", "grad_x", "grad_weight", "grad_a", "grad_b"), one, two, again):
        assert torch.equal(u, v), f"{name} differs between 1 and 2 threads"
        assert torch.equal(v, w), f"{name} differs between two runs"


# ---- opcheck and torch.compile ----------------------------------------------------------------------

OPCHECK_CASES = [c for c in CASES if 0 < c.m <= 300 and c.groups <= 8][::5]


@pytest.mark.parametrize("device_name, case", _params(OPCHECK_CASES))
def test_opcheck(device_name, case):
    device = use_device(device_name, *GROUPED_OPS)
    x = x_for(case, device)
    dy = x_for(case, device, "grad_y", case.n)
    lora_a, lora_b = factors(case, device)
    w = weight_for(case, device)
    ids = group_ids(case).to(device)
    seed = seed_for(case)
    h = h_for(case, device, x, lora_a, ids.cpu())
    lib = torch.ops.loracuda
    torch.library.opcheck(lib.grouped_shrink.default, (x, lora_a, ids, case.p, seed))
    y = guarded(draw(case, "y", (case.m, case.n), case.dtype), case.layout, device, case.dtype).view
    torch.library.opcheck(lib.grouped_expand_add_.default, (y, h, lora_b, ids, case.scale))
    gx = torch.zeros(case.m, case.k, dtype=case.dtype, device=device)
    torch.library.opcheck(lib.grouped_backward.default, (dy, x, h, lora_a, lora_b, ids, case.scale, case.p, seed, gx))
    torch.library.opcheck(lib.grouped_mm.default, (x, w, ids, False))
    torch.library.opcheck(lib.grouped_mm.default, (dy, w, ids, True))
    torch.library.opcheck(lib.grouped_weight_grad.default, (dy, x, ids, case.groups))
    args = (x.detach().requires_grad_(True), w, lora_a.detach().requires_grad_(True),
            lora_b.detach().requires_grad_(True), ids, case.scale, case.p, seed)
    torch.library.opcheck(lib.grouped_lora_linear.default, args)


def test_opcheck_covers_the_dtypes():
    assert {c.dtype for c in OPCHECK_CASES} == {F32, BF16, F16, F64}
    assert {c.factors for c in OPCHECK_CASES} == {"stacked", "peft"} and any(c.p > 0 for c in OPCHECK_CASES)


@pytest.mark.parametrize("device_name", ("cpu", pytest.param("cuda", marks=pytest.mark.cuda)))
def test_compile_fullgraph_matches_eager(device_name):
    """torch.compile(fullgraph=True) of a training step through grouped_lora_linear (PEFT-layout factors,
    bf16 x, float32 factors, dropout, ids with -1 and an empty group) gives eager's values and gradients."""
    device = use_device(device_name, *GROUPED_OPS)
    case = GroupedCase(33, 19, 17, 4, 5, BF16, F32, "random", factors="peft", p=0.1)
    ids = group_ids(case).to(device)
    ids[ids == 3] = 2
    x0 = draw(case, "x", (33, 19), BF16).to(device=device, dtype=BF16)
    w = draw(case, "weight", (5, 17, 19), BF16, std=0.3).to(device=device, dtype=BF16)
    a0 = torch.randn(20, 19, generator=_gen(case, "a")).to(device)
    b0 = torch.randn(17, 20, generator=_gen(case, "b")).to(device)
    seed = torch.tensor([SEED], dtype=torch.int64, device=device)

    def step(x, a_flat, b_flat):
        la, lb = ops.grouped_factor_views(a_flat, b_flat, 5)
        y = loracuda.grouped_lora_linear(x, w, la, lb, ids, 0.8, 0.1, seed=seed)
        return y.float().square().sum()

    def run(fn):
        x, a, b = (t.clone().requires_grad_(True) for t in (x0, a0, b0))
        loss = fn(x, a, b)
        loss.backward()
        return loss, x.grad, a.grad, b.grad

    torch._dynamo.reset()
    eager = run(step)
    compiled = run(torch.compile(step, fullgraph=True))
    for name, e, c in zip(("loss", "grad_x", "grad_a", "grad_b"), eager, compiled):
        assert torch.equal(e, c), f"compiled {name} differs from eager"


# ---- rejected input -----------------------------------------------------------------------------

M, K, N, R, G = 5, 6, 7, 2, 3
V, T = ValueError, TypeError


def base_args() -> dict:
    g = torch.Generator().manual_seed(1)

    def rand(*shape, dtype=F32):
        return torch.randn(shape, generator=g).to(dtype)

    return {"x": rand(M, K), "lora_a": rand(G, R, K), "lora_b": rand(G, N, R), "weight": rand(G, N, K),
            "h": rand(M, R), "y": rand(M, N), "grad_y": rand(M, N), "grad_x": rand(M, K),
            "group_ids": torch.tensor([0, -1, 2, 1, 0]), "scale": 0.5, "dropout_p": 0.0, "seed": None,
            "transpose_weight": False, "num_groups": G}


NAMES = {
    "grouped_shrink": ("x", "lora_a", "group_ids", "dropout_p", "seed"),
    "grouped_expand_add_": ("y", "h", "lora_b", "group_ids", "scale"),
    "grouped_backward": ("grad_y", "x", "h", "lora_a", "lora_b", "group_ids", "scale", "dropout_p", "seed",
                         "grad_x"),
    "grouped_mm": ("x", "weight", "group_ids", "transpose_weight"),
    "grouped_weight_grad": ("grad_y", "x", "group_ids", "num_groups"),
    "grouped_lora_linear": ("x", "weight", "lora_a", "lora_b", "group_ids", "scale", "dropout_p", "seed"),
}


def _t(*shape, dtype=F32):
    return torch.randn(shape).to(dtype)


# (op, overrides, exception, argument named, also on CUDA). Id values are checked by the CPU kernels only.
REJECTED = [
    ("grouped_shrink", lambda a: {"x": _t(M)}, V, "x", True),
    ("grouped_shrink", lambda a: {"x": _t(M, K, dtype=torch.int32)}, T, "x", True),
    ("grouped_shrink", lambda a: {"lora_a": _t(R, K)}, V, "lora_a", True),
    ("grouped_shrink", lambda a: {"lora_a": _t(G, R, K + 1)}, V, "lora_a", True),
    ("grouped_shrink", lambda a: {"x": _t(M, K, dtype=BF16), "lora_a": _t(G, R, K, dtype=F16)}, T, "lora_a", True),
    ("grouped_shrink", lambda a: {"group_ids": a["group_ids"].int()}, T, "group_ids", True),
    ("grouped_shrink", lambda a: {"group_ids": a["group_ids"][:4]}, V, "group_ids", True),
    ("grouped_shrink", lambda a: {"group_ids": torch.tensor([0, 3, 1, 1, 0])}, V, "group_ids", False),
    ("grouped_shrink", lambda a: {"group_ids": torch.tensor([0, -2, 1, 1, 0])}, V, "group_ids", False),
    ("grouped_shrink", lambda a: {"dropout_p": 1.0}, V, "dropout_p", True),
    ("grouped_shrink", lambda a: {"dropout_p": 0.2}, V, "seed", True),
    ("grouped_expand_add_", lambda a: {"y": _t(N, M).t()}, V, "y", True),
    ("grouped_expand_add_", lambda a: {"h": _t(M, R, dtype=BF16)}, T, "h", True),
    ("grouped_expand_add_", lambda a: {"h": _t(M, R + 1)}, V, "h", True),
    ("grouped_expand_add_", lambda a: {"lora_b": _t(G, N + 1, R)}, V, "lora_b", True),
    ("grouped_expand_add_", lambda a: {"lora_b": _t(N, R)}, V, "lora_b", True),
    ("grouped_expand_add_", lambda a: {"scale": float("nan")}, V, "scale", True),
    ("grouped_expand_add_", lambda a: {"group_ids": torch.tensor([0, 1, 2, 3, -1])}, V, "group_ids", False),
    ("grouped_backward", lambda a: {"grad_y": _t(M + 1, N)}, V, "grad_y", True),
    ("grouped_backward", lambda a: {"grad_y": _t(M, N, dtype=F64)}, T, "grad_y", True),
    ("grouped_backward", lambda a: {"lora_b": _t(G + 1, N, R)}, V, "lora_b", True),
    ("grouped_backward", lambda a: {"lora_b": _t(G, N, R + 1)}, V, "lora_b", True),
    ("grouped_backward", lambda a: {"h": _t(M, R + 1)}, V, "h", True),
    ("grouped_backward", lambda a: {"grad_x": _t(M, K + 1)}, V, "grad_x", True),
    ("grouped_backward", lambda a: {"grad_x": _t(K, M).t()}, V, "grad_x", True),
    ("grouped_backward", lambda a: {"group_ids": torch.tensor([0, 1, 2, 5, -1])}, V, "group_ids", False),
    ("grouped_mm", lambda a: {"weight": _t(G, N, K + 1)}, V, "weight", True),
    ("grouped_mm", lambda a: {"weight": _t(N, K)}, V, "weight", True),
    ("grouped_mm", lambda a: {"weight": _t(G, N, K, dtype=F64)}, T, "weight", True),
    ("grouped_mm", lambda a: {"group_ids": torch.tensor([0, 1, 2, 3, -1])}, V, "group_ids", False),
    ("grouped_weight_grad", lambda a: {"num_groups": 0}, V, "num_groups", True),
    ("grouped_weight_grad", lambda a: {"grad_y": _t(M - 1, N)}, V, "grad_y", True),
    ("grouped_lora_linear", lambda a: {"weight": _t(G + 1, N, K)}, V, "lora_a", True),
    ("grouped_lora_linear", lambda a: {"lora_b": _t(G, N + 1, R)}, V, "lora_b", True),
    ("grouped_lora_linear", lambda a: {"lora_a": _t(G, R, K - 1)}, V, "lora_a", True),
    ("grouped_lora_linear", lambda a: {"x": _t(M, K, dtype=BF16)}, T, "weight", True),
    ("grouped_lora_linear", lambda a: {"group_ids": torch.tensor([0, 1, 2, 3, -1])}, V, "group_ids", False),
]


def _call(op, args):
    return getattr(torch.ops.loracuda, op)(*(args[n] for n in NAMES[op]))


def _on(value, device):
    """value on device with its strides kept (a non-contiguous view stays non-contiguous)."""
    if not isinstance(value, torch.Tensor) or value.device == device:
        return value
    base = value if value._base is None else value._base
    return base.to(device).as_strided(value.size(), value.stride(), value.storage_offset())


def _expect_rejection(op, args, exc, arg):
    tensors = {n: v for n, v in args.items() if isinstance(v, torch.Tensor)}
    before = snapshot(tensors)
    with pytest.raises(exc, match=rf"loracuda\.{op}: argument '{arg}'"):
        _call(op, args)
    assert_unchanged(before, tensors, f"{op} after rejecting '{arg}'")


@pytest.mark.parametrize("device_name", ("cpu", pytest.param("cuda", marks=pytest.mark.cuda)))
@pytest.mark.parametrize("case", REJECTED, ids=[f"{c[0]}-{c[3]}-{i}" for i, c in enumerate(REJECTED)])
def test_rejected(device_name, case):
    op, overrides, exc, arg, on_cuda = case
    device = use_device(device_name, op)
    if device.type == "cuda" and not on_cuda:
        pytest.skip("value check of the CPU kernels only (the CUDA kernels treat such ids as -1)")
    args = base_args()
    args.update(overrides(args))
    args = {n: _on(v, device) for n, v in args.items()}
    _expect_rejection(op, args, exc, arg)


def test_valid_base_args_are_accepted():
    use_device("cpu", *GROUPED_OPS)
    for op in NAMES:
        _call(op, base_args())


DEVICE_MIX = [("grouped_shrink", "lora_a"), ("grouped_shrink", "group_ids"), ("grouped_expand_add_", "h"),
              ("grouped_expand_add_", "lora_b"), ("grouped_backward", "lora_a"), ("grouped_backward", "grad_x"),
              ("grouped_mm", "weight"), ("grouped_lora_linear", "weight"), ("grouped_lora_linear", "group_ids")]


@pytest.mark.parametrize("other", ("meta", pytest.param("cuda", marks=pytest.mark.cuda)))
@pytest.mark.parametrize("op, arg", DEVICE_MIX, ids=[f"{o}-{a}" for o, a in DEVICE_MIX])
def test_rejected_device_mix(op, arg, other):
    if other == "cuda":
        use_device("cuda", op)
    use_device("cpu", op)
    args = base_args()
    args[arg] = args[arg].to(other)
    _expect_rejection(op, args, ValueError, arg)


def test_functional_rejects_bad_dropout():
    with pytest.raises(ValueError, match=r"loracuda\.grouped_lora_linear: argument 'dropout_p'"):
        args = base_args()
        loracuda.grouped_lora_linear(args["x"], args["weight"], args["lora_a"], args["lora_b"], args["group_ids"],
                                     1.0, dropout_p=1.5)
