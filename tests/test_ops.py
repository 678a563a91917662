"""Every loracuda op against loracuda.reference, on the sample grid of samples.py.

Each case checks: the result's shape and dtype; its values (exactly where the case's math is exact,
else the tolerance rule of conftest.assert_within_rule: 2x plain PyTorch's error for values, 3x for
gradients); that no output element is left unwritten (outputs are allocated under
poisoned_allocations, so an unwritten element is NaN); that the guard elements around in-place
outputs keep their bits; and that every read-only input keeps its bits. The grid covers odd sizes,
M = 0, three unequal slices, strided / NaN-padded / column-major inputs, bf16 and fp16 values with
fp32 adapters, and dropout.
"""

import pytest
import torch

from loracuda import reference

from conftest import (
    FACTOR_GRADIENTS,
    LORA_LINEAR_OPS,
    assert_guards_intact,
    assert_within_rule,
    assert_unchanged,
    check_result,
    device_cases,
    poisoned_allocations,
    snapshot,
    to64,
    use_device,
)
from samples import (
    BACKWARD_CASES,
    BF16,
    EXPAND_CASES,
    F16,
    F32,
    LAYOUTS,
    LORA_LINEAR_CASES,
    MERGE_CASES,
    SHRINK_CASES,
    Case,
    backward_sample,
    bit_pattern,
    expand_add_sample,
    lora_linear_sample,
    merge_sample,
    shrink_sample,
)


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


@pytest.mark.parametrize("device_name, case", device_cases(SHRINK_CASES))
def test_shrink(device_name, case):
    device = use_device(device_name, "shrink")
    s = shrink_sample(case, device)
    x, lora_a, p, seed = s.args
    before = snapshot(s.tensors())
    with poisoned_allocations():
        h = s.run()
    assert h.dtype == _acc(case.dtype) and h.device == device, f"h: {h.dtype} on {h.device}"
    assert tuple(h.shape) == (case.m, case.rank_total)
    ref64 = reference.shrink(to64(x), to64(lora_a), p, seed)
    plain = reference.shrink(x, lora_a, p, seed)
    check_result(f"shrink [{case}] h", case, h, plain, ref64)
    assert_unchanged(before, s.tensors(), f"shrink [{case}]")


