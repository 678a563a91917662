"""The argument checks of csrc/checks.h, for the fake (meta) implementations in loracuda/ops.py.

Under torch.compile (and with FakeTensors generally) an op's fake implementation runs at trace time
instead of its kernel; these checks make a mismatch of shapes, ranks, slices or dtypes fail there, with
the message and exception type the kernel would raise at run time: ValueError for shapes and values,
TypeError for dtypes ("loracuda.<op>: argument '<arg>' ..."). They use torch._check_value /
torch._check_type, so symbolic sizes turn into guards or run-time assertions instead of errors.
Device checks and the checks that need tensor values (ranks, ids) or strides stay with the kernels and
with ops._check_same_device.
"""

from typing import Optional, Sequence

import torch
from torch import Tensor

# torch's C++ ScalarType names, as csrc/checks.h prints dtypes.
_SCALAR_TYPE_NAMES = {
    torch.float32: "Float", torch.float64: "Double", torch.bfloat16: "BFloat16", torch.float16: "Half",
    torch.int32: "Int", torch.int64: "Long", torch.uint8: "Byte", torch.int8: "Char", torch.int16: "Short",
    torch.bool: "Bool",
}


def _name(dtype: torch.dtype) -> str:
    return _SCALAR_TYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def _shape(t: Tensor) -> list:
    return list(t.shape)


def _value(cond, op: str, arg: str, text) -> None:
    torch._check_value(cond, lambda: f"loracuda.{op}: argument '{arg}' {text()}")


def _type(cond, op: str, arg: str, text) -> None:
    torch._check_type(cond, lambda: f"loracuda.{op}: argument '{arg}' {text()}")


