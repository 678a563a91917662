"""Merge adapters into their base weights in place, and unmerge them bit-exactly (DESIGN.md §3).

Exact merge of W += s * B A (one rounding, deterministic: ops.merge_) keeps a restore record instead of a
copy of W: ops.restore_codes gives 2 bits per element saying how ops.unmerge_exact_ recovers it from the
merged value (code 3: it cannot), and the values of the code-3 elements are saved beforehand with their
flat indices. Record bytes = ceil(numel / 4) + (index bytes + element bytes) per code-3 element; merge
refuses, before writing anything, when that exceeds a quarter of the weight's bytes.

Every check (the records' sizes, safe mode's finite checks, the adapters' dtypes) runs on every layer
before the first weight is written, so an error leaves the whole model unchanged.

The record is valid only while the adapter factors and the merged weight are unchanged: their tensor
version counters are kept and unmerge refuses to run exactly if any has moved.
"""

import dataclasses
from typing import Iterable, Optional, Union

import torch
from torch import Tensor, nn

from . import ops
from .layers import LoRALinear

# Rows of W per block in safe mode's finite check of W + delta: blocks of about 2^20 float32 values
# (4 MiB), so the check never holds a full-size delta.
_SAFE_BLOCK_ELEMS = 1 << 20


@dataclasses.dataclass
class MergeRecord:
    """How to undo one merge: scale used, exactness, restore codes (uint8 [ceil(numel/4)]), flat indices
    (int32 or int64) and saved values (the weight's dtype) of the elements with code 3, and the version
    counters of (weight, lora_a, lora_b) right after the merge."""

    scale: float
    exact: bool
    codes: Optional[Tensor]
    escape_index: Optional[Tensor]
    escape_values: Optional[Tensor]
    versions: tuple[int, int, int]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.escape_index, self.escape_values) if t is not None)


@dataclasses.dataclass
class MergeReport:
    """What merge did: the adapters merged per layer path, the restore record's bytes per layer, their
    total, and the base weights' total bytes (for comparison: the record is at most a quarter of them)."""

    layers: dict[str, list[str]]
    record_bytes: dict[str, int]
    total_record_bytes: int
    weight_bytes: int
    exact: bool

    def __repr__(self) -> str:
        return (
            f"MergeReport({len(self.layers)} layers, exact={self.exact}, restore records "
            f"{self.total_record_bytes} bytes for {self.weight_bytes} weight bytes)"
        )


def _factors(layer: LoRALinear, name: str) -> tuple[Tensor, Tensor]:
    """Detached factors in a dtype merge_ accepts (the weight's dtype or float32), the same tensors on
    every call for unchanged parameters, so merge and unmerge compute the same delta bit for bit."""
    w = layer.weight
    a, b = layer.lora_A[name].detach(), layer.lora_B[name].detach()
    ok = (w.dtype, torch.float32)
    a = a if a.dtype in ok else a.to(torch.float32)
    b = b if b.dtype in ok else b.to(torch.float32)
    return a, b


def _escape_positions(codes: Tensor, numel: int) -> Tensor:
    """Flat indices (ascending, int64) of the elements whose 2-bit code is 3. A byte holds one iff
    (c & (c >> 1) & 0x55) != 0; the scan runs on 8-byte words (the same test with the mask repeated;
    int64's arithmetic shift only differs in bit 63, which the mask drops) and only the words and then
    the bytes that hit are expanded, so no numel-sized temporary is built."""
    nbytes = codes.numel()
    pad = (-nbytes) % 8
    padded = codes if pad == 0 else torch.cat([codes, codes.new_zeros(pad)])
    words = padded.view(torch.int64)
    hit_words = ((words & (words >> 1) & 0x5555555555555555) != 0).nonzero().squeeze(1)
    if hit_words.numel() == 0:
        return hit_words
    byte_index = (hit_words.unsqueeze(1) * 8 + torch.arange(8, device=codes.device)).reshape(-1)
    byte_index = byte_index[byte_index < nbytes]
    hit_bytes = padded[byte_index]
    keep = (hit_bytes & (hit_bytes >> 1) & 0x55) != 0
    byte_index, hit_bytes = byte_index[keep], hit_bytes[keep]
    shifts = torch.arange(0, 8, 2, device=codes.device, dtype=torch.uint8)
    per_elem = (hit_bytes.unsqueeze(1) >> shifts) & 3  # [hits, 4]
    flat = byte_index.unsqueeze(1) * 4 + torch.arange(4, device=codes.device)
    pos = flat[per_elem == 3]
    return pos[pos < numel]


