"""LoraConfig: what to adapt and how, its conversion to and from PEFT's adapter_config.json, and the
matching of module paths against target patterns (docs/design.md, section 'PEFT adapter format').

Matching follows PEFT's rules so that a config means the same model on both sides:
- ``target_modules`` as a list: a module matches when its path equals an entry or ends with ``"." + entry``;
  as a string: a full regex match of the path; ``"all-linear"``: every ``nn.Linear`` and transformers
  ``Conv1D`` except the output head (``model.get_output_embeddings()`` where the model has one);
- ``exclude_modules``: the same rules, applied first;
- ``layers_to_transform`` (list targets only): the first numbered path segment (after ``layers_pattern``
  when given) must be one of the listed layer indices;
- ``rank_pattern`` / ``alpha_pattern``: regex keys, the first key that matches the end of the path
  (at a segment boundary) wins.
"""

import copy
import dataclasses
import json
import math
import os
import re
from typing import Any, Optional, Union

from torch import nn

from .linear_kinds import is_conv1d, is_linear_like, linear_layout  # noqa: F401 (public here too)

ALL_LINEAR = "all-linear"
CONFIG_NAME = "adapter_config.json"

_BIAS_MODES = ("none", "all", "lora_only")
_INIT_MODES = ("default", "gaussian", "random")

# PEFT config keys that this module reads (everything else is kept verbatim in LoraConfig.peft_extra).
_PEFT_KNOWN = {
    "peft_type",
    "r",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "exclude_modules",
    "rank_pattern",
    "alpha_pattern",
    "use_rslora",
    "use_dora",
    "bias",
    "fan_in_fan_out",
    "modules_to_save",
    "layers_to_transform",
    "layers_pattern",
    "init_lora_weights",
    "target_parameters",
}

# PEFT options that change the model in ways loracuda does not implement: a config that turns one on
# (any truthy value) is refused instead of being loaded as a silently different model.
_UNSUPPORTED = ("use_dora", "lora_bias", "use_qalora", "use_bdlora", "layer_replication",
                "trainable_token_indices", "megatron_config")


