"""The emulation tier: every CUDA launcher, built from the real csrc/cuda sources for the host
(tests/emulation_build.py), run over the CPU tests' tiling-edge cases and checked against
loracuda.reference (tests/emulation_driver.py), with no GPU. See docs/design.md, section 'Emulation tier'.

- test_family[...]: each launcher family in a subprocess (a guard-page fault fails the test with the
  emulation's message instead of killing pytest); every case must pass.
- test_mma_instruction_matches_a_matmul: the emulated mma.sync m16n8k16 against a plain matmul.
- test_planted_*: a copy of the sources with one planted bug (a removed barrier, an off-by-one tail, a
  swapped fragment register) must make the harness fail, and fail in the way it exists to catch.
- test_binding_*: the CUDA binding's own checks, run on host tensors.
"""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import emulation_build

HERE = Path(__file__).resolve().parent
FAMILIES = ("shrink", "expand", "merge", "backward", "multi", "grouped")


def _driver(library: Path, extension: Path, family: str, *extra: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), str(HERE), env.get("PYTHONPATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [sys.executable, str(HERE / "emulation_driver.py"), "--library", str(library), "--extension",
           str(extension), "--family", family, *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


@pytest.fixture(scope="session")
def built():
    """(kernel library, extension) of the repository's sources, built once (cached in build/emulation)."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        library = pool.submit(emulation_build.kernel_library)
        extension = pool.submit(emulation_build.extension_path)
        return library.result(), extension.result()


@pytest.fixture(scope="session")
def family_runs(built):
    """Every family's driver run, two at a time (this machine's cores), started once for the session."""
    library, extension = built
    start = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        runs = dict(zip(FAMILIES, pool.map(lambda f: _driver(library, extension, f), FAMILIES)))
    print(f"\nemulation tier: every family ran in {time.monotonic() - start:.1f} s", file=sys.stderr)
    return runs


def _report(run: subprocess.CompletedProcess) -> str:
    failed = [line for line in run.stdout.splitlines() if line.startswith("FAIL")]
    tail = run.stdout.splitlines()[-1:] + failed[:20]
    return "\n".join(tail) + ("\n" + run.stderr[-3000:] if run.returncode not in (0, 1) or not failed else "")


@pytest.mark.parametrize("family", FAMILIES)
def test_family(family_runs, family):
    run = family_runs[family]
    assert run.returncode == 0, f"emulation of the {family} launchers failed (exit {run.returncode}):\n{_report(run)}"
    passed = [line for line in run.stdout.splitlines() if line.startswith("ok ")]
    assert len(passed) >= 10, f"{family}: only {len(passed)} cases ran:\n{run.stdout[-2000:]}"


# ---- the emulated tensor-core instruction ---------------------------------------------------------------


@pytest.fixture(scope="session")
def emulation(built):
    library, extension = built
    module = emulation_build.load(library, extension)
    return module


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=("bf16", "f16"))
@pytest.mark.parametrize("values", ("integers", "random"))
def test_mma_instruction_matches_a_matmul(emulation, dtype, values):
    """D = A B + C of mma.sync m16n8k16 from the fragments of the PTX layout, against float64 matmul:
    exact for small integers (every product and sum exact in float32), within float32 rounding of the
    16 + 1 terms otherwise."""
    g = torch.Generator().manual_seed(7 if values == "integers" else 11)
    if values == "integers":
        a = torch.randint(-8, 9, (16, 16), generator=g).to(dtype)
        b = torch.randint(-8, 9, (16, 8), generator=g).to(dtype)
        c = torch.randint(-64, 65, (16, 8), generator=g).to(torch.float32)
    else:
        a = torch.randn(16, 16, generator=g).to(dtype)
        b = torch.randn(16, 8, generator=g).to(dtype)
        c = torch.randn(16, 8, generator=g)
    d = emulation.mma_check(dtype == torch.float16, a.view(torch.int16).contiguous(), b.view(torch.int16).contiguous(),
                            c.contiguous())
    ref = a.double() @ b.double() + c.double()
    if values == "integers":
        assert torch.equal(d.double(), ref), "integer-valued mma must be exact"
    else:
        bound = 17 * 2.0**-24 * (a.double().abs() @ b.double().abs() + c.double().abs())
        assert bool(((d.double() - ref).abs() <= bound).all()), f"max error {float((d.double() - ref).abs().max()):.3e}"
    # A transposed operand (a plain matmul of the wrong layout) does not pass: the check can fail.
    wrong = a.double().t() @ b.double() + c.double()
    assert not torch.allclose(d.double(), wrong)


# ---- planted bugs ------------------------------------------------------------------------------------------


def _planted(tmp_path: Path, file: str, old: str, new: str) -> Path:
    csrc = emulation_build.copy_sources(tmp_path)
    path = csrc / "cuda" / file
    text = path.read_text()
    assert text.count(old) == 1, f"the planted bug's anchor must occur once in {file}: {old!r}"
    path.write_text(text.replace(old, new))
    return emulation_build.kernel_library(csrc)


def test_planted_missing_barrier_is_a_race(built, tmp_path):
    """shrink.cu without the barrier between staging a's tile and reading it: the race check reports it."""
    _, extension = built
    library = _planted(tmp_path, "shrink.cu", "      shared_store(a_s + ((kl & 7) * 32 + (kl >> 3)) * kAStride + jl, v);\n"
                       "    }\n    __syncthreads();\n",
                       "      shared_store(a_s + ((kl & 7) * 32 + (kl >> 3)) * kAStride + jl, v);\n    }\n")
    run = _driver(library, extension, "shrink", "--only", "f32.f32", "--limit", "3", "--stop-on-failure")
    assert run.returncode == 1, f"the harness missed a removed __syncthreads:\n{run.stdout}\n{run.stderr[-2000:]}"
    assert "shared-memory race" in run.stdout and "shrink_kernel" in run.stdout and "shrink.cu:" in run.stdout, run.stdout


