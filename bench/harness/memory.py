"""Peak extra memory of one call: how far above what was allocated before the call it went.

CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus memory_allocated before.
CPU: torch's CPU allocator is not visible to tracemalloc, so the process's resident set is read
instead: Linux resets the peak resident size (VmHWM) when "5" is written to /proc/self/clear_refs;
peak extra = VmHWM after the call - VmRSS before it. Temporaries of more than a few MiB are fresh
mmap'd pages in glibc, so they show up in full; small ones may reuse resident heap pages and be
missed, which is why the CPU figure is a lower bound, reported with a note saying so.
"""

from typing import Callable, Optional

import torch

CPU_METHOD = "peak resident set growth (VmHWM - VmRSS, Linux); a lower bound"
CUDA_METHOD = "torch.cuda.max_memory_allocated - memory_allocated before"


def _status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def method(device: torch.device) -> Optional[str]:
    """How peak extra memory is measured on ``device``; None where it cannot be."""
    if device.type == "cuda":
        return CUDA_METHOD
    if device.type == "cpu" and _status_kib("VmHWM") is not None and _reset_peak_rss():
        return CPU_METHOD
    return None


def peak_extra_bytes(fn: Callable[[], object], device: torch.device) -> Optional[int]:
    """Bytes above the pre-call level at the peak of one ``fn()`` call; None where not measurable."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        del result
        return max(0, peak - before)
    if device.type == "cpu":
        if not _reset_peak_rss():
            return None
        before = _status_kib("VmRSS")
        result = fn()
        peak = _status_kib("VmHWM")
        del result
        if before is None or peak is None:
            return None
        return max(0, peak - before) * 1024
    return None
