"""merge_ / restore_codes / unmerge_exact_: the exact unmerge round trip, its restore codes, and merge_'s
determinism.

Round trip (the intended use): codes = restore_codes(W, ...) on the unmerged weight; save the
elements whose code is 3; merge_; later unmerge_exact_ with the codes and patch the saved elements
back. The weight must come back bit for bit, for fp32, bf16 and fp16 weights, adapters in the
weight's dtype or fp32, plain and transposed layouts. A merge_ with -scale is the plain (inexact)
unmerge: close to the original within the tolerance rule, not necessarily equal.
"""

import pytest
import torch

from loracuda import ops, reference

from conftest import (
    assert_guards_intact,
    assert_unchanged,
    check_result,
    device_cases,
    poisoned_allocations,
    snapshot,
    to64,
    use_device,
)
from samples import BF16, F16, F32, F64, MERGE_CASES, Case, bit_pattern, merge_sample

MERGE_OPS = ("merge_", "restore_codes", "unmerge_exact_")

# Deltas much larger than the weight: round(w + d) loses many of w's bits, so a fair share of the
# elements get code 3 and the caller's patch path is exercised.
LARGE_DELTA_CASES = [
    Case(0, 67, 13, 8, dtype, adapter_dtype, (), 0.0, layout, "random", 40.0, transposed)
    for dtype, adapter_dtype, layout, transposed in (
        (BF16, BF16, "contiguous", False),
        (BF16, F32, "padded", True),
        (F16, F16, "transposed", False),
        (F16, F32, "contiguous", True),
        (F32, F32, "padded", False),
        (F64, F64, "contiguous", True),
    )
]
ROUND_TRIP_CASES = MERGE_CASES + LARGE_DELTA_CASES


def unpack_codes(codes: torch.Tensor, numel: int) -> torch.Tensor:
    """uint8 [ceil(numel / 4)] -> int64 [numel]: element e's code is bits 2 * (e % 4) of byte e // 4."""
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.int64)
    return ((codes.cpu().to(torch.int64)[:, None] >> shifts) & 3).reshape(-1)[:numel]


def unsigned_bits(t: torch.Tensor) -> torch.Tensor:
    """The bit pattern of every element as a non-negative int64 (no sign extension), flattened."""
    bits = bit_pattern(t).reshape(-1).to(torch.int64)
    width = 8 * t.element_size()
    return bits if width == 64 else bits & ((1 << width) - 1)


