"""PEFT models that compute with loracuda's kernels and stay PEFT models.

Two extension points of PEFT are used, and none of its logic is copied:

- ``LoracudaLinear`` subclasses PEFT's LoRA ``Linear`` layer and overrides ``forward``, ``merge`` and
  ``unmerge`` only. Everything else (adapter bookkeeping, ``update_layer``, ``set_adapter``,
  ``delete_adapter``, scaling, mixed-batch inference, variants such as DoRA) is PEFT's own code, so every
  PeftModel / LoraModel method (save_pretrained, load_adapter, merge_and_unload, add_weighted_adapter, ...)
  behaves as it does without loracuda. An existing layer is converted by changing its class (its
  parameters, hooks and state are untouched, so an optimizer built on them keeps working).
- New layers: ``LoraModel._create_new_module`` is PEFT's dispatch (its custom modules, quantized backends,
  then the default layers). apply_to_peft wraps it, for one model (an instance attribute of its LoraModel)
  or for the whole process (the class attribute): PEFT's dispatch picks the layer as always, and a layer
  that comes out as PEFT's plain ``Linear`` over an nn.Linear / transformers Conv1D is then converted.

What runs on loracuda, per call of ``LoracudaLinear.forward``: the active adapters that are plain LoRA
(no variant such as DoRA, no ``lora_bias``, factors plain ``nn.Linear`` without bias, dropout
``nn.Identity`` / ``nn.Dropout``), when the call is an ordinary one (adapters enabled, nothing merged, no
``adapter_names`` mixed batch, no extra arguments, no hooks on the base layer, x in the base weight's
dtype). Anything else is PEFT's forward, unchanged. Dropout uses loracuda's seeded hash mask (drawn from
torch's generator, so torch.manual_seed and activation checkpointing reproduce it), not torch's dropout:
results with dropout > 0 match PEFT's in distribution, not bit for bit.
"""

import dataclasses
import functools
import math
import warnings
from typing import Optional

import torch
from torch import Tensor, nn

from peft.tuners.lora.layer import Linear as PeftLinear
from peft.tuners.lora.layer import LoraLayer
from peft.tuners.lora.model import LoraModel
from peft.tuners.tuners_utils import check_adapters_to_merge

from .. import ops
from ..config import is_conv1d
from ..functional import autocast_inputs, lora_linear

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_DEVICE_TYPES = ("cpu", "cuda")


# ---- what loracuda computes ----------------------------------------------------------------------


def _plain_tensor(t: Optional[Tensor]) -> bool:
    return t is not None and type(t) in (nn.Parameter, Tensor) and t.device.type in _DEVICE_TYPES


def base_layer_reason(base: nn.Module) -> Optional[str]:
    """None when loracuda computes a layer over ``base`` (an nn.Linear or transformers Conv1D with its own
    forward and a plain float weight on the CPU or a GPU); otherwise why not."""
    if isinstance(base, nn.Linear):
        if type(base).forward is not nn.Linear.forward:
            return f"base layer {type(base).__module__}.{type(base).__name__} has its own forward (quantized or custom)"
    elif is_conv1d(base):
        from transformers.pytorch_utils import Conv1D

        if type(base).forward is not Conv1D.forward:
            return f"base layer {type(base).__name__} has its own forward"
    else:
        return f"base layer {type(base).__name__} is not an nn.Linear or Conv1D"
    weight = getattr(base, "weight", None)
    if not _plain_tensor(weight):
        return "base weight is not a plain tensor on the CPU or a GPU (quantized, offloaded or sharded)"
    if weight.dtype not in _KERNEL_DTYPES:
        return f"base weight dtype {weight.dtype}"
    return None


def layer_reason(module: nn.Module) -> Optional[str]:
    """None when ``module`` (a PEFT LoRA layer) can compute with loracuda; otherwise why not."""
    if type(module) not in (PeftLinear, LoracudaLinear):
        kind = type(module).__name__
        return f"{type(module).__module__}.{kind}: loracuda computes LoRA on linear layers only"
    return base_layer_reason(module.get_base_layer())


