"""The benchmark suites: a registry of named suites, each a builder of cases.

A case is one op or layer mode at one shape and dtype, with the bytes it must move and the FLOPs it
must do by the formulas of DESIGN.md §3 / §4, and its providers prepared lazily (``make``) so only
one case's tensors are alive at a time. Suites register with ``@register_suite``; ``ops`` and
``layer`` are defined here, later ones (``train``, ``serving``) register the same way from their own
module, listed in ``_SUITE_MODULES``.

Shapes (K = in features, N = out features, M = tokens, r = rank):
  ops    CUDA: K = N = 4096, r = 16, M in {1, 16, 1024, 4096} (quick: {16, 4096});
         CPU:  K = N = 2048, r = 16, M in {1, 256, 2048} (quick: {1, 2048});
         merge_ of a 4096 x 4096 weight, r = 16, in float32 and bfloat16 (and the run's dtype).
  layer  CPU: M = K = N = 2048, r = 16; CUDA: the ops suite's M, K, N, r; dropout 0 and 0.1;
         modes forward, backward, fwd+bwd.
  tiny   (tests only) K = N = 96, r = 4, M in {1, 7}; merge 96 x 96; layer M = 33.
"""

import importlib
import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from . import providers as P
from .ceilings import dtype_name


@dataclass(frozen=True)
class SuiteContext:
    device: torch.device
    dtype: torch.dtype
    quick: bool = False
    tiny: bool = False
    with_peft: bool = True


@dataclass
class Case:
    """One measured thing. ``make()`` allocates the tensors and returns provider -> Bench."""

    suite: str
    op: str
    shape: dict
    dtype: torch.dtype
    bytes: float  # bytes read + written by the formulas of DESIGN.md §3 / §4
    flops: float  # multiply-adds count 2
    make: Callable[[], dict]
    baseline: Optional[str] = None  # the provider layer cases report a ratio to ("base")
    measure_memory: bool = False
    target: Optional[float] = None  # the target for loracuda's ratio to the baseline
    notes: list = field(default_factory=list)

    @property
    def case_id(self) -> str:
        dims = " ".join(f"{k}={v}" for k, v in self.shape.items())
        return f"{self.suite}/{self.op} {dims} {dtype_name(self.dtype)}"


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    build: Callable[[SuiteContext], list]


_SUITES: dict[str, Suite] = {}
# Modules that register further suites when imported (e.g. "loracuda.benchmarking.train_suite").
_SUITE_MODULES: tuple[str, ...] = ("loracuda.benchmarking.train_suite", "loracuda.benchmarking.serving_suite")


def register_suite(name: str, description: str):
    """Decorator: registers ``build(ctx) -> list[Case]`` as the suite ``name``."""

    def wrap(build: Callable[[SuiteContext], list]) -> Callable[[SuiteContext], list]:
        if name in _SUITES or name == "all":
            raise ValueError(f"benchmark suite {name!r} is already registered")
        _SUITES[name] = Suite(name, description, build)
        return build

    return wrap


def suites() -> dict[str, Suite]:
    """Every registered suite by name, in registration order."""
    for module in _SUITE_MODULES:
        importlib.import_module(module)
    return dict(_SUITES)


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _randn(shape, dtype, device, generator, scale=1.0) -> torch.Tensor:
    return (torch.randn(shape, generator=generator, device=device) * scale).to(dtype)


def _generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


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


# ---- bytes and FLOPs (DESIGN.md §3 / §4) ------------------------------------------------------


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


# ---- the ops suite ----------------------------------------------------------------------------


