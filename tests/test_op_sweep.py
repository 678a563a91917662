"""A randomized sweep (hypothesis) of every loracuda op over shapes, strides, overlaps and dtypes.

Each draw builds the op's arguments with random layouts -- contiguous, transposed, a window at an
offset into a larger buffer, expand()-ed (stride 0), overlapping strides (rows one element apart) --
sometimes makes one argument a view into the storage of the tensor the op writes (aliasing), and
sometimes breaks a shape. The op must then either
  - raise a clean error (RuntimeError / ValueError / TypeError whose message names the op) and leave
    every buffer involved bit for bit as it was, or
  - give the plain-PyTorch reference's result (loracuda/reference.py) within the tolerance rule of
    tests/conftest.py (exact where the op is defined bit for bit: restore codes, exact round trips;
    float64 results within torch.testing.assert_close of the float64 reference, since there plain
    PyTorch and the float64 reference coincide), writing nothing outside the tensor it writes.

Runs: a few dozen draws per op in the default test run (a few seconds each, derandomized so a run is
reproducible); set LORACUDA_SWEEP_EXAMPLES=2000 (any count) for a longer, randomized sweep:
    LORACUDA_SWEEP_EXAMPLES=2000 python -m pytest tests/test_op_sweep.py -q
CPU only: the CUDA kernels are checked by the device-parametrized tests (this machine has no GPU).
"""

import os
from dataclasses import dataclass
from typing import Callable, Optional

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loracuda import ops, reference
from conftest import FACTOR_GRADIENTS, assert_within_rule, to64
from samples import bit_pattern

