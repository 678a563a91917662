"""The machine's ceilings, measured once per run: copy bandwidth and GEMM rate.

Every achieved figure of a case is reported against these, so a number reads the same on any
machine: "62% of copy bandwidth" means the same whether the copy runs at 4 TB/s or at 20 GB/s.

copy bandwidth  bytes read + bytes written per second by ``dst.copy_(src)`` of a buffer well above
                the last-level cache (CUDA: 1 GiB, CPU: 128 MiB; tiny: 4 MiB)
                On a CPU the copy's stores also read each destination line first (write-allocate),
                so an in-place read-modify-write kernel (merge_, expand_add_) can exceed 100% of
                it; on a GPU it is the practical DRAM ceiling.
GEMM rate       2 * n^3 FLOP per second of an n x n by n x n matmul in the given dtype
                (CUDA: n = 8192, CPU: n = 2048; tiny: n = 256)
"""

from dataclasses import dataclass

import torch

from .timer import TimerConfig, measure


@dataclass(frozen=True)
class Ceilings:
    copy_bytes_per_s: float
    gemm_flop_per_s: dict  # dtype name ("float32", ...) -> FLOP/s


def _copy_bytes(device: torch.device, tiny: bool) -> int:
    if tiny:
        return 4 << 20
    return (1 << 30) if device.type == "cuda" else (128 << 20)


def _gemm_size(device: torch.device, tiny: bool) -> int:
    if tiny:
        return 256
    return 8192 if device.type == "cuda" else 2048


class CeilingMeter:
    """Measures each ceiling the first time it is asked for and remembers it for the run."""

    def __init__(self, device: torch.device, tiny: bool = False, quick: bool = False):
        self.device = device
        self.tiny = tiny
        self.config = TimerConfig(warmup=1 if quick else 2, repeats=10, min_repeats=3, budget_s=0.5 if quick else 1.5)
        self._copy: float | None = None
        self._gemm: dict[str, float] = {}

    def copy_bytes_per_s(self) -> float:
        if self._copy is None:
            nbytes = _copy_bytes(self.device, self.tiny)
            src = torch.ones(nbytes // 4, dtype=torch.float32, device=self.device)
            dst = torch.empty_like(src)
            timing = measure(lambda: dst.copy_(src), self.device, self.config)
            self._copy = 2.0 * nbytes / timing.median_s  # read src + write dst
        return self._copy

    def gemm_flop_per_s(self, dtype: torch.dtype) -> float:
        name = dtype_name(dtype)
        if name not in self._gemm:
            n = _gemm_size(self.device, self.tiny)
            generator = torch.Generator(device=self.device).manual_seed(0)
            a = torch.randn(n, n, device=self.device, generator=generator).to(dtype)
            b = torch.randn(n, n, device=self.device, generator=generator).to(dtype)
            out = torch.empty(n, n, dtype=dtype, device=self.device)
            timing = measure(lambda: torch.mm(a, b, out=out), self.device, self.config)
            self._gemm[name] = 2.0 * n**3 / timing.median_s
        return self._gemm[name]

    def snapshot(self) -> dict:
        """What was measured so far, for the JSON record (bytes/s and FLOP/s)."""
        return {
            "copy_bytes_per_s": self._copy,
            "copy_buffer_bytes": _copy_bytes(self.device, self.tiny),
            "gemm_flop_per_s": dict(self._gemm),
            "gemm_n": _gemm_size(self.device, self.tiny),
        }


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")
