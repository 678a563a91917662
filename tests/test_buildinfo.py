"""loracuda.buildinfo's op list is every op csrc/ops.cpp defines (the CUDA build test checks each of them
for a CUDA kernel, so an op left out of the list would go unchecked), and each has a CPU kernel."""

import torch

import loracuda
from loracuda import buildinfo


def registered_ops() -> list:
    return sorted({s.name.split("::", 1)[1] for s in torch._C._jit_get_all_schemas() if s.name.startswith("loracuda::")})


def test_op_names_are_the_registered_schemas():
    assert sorted(buildinfo.op_names()) == registered_ops()


def test_every_op_has_a_cpu_kernel():
    missing = [op for op in buildinfo.op_names() if not buildinfo.has_kernel(op, "CPU")]
    assert not missing, missing


def test_build_info_names_this_version_and_the_cpu_backend():
    info = loracuda.build_info()
    assert info["version"] == loracuda.__version__ and info["backends"][0] == "cpu"
