"""AdapterPool: many PEFT-format LoRA adapters served in one batch of a model.

    pool = loracuda.AdapterPool(model, max_adapters=64, max_rank=64)
    slot = pool.load("path/to/peft_adapter")     # an int; pool.unload(slot) frees it
    with pool.batch(adapter_ids):                  # [batch] per sequence or [batch, seq] per token; -1: base
        logits = model(input_ids).logits

Construction replaces each target layer (``target_modules``, default "all-linear" as LoraConfig
matches it) by a PooledLinear holding every slot's factors, allocated once; the model's parameters are
frozen (the pool serves inference). Adapters of different ranks (up to ``max_rank``) and different
targets share the pool: a layer an adapter does not target has rank 0 for that slot.

Loading reads the file with peft_io's reading and checks (safetensors only; every key and shape
against the pooled layers; rank_pattern / alpha_pattern / rsLoRA give each layer's scale), and checks
everything before the first write, so a failure leaves every slot as it was. Reloading a slot writes
in place, so a compiled model keeps its graph.

Batches: ``pool.batch(ids)`` validates the ids (integers in [-1, max_adapters), every id >= 0 a
loaded slot) on entry, on the host: CPU ids as they are (then copied to a CUDA model without
blocking), a CUDA ids tensor after one copy to the host, the one device synchronisation of a batch,
made at entry, outside the model's (possibly compiled) forward. The ids are converted to
int32 on the model's device and read by every pooled layer from one shared tensor, which a compiled
graph takes as an input: new ids of the same shape do not recompile. Outside a batch the model is the
base model.

Threads: the open batch's ids are per thread (BatchState is thread-local), so several threads may
each open a batch of one pool and run forwards at once, each seeing its own ids, and a forward in a
thread without a batch is the base model. Batches do not nest within a thread (a clear error).
load / unload wait until no batch is open in any thread, run one at a time, and hold off new batches
while they wait; calling them inside a batch of the same thread is a clear error.
"""

import contextlib
import os
import threading
from typing import Iterator, Optional, Union

import torch
from torch import Tensor, nn

from ..config import LoraConfig
from ..layers import LoRALinear
from ..peft_io import check_adapter, read_adapter
from .layer import BatchState, PooledLinear


# Adapter ids are int32 in the kernels.
_MAX_IDS = 2**31 - 1


def _buffer_bytes(model: nn.Module, paths: list[str], max_adapters: int, max_rank: int) -> int:
    """Bytes of the PooledLinear buffers of ``paths`` (see serving/layer.py)."""
    from ..linear_kinds import linear_layout

    total = 0
    for path in paths:
        base = model.get_submodule(path)
        _, k, n = linear_layout(base, "AdapterPool")
        dtype = base.weight.dtype
        elem = 4 if dtype in (torch.bfloat16, torch.float16) else torch.empty((), dtype=dtype).element_size()
        total += max_adapters * max_rank * (k + n) * elem + max_adapters * 8  # factors, scales + ranks
    return total


def _device_bytes(device: torch.device) -> Optional[int]:
    """Total memory of ``device`` (physical memory for the CPU), None where unknown."""
    try:
        if device.type == "cuda":
            return torch.cuda.get_device_properties(device).total_memory
        if device.type == "cpu":
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, RuntimeError, AttributeError):
        return None
    return None


def _check_buffer_bytes(model: nn.Module, paths: list[str], max_adapters: int, max_rank: int) -> None:
    """ValueError, before anything is allocated, when the pool's buffers exceed the device's memory."""
    need = _buffer_bytes(model, paths, max_adapters, max_rank)
    device = model.get_submodule(paths[0]).weight.device
    have = _device_bytes(device)
    if have is not None and need > have:
        raise ValueError(
            f"loracuda.AdapterPool: max_adapters = {max_adapters} and max_rank = {max_rank} need {need} bytes "
            f"({need / 2**30:.1f} GiB) of buffers for {len(paths)} layers, more than the {have} bytes of {device}; "
            "lower max_adapters or max_rank. The model is unchanged."
        )


def _is_peft_module(module: nn.Module) -> bool:
    """A PEFT model or tuner layer (PEFT's classes live in the peft package)."""
    return any(cls.__module__.split(".")[0] == "peft" for cls in type(module).__mro__)


