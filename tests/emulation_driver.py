"""Runs the emulated CUDA ops (tests/emulation_build.py) over the CPU tests' tiling-edge cases and checks
each against loracuda.reference with the project's tolerance rule (tests/conftest.py). Run as a
subprocess by tests/test_cuda_emulation.py, so that a memory fault (a guard page hit) ends this process,
not pytest:

    python tests/emulation_driver.py --library L --extension E --family shrink [--limit N] [--only TEXT]

Prints one line per case ("ok <case>" or "FAIL <case>: <reason>") and exits 0 when every case passed,
1 otherwise (a fault exits 86 with the emulation's message on stderr).

Every input and output lives in a guard-page buffer (the extension's allocator: the data ends within
16 bytes of a no-access page and every other byte is NaN), on top of the samples' own NaN padding,
strided and misaligned layouts. Each case runs under a block order and a thread order (forward,
reversed, random) and an SM count that rotate with the case, so split-K plans and row chunkings vary.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import torch  # noqa: E402

from loracuda import reference  # noqa: E402

import emulation_build  # noqa: E402
from conftest import assert_guards_intact, assert_unchanged, check_result, snapshot, to64  # noqa: E402
from conftest import FACTOR_GRADIENTS  # noqa: E402
from samples import (  # noqa: E402
    BACKWARD_CASES,
    BF16,
    EXPAND_CASES,
    F16,
    F32,
    F64,
    MERGE_CASES,
    SHRINK_CASES,
    Case,
    backward_sample,
    bit_pattern,
    expand_add_sample,
    merge_sample,
    shrink_sample,
)

CPU = torch.device("cpu")
# (block order, thread order): 0 forward, 1 reversed, 2 random.
SCHEDULES = ((0, 0), (1, 1), (2, 2), (2, 0), (0, 2), (1, 2))
SM_COUNTS = (132, 8, 114)

emu = None  # the extension module, set in main()


@contextlib.contextmanager
def guarded():
    emu.guarded_allocation(True)
    try:
        yield
    finally:
        emu.guarded_allocation(False)


def _with_misaligned_x(case: Case, args: tuple, index: int = 0) -> tuple:
    """args with args[index] (2-D, contiguous) moved one element into a fresh NaN buffer: a data pointer
    that is not 16-byte aligned, so the kernels must take their element-wise path."""
    t = args[index]
    if not isinstance(t, torch.Tensor) or t.dim() != 2 or not t.is_contiguous() or t.numel() == 0:
        return args
    buf = torch.full((t.numel() + 1,), float("nan"), dtype=t.dtype)
    view = buf[1:].view(t.shape)
    view.copy_(t)
    return args[:index] + (view,) + args[index + 1 :]


# ---- shrink ------------------------------------------------------------------------------------------


def shrink_cases() -> list[Case]:
    from test_ops import MMA_SHRINK_CASES

    cases = [c for c in SHRINK_CASES + MMA_SHRINK_CASES if c.dtype != F64]
    # Ranks past the grid's: rank tiles of 16 (FMA) and 8 / 16 / 32 rows (MMA) ending inside a tile.
    cases += [
        Case(40, 300, 8, 65, F32, F32, (), 0.1),
        Case(70, 520, 8, 33, BF16, BF16, (), 0.0, "padded"),
        Case(33, 1000, 8, 65, F16, F16, (), 0.1),
        Case(5, 77, 8, 17, BF16, F32, (), 0.0, "transposed"),
    ]
    return cases


def run_shrink(case: Case, misaligned: bool) -> None:
    with guarded():
        s = shrink_sample(case, CPU)
        args = _with_misaligned_x(case, s.args) if misaligned else s.args
        x, lora_a, p, seed = args
        before = snapshot({"x": x, "lora_a": lora_a})
        h = emu.shrink(*args)
    assert h.dtype == torch.float32 and tuple(h.shape) == (case.m, case.rank_total), f"h: {h.dtype} {tuple(h.shape)}"
    ref64 = reference.shrink(to64(x), to64(lora_a), p, seed)
    plain = reference.shrink(x, lora_a, p, seed)
    check_result(f"shrink [{case}] h", case, h, plain, ref64)
    assert_unchanged(before, {"x": x, "lora_a": lora_a}, f"shrink [{case}]")


# ---- expand_add_ ---------------------------------------------------------------------------------------


def expand_cases() -> list[Case]:
    cases = [c for c in EXPAND_CASES if c.dtype != F64]
    cases += [
        Case(70, 13, 600, 24, BF16, BF16, (0, 3, 250, 270, 600), 0.0, "padded", scale=-0.45),
        Case(33, 13, 520, 65, F32, F32, (), 0.0, "contiguous", scale=1.7),
        Case(40, 13, 300, 17, F16, F32, (0, 299, 300), 0.0, "transposed", scale=0.5),
    ]
    return cases


def run_expand(case: Case, misaligned: bool) -> None:
    with guarded():
        s = expand_add_sample(case, CPU)
        y, h, lora_b, scale, offsets = s.args
        y0 = y.clone()
        before = snapshot({"h": h, "lora_b": lora_b})
        emu.expand_add_(y, h, lora_b, scale, offsets)
    ref64 = reference.expand_add(to64(y0), to64(h), to64(lora_b), scale, offsets)
    plain = reference.expand_add(y0, h, lora_b, scale, offsets)
    check_result(f"expand_add_ [{case}] y", case, y, plain, ref64)
    assert_guards_intact(s)
    assert_unchanged(before, {"h": h, "lora_b": lora_b}, f"expand_add_ [{case}]")


# ---- the merge family ------------------------------------------------------------------------------------


def merge_cases() -> list[Case]:
    cases = [c for c in MERGE_CASES if c.dtype != F64]
    # K % 4 == 0 (the codes modes' row kernel; the grid's K are odd or 250) and row / column tails.
    cases += [
        Case(0, 264, 37, 8, BF16, BF16, (), 0.0, "contiguous", "random", 1.7),
        Case(0, 8, 70, 3, F16, F32, (), 0.0, "padded", "random", -0.45),
        Case(0, 36, 300, 16, F32, F32, (), 0.0, "transposed", "random", 1.7, True),
        Case(0, 12, 9, 8, BF16, BF16, (), 0.0, "contiguous", "integers", 1.0),
    ]
    return cases


def run_merge(case: Case, misaligned: bool) -> None:
    with guarded():
        s = merge_sample(case, CPU)
        weight, lora_a, lora_b, scale, transposed = s.args
        w0 = weight.clone()
        before = snapshot({"lora_a": lora_a, "lora_b": lora_b})
        emu.merge_(weight, lora_a, lora_b, scale, transposed)
    ref64 = reference.merge(to64(w0), to64(lora_a), to64(lora_b), scale, transposed)
    plain = reference.merge(w0, lora_a, lora_b, scale, transposed)
    check_result(f"merge_ [{case}] weight", case, weight, plain, ref64)
    assert_guards_intact(s)
    assert_unchanged(before, {"lora_a": lora_a, "lora_b": lora_b}, f"merge_ [{case}]")
    merged = weight.clone()

    # restore_codes of the original weight, then unmerge_exact_ of the merged one: back bit for bit
    # where no escape was needed; merge_exact_ / unmerge_exact_ with escapes: back bit for bit everywhere.
    with guarded():
        codes = emu.restore_codes(w0, lora_a, lora_b, scale, transposed)
        assert codes.dtype == torch.uint8 and codes.numel() == (w0.numel() + 3) // 4, "codes"
        restored = merged.clone()
        emu.unmerge_exact_(restored, lora_a, lora_b, scale, transposed, codes, None)
    flat_codes = ((codes.view(-1, 1).to(torch.int32) >> torch.tensor([0, 2, 4, 6])) & 3).view(-1)[: w0.numel()]
    escaped = (flat_codes == 3).view(w0.shape)
    same = bit_pattern(restored) == bit_pattern(w0)
    wrong = int((~same & ~escaped).sum())
    assert wrong == 0, f"unmerge_exact_ [{case}]: {wrong} elements with a restore code 0-2 not restored bit for bit"

    with guarded():
        w1 = w0.clone()
        codes2, values = emu.merge_exact_(w1, lora_a, lora_b, scale, transposed, 1 << 40)
        assert torch.equal(codes2, codes), f"merge_exact_ [{case}]: codes differ from restore_codes"
        assert torch.equal(bit_pattern(w1), bit_pattern(merged)), f"merge_exact_ [{case}]: weight differs from merge_"
        emu.unmerge_exact_(w1, lora_a, lora_b, scale, transposed, codes2, values)
    assert torch.equal(bit_pattern(w1), bit_pattern(w0)), f"merge_exact_ + unmerge_exact_ [{case}]: not bit for bit"


# ---- backward --------------------------------------------------------------------------------------------


def backward_cases() -> list[Case]:
    from test_ops import CUDA_TILING_BACKWARD_CASES, WIDE_RANK_BACKWARD_CASES

    return [c for c in BACKWARD_CASES + WIDE_RANK_BACKWARD_CASES + CUDA_TILING_BACKWARD_CASES if c.dtype != F64]


def run_backward(case: Case, misaligned: bool) -> None:
    with guarded():
        s = backward_sample(case, CPU)
        args = _with_misaligned_x(case, s.args, 1) if misaligned else s.args
        grad_y, x, h, lora_a, lora_b, scale, p, seed, offsets, grad_x = args
        gx0 = None if grad_x is None else grad_x.clone()
        read_only = {"grad_y": grad_y, "x": x, "h": h, "lora_a": lora_a, "lora_b": lora_b}
        before = snapshot(read_only)
        grad_a, grad_b = emu.backward(*args)
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


# ---- multi-LoRA ------------------------------------------------------------------------------------------


def multi_cases() -> list:
    from test_multi_lora_ops import CASES, MMA_CASES, MultiCase

    cases = [c for c in CASES + MMA_CASES if c.dtype != F64]
    # Batched decode / prefill of many requests with distinct adapters: every 32-token tile mixes them.
    cases += [
        MultiCase(128, 520, 96, 16, 128, BF16, BF16, "distinct", (), "contiguous"),
        MultiCase(200, 67, 300, 8, 7, F32, F32, "random", (0, 100, 290, 300), "padded"),
        MultiCase(96, 40, 24, 16, 3, F16, F16, "random", (), "transposed"),
    ]
    return cases


def run_multi(case, misaligned: bool) -> None:
    import test_multi_lora_ops as t

    with guarded():
        x, lora_a_all, ranks, ids, slices = t.shrink_args(case, CPU)
        inputs = {"x": x, "lora_a_all": lora_a_all, "ranks": ranks, "adapter_ids": ids}
        before = snapshot(inputs)
        h = emu.multi_shrink(x, lora_a_all, ranks, ids, slices)
    ref64 = reference.multi_shrink(to64(x), to64(lora_a_all), ranks, ids, slices)
    plain = reference.multi_shrink(x, lora_a_all, ranks, ids, slices)
    check_result(f"multi_shrink [{case}] h", case, h, plain, ref64)
    outside = ~t.rank_mask(ranks, ids, case.r_max, case.slices)
    nonzero = int((h[outside] != 0).sum())
    assert nonzero == 0, f"multi_shrink [{case}]: {nonzero} elements of h outside the ranks / without adapter != 0"
    assert_unchanged(before, inputs, f"multi_shrink [{case}]")

    with guarded():
        guard, h, lora_b_all, scales, ranks, ids, offsets = t.expand_args(case, CPU)
        y = guard.view
        y0 = y.clone()
        inputs = {"h": h, "lora_b_all": lora_b_all, "scales": scales, "ranks": ranks, "adapter_ids": ids}
        before = snapshot(inputs)
        emu.multi_expand_add_(y, h, lora_b_all, scales, ranks, ids, offsets)
    ref64 = reference.multi_expand_add(to64(y0), to64(h), to64(lora_b_all), scales, ranks, ids, offsets)
    plain = reference.multi_expand_add(y0, h, lora_b_all, scales, ranks, ids, offsets)
    check_result(f"multi_expand_add_ [{case}] y", case, y, plain, ref64)
    none = ids < 0
    changed = int((bit_pattern(y)[none] != bit_pattern(y0)[none]).sum())
    assert changed == 0, f"multi_expand_add_ [{case}]: {changed} elements of rows without an adapter changed"
    assert guard.changed_outside() == 0, f"multi_expand_add_ [{case}]: guard elements around 'y' were written"
    assert_unchanged(before, inputs, f"multi_expand_add_ [{case}]")


# ---- grouped LoRA (mixture-of-experts experts) -----------------------------------------------------------


def grouped_cases() -> list:
    """tests/test_grouped_ops.py's grid without float64 (M = 0, one group, all rows -1, empty groups, r in
    {1, 16, 65}, K and N not multiples of 8, sorted / unsorted rows, padded / transposed x, stacked and
    PEFT-layout factor views, every 16-bit / float32 (value, factor) pair, integer-valued exact cases)."""
    from test_grouped_ops import CASES

    return [c for c in CASES if c.dtype != F64]


def run_grouped(case, misaligned: bool) -> None:
    """Every grouped op on one case: grouped_shrink, grouped_expand_add_, grouped_backward (with grad_x;
    also without it on every third case, bit for bit the same factor gradients), grouped_mm both
    orientations and grouped_weight_grad, and grouped_lora_linear's forward and backward as its CUDA
    composite runs them (csrc/grouped_lora_linear.cpp, csrc/grouped_lora_linear_autograd.cpp)."""
    import test_grouped_ops as t
    from samples import guarded as guarded_view

    index = t.CASES.index(case)
    with guarded():
        x = t.x_for(case, CPU)
        if misaligned:
            x = _with_misaligned_x(case, (x,))[0]
        lora_a, lora_b = t.factors(case, CPU)
        ids = t.group_ids(case)
        seed = t.seed_for(case)
        inputs = {"x": x, "lora_a": lora_a, "lora_b": lora_b, "group_ids": ids}
        before = snapshot(inputs)
        h = emu.grouped_shrink(x, lora_a, ids, case.p, seed)
    assert h.dtype == torch.float32 and tuple(h.shape) == (case.m, case.r), f"h: {h.dtype} {tuple(h.shape)}"
    t.check(f"grouped_shrink [{case}] h", case, h, reference.grouped_shrink(x, lora_a, ids, case.p, seed),
            reference.grouped_shrink(to64(x), to64(lora_a), ids, case.p, seed))
    assert int((h[ids < 0] != 0).sum()) == 0, f"grouped_shrink [{case}]: rows with id -1 are not 0"
    assert_unchanged(before, inputs, f"grouped_shrink [{case}]")

    # grouped_expand_add_ into a guarded y (h with integer values, as in the CPU test).
    with guarded():
        hv = t._place(t.draw(case, "h", (case.m, case.r), F32, magnitude=1), case.layout, CPU, F32)
        guard = guarded_view(t.draw(case, "y", (case.m, case.n), case.dtype, magnitude=2), case.layout, CPU,
                             case.dtype)
        y = guard.view
        y0 = y.clone()
        before = snapshot({"h": hv, "lora_b": lora_b, "group_ids": ids})
        emu.grouped_expand_add_(y, hv, lora_b, ids, case.scale)
    t.check(f"grouped_expand_add_ [{case}] y", case, y, reference.grouped_expand_add(y0, hv, lora_b, ids, case.scale),
            reference.grouped_expand_add(to64(y0), to64(hv), to64(lora_b), ids, case.scale))
    none = ids < 0
    changed = int((bit_pattern(y)[none] != bit_pattern(y0)[none]).sum())
    assert changed == 0, f"grouped_expand_add_ [{case}]: {changed} elements of rows with id -1 changed"
    assert guard.changed_outside() == 0, f"grouped_expand_add_ [{case}]: guard elements around 'y' were written"
    assert_unchanged(before, {"h": hv, "lora_b": lora_b, "group_ids": ids}, f"grouped_expand_add_ [{case}]")

    # grouped_backward with grad_x (guarded), and without it.
    with guarded():
        grad_y = t.x_for(case, CPU, "grad_y", case.n)
        h = t.h_for(case, CPU, x, lora_a, ids)
        gguard = guarded_view(t.draw(case, "grad_x", (case.m, case.k), case.dtype, magnitude=2), case.layout, CPU,
                              case.dtype)
        grad_x = gguard.view
        gx0 = grad_x.clone()
        inputs = {"grad_y": grad_y, "x": x, "h": h, "lora_a": lora_a, "lora_b": lora_b, "group_ids": ids}
        before = snapshot(inputs)
        grad_a, grad_b = emu.grouped_backward(grad_y, x, h, lora_a, lora_b, ids, case.scale, case.p, seed, grad_x)
        without = (emu.grouped_backward(grad_y, x, h, lora_a, lora_b, ids, case.scale, case.p, seed, None)
                   if index % 3 == 0 else None)
    assert grad_a.dtype == lora_a.dtype and tuple(grad_a.shape) == tuple(lora_a.shape), "grad_a"
    assert grad_b.dtype == lora_b.dtype and tuple(grad_b.shape) == tuple(lora_b.shape), "grad_b"
    r64 = reference.grouped_backward(to64(grad_y), to64(x), to64(h), to64(lora_a), to64(lora_b), ids, case.scale,
                                     case.p, seed)
    rp = reference.grouped_backward(grad_y, x, h, lora_a, lora_b, ids, case.scale, case.p, seed)
    t.check(f"grouped_backward [{case}] grad_a", case, grad_a, rp[0], r64[0], FACTOR_GRADIENTS)
    t.check(f"grouped_backward [{case}] grad_b", case, grad_b, rp[1], r64[1], FACTOR_GRADIENTS)
    gx_plain = (gx0.to(rp[2].dtype) + rp[2]).to(case.dtype)
    t.check(f"grouped_backward [{case}] grad_x", case, grad_x, gx_plain, to64(gx0) + r64[2], FACTOR_GRADIENTS)
    for g in t._empty_groups(ids, case.groups):
        assert int((grad_a[g] != 0).sum()) == 0 and int((grad_b[g] != 0).sum()) == 0, (
            f"grouped_backward [{case}]: group {g} has no rows but a non-zero gradient")
    if without is not None:
        assert torch.equal(without[0], grad_a) and torch.equal(without[1], grad_b), (
            f"grouped_backward [{case}]: factor gradients differ without grad_x")
    assert gguard.changed_outside() == 0, f"grouped_backward [{case}]: guard elements around 'grad_x' were written"
    assert_unchanged(before, inputs, f"grouped_backward [{case}]")

    # grouped_mm (both orientations) and grouped_weight_grad.
    with guarded():
        w = t.weight_for(case, CPU)
        out = emu.grouped_mm(x, w, ids, False)
        dx = emu.grouped_mm(grad_y, w, ids, True)
        dw = emu.grouped_weight_grad(grad_y, x, ids, case.groups)
    for what, got, fn, args in (
        ("y", out, reference.grouped_mm, (x, w, ids)),
        ("dx", dx, reference.grouped_mm, (grad_y, w, ids, True)),
        ("dw", dw, reference.grouped_weight_grad, (grad_y, x, ids, case.groups)),
    ):
        ref64 = fn(*(to64(a) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args))
        t.check(f"grouped_mm [{case}] {what}", case, got, fn(*args), ref64)
    assert int((out[none] != 0).sum()) == 0 and int((dx[none] != 0).sum()) == 0, f"grouped_mm [{case}]: id -1 rows"
    for g in t._empty_groups(ids, case.groups):
        assert int((dw[g] != 0).sum()) == 0, f"grouped_weight_grad [{case}]: empty group {g} not exactly 0"

    # grouped_lora_linear as the CUDA composite and its autograd formula call the kernels.
    with guarded():
        y_lin = emu.grouped_mm(x, w, ids, False)
        h_lin = emu.grouped_shrink(x, lora_a, ids, case.p, seed)
        emu.grouped_expand_add_(y_lin, h_lin, lora_b, ids, case.scale)
        dy = t.draw(case, "dy", (case.m, case.n), case.dtype).to(case.dtype)
        gx_lin = emu.grouped_mm(dy, w, ids, True)
        ga_lin, gb_lin = emu.grouped_backward(dy, x, h_lin, lora_a, lora_b, ids, case.scale, case.p, seed, gx_lin)
        gw_lin = emu.grouped_weight_grad(dy, x, ids, case.groups)

    def reference_grads(cast):
        leaves = [cast(v).detach().requires_grad_(True) for v in (x, w, lora_a, lora_b)]
        y_ref = reference.grouped_lora_linear(*leaves, ids, case.scale, case.p, seed)
        if y_ref.requires_grad:
            y_ref.backward(cast(dy))
        grads = [v.grad if v.grad is not None else torch.zeros_like(v) for v in leaves]
        return [y_ref.detach()] + grads

    plain, ref64 = reference_grads(lambda v: v), reference_grads(to64)
    got = (y_lin, gx_lin, gw_lin, ga_lin, gb_lin)
    for i, what in enumerate(("y", "grad_x", "grad_weight", "grad_a", "grad_b")):
        t.check(f"grouped_lora_linear [{case}] {what}", case, got[i], plain[i], ref64[i],
                2.0 if i == 0 else FACTOR_GRADIENTS)


FAMILIES = {
    "shrink": (shrink_cases, run_shrink),
    "expand": (expand_cases, run_expand),
    "merge": (merge_cases, run_merge),
    "backward": (backward_cases, run_backward),
    "multi": (multi_cases, run_multi),
    "grouped": (grouped_cases, run_grouped),
}


def main() -> int:
    global emu
    parser = argparse.ArgumentParser()
    parser.add_argument("--library", required=True)
    parser.add_argument("--extension", required=True)
    parser.add_argument("--family", required=True, choices=sorted(FAMILIES))
    parser.add_argument("--only", default="", help="run only the cases whose name contains this text")
    parser.add_argument("--limit", type=int, default=0, help="run at most this many cases")
    parser.add_argument("--stop-on-failure", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    emu = emulation_build.load(args.library, args.extension)
    make_cases, run = FAMILIES[args.family]
    cases = [c for c in make_cases() if args.only in str(c)]
    if args.limit:
        cases = cases[: args.limit]
    failures = 0
    for i, case in enumerate(cases):
        block_order, thread_order = SCHEDULES[i % len(SCHEDULES)]
        emu.set_schedule(block_order, thread_order, 0x5EED + i)
        emu.set_num_sms(SM_COUNTS[i % len(SM_COUNTS)])
        misaligned = i % 4 == 1
        label = f"{args.family} [{case}] schedule {block_order}/{thread_order}{' misaligned' if misaligned else ''}"
        try:
            run(case, misaligned)
            print(f"ok {label}", flush=True)
        except Exception as error:  # noqa: BLE001 -- every failure is reported, then the next case runs
            failures += 1
            message = str(error).strip().replace("\n", " | ")
            print(f"FAIL {label}: {type(error).__name__}: {message}", flush=True)
            if os.environ.get("LORACUDA_EMULATION_TRACEBACK"):
                traceback.print_exc()
            if args.stop_on_failure:
                break
    print(f"{args.family}: {len(cases) - failures} of {len(cases)} cases passed", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