@dataclasses.dataclass
class LoraConfig:
    """Settings of one LoRA adapter.

    r: rank (>= 1); alpha: scale numerator, scale = alpha / r (alpha / sqrt(r) with ``use_rslora``);
    dropout: probability in [0, 1) on the adapter's input during training; target_modules: a list
    (path-suffix match), a string (full regex) or "all-linear" (None means "all-linear");
    exclude_modules: same forms, never adapted; rank_pattern / alpha_pattern: {regex: int} per-module
    overrides of r / alpha; bias: "none" | "lora_only" (train and save the adapted layers' biases) |
    "all" (every bias); fan_in_fan_out: None (decided per layer: True for Conv1D), or an explicit bool
    that must agree with the layer type; modules_to_save: module names (suffix match) trained and saved
    in full; layers_to_transform: layer indices to adapt (with layers_pattern naming the layer list);
    init: "default" (A Kaiming-uniform, B zero: the model is unchanged at injection), "gaussian"
    (A normal with std 1 / r, B zero) or "random" (B random too: for tests only).
    target_parameters: experts parameters to adapt (PEFT's option: "<module path>.<parameter>" equals
    an entry or ends with "." + entry, e.g. ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]; see
    loracuda.experts). With target_parameters and no target_modules, no module is adapted (as in PEFT).
    ``peft_extra`` keeps unknown PEFT config keys so that they are written back unchanged.
    """

    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    target_modules: Union[None, str, list[str]] = None
    exclude_modules: Union[None, str, list[str]] = None
    rank_pattern: Optional[dict[str, int]] = None
    alpha_pattern: Optional[dict[str, float]] = None
    use_rslora: bool = False
    bias: str = "none"
    fan_in_fan_out: Optional[bool] = None
    modules_to_save: Optional[list[str]] = None
    layers_to_transform: Union[None, int, list[int]] = None
    init: str = "default"
    layers_pattern: Union[None, str, list[str]] = None
    target_parameters: Optional[list[str]] = None
    peft_extra: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)
    # PEFT's names, accepted as keyword arguments: LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05).
    # Not stored: they set alpha / dropout (and read back as properties of the same names).
    lora_alpha: dataclasses.InitVar[Optional[float]] = None
    lora_dropout: dataclasses.InitVar[Optional[float]] = None

    def __post_init__(self, lora_alpha=None, lora_dropout=None):
        self._take_peft_names(lora_alpha, lora_dropout)
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"LoraConfig: argument 'r' must be an int >= 1, got {self.r!r}")
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool) or not math.isfinite(self.alpha):
            raise ValueError(f"LoraConfig: argument 'alpha' must be a finite number, got {self.alpha!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"LoraConfig: argument 'dropout' must be in [0, 1), got {self.dropout!r}")
        if self.bias not in _BIAS_MODES:
            raise ValueError(f"LoraConfig: argument 'bias' must be one of {_BIAS_MODES}, got {self.bias!r}")
        if self.init not in _INIT_MODES:
            raise ValueError(f"LoraConfig: argument 'init' must be one of {_INIT_MODES}, got {self.init!r}")
        for name in ("target_modules", "exclude_modules", "modules_to_save"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                if not isinstance(value, (list, tuple, set, frozenset)):
                    raise ValueError(f"LoraConfig: argument '{name}' must be a string or a list of strings, got {value!r}")
                value = list(value)
                if not all(isinstance(v, str) for v in value):
                    raise ValueError(f"LoraConfig: argument '{name}' must be a string or a list of strings, got {value!r}")
                setattr(self, name, value)
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]
        for name in ("rank_pattern", "alpha_pattern"):
            value = getattr(self, name)
            if value is not None:
                value = dict(value)
                for key, v in value.items():
                    try:
                        re.compile(key)
                    except re.error as error:
                        raise ValueError(f"LoraConfig: argument '{name}' has an invalid regex {key!r}: {error}") from None
                    if name == "rank_pattern" and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                        raise ValueError(f"LoraConfig: argument 'rank_pattern' maps {key!r} to {v!r}; ranks are ints >= 1")
                    if name == "alpha_pattern" and not _is_finite_number(v):
                        raise ValueError(f"LoraConfig: argument 'alpha_pattern' maps {key!r} to {v!r}; alphas are finite numbers")
                setattr(self, name, value)
        if self.target_parameters is not None:
            value = [self.target_parameters] if isinstance(self.target_parameters, str) else list(self.target_parameters)
            if not all(isinstance(v, str) and v for v in value):
                raise ValueError(f"LoraConfig: argument 'target_parameters' must be a list of strings, got {value!r}")
            self.target_parameters = value or None
        if self.layers_to_transform is not None and not isinstance(self.layers_to_transform, int):
            wanted = self.layers_to_transform
            if not isinstance(wanted, (list, tuple)) or not all(_is_integral(i) for i in wanted):
                raise ValueError(f"LoraConfig: argument 'layers_to_transform' must be an int or a list of ints, got {wanted!r}")
            self.layers_to_transform = [int(i) for i in wanted]
        if not isinstance(self.use_rslora, bool):
            raise ValueError(f"LoraConfig: argument 'use_rslora' must be a bool, got {self.use_rslora!r}")

    def _take_peft_names(self, lora_alpha, lora_dropout) -> None:
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for peft_name, name, value in (("lora_alpha", "alpha", lora_alpha), ("lora_dropout", "dropout", lora_dropout)):
            if isinstance(value, property):  # not given: the dataclass passes the class attribute's default
                value = None
            if value is None:
                continue
            if getattr(self, name) != defaults[name] and getattr(self, name) != value:
                raise ValueError(f"LoraConfig: arguments '{name}' and '{peft_name}' (its PEFT name) disagree: "
                                 f"{getattr(self, name)!r} and {value!r}; give one of them")
            setattr(self, name, value)

    # ---- per-module values ----------------------------------------------------------------------

    def rank_for(self, path: str) -> int:
        key = _pattern_key(self.rank_pattern, path)
        return int(self.rank_pattern[key]) if key is not None else self.r

    def alpha_for(self, path: str) -> float:
        key = _pattern_key(self.alpha_pattern, path)
        return float(self.alpha_pattern[key]) if key is not None else float(self.alpha)

    def scale_for(self, path: str) -> float:
        """alpha / r, or alpha / sqrt(r) with rsLoRA, for the module at ``path``."""
        r = self.rank_for(path)
        return self.alpha_for(path) / (math.sqrt(r) if self.use_rslora else r)

    # ---- matching -------------------------------------------------------------------------------

    def target_paths(self, model: nn.Module) -> list[str]:
        """Paths of the modules this config adapts, in model order. Raises if a matched module is not a
        linear layer. Modifies nothing."""
        if self.target_modules is None and self.target_parameters:
            return []  # experts only (PEFT: target_parameters without target_modules adapts no module)
        targets = self.target_modules if self.target_modules is not None else ALL_LINEAR
        head = None
        if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
            getter = getattr(model, "get_output_embeddings", None)
            head = getter() if callable(getter) else None
        found = []
        from .layers import LoRALinear  # a wrapped layer is matched by its own path, not its children

        wrapped = {p for p, m in model.named_modules() if isinstance(m, LoRALinear)}
        for path, module in model.named_modules():
            if not path or any(path.startswith(w + ".") for w in wrapped):
                continue
            if _matches(self.exclude_modules, path) or self._in_modules_to_save(path):
                continue
            if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
                base = module.base_layer if isinstance(module, LoRALinear) else module
                if is_linear_like(base) and base is not head and module is not head:
                    found.append(path)
                continue
            if not _matches(targets, path):
                continue
            # As in PEFT, layers_to_transform filters suffix matches of a list; an entry naming the full
            # path selects that module regardless.
            if not isinstance(targets, str) and path not in targets and not self._layer_selected(path):
                continue
            if not (is_linear_like(module) or isinstance(module, LoRALinear)):
                raise ValueError(
                    f"loracuda: target module {path!r} ({type(module).__name__}) matched target_modules="
                    f"{targets!r} but is not an nn.Linear or transformers Conv1D; only those can be adapted"
                )
            found.append(path)
        return found

    def _in_modules_to_save(self, path: str) -> bool:
        return bool(self.modules_to_save) and any(
            re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", path) for m in self.modules_to_save
        )

    def _layer_selected(self, path: str) -> bool:
        wanted = self.layers_to_transform
        if wanted is None or (isinstance(wanted, list) and not wanted):
            return True
        patterns = self.layers_pattern
        if patterns is None or len(patterns) == 0:
            # The first numbered segment that follows at least two segments ("model.layers.3.x"): the
            # layer index, not a nested one such as an expert index further down.
            match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", path)
        else:
            match = None
            for pattern in [patterns] if isinstance(patterns, str) else patterns:
                match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", path)
                if match is not None:
                    break
        if match is None:
            return False
        index = int(match.group("idx"))
        return index == wanted if isinstance(wanted, int) else index in wanted

    def describe_targets(self) -> str:
        parts = [f"target_modules={self.target_modules!r}"]
        if self.target_parameters:
            parts.append(f"target_parameters={self.target_parameters!r}")
        if self.exclude_modules:
            parts.append(f"exclude_modules={self.exclude_modules!r}")
        if self.layers_to_transform is not None:
            parts.append(f"layers_to_transform={self.layers_to_transform!r}")
        if self.layers_pattern:
            parts.append(f"layers_pattern={self.layers_pattern!r}")
        return ", ".join(parts)

    # ---- PEFT conversion ------------------------------------------------------------------------

    @classmethod
    def from_peft(cls, source: Union[dict, str, os.PathLike]) -> "LoraConfig":
        """From a PEFT LoRA config: a dict (adapter_config.json's content, or a PEFT config's to_dict()),
        a path to an adapter folder, or a path to its adapter_config.json. Unknown keys are kept.
        Raises ValueError for another peft_type, an unsupported option (e.g. use_dora: true) or a value
        out of range (naming the file, the key and the value)."""
        where = "adapter config"
        if not isinstance(source, dict):
            path = os.fspath(source)
            if os.path.isdir(path):
                path = os.path.join(path, CONFIG_NAME)
            try:
                with open(path, encoding="utf-8") as f:
                    source = json.load(f)
            except FileNotFoundError:
                raise FileNotFoundError(f"loracuda: no adapter config at {path!r}") from None
            except json.JSONDecodeError as error:
                raise ValueError(f"loracuda: {path!r} is not valid JSON: {error}") from None
            if not isinstance(source, dict):
                raise ValueError(f"loracuda: {path!r} must hold a JSON object")
            where = f"adapter config {path!r}"
        data = dict(source)
        _check_peft_values(data, where)
        peft_type = data.get("peft_type", "LORA")
        peft_type = getattr(peft_type, "value", peft_type)  # PEFT's in-memory configs hold an enum
        if str(peft_type).upper() != "LORA":
            raise ValueError(f"loracuda: adapter config key 'peft_type' is {peft_type!r}; only 'LORA' adapters are supported")
        for key in _UNSUPPORTED:
            if data.get(key):
                raise ValueError(
                    f"loracuda: adapter config key {key!r} is {data[key]!r}; this option is not supported "
                    "(loading it would give a different model)"
                )
        init = data.get("init_lora_weights", True)
        if init is True:
            init_mode = "default"
        elif init is False:
            init_mode = "random"
        elif init == "gaussian":
            init_mode = "gaussian"
        else:
            # Other schemes (PiSSA, LoftQ, ...) only change the initial values, which a loaded file replaces;
            # keep the original value to write back, and start from the default.
            init_mode = "default"
        targets = data.get("target_modules")
        if isinstance(targets, (set, tuple)):
            targets = sorted(targets)
        extra = {k: _plain(v) for k, v in data.items() if k not in _PEFT_KNOWN}
        if init not in (True, False, "gaussian"):
            extra["init_lora_weights"] = init
        try:
            return cls._from_checked(data, targets, init_mode, extra)
        except (TypeError, ValueError) as error:
            raise ValueError(f"loracuda: {where}: {error}") from None

    @classmethod
    def _from_checked(cls, data: dict, targets, init_mode: str, extra: dict) -> "LoraConfig":
        return cls(
            r=int(data.get("r", 8)),
            alpha=data.get("lora_alpha", 8),
            dropout=float(data.get("lora_dropout", 0.0) or 0.0),
            target_modules=targets,
            exclude_modules=data.get("exclude_modules"),
            rank_pattern={k: int(v) for k, v in data["rank_pattern"].items()} if data.get("rank_pattern") else None,
            alpha_pattern=data.get("alpha_pattern") or None,
            use_rslora=bool(data.get("use_rslora", False)),
            bias=data.get("bias", "none"),
            fan_in_fan_out=data.get("fan_in_fan_out"),
            modules_to_save=data.get("modules_to_save"),
            layers_to_transform=data.get("layers_to_transform"),
            layers_pattern=data.get("layers_pattern"),
            init=init_mode,
            target_parameters=data.get("target_parameters") or None,
            peft_extra=extra,
        )

    def to_peft(self) -> dict:
        """adapter_config.json's content: PEFT's keys, plus the unknown keys this config was loaded with."""
        out = copy.deepcopy(self.peft_extra)
        extra_init = out.pop("init_lora_weights", None)
        init = {"default": True, "gaussian": "gaussian", "random": False}[self.init]
        if extra_init is not None and self.init == "default":
            init = extra_init
        targets = self.target_modules if self.target_modules is not None else ALL_LINEAR
        if self.target_modules is None and self.target_parameters:
            targets = None
        out.update(
            {
                "peft_type": "LORA",
                "r": self.r,
                "lora_alpha": self.alpha,
                "lora_dropout": float(self.dropout),
                "target_modules": targets if targets is None or isinstance(targets, str) else list(targets),
                "target_parameters": list(self.target_parameters) if self.target_parameters else None,
                "exclude_modules": self.exclude_modules,
                "rank_pattern": dict(self.rank_pattern or {}),
                "alpha_pattern": dict(self.alpha_pattern or {}),
                "use_rslora": self.use_rslora,
                "use_dora": False,
                "bias": self.bias,
                "fan_in_fan_out": bool(self.fan_in_fan_out),
                "modules_to_save": list(self.modules_to_save) if self.modules_to_save else None,
                "layers_to_transform": self.layers_to_transform,
                "layers_pattern": self.layers_pattern,
                "init_lora_weights": init,
            }
        )
        out.setdefault("task_type", None)
        out.setdefault("base_model_name_or_path", None)
        out.setdefault("inference_mode", True)
        return out


def _is_finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_integral(value) -> bool:
    """An int, or a float with an integer value (JSON writers may write 4 as 4.0); not a bool."""
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and math.isfinite(value) and value.is_integer())