class _BaseView:
    """The model as its adapter configs see it: each pooled layer by its base layer, its own children
    hidden. LoraConfig.target_paths needs only named_modules() and get_output_embeddings(), so the
    pool reuses its matching (list / regex / "all-linear", exclude_modules, layers_to_transform) as is."""

    def __init__(self, model: nn.Module):
        self._model = model

    def _unwrap(self, module):
        return module.base_layer if isinstance(module, PooledLinear) else module

    def named_modules(self) -> Iterator[tuple[str, nn.Module]]:
        pooled = []
        for path, module in self._model.named_modules():
            if any(path.startswith(p + ".") for p in pooled):
                continue
            if isinstance(module, PooledLinear):
                pooled.append(path)
            yield path, self._unwrap(module)

    def get_output_embeddings(self):
        getter = getattr(self._model, "get_output_embeddings", None)
        return self._unwrap(getter()) if callable(getter) else None


class AdapterPool:
    """Serves up to ``max_adapters`` LoRA adapters of rank <= ``max_rank`` in one batch of ``model``.

    model: an nn.Module without loracuda or PEFT adapter layers (it is patched in place: its target
    layers become PooledLinear wrappers, their base layers reachable as ``<path>.base_layer``);
    target_modules: which layers can carry adapters (LoraConfig's forms: a list of name suffixes, a
    regex, or "all-linear", the default: every linear layer but the output head).
    """

    def __init__(
        self,
        model: nn.Module,
        max_adapters: int = 64,
        max_rank: int = 64,
        target_modules: Union[None, str, list[str]] = "all-linear",
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"loracuda.AdapterPool: argument 'model' must be an nn.Module, got {type(model).__name__}")
        for name, value in (("max_adapters", max_adapters), ("max_rank", max_rank)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"loracuda.AdapterPool: argument '{name}' must be an int >= 1, got {value!r}")
        for path, module in model.named_modules():
            if isinstance(module, (LoRALinear, PooledLinear)) or _is_peft_module(module):
                what = (
                    "an AdapterPool's layer" if isinstance(module, PooledLinear)
                    else f"a {'loracuda' if isinstance(module, LoRALinear) else 'PEFT'} adapter layer"
                )
                raise ValueError(
                    f"loracuda.AdapterPool: argument 'model' already has {what} at {path or '<root>'!r} "
                    f"({type(module).__name__}); give the pool a plain base model (merge_and_unload / unload first)"
                )
        paths = LoraConfig(target_modules=target_modules).target_paths(model)
        if not paths:
            raise ValueError(f"loracuda.AdapterPool: no module of the model matched target_modules={target_modules!r}")
        _check_buffer_bytes(model, paths, max_adapters, max_rank)
        if max_adapters > _MAX_IDS:
            raise ValueError(
                f"loracuda.AdapterPool: argument 'max_adapters' is {max_adapters}; adapter ids are int32, so at most {_MAX_IDS}"
            )

        self.model = model
        self.max_adapters = max_adapters
        self.max_rank = max_rank
        self._state = BatchState()  # thread-local: each thread's open batch
        # Batches (any number, in different threads) and slot writes (load / unload, one at a time)
        # exclude each other: a write waits for open batches to close, and new batches wait while a
        # write waits or runs (so writes are not starved).
        self._cond = threading.Condition()
        self._open_batches = 0
        self._writers_waiting = 0
        self._writing = False
        # slot -> where its adapter came from (None: free).
        self._sources: list[Optional[str]] = [None] * max_adapters
        try:
            layers = {path: PooledLinear(model.get_submodule(path), max_adapters, max_rank, self._state) for path in paths}
        except (MemoryError, torch.OutOfMemoryError) as error:
            need = _buffer_bytes(model, paths, max_adapters, max_rank)
            raise MemoryError(
                f"loracuda.AdapterPool: the pool's buffers (max_adapters = {max_adapters}, max_rank = {max_rank}) need "
                f"{need} bytes ({need / 2**30:.2f} GiB), which could not be allocated ({error}); the model is unchanged"
            ) from None
        for path, layer in layers.items():
            model.set_submodule(path, layer)
        self._layers: dict[str, PooledLinear] = layers
        model.requires_grad_(False)

    # ---- slots ----------------------------------------------------------------------------------

    @property
    def layer_paths(self) -> list[str]:
        """Paths of the pooled layers, in model order."""
        return list(self._layers)

    @property
    def slots(self) -> dict[int, str]:
        """{slot: the path its adapter was loaded from} of the loaded slots."""
        return {i: s for i, s in enumerate(self._sources) if s is not None}

    def _check_no_batch(self, what: str) -> None:
        if self._state.ids is not None:
            raise RuntimeError(
                f"loracuda.AdapterPool.{what}: a batch is open in this thread (inside pool.batch); load and unload "
                "slots between batches"
            )

    @contextlib.contextmanager
    def _slot_write(self, what: str) -> Iterator[None]:
        """Exclusive access to the slots: waits until no batch is open in any thread (a batch open in
        the calling thread is an error: it would wait for itself)."""
        self._check_no_batch(what)
        with self._cond:
            self._writers_waiting += 1
            try:
                while self._writing or self._open_batches:
                    self._cond.wait()
            finally:
                self._writers_waiting -= 1
            self._writing = True
        try:
            yield
        finally:
            with self._cond:
                self._writing = False
                self._cond.notify_all()

    def _check_slot(self, what: str, slot) -> int:
        if isinstance(slot, bool) or not isinstance(slot, int) or not 0 <= slot < self.max_adapters:
            raise ValueError(
                f"loracuda.AdapterPool.{what}: argument 'slot' must be an int in [0, max_adapters = {self.max_adapters}), "
                f"got {slot!r}"
            )
        return slot

    def load(self, path: Union[str, os.PathLike], slot: Optional[int] = None) -> int:
        """Loads the PEFT-format adapter at ``path`` (a folder, or its safetensors file) into ``slot``
        (default: the first free slot; a loaded slot is reloaded in place) and returns the slot.
        Raises, changing nothing, for a pool that is full, a bad file, keys or shapes that do not fit
        the pooled layers, a rank above max_rank, or an adapter option the pool cannot serve."""
        self._check_no_batch("load")
        if slot is not None:
            slot = self._check_slot("load", slot)
        file, config, tensors = read_adapter(path)
        plan = self._plan(file, config, tensors)
        with self._slot_write("load"):
            if slot is None:
                free = [i for i, s in enumerate(self._sources) if s is None]
                if not free:
                    raise RuntimeError(
                        f"loracuda.AdapterPool.load: the pool is full (all max_adapters = {self.max_adapters} slots are "
                        "loaded); unload a slot, or pass slot= to reload one in place"
                    )
                slot = free[0]
            # Everything is checked: write. Layers the adapter does not target hold rank 0 for the slot.
            for layer_path, layer in self._layers.items():
                if layer_path in plan:
                    a, b, scale = plan[layer_path]
                    layer.write_slot(slot, a, b, scale)
                else:
                    layer.clear_slot(slot)
            self._sources[slot] = os.fspath(path)
        return slot

    def _plan(self, file: str, config: LoraConfig, tensors: dict) -> dict[str, tuple[Tensor, Tensor, float]]:
        """{pooled layer path: (A [r, K], B [N, r], scale)} of the adapter, after every check."""
        where = f"loracuda.AdapterPool.load: adapter file {file!r}"
        unsupported = []
        if config.bias != "none":
            unsupported.append(f"bias={config.bias!r} (it trains base biases)")
        if config.modules_to_save:
            unsupported.append(f"modules_to_save={config.modules_to_save!r} (it replaces whole modules)")
        if config.target_parameters:
            raise ValueError(
                f"{where} uses target_parameters={config.target_parameters!r} (LoRA on experts), which the pool "
                "does not serve; merge it (loracuda.merge) or run it as an injected adapter. The pool is unchanged."
            )
        if unsupported:
            raise ValueError(
                f"{where} has {' and '.join(unsupported)}; the pool serves LoRA factors only, since such an adapter "
                "changes the base model for every sequence of a batch. The pool is unchanged."
            )
        view = _BaseView(self.model)
        targets = config.target_paths(view)
        if not targets:
            raise ValueError(f"{where}: no module of the model matched {config.describe_targets()}. The pool is unchanged.")
        outside = [p for p in targets if p not in self._layers]
        if outside:
            raise ValueError(
                f"{where} adapts {outside[:3]}{' and more' if len(outside) > 3 else ''}, which the pool does not wrap "
                "(see AdapterPool's target_modules). The pool is unchanged."
            )
        expected = {}
        for p in targets:
            layer = self._layers[p]
            r = config.rank_for(p)
            if r > self.max_rank:
                raise ValueError(
                    f"{where} has rank {r} at layer {p!r}, above the pool's max_rank = {self.max_rank}. The pool is unchanged."
                )
            expected[f"{p}.lora_A.weight"] = ("A", p, (r, layer.in_features))
            expected[f"{p}.lora_B.weight"] = ("B", p, (layer.out_features, r))
        # Keys, shapes, finite factors and scales: the one check every loading path runs.
        check_adapter(file, config, tensors, expected, pad_rank=False)
        return {
            p: (tensors[f"{p}.lora_A.weight"], tensors[f"{p}.lora_B.weight"], config.scale_for(p)) for p in targets
        }

    def unload(self, slot: int) -> None:
        """Frees ``slot`` (every layer's rank for it becomes 0 and its factors zero)."""
        self._check_no_batch("unload")
        slot = self._check_slot("unload", slot)
        with self._slot_write("unload"):
            if self._sources[slot] is None:
                raise ValueError(f"loracuda.AdapterPool.unload: slot {slot} is not loaded (loaded: {sorted(self.slots)})")
            for layer in self._layers.values():
                layer.clear_slot(slot)
            self._sources[slot] = None

    # ---- batches --------------------------------------------------------------------------------

    def _device(self) -> torch.device:
        return next(iter(self._layers.values())).ranks.device

    def _validated(self, adapter_ids) -> Tensor:
        """adapter_ids as int32 on the model's device, after the checks of the class docstring."""
        what = "loracuda.AdapterPool.batch: argument 'adapter_ids'"
        if not isinstance(adapter_ids, Tensor):
            raise TypeError(f"{what} must be an integer tensor ([batch] or [batch, seq]), got {type(adapter_ids).__name__}")
        if adapter_ids.is_floating_point() or adapter_ids.is_complex() or adapter_ids.dtype == torch.bool:
            raise TypeError(f"{what} must hold integers, got dtype {adapter_ids.dtype}")
        if adapter_ids.dim() not in (1, 2):
            raise ValueError(f"{what} must be [batch] (per sequence) or [batch, seq] (per token), got shape {list(adapter_ids.shape)}")
        ids = adapter_ids.detach()
        # The checks run on the host: CPU ids as they are, CUDA ids after one copy to the host (the
        # one synchronisation of a batch; none happens inside the forward).
        host = ids if ids.device.type == "cpu" else ids.cpu()
        flat = host.reshape(-1).long()
        bad = flat[(flat < -1) | (flat >= self.max_adapters)]
        if bad.numel():
            raise ValueError(f"{what} holds {int(bad[0])}; ids must be in [-1, max_adapters = {self.max_adapters}) (-1: base model)")
        loaded = torch.tensor([s is not None for s in self._sources] + [True])  # index -1: no adapter
        unloaded = flat[~loaded[flat]]
        if unloaded.numel():
            value = int(unloaded[0])
            raise ValueError(f"{what} holds {value}, but slot {value} is not loaded (loaded: {sorted(self.slots)})")
        # Always an own copy: a caller changing its tensor during the batch cannot bypass the checks.
        device = self._device()
        if ids.device == device:
            return ids.to(torch.int32, copy=True).contiguous()
        if device.type == "cuda" and ids.device.type == "cpu":
            # From pinned memory without blocking: the copy is queued on the current stream, no sync.
            return host.to(torch.int32).contiguous().pin_memory().to(device, non_blocking=True)
        return ids.to(device=device, dtype=torch.int32).contiguous()

    @contextlib.contextmanager
    def batch(self, adapter_ids: Tensor) -> Iterator["AdapterPool"]:
        """Within the block, the model serves sequence b (or token [b, t]) with slot adapter_ids[b]
        (adapter_ids[b, t]); -1 gives the base model. adapter_ids: an integer tensor [batch] or
        [batch, seq], on any device (see the module docstring for its one validation sync)."""
        if self._state.ids is not None:
            raise RuntimeError(
                "loracuda.AdapterPool.batch: a batch is already open in this thread; batches do not nest (other "
                "threads may each open their own)"
            )
        with self._cond:
            while self._writing or self._writers_waiting:
                self._cond.wait()
            ids = self._validated(adapter_ids)  # against the slots as they are while this batch is open
            self._open_batches += 1
        self._state.ids = ids
        try:
            yield self
        finally:
            self._state.ids = None
            with self._cond:
                self._open_batches -= 1
                self._cond.notify_all()

    def __repr__(self) -> str:
        return (
            f"AdapterPool(max_adapters={self.max_adapters}, max_rank={self.max_rank}, layers={len(self._layers)}, "
            f"loaded={sorted(self.slots)})"
        )
