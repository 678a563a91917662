"""What this installation of loracuda was built with, and what it can run on."""

import torch

from ._extension import _C
from .version import __version__

# Every op of csrc/ops.cpp (tests/test_cuda_build.py checks each has a CUDA kernel; tests/test_buildinfo.py
# checks this list against the registered schemas).
_OPS = (
    "shrink",
    "expand_add_",
    "merge_",
    "restore_codes",
    "unmerge_exact_",
    "merge_exact_",
    "backward",
    "lora_linear",
    "multi_shrink",
    "multi_expand_add_",
    "grouped_shrink",
    "grouped_expand_add_",
    "grouped_backward",
    "grouped_mm",
    "grouped_weight_grad",
    "grouped_lora_linear",
)


def op_names() -> tuple[str, ...]:
    """The names of every op under torch.ops.loracuda."""
    return _OPS


def has_kernel(op: str, dispatch_key: str) -> bool:
    """True when torch.ops.loracuda.<op> has a kernel registered for the dispatch key ("CPU", "CUDA")."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"loracuda::{op}", dispatch_key)


def build_info() -> dict:
    """A dict: version, torch (running), torch_built_with, backends (["cpu"] or ["cpu", "cuda"]),
    cuda_archs (list of "8.0"-style strings), gpu_visible."""
    compiled = _C.build_info()
    backends = ["cpu"] + (["cuda"] if compiled["cuda_built"] else [])
    archs = [a for a in compiled["cuda_archs"].replace(",", ";").replace(" ", ";").split(";") if a]
    return {
        "version": __version__,
        "torch": torch.__version__,
        "torch_built_with": compiled["torch_built_with"],
        "backends": backends,
        "cuda_archs": archs,
        "gpu_visible": torch.cuda.is_available(),
    }