def test_planted_off_by_one_tail_is_caught(built, tmp_path):
    """expand.cu staging one row of lora_b [N, r] past its end (n <= N): a guard-page fault or NaN from
    the poisoned padding in the results, never a pass."""
    _, extension = built
    library = _planted(tmp_path, "expand.cu", "const float v = (n < N && j < r) ? load_float(b + n * r + j) : 0.0f;",
                       "const float v = (n <= N && j < r) ? load_float(b + n * r + j) : 0.0f;")
    run = _driver(library, extension, "expand", "--limit", "4", "--stop-on-failure")
    assert run.returncode != 0, f"the harness missed an off-by-one tail:\n{run.stdout}"
    caught = ("memory fault" in run.stderr and "expand_kernel" in run.stderr) or "are not finite" in run.stdout
    assert caught, f"failed, but not for the planted tail:\n{run.stdout}\n{run.stderr[-2000:]}"


def test_planted_swapped_fragment_register_is_caught(built, tmp_path):
    """common.cuh feeding the two B registers of the tensor-core shrink in the wrong order: wrong results."""
    _, extension = built
    library = _planted(tmp_path, "common.cuh", "const uint32_t b_lo[2] = {av[j].x, av[j].y};",
                       "const uint32_t b_lo[2] = {av[j].y, av[j].x};")
    run = _driver(library, extension, "shrink", "--only", "M255_K1000", "--limit", "2", "--stop-on-failure")
    assert run.returncode == 1, f"the harness missed a swapped fragment register:\n{run.stdout}\n{run.stderr[-2000:]}"
    assert "||kernel - ref64||" in run.stdout or "differ from the exact result" in run.stdout, run.stdout


def test_planted_grouped_reduce_missing_barrier_is_a_race(built, tmp_path):
    """grouped.cu's reduce without the barrier between compacting a chunk's rows into shared memory and
    reading them back: the race check reports it."""
    _, extension = built
    library = _planted(tmp_path, "grouped.cu", "static_cast<int>(tid));\n    __syncthreads();\n",
                       "static_cast<int>(tid));\n")
    run = _driver(library, extension, "grouped", "--only", "M37_", "--limit", "1", "--stop-on-failure")
    assert run.returncode == 1, f"the harness missed a removed __syncthreads:\n{run.stdout}\n{run.stderr[-2000:]}"
    assert "shared-memory race" in run.stdout and "grouped_reduce_kernel" in run.stdout, run.stdout


