"""Typed Python wrappers over the torch.ops.loracuda ops, and their fake (meta) implementations.

Notation (docs/design.md, section 'Math and memory passes'): x [M, K] activations; lora_a [R, K]
where R = S * r stacks S slices of rank r; lora_b [N, r]; h [M, R]; y [M, N]; weight [N, K] ([K, N] when
``transposed``). Activations are
float32, bfloat16 or float16 (float64 on the CPU, for gradcheck); adapter factors are in the
activations' dtype or float32. Accumulation is float32 (float64 for float64 inputs), so ``h`` is
float32. Every op runs on the current CUDA stream, and on CUDA all but two make no host synchronisation
(tests/test_sync_free.py): ``merge_exact_`` and ``unmerge_exact_`` with ``escape_values`` synchronise,
since they size tensors by the number of escapes.

Dropout: ``seed`` is an int64 tensor of one element (on the CPU or on the activations' device) or a
Python int in [-2**63, 2**63) (anything else raises ValueError / TypeError naming ``seed``), made a
CPU tensor that the kernels read on the host without a device wait; the mask is a hash of
(seed, m * K + k), identical on CPU and CUDA and between forward and backward (csrc/dropout_hash.h).

Scales: a scalar ``scale`` must be finite as a float32 (|scale| <= 3.4028235e38; NaN and infinities
are refused, as is 1e39, finite only as a double); the kernels compute in float32. The ``scales``
table of :func:`multi_expand_add_` is refused on the CPU when a token's adapter has a non-finite
scale; on CUDA (which does not read the table on the host) such a scale gives that adapter's rows
NaN, as the plain-PyTorch reference does.

Memory: an op that writes into an argument (``y``, ``weight``, ``grad_x``) refuses, before writing, a
written tensor whose elements share memory (an ``expand()``-ed or overlapping view) and one that
shares memory with any other argument (ValueError naming both). With grad mode on, the writing ops
follow torch's in-place rules: a leaf that requires grad (or a view of one) may not be written, and
since these ops have no derivative, an argument they read may not require grad (use
:func:`loracuda.lora_linear` for a differentiable layer, or call them under ``torch.no_grad()``).
"""

import math
import operator
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from . import _extension  # noqa: F401  (registers torch.ops.loracuda)
from . import fake_checks

Seed = Union[None, int, Tensor]
_ops = torch.ops.loracuda


_INT64_MIN, _INT64_END = -(2**63), 2**63
_FLOAT32_MAX = 3.4028234663852886e38


def seed_tensor(seed: Seed, device: Optional[torch.device] = None, op: str = "shrink") -> Optional[Tensor]:
    """A Python int seed as an int64 tensor of one element; tensors and None pass through. A seed that
    is not an integer, or outside [-2**63, 2**63), raises (TypeError / ValueError) naming ``seed`` and
    ``op`` (the op the seed is for)."""
    if seed is None or isinstance(seed, Tensor):
        return seed
    try:
        value = operator.index(seed)
    except TypeError:
        raise TypeError(
            f"loracuda.{op}: argument 'seed' must be an int or an int64 tensor, got {type(seed).__name__} {seed!r}"
        ) from None
    if not _INT64_MIN <= value < _INT64_END:
        raise ValueError(f"loracuda.{op}: argument 'seed' must be in [-2**63, 2**63) (an int64), got {value}")
    return torch.tensor([value], dtype=torch.int64, device=device)


def _check_scale(op: str, scale: float, name: str = "scale") -> None:
    # The policy of csrc/checks.h (check_finite_scalar), with its message, for the fake implementations.
    torch._check_value(
        math.isfinite(scale) and abs(scale) <= _FLOAT32_MAX,
        lambda: f"loracuda.{op}: argument '{name}' must be finite as a float32 (|{name}| <= 3.4028235e38), got {scale}",
    )


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 for every other kernel dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def shrink(x: Tensor, lora_a: Tensor, dropout_p: float = 0.0, seed: Seed = None) -> Tensor:
    """h [M, R] = (mask * x / (1 - dropout_p)) @ lora_a^T in float32; x [M, K], lora_a [R, K]."""
    return _ops.shrink(x, lora_a, float(dropout_p), seed_tensor(seed, op="shrink"))


