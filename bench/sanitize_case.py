"""Every loracuda op once on CUDA, on small odd shapes, for `compute-sanitizer --tool memcheck`.

Run with PYTORCH_NO_CUDA_MEMORY_CACHING=1 so each tensor is its own cudaMalloc and an access past
its end is reported rather than landing in a neighbour of the caching allocator's pool.
Covers: bf16 and fp32 activations, an fp32 adapter with bf16 activations, tails (sizes not
multiples of 8 or 16), a row-strided output and an input whose data pointer is not 16-byte aligned
(the kernels' scalar path), dropout, two slices, the exact merge / unmerge family, the layer's
forward and backward, and the multi-LoRA serving ops. Exits non-zero (with the op's name) if an op
raises.
"""

import sys

import torch

import loracuda
from loracuda import ops


def step(name: str, fn) -> None:
    try:
        fn()
        torch.cuda.synchronize()
    except Exception as error:  # report which op failed, then fail the run
        print(f"sanitize_case: {name} failed: {type(error).__name__}: {str(error).splitlines()[0]}")
        sys.exit(1)
    print(f"sanitize_case: {name} ok")


def misaligned(rows: int, cols: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    """A contiguous [rows, cols] view starting one element into its buffer (not 16-byte aligned)."""
    return torch.randn(rows * cols + 1, device=device).to(dtype)[1:].view(rows, cols)


def multi_lora_steps(tag: str, dtype: torch.dtype, adapter_dtype: torch.dtype, dev: str) -> None:
    """multi_shrink / multi_expand_add_ on both paths (decode: M <= 64, prefill: larger M), with ranks
    below r_max and 0, ids of -1 and outside [0, L) (no adapter on CUDA: nothing may be read through
    them), two slices; odd sizes (scalar loads), then sizes that allow 16-byte loads, with their tails,
    a misaligned x and a row-strided y."""
    scales = torch.tensor([0.5, 2.0, -1.0], device=dev)
    pattern = torch.tensor([0, 2, -1, 1, 7, 0, -5, 2], dtype=torch.int32)
    for k, n, r_max, vector_sizes in ((203, 129, 5, False), (264, 136, 16, True)):
        ranks = torch.tensor([r_max, 0, 3], dtype=torch.int32, device=dev)
        a_all = (torch.randn(3, 2 * r_max, k, device=dev) / k**0.5).to(adapter_dtype)
        b_all = (torch.randn(3, n, r_max, device=dev) * 0.1).to(adapter_dtype)
        for path, m in (("decode", 37), ("prefill", 150)):
            name = f"{path} K={k} N={n} r_max={r_max} {tag}"
            ids = pattern.repeat(m // len(pattern) + 1)[:m].clone()
            ids[64:128] = 2  # prefill: two whole 32-token tiles of one adapter (the shared-tile path)
            ids = ids.to(dev)
            x = torch.randn(m, k, device=dev).to(dtype)
            step(f"multi_shrink {name}", lambda: ops.multi_shrink(x, a_all, ranks, ids, 2))
            h = ops.multi_shrink(x, a_all, ranks, ids, 2)
            y = torch.randn(m, n, device=dev).to(dtype)
            step(f"multi_expand_add_ two slices {name}",
                 lambda: ops.multi_expand_add_(y, h, b_all, scales, ranks, ids, [0, 60, n]))
            if not vector_sizes:
                continue
            step(f"multi_shrink misaligned x {name}",
                 lambda: ops.multi_shrink(misaligned(m, k, dtype, dev), a_all, ranks, ids, 2))
            h1 = ops.multi_shrink(x, a_all[:, :r_max].contiguous(), ranks, ids, 1)
            wide = torch.randn(m, n + 11, device=dev).to(dtype)
            step(f"multi_expand_add_ row-strided y {name}",
                 lambda: ops.multi_expand_add_(wide[:, :n], h1, b_all, scales, ranks, ids))


def main() -> int:
    if not torch.cuda.is_available():
        print("sanitize_case: no GPU visible")
        return 1
    dev = "cuda"
    print("sanitize_case:", loracuda.build_info())
    torch.manual_seed(0)
    seed = torch.tensor([1234], dtype=torch.int64, device=dev)
    for dtype, adapter_dtype in ((torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32),
                                 (torch.bfloat16, torch.float32)):
        tag = f"{str(dtype)[6:]}/{str(adapter_dtype)[6:]}"
        m, k, n, r = 37, 203, 129, 5
        x = torch.randn(m, k, device=dev).to(dtype)
        a = (torch.randn(r, k, device=dev) / k**0.5).to(adapter_dtype)
        b = (torch.randn(n, r, device=dev) * 0.1).to(adapter_dtype)
        step(f"shrink {tag}", lambda: ops.shrink(x, a))
        step(f"shrink dropout {tag}", lambda: ops.shrink(x, a, 0.25, seed))
        step(f"shrink misaligned x {tag}", lambda: ops.shrink(misaligned(m, k, dtype, dev), a))
        step(f"shrink decode M=1 {tag}", lambda: ops.shrink(x[:1], a))
        h = ops.shrink(x, a)
        y = torch.randn(m, n, device=dev).to(dtype)
        step(f"expand_add_ {tag}", lambda: ops.expand_add_(y, h, b, 0.5))
        wide = torch.randn(m, n + 11, device=dev).to(dtype)
        step(f"expand_add_ row-strided y {tag}", lambda: ops.expand_add_(wide[:, :n], h, b, 0.5))
        a2 = torch.cat([a, a]).contiguous()
        h2 = ops.shrink(x, a2)
        step(f"expand_add_ two slices {tag}", lambda: ops.expand_add_(y, h2, b, 0.5, [0, 60, n]))
        if adapter_dtype == dtype:
            w = (torch.randn(n, k, device=dev) * 0.02).to(dtype)
            step(f"merge_ {tag}", lambda: ops.merge_(w, a, b, 0.5))
            wt = (torch.randn(k, n, device=dev) * 0.02).to(dtype)
            step(f"merge_ transposed {tag}", lambda: ops.merge_(wt, a, b, 0.5, transposed=True))
            w0 = (torch.randn(n, k, device=dev) * 0.02).to(dtype)
            codes = ops.restore_codes(w0, a, b, 0.5)
            step(f"restore_codes {tag}", lambda: ops.restore_codes(w0, a, b, 0.5))
            ops.merge_(w0, a, b, 0.5)
            step(f"unmerge_exact_ {tag}", lambda: ops.unmerge_exact_(w0, a, b, 0.5, codes))
        dy = torch.randn(m, n, device=dev).to(dtype)
        gx = torch.zeros(m, k, device=dev, dtype=dtype)
        step(f"backward {tag}", lambda: ops.backward(dy, x, h, a, b, 0.5, grad_x=gx))
        step(f"backward dropout {tag}", lambda: ops.backward(dy, x, h, a, b, 0.5, 0.25, seed, grad_x=gx))
        step(f"backward no grad_x {tag}", lambda: ops.backward(dy, x, h, a, b, 0.5))
        # The one-pass backward's tile edges (csrc/cuda/backward.cu): three slices of r = 24 (R = 72, a
        # second rank group), slice boundaries inside the first 256-column tile and a second tile, 70 rows
        # (three 32-row groups, the last partial), x not 16-byte aligned, dropout.
        m3, n3, r3 = 70, 300, 24
        x3 = misaligned(m3, k, dtype, dev)
        a3 = (torch.randn(3 * r3, k, device=dev) / k**0.5).to(adapter_dtype)
        b3 = (torch.randn(n3, r3, device=dev) * 0.1).to(adapter_dtype)
        h3 = ops.shrink(x3, a3)
        dy3 = torch.randn(m3, n3, device=dev).to(dtype)
        gx3 = torch.zeros(m3, k, device=dev, dtype=dtype)
        step(f"backward three slices R=72 misaligned x {tag}",
             lambda: ops.backward(dy3, x3, h3, a3, b3, 0.5, 0.25, seed, [0, 100, 261, n3], grad_x=gx3))
        weight = (torch.randn(n, k, device=dev) / k**0.5).to(dtype)
        bias = torch.randn(n, device=dev).to(dtype)

        def layer():
            xr = x.clone().requires_grad_(True)
            ar, br = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
            out = loracuda.lora_linear(xr, weight, bias, ar, br, 0.5, dropout_p=0.1, training=True)
            out.backward(torch.ones_like(out))

        step(f"lora_linear forward+backward {tag}", layer)
        multi_lora_steps(tag, dtype, adapter_dtype, dev)
    print("sanitize_case: all ops ran")
    return 0


if __name__ == "__main__":
    sys.exit(main())