def _check_finite(path: str, name: str, layer: LoRALinear, a: Tensor, b: Tensor, scale: float) -> None:
    for label, t in (("lora_A", a), ("lora_B", b)):
        if not torch.isfinite(t).all():
            raise ValueError(f"loracuda.merge: adapter {name!r} of layer {path!r} has inf/NaN in {label}; nothing was merged")
    w = layer.weight.detach()
    rows = max(1, _SAFE_BLOCK_ELEMS // max(1, w.shape[1]))
    for start in range(0, w.shape[0], rows):
        stop = min(start + rows, w.shape[0])
        if layer.fan_in_fan_out:  # w [K, N]: rows are input features
            d = scale * (a[:, start:stop].to(torch.float32).t() @ b.to(torch.float32).t())
        else:
            d = scale * (b[start:stop].to(torch.float32) @ a.to(torch.float32))
        merged = (w[start:stop].to(torch.float32) + d).to(w.dtype)
        if not torch.isfinite(merged).all():
            raise ValueError(
                f"loracuda.merge: merging adapter {name!r} into layer {path!r} would give inf/NaN weights "
                f"(rows {start}..{stop - 1}); nothing was merged"
            )


def _plan(model: nn.Module, adapter: Union[None, str, Iterable[str]]) -> list[tuple[str, LoRALinear, list[str]]]:
    plan = []
    wanted = None if adapter is None else ([adapter] if isinstance(adapter, str) else list(adapter))
    for path, layer in model.named_modules():
        if not isinstance(layer, LoRALinear):
            continue
        names = layer.active_adapters if wanted is None else [n for n in wanted if n in layer.lora_A]
        names = [n for n in names if n not in layer.merged]
        if names:
            plan.append((path, layer, names))
    return plan


@torch.no_grad()
def merge(model: nn.Module, adapter: Union[None, str, Iterable[str]] = None, safe: bool = False, exact: bool = True) -> MergeReport:
    """Merges ``adapter`` (a name or names; None: each layer's active adapters) into the base weights in
    place. exact=True keeps a restore record (at most a quarter of the weight's bytes; raises, naming the
    layer, before writing anything if a record would be larger) so that unmerge restores the weights bit
    for bit; exact=False keeps nothing and unmerge subtracts (not bit-exact in low precision).
    safe=True checks the adapters and the would-be merged weights for inf/NaN first. Returns a MergeReport."""
    plan = _plan(model, adapter)
    if adapter is not None:
        wanted = [adapter] if isinstance(adapter, str) else list(adapter)
        known = {n for _, layer in model.named_modules() if isinstance(layer, LoRALinear) for n in layer.lora_A}
        missing = [n for n in wanted if n not in known]
        if missing:
            raise ValueError(f"loracuda.merge: no adapter named {missing} in the model (adapters: {sorted(known)})")
    if safe:
        for path, layer, names in plan:
            for n in names:
                a, b = _factors(layer, n)
                _check_finite(path, n, layer, a, b, layer.scaling[n])
    for path, layer, _ in plan:
        if not layer.weight.is_contiguous():
            raise ValueError(f"loracuda.merge: the weight of layer {path!r} is not contiguous; it cannot be merged in place")
    # Phase 1 (read-only): every record. With several adapters per layer, each merge's codes depend on
    # the weight left by the previous one, so a layer with more than one adapter is recorded as it goes
    # (its size check then covers its first adapter up front and the rest as they come).
    records: dict[tuple[str, str], MergeRecord] = {}
    if exact:
        for path, layer, names in plan:
            w = layer.weight
            a, b = _factors(layer, names[0])
            records[(path, names[0])] = _record(path, w, a, b, layer.scaling[names[0]], layer.fan_in_fan_out)
    # Phase 2: write.
    report = MergeReport({}, {}, 0, 0, exact)
    for path, layer, names in plan:
        w = layer.weight
        for i, n in enumerate(names):
            a, b = _factors(layer, n)
            s = layer.scaling[n]
            rec = records.get((path, n)) if i == 0 else None
            if exact and rec is None:
                rec = _record(path, w, a, b, s, layer.fan_in_fan_out)
            if rec is None:
                rec = MergeRecord(s, False, None, None, None, (0, 0, 0))
            ops.merge_(w, a, b, s, layer.fan_in_fan_out)
            rec.versions = (w._version, layer.lora_A[n]._version, layer.lora_B[n]._version)
            layer.merged[n] = rec
            report.layers.setdefault(path, []).append(n)
            report.record_bytes[path] = report.record_bytes.get(path, 0) + rec.nbytes
        report.weight_bytes += w.numel() * w.element_size()
    report.total_record_bytes = sum(report.record_bytes.values())
    return report


def _record(path: str, w: Tensor, a: Tensor, b: Tensor, scale: float, transposed: bool) -> MergeRecord:
    codes = ops.restore_codes(w, a, b, scale, transposed)
    pos = _escape_positions(codes, w.numel())
    index_dtype = torch.int32 if w.numel() <= 2**31 - 1 else torch.int64
    index_bytes = 4 if index_dtype == torch.int32 else 8
    size = codes.numel() + pos.numel() * (index_bytes + w.element_size())
    budget = w.numel() * w.element_size() // 4
    if size > budget:
        raise ValueError(
            f"loracuda.merge: the exact restore record of layer {path!r} would take {size} bytes, more than a "
            f"quarter of its weight ({budget} bytes; {pos.numel()} of {w.numel()} elements cannot be restored "
            "from codes); nothing was merged. Use merge(..., exact=False) for an inexact merge."
        )
    values = w.view(-1)[pos].clone()
    return MergeRecord(scale, True, codes, pos.to(index_dtype), values, (0, 0, 0))


@torch.no_grad()
def unmerge(model: nn.Module, adapter: Union[None, str, Iterable[str]] = None) -> list[str]:
    """Undoes merges (all merged adapters, or the named ones), last merged first, in place: bit-exact for
    exact merges. Raises, changing nothing, if a record no longer fits its tensors (the adapter or the
    merged weight was modified since the merge). Returns the paths of the layers unmerged."""
    wanted = None if adapter is None else ([adapter] if isinstance(adapter, str) else list(adapter))
    plan = []
    for path, layer in model.named_modules():
        if not (isinstance(layer, LoRALinear) and layer.merged):
            continue
        order = list(layer.merged)  # merge order
        names = [n for n in reversed(order) if wanted is None or n in wanted]
        if names != list(reversed(order))[: len(names)]:
            # Each record was made on the weight left by the merges before it: later merges come off first.
            raise ValueError(
                f"loracuda.unmerge: layer {path!r} has adapters {order} merged in this order; unmerge the "
                f"later ones before {names}"
            )
        if names:
            plan.append((path, layer, names))
    # Check every record before writing anything: the weight must be as the last merge left it and the
    # adapters as they were merged.
    for path, layer, names in plan:
        last = layer.merged[names[0]]
        if last.exact and layer.weight._version != last.versions[0]:
            raise RuntimeError(
                f"loracuda.unmerge: the weight of layer {path!r} was modified after adapter {names[0]!r} was "
                "merged, so the exact restore record no longer applies; nothing was unmerged"
            )
        for n in names:
            rec = layer.merged[n]
            if rec.exact and (layer.lora_A[n]._version, layer.lora_B[n]._version) != rec.versions[1:]:
                raise RuntimeError(
                    f"loracuda.unmerge: adapter {n!r} of layer {path!r} was modified after it was merged, so "
                    "the exact restore record no longer applies; nothing was unmerged"
                )
    done = []
    for path, layer, names in plan:
        w = layer.weight
        for n in names:
            rec = layer.merged[n]
            a, b = _factors(layer, n)
            if rec.exact:
                ops.unmerge_exact_(w, a, b, rec.scale, rec.codes, layer.fan_in_fan_out)
                if rec.escape_index.numel():
                    w.view(-1)[rec.escape_index.long()] = rec.escape_values
            else:
                ops.merge_(w, a, b, -rec.scale, layer.fan_in_fan_out)
            del layer.merged[n]
            if layer.merged:  # the weight is back to what the previous merge left: its record applies again
                prev = layer.merged[next(reversed(layer.merged))]
                prev.versions = (w._version,) + tuple(prev.versions[1:])
        done.append(path)
    return done