def _accumulate(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def dim(t: Tensor, n: int, op: str, arg: str, shape: str) -> None:
    _value(t.dim() == n, op, arg, lambda: f"must be {n}-D {shape}, got shape {_shape(t)}")


def value_dtype(t: Tensor, op: str, arg: str) -> None:
    cpu = t.device.type == "cpu"
    ok = t.dtype in (torch.float32, torch.bfloat16, torch.float16) or (cpu and t.dtype == torch.float64)
    _type(ok, op, arg, lambda: "must be float32, bfloat16 or float16" + (" (or float64 on CPU)" if cpu else "")
          + f", got {_name(t.dtype)}")


def adapter_dtype(t: Tensor, value: torch.dtype, op: str, arg: str, value_arg: str) -> None:
    _type(t.dtype in (value, torch.float32), op, arg,
          lambda: f"must have the dtype of '{value_arg}' ({_name(value)}) or float32, got {_name(t.dtype)}")


def dropout(p: float, seed: Optional[Tensor], op: str) -> None:
    _value(0.0 <= p < 1.0, op, "dropout_p", lambda: f"must be in [0, 1), got {p:g}")  # %g: how C++ streams print a double
    if p > 0.0:
        _value(seed is not None, op, "seed", lambda: "is required when dropout_p > 0")
    if seed is not None:
        _type(seed.dtype == torch.int64, op, "seed", lambda: f"must be an int64 tensor, got {_name(seed.dtype)}")
        _value(seed.numel() == 1, op, "seed", lambda: f"must have exactly one element, got shape {_shape(seed)}")


def slice_offsets(offsets: Sequence[int], n, op: str) -> int:
    """The number of slices S; checks the offsets as check_slice_offsets does."""
    if len(offsets) == 0:
        return 1
    text = list(offsets)
    _value(len(offsets) >= 2, op, "slice_offsets", lambda: f"must be empty or hold S + 1 column offsets, got {text}")
    _value(offsets[0] == 0 and offsets[-1] == n, op, "slice_offsets",
           lambda: f"must start at 0 and end at N = {n}, got {text}")
    for i in range(1, len(offsets)):
        _value(offsets[i] > offsets[i - 1], op, "slice_offsets", lambda: f"must be strictly increasing, got {text}")
    return len(offsets) - 1


# ---- per op ---------------------------------------------------------------------------------------


def shrink(x: Tensor, lora_a: Tensor, dropout_p: float, seed: Optional[Tensor], op: str = "shrink") -> None:
    dim(x, 2, op, "x", "[M, K]")
    dim(lora_a, 2, op, "lora_a", "[R, K]")
    value_dtype(x, op, "x")
    adapter_dtype(lora_a, x.dtype, op, "lora_a", "x")
    _value(x.shape[1] >= 1, op, "x", lambda: f"must have K >= 1 columns, got shape {_shape(x)}")
    _value(lora_a.shape[0] >= 1, op, "lora_a", lambda: f"must have rank R >= 1 rows, got shape {_shape(lora_a)}")
    _value(lora_a.shape[1] == x.shape[1], op, "lora_a",
           lambda: f"must be [R, K] with K = {x.shape[1]} (from 'x'), got shape {_shape(lora_a)}")
    dropout(dropout_p, seed, op)


def expand_add(y: Tensor, h: Tensor, lora_b: Tensor, slice_offsets_: Sequence[int]) -> None:
    op = "expand_add_"
    dim(y, 2, op, "y", "[M, N]")
    dim(h, 2, op, "h", "[M, S*r]")
    dim(lora_b, 2, op, "lora_b", "[N, r]")
    value_dtype(y, op, "y")
    acc = _accumulate(y.dtype)
    _type(h.dtype == acc, op, "h", lambda: f"must be {_name(acc)} (the accumulation dtype for 'y' of dtype "
          f"{_name(y.dtype)}), got {_name(h.dtype)}")
    adapter_dtype(lora_b, y.dtype, op, "lora_b", "y")
    n = y.shape[1]
    _value(lora_b.shape[0] == n, op, "lora_b", lambda: f"must be [N, r] with N = {n} (from 'y'), got shape {_shape(lora_b)}")
    _value(lora_b.shape[1] >= 1, op, "lora_b", lambda: f"must have rank r >= 1 columns, got shape {_shape(lora_b)}")
    _value(h.shape[0] == y.shape[0], op, "h", lambda: f"must have M = {y.shape[0]} rows (from 'y'), got shape {_shape(h)}")
    s = slice_offsets(slice_offsets_, n, op)
    _value(h.shape[1] == s * lora_b.shape[1], op, "h",
           lambda: f"must have S * r = {s} * {lora_b.shape[1]} columns, got shape {_shape(h)}")


def merge(weight: Tensor, lora_a: Tensor, lora_b: Tensor, transposed: bool, op: str) -> None:
    dim(weight, 2, op, "weight", "[K, N]" if transposed else "[N, K]")
    dim(lora_a, 2, op, "lora_a", "[r, K]")
    dim(lora_b, 2, op, "lora_b", "[N, r]")
    value_dtype(weight, op, "weight")
    adapter_dtype(lora_a, weight.dtype, op, "lora_a", "weight")
    _type(lora_b.dtype == lora_a.dtype, op, "lora_b",
          lambda: f"must have the dtype of 'lora_a' ({_name(lora_a.dtype)}), got {_name(lora_b.dtype)}")
    n = weight.shape[1] if transposed else weight.shape[0]
    k = weight.shape[0] if transposed else weight.shape[1]
    _value(lora_a.shape[0] >= 1, op, "lora_a", lambda: f"must have rank r >= 1 rows, got shape {_shape(lora_a)}")
    _value(lora_a.shape[1] == k, op, "lora_a", lambda: f"must be [r, K] with K = {k} (from 'weight'"
           + (", transposed" if transposed else "") + f"), got shape {_shape(lora_a)}")
    _value(lora_b.shape[0] == n and lora_b.shape[1] == lora_a.shape[0], op, "lora_b",
           lambda: f"must be [N, r] = [{n}, {lora_a.shape[0]}], got shape {_shape(lora_b)}")


def restore_codes(weight: Tensor, codes: Tensor, op: str) -> None:
    size = (weight.numel() + 3) // 4
    _type(codes.dtype == torch.uint8, op, "codes", lambda: f"must be uint8, got {_name(codes.dtype)}")
    _value(codes.dim() == 1 and codes.shape[0] == size, op, "codes",
           lambda: f"must be a contiguous 1-D tensor of {size} bytes (2 bits per element of 'weight'), "
           f"got shape {_shape(codes)}")


def escape_values(weight: Tensor, values: Tensor, op: str) -> None:
    _type(values.dtype == weight.dtype, op, "escape_values",
          lambda: f"must have the dtype of 'weight' ({_name(weight.dtype)}), got {_name(values.dtype)}")
    _value(values.dim() == 1, op, "escape_values", lambda: f"must be 1-D, got shape {_shape(values)}")


def backward(grad_y: Tensor, x: Tensor, h: Tensor, lora_a: Tensor, lora_b: Tensor, dropout_p: float,
             seed: Optional[Tensor], slice_offsets_: Sequence[int], grad_x: Optional[Tensor]) -> None:
    op = "backward"
    dim(grad_y, 2, op, "grad_y", "[M, N]")
    dim(x, 2, op, "x", "[M, K]")
    dim(h, 2, op, "h", "[M, R]")
    dim(lora_a, 2, op, "lora_a", "[R, K]")
    dim(lora_b, 2, op, "lora_b", "[N, r]")
    value_dtype(x, op, "x")
    _type(grad_y.dtype == x.dtype, op, "grad_y",
          lambda: f"must have the dtype of 'x' ({_name(x.dtype)}), got {_name(grad_y.dtype)}")
    acc = _accumulate(x.dtype)
    _type(h.dtype == acc, op, "h", lambda: f"must be {_name(acc)}, got {_name(h.dtype)}")
    adapter_dtype(lora_a, x.dtype, op, "lora_a", "x")
    adapter_dtype(lora_b, x.dtype, op, "lora_b", "x")
    m, k, n = x.shape[0], x.shape[1], grad_y.shape[1]
    _value(grad_y.shape[0] == m, op, "grad_y", lambda: f"must have M = {m} rows (from 'x'), got shape {_shape(grad_y)}")
    _value(k >= 1, op, "x", lambda: f"must have K >= 1 columns, got shape {_shape(x)}")
    _value(lora_a.shape[1] == k and lora_a.shape[0] >= 1, op, "lora_a",
           lambda: f"must be [R, K] with K = {k}, got shape {_shape(lora_a)}")
    _value(h.shape[0] == m and h.shape[1] == lora_a.shape[0], op, "h",
           lambda: f"must be [M, R] = [{m}, {lora_a.shape[0]}], got shape {_shape(h)}")
    _value(lora_b.shape[0] == n and lora_b.shape[1] >= 1, op, "lora_b",
           lambda: f"must be [N, r] with N = {n} (from 'grad_y'), got shape {_shape(lora_b)}")
    s = slice_offsets(slice_offsets_, n, op)
    _value(lora_a.shape[0] == s * lora_b.shape[1], op, "lora_a",
           lambda: f"must have S * r = {s} * {lora_b.shape[1]} rows, got shape {_shape(lora_a)}")
    dropout(dropout_p, seed, op)
    if grad_x is not None:
        dim(grad_x, 2, op, "grad_x", "[M, K]")
        _type(grad_x.dtype == x.dtype, op, "grad_x",
              lambda: f"must have the dtype of 'x' ({_name(x.dtype)}), got {_name(grad_x.dtype)}")
        _value(grad_x.shape[0] == m and grad_x.shape[1] == k, op, "grad_x",
               lambda: f"must be [M, K] = [{m}, {k}], got shape {_shape(grad_x)}")


def lora_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: Tensor, lora_b: Tensor,
                dropout_p: float, seed: Optional[Tensor], slice_offsets_: Sequence[int]) -> None:
    op = "lora_linear"
    dim(x, 2, op, "x", "[M, K]")
    dim(weight, 2, op, "weight", "[N, K]")
    value_dtype(x, op, "x")
    _type(weight.dtype == x.dtype, op, "weight",
          lambda: f"must have the dtype of 'x' ({_name(x.dtype)}), got {_name(weight.dtype)}")
    _value(weight.shape[1] == x.shape[1], op, "weight",
           lambda: f"must be [N, K] with K = {x.shape[1]} (from 'x'), got shape {_shape(weight)}")
    if bias is not None:
        _value(bias.dim() == 1 and bias.shape[0] == weight.shape[0], op, "bias",
               lambda: f"must be [N] with N = {weight.shape[0]}, got shape {_shape(bias)}")
        _type(bias.dtype == x.dtype, op, "bias",
              lambda: f"must have the dtype of 'x' ({_name(x.dtype)}), got {_name(bias.dtype)}")
    shrink(x, lora_a, dropout_p, seed, op)
    _value(lora_b.dim() == 2 and lora_b.shape[0] == weight.shape[0], op, "lora_b",
           lambda: f"must be [N, r] with N = {weight.shape[0]} (from 'weight'), got shape {_shape(lora_b)}")
    s = slice_offsets(slice_offsets_, weight.shape[0], op)
    _value(lora_a.shape[0] == s * lora_b.shape[1], op, "lora_a",
           lambda: f"must have S * r = {s} * {lora_b.shape[1]} rows, got shape {_shape(lora_a)}")


