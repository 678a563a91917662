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


# ---- grouped LoRA (mixture-of-experts experts, or one adapter per group of rows) ------------------
# G groups; group_ids int64 [M] in [-1, G) (-1: the row takes no part), rows in any order, groups of
# any size (empty ones too); lora_a [G, r, K], lora_b [G, N, r], weight [G, N, K], each any strided view.
# PEFT's target_parameters factors are views of this layout: lora_a = A_flat.view(G, r, K) and
# lora_b = B_flat.view(N, r, G).permute(2, 0, 1) (see grouped_factor_views). Ids outside [-1, G) raise
# on the CPU; the CUDA kernels (no host synchronisation) treat them as -1.


def grouped_factor_views(lora_a_flat: Tensor, lora_b_flat: Tensor, num_groups: int) -> tuple[Tensor, Tensor]:
    """PEFT's target_parameters factors A_flat [r*G, K] (expert-major rows: A_e[j] = A_flat[e*r + j]) and
    B_flat [N, r*G] (rank-major columns: B_e[n, j] = B_flat[n, j*G + e]) as the grouped ops' lora_a
    [G, r, K] and lora_b [G, N, r]: views, no copy."""
    g = int(num_groups)
    rg, k = lora_a_flat.shape
    n = lora_b_flat.shape[0]
    r = rg // g
    return lora_a_flat.view(g, r, k), lora_b_flat.view(n, r, g).permute(2, 0, 1)


def grouped_shrink(x: Tensor, lora_a: Tensor, group_ids: Tensor, dropout_p: float = 0.0, seed: Seed = None) -> Tensor:
    """h [M, r] float32 (float64 for float64 x): h[m] = lora_a[g_m] @ (mask * x[m] / (1 - p)); 0 where
    g_m = -1. x [M, K]; lora_a [G, r, K] in x's dtype or float32; mask element index m * K + k."""
    return _ops.grouped_shrink(x, lora_a, group_ids, float(dropout_p), seed_tensor(seed))


def grouped_expand_add_(y: Tensor, h: Tensor, lora_b: Tensor, group_ids: Tensor, scale: float) -> None:
    """In place: y[m] += scale * lora_b[g_m] @ h[m] for every row with g_m >= 0 (other rows untouched).
    y [M, N] with unit column stride; h [M, r] float32 (float64 for float64 y); lora_b [G, N, r]."""
    _ops.grouped_expand_add_(y, h, lora_b, group_ids, float(scale))