_EXAMPLES = int(os.environ.get("LORACUDA_SWEEP_EXAMPLES", "0"))
settings.register_profile(
    "loracuda-sweep",
    max_examples=_EXAMPLES or 30,
    deadline=None,
    derandomize=_EXAMPLES == 0,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
SWEEP = settings.get_profile("loracuda-sweep")

F64, F32, BF16, F16 = torch.float64, torch.float32, torch.bfloat16, torch.float16
VALUE_DTYPES = [F32, BF16, F16, F64]
LAYOUTS = ["contiguous", "contiguous", "transposed", "offset", "expanded", "overlapping"]
CLEAN_ERRORS = (RuntimeError, ValueError, TypeError)


@dataclass
class Arg:
    view: torch.Tensor
    base: torch.Tensor  # the tensor that owns the memory (snapshotted)
    layout: str


def _values(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=F64).to(dtype)


def make(draw, shape, dtype, name, layouts=LAYOUTS):
    """A 2-D (or n-D, contiguous / offset / expanded) tensor of `shape` in a drawn layout."""
    layout = draw(st.sampled_from(layouts), label=f"{name} layout")
    seed = draw(st.integers(0, 2**16), label=f"{name} seed")
    rows = shape[0]
    if layout == "transposed" and len(shape) == 2:
        base = _values((shape[1], rows), dtype, seed)
        return Arg(base.t(), base, layout)
    if layout == "offset":
        big = tuple(s + 2 for s in shape)
        base = _values(big, dtype, seed)
        view = base[tuple(slice(1, 1 + s) for s in shape)]
        return Arg(view, base, layout)
    if layout == "expanded" and rows > 1:
        base = _values((1,) + tuple(shape[1:]), dtype, seed)
        return Arg(base.expand(*shape), base, layout)
    if layout == "overlapping" and len(shape) == 2 and rows > 1 and shape[1] > 1:
        base = _values((rows + shape[1] + 1,), dtype, seed)
        return Arg(base.as_strided(shape, (1, 1), 1), base, layout)
    base = _values(shape, dtype, seed)
    return Arg(base, base, "contiguous")


def alias_into(draw, target: Arg, shape, dtype, name) -> Optional[Arg]:
    """A view of `shape` on the memory of `target`'s buffer (same dtype), or None if it cannot be made."""
    numel = 1
    for s in shape:
        numel *= s
    flat = target.base.reshape(-1) if target.base.is_contiguous() else None
    if flat is None or target.base.dtype != dtype or numel == 0 or numel > flat.numel():
        return None
    start = draw(st.integers(0, flat.numel() - numel), label=f"{name} alias offset")
    return Arg(flat[start : start + numel].view(shape), target.base, "alias")


def maybe_alias(draw, written: Arg, arg: Arg, name) -> Arg:
    if draw(st.integers(0, 5), label=f"alias {name}?") == 0:
        aliased = alias_into(draw, written, tuple(arg.view.shape), arg.view.dtype, name)
        if aliased is not None:
            return aliased
    return arg


def maybe_break(draw, n: int, name: str) -> int:
    """n, or (rarely) a wrong size: the op must refuse it cleanly."""
    return n + 1 if draw(st.integers(0, 15), label=f"break {name}?") == 0 else n


def slice_offsets(draw, n):
    s = draw(st.integers(1, min(3, n)), label="slices")
    if s == 1:
        return draw(st.sampled_from([(), (0, n)]), label="one-slice form"), 1
    inner = sorted(draw(st.sets(st.integers(1, n - 1), min_size=s - 1, max_size=s - 1), label="cuts"))
    return tuple([0] + inner + [n]), s


@dataclass
class Draw:
    op: str
    call: Callable[[], object]
    args: dict  # name -> Arg
    written: tuple  # names of the args the op writes
    check: Callable[[object, dict], None]  # (result, values before) -> asserts


def run_draw(d: Draw):
    bases = {}
    for a in d.args.values():
        if a is not None:
            bases[id(a.base)] = a.base
    before_bits = {k: bit_pattern(b) for k, b in bases.items()}
    before_vals = {n: (None if a is None else a.view.clone()) for n, a in d.args.items()}
    try:
        result = d.call()
    except CLEAN_ERRORS as e:
        assert f"loracuda.{d.op}" in str(e), f"unclear error from {d.op}: {type(e).__name__}: {e}"
        for k, b in bases.items():
            changed = int((bit_pattern(b) != before_bits[k]).sum())
            assert changed == 0, f"{d.op} raised ({e}) but changed {changed} elements of an argument's buffer"
        return "error"
    # Success: nothing written outside the written views, then the op's own check.
    inside = {}
    for n in d.written:
        a = d.args[n]
        if a is None:
            continue
        idx = torch.arange(a.base.numel()).view(a.base.shape)
        pos = idx.as_strided(a.view.shape, a.view.stride(), a.view.storage_offset() - a.base.storage_offset())
        inside.setdefault(id(a.base), []).append(pos.reshape(-1))
    for k, b in bases.items():
        diff = (bit_pattern(b) != before_bits[k]).reshape(-1)
        if k in inside:
            diff[torch.cat(inside[k])] = False
        assert int(diff.sum()) == 0, f"{d.op} wrote {int(diff.sum())} elements outside the tensor it writes"
    d.check(result, before_vals)
    return "ok"


def adapter_dtype(draw, value_dtype, name):
    return draw(st.sampled_from([value_dtype, F32]), label=f"{name} dtype")


def dims(draw):
    return (
        draw(st.integers(0, 9), label="M"),
        draw(st.integers(1, 12), label="K"),
        draw(st.integers(1, 10), label="N"),
        draw(st.integers(1, 3), label="r"),
    )


def dropout(draw):
    p = draw(st.sampled_from([0.0, 0.0, 0.25]), label="p")
    seed = draw(st.integers(-(2**63), 2**63 - 1), label="seed") if p > 0 else None
    return p, seed


def scale_of(draw):
    return draw(st.sampled_from([1.0, -0.5, 2.0, 0.0, 1e39, float("nan")]), label="scale")


def rule(what, got, plain, ref64, factor=2.0):
    if got.dtype == F64:
        # The rule compares with plain PyTorch in the result's dtype, which for float64 is the float64
        # reference itself (error 0): there the check is torch.testing's float64 closeness instead.
        torch.testing.assert_close(got, ref64, msg=lambda m: f"{what} (float64): {m}")
        return
    assert_within_rule(what, got, plain, ref64, factor)


# ---- per-op draws ---------------------------------------------------------------------------------


@st.composite
def shrink_draw(draw):
    m, k, _, r = dims(draw)
    dt = draw(st.sampled_from(VALUE_DTYPES), label="dtype")
    x = make(draw, (m, k), dt, "x")
    a = make(draw, (maybe_break(draw, r, "R"), maybe_break(draw, k, "K")), adapter_dtype(draw, dt, "a"), "a")
    p, seed = dropout(draw)

    def check(h, v):
        rule("shrink", h, reference.shrink(v["x"], v["a"], p, seed), reference.shrink(to64(v["x"]), to64(v["a"]), p, seed))

    return Draw("shrink", lambda: ops.shrink(x.view, a.view, p, seed), {"x": x, "a": a}, (), check)


@st.composite
def expand_add_draw(draw):
    m, _, n, r = dims(draw)
    dt = draw(st.sampled_from(VALUE_DTYPES), label="dtype")
    offs, s = slice_offsets(draw, n)
    y = make(draw, (m, n), dt, "y")
    acc = F64 if dt == F64 else F32
    h = maybe_alias(draw, y, make(draw, (m, maybe_break(draw, s * r, "S*r")), acc, "h"), "h")
    b = maybe_alias(draw, y, make(draw, (n, r), adapter_dtype(draw, dt, "b"), "b"), "b")
    scale = scale_of(draw)

    def check(_, v):
        rule("expand_add_", y.view, reference.expand_add(v["y"], v["h"], v["b"], scale, offs),
             reference.expand_add(to64(v["y"]), to64(v["h"]), to64(v["b"]), scale, offs))

    return Draw("expand_add_", lambda: ops.expand_add_(y.view, h.view, b.view, scale, offs),
                {"y": y, "h": h, "b": b}, ("y",), check)


def merge_args(draw, layouts=LAYOUTS):
    _, k, n, r = dims(draw)
    dt = draw(st.sampled_from(VALUE_DTYPES), label="dtype")
    transposed = draw(st.booleans(), label="transposed")
    w = make(draw, (k, n) if transposed else (n, k), dt, "w", layouts)
    adt = adapter_dtype(draw, dt, "factors")
    a = maybe_alias(draw, w, make(draw, (r, maybe_break(draw, k, "K")), adt, "a"), "a")
    b = maybe_alias(draw, w, make(draw, (n, r), adt, "b"), "b")
    return w, a, b, transposed


@st.composite
def merge_draw(draw):
    w, a, b, tr = merge_args(draw)
    scale = scale_of(draw)

    def check(_, v):
        rule("merge_", w.view, reference.merge(v["w"], v["a"], v["b"], scale, tr),
             reference.merge(to64(v["w"]), to64(v["a"]), to64(v["b"]), scale, tr))

    return Draw("merge_", lambda: ops.merge_(w.view, a.view, b.view, scale, tr), {"w": w, "a": a, "b": b}, ("w",),
                check)


def unpack(codes, numel):
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8)
    return ((codes[:, None] >> shifts) & 3).reshape(-1)[:numel]