def _adapter_table(t: Tensor, adapters, dtype: torch.dtype, dtype_name: str, op: str, arg: str) -> None:
    dim(t, 1, op, arg, "[L]")
    _type(t.dtype == dtype, op, arg, lambda: f"must be {dtype_name}, got {_name(t.dtype)}")
    _value(t.shape[0] == adapters, op, arg, lambda: f"must have L = {adapters} entries, got shape {_shape(t)}")


def _adapter_ids(ids: Tensor, m, op: str, ref_arg: str) -> None:
    dim(ids, 1, op, "adapter_ids", "[M]")
    _type(ids.dtype == torch.int32, op, "adapter_ids", lambda: f"must be int32, got {_name(ids.dtype)}")
    _value(ids.shape[0] == m, op, "adapter_ids",
           lambda: f"must have M = {m} entries (one per row of '{ref_arg}'), got shape {_shape(ids)}")


def multi_shrink(x: Tensor, lora_a_all: Tensor, ranks: Tensor, adapter_ids: Tensor, num_slices: int) -> None:
    op = "multi_shrink"
    dim(x, 2, op, "x", "[M, K]")
    dim(lora_a_all, 3, op, "lora_a_all", "[L, S*r_max, K]")
    value_dtype(x, op, "x")
    adapter_dtype(lora_a_all, x.dtype, op, "lora_a_all", "x")
    _value(x.shape[1] >= 1, op, "x", lambda: f"must have K >= 1 columns, got shape {_shape(x)}")
    _value(lora_a_all.shape[0] >= 1 and lora_a_all.shape[1] >= 1 and lora_a_all.shape[2] == x.shape[1], op,
           "lora_a_all", lambda: f"must be [L, S*r_max, K] with L >= 1 and K = {x.shape[1]} (from 'x'), "
           f"got shape {_shape(lora_a_all)}")
    _value(num_slices >= 1 and lora_a_all.shape[1] % num_slices == 0, op, "num_slices",
           lambda: f"must be >= 1 and divide S*r_max = {lora_a_all.shape[1]}, got {num_slices}")
    _adapter_table(ranks, lora_a_all.shape[0], torch.int32, "int32", op, "ranks")
    _adapter_ids(adapter_ids, x.shape[0], op, "x")