# ---- the CUDA binding's own checks (csrc/cuda/bindings.cpp on host tensors) ------------------------------


def test_binding_refuses_float64_and_too_many_slices(emulation):
    x = torch.randn(4, 16, dtype=torch.float64)
    a = torch.randn(2, 16, dtype=torch.float64)
    with pytest.raises((ValueError, TypeError, RuntimeError), match="x.*float32, bfloat16 or float16 on CUDA"):
        emulation.shrink(x, a, 0.0, None)
    y = torch.zeros(3, 10)
    h = torch.randn(3, 10)  # 10 slices of rank 1
    b = torch.randn(10, 1)
    before = y.clone()
    with pytest.raises((ValueError, RuntimeError), match="slice_offsets.*at most 8 slices on CUDA"):
        emulation.expand_add_(y, h, b, 1.0, list(range(11)))
    assert torch.equal(y, before), "expand_add_ wrote y before refusing it"


def _overlapping_output_cases():
    """(op, call with an output two elements of which share memory, the argument's name)."""
    m, k, n, r = 5, 16, 12, 4
    g = torch.Generator().manual_seed(3)
    x = torch.randn(m, k, generator=g)
    a = torch.randn(r, k, generator=g)
    b = torch.randn(n, r, generator=g)
    h = torch.randn(m, r, generator=g)
    grad_y = torch.randn(m, n, generator=g)
    return [
        ("expand_add_", lambda ops: ops.expand_add_(torch.zeros(m, 1).expand(m, n), h, b, 1.0, []), "y"),
        ("expand_add_", lambda ops: ops.expand_add_(torch.zeros(1, 1).expand(1, n), h[:1], b, 1.0, []), "y"),
        ("merge_", lambda ops: ops.merge_(torch.zeros(n, 1).expand(n, k), a, b, 1.0, False), "weight"),
        ("backward", lambda ops: ops.backward(grad_y, x, h, a, b, 1.0, 0.0, None, [],
                                              torch.zeros(m, 1).expand(m, k)), "grad_x"),
    ]


@pytest.mark.parametrize("index", range(4), ids=("expand_add_-y", "expand_add_-one-row-y", "merge_-weight",
                                                 "backward-grad_x"))
def test_binding_refuses_overlapping_outputs_as_the_cpu_op_does(emulation, index):
    """An output whose elements share memory (a stride-0 expand) is refused by the CUDA binding, naming the
    argument, exactly when the CPU op refuses it (both run csrc/checks.h)."""
    op, call, arg = _overlapping_output_cases()[index]
    try:
        call(torch.ops.loracuda)
    except (ValueError, RuntimeError) as error:
        assert arg in str(error), f"the CPU {op} refused the overlapping {arg} without naming it: {error}"
    else:
        pytest.skip(f"csrc/checks.h does not refuse an overlapping {arg} yet (the CPU {op} accepts it)")
    with pytest.raises((ValueError, RuntimeError), match=arg):
        call(emulation)


def test_binding_refuses_aliased_grouped_outputs(emulation):
    """The CUDA binding of grouped_expand_add_ / grouped_backward applies the overlap rule before writing:
    y sharing memory with h, grad_x being x, are refused and nothing changes."""
    g = torch.Generator().manual_seed(5)
    m, k, n, r = 6, 8, 8, 2
    ids = torch.arange(m, dtype=torch.long) % 2
    y = torch.randn(m, n, generator=g)
    lb = torch.randn(2, n, r, generator=g)
    before = y.clone()
    with pytest.raises((ValueError, RuntimeError), match="'h' shares memory with 'y'"):
        emulation.grouped_expand_add_(y, y[:, :r], lb, ids, 1.0)
    assert torch.equal(y, before), "grouped_expand_add_ wrote y before refusing it"
    x, gy = torch.randn(m, k, generator=g), torch.randn(m, n, generator=g)
    la = torch.randn(2, r, k, generator=g)
    h = torch.randn(m, r, generator=g)
    x0 = x.clone()
    with pytest.raises((ValueError, RuntimeError), match="'x' shares memory with 'grad_x'"):
        emulation.grouped_backward(gy, x, h, la, lb, ids, 1.0, 0.0, None, x)
    assert torch.equal(x, x0), "grouped_backward wrote grad_x (= x) before refusing it"
