"""Merge adapters into their base weights in place, and unmerge them bit-exactly
(docs/design.md, section 'Math and memory passes').

Exact merge of W += s * B A (one rounding, deterministic) keeps a restore record instead of a copy of W:
ops.merge_exact_ merges and returns, from the same single pass over W, 2 bits per element saying how
ops.unmerge_exact_ recovers it from the merged value (code 3, an "escape": it cannot) and the original
values of the escapes in flat-index order; unmerge_exact_ writes those back itself, their positions
coming from the codes. Record bytes = ceil(numel / 4) + element bytes per escape; the op refuses, leaving
the weight as it was, when that exceeds a quarter of the weight's bytes (so bf16 admits up to 12.5%
escapes).

Every check that needs no merge (contiguity, safe mode's finite checks, the adapters' dtypes) runs on
every layer before the first weight is written. The record's size is known only once its layer is
merged; when a later layer's record is over budget, the layers already merged by this call are
unmerged with their records, bit for bit, before the error is raised, so an error leaves the whole
model unchanged.

Several adapters merged into a layer by one call are merged as one sum (their factors stacked along
the rank, each B times its scale, scale 1), so that one record covers them; they come off together.

The record is valid only while the adapter factors and the merged weight are unchanged: their tensor
version counters are kept and unmerge refuses to run exactly if any has moved. An inexact merge keeps
the factors' counters too: unmerging subtracts the delta of the factors as they are, so after a
change to them it refuses rather than subtract a delta that was never added.

merge and unmerge hold the model's lock (loracuda.model_lock): two threads merging one model run one
after the other, so an adapter is never merged twice.
"""

import dataclasses
from typing import Iterable, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from . import experts, ops
from .layers import LoRALinear
from .model_lock import locked

# Rows of W per block in safe mode's finite check of W + delta: blocks of about 2^20 float32 values
# (4 MiB), so the check never holds a full-size delta.
_SAFE_BLOCK_ELEMS = 1 << 20


@dataclasses.dataclass
class MergeRecord:
    """How to undo one merge of ``adapters`` (merged together) into a layer: the scale used, exactness,
    restore codes (uint8 [ceil(numel/4)]) and the original values (the weight's dtype, flat-index order)
    of the elements with code 3, and the version counters of the weight and of each adapter's
    (lora_A, lora_B) right after the merge."""

    adapters: tuple[str, ...]
    scale: float
    exact: bool
    codes: Optional[Tensor] = None
    escape_values: Optional[Tensor] = None
    weight_version: int = 0
    factor_versions: tuple = ()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.escape_values) if t is not None)


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


def _factors(layer: LoRALinear, names: Sequence[str]) -> tuple[Tensor, Tensor, float]:
    """(lora_a, lora_b, scale) of the delta of ``names`` together, detached, in a dtype merge_ accepts
    (the weight's dtype or float32). Built by the same operations on every call, so for unchanged
    parameters merge and unmerge compute the same delta bit for bit."""
    w = layer.weight
    ok = (w.dtype, torch.float32)
    if len(names) == 1:
        a, b = layer.lora_A[names[0]].detach(), layer.lora_B[names[0]].detach()
        a = a if a.dtype in ok else a.to(torch.float32)
        b = b if b.dtype in ok else b.to(torch.float32)
        return a, b, layer.scaling[names[0]]
    a = torch.cat([layer.lora_A[n].detach().to(torch.float32) for n in names], 0)
    b = torch.cat([layer.lora_B[n].detach().to(torch.float32) * layer.scaling[n] for n in names], 1)
    return a, b, 1.0


def _versions(layer: LoRALinear, names: Sequence[str]) -> tuple:
    return tuple((layer.lora_A[n]._version, layer.lora_B[n]._version) for n in names)