def multi_expand_add(y: Tensor, h: Tensor, lora_b_all: Tensor, scales: Tensor, ranks: Tensor, adapter_ids: Tensor,
                     slice_offsets_: Sequence[int]) -> None:
    op = "multi_expand_add_"
    dim(y, 2, op, "y", "[M, N]")
    dim(h, 2, op, "h", "[M, S*r_max]")
    dim(lora_b_all, 3, op, "lora_b_all", "[L, N, r_max]")
    value_dtype(y, op, "y")
    acc = _accumulate(y.dtype)
    _type(h.dtype == acc, op, "h", lambda: f"must be {_name(acc)} (the accumulation dtype for 'y' of dtype "
          f"{_name(y.dtype)}), got {_name(h.dtype)}")
    adapter_dtype(lora_b_all, y.dtype, op, "lora_b_all", "y")
    n = y.shape[1]
    _value(lora_b_all.shape[0] >= 1 and lora_b_all.shape[1] == n and lora_b_all.shape[2] >= 1, op, "lora_b_all",
           lambda: f"must be [L, N, r_max] with L >= 1 and N = {n} (from 'y'), got shape {_shape(lora_b_all)}")
    _value(h.shape[0] == y.shape[0], op, "h", lambda: f"must have M = {y.shape[0]} rows (from 'y'), got shape {_shape(h)}")
    s = slice_offsets(slice_offsets_, n, op)
    _value(h.shape[1] == s * lora_b_all.shape[2], op, "h",
           lambda: f"must have S * r_max = {s} * {lora_b_all.shape[2]} columns, got shape {_shape(h)}")
    adapters = lora_b_all.shape[0]
    _adapter_table(scales, adapters, torch.float32, "float32", op, "scales")
    _adapter_table(ranks, adapters, torch.int32, "int32", op, "ranks")
    _adapter_ids(adapter_ids, y.shape[0], op, "y")
