"""Plain-PyTorch definitions of every loracuda op: the meaning the kernels are tested against.

Each function computes in the dtype its inputs promote to (call it on float64 copies for a float64
reference), returns new tensors and mutates nothing. Only tests and benchmarks import this module.
"""

from typing import Optional, Sequence

import torch
from torch import Tensor

_MASK32 = 0xFFFFFFFF


def _mul32(v: Tensor, constant: int) -> Tensor:
    """(v * constant) mod 2^32 for v in [0, 2^32), split so no int64 product overflows."""
    low = v * (constant & 0xFFFF)
    high = ((v * (constant >> 16)) & 0xFFFF) << 16
    return (low + high) & _MASK32


def _mix32(v: Tensor) -> Tensor:
    v = v ^ (v >> 16)
    v = _mul32(v, 0x7FEB352D)
    v = v ^ (v >> 15)
    v = _mul32(v, 0x846CA68B)
    return v ^ (v >> 16)


def _mix32_int(v: int) -> int:
    return int(_mix32(torch.tensor([v & _MASK32], dtype=torch.int64))[0])


def dropout_bits(seed: int, numel: int, device=None) -> Tensor:
    """32 random bits (as int64 values in [0, 2^32)) for element indices 0 .. numel-1."""
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    key_lo = _mix32_int((seed & _MASK32) ^ 0x243F6A88)
    key_hi = _mix32_int((seed >> 32) ^ 0x85A308D3)
    index = torch.arange(numel, dtype=torch.int64, device=device)
    first = _mix32((index + key_lo) & _MASK32)
    return _mix32(first ^ (((index >> 32) + key_hi) & _MASK32))


def dropout_threshold(p: float) -> int:
    return int(p * 16777216.0 + 0.5)


def dropout_mask(seed: int, m: int, k: int, p: float, device=None) -> Tensor:
    """bool [m, k]: True where an element of the logical [m, k] input is kept."""
    if p == 0.0:
        return torch.ones((m, k), dtype=torch.bool, device=device)
    bits = dropout_bits(seed, m * k, device)
    return ((bits >> 8) >= dropout_threshold(p)).reshape(m, k)


def _seed_int(seed) -> int:
    return int(seed.reshape(-1)[0]) if isinstance(seed, Tensor) else int(seed)


def dropped(x: Tensor, p: float, seed) -> Tensor:
    """mask * x / (1 - p) for x [M, K], in x's dtype (the float32-rounded 1 / (1 - p), as the kernels use)."""
    if p == 0.0:
        return x
    mask = dropout_mask(_seed_int(seed), x.shape[0], x.shape[1], p, x.device)
    keep_scale = float(torch.tensor(1.0 / (1.0 - p), dtype=torch.float32))
    return torch.where(mask, x * keep_scale, torch.zeros_like(x))


def _promote(*tensors: Tensor) -> torch.dtype:
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _slices(n: int, slice_offsets: Sequence[int]) -> list[tuple[int, int]]:
    offsets = list(slice_offsets) or [0, n]
    return list(zip(offsets[:-1], offsets[1:]))


def shrink(x: Tensor, lora_a: Tensor, dropout_p: float = 0.0, seed=None) -> Tensor:
    dtype = _promote(x, lora_a)
    h = dropped(x, dropout_p, seed).to(dtype) @ lora_a.to(dtype).t()
    return h.to(_acc(x.dtype))


def expand_add(y: Tensor, h: Tensor, lora_b: Tensor, scale: float, slice_offsets: Sequence[int] = ()) -> Tensor:
    """Out of place: the y that expand_add_ leaves."""
    dtype = _promote(y, h, lora_b)
    r = lora_b.shape[1]
    out = y.to(dtype).clone()
    for i, (start, end) in enumerate(_slices(y.shape[1], slice_offsets)):
        h_i = h[:, i * r : (i + 1) * r].to(dtype)
        out[:, start:end] += scale * (h_i @ lora_b[start:end].to(dtype).t())
    return out.to(y.dtype)


def delta(lora_a: Tensor, lora_b: Tensor, scale: float, transposed: bool = False) -> Tensor:
    d = scale * (lora_b @ lora_a)
    return d.t() if transposed else d


def merge(weight: Tensor, lora_a: Tensor, lora_b: Tensor, scale: float, transposed: bool = False) -> Tensor:
    """Out of place: the weight that merge_ leaves, computed in the promoted dtype."""
    dtype = _promote(weight, lora_a, lora_b)
    d = delta(lora_a.to(dtype), lora_b.to(dtype), scale, transposed)
    return (weight.to(dtype) + d).to(weight.dtype)


