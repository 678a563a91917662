"""Every loracuda op once on CUDA, on small odd shapes, for `compute-sanitizer --tool memcheck`.

Run with PYTORCH_NO_CUDA_MEMORY_CACHING=1 so each tensor is its own cudaMalloc and an access past
its end is reported rather than landing in a neighbour of the caching allocator's pool.
Covers: bf16 and fp32 activations, an fp32 adapter with bf16 activations, tails (sizes not
multiples of 8 or 16), a row-strided output and an input whose data pointer is not 16-byte aligned
(the kernels' scalar path), dropout, two slices, the exact merge / unmerge family and the layer's
forward and backward. Exits non-zero (with the op's name) if an op raises.
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
        weight = (torch.randn(n, k, device=dev) / k**0.5).to(dtype)
        bias = torch.randn(n, device=dev).to(dtype)

        def layer():
            xr = x.clone().requires_grad_(True)
            ar, br = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
            out = loracuda.lora_linear(xr, weight, bias, ar, br, 0.5, dropout_p=0.1, training=True)
            out.backward(torch.ones_like(out))

        step(f"lora_linear forward+backward {tag}", layer)
    print("sanitize_case: all ops ran")
    return 0


if __name__ == "__main__":
    sys.exit(main())