def adapter_reason(layer: LoraLayer, name: str) -> Optional[str]:
    """None when adapter ``name`` of ``layer`` is plain LoRA that loracuda computes; otherwise why not."""
    variant = layer.lora_variant.get(name)
    if variant is not None:
        label = type(variant).__name__.replace("LinearVariant", "")
        return f"LoRA variant {'DoRA' if label == 'Dora' else label}"
    if layer.lora_bias.get(name, False):
        return "lora_bias=True"
    a, b = layer.lora_A[name], layer.lora_B[name]
    if type(a) is not nn.Linear or type(b) is not nn.Linear or a.bias is not None or b.bias is not None:
        return "factors are not plain nn.Linear layers without bias"
    if not (_plain_tensor(a.weight) and _plain_tensor(b.weight)) or a.weight.dtype not in _KERNEL_DTYPES:
        return "factor weights are not plain float tensors"
    if b.weight.dtype not in _KERNEL_DTYPES:
        return "factor weights are not plain float tensors"
    if type(layer.lora_dropout[name]) not in (nn.Identity, nn.Dropout):
        return f"dropout module {type(layer.lora_dropout[name]).__name__}"
    return None


# ---- the layer -----------------------------------------------------------------------------------


@dataclasses.dataclass
class _MergeRecord:
    """How one adapter was merged by loracuda: its scale and, for an exact merge, the restore record
    (uint8 codes, escape values) and the version counters of the weight and the factors after the merge."""

    scale: float
    codes: Optional[Tensor] = None
    escape_values: Optional[Tensor] = None
    weight_version: int = -1
    factor_versions: tuple = ()