def backward(
    grad_y: Tensor,
    x: Tensor,
    h: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    scale: float,
    dropout_p: float = 0.0,
    seed=None,
    slice_offsets: Sequence[int] = (),
) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_a, grad_b, grad_x_lora): grad_x_lora is what backward adds into grad_x."""
    dtype = _promote(grad_y, x, lora_a, lora_b)
    r = lora_b.shape[1]
    dy = grad_y.to(dtype)
    hh = h.to(dtype)
    b = lora_b.to(dtype)
    g_parts, grad_b = [], torch.empty_like(b)
    for i, (start, end) in enumerate(_slices(grad_y.shape[1], slice_offsets)):
        g_parts.append(scale * (dy[:, start:end] @ b[start:end]))
        grad_b[start:end] = scale * (dy[:, start:end].t() @ hh[:, i * r : (i + 1) * r])
    g = torch.cat(g_parts, dim=1)
    xd = dropped(x.to(dtype), dropout_p, seed)
    grad_a = g.t() @ xd
    grad_x_lora = dropped(g @ lora_a.to(dtype), dropout_p, seed)
    return grad_a.to(lora_a.dtype), grad_b.to(lora_b.dtype), grad_x_lora.to(x.dtype)


def lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_a: Tensor,
    lora_b: Tensor,
    scale: float,
    dropout_p: float = 0.0,
    seed=None,
    slice_offsets: Sequence[int] = (),
) -> Tensor:
    """y = x @ weight^T + bias + scale * (dropout(x) @ lora_a^T) @ lora_b^T, any leading dims of x."""
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    y = torch.nn.functional.linear(x2, weight, bias)
    h = shrink(x2, lora_a, dropout_p, seed)
    y = expand_add(y, h, lora_b, scale, slice_offsets)
    return y.reshape(*lead, y.shape[-1])


# ---- multi-LoRA serving -------------------------------------------------------------------------


def _rank_mask(ranks: Tensor, ids: Tensor, r_max: int, num_slices: int) -> Tensor:
    """bool [M, S*r_max]: True where column i*r_max + j has j < ranks[id_m] (False for id -1)."""
    j = torch.arange(r_max, device=ids.device).repeat(num_slices)
    r_m = torch.where(ids >= 0, ranks.to(ids.device).long()[ids.clamp(min=0)], 0)
    return j[None, :] < r_m[:, None]


def multi_shrink(x: Tensor, lora_a_all: Tensor, ranks: Tensor, adapter_ids: Tensor, num_slices: int = 1) -> Tensor:
    """h [M, S*r_max]: h[m] = lora_a_all[id_m] @ x[m] over the rows each adapter's rank uses, 0 elsewhere."""
    dtype = _promote(x, lora_a_all)
    ids = adapter_ids.long()
    r_max = lora_a_all.shape[1] // num_slices
    a = lora_a_all.to(dtype)[ids.clamp(min=0)]  # [M, S*r_max, K]
    h = torch.einsum("mk,mrk->mr", x.to(dtype), a)
    h = torch.where(_rank_mask(ranks, ids, r_max, num_slices), h, torch.zeros_like(h))
    return h.to(_acc(x.dtype))


def multi_expand_add(
    y: Tensor,
    h: Tensor,
    lora_b_all: Tensor,
    scales: Tensor,
    ranks: Tensor,
    adapter_ids: Tensor,
    slice_offsets: Sequence[int] = (),
) -> Tensor:
    """Out of place: the y that multi_expand_add_ leaves."""
    dtype = _promote(y, h, lora_b_all)
    ids = adapter_ids.long()
    r_max = lora_b_all.shape[2]
    spans = _slices(y.shape[1], slice_offsets)
    keep = _rank_mask(ranks, ids, r_max, len(spans))
    hh = torch.where(keep, h.to(dtype), torch.zeros((), dtype=dtype, device=h.device))
    b = lora_b_all.to(dtype)[ids.clamp(min=0)]  # [M, N, r_max]
    # Columns beyond the token's rank count as zero whatever they hold (0 * NaN would be NaN).
    b = torch.where(_rank_mask(ranks, ids, r_max, 1)[:, None, :], b, torch.zeros((), dtype=dtype, device=b.device))
    s = torch.where(ids >= 0, scales.to(dtype)[ids.clamp(min=0)], torch.zeros((), dtype=dtype, device=ids.device))
    out = y.to(dtype).clone()
    for i, (start, end) in enumerate(spans):
        h_i = hh[:, i * r_max : (i + 1) * r_max]
        out[:, start:end] += s[:, None] * torch.einsum("mnr,mr->mn", b[:, start:end], h_i)
    # Rows without an adapter are returned exactly as they were.
    out = torch.where((ids >= 0)[:, None], out.to(y.dtype), y)
    return out


# ---- grouped LoRA (mixture-of-experts experts) --------------------------------------------------
# G groups; group_ids [M] in [-1, G); lora_a [G, r, K], lora_b [G, N, r], weight [G, N, K]. Each group's
# rows go through the plain per-group matmuls (a loop over groups, as a per-expert implementation does).