def _check_peft_values(data: dict, where: str) -> None:
    """ValueError naming ``where``, the key and the value for a numeric PEFT config field out of its
    range or of the wrong type (r 4.9 is refused, not truncated; 4.0 is read as 4). Run by from_peft on
    every loading path (load_adapter, hot_swap, AdapterPool.load), before anything else reads them."""

    def bad(key, value, what):
        raise ValueError(f"loracuda: {where}: key {key!r} must be {what}, got {value!r}")

    if "r" in data and not (_is_integral(data["r"]) and data["r"] >= 1):
        bad("r", data["r"], "a positive integer")
    if "lora_alpha" in data and not _is_finite_number(data["lora_alpha"]):
        bad("lora_alpha", data["lora_alpha"], "a finite number")
    dropout = data.get("lora_dropout")
    if dropout is not None and not (_is_finite_number(dropout) and 0.0 <= dropout < 1.0):
        bad("lora_dropout", dropout, "a number in [0, 1)")
    for key in ("rank_pattern", "alpha_pattern"):
        table = data.get(key)
        if table is None:
            continue
        if not isinstance(table, dict):
            bad(key, table, "an object {regex: value}")
        for pattern, value in table.items():
            if not isinstance(pattern, str):
                bad(key, pattern, "keyed by regex strings")
            ok = _is_integral(value) and value >= 1 if key == "rank_pattern" else _is_finite_number(value)
            if not ok:
                raise ValueError(
                    f"loracuda: {where}: key {key!r} maps {pattern!r} to {value!r}; expected "
                    + ("a positive integer" if key == "rank_pattern" else "a finite number")
                )
    for key in ("target_modules", "exclude_modules", "modules_to_save", "layers_pattern"):
        value = data.get(key)
        if value is None or isinstance(value, str):
            continue
        if not isinstance(value, (list, tuple, set, frozenset)) or not all(isinstance(v, str) for v in value):
            bad(key, value, "a string or a list of strings")
    layers = data.get("layers_to_transform")
    if layers is not None and not (
        _is_integral(layers) or (isinstance(layers, (list, tuple)) and all(_is_integral(i) for i in layers))
    ):
        bad("layers_to_transform", layers, "an integer or a list of integers")
    for key in ("use_rslora", "fan_in_fan_out"):
        value = data.get(key)
        if value is not None and not isinstance(value, bool):
            bad(key, value, "true or false")


