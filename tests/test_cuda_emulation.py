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
FAMILIES = ("shrink", "expand", "merge", "backward", "multi")


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
