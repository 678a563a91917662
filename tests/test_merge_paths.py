"""The CPU merge family's code paths against each other and its roundings against torch's casts.

The CPU kernels pick a path per machine (AVX-512 with the fused epilogue of csrc/cpu/merge_fused.h for
rows of a multiple of 4 elements, for bf16 / fp16 with or without the AVX512_BF16 + AVX512_VBMI2
variant, AVX2, generic); LORACUDA_CPU_ISA=avx512-base / avx2 / generic limits the choice in a fresh
process. Every path must give the same bits: merge_'s weights, restore_codes, merge_exact_'s
record, unmerge_exact_'s weights, for every dtype, both layouts, and shapes with column tails (not a
multiple of 16 or 32), row tails (not a multiple of 8) and rows whose length is not a multiple of 4.

The roundings: merge_ of a weight of -0 with a rank-1 delta 1 * a (exact) writes T(a) -- a float32 ->
bf16 / fp16 cast of arbitrary bit patterns, compared with torch's .to(); NaN becomes c10's canonical
NaN. And a delta of -0 (w + -0 == w) widens and narrows every 16-bit pattern.
"""

import os
import subprocess
import sys

import pytest
import torch

from loracuda import ops

from samples import bit_pattern

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# (rows, cols, r): rows of the stored weight; cols its row length (a multiple of 4 but not of 16 / 32,
# a multiple of 32, not a multiple of 4), rows with and without a partial block of 8.
PATH_SHAPES = ((8, 4, 1), (16, 32, 16), (24, 48, 3), (17, 36, 16), (40, 1028, 16), (9, 20, 2), (33, 100, 7),
               (13, 13, 5), (8, 250, 16), (64, 64, 16))