def _plain(value):
    """A JSON-writable copy of a config value (enums by their value, sets as sorted lists)."""
    if hasattr(value, "value") and not isinstance(value, (str, int, float, bool)):
        return value.value
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return copy.deepcopy(value)


def _matches(patterns: Union[None, str, list[str]], path: str) -> bool:
    if not patterns:
        return False
    if isinstance(patterns, str):
        return re.fullmatch(patterns, path) is not None
    return any(path == p or path.endswith("." + p) for p in patterns)


def _pattern_key(patterns: Optional[dict], path: str) -> Optional[str]:
    for key in patterns or {}:
        if re.match(rf"(.*\.)?({key})$", path):
            return key
    return None


# Read access under PEFT's names (the InitVars above only take them at construction).
LoraConfig.lora_alpha = property(lambda self: self.alpha, doc="PEFT's name for alpha")
LoraConfig.lora_dropout = property(lambda self: self.dropout, doc="PEFT's name for dropout")


def as_loracuda_config(config) -> "LoraConfig":
    """``config`` as a loracuda LoraConfig: one passes through; a peft.LoraConfig (or any object with PEFT's
    ``to_dict``) is converted with LoraConfig.from_peft (which refuses options loracuda does not implement)."""
    if config is None or isinstance(config, LoraConfig):
        return config
    if hasattr(config, "to_dict") and hasattr(config, "peft_type"):
        return LoraConfig.from_peft(config.to_dict())
    raise TypeError(f"loracuda: argument 'config' must be a loracuda.LoraConfig or a peft.LoraConfig, got {type(config).__name__}")