class LoracudaLinear(PeftLinear):
    """PEFT's LoRA ``Linear`` whose forward, merge and unmerge run on loracuda's ops.

    Attribute ``loracuda_exact_merge`` (False by default): merge keeps loracuda's restore record (2 bits
    per weight element plus the few values those cannot restore; see loracuda.merge) so that unmerge
    restores the base weight bit for bit. Records are dropped, and unmerge subtracts, when a record would
    exceed a quarter of the weight's bytes or the weight or factors changed after the merge."""

    loracuda_exact_merge = False

    # ---- forward --------------------------------------------------------------------------------

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        if args or any(v is not None for v in kwargs.values()) or self.disable_adapters or self.merged:
            return super().forward(x, *args, **kwargs)
        names = [n for n in self.active_adapters if n in self.lora_A]
        if not names or any(adapter_reason(self, n) is not None for n in names):
            return super().forward(x, *args, **kwargs)
        base = self.get_base_layer()
        if base._forward_hooks or base._forward_pre_hooks or hasattr(base, "_hf_hook"):
            return super().forward(x, *args, **kwargs)
        if base_layer_reason(base) is not None or self.fan_in_fan_out != is_conv1d(base):
            return super().forward(x, *args, **kwargs)
        weight = base.weight.t() if self.fan_in_fan_out else base.weight  # Conv1D stores [K, N]: a view
        x_in, weight, bias = autocast_inputs(x, weight, base.bias)
        if x_in.dtype != weight.dtype or x_in.dtype not in _KERNEL_DTYPES:
            return super().forward(x, *args, **kwargs)
        drops = [self._dropout_p(n) for n in names]
        if len(names) == 1 or all(p == 0.0 for p in drops):
            a, b, scale = self._stacked(names, x_in.dtype)
            return lora_linear(x_in, weight, bias, a, b, scale, drops[0], True)
        # Several adapters with dropout: PEFT draws an independent mask per adapter, so do we. The first
        # runs with the base layer; the others add their part to a zero base (rare: correctness first).
        a, b, scale = self._stacked(names[:1], x_in.dtype)
        y = lora_linear(x_in, weight, bias, a, b, scale, drops[0], True)
        zero = torch.zeros((), dtype=weight.dtype, device=weight.device).expand_as(weight)
        for n, p in zip(names[1:], drops[1:]):
            a, b, scale = self._stacked([n], x_in.dtype)
            y = y + lora_linear(x_in, zero, None, a, b, scale, p, True)
        return y

    def _dropout_p(self, name: str) -> float:
        # 0 outside training (the dropout module's own flag, as PEFT's nn.Dropout would read it).
        d = self.lora_dropout[name]
        return float(d.p) if isinstance(d, nn.Dropout) and d.training else 0.0

    def _stacked(self, names: list, dtype: torch.dtype) -> tuple:
        """(lora_a [R, K], lora_b [N, R], scale) of the sum of ``names``: one adapter as it is (factors in
        x's dtype or float32, anything else cast to float32); several stacked along the rank with each B
        times its scale, in float32 (float64 for float64 x)."""
        if len(names) == 1:
            n = names[0]
            a, b = self.lora_A[n].weight, self.lora_B[n].weight
            a = a if a.dtype in (dtype, torch.float32) else a.to(torch.float32)
            b = b if b.dtype in (dtype, torch.float32) else b.to(torch.float32)
            return a, b, self.scaling[n]
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        a = torch.cat([self.lora_A[n].weight.to(acc) for n in names], dim=0)
        b = torch.cat([self.lora_B[n].weight.to(acc) * self.scaling[n] for n in names], dim=1)
        return a, b, 1.0

    # ---- merge ----------------------------------------------------------------------------------

    def _records(self) -> dict:
        records = self.__dict__.get("_loracuda_records")
        if records is None:
            records = self.__dict__["_loracuda_records"] = {}
        return records

    def _merge_factors(self, name: str, weight: Tensor) -> tuple:
        ok = (weight.dtype, torch.float32)
        a, b = self.lora_A[name].weight.detach(), self.lora_B[name].weight.detach()
        a = a if a.dtype in ok else a.to(torch.float32)
        b = b if b.dtype in ok else b.to(torch.float32)
        if a.device != weight.device:
            a, b = a.to(weight.device), b.to(weight.device)
        return a, b

    def _mergeable(self, name: str) -> bool:
        base = self.get_base_layer()
        return (
            adapter_reason(self, name) is None
            and base_layer_reason(base) is None
            and self.fan_in_fan_out == is_conv1d(base)
            and base.weight.is_contiguous()
        )

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list] = None) -> None:
        """PEFT's merge, with W += s·B·A done by loracuda.ops.merge_ (one pass over W, float32
        accumulation, no full-size delta) for plain LoRA adapters; other adapters are merged by PEFT."""
        for name in check_adapters_to_merge(self, adapter_names):
            if name not in self.lora_A:
                continue
            if not self._mergeable(name):
                super().merge(safe_merge=safe_merge, adapter_names=[name])
                continue
            weight = self.get_base_layer().weight
            a, b = self._merge_factors(name, weight)
            scale = self.scaling[name]
            if safe_merge:
                trial = weight.detach().clone()
                ops.merge_(trial, a, b, scale, self.fan_in_fan_out)
                if not torch.isfinite(trial).all():
                    raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
            record = _MergeRecord(scale)
            if self.loracuda_exact_merge:
                budget = weight.numel() * weight.element_size() // 4
                try:
                    record.codes, record.escape_values = ops.merge_exact_(
                        weight.detach(), a, b, scale, self.fan_in_fan_out, max_record_bytes=budget
                    )
                except ValueError as error:
                    if "max_record_bytes" not in str(error):
                        raise
                    warnings.warn(
                        f"loracuda: the exact restore record of adapter {name!r} would exceed a quarter of the "
                        "weight's bytes; merged without one (unmerge will subtract)"
                    )
                    ops.merge_(weight.detach(), a, b, scale, self.fan_in_fan_out)
            else:
                ops.merge_(weight.detach(), a, b, scale, self.fan_in_fan_out)
            record.weight_version = weight._version
            record.factor_versions = (self.lora_A[name].weight._version, self.lora_B[name].weight._version)
            self._records()[name] = record
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """PEFT's unmerge (most recent merge first); loracuda's merges come off with unmerge_exact_ when
        the merge kept a restore record that still applies (bit-exact), else by subtracting with merge_."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        records = self._records()
        while self.merged_adapters:
            name = self.merged_adapters[-1]
            record = records.pop(name, None)
            if record is None:  # merged by PEFT's code: PEFT unmerges it, alone
                rest = self.merged_adapters[:-1]
                self.merged_adapters = [name]
                try:
                    super().unmerge()
                finally:
                    self.merged_adapters = rest
                continue
            self.merged_adapters.pop()
            if name not in self.lora_A:
                continue
            weight = self.get_base_layer().weight
            a, b = self._merge_factors(name, weight)
            versions = (self.lora_A[name].weight._version, self.lora_B[name].weight._version)
            if record.codes is not None and weight._version == record.weight_version and versions == record.factor_versions:
                ops.unmerge_exact_(
                    weight.detach(), a, b, record.scale, record.codes, self.fan_in_fan_out, escape_values=record.escape_values
                )
            else:
                if record.codes is not None:
                    warnings.warn(
                        f"loracuda: adapter {name!r} or its base weight changed after the exact merge; "
                        "unmerging by subtraction (not bit-exact)"
                    )
                ops.merge_(weight.detach(), a, b, -record.scale, self.fan_in_fan_out)
            remaining = [n for n in self.merged_adapters if n in records]
            if remaining:  # the weight is back to what the previous merge left: its record applies again
                records[remaining[-1]].weight_version = weight._version

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._records().pop(adapter_name, None)


# ---- converting layers and models ------------------------------------------------------------------


@dataclasses.dataclass
class PeftAccelerationReport:
    """What apply_to_peft did. accelerated: {layer path: adapters loracuda computes}; left_to_peft:
    {layer path, or "path [adapter]" for one adapter of an accelerated layer: why PEFT computes it}."""

    accelerated: dict = dataclasses.field(default_factory=dict)
    left_to_peft: dict = dataclasses.field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"loracuda: {len(self.accelerated)} LoRA layers run on loracuda, {len(self.left_to_peft)} left to PEFT"]
        for key, why in self.left_to_peft.items():
            lines.append(f"  {key}: {why}")
        return "\n".join(lines)

    def note(self, path: str, module: nn.Module) -> None:
        """Records ``module`` (a PEFT LoRA layer at ``path``) in the report."""
        if isinstance(module, LoracudaLinear):
            plain = []
            for n in module.lora_A:
                why = adapter_reason(module, n)
                if why is None:
                    plain.append(n)
                else:
                    self.left_to_peft[f"{path} [{n}]"] = why
            self.accelerated[path] = plain
        else:
            self.left_to_peft[path] = layer_reason(module) or "not converted"


def accelerate_layer(module: nn.Module, exact_merge: Optional[bool] = None) -> bool:
    """Turns ``module``, if it is PEFT's plain LoRA ``Linear`` over a layer loracuda computes, into a
    LoracudaLinear in place (its class changes; parameters and state are kept). Returns whether it is one."""
    if type(module) is PeftLinear and layer_reason(module) is None:
        module.__class__ = LoracudaLinear
    if not isinstance(module, LoracudaLinear):
        return False
    if exact_merge is not None:
        module.loracuda_exact_merge = bool(exact_merge)
    return True


def restore_layer(module: nn.Module) -> None:
    """Turns a LoracudaLinear back into PEFT's own ``Linear`` (merged adapters stay merged; PEFT will
    unmerge them by subtraction)."""
    if type(module) is LoracudaLinear:
        module.__dict__.pop("_loracuda_records", None)
        module.__dict__.pop("loracuda_exact_merge", None)
        module.__class__ = PeftLinear


def _create_new_module_then_accelerate(
    original, exact_merge: Optional[bool], report: Optional[PeftAccelerationReport], lora_config, adapter_name, target, **kwargs
):
    """PEFT's own dispatch, then the conversion of the layer it made (see the module docstring)."""
    new_module = original(lora_config, adapter_name, target, **kwargs)
    accelerate_layer(new_module, exact_merge)
    if report is not None and isinstance(new_module, LoraLayer):
        report.note(kwargs.get("target_name") or "?", new_module)
    return new_module