def expand_add_(y: Tensor, h: Tensor, lora_b: Tensor, scale: float, slice_offsets: Sequence[int] = ()) -> None:
    """In place: y[:, off[i]:off[i+1]] += scale * h[:, i*r:(i+1)*r] @ lora_b[off[i]:off[i+1]]^T.

    y [M, N] with unit column stride (rows may be strided), h [M, S*r] float32, lora_b [N, r].
    ``slice_offsets`` holds S + 1 column offsets from 0 to N; empty means one slice.
    """
    _ops.expand_add_(y, h, lora_b, float(scale), list(slice_offsets))


def merge_(weight: Tensor, lora_a: Tensor, lora_b: Tensor, scale: float, transposed: bool = False) -> None:
    """In place: weight += scale * lora_b @ lora_a (transposed: weight [K, N] += its transpose).

    One read and one write of ``weight``, float32 accumulation, one rounding, bit-identical on every
    run. A negative ``scale`` subtracts (an inexact unmerge; see :func:`unmerge_exact_`).
    """
    _ops.merge_(weight, lora_a, lora_b, float(scale), bool(transposed))


def restore_codes(weight: Tensor, lora_a: Tensor, lora_b: Tensor, scale: float, transposed: bool = False) -> Tensor:
    """Read-only. uint8 [ceil(numel / 4)]: 2 bits per element (element e at byte e // 4, bits 2 * (e % 4))
    saying how ``unmerge_exact_`` restores it after ``merge_(weight, lora_a, lora_b, scale)``:
    0 exactly, 1 / 2 by one bit pattern up / down, 3 not at all (the caller keeps its value)."""
    return _ops.restore_codes(weight, lora_a, lora_b, float(scale), bool(transposed))


def unmerge_exact_(
    weight: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    scale: float,
    codes: Tensor,
    transposed: bool = False,
    escape_values: Optional[Tensor] = None,
) -> None:
    """In place, the inverse of ``merge_`` with the same ``scale``: weight = round(weight - delta), then
    each element's restore code applied. Elements with code 3 get ``escape_values`` (1-D, the weight's
    dtype, one value per code-3 element in flat-index order, as :func:`merge_exact_` returns them) when
    given; otherwise they are left for the caller to patch. On CUDA, with ``escape_values`` it synchronises
    with the host (locating the escapes sizes a tensor by their count); without, it does not."""
    _ops.unmerge_exact_(weight, lora_a, lora_b, float(scale), bool(transposed), codes, escape_values)


def merge_exact_(
    weight: Tensor, lora_a: Tensor, lora_b: Tensor, scale: float, transposed: bool = False, max_record_bytes: int = -1
) -> tuple[Tensor, Tensor]:
    """``merge_`` that also returns its restore record, in one pass over ``weight``: (codes, escape_values),
    the codes ``restore_codes`` gives for the weight before the merge and the original values of its
    code-3 elements (flat-index order, the weight's dtype). ``unmerge_exact_(..., codes, escape_values=
    escape_values)`` undoes it bit for bit. If the record (codes bytes + escapes * element bytes) exceeds
    ``max_record_bytes`` (negative: no limit), raises ValueError and leaves ``weight`` unchanged. On CUDA
    it synchronises with the host (the record's size is the number of escapes)."""
    return _ops.merge_exact_(weight, lora_a, lora_b, float(scale), bool(transposed), int(max_record_bytes))


