"""The package as a user installs it: a wheel of the CPU extension, built from the tracked sources,
installed into a fresh virtual environment (which sees this machine's torch, not this checkout), and
used from outside the source tree: it imports, runs an op against plain PyTorch, and `loracuda bench`
says where the benchmark harness lives (the wheel does not include it).

Slow the first time (it compiles the CPU kernels, at -O0: minutes on two cores), seconds when rerun with
few changes (the build folder persists under build/wheel-test); run by default."""

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SMOKE = r"""
import os, sys
import torch
import loracuda
from loracuda import ops

assert os.path.realpath(loracuda.__file__).startswith(os.path.realpath(sys.prefix)), loracuda.__file__
import loracuda.serving, loracuda.cli.main  # every subpackage is in the wheel
assert loracuda.build_info()["backends"][0] == "cpu", loracuda.build_info()
g = torch.Generator().manual_seed(0)
x = torch.randint(-4, 5, (37, 203), generator=g).double()
a = torch.randint(-4, 5, (5, 203), generator=g).double()
h = ops.shrink(x, a)
# Integer-valued inputs: every product and partial sum is exact, so the kernel must match exactly.
assert torch.equal(h, x @ a.t()), (h - x @ a.t()).abs().max()
print("wheel ok", loracuda.__file__)
"""


def _run(cmd, cwd, env, timeout):
    """Runs cmd in its own process group, so that a timeout stops the compilers it started too."""
    child = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    try:
        out, err = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        child.communicate()
        raise
    assert child.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{out[-3000:]}\n{err[-3000:]}"
    return subprocess.CompletedProcess(cmd, child.returncode, out, err)


# The copy of the sources the wheel is built from. It persists (under the ignored build/ folder) so that a
# rerun recompiles only the sources that changed since: ninja compares the copies' times and commands.
WHEEL_SOURCES = os.path.join(ROOT, "build", "wheel-test", "src")


def sources_copy() -> str:
    """The sources as a fresh clone has them (tracked and new files, not ignored ones: no prebuilt
    extension), mirrored into WHEEL_SOURCES; unchanged files keep their times, deleted ones go."""
    names = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split("\n")
    wanted = {n for n in names if n and os.path.isfile(os.path.join(ROOT, n))}
    for name in wanted:
        source, copy = os.path.join(ROOT, name), os.path.join(WHEEL_SOURCES, name)
        if os.path.isfile(copy):
            with open(source, "rb") as a, open(copy, "rb") as b:
                if a.read() == b.read():
                    continue
        os.makedirs(os.path.dirname(copy), exist_ok=True)
        shutil.copy2(source, copy)
    for folder, dirs, files in os.walk(WHEEL_SOURCES):
        rel = os.path.relpath(folder, WHEEL_SOURCES)
        if rel.split(os.sep)[0] in ("build", "dist") or ".egg-info" in rel:
            dirs[:] = []
            continue
        dirs[:] = [d for d in dirs if not d.endswith(".egg-info")]
        for f in files:
            name = os.path.normpath(os.path.join(rel, f))
            if name not in wanted:
                os.remove(os.path.join(folder, f))
    return WHEEL_SOURCES


@pytest.mark.slow
def test_wheel_installs_into_a_fresh_venv_and_runs_an_op(tmp_path):
    if shutil.which("git") is None or not os.path.isdir(os.path.join(ROOT, ".git")) and not os.path.isfile(
            os.path.join(ROOT, ".git")):
        pytest.skip("needs a git checkout to know which files are the sources")
    started = time.perf_counter()
    src = sources_copy()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    # -O0: this checks what a wheel holds and that it installs and runs, not how fast its kernels are;
    # an optimised build of the CPU kernels takes several times longer to compile.
    env.update(LORACUDA_SKIP_CUDA="1", LORACUDA_OPT_LEVEL="0", MAX_JOBS=env.get("MAX_JOBS", "2"), PIP_NO_INDEX="1",
               PIP_DISABLE_PIP_VERSION_CHECK="1")
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-w", str(dist), str(src)],
         cwd=tmp_path, env=env, timeout=1800)
    wheels = list(dist.glob("loracuda-*.whl"))
    assert len(wheels) == 1, wheels
    built = time.perf_counter()

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], cwd=tmp_path, env=env, timeout=300)
    python = str(venv / "bin" / "python")
    _run([python, "-m", "pip", "install", "--no-deps", "--no-index", str(wheels[0])], cwd=tmp_path, env=env,
         timeout=300)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    proc = _run([python, "-c", SMOKE], cwd=outside, env=env, timeout=300)
    assert "wheel ok" in proc.stdout and str(venv) in proc.stdout, proc.stdout

    # The harness is not in the wheel: the command says so in one line (exit 2), no traceback.
    bench = subprocess.run([python, "-m", "loracuda.cli.main", "bench", "--quick"], cwd=outside, env=env,
                           capture_output=True, text=True, timeout=120)
    assert bench.returncode == 2, bench.stdout + bench.stderr
    assert "bench/ folder" in bench.stderr and "Traceback" not in bench.stderr, bench.stderr
    print(f"wheel built in {built - started:.0f} s, installed and checked in {time.perf_counter() - built:.0f} s")