def _lora_models(model: nn.Module) -> list:
    return [m for m in model.modules() if isinstance(m, LoraModel)]


def _original_create_new_module():
    return LoraModel.__dict__["_create_new_module"].__func__


# The process-wide switch: PEFT's class attribute as it was, and the switch's report.
_SWITCH: dict = {"original": None, "report": None}


def apply_to_peft(peft_model: Optional[nn.Module] = None, *, exact_merge: Optional[bool] = None) -> PeftAccelerationReport:
    """Runs PEFT LoRA models on loracuda's kernels; they stay PEFT models (every PeftModel / LoraModel
    method keeps PEFT's behaviour).

    peft_model: a PeftModel, a LoraModel, or any module holding PEFT LoRA layers (e.g. one TRL or
    transformers built): its plain LoRA ``Linear`` layers are converted in place, and LoRA layers PEFT adds
    to it later (load_adapter, add_adapter) are converted as they are made. Calling it again is harmless
    and returns the model's current report.
    None: the process-wide switch: every LoRA layer PEFT creates from now on, in any model, is converted
    (so a TRL / Trainer script needs this one line before it builds its model). The returned report fills
    in as PEFT creates layers, keyed by layer path (a later model's layer at the same path replaces the
    entry); ``apply_to_peft(model)`` on a built model gives that model's own report.
    ``remove_from_peft()`` turns the switch off.

    exact_merge: True makes merge_adapter / merge keep loracuda's restore record so that unmerge_adapter
    restores the base weights bit for bit; False merges without one; None keeps each layer's setting
    (False for new layers). Layers and adapters loracuda does not compute (DoRA and other variants,
    embeddings, convolutions, quantized or offloaded bases, lora_bias, ...) keep PEFT's code and are listed
    in the report's ``left_to_peft``."""
    if peft_model is None:
        if _SWITCH["original"] is None:
            _SWITCH["original"] = LoraModel.__dict__["_create_new_module"]
            _SWITCH["report"] = PeftAccelerationReport()
        LoraModel._create_new_module = staticmethod(
            functools.partial(
                _create_new_module_then_accelerate, _SWITCH["original"].__func__, exact_merge, _SWITCH["report"]
            )
        )
        return _SWITCH["report"]
    if not isinstance(peft_model, nn.Module):
        raise TypeError(f"loracuda.apply_to_peft: argument 'peft_model' must be a PEFT model (nn.Module), got {type(peft_model).__name__}")
    layers = [(p, m) for p, m in peft_model.named_modules() if isinstance(m, LoraLayer)]
    if not layers:
        raise ValueError("loracuda.apply_to_peft: the model holds no PEFT LoRA layer (build it with peft.get_peft_model first)")
    report = PeftAccelerationReport()
    for path, module in layers:
        accelerate_layer(module, exact_merge)
        report.note(path, module)
    for lora_model in _lora_models(peft_model):
        # PEFT calls self._create_new_module(...): an instance attribute takes precedence over the class's
        # staticmethod, so layers this model gains later are converted too.
        lora_model.__dict__["_create_new_module"] = functools.partial(
            _create_new_module_then_accelerate, _original_create_new_module(), exact_merge, None
        )
    return report


def remove_from_peft(peft_model: Optional[nn.Module] = None) -> None:
    """Undoes apply_to_peft. None: turns the process-wide switch off (models already built keep their
    loracuda layers). A model: its loracuda layers become PEFT's own ``Linear`` again and layers it gains
    later are PEFT's."""
    if peft_model is None:
        if _SWITCH["original"] is not None:
            LoraModel._create_new_module = _SWITCH["original"]
            _SWITCH["original"] = None
            _SWITCH["report"] = None
        return
    for module in peft_model.modules():
        restore_layer(module)
    for lora_model in _lora_models(peft_model):
        lora_model.__dict__.pop("_create_new_module", None)


def is_switch_on() -> bool:
    """Whether apply_to_peft() (the process-wide switch) is on."""
    return _SWITCH["original"] is not None