def backward(
    grad_y: Tensor,
    x: Tensor,
    h: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    scale: float,
    dropout_p: float = 0.0,
    seed: Seed = None,
    slice_offsets: Sequence[int] = (),
    grad_x: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """The LoRA part of a linear layer's backward. Returns (grad_a [R, K], grad_b [N, r]) in the dtypes
    of lora_a and lora_b; when ``grad_x`` [M, K] is given, adds mask * (g @ lora_a) / q into it in place,
    where g = scale * grad_y @ lora_b (slice-wise). Not differentiable: with grad mode on, an input that
    requires grad is refused (for double backward use :func:`loracuda.lora_linear`)."""
    return _ops.backward(
        grad_y, x, h, lora_a, lora_b, float(scale), float(dropout_p), seed_tensor(seed, op="backward"),
        list(slice_offsets), grad_x,
    )


def multi_shrink(x: Tensor, lora_a_all: Tensor, ranks: Tensor, adapter_ids: Tensor, num_slices: int = 1) -> Tensor:
    """Multi-LoRA shrink. x [M, K]; lora_a_all [L, S*r_max, K] (S = ``num_slices``) in x's dtype or
    float32; ranks int32 [L] (rows j >= ranks[l] of each slice count as zero); adapter_ids int32 [M]
    (-1: no adapter). Returns h [M, S*r_max] float32 with h[m] = lora_a_all[id_m] @ x[m] (0 where
    id_m = -1)."""
    return _ops.multi_shrink(x, lora_a_all, ranks, adapter_ids, int(num_slices))


def multi_expand_add_(
    y: Tensor,
    h: Tensor,
    lora_b_all: Tensor,
    scales: Tensor,
    ranks: Tensor,
    adapter_ids: Tensor,
    slice_offsets: Sequence[int] = (),
) -> None:
    """Multi-LoRA expand-add, in place: for every token m with id_m >= 0 and slice i,
    y[m, off[i]:off[i+1]] += scales[id_m] * lora_b_all[id_m, off[i]:off[i+1], :ranks[id_m]] @
    h[m, i*r_max : i*r_max + ranks[id_m]]. y [M, N]; h [M, S*r_max] float32; lora_b_all [L, N, r_max];
    scales float32 [L]; rows with id -1 are untouched."""
    _ops.multi_expand_add_(y, h, lora_b_all, scales, ranks, adapter_ids, list(slice_offsets))


# ---- fake implementations (shapes and dtypes only) for torch.compile and opcheck ----------------
# They also serve the Meta dispatch key, which a call reaches when any argument is a meta tensor, so
# they repeat the device checks of csrc/checks.h: a mix of devices is an error, not a garbage result.


def _check_same_device(op: str, ref_name: str, ref: Tensor, **tensors: Optional[Tensor]) -> None:
    for name, t in tensors.items():
        if t is not None and t.device != ref.device:
            raise ValueError(
                f"loracuda.{op}: argument '{name}' is on {t.device} but '{ref_name}' is on {ref.device}"
            )


@torch.library.register_fake("loracuda::shrink")
def _shrink_fake(x, lora_a, dropout_p, seed):
    _check_same_device("shrink", "x", x, lora_a=lora_a)
    fake_checks.shrink(x, lora_a, dropout_p, seed)
    return x.new_empty((x.shape[0], lora_a.shape[0]), dtype=accumulate_dtype(x.dtype))


@torch.library.register_fake("loracuda::expand_add_")
def _expand_add_fake(y, h, lora_b, scale, slice_offsets):
    _check_same_device("expand_add_", "y", y, h=h, lora_b=lora_b)
    fake_checks.expand_add(y, h, lora_b, slice_offsets)
    _check_scale("expand_add_", scale)
    return None


@torch.library.register_fake("loracuda::merge_")
def _merge_fake(weight, lora_a, lora_b, scale, transposed):
    _check_same_device("merge_", "weight", weight, lora_a=lora_a, lora_b=lora_b)
    fake_checks.merge(weight, lora_a, lora_b, transposed, "merge_")
    _check_scale("merge_", scale)
    return None


@torch.library.register_fake("loracuda::restore_codes")
def _restore_codes_fake(weight, lora_a, lora_b, scale, transposed):
    _check_same_device("restore_codes", "weight", weight, lora_a=lora_a, lora_b=lora_b)
    fake_checks.merge(weight, lora_a, lora_b, transposed, "restore_codes")
    _check_scale("restore_codes", scale)
    return weight.new_empty(((weight.numel() + 3) // 4,), dtype=torch.uint8)


@torch.library.register_fake("loracuda::unmerge_exact_")
def _unmerge_exact_fake(weight, lora_a, lora_b, scale, transposed, codes, escape_values=None):
    _check_same_device(
        "unmerge_exact_", "weight", weight, lora_a=lora_a, lora_b=lora_b, codes=codes, escape_values=escape_values
    )
    fake_checks.merge(weight, lora_a, lora_b, transposed, "unmerge_exact_")
    fake_checks.restore_codes(weight, codes, "unmerge_exact_")
    if escape_values is not None:
        fake_checks.escape_values(weight, escape_values, "unmerge_exact_")
    _check_scale("unmerge_exact_", scale)
    return None


@torch.library.register_fake("loracuda::merge_exact_")
def _merge_exact_fake(weight, lora_a, lora_b, scale, transposed, max_record_bytes):
    _check_same_device("merge_exact_", "weight", weight, lora_a=lora_a, lora_b=lora_b)
    fake_checks.merge(weight, lora_a, lora_b, transposed, "merge_exact_")
    _check_scale("merge_exact_", scale)
    codes = weight.new_empty(((weight.numel() + 3) // 4,), dtype=torch.uint8)
    escapes = torch.library.get_ctx().new_dynamic_size()  # the number of code-3 elements: data-dependent
    return codes, weight.new_empty((escapes,))


@torch.library.register_fake("loracuda::backward")
def _backward_fake(grad_y, x, h, lora_a, lora_b, scale, dropout_p, seed, slice_offsets, grad_x):
    _check_same_device("backward", "x", x, grad_y=grad_y, h=h, lora_a=lora_a, lora_b=lora_b, grad_x=grad_x)
    fake_checks.backward(grad_y, x, h, lora_a, lora_b, dropout_p, seed, slice_offsets, grad_x)
    _check_scale("backward", scale)
    return torch.empty_like(lora_a, memory_format=torch.contiguous_format), torch.empty_like(
        lora_b, memory_format=torch.contiguous_format
    )


@torch.library.register_fake("loracuda::lora_linear")
def _lora_linear_fake(x, weight, bias, lora_a, lora_b, scale, dropout_p, seed, slice_offsets):
    _check_same_device("lora_linear", "x", x, weight=weight, bias=bias, lora_a=lora_a, lora_b=lora_b)
    fake_checks.lora_linear(x, weight, bias, lora_a, lora_b, dropout_p, seed, slice_offsets)
    _check_scale("lora_linear", scale)
    y = x.new_empty((x.shape[0], weight.shape[0]))
    h = x.new_empty((x.shape[0], lora_a.shape[0]), dtype=accumulate_dtype(x.dtype))
    return y, h


@torch.library.register_fake("loracuda::multi_shrink")
def _multi_shrink_fake(x, lora_a_all, ranks, adapter_ids, num_slices):
    _check_same_device("multi_shrink", "x", x, lora_a_all=lora_a_all, ranks=ranks, adapter_ids=adapter_ids)
    fake_checks.multi_shrink(x, lora_a_all, ranks, adapter_ids, num_slices)
    return x.new_empty((x.shape[0], lora_a_all.shape[1]), dtype=accumulate_dtype(x.dtype))


@torch.library.register_fake("loracuda::multi_expand_add_")
def _multi_expand_add_fake(y, h, lora_b_all, scales, ranks, adapter_ids, slice_offsets):
    _check_same_device(
        "multi_expand_add_", "y", y, h=h, lora_b_all=lora_b_all, scales=scales, ranks=ranks, adapter_ids=adapter_ids
    )
    fake_checks.multi_expand_add(y, h, lora_b_all, scales, ranks, adapter_ids, slice_offsets)
    return None
