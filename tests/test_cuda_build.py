"""The CUDA build: every op has a CUDA kernel, and every kernel keeps its state in registers.

Runs without a GPU. (1) needs a build of loracuda with its CUDA kernels; (2) needs nvcc and
compiles each csrc/cuda/*.cu on its own for sm_80 and sm_90, the default architectures (the .cu
files include no torch headers, so this takes seconds), reading ptxas's resource report.
"""

import os
import re
import subprocess
from pathlib import Path

import pytest

import loracuda.buildinfo as buildinfo

ROOT = Path(__file__).resolve().parent.parent
CUDA_SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))


def test_every_op_has_a_cuda_kernel():
    if "cuda" not in buildinfo.build_info()["backends"]:
        pytest.skip("this build of loracuda has no CUDA kernels (CPU-only build)")
    missing = [op for op in buildinfo.op_names() if not buildinfo.has_kernel(op, "CUDA")]
    assert not missing, f"ops without a CUDA kernel: {missing}"


def find_nvcc() -> str | None:
    for root in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if root and os.path.isfile(os.path.join(root, "bin", "nvcc")):
            return os.path.join(root, "bin", "nvcc")
    return None


# ptxas -v prints, per kernel:
#   ptxas info    : Function properties for <mangled name>
#       <a> bytes stack frame, <b> bytes spill stores, <c> bytes spill loads
_PROPERTIES = re.compile(
    r"Function properties for (\S+)\s*\n\s*(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads"
)


# The architectures a build without a visible GPU compiles for (setup.py's default): ptxas
# allocates registers per architecture, so a kernel can spill on one and not on the other.
DEFAULT_ARCHS = ("sm_80", "sm_90")


def ptxas_report(source: Path, out_dir: Path, arch: str = "sm_90") -> str:
    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip("no nvcc (set CUDA_HOME or install the CUDA toolkit in /usr/local/cuda)")
    cmd = [
        nvcc, "-cubin", f"-arch={arch}", "-O3", "-std=c++17", "-Xptxas", "-v",
        "-I", str(ROOT / "csrc"), "-I", str(ROOT / "csrc" / "cuda"),
        "-o", str(out_dir / (source.stem + ".cubin")), str(source),
    ]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"nvcc failed on {source.name}:\n{result.stderr[-4000:]}"
    return result.stdout + result.stderr


def test_there_are_cuda_sources():
    assert {p.name for p in CUDA_SOURCES} >= {"shrink.cu", "expand.cu", "merge.cu", "backward.cu"}


@pytest.mark.parametrize("arch", DEFAULT_ARCHS)
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=[p.name for p in CUDA_SOURCES])
def test_kernels_have_no_spills_and_no_stack(source, arch, tmp_path):
    report = ptxas_report(source, tmp_path, arch)
    kernels = _PROPERTIES.findall(report)
    assert kernels, f"no kernel resource report in the ptxas output for {source.name}:\n{report[-2000:]}"
    bad = [
        f"{name}: {stack} B stack, {stores} B spill stores, {loads} B spill loads"
        for name, stack, stores, loads in kernels
        if (int(stack), int(stores), int(loads)) != (0, 0, 0)
    ]
    assert not bad, f"{source.name} ({arch}): kernels using local memory:\n" + "\n".join(bad)


def test_ptxas_report_parser_sees_spills():
    # The parser must notice a non-zero report, or the test above could never fail.
    sample = (
        "ptxas info    : Function properties for _Z6kernelv\n"
        "    16 bytes stack frame, 8 bytes spill stores, 8 bytes spill loads\n"
    )
    assert _PROPERTIES.findall(sample) == [("_Z6kernelv", "16", "8", "8")]