def _mma_shrink_cases() -> list[Case]:
    """Shapes of the CUDA tensor-core shrink (M >= 16, bf16 / fp16 x with lora_a of x's dtype): every
    M in {16, 17, 255, 1000} (one MMA row tile, one row past it, odd tails) with every K in {16, 24,
    1000, 4104} (one MMA k step, a partial 32-column step, 4096 + 8) for each dtype; r in {1, 8, 16,
    64} rotating, with S = 3 slices (R = 3r: rank tiles that end inside an 8-row MMA tile) on every
    third case; the three layouts (padded: rows that allow no 16-byte load) and dropout rotating.
    Two integer-valued cases must come out exact."""
    cases = []
    shapes = [(m, k) for m in (16, 17, 255, 1000) for k in (16, 24, 1000, 4104)]
    for i, (m, k) in enumerate(shapes):
        for j, dtype in enumerate((BF16, F16)):
            r = (1, 8, 16, 64)[(i // 4 + i + j) % 4]  # a Latin square over (M, K): each r with each M and K
            offsets = (0, 5, 9, 16) if (i + j) % 3 == 0 else ()
            p = 0.1 if (i + 3 * j) % 5 == 1 else 0.0
            cases.append(Case(m, k, 16, r, dtype, dtype, offsets, p, LAYOUTS[(i + 2 * j) % 3], "random"))
    cases.append(Case(17, 24, 16, 8, BF16, BF16, (0, 5, 9, 16), 0.5, "padded", "integers"))
    cases.append(Case(255, 1000, 16, 16, F16, F16, (), 0.0, "contiguous", "integers"))
    return cases


MMA_SHRINK_CASES = _mma_shrink_cases()


@pytest.mark.parametrize("device_name, case", device_cases(MMA_SHRINK_CASES))
def test_shrink_tensor_core_shapes(device_name, case):
    """The tensor-core path's shapes (see _mma_shrink_cases), checked as test_shrink checks the grid."""
    test_shrink(device_name, case)


def test_mma_shrink_cases_cover_the_contract():
    cases = MMA_SHRINK_CASES
    assert {c.m for c in cases} >= {16, 17, 255, 1000} and {c.k for c in cases} >= {16, 24, 1000, 4104}
    assert {c.r for c in cases} == {1, 8, 16, 64} and {c.slices for c in cases} == {1, 3}
    assert {c.dtype for c in cases} == {BF16, F16} and all(c.adapter_dtype == c.dtype for c in cases)
    assert {(c.m, c.k, c.dtype) for c in cases} >= {(m, k, d) for m in (16, 17, 255, 1000)
                                                    for k in (16, 24, 1000, 4104) for d in (BF16, F16)}
    assert {c.layout for c in cases} == set(LAYOUTS) and any(c.p > 0 for c in cases)
    assert all(c.m >= 16 for c in cases)


@pytest.mark.parametrize("device_name, case", device_cases(EXPAND_CASES))
def test_expand_add(device_name, case):
    device = use_device(device_name, "expand_add_")
    s = expand_add_sample(case, device)
    y, h, lora_b, scale, offsets = s.args
    y0 = y.clone()
    before = snapshot({"h": h, "lora_b": lora_b})
    with poisoned_allocations():
        result = s.run()
    assert result is None
    ref64 = reference.expand_add(to64(y0), to64(h), to64(lora_b), scale, offsets)
    plain = reference.expand_add(y0, h, lora_b, scale, offsets)
    check_result(f"expand_add_ [{case}] y", case, y, plain, ref64)
    assert_guards_intact(s)
    assert_unchanged(before, {"h": h, "lora_b": lora_b}, f"expand_add_ [{case}]")


@pytest.mark.parametrize("device_name, case", device_cases(MERGE_CASES))
def test_merge(device_name, case):
    device = use_device(device_name, "merge_")
    s = merge_sample(case, device)
    weight, lora_a, lora_b, scale, transposed = s.args
    w0 = weight.clone()
    before = snapshot({"lora_a": lora_a, "lora_b": lora_b})
    with poisoned_allocations():
        result = s.run()
    assert result is None
    ref64 = reference.merge(to64(w0), to64(lora_a), to64(lora_b), scale, transposed)
    plain = reference.merge(w0, lora_a, lora_b, scale, transposed)
    check_result(f"merge_ [{case}] weight", case, weight, plain, ref64)
    assert_guards_intact(s)
    assert_unchanged(before, {"lora_a": lora_a, "lora_b": lora_b}, f"merge_ [{case}]")


# Ranks that the grid's r in {1, 8, 16, 64} leaves out: the CPU's one-read grad_y pass holds r in
# vectors of 16 lanes (the last one masked) and rows in groups of 8, 4 or 2 by vector count; these reach
# 2 and 3 vectors, r just past a vector, r past its limit of 64 (the BLAS path), row tails of every
# group size, slices, and strided grad_y / h.
WIDE_RANK_BACKWARD_CASES = [
    Case(m, k, n, r, F32, F32, offsets, layout=layout)
    for (m, k, n, r, offsets) in (
        (9, 13, 67, 17, ()),
        (300, 67, 250, 32, ()),
        (7, 250, 13, 40, (0, 3, 8, 13)),
        (5, 13, 67, 48, ()),
        (3, 67, 1, 65, ()),
        (1, 13, 250, 24, ()),
    )
    for layout in ("contiguous", "padded")
] + [
    # bf16 / fp16 values: the grad_y rows widened block by block, then the same loop
    Case(300, 67, 250, 32, BF16, F32),
    Case(7, 250, 13, 40, F16, F16, (0, 3, 8, 13), layout="padded"),
    Case(9, 13, 67, 17, BF16, BF16),
]


# The tiling edges of the CUDA backward's two passes (csrc/cuda/backward.cu): tiles of 256 columns,
# groups of 32 rows, warps owning tiles of 8 ranks (up to 8 tiles, 64 ranks, per block; fewer tiles
# split the rows by phase), further 64-rank groups along grid.z. Between them: r in {16, 24, 40, 72}
# (2, 3, 5 and 9 tiles: 4, 2, 1 phases, idle warps, r > 64 in the grad_y pass) and R up to 128 (two
# rank groups in the x pass); N, K up to 1030 (several column tiles, the last partial) with slice
# boundaries inside a tile and inside a lane's 8 columns, a tile meeting 4 slices, S = 8; M in {33,
# 77, 300, 1000} (not multiples of 32); grad_x given and None; dropout; an integer-valued float32
# case that must come out exact. They run on the CPU as well.
CUDA_TILING_BACKWARD_CASES = [
    Case(1000, 600, 600, 24, BF16, F32, (0, 100, 300, 600), 0.1, "padded", scale=-0.45),
    Case(77, 600, 600, 72, F32, F32, (), 0.0, "contiguous", scale=1.7, grad_x=False),
    Case(300, 520, 1030, 16, F16, F16, (0, 3, 8, 13, 250, 270, 700, 1000, 1030), 0.1, "contiguous", scale=1.7),
    Case(33, 13, 67, 40, BF16, BF16, (), 0.1, "transposed", scale=-0.45, grad_x=False),
    Case(300, 600, 600, 24, F32, F32, (0, 100, 300, 600), 0.5, "padded", "integers", 0.5),
]


# The CPU's float32 one-read passes split the columns too when few row chunks (up to 256 rows each)
# leave threads idle: column tiles of the x pass (256 columns and up, a multiple of 16; grad_a and grad_x
# columns computed within a tile) and of the grad_y pass (512 columns and up; g summed over the tiles'
# partials in order, grad_b's rows within a tile). These reach 2-4 tiles in both passes, slices cut by
# tile edges, a slice outside a tile, the dropout index of a tile, grad_x None, and r of 1 and 2 vectors.
CPU_COLUMN_TILE_BACKWARD_CASES = [
    Case(40, 1100, 1300, 16, F32, F32, (), 0.0),
    Case(40, 1100, 1300, 16, F32, F32, (), 0.1, "padded", scale=-0.45),
    Case(90, 700, 1500, 8, F32, F32, (0, 640, 1100, 1500), 0.0, scale=1.7),
    Case(3, 1040, 2100, 24, F32, F32, (0, 13, 2100), 0.1, grad_x=False),
    Case(600, 520, 1030, 16, F32, F32, (), 0.1),
    Case(33, 1030, 1030, 16, F32, F32, (), 0.5, "contiguous", "integers", 0.5),
]


def test_cuda_tiling_backward_cases_cover_the_edges():
    cases = CUDA_TILING_BACKWARD_CASES
    assert {16, 24, 40, 72} <= {c.r for c in cases} and max(c.rank_total for c in cases) > 64
    assert any(c.m % 32 for c in cases) and any(c.n > 512 and c.k > 512 for c in cases)
    assert any(c.slices == 8 for c in cases)
    # a slice boundary inside a 256-column tile, not on a multiple of 8
    assert any(any(off % 256 and off % 8 for off in c.offsets[1:-1]) for c in cases)
    assert {c.grad_x for c in cases} == {True, False} and any(c.p > 0 for c in cases)
    assert any(c.exact for c in cases)


@pytest.mark.parametrize("device_name, case",
                         device_cases(BACKWARD_CASES + WIDE_RANK_BACKWARD_CASES + CUDA_TILING_BACKWARD_CASES
                                      + CPU_COLUMN_TILE_BACKWARD_CASES))
def test_backward(device_name, case):
    device = use_device(device_name, "backward")
    s = backward_sample(case, device)
    grad_y, x, h, lora_a, lora_b, scale, p, seed, offsets, grad_x = s.args
    gx0 = None if grad_x is None else grad_x.clone()
    read_only = {n: t for n, t in s.tensors().items() if n != "grad_x"}
    before = snapshot(read_only)
    with poisoned_allocations():
        grad_a, grad_b = s.run()
    assert grad_a.dtype == lora_a.dtype and tuple(grad_a.shape) == tuple(lora_a.shape), "grad_a"
    assert grad_b.dtype == lora_b.dtype and tuple(grad_b.shape) == tuple(lora_b.shape), "grad_b"
    ref_a, ref_b, ref_x = reference.backward(to64(grad_y), to64(x), to64(h), to64(lora_a), to64(lora_b), scale, p,
                                             seed, offsets)
    plain_a, plain_b, plain_x = reference.backward(grad_y, x, h, lora_a, lora_b, scale, p, seed, offsets)
    check_result(f"backward [{case}] grad_a", case, grad_a, plain_a, ref_a, FACTOR_GRADIENTS)
    check_result(f"backward [{case}] grad_b", case, grad_b, plain_b, ref_b, FACTOR_GRADIENTS)
    if grad_x is not None:
        check_result(f"backward [{case}] grad_x", case, grad_x, gx0 + plain_x, to64(gx0) + ref_x, FACTOR_GRADIENTS)
    assert_guards_intact(s)
    assert_unchanged(before, read_only, f"backward [{case}]")


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=("f32", "bf16"))
@pytest.mark.parametrize("device_name", ("cpu", pytest.param("cuda", marks=pytest.mark.cuda)))
def test_backward_slices_read_only_their_columns(device_name, dtype):
    """Each slice's g = scale * grad_y[:, slice] @ lora_b[slice] reads only its own columns of grad_y: an
    inf in slice 0's columns leaves the gradients that do not depend on slice 0 finite and within the
    tolerance rule (the rows of grad_a of slices 1 and 2, the rows of grad_b other than the inf's
    column), as the reference computes them slice by slice."""
    device = use_device(device_name, "backward")
    gen = torch.Generator().manual_seed(0x511CE)
    m, k, r, offsets = 300, 40, 4, (0, 24, 40, 72)
    n, inf_col = offsets[-1], 5
    grad_y = torch.randn(m, n, generator=gen, dtype=torch.float64)
    grad_y[:, inf_col] = float("inf")
    x = torch.randn(m, k, generator=gen, dtype=torch.float64)
    h = torch.randn(m, 3 * r, generator=gen, dtype=torch.float64)
    lora_a = torch.randn(3 * r, k, generator=gen, dtype=torch.float64) * k**-0.5
    lora_b = torch.randn(n, r, generator=gen, dtype=torch.float64) * r**-0.5
    # h is float32 whatever the value dtype; the factors are in the values' dtype.
    inputs = [grad_y.to(dtype), x.to(dtype), h.float(), lora_a.to(dtype), lora_b.to(dtype)]
    grad_a, grad_b = torch.ops.loracuda.backward(*(t.to(device) for t in inputs), 0.7, 0.0, None, list(offsets), None)
    ref_a, ref_b, _ = reference.backward(*(to64(t) for t in inputs), 0.7, 0.0, None, offsets)
    plain_a, plain_b, _ = reference.backward(*inputs, 0.7, 0.0, None, offsets)
    rows = slice(r, 3 * r)  # grad_a rows of slices 1 and 2
    assert torch.isfinite(ref_a[rows]).all(), "test defect: the reference rows should be finite"
    assert_within_rule("grad_a, slices 1 and 2", grad_a[rows].cpu(), plain_a[rows], ref_a[rows], FACTOR_GRADIENTS)
    keep = [c for c in range(n) if c != inf_col]
    assert_within_rule("grad_b, rows without the inf", grad_b[keep].cpu(), plain_b[keep], ref_b[keep], FACTOR_GRADIENTS)


@pytest.mark.parametrize("device_name, case", device_cases(LORA_LINEAR_CASES))
def test_lora_linear_op(device_name, case):
    device = use_device(device_name, *LORA_LINEAR_OPS)
    s = lora_linear_sample(case, device)
    x, weight, bias, lora_a, lora_b, scale, p, seed, offsets = s.args
    before = snapshot(s.tensors())
    with poisoned_allocations():
        y, h = s.run()
    assert y.dtype == case.dtype and tuple(y.shape) == (case.m, case.n), f"y: {y.dtype} {tuple(y.shape)}"
    assert h.dtype == _acc(case.dtype) and tuple(h.shape) == (case.m, case.rank_total), f"h: {h.dtype}"
    ref_y = reference.lora_linear(to64(x), to64(weight), to64(bias), to64(lora_a), to64(lora_b), scale, p, seed,
                                  offsets)
    plain_y = reference.lora_linear(x, weight, bias, lora_a, lora_b, scale, p, seed, offsets)
    check_result(f"lora_linear [{case}] y", case, y, plain_y, ref_y)
    ref_h = reference.shrink(to64(x), to64(lora_a), p, seed)
    check_result(f"lora_linear [{case}] h", case, h, reference.shrink(x, lora_a, p, seed), ref_h)
    assert_unchanged(before, s.tensors(), f"lora_linear [{case}]")



def _grad_cases(cases):
    return [c for c in cases if max(c.m, c.n) >= 250 and c.adapter_dtype == torch.float32 and c.values == "random"
            and c.dtype in (torch.float32, torch.bfloat16)]


BUILDERS_NEEDING = {
    "shrink": (shrink_sample, SHRINK_CASES, ("x", "lora_a")),
    "expand_add_": (expand_add_sample, EXPAND_CASES, ("h", "lora_b")),
    "merge_": (merge_sample, MERGE_CASES, ("lora_a", "lora_b")),
    "backward": (backward_sample, BACKWARD_CASES, ("grad_y", "x", "h", "lora_a", "lora_b")),
}
GRAD_PARAMS = [
    pytest.param(op, device_name, case, id=f"{op}-{p.id}")
    for op, (_, cases, _) in BUILDERS_NEEDING.items()
    for p in device_cases(_grad_cases(cases))
    for device_name, case in [p.values]
]


@pytest.mark.parametrize("grad_enabled", (False, True), ids=("no_grad", "grad_enabled"))
@pytest.mark.parametrize("op, device_name, case", GRAD_PARAMS)
def test_inputs_that_require_grad(op, device_name, case, grad_enabled):
    """Read-only inputs that require grad (adapter parameters, activations of a training step) give the
    same bits as detached ones, on shapes large enough to use several threads. With grad mode on, the
    ops that write into an argument (they have no derivative) refuse them instead, naming the argument,
    and write nothing: their gradient would otherwise be silently missing (csrc/inplace_autograd.cpp)."""
    device = use_device(device_name, op)
    build, _, names = BUILDERS_NEEDING[op]
    plain, tracked = build(case, device), build(case, device)
    args = list(tracked.args)
    for name in names:
        i = tracked.names.index(name)
        args[i] = args[i].detach().requires_grad_(True)
    if grad_enabled and op in ("expand_add_", "merge_", "backward"):
        before = {name: bit_pattern(g.buffer) for name, g in tracked.guards.items()}
        with pytest.raises(RuntimeError, match=f"loracuda.{op} is not differentiable, but argument '{names[0]}'"):
            getattr(torch.ops.loracuda, op)(*args)
        for name, g in tracked.guards.items():
            assert torch.equal(bit_pattern(g.buffer), before[name]), f"{op}: '{name}' written before the error"
        return
    with torch.set_grad_enabled(grad_enabled):
        expected = plain.run()
        got = getattr(torch.ops.loracuda, op)(*args)
    outputs = [t for t in (got if isinstance(got, tuple) else (got,)) if t is not None]
    outputs += [g.view for g in tracked.guards.values()]
    reference_outputs = [t for t in (expected if isinstance(expected, tuple) else (expected,)) if t is not None]
    reference_outputs += [g.view for g in plain.guards.values()]
    for out, ref in zip(outputs, reference_outputs):
        assert torch.equal(out.detach(), ref), f"{op} [{case}]: requires_grad inputs changed the result"


@pytest.mark.parametrize("device_name, case", device_cases(
    [c for c in BACKWARD_CASES if c.m == 1000 and c.values == "random" and c.dtype != torch.float64][:3]
    + [c for c in CUDA_TILING_BACKWARD_CASES if c.m >= 300 and c.values == "random"]))
def test_backward_repeats_bit_for_bit(device_name, case):
    """The reductions over M (grad_a, grad_b) and, on CUDA, over g's column tiles are deterministic: two
    runs give identical bits (the tiling cases: several column tiles, row chunks and rank groups)."""
    device = use_device(device_name, "backward")
    first, second = backward_sample(case, device), backward_sample(case, device)
    out_1, out_2 = first.run(), second.run()
    for name, one, two in zip(("grad_a", "grad_b"), out_1, out_2):
        assert torch.equal(bit_pattern(one), bit_pattern(two)), f"backward [{case}]: {name} differs between runs"
    if case.grad_x:
        assert torch.equal(bit_pattern(first.guards["grad_x"].buffer), bit_pattern(second.guards["grad_x"].buffer))