def grouped_backward(
    grad_y: Tensor,
    x: Tensor,
    h: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    group_ids: Tensor,
    scale: float,
    dropout_p: float = 0.0,
    seed: Seed = None,
    grad_x: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """The grouped LoRA backward. Per group g over its rows: g_rows = scale * grad_y @ lora_b[g],
    grad_a[g] = g_rows^T @ dropped(x), grad_b[g] = scale * grad_y^T @ h; when ``grad_x`` [M, K] is given,
    dropped(g_rows @ lora_a[g]) is added into it in place. Returns (grad_a [G, r, K], grad_b [G, N, r]),
    contiguous, in the dtypes of lora_a and lora_b; a group without rows gets exact zeros."""
    return _ops.grouped_backward(
        grad_y, x, h, lora_a, lora_b, group_ids, float(scale), float(dropout_p), seed_tensor(seed), grad_x
    )


def grouped_mm(x: Tensor, weight: Tensor, group_ids: Tensor, transpose_weight: bool = False) -> Tensor:
    """The base grouped GEMM: out[m] = weight[g_m] @ x[m] (x [M, K], weight [G, N, K], out [M, N]); with
    ``transpose_weight`` out[m] = weight[g_m]^T @ x[m] (x [M, N], out [M, K]). Rows with id -1 give 0."""
    return _ops.grouped_mm(x, weight, group_ids, bool(transpose_weight))


def grouped_weight_grad(grad_y: Tensor, x: Tensor, group_ids: Tensor, num_groups: int) -> Tensor:
    """out[g] = sum over the rows of group g of grad_y[m]^T x[m]: [G, N, K] in x's dtype (zeros for a
    group without rows)."""
    return _ops.grouped_weight_grad(grad_y, x, group_ids, int(num_groups))


def _check_value(cond, op: str, arg: str, message) -> None:
    torch._check_value(cond, lambda: f"loracuda.{op}: argument '{arg}' {message()}")


def _check_type(cond, op: str, arg: str, message) -> None:
    torch._check_type(cond, lambda: f"loracuda.{op}: argument '{arg}' {message()}")


def _check_ids(op: str, ids: Tensor, m, ref: Tensor, ref_arg: str) -> None:
    _check_value(ids.dim() == 1, op, "group_ids", lambda: f"must be 1-D [M], got shape {tuple(ids.shape)}")
    _check_type(ids.dtype == torch.int64, op, "group_ids", lambda: f"must be int64, got {ids.dtype}")
    _check_value(ids.shape[0] == m, op, "group_ids",
                 lambda: f"must have M = {m} entries (one per row of '{ref_arg}'), got shape {tuple(ids.shape)}")
    _check_same_device(op, ref_arg, ref, group_ids=ids)


def _check_grouped_a(op: str, a: Tensor, k) -> None:
    _check_value(a.dim() == 3, op, "lora_a", lambda: f"must be 3-D [G, r, K], got shape {tuple(a.shape)}")
    _check_value(a.shape[0] >= 1 and a.shape[1] >= 1 and a.shape[2] == k, op, "lora_a",
                 lambda: f"must be [G, r, K] with G >= 1, r >= 1 and K = {k}, got shape {tuple(a.shape)}")


def _check_grouped_b(op: str, b: Tensor, n, groups=None, rank=None) -> None:
    _check_value(b.dim() == 3, op, "lora_b", lambda: f"must be 3-D [G, N, r], got shape {tuple(b.shape)}")
    _check_value(b.shape[0] >= 1 and b.shape[1] == n and b.shape[2] >= 1, op, "lora_b",
                 lambda: f"must be [G, N, r] with G >= 1, r >= 1 and N = {n}, got shape {tuple(b.shape)}")
    if groups is not None:
        _check_value(b.shape[0] == groups and b.shape[2] == rank, op, "lora_b",
                     lambda: f"must be [G, N, r] = [{groups}, {n}, {rank}] (G and r from 'lora_a'), "
                     f"got shape {tuple(b.shape)}")


@torch.library.register_fake("loracuda::grouped_shrink")
def _grouped_shrink_fake(x, lora_a, group_ids, dropout_p, seed):
    op = "grouped_shrink"
    _check_same_device(op, "x", x, lora_a=lora_a)
    _check_value(x.dim() == 2, op, "x", lambda: f"must be 2-D [M, K], got shape {tuple(x.shape)}")
    _check_grouped_a(op, lora_a, x.shape[1])
    _check_ids(op, group_ids, x.shape[0], x, "x")
    return x.new_empty((x.shape[0], lora_a.shape[1]), dtype=accumulate_dtype(x.dtype))


@torch.library.register_fake("loracuda::grouped_expand_add_")
def _grouped_expand_add_fake(y, h, lora_b, group_ids, scale):
    op = "grouped_expand_add_"
    _check_same_device(op, "y", y, h=h, lora_b=lora_b)
    _check_grouped_b(op, lora_b, y.shape[1])
    _check_value(h.dim() == 2 and h.shape[0] == y.shape[0] and h.shape[1] == lora_b.shape[2], op, "h",
                 lambda: f"must be [M, r] = [{y.shape[0]}, {lora_b.shape[2]}] (M from 'y', r from 'lora_b'), "
                 f"got shape {tuple(h.shape)}")
    _check_ids(op, group_ids, y.shape[0], y, "y")
    return None


@torch.library.register_fake("loracuda::grouped_backward")
def _grouped_backward_fake(grad_y, x, h, lora_a, lora_b, group_ids, scale, dropout_p, seed, grad_x):
    op = "grouped_backward"
    _check_same_device(op, "x", x, grad_y=grad_y, h=h, lora_a=lora_a, lora_b=lora_b, grad_x=grad_x)
    _check_grouped_a(op, lora_a, x.shape[1])
    _check_grouped_b(op, lora_b, grad_y.shape[1], lora_a.shape[0], lora_a.shape[1])
    _check_ids(op, group_ids, x.shape[0], x, "x")
    return (
        torch.empty_like(lora_a, memory_format=torch.contiguous_format),
        torch.empty_like(lora_b, memory_format=torch.contiguous_format),
    )


@torch.library.register_fake("loracuda::grouped_mm")
def _grouped_mm_fake(x, weight, group_ids, transpose_weight):
    op = "grouped_mm"
    _check_same_device(op, "x", x, weight=weight)
    _check_value(weight.dim() == 3, op, "weight", lambda: f"must be 3-D [G, N, K], got shape {tuple(weight.shape)}")
    width = weight.shape[1] if transpose_weight else weight.shape[2]
    _check_value(weight.shape[0] >= 1 and width == x.shape[1], op, "weight",
                 lambda: f"must be [G, N, K] with G >= 1 and {'N' if transpose_weight else 'K'} = {x.shape[1]} "
                 f"(from 'x'), got shape {tuple(weight.shape)}")
    _check_ids(op, group_ids, x.shape[0], x, "x")
    return x.new_empty((x.shape[0], weight.shape[2] if transpose_weight else weight.shape[1]))


@torch.library.register_fake("loracuda::grouped_weight_grad")
def _grouped_weight_grad_fake(grad_y, x, group_ids, num_groups):
    op = "grouped_weight_grad"
    _check_same_device(op, "x", x, grad_y=grad_y)
    _check_ids(op, group_ids, x.shape[0], x, "x")
    return x.new_empty((num_groups, grad_y.shape[1], x.shape[1]))


@torch.library.register_fake("loracuda::grouped_lora_linear")
def _grouped_lora_linear_fake(x, weight, lora_a, lora_b, group_ids, scale, dropout_p, seed):
    op = "grouped_lora_linear"
    _check_same_device(op, "x", x, weight=weight, lora_a=lora_a, lora_b=lora_b)
    _check_value(weight.dim() == 3, op, "weight", lambda: f"must be 3-D [G, N, K], got shape {tuple(weight.shape)}")
    _check_value(weight.shape[0] >= 1 and weight.shape[2] == x.shape[1], op, "weight",
                 lambda: f"must be [G, N, K] with G >= 1 and K = {x.shape[1]} (from 'x'), got shape "
                 f"{tuple(weight.shape)}")
    _check_grouped_a(op, lora_a, x.shape[1])
    _check_value(lora_a.shape[0] == weight.shape[0], op, "lora_a",
                 lambda: f"must have G = {weight.shape[0]} groups (from 'weight'), got shape {tuple(lora_a.shape)}")
    _check_grouped_b(op, lora_b, weight.shape[1], lora_a.shape[0], lora_a.shape[1])
    _check_ids(op, group_ids, x.shape[0], x, "x")
    y = x.new_empty((x.shape[0], weight.shape[1]))
    h = x.new_empty((x.shape[0], lora_a.shape[1]), dtype=accumulate_dtype(x.dtype))
    return y, h
