"""The layer's goal (at most 1.07x / 1.10x the frozen base layer), measured robustly on a noisy machine:
lora_linear forward+backward against a frozen nn.Linear's, fp32, M = K = N = 2048, r = 16, dropout 0
and 0.1. The three are timed in turns (one call each per round), the ratio is taken within each round (same machine conditions), and the
median and 20th/80th percentiles of those per-round ratios are printed.

    python bench/layer_ratio.py [threads] [rounds] [--default-malloc]

The heap: glibc's malloc hands the freed top of its heap back to the system once it exceeds its trim
threshold (twice the largest chunk it has freed: 32 MiB here) and page-faults it back in at the next
allocation. Both sides allocate two 16 MiB tensors per call (y, grad_x); the LoRA side's few small
ones (h, g, the backward's partial sums) take its heap top over the threshold, so with glibc's defaults
it pays about 4,000 page faults (16 MiB of fresh pages, 3-4 ms) per call for where its frees leave
the heap, not for its arithmetic. The script therefore fixes glibc's trim and mmap thresholds
(mallopt, both sides alike) so that freed pages are reused, as allocators such as jemalloc or tcmalloc
do; --default-malloc keeps glibc's defaults. The page faults per call of each side are printed either
way.
"""
import os
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

import torch  # noqa: E402

import loracuda  # noqa: E402

args = [a for a in sys.argv[1:] if not a.startswith("--")]
threads = int(args[0]) if len(args) > 0 else torch.get_num_threads()
rounds = int(args[1]) if len(args) > 1 else 40
default_malloc = "--default-malloc" in sys.argv[1:]


def keep_heap_pages() -> bool:
    """glibc only: never trim the heap top, and serve chunks up to 32 MiB from the heap rather than by
    mmap, so that freed pages are reused instead of faulted in again. Returns whether it applied."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's mallopt parameter numbers (malloc.h)
    return bool(libc.mallopt(m_trim_threshold, 1 << 30)) and bool(libc.mallopt(m_mmap_threshold, 32 << 20))


if default_malloc:
    heap = "glibc defaults"
else:
    heap = "trim / mmap thresholds fixed" if keep_heap_pages() else "allocator unchanged (no glibc mallopt)"
torch.set_num_threads(threads)
torch.manual_seed(0)
M=K=N=2048; r=16
lin=torch.nn.Linear(K,N); lin.weight.requires_grad_(False); lin.bias.requires_grad_(False)
A=(torch.randn(r,K)*0.02).requires_grad_(); B=(torch.randn(N,r)*0.02).requires_grad_()
x=torch.randn(M,K,requires_grad=True); dy=torch.randn(M,N)
def base():
    y=lin(x); y.backward(dy)
def lora(p):
    y=loracuda.lora_linear(x,lin.weight,lin.bias,A,B,2.0,p,True); y.backward(dy)
fs={"base":base,"p0":lambda: lora(0.0),"p.1":lambda: lora(0.1)}
ts={k:[] for k in fs}
faults={k:0 for k in fs}  # minor page faults during the timed calls
for f in fs.values(): f()
for i in range(rounds):
    for k,f in fs.items():
        f0=resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        s=time.perf_counter(); f(); ts[k].append(time.perf_counter()-s)
        faults[k]+=resource.getrusage(resource.RUSAGE_SELF).ru_minflt-f0
def quantiles(values):
    q = statistics.quantiles(values, n=10)
    return statistics.median(values), q[1], q[7]  # median, 20th, 80th percentile


print(f"threads {threads}, {rounds} rounds, heap: {heap}, base median {statistics.median(ts['base']) * 1e3:.1f} ms")
print("  page faults per call: " + ", ".join(f"{k} {faults[k] / rounds:.0f}" for k in fs))
for name, target in (("p0", 1.07), ("p.1", 1.10)):
    med, p20, p80 = quantiles([a / b for a, b in zip(ts[name], ts["base"])])
    print(f"  dropout {name[1:] or 0}: loracuda / base = {med:.3f} (p20 {p20:.3f}, p80 {p80:.3f}); target <= {target}")