def _adapter(k, n, r, dtype, device, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """lora_a [r, K] ~ N(0, 1/K) and lora_b [N, r] ~ N(0, 1e-4 / r): h ~ N(0, 1) for x ~ N(0, 1),
    and each expand or merge adds about 1e-2, so repeated in-place calls stay well in range."""
    lora_a = _randn((r, k), dtype, device, generator, 1.0 / math.sqrt(k))
    lora_b = _randn((n, r), dtype, device, generator, 1e-2 / math.sqrt(r))
    return lora_a, lora_b


SCALE = 2.0  # alpha / r with alpha = 2 r, a common choice


@register_suite("ops", "the ops one by one: shrink, expand_add_, backward (per M), merge_ (fp32, bf16)")
def ops_suite(ctx: SuiteContext) -> list:
    ms, k, n, r = ops_shape(ctx)
    dev, dtype = ctx.device, ctx.dtype
    es = element_size(dtype)
    cases = []
    for m in ms:
        shape = {"M": m, "K": k, "N": n, "r": r}

        def make_shrink(m=m):
            g = _generator(dev, 1)
            x = _randn((m, k), dtype, dev, g)
            lora_a, _ = _adapter(k, n, r, dtype, dev, g)
            return P.shrink_providers(x, lora_a, ctx.with_peft)

        def make_expand(m=m):
            g = _generator(dev, 2)
            y = _randn((m, n), dtype, dev, g)
            h = torch.randn((m, r), generator=g, device=dev)
            _, lora_b = _adapter(k, n, r, dtype, dev, g)
            return P.expand_providers(y, h, lora_b, SCALE, ctx.with_peft)

        def make_backward(m=m):
            g = _generator(dev, 3)
            x = _randn((m, k), dtype, dev, g)
            grad_y = _randn((m, n), dtype, dev, g)
            h = torch.randn((m, r), generator=g, device=dev)
            lora_a, lora_b = _adapter(k, n, r, dtype, dev, g)
            return P.backward_providers(grad_y, x, h, lora_a, lora_b, SCALE)

        b, f = shrink_cost(m, k, r, es, es)
        cases.append(Case("ops", "shrink", dict(shape), dtype, b, f, make_shrink))
        b, f = expand_cost(m, n, r, es, es)
        cases.append(Case("ops", "expand_add_", dict(shape), dtype, b, f, make_expand))
        b, f = backward_cost(m, k, n, r, es, es)
        cases.append(Case("ops", "backward", dict(shape), dtype, b, f, make_backward))

    mn, mk, mr = merge_shape(ctx)
    merge_dtypes = [torch.float32, torch.bfloat16] + ([dtype] if dtype not in (torch.float32, torch.bfloat16) else [])
    for mdtype in merge_dtypes:

        def make_merge(mdtype=mdtype):
            g = _generator(dev, 4)
            weight = _randn((mn, mk), mdtype, dev, g, 0.02)
            lora_a, lora_b = _adapter(mk, mn, mr, mdtype, dev, g)
            return P.merge_providers(weight, lora_a, lora_b, SCALE, ctx.with_peft)

        mes = element_size(mdtype)
        b, f = merge_cost(mn, mk, mr, mes, mes)
        case = Case("ops", "merge_", {"N": mn, "K": mk, "r": mr}, mdtype, b, f, make_merge, measure_memory=True)
        cases.append(case)
    return cases


# ---- the layer suite --------------------------------------------------------------------------

LAYER_MODES = ("forward", "backward", "fwd+bwd")
LAYER_DROPOUTS = (0.0, 0.1)
# The targets for loracuda's forward+backward time over the frozen base layer's.
LAYER_TARGETS = {0.0: 1.07, 0.1: 1.10}


@register_suite("layer", "lora_linear forward, backward, forward+backward beside a frozen nn.Linear (base)")
def layer_suite(ctx: SuiteContext) -> list:
    ms, k, n, r = layer_shape(ctx)
    dev, dtype = ctx.device, ctx.dtype
    es = element_size(dtype)
    cases = []
    for m in ms:
        for p in LAYER_DROPOUTS:
            # The reference draws its dropout mask with int64 tensor arithmetic (the definition of the
            # hash, not a fast path): seconds per call at full size on a CPU, so --quick leaves it out.
            with_reference = not (ctx.quick and p > 0.0 and not ctx.tiny)
            for mode in LAYER_MODES:

                def make(m=m, p=p, mode=mode, with_reference=with_reference):
                    g = _generator(dev, 5)
                    x = _randn((m, k), dtype, dev, g)
                    weight = _randn((n, k), dtype, dev, g, 1.0 / math.sqrt(k))
                    grad_y = _randn((m, n), dtype, dev, g)
                    lora_a, lora_b = _adapter(k, n, r, dtype, dev, g)
                    forwards = P.layer_forwards(weight, lora_a, lora_b, SCALE, p, ctx.with_peft, with_reference)
                    benches = {}
                    for name, (forward, trainable) in forwards.items():
                        benches[name] = P.layer_bench(forward, trainable, x, grad_y, mode)
                    bb, bf = base_cost(m, k, n, es, mode)
                    benches["base"].bytes, benches["base"].flops = bb, bf
                    return benches

                b, f = layer_cost(m, k, n, r, es, mode)
                shape = {"M": m, "K": k, "N": n, "r": r, "p": p}
                target = LAYER_TARGETS[p] if mode == "fwd+bwd" else None
                case = Case("layer", mode, shape, dtype, b, f, make, baseline="base", target=target)
                if not with_reference:
                    case.notes.append("reference left out under --quick (its hash dropout mask is slow by design)")
                cases.append(case)
    return cases