@pytest.mark.parametrize("device_name, case", device_cases(ROUND_TRIP_CASES))
def test_round_trip_is_bit_exact(device_name, case):
    device = use_device(device_name, *MERGE_OPS)
    s = merge_sample(case, device)
    weight, lora_a, lora_b, scale, transposed = s.args
    original = weight.clone()
    before = snapshot({"weight": weight, "lora_a": lora_a, "lora_b": lora_b})

    with poisoned_allocations():
        codes = ops.restore_codes(weight, lora_a, lora_b, scale, transposed)
    assert codes.dtype == torch.uint8 and codes.device == device
    assert tuple(codes.shape) == ((weight.numel() + 3) // 4,)
    assert_unchanged(before, {"weight": weight, "lora_a": lora_a, "lora_b": lora_b}, "restore_codes (read-only)")

    code = unpack_codes(codes, weight.numel()).to(device)
    patch = torch.nonzero(code == 3).reshape(-1)
    saved = weight.reshape(-1)[patch].clone()
    if case in LARGE_DELTA_CASES and case.dtype != F64:
        assert patch.numel() > 0, "test defect: the large-delta case produced no code-3 element"

    ops.merge_(weight, lora_a, lora_b, scale, transposed)
    ops.unmerge_exact_(weight, lora_a, lora_b, scale, codes, transposed)
    weight.view(-1)[patch] = saved

    differ = int((bit_pattern(weight) != bit_pattern(original)).sum())
    assert differ == 0, f"[{case}] {differ} of {weight.numel()} elements not restored ({patch.numel()} patched)"
    assert_guards_intact(s)
    assert_unchanged({k: v for k, v in before.items() if k != "weight"}, {"lora_a": lora_a, "lora_b": lora_b},
                     "merge_/unmerge_exact_")


@pytest.mark.parametrize("device_name, case", device_cases(ROUND_TRIP_CASES))
def test_restore_codes_describe_the_plain_unmerge(device_name, case):
    """Each code says how round(round(w + d) - d) -- unmerge_exact_ with all codes 0 -- relates to w:
    0 equal bits, 1 w's pattern is one above, 2 one below, 3 anything else (unsigned patterns)."""
    device = use_device(device_name, *MERGE_OPS)
    s = merge_sample(case, device)
    weight, lora_a, lora_b, scale, transposed = s.args
    with poisoned_allocations():  # an unwritten byte reads 0xFF: four codes 3
        codes = ops.restore_codes(weight, lora_a, lora_b, scale, transposed)
    plain = weight.clone()
    ops.merge_(plain, lora_a, lora_b, scale, transposed)
    no_codes = torch.zeros_like(codes)
    ops.unmerge_exact_(plain, lora_a, lora_b, scale, no_codes, transposed)

    w_bits, u_bits = unsigned_bits(weight), unsigned_bits(plain)
    expected = torch.full_like(w_bits, 3)
    expected[w_bits == u_bits] = 0
    expected[w_bits == u_bits + 1] = 1
    expected[w_bits == u_bits - 1] = 2
    got = unpack_codes(codes, weight.numel())
    wrong = torch.nonzero(got != expected).reshape(-1)
    assert wrong.numel() == 0, (
        f"[{case}] {wrong.numel()} of {weight.numel()} codes wrong; first at element {int(wrong[0])}: "
        f"code {int(got[wrong[0]])}, expected {int(expected[wrong[0]])}"
    )


@pytest.mark.parametrize(
    "device_name, case",
    device_cases([c for c in ROUND_TRIP_CASES if c.dtype in (F32, BF16, F16) and c.values == "random"][::3]),
)
def test_merge_is_deterministic(device_name, case):
    """Two merges of the same weight give identical bits (unmerge_exact_ depends on it)."""
    device = use_device(device_name, "merge_", "restore_codes")
    s = merge_sample(case, device)
    weight, lora_a, lora_b, scale, transposed = s.args
    first, second = weight.clone(), weight.clone()
    ops.merge_(first, lora_a, lora_b, scale, transposed)
    ops.merge_(second, lora_a, lora_b, scale, transposed)
    assert torch.equal(bit_pattern(first), bit_pattern(second)), f"[{case}] merge_ is not deterministic"
    codes_1 = ops.restore_codes(weight, lora_a, lora_b, scale, transposed)
    codes_2 = ops.restore_codes(weight, lora_a, lora_b, scale, transposed)
    assert torch.equal(codes_1, codes_2), f"[{case}] restore_codes is not deterministic"


def test_merge_is_deterministic_on_a_large_weight(device):
    """A weight large enough to be split over many threads / thread blocks."""
    use_device(device.type, "merge_")
    g = torch.Generator().manual_seed(7)
    weight = torch.randn(1031, 517, generator=g).to(device=device, dtype=BF16)
    lora_a = (torch.randn(16, 517, generator=g) / 517**0.5).to(device=device, dtype=F32)
    lora_b = (torch.randn(1031, 16, generator=g) / 4).to(device=device, dtype=F32)
    first, second = weight.clone(), weight.clone()
    ops.merge_(first, lora_a, lora_b, 0.37, False)
    ops.merge_(second, lora_a, lora_b, 0.37, False)
    assert torch.equal(bit_pattern(first), bit_pattern(second))
    assert not torch.equal(first, weight), "the merge changed nothing (a no-op kernel would pass above)"


@pytest.mark.parametrize("device_name, case", device_cases(MERGE_CASES))
def test_merge_with_negative_scale_is_the_inexact_unmerge(device_name, case):
    """merge_(s) then merge_(-s) returns close to the original: the tolerance rule against the exact
    answer (the original weight), compared with plain PyTorch doing the same two steps."""
    device = use_device(device_name, "merge_")
    s = merge_sample(case, device)
    weight, lora_a, lora_b, scale, transposed = s.args
    original = weight.clone()
    ops.merge_(weight, lora_a, lora_b, scale, transposed)
    ops.merge_(weight, lora_a, lora_b, -scale, transposed)
    plain = reference.merge(reference.merge(original, lora_a, lora_b, scale, transposed), lora_a, lora_b, -scale,
                            transposed)
    check_result(f"merge_(s), merge_(-s) [{case}]", case, weight, plain, to64(original))
    assert_guards_intact(s)


@pytest.mark.parametrize("dtype, adapter_dtype", ((BF16, F32), (F16, F16), (F32, F32)))
def test_round_trip_across_cpu_thread_counts(dtype, adapter_dtype):
    """Codes made with one thread count, the merge with another and the unmerge with a third still
    restore the weight: each element's delta must not depend on how the work was split."""
    use_device("cpu", *MERGE_OPS)  # CPU only: thread counts split the CPU kernels' work
    g = torch.Generator().manual_seed(21)
    weight = torch.randn(515, 131, generator=g).to(dtype)
    lora_a = (torch.randn(16, 131, generator=g) / 131**0.5).to(adapter_dtype)
    lora_b = (torch.randn(515, 16, generator=g)).to(adapter_dtype)
    original = weight.clone()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(max(threads, 2))
        codes = ops.restore_codes(weight, lora_a, lora_b, 3.0, False)
        torch.set_num_threads(1)
        ops.merge_(weight, lora_a, lora_b, 3.0, False)
        torch.set_num_threads(max(threads, 2))
        ops.unmerge_exact_(weight, lora_a, lora_b, 3.0, codes, False)
    finally:
        torch.set_num_threads(threads)
    patch = torch.nonzero(unpack_codes(codes, weight.numel()) == 3).reshape(-1)
    weight.view(-1)[patch] = original.view(-1)[patch]
    assert torch.equal(bit_pattern(weight), bit_pattern(original))


# ---- merge_exact_: merge_ and its restore record in one pass ----------------------------------------

EXACT_OPS = ("merge_exact_", "merge_", "restore_codes", "unmerge_exact_")

# A tail (numel % 4 != 0) in both layouts with many escapes, for each value dtype.
TAIL_CASES = [
    Case(0, 7, 11, 3, dtype, dtype, (), 0.0, "contiguous", "random", 25.0, transposed)
    for dtype in (F32, BF16, F16)
    for transposed in (False, True)
]
EXACT_CASES = ROUND_TRIP_CASES + TAIL_CASES


def code3_positions(codes: torch.Tensor, numel: int, device) -> torch.Tensor:
    return torch.nonzero(unpack_codes(codes, numel) == 3).reshape(-1).to(device)


@pytest.mark.parametrize("device_name, case", device_cases(EXACT_CASES))
def test_merge_exact_is_merge_and_restore_codes(device_name, case):
    """Weight bitwise as merge_ leaves it, codes as restore_codes gives them, escape_values the original
    values of the code-3 elements in flat order; then unmerge_exact_ with them restores every bit."""
    device = use_device(device_name, *EXACT_OPS)
    s = merge_sample(case, device)
    weight, lora_a, lora_b, scale, transposed = s.args
    original = weight.clone()
    expected_codes = ops.restore_codes(weight, lora_a, lora_b, scale, transposed)
    expected_weight = weight.clone()
    ops.merge_(expected_weight, lora_a, lora_b, scale, transposed)
    factors = snapshot({"lora_a": lora_a, "lora_b": lora_b})

    with poisoned_allocations():
        codes, escape_values = ops.merge_exact_(weight, lora_a, lora_b, scale, transposed)
    assert torch.equal(bit_pattern(weight), bit_pattern(expected_weight)), f"[{case}] weight differs from merge_"
    assert codes.dtype == torch.uint8 and codes.device == device
    assert torch.equal(codes, expected_codes), f"[{case}] codes differ from restore_codes"
    pos = code3_positions(codes, weight.numel(), device)
    if case in LARGE_DELTA_CASES + TAIL_CASES and case.dtype != F64:
        assert pos.numel() > 0, "test defect: the case produced no code-3 element"
    assert escape_values.dtype == weight.dtype and escape_values.device == device
    assert tuple(escape_values.shape) == (pos.numel(),)
    assert torch.equal(bit_pattern(escape_values), bit_pattern(original.reshape(-1)[pos]))
    assert_unchanged(factors, {"lora_a": lora_a, "lora_b": lora_b}, "merge_exact_")

    ops.unmerge_exact_(weight, lora_a, lora_b, scale, codes, transposed, escape_values=escape_values)
    differ = int((bit_pattern(weight) != bit_pattern(original)).sum())
    assert differ == 0, f"[{case}] {differ} of {weight.numel()} elements not restored ({pos.numel()} escapes)"
    assert_guards_intact(s)


def test_merge_exact_on_a_large_weight_across_thread_counts():
    """Many row blocks over several threads: the escapes still come in flat order, and a record made
    with one thread count is undone with another."""
    use_device("cpu", *EXACT_OPS)  # CPU only: thread counts split the CPU kernels' work
    g = torch.Generator().manual_seed(5)
    weight = torch.randn(1031, 517, generator=g).to(BF16)
    lora_a = (torch.randn(16, 517, generator=g) / 517**0.5).to(F32)
    lora_b = (torch.randn(1031, 16, generator=g) * 8).to(F32)
    original = weight.clone()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(max(threads, 2))
        codes, values = ops.merge_exact_(weight, lora_a, lora_b, 0.9, False)
        torch.set_num_threads(1)
        ops.unmerge_exact_(weight, lora_a, lora_b, 0.9, codes, False, escape_values=values)
    finally:
        torch.set_num_threads(threads)
    pos = code3_positions(codes, weight.numel(), "cpu")
    assert pos.numel() > 1000, "test defect: too few escapes to spread over blocks"
    assert torch.equal(bit_pattern(values), bit_pattern(original.reshape(-1)[pos]))
    assert torch.equal(bit_pattern(weight), bit_pattern(original))


@pytest.mark.parametrize("dtype", (F32, BF16, F16))
def test_merge_exact_over_budget_raises_and_leaves_the_weight(device, dtype):
    use_device(device.type, *EXACT_OPS)
    case = Case(0, 13, 67, 8, dtype, dtype, (), 0.0, "contiguous", "random", 40.0, False)
    weight, lora_a, lora_b, scale, transposed = merge_sample(case, device).args
    before = snapshot({"weight": weight, "lora_a": lora_a, "lora_b": lora_b})
    probe = weight.clone()
    codes, values = ops.merge_exact_(probe, lora_a, lora_b, scale, transposed)
    needed = codes.numel() + values.numel() * weight.element_size()
    assert values.numel() > 0, "test defect: no escapes, the budget would only bound the codes"
    # One byte short (escapes over budget: the op has to undo its pass) and below the codes alone.
    for allowed in (needed - 1, codes.numel() - 1):
        with pytest.raises(ValueError, match="max_record_bytes") as info:
            ops.merge_exact_(weight, lora_a, lora_b, scale, transposed, max_record_bytes=allowed)
        assert str(needed if allowed == needed - 1 else codes.numel()) in str(info.value)
        assert str(allowed) in str(info.value)
        assert_unchanged(before, {"weight": weight, "lora_a": lora_a, "lora_b": lora_b}, f"budget {allowed}")
    # Exactly the needed bytes fit.
    codes_2, values_2 = ops.merge_exact_(weight, lora_a, lora_b, scale, transposed, max_record_bytes=needed)
    assert torch.equal(codes_2, codes) and torch.equal(bit_pattern(weight), bit_pattern(probe))


def test_merge_exact_empty_weight(device):
    use_device(device.type, *EXACT_OPS)
    weight = torch.empty(0, 5, device=device)
    codes, values = ops.merge_exact_(weight, torch.ones(2, 5, device=device), torch.ones(0, 2, device=device), 1.0)
    assert codes.shape == (0,) and values.shape == (0,) and values.dtype == weight.dtype
    ops.unmerge_exact_(weight, torch.ones(2, 5, device=device), torch.ones(0, 2, device=device), 1.0, codes,
                       escape_values=values)


def test_unmerge_exact_rejects_bad_escape_values(device):
    use_device(device.type, *EXACT_OPS)
    case = Case(0, 13, 67, 8, BF16, F32, (), 0.0, "contiguous", "random", 40.0, True)
    weight, lora_a, lora_b, scale, transposed = merge_sample(case, device).args
    codes, values = ops.merge_exact_(weight, lora_a, lora_b, scale, transposed)
    assert values.numel() > 1
    before = snapshot({"weight": weight})
    bad = {
        "one short": (values[:-1], ValueError),
        "one extra": (torch.cat([values, values[:1]]), ValueError),
        "wrong dtype": (values.to(F32), TypeError),
        "2-D": (values.reshape(1, -1), ValueError),
    }
    if device.type == "cuda":
        bad["wrong device"] = (values.cpu(), ValueError)
    for label, (v, error) in bad.items():
        with pytest.raises(error, match="escape_values"):
            ops.unmerge_exact_(weight, lora_a, lora_b, scale, codes, transposed, escape_values=v)
        assert_unchanged(before, {"weight": weight}, f"rejected escape_values ({label})")


def test_unmerge_exact_without_escape_values_still_leaves_escapes(device):
    """The call without escape_values is the old op: code-3 elements are left as the plain unmerge
    gives them, and patching them by hand restores the weight."""
    use_device(device.type, *EXACT_OPS)
    case = Case(0, 13, 67, 8, F16, F16, (), 0.0, "contiguous", "random", 40.0, False)
    weight, lora_a, lora_b, scale, transposed = merge_sample(case, device).args
    original = weight.clone()
    codes, values = ops.merge_exact_(weight, lora_a, lora_b, scale, transposed)
    ops.unmerge_exact_(weight, lora_a, lora_b, scale, codes, transposed)
    pos = code3_positions(codes, weight.numel(), device)
    assert pos.numel() > 0
    weight.view(-1)[pos] = values
    assert torch.equal(bit_pattern(weight), bit_pattern(original))