def assert_round_trip(w0, a, b, scale, tr, codes):
    """merge_ then unmerge_exact_ with `codes` and the code-3 originals restores w0 bit for bit."""
    w = w0.contiguous().clone()
    escapes = w.reshape(-1)[unpack(codes, w.numel()) == 3].clone()
    ops.merge_(w, a, b, scale, tr)
    ops.unmerge_exact_(w, a, b, scale, codes, tr, escape_values=escapes)
    assert torch.equal(bit_pattern(w), bit_pattern(w0)), "round trip with these codes is not exact"


@st.composite
def restore_codes_draw(draw):
    w, a, b, tr = merge_args(draw)
    scale = scale_of(draw)

    def check(codes, v):
        assert codes.dtype == torch.uint8 and codes.shape == ((v["w"].numel() + 3) // 4,)
        assert_round_trip(v["w"], v["a"], v["b"], scale, tr, codes)

    return Draw("restore_codes", lambda: ops.restore_codes(w.view, a.view, b.view, scale, tr),
                {"w": w, "a": a, "b": b}, (), check)


@st.composite
def merge_exact_draw(draw):
    w, a, b, tr = merge_args(draw)
    scale = scale_of(draw)
    budget = draw(st.sampled_from([-1, -1, 0, 64]), label="max_record_bytes")

    def check(result, v):
        codes, values = result
        want_w = v["w"].contiguous().clone()
        ops.merge_(want_w, v["a"], v["b"], scale, tr)
        assert torch.equal(bit_pattern(w.view), bit_pattern(want_w)), "merge_exact_ differs from merge_"
        assert torch.equal(codes, ops.restore_codes(v["w"].contiguous(), v["a"], v["b"], scale, tr))
        want_values = v["w"].reshape(-1)[unpack(codes, v["w"].numel()) == 3]
        assert torch.equal(bit_pattern(values), bit_pattern(want_values))

    return Draw("merge_exact_", lambda: ops.merge_exact_(w.view, a.view, b.view, scale, tr, budget),
                {"w": w, "a": a, "b": b}, ("w",), check)


@st.composite
def unmerge_exact_draw(draw):
    w, a, b, tr = merge_args(draw)
    scale = draw(st.sampled_from([1.0, -0.5, 3.0]), label="scale")
    original = w.view.clone()
    # A valid record of merging `original` (when the arguments allow one), written into w's memory.
    record = None
    try:
        merged = original.contiguous().clone()
        record = ops.merge_exact_(merged, a.view.clone(), b.view.clone(), scale, tr)
        w.view.copy_(merged)
    except CLEAN_ERRORS:
        pass
    if record is not None:
        codes_t, values_t = record
    else:
        codes_t, values_t = torch.zeros((w.view.numel() + 3) // 4, dtype=torch.uint8), w.view.new_empty(0)
    codes = Arg(codes_t, codes_t, "contiguous")
    if draw(st.integers(0, 5), label="codes alias?") == 0 and w.base.is_contiguous():
        raw = w.base.reshape(-1).view(torch.uint8)
        if raw.numel() >= codes_t.numel():
            codes = Arg(raw[: codes_t.numel()], w.base, "alias")
    with_values = draw(st.booleans(), label="escape_values given")
    values = Arg(values_t, values_t, "contiguous") if with_values else None

    def check(_, v):
        if record is None:
            return
        if with_values:
            assert torch.equal(bit_pattern(w.view), bit_pattern(original)), "unmerge_exact_ not bit exact"
        else:
            keep = unpack(codes_t, original.numel()) != 3
            got = bit_pattern(w.view.contiguous()).reshape(-1)[keep]
            assert torch.equal(got, bit_pattern(original).reshape(-1)[keep]), "unmerge_exact_ not bit exact"

    args = {"w": w, "a": a, "b": b, "codes": codes, "values": values}
    return Draw("unmerge_exact_", lambda: ops.unmerge_exact_(w.view, a.view, b.view, scale, codes.view, tr,
                                                            escape_values=None if values is None else values.view),
                args, ("w",), check)


@st.composite
def backward_draw(draw):
    m, k, n, r = dims(draw)
    dt = draw(st.sampled_from(VALUE_DTYPES), label="dtype")
    offs, s = slice_offsets(draw, n)
    acc = F64 if dt == F64 else F32
    x = make(draw, (m, k), dt, "x")
    gy = make(draw, (m, n), dt, "gy")
    adt = adapter_dtype(draw, dt, "factors")
    a = make(draw, (maybe_break(draw, s * r, "S*r"), k), adt, "a")
    b = make(draw, (n, r), adt, "b")
    p, seed = dropout(draw)
    h = make(draw, (m, s * r), acc, "h")
    gx = make(draw, (m, k), dt, "gx") if draw(st.booleans(), label="grad_x given") else None
    if gx is not None:
        for name in ("x", "gy"):
            pass
        x = maybe_alias(draw, gx, x, "x")
        gy = maybe_alias(draw, gx, gy, "gy")
    scale = draw(st.sampled_from([1.0, -0.5, float("nan")]), label="scale")

    def check(result, v):
        ga, gb = result
        plain = reference.backward(v["gy"], v["x"], v["h"], v["a"], v["b"], scale, p, seed, offs)
        ref = reference.backward(to64(v["gy"]), to64(v["x"]), to64(v["h"]), to64(v["a"]), to64(v["b"]), scale, p,
                                 seed, offs)
        rule("grad_a", ga, plain[0], ref[0], FACTOR_GRADIENTS)
        rule("grad_b", gb, plain[1], ref[1], FACTOR_GRADIENTS)
        if gx is not None:
            rule("grad_x", gx.view, v["gx"] + plain[2], to64(v["gx"]) + ref[2], FACTOR_GRADIENTS)

    args = {"x": x, "gy": gy, "a": a, "b": b, "h": h, "gx": gx}
    return Draw("backward", lambda: ops.backward(gy.view, x.view, h.view, a.view, b.view, scale, p, seed, offs,
                                                 None if gx is None else gx.view),
                args, ("gx",), check)


@st.composite
def lora_linear_draw(draw):
    m, k, n, r = dims(draw)
    dt = draw(st.sampled_from(VALUE_DTYPES), label="dtype")
    offs, s = slice_offsets(draw, n)
    x = make(draw, (m, k), dt, "x")
    w = make(draw, (n, maybe_break(draw, k, "K")), dt, "w")
    bias = make(draw, (n, 1), dt, "bias", ["contiguous"]) if draw(st.booleans(), label="bias") else None
    adt = adapter_dtype(draw, dt, "factors")
    a = make(draw, (s * r, k), adt, "a")
    b = make(draw, (n, r), adt, "b")
    p, seed = dropout(draw)
    scale = scale_of(draw)
    bias_t = None if bias is None else bias.view[:, 0]
    seed_t = None if seed is None else torch.tensor([seed])

    def check(result, v):
        y, _ = result
        bv = None if bias is None else v["bias"][:, 0]
        plain = reference.lora_linear(v["x"], v["w"], bv, v["a"], v["b"], scale, p, seed, offs)
        ref = reference.lora_linear(to64(v["x"]), to64(v["w"]), to64(bv), to64(v["a"]), to64(v["b"]), scale, p, seed,
                                    offs)
        rule("lora_linear", y, plain, ref)

    return Draw("lora_linear", lambda: torch.ops.loracuda.lora_linear(x.view, w.view, bias_t, a.view, b.view, scale,
                                                                       p, seed_t, list(offs)),
                {"x": x, "w": w, "bias": bias, "a": a, "b": b}, (), check)


def multi_tables(draw, num_adapters, r_max, m):
    ranks = torch.tensor(draw(st.lists(st.integers(0, r_max), min_size=num_adapters, max_size=num_adapters),
                              label="ranks"), dtype=torch.int32)
    ids = torch.tensor(draw(st.lists(st.integers(-1, num_adapters - 1), min_size=m, max_size=m), label="ids"),
                       dtype=torch.int32)
    return Arg(ranks, ranks, "contiguous"), Arg(ids, ids, "contiguous")


@st.composite
def multi_shrink_draw(draw):
    m, k, _, r = dims(draw)
    dt = draw(st.sampled_from(VALUE_DTYPES), label="dtype")
    num_adapters, s = draw(st.integers(1, 3), label="L"), draw(st.integers(1, 2), label="S")
    x = make(draw, (m, k), dt, "x")
    a = make(draw, (num_adapters, s * r, maybe_break(draw, k, "K")), adapter_dtype(draw, dt, "a"), "a",
             ["contiguous", "offset", "expanded"])
    ranks, ids = multi_tables(draw, num_adapters, r, m)

    def check(h, v):
        plain = reference.multi_shrink(v["x"], v["a"], ranks.view, ids.view, s)
        rule("multi_shrink", h, plain, reference.multi_shrink(to64(v["x"]), to64(v["a"]), ranks.view, ids.view, s))

    return Draw("multi_shrink", lambda: ops.multi_shrink(x.view, a.view, ranks.view, ids.view, s),
                {"x": x, "a": a, "ranks": ranks, "ids": ids}, (), check)


@st.composite
def multi_expand_add_draw(draw):
    m, _, n, r = dims(draw)
    dt = draw(st.sampled_from(VALUE_DTYPES), label="dtype")
    offs, s = slice_offsets(draw, n)
    num_adapters = draw(st.integers(1, 3), label="L")
    acc = F64 if dt == F64 else F32
    y = make(draw, (m, n), dt, "y")
    h = maybe_alias(draw, y, make(draw, (m, s * r), acc, "h"), "h")
    b = make(draw, (num_adapters, n, r), adapter_dtype(draw, dt, "b"), "b", ["contiguous", "offset", "expanded"])
    b = maybe_alias(draw, y, b, "b")
    scales_list = draw(st.lists(st.sampled_from([1.0, -0.5, 2.0, float("nan")]), min_size=num_adapters,
                                max_size=num_adapters), label="scales")
    scales_t = torch.tensor(scales_list, dtype=torch.float32)
    scales = maybe_alias(draw, y, Arg(scales_t, scales_t, "contiguous"), "scales")
    ranks, ids = multi_tables(draw, num_adapters, r, m)

    def check(_, v):
        plain = reference.multi_expand_add(v["y"], v["h"], v["b"], v["scales"], ranks.view, ids.view, offs)
        ref = reference.multi_expand_add(to64(v["y"]), to64(v["h"]), to64(v["b"]), v["scales"], ranks.view, ids.view,
                                         offs)
        rule("multi_expand_add_", y.view, plain, ref)

    args = {"y": y, "h": h, "b": b, "scales": scales, "ranks": ranks, "ids": ids}
    return Draw("multi_expand_add_", lambda: ops.multi_expand_add_(y.view, h.view, b.view, scales.view, ranks.view,
                                                                    ids.view, offs),
                args, ("y",), check)


DRAWS = {
    "shrink": shrink_draw,
    "expand_add_": expand_add_draw,
    "merge_": merge_draw,
    "restore_codes": restore_codes_draw,
    "merge_exact_": merge_exact_draw,
    "unmerge_exact_": unmerge_exact_draw,
    "backward": backward_draw,
    "lora_linear": lora_linear_draw,
    "multi_shrink": multi_shrink_draw,
    "multi_expand_add_": multi_expand_add_draw,
}


@pytest.mark.parametrize("op", list(DRAWS))
def test_sweep(op):
    outcomes = []

    @SWEEP
    @given(d=DRAWS[op]())
    def sweep(d):
        outcomes.append(run_draw(d))

    sweep()
    print(f"{op}: {outcomes.count('ok')} results, {outcomes.count('error')} errors")
    # Both kinds of outcome must occur, or the sweep checks less than it claims.
    assert "ok" in outcomes and "error" in outcomes, f"{op}: outcomes {sorted(set(outcomes))}"