def _group_rows(group_ids: Tensor, groups: int) -> list[Tensor]:
    ids = group_ids.long()
    return [torch.nonzero(ids == g).flatten() for g in range(groups)]


def grouped_shrink(x: Tensor, lora_a: Tensor, group_ids: Tensor, dropout_p: float = 0.0, seed=None) -> Tensor:
    """h [M, r]: h[m] = lora_a[g_m] @ dropped(x)[m], 0 for rows with id -1."""
    dtype = _promote(x, lora_a)
    xd = dropped(x, dropout_p, seed).to(dtype)
    h = torch.zeros((x.shape[0], lora_a.shape[1]), dtype=dtype, device=x.device)
    for g, rows in enumerate(_group_rows(group_ids, lora_a.shape[0])):
        if rows.numel():
            h[rows] = xd[rows] @ lora_a[g].to(dtype).t()
    return h.to(_acc(x.dtype))


def grouped_expand_add(y: Tensor, h: Tensor, lora_b: Tensor, group_ids: Tensor, scale: float) -> Tensor:
    """Out of place: the y that grouped_expand_add_ leaves (rows with id -1 unchanged)."""
    dtype = _promote(y, h, lora_b)
    out = y.to(dtype).clone()
    for g, rows in enumerate(_group_rows(group_ids, lora_b.shape[0])):
        if rows.numel():
            out[rows] += scale * (h[rows].to(dtype) @ lora_b[g].to(dtype).t())
    return torch.where((group_ids.long() >= 0)[:, None], out.to(y.dtype), y)


def grouped_backward(
    grad_y: Tensor,
    x: Tensor,
    h: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    group_ids: Tensor,
    scale: float,
    dropout_p: float = 0.0,
    seed=None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_a [G, r, K], grad_b [G, N, r], grad_x_lora [M, K]): grad_x_lora is what grouped_backward adds
    into grad_x (0 for rows with id -1); groups without rows get zeros."""
    dtype = _promote(grad_y, x, lora_a, lora_b)
    dy, hh = grad_y.to(dtype), h.to(dtype)
    a, b = lora_a.to(dtype), lora_b.to(dtype)
    xd = dropped(x.to(dtype), dropout_p, seed)
    grad_a, grad_b = torch.zeros_like(a), torch.zeros_like(b)
    g_all = torch.zeros((x.shape[0], a.shape[1]), dtype=dtype, device=x.device)
    lora_x = torch.zeros((x.shape[0], x.shape[1]), dtype=dtype, device=x.device)
    for g, rows in enumerate(_group_rows(group_ids, a.shape[0])):
        if rows.numel():
            g_rows = scale * (dy[rows] @ b[g])
            grad_b[g] = scale * (dy[rows].t() @ hh[rows])
            grad_a[g] = g_rows.t() @ xd[rows]
            g_all[rows] = g_rows
            lora_x[rows] = g_rows @ a[g]
    grad_x_lora = dropped(lora_x, dropout_p, seed)
    return grad_a.to(lora_a.dtype), grad_b.to(lora_b.dtype), grad_x_lora.to(x.dtype)


def grouped_mm(x: Tensor, weight: Tensor, group_ids: Tensor, transpose_weight: bool = False) -> Tensor:
    """out[m] = weight[g_m] @ x[m] (or weight[g_m]^T @ x[m]), 0 for rows with id -1."""
    width = weight.shape[2] if transpose_weight else weight.shape[1]
    out = torch.zeros((x.shape[0], width), dtype=x.dtype, device=x.device)
    for g, rows in enumerate(_group_rows(group_ids, weight.shape[0])):
        if rows.numel():
            out[rows] = x[rows] @ (weight[g] if transpose_weight else weight[g].t())
    return out


def grouped_weight_grad(grad_y: Tensor, x: Tensor, group_ids: Tensor, num_groups: int) -> Tensor:
    out = torch.zeros((num_groups, grad_y.shape[1], x.shape[1]), dtype=x.dtype, device=x.device)
    for g, rows in enumerate(_group_rows(group_ids, num_groups)):
        if rows.numel():
            out[g] = grad_y[rows].t() @ x[rows]
    return out


def grouped_lora_linear(
    x: Tensor,
    weight: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    group_ids: Tensor,
    scale: float,
    dropout_p: float = 0.0,
    seed=None,
) -> Tensor:
    """y [M, N]: y[m] = weight[g_m] @ x[m] + scale * lora_b[g_m] @ lora_a[g_m] @ dropped(x)[m]; 0 for id -1.
    Differentiable by torch's autograd (the reference for gradients)."""
    y = grouped_mm(x, weight, group_ids)
    h = grouped_shrink(x, lora_a, group_ids, dropout_p, seed)
    return grouped_expand_add(y, h, lora_b, group_ids, scale)