PATH_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _case_tensors(rows, cols, r, dtype, transposed, seed):
    """weight [rows, cols] as stored, adapters of the logical [N, K] = [cols, rows] if transposed; a
    delta large against the weight for part of the elements so that all four codes occur."""
    g = torch.Generator().manual_seed(seed)
    n, k = (cols, rows) if transposed else (rows, cols)
    weight = (torch.randn(rows, cols, generator=g, dtype=torch.float64) * 0.05).to(dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    lora_a = torch.randn(r, k, generator=g, dtype=acc) * 0.3
    lora_b = torch.randn(n, r, generator=g, dtype=acc) * 0.02
    lora_b[::3] *= 40  # rows with large deltas: escapes
    return weight, lora_a, lora_b


def path_results():
    """Every op of the family on every case, as bit patterns (run in a worker process)."""
    out = {}
    for rows, cols, r in PATH_SHAPES:
        for dtype in PATH_DTYPES:
            for transposed in (False, True):
                key = f"{rows}x{cols} r{r} {dtype} t{int(transposed)}"
                w, a, b = _case_tensors(rows, cols, r, dtype, transposed, seed=rows * 7919 + cols)
                scale = 1.75
                merged = w.clone()
                ops.merge_(merged, a, b, scale, transposed)
                codes = ops.restore_codes(w, a, b, scale, transposed)
                exact = w.clone()
                ecodes, values = ops.merge_exact_(exact, a, b, scale, transposed)
                unmerged = merged.clone()
                ops.unmerge_exact_(unmerged, a, b, scale, codes, transposed)  # escapes left as rounded
                restored = exact.clone()
                ops.unmerge_exact_(restored, a, b, scale, ecodes, transposed, escape_values=values)
                out[key] = {
                    "merged": bit_pattern(merged), "codes": codes, "exact": bit_pattern(exact), "ecodes": ecodes,
                    "values": bit_pattern(values), "unmerged": bit_pattern(unmerged),
                    "restored": bit_pattern(restored), "original": bit_pattern(w),
                }
    # Every 16-bit pattern as a weight, under large deltas (codes of NaN, inf, subnormal elements).
    for dtype in (torch.bfloat16, torch.float16):
        w = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(dtype).reshape(512, 128)
        g = torch.Generator().manual_seed(5)
        a = torch.randn(4, 128, generator=g)
        b = torch.randn(512, 4, generator=g) * 1e-3
        b[::2] *= 1e6
        exact = w.clone()
        ecodes, values = ops.merge_exact_(exact, a, b, 0.5, False)
        restored = exact.clone()
        ops.unmerge_exact_(restored, a, b, 0.5, ecodes, False, escape_values=values)
        out[f"all {dtype}"] = {"exact": bit_pattern(exact), "ecodes": ecodes, "values": bit_pattern(values),
                               "restored": bit_pattern(restored), "original": bit_pattern(w)}
    return out


def _run_worker(isa, path):
    env = dict(os.environ)
    env.pop("LORACUDA_CPU_ISA", None)
    if isa is not None:
        env["LORACUDA_CPU_ISA"] = isa
    env["PYTHONPATH"] = os.pathsep.join([ROOT, HERE, env.get("PYTHONPATH", "")])
    code = f"import torch, test_merge_paths as t; torch.save(t.path_results(), {str(path)!r})"
    subprocess.run([sys.executable, "-c", code], env=env, check=True, cwd=ROOT, timeout=600)
    return torch.load(path)


def test_cpu_paths_agree_bit_for_bit(tmp_path):
    paths = (None, "avx512-base", "avx2", "generic")
    results = {isa or "best": _run_worker(isa, tmp_path / f"{isa}.pt") for isa in paths}
    best = results["best"]
    for name in paths[1:]:
        other = results[name]
        assert other.keys() == best.keys()
        for key, fields in best.items():
            for field, value in fields.items():
                assert torch.equal(value, other[key][field]), f"{key}: {field} differs between the best path and {name}"
    for key, fields in best.items():
        assert torch.equal(fields["restored"], fields["original"]), f"{key}: the exact round trip is not bit-exact"
    escapes = sum(f["values"].numel() for f in best.values())
    assert escapes > 0, "test defect: no escapes in the path grid"


def _merge_neg_zero(values_f32: torch.Tensor, dtype) -> torch.Tensor:
    """dtype(values) by merge_: a weight [8, cols] of -0 (8 rows: one whole block of the fused path)
    plus the rank-1 delta 1 * a with a = a chunk of the values, scale 1 (exact: w + d == d, -0 kept);
    every row must come out the same. cols = 4100 leaves a column tail of 4 after the blocks of 32."""
    cols = 4100
    out = []
    for chunk in values_f32.split(cols):
        w = torch.full((8, chunk.numel()), -0.0, dtype=dtype)
        ops.merge_(w, chunk.reshape(1, -1).contiguous(), torch.ones(8, 1), 1.0, False)
        assert all(torch.equal(bit_pattern(w[0]), bit_pattern(w[i])) for i in range(1, 8))
        out.append(w[0])
    return torch.cat(out)


def _float_patterns(seed: int) -> torch.Tensor:
    """float32 bit patterns: every exponent and sign with random mantissas, the rounding boundaries of
    bf16 (low 16 bits 0x7FFF, 0x8000, 0x8001 with either parity) and ties of fp16 in its normal and
    subnormal range, inf, NaN (quiet and signalling, both signs), +-0, fp32 subnormals."""
    g = torch.Generator().manual_seed(seed)
    exps = torch.arange(256, dtype=torch.int64)
    signs = torch.tensor([0, 1], dtype=torch.int64)
    mant = torch.randint(0, 1 << 23, (256, 2, 64), generator=g, dtype=torch.int64)
    bits = [(signs[None, :, None] << 31) | (exps[:, None, None] << 23) | mant]
    low = torch.tensor([0x7FFF, 0x8000, 0x8001, 0x0000, 0xFFFF, 0x17FFF, 0x18000, 0x18001], dtype=torch.int64)
    high = torch.randint(0, 1 << 16, (4096,), generator=g, dtype=torch.int64) << 16
    bits.append(((high[:, None] & ~0x10000) | low[None, :]))
    # fp16 ties: (m + 1/2) ulp for normal fp16 exponents (ulp 2^(e-10)) and the subnormal range (ulp 2^-24).
    m = torch.arange(0, 1 << 11, dtype=torch.float64)
    ties = [(m + 0.5) * 2.0**-24]
    for e in range(-14, 16):
        ties.append((1024 + (m[:1024] + 0.5)) * 2.0 ** (e - 10))
    t = torch.cat(ties).to(torch.float32)
    bits.append(torch.cat([t, -t]).view(torch.int32).to(torch.int64) & 0xFFFFFFFF)
    special = [0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00000, 0x7F800001, 0xFF812345, 0x7FFFFFFF, 0xFFFFFFFF,
               0x00000000, 0x80000000, 0x00000001, 0x807FFFFF, 0x7F7FFFFF, 0xFF7FFFFF, 0x477FF000, 0x477FEFFF]
    bits.append(torch.tensor(special, dtype=torch.int64))
    flat = torch.cat([x.reshape(-1) for x in bits])
    return flat.to(torch.int32).view(torch.float32)  # two's-complement wrap keeps the low 32 bits


def _c10_nan(dtype, values: torch.Tensor) -> torch.Tensor:
    """c10's NaN for a float32 NaN: bf16 0x7FC0; fp16 the sign | 0x7E00."""
    if dtype == torch.bfloat16:
        return torch.full(values.shape, 0x7FC0, dtype=torch.int16)
    sign = (values.view(torch.int32) < 0).to(torch.int32) << 15
    return (sign | 0x7E00).to(torch.int16)


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
def test_rounding_matches_torch_casts(dtype):
    values = _float_patterns(seed=11)
    got = bit_pattern(_merge_neg_zero(values, dtype))
    nan = torch.isnan(values)
    want = bit_pattern(values.to(dtype))
    assert torch.equal(got[~nan], want[~nan]), f"float32 -> {dtype} rounding differs from torch's cast"
    assert torch.equal(got[nan], _c10_nan(dtype, values[nan]))


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
def test_every_16_bit_pattern_survives_a_minus_zero_delta(dtype):
    w = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(dtype).reshape(256, 256)
    original = w.clone()
    # delta = 1 * (-0) = -0 everywhere: w + -0 == w, so the merge widens and narrows each pattern.
    ops.merge_(w, torch.full((1, 256), -0.0), torch.ones(256, 1), 1.0, False)
    nan = torch.isnan(original)
    assert torch.equal(bit_pattern(w)[~nan], bit_pattern(original)[~nan])
    assert torch.equal(bit_pattern(w)[nan], _c10_nan(dtype, original[nan].float()))


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16, torch.float32))
def test_fused_path_is_independent_of_the_thread_count(dtype):
    """Rows of 516 elements (the fused path where the CPU has it; 129 blocks of 8 rows and a partial
    one): merge_exact_'s weights, codes and escapes, and the restored weight, on 1 and 2 threads."""
    g = torch.Generator().manual_seed(3)
    weight = (torch.randn(1031, 516, generator=g) * 0.02).to(dtype)
    lora_a = torch.randn(16, 516, generator=g) * 0.05
    lora_b = torch.randn(1031, 16, generator=g) * 0.05
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            merged = weight.clone()
            codes, values = ops.merge_exact_(merged, lora_a, lora_b, 2.0, False)
            restored = merged.clone()
            ops.unmerge_exact_(restored, lora_a, lora_b, 2.0, codes, False, escape_values=values)
            results.append((bit_pattern(merged), codes, bit_pattern(values), bit_pattern(restored)))
    finally:
        torch.set_num_threads(before)
    assert results[0][2].numel() > 0, "test defect: no escapes"
    for name, one, two in zip(("merged", "codes", "escape values", "restored"), *results):
        assert torch.equal(one, two), f"{name} differ between 1 and 2 threads"
    assert torch.equal(results[0][3], bit_pattern(weight)), "the round trip is not bit-exact"
