"""What the ops and layer suites share: their shapes, the bytes and FLOPs of each op by its formulas
(docs/design.md, section 'Math and memory passes'), and the adapter factors they time.

Shapes (K = in features, N = out features, M = tokens, r = rank):
  ops    CUDA: K = N = 4096, r = 16, M in {1, 16, 1024, 4096} (quick: {16, 4096});
         CPU:  K = N = 2048, r = 16, M in {1, 256, 2048} (quick: {1, 2048});
         merge_ of a 4096 x 4096 weight, r = 16, in float32 and bfloat16 (and the run's dtype).
  layer  CPU: M = K = N = 2048, r = 16; CUDA: the ops suite's M, K, N, r; dropout 0 and 0.1;
         modes forward, backward, fwd+bwd.
  tiny   (tests only) K = N = 96, r = 4, M in {1, 7}; merge 96 x 96; layer M = 33.
"""

import math

import torch

from bench.harness.cases import SuiteContext, randn

# ---- shapes -----------------------------------------------------------------------------------


def ops_shape(ctx: SuiteContext) -> tuple[list[int], int, int, int]:
    """(M values, K, N, r) of the ops suite on ctx's device."""
    if ctx.tiny:
        return [1, 7], 96, 96, 4
    if ctx.device.type == "cuda":
        return ([16, 4096] if ctx.quick else [1, 16, 1024, 4096]), 4096, 4096, 16
    return ([1, 2048] if ctx.quick else [1, 256, 2048]), 2048, 2048, 16


def merge_shape(ctx: SuiteContext) -> tuple[int, int, int]:
    """(N, K, r) of the merge cases."""
    return (96, 96, 4) if ctx.tiny else (4096, 4096, 16)


def layer_shape(ctx: SuiteContext) -> tuple[list[int], int, int, int]:
    if ctx.tiny:
        return [33], 96, 96, 4
    if ctx.device.type == "cuda":
        return ops_shape(ctx)
    return [2048], 2048, 2048, 16


# ---- bytes and FLOPs (docs/design.md, 'Math and memory passes') ------------------------------------------------------


def shrink_cost(m, k, r, es, es_a) -> tuple[float, float]:
    """Reads x [M, K] and lora_a [r, K], writes h [M, r] float32."""
    return m * k * es + r * k * es_a + 4 * m * r, 2 * m * k * r


def expand_cost(m, n, r, es, es_b) -> tuple[float, float]:
    """Reads h [M, r] float32 and lora_b [N, r]; reads and writes y [M, N]."""
    return 4 * m * r + n * r * es_b + 2 * m * n * es, 2 * m * n * r + m * n


def merge_cost(n, k, r, es, es_ab) -> tuple[float, float]:
    """Reads and writes weight [N, K]; reads lora_a [r, K] and lora_b [N, r]."""
    return 2 * n * k * es + (r * k + n * r) * es_ab, 2 * n * k * r + n * k


def backward_cost(m, k, n, r, es, es_ab) -> tuple[float, float]:
    """The dy pass (reads dy [M, N], h [M, r] f32, lora_b; writes grad_b) and the x pass (reads x,
    lora_a, reads and writes grad_x [M, K]; writes grad_a). FLOPs: g, grad_b, grad_a, grad_x terms."""
    dy_pass = m * n * es + 4 * m * r + 2 * n * r * es_ab
    x_pass = m * k * es + 2 * m * k * es + 2 * r * k * es_ab
    return dy_pass + x_pass, 4 * m * r * (n + k)


def base_cost(m, k, n, es, mode) -> tuple[float, float]:
    """The frozen linear: forward y = x W^T, backward grad_x = dy W (no weight gradient)."""
    gemm_bytes = (m * k + n * k + m * n) * es
    passes = {"forward": 1, "backward": 1, "fwd+bwd": 2}[mode]
    return passes * gemm_bytes, passes * 2 * m * n * k


def layer_cost(m, k, n, r, es, mode) -> tuple[float, float]:
    """The base GEMMs plus the adapter's passes: shrink + expand-add forward, backward's two passes."""
    bytes_, flops = 0.0, 0.0
    base_b, base_f = base_cost(m, k, n, es, "forward")
    if mode in ("forward", "fwd+bwd"):
        sb, sf = shrink_cost(m, k, r, es, es)
        eb, ef = expand_cost(m, n, r, es, es)
        bytes_, flops = bytes_ + base_b + sb + eb, flops + base_f + sf + ef
    if mode in ("backward", "fwd+bwd"):
        bb, bf = backward_cost(m, k, n, r, es, es)
        bytes_, flops = bytes_ + base_b + bb, flops + base_f + bf
    return bytes_, flops


# ---- adapter factors ---------------------------------------------------------------------------


def adapter(k, n, r, dtype, device, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """lora_a [r, K] ~ N(0, 1/K) and lora_b [N, r] ~ N(0, 1e-4 / r): h ~ N(0, 1) for x ~ N(0, 1),
    and each expand or merge adds about 1e-2, so repeated in-place calls stay well in range."""
    lora_a = randn((r, k), dtype, device, generator, 1.0 / math.sqrt(k))
    lora_b = randn((n, r), dtype, device, generator, 1e-2 / math.sqrt(r))
    return lora_a, lora_b


SCALE = 2.0  # alpha / r with alpha = 2 r, a common choice