def _check_finite(path: str, names: Sequence[str], layer: LoRALinear) -> None:
    for n in names:
        for label, t in (("lora_A", layer.lora_A[n]), ("lora_B", layer.lora_B[n])):
            if not torch.isfinite(t.detach()).all():
                raise ValueError(
                    f"loracuda.merge: adapter {n!r} of layer {path!r} has inf/NaN in {label}; nothing was merged"
                )
    a, b, scale = _factors(layer, names)
    a, b = a.to(torch.float32), b.to(torch.float32)
    w = layer.weight.detach()
    rows = max(1, _SAFE_BLOCK_ELEMS // max(1, w.shape[1]))
    for start in range(0, w.shape[0], rows):
        stop = min(start + rows, w.shape[0])
        if layer.fan_in_fan_out:  # w [K, N]: its rows are input features
            d = scale * (a[:, start:stop].t() @ b.t())
        else:
            d = scale * (b[start:stop] @ a)
        merged = (w[start:stop].to(torch.float32) + d).to(w.dtype)
        if not torch.isfinite(merged).all():
            raise ValueError(
                f"loracuda.merge: merging {list(names)} into layer {path!r} would give inf/NaN weights "
                f"(rows {start}..{stop - 1}); nothing was merged"
            )


def _known(model: nn.Module) -> set:
    linear = {n for _, layer in model.named_modules() if isinstance(layer, LoRALinear) for n in layer.lora_A}
    return linear | experts.adapter_names(model)


def _wanted(adapter: Union[None, str, Iterable[str]], what: str) -> Optional[list[str]]:
    """The adapter names asked for, in order, each once (["a", "a"] is "a": merging it twice would add
    its delta twice); None for "the active ones"."""
    if adapter is None:
        return None
    wanted = [adapter] if isinstance(adapter, str) else list(adapter)
    bad = [n for n in wanted if not isinstance(n, str)]
    if bad:
        raise TypeError(f"loracuda.{what}: argument 'adapter' must be a name or a list of names, got {bad[0]!r}")
    return list(dict.fromkeys(wanted))


def _plan(model: nn.Module, adapter: Union[None, str, Iterable[str]]) -> list[tuple[str, LoRALinear, list[str]]]:
    wanted = _wanted(adapter, "merge")
    if wanted is not None:
        missing = [n for n in wanted if n not in _known(model)]
        if missing:
            raise ValueError(f"loracuda.merge: no adapter named {missing} in the model (adapters: {sorted(_known(model))})")
    plan = []
    for path, layer in model.named_modules():
        if not isinstance(layer, LoRALinear):
            continue
        names = layer.active_adapters if wanted is None else [n for n in wanted if n in layer.lora_A]
        names = [n for n in dict.fromkeys(names) if n not in layer.merged]
        if names:
            plan.append((path, layer, names))
    return plan


def _merge_layer(path: str, layer: LoRALinear, names: Sequence[str], exact: bool) -> MergeRecord:
    """Merges ``names`` into the layer's weight; for exact, in one pass that also makes the record, with
    a budget of a quarter of the weight's bytes (over it the op leaves the weight as it was and raises)."""
    w = layer.weight
    a, b, scale = _factors(layer, names)
    if not exact:
        ops.merge_(w, a, b, scale, layer.fan_in_fan_out)
        return MergeRecord(tuple(names), scale, False)
    budget = w.numel() * w.element_size() // 4
    try:
        codes, values = ops.merge_exact_(w, a, b, scale, layer.fan_in_fan_out, max_record_bytes=budget)
    except ValueError as e:
        if "max_record_bytes" not in str(e):
            raise
        raise ValueError(
            f"loracuda.merge: the exact restore record of layer {path!r} would take more than a quarter of its "
            f"weight ({budget} bytes; {e}); nothing was merged. Use merge(..., exact=False) for an inexact merge."
        ) from e
    return MergeRecord(tuple(names), scale, True, codes, values)


def _unmerge_layer(layer: LoRALinear, rec: MergeRecord) -> None:
    w = layer.weight
    a, b, scale = _factors(layer, rec.adapters)
    if rec.exact:
        ops.unmerge_exact_(w, a, b, scale, rec.codes, layer.fan_in_fan_out, escape_values=rec.escape_values)
    else:
        ops.merge_(w, a, b, -scale, layer.fan_in_fan_out)


@locked
@torch.no_grad()
def merge(
    model: nn.Module, adapter: Union[None, str, Iterable[str]] = None, safe: bool = False, exact: bool = True
) -> MergeReport:
    """Merges ``adapter`` (a name or names; None: each layer's active adapters) into the base weights in
    place; several adapters of a layer are merged as their sum. exact=True keeps a restore record (at
    most a quarter of the weight's bytes; if a layer's record would be larger, raises naming the layer,
    with every layer as it was) so that unmerge restores the weights bit for bit; exact=False keeps
    nothing and unmerge subtracts (not bit-exact in low precision). safe=True first checks the adapters
    and the would-be merged weights for inf/NaN. Returns a MergeReport.

    Experts parameters adapted by target_parameters are merged first, expert slice by expert slice
    (loracuda.experts.merge_experts); an error in the linear layers unmerges them again."""
    plan = _plan(model, adapter)  # checks the adapter names
    expert_done = experts.merge_experts(model, adapter, safe, exact)
    try:
        report = _merge_linear(model, plan, safe, exact)
    except BaseException:
        experts.rollback(expert_done)
        raise
    for path, m, p, rec in expert_done:
        w = getattr(m.base_layer, p)
        report.layers[f"{path}.{p}"] = list(rec.adapters)
        report.record_bytes[f"{path}.{p}"] = rec.nbytes
        report.weight_bytes += w.numel() * w.element_size()
    report.total_record_bytes = sum(report.record_bytes.values())
    return report


def _merge_linear(model: nn.Module, plan: list, safe: bool, exact: bool) -> MergeReport:
    # Every check that needs no merge, on every layer, before the first write.
    for path, layer, _ in plan:
        if not layer.weight.is_contiguous():
            raise ValueError(f"loracuda.merge: the weight of layer {path!r} is not contiguous; it cannot be merged in place")
    if safe:
        for path, layer, names in plan:
            _check_finite(path, names, layer)
    return merge_layers([(path, layer, names, exact) for path, layer, names in plan], exact)


def merge_layers(plan: list[tuple[str, LoRALinear, list[str], bool]], exact: bool = True) -> MergeReport:
    """Merges each (path, layer, names, exact) of ``plan`` (checked by the caller) and records it; all
    or nothing: a record over budget (known only from the merge itself) rolls back the layers merged
    so far, exactly, with their records (the failing layer's op left it unchanged), then raises naming
    the layer's path."""
    done: list[tuple[LoRALinear, MergeRecord]] = []
    try:
        for path, layer, names, layer_exact in plan:
            done.append((layer, _merge_layer(path, layer, names, layer_exact)))
    except BaseException:
        for layer, rec in reversed(done):
            _unmerge_layer(layer, rec)
            previous = _records(layer)
            if previous:  # the weight is bit for bit what the earlier merge left: its record applies again
                previous[-1].weight_version = layer.weight._version
        raise
    report = MergeReport({}, {}, 0, 0, exact)
    for (path, layer, names, _), (_, rec) in zip(plan, done):
        w = layer.weight
        rec.weight_version = w._version
        rec.factor_versions = _versions(layer, names)
        for n in names:
            layer.merged[n] = rec
        report.layers[path] = list(names)
        report.record_bytes[path] = rec.nbytes
        report.weight_bytes += w.numel() * w.element_size()
    report.total_record_bytes = sum(report.record_bytes.values())
    return report


def _records(layer: LoRALinear) -> list[MergeRecord]:
    """The layer's merge records in merge order (adapters merged together share one)."""
    out = []
    for rec in layer.merged.values():
        if not out or out[-1] is not rec:
            out.append(rec)
    return out


@locked
@torch.no_grad()
def unmerge(model: nn.Module, adapter: Union[None, str, Iterable[str]] = None) -> list[str]:
    """Undoes merges (all, or those of the named adapters), the most recent first, in place: bit-exact
    for exact merges. Adapters merged by one call come off together. Raises, changing nothing, if a
    record no longer fits its tensors (the adapter or the merged weight was modified since the merge)
    or the named adapters are not the most recent merges. Returns the paths of the layers unmerged."""
    wanted = _wanted(adapter, "unmerge")
    wanted = None if wanted is None else set(wanted)
    plan = []
    for path, layer in model.named_modules():
        if not (isinstance(layer, LoRALinear) and layer.merged):
            continue
        recs = _records(layer)
        todo = [r for r in recs if wanted is None or wanted & set(r.adapters)]
        if not todo:
            continue
        if todo != recs[len(recs) - len(todo) :]:
            # Each record was made on the weight left by the merges before it: later merges come off first.
            raise ValueError(
                f"loracuda.unmerge: layer {path!r} has {[list(r.adapters) for r in recs]} merged in this order; "
                f"unmerge the later ones first"
            )
        for r in todo:
            if wanted is not None and not set(r.adapters) <= wanted:
                raise ValueError(
                    f"loracuda.unmerge: layer {path!r} has {list(r.adapters)} merged together; unmerge them together"
                )
        plan.append((path, layer, list(reversed(todo))))
    expert_plan = experts.unmerge_plan(model, adapter)  # checked, nothing written yet
    # Check every record before writing anything: the weight must be as the last merge left it and the
    # adapters as they were merged.
    for path, layer, todo in plan:
        if todo[0].exact and layer.weight._version != todo[0].weight_version:
            raise RuntimeError(
                f"loracuda.unmerge: the weight of layer {path!r} was modified after {list(todo[0].adapters)} was "
                "merged, so the exact restore record no longer applies; nothing was unmerged"
            )
        for rec in todo:
            # Exact or not, unmerging subtracts the delta of the factors as they are now: factors changed
            # since the merge would subtract a delta that was never added.
            if _versions(layer, rec.adapters) != rec.factor_versions:
                what = "the exact restore record no longer applies" if rec.exact else "subtracting its delta now would not undo the merge"
                raise RuntimeError(
                    f"loracuda.unmerge: adapter {list(rec.adapters)} of layer {path!r} was modified after it was "
                    f"merged ({'exact' if rec.exact else 'inexact'} merge), so {what}; nothing was unmerged"
                )
    done = []
    for path, layer, todo in plan:
        w = layer.weight
        for rec in todo:
            _unmerge_layer(layer, rec)
            for n in rec.adapters:
                del layer.merged[n]
            remaining = _records(layer)
            if remaining:  # the weight is back to what the previous merge left: its record applies again
                remaining[-1].weight_version = w._version
        done.append(path)
    return done + experts.unmerge_apply(expert_plan)
