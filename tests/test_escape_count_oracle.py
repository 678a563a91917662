"""The restore codes and the escape count of the exact merge, against their definition computed
independently of the kernels.

Definition (csrc/cpu/merge.cpp): with d the delta in the accumulation dtype F (float32; float64 for
float64 weights) and w an element of the weight in its dtype T,
    w1 = T(F(w) + d)    w2 = T(F(w1) - d)
code 0 if bits(w2) == bits(w), 1 if bits(w) == bits(w2) + 1, 2 if bits(w) == bits(w2) - 1 (unsigned bit
patterns), else 3: an "escape", whose original value the record must keep. The round-trip tests pass
with any number of escapes (an op that marked every element 3 would still restore the weight), so
this test counts them from the definition.

The oracle: factors that are small integers times powers of two and a power-of-two scale, so that
d = scale * (B @ A) is exact in float64 and exactly representable in F whatever the order of the
kernel's sums; weights of magnitude in [1/4, 4] (and some zeros), so that w + d and w1 - d are exact
in float64. Each rounding is then a single correct rounding of an exact float64 value (float64 ->
F -> T, the two roundings the definition itself makes), done by torch's dtype conversions, none of
loracuda's code.
"""

import zlib
from fractions import Fraction

import pytest
import torch

from loracuda import ops

F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16
BITS = {F32: 32, F64: 64, BF16: 16, F16: 16}
INT_VIEW = {F32: torch.int32, F64: torch.int64, BF16: torch.int16, F16: torch.int16}


def dyadic_factors(n, k, r, dtype, gen):
    """lora_a [r, k], lora_b [n, r] of small integers times 2^-2; rows of b scaled by 2^(4 - e), e = 0..9, and
    every 5th row of b zero, so deltas range from 0 over small to much larger than the weight."""
    a = torch.randint(-6, 7, (r, k), generator=gen).to(F64) / 4
    b = torch.randint(-6, 7, (n, r), generator=gen).to(F64) / 4
    b = b * torch.pow(2.0, 4 - (torch.arange(n) % 10).to(F64))[:, None]
    b[::5] = 0
    return a.to(dtype), b.to(dtype)


def weight_values(shape, dtype, gen):
    mag = torch.pow(2.0, torch.rand(shape, generator=gen, dtype=F64) * 4 - 2)  # [1/4, 4)
    sign = torch.where(torch.rand(shape, generator=gen) < 0.5, -1.0, 1.0).to(F64)
    w = (mag * sign).to(dtype)
    w.view(-1)[::17] = 0
    return w


def unsigned_bits(t):
    """Python ints: the unsigned bit pattern of each element."""
    raw = t.contiguous().view(INT_VIEW[t.dtype]).reshape(-1).tolist()
    mask = (1 << BITS[t.dtype]) - 1
    return [v & mask for v in raw]


def rounded_sum64(x, y):
    """float64 tensors: the correctly rounded float64 x + y of every element, from the exact sum
    (Fraction -> float rounds to nearest even), for float64 weights whose sums are not exact in float64."""
    out = [float(Fraction(u) + Fraction(v)) for u, v in zip(x.reshape(-1).tolist(), y.reshape(-1).tolist())]
    return torch.tensor(out, dtype=F64).reshape(x.shape)


def oracle_codes(w, a, b, scale, transposed):
    acc = F64 if w.dtype == F64 else F32
    d64 = scale * (b.to(F64) @ a.to(F64))
    if transposed:
        d64 = d64.t()
    if w.dtype == F64:  # w1 = round(w + d), w2 = round(w1 - d), each one rounding of the exact value
        w1 = rounded_sum64(w, d64)
        w2 = rounded_sum64(w1, -d64)
        return _codes(w, w2)
    assert torch.equal(d64.to(acc).to(F64), d64), "test defect: delta not representable in the accumulation dtype"
    w64 = w.to(F64)
    s1 = w64 + d64
    assert torch.equal(s1 - d64, w64), "test defect: w + d not exact in float64"
    w1 = s1.to(acc).to(w.dtype)
    s2 = w1.to(F64) - d64
    assert torch.equal(s2 + d64, w1.to(F64)), "test defect: w1 - d not exact in float64"
    w2 = s2.to(acc).to(w.dtype)
    return _codes(w, w2)


def _codes(w, w2):
    codes = []
    for bw, b2 in zip(unsigned_bits(w), unsigned_bits(w2)):
        codes.append(0 if bw == b2 else 1 if bw == b2 + 1 else 2 if bw == b2 - 1 else 3)
    changed = sum(1 for bw, b2 in zip(unsigned_bits(w), unsigned_bits(w2)) if bw != b2)
    return torch.tensor(codes, dtype=torch.uint8), changed


def unpack(codes, numel):
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8)
    return ((codes[:, None] >> shifts) & 3).reshape(-1)[:numel]


CASES = [
    (F32, F32, False),
    (F32, F32, True),
    (BF16, BF16, False),
    (BF16, F32, True),
    (F16, F16, False),
    (F16, F32, True),
    (F64, F64, False),
]


@pytest.mark.parametrize("dtype, adapter_dtype, transposed", CASES)
@pytest.mark.parametrize("scale", [1.0, 8.0, -0.5])
def test_codes_and_escape_count_follow_the_definition(dtype, adapter_dtype, transposed, scale):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((str(dtype), str(adapter_dtype), transposed, scale)).encode()))
    n, k, r = 24, 40, 4  # 24 rows: three blocks of 8, the AVX-512 path where the CPU has it
    a, b = dyadic_factors(n, k, r, adapter_dtype, gen)
    w = weight_values((k, n) if transposed else (n, k), dtype, gen)
    want, changed = oracle_codes(w, a, b, scale, transposed)
    escapes_want = int((want == 3).sum())
    # The case must exercise every code, or it checks little.
    assert all(int((want == c).sum()) > 0 for c in (0, 3)), f"test defect: codes {torch.bincount(want.long())}"

    got = unpack(ops.restore_codes(w, a, b, scale, transposed), w.numel())
    assert torch.equal(got, want), f"restore_codes: {int((got != want).sum())} of {w.numel()} codes differ"

    w_merged = w.clone()
    codes, values = ops.merge_exact_(w_merged, a, b, scale, transposed)
    assert torch.equal(unpack(codes, w.numel()), want)
    assert values.numel() == escapes_want, f"merge_exact_: {values.numel()} escapes, definition gives {escapes_want}"
    assert values.numel() <= changed  # bounded by the elements a plain unmerge does not restore
    assert torch.equal(values.view(INT_VIEW[dtype]), w.reshape(-1)[want == 3].view(INT_VIEW[dtype]))


def test_an_all_escape_record_would_fail_this_oracle():
    # Guard against a vacuous oracle: for a zero delta every code is 0, none is an escape.
    w = weight_values((8, 16), F32, torch.Generator().manual_seed(5))
    a, b = torch.zeros(2, 16), torch.zeros(8, 2)
    want, changed = oracle_codes(w, a, b, 1.0, False)
    assert int(want.sum()) == 0 and changed == 0
    codes, values = ops.merge_exact_(w.clone(), a, b, 1.0)
    assert values.numel() == 0 and int(codes.sum()) == 0
