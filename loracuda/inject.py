"""Model patching: inject LoRA adapters into any nn.Module, manage several adapters, convert a PEFT
model, and unload merged adapters for deployment.

State kept on the model: ``model.loracuda_configs`` {adapter name: LoraConfig} (the resolved config of
each injected adapter) and, per adapted layer, the LoRALinear's own dicts. Layers are replaced in place
(``setattr`` on their parent), so the caller's references to the model stay valid.
"""

import contextlib
import copy
import math
from typing import Iterable, Iterator, Union

import torch
from torch import nn

from . import experts
from .config import LoraConfig, as_loracuda_config, is_conv1d
from .layers import LoRALinear
from .model_lock import locked

CONFIGS_ATTR = "loracuda_configs"


def configs(model: nn.Module) -> dict:
    """{adapter name: LoraConfig} of the adapters injected into ``model`` (empty if none)."""
    return getattr(model, CONFIGS_ATTR, None) or {}


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    for path, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield path, module


def _base(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, LoRALinear) else module


def bias_params(model: nn.Module, config: LoraConfig, paths: Iterable[str]) -> dict[str, nn.Parameter]:
    """{name in the model's named_parameters(): parameter} of the biases ``config.bias`` trains."""
    out = {}
    if config.bias == "all":
        for name, p in model.named_parameters():
            if name == "bias" or name.endswith(".bias"):
                out[name] = p
    elif config.bias == "lora_only":
        for path in paths:
            layer = model.get_submodule(path)
            if layer.base_layer.bias is not None:
                out[f"{path}.base_layer.bias"] = layer.base_layer.bias
    return out


def modules_to_save_params(model: nn.Module, config: LoraConfig) -> dict[str, nn.Parameter]:
    """{name in the model's named_parameters(): parameter} of the modules saved in full."""
    out = {}
    if not config.modules_to_save:
        return out
    for path, module in model.named_modules():
        if path and any(path == m or path.endswith("." + m) for m in config.modules_to_save):
            for name, p in module.named_parameters():
                out[f"{path}.{name}"] = p
    return out


@locked
def inject(model: nn.Module, config: LoraConfig = None, adapter: str = "default") -> nn.Module:
    """Replaces the layers ``config`` targets by LoRALinear wrappers in place (layers already wrapped get
    one more adapter), adds adapter ``adapter`` to each, and freezes every parameter but the LoRA factors,
    the biases ``config.bias`` asks for and the ``modules_to_save`` parameters. Parameter names:
    ``<layer path>.lora_A.<adapter>`` [r, K] and ``<layer path>.lora_B.<adapter>`` [N, r]. With the default
    init the model's outputs are unchanged. ``config``: a loracuda.LoraConfig or a peft.LoraConfig (converted
    with LoraConfig.from_peft). Returns ``model``. Raises, naming the patterns, when nothing
    matches; nothing is modified on any error."""
    config = copy.deepcopy(as_loracuda_config(config)) if config is not None else LoraConfig()
    if not isinstance(model, nn.Module):
        raise TypeError(f"loracuda.inject: argument 'model' must be an nn.Module, got {type(model).__name__}")
    if adapter in configs(model):
        raise ValueError(f"loracuda.inject: the model already has an adapter named {adapter!r}")
    if not isinstance(adapter, str) or not adapter or "." in adapter:
        raise ValueError(f"loracuda.inject: argument 'adapter' must be a non-empty string without '.', got {adapter!r}")
    paths = config.target_paths(model)
    expert_targets = experts.check_injectable(model, config, adapter)  # target_parameters (loracuda.experts)
    if not paths and not expert_targets:
        raise ValueError(f"loracuda.inject: no module of the model matched {config.describe_targets()}")
    # Each layer's own layout decides (Conv1D stores [K, N]); the config records whether any is Conv1D,
    # which is what PEFT's fan_in_fan_out means for such a model.
    config.fan_in_fan_out = any(is_conv1d(_base(model.get_submodule(p))) for p in paths)
    for path in paths:
        module = model.get_submodule(path)
        layer = module if isinstance(module, LoRALinear) else LoRALinear(module)
        if layer.merged:
            raise RuntimeError(f"loracuda.inject: layer {path!r} has merged adapters; unmerge before adding one")
    # All checks passed: modify. Allocating the factors can still fail (out of memory for a huge rank):
    # then every layer wrapped or extended so far is put back as it was.
    was_training = model.training
    grad_flags = [(p, p.requires_grad) for p in model.parameters()]
    experts_wrapped = experts.wrapped_paths(model)
    done = []
    try:
        for path in paths:
            original = model.get_submodule(path)
            module = original if isinstance(original, LoRALinear) else LoRALinear(original)
            training = module.training
            module.add_adapter(
                adapter, config.rank_for(path), config.alpha_for(path), config.dropout, config.use_rslora, config.init
            )
            done.append((path, original, module, training))
            if module is not original:
                model.set_submodule(path, module)
            module.train(was_training)
        experts.inject_experts(model, config, adapter, expert_targets, was_training)
        _freeze(model, config, paths)
    except BaseException:
        experts.undo_inject(model, adapter, expert_targets, experts_wrapped)
        for path, original, module, training in reversed(done):
            if adapter in module.lora_A:
                module.delete_adapter(adapter)
            module.train(training)
            if module is not original:
                model.set_submodule(path, original)
        for p, flag in grad_flags:
            p.requires_grad_(flag)
        raise
    table = dict(configs(model))
    table[adapter] = config
    setattr(model, CONFIGS_ATTR, table)
    _guard_full_saves(model)
    return model


def _guard_full_saves(model: nn.Module) -> None:
    # A transformers model's save_pretrained must write a folder transformers loads back correctly
    # (loracuda.integrations.transformers); other models are left alone.
    if hasattr(model, "save_pretrained") and hasattr(model, "config"):
        from .integrations.transformers import guard_full_saves

        guard_full_saves(model)


def adapter_paths(model: nn.Module, adapter: str) -> list[str]:
    """Paths of the layers holding ``adapter``, in model order."""
    return [p for p, layer in lora_layers(model) if adapter in layer.lora_A]


def _freeze(model: nn.Module, config: LoraConfig, paths: list[str]) -> None:
    """Makes trainable exactly: every LoRA factor, and the biases and modules_to_save parameters that
    ``config`` (for ``paths``) or an adapter already on the model asks for; freezes everything else."""
    trainable = {id(p) for p in bias_params(model, config, paths).values()}
    trainable |= {id(p) for p in modules_to_save_params(model, config).values()}
    for name, other in configs(model).items():
        trainable |= {id(p) for p in bias_params(model, other, adapter_paths(model, name)).values()}
        trainable |= {id(p) for p in modules_to_save_params(model, other).values()}
    for _, layer in lora_layers(model):
        trainable |= {id(p) for p in layer.lora_A.values()} | {id(p) for p in layer.lora_B.values()}
    trainable |= {id(p) for p in experts.factor_params(model)}
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)


@locked
def set_adapter(model: nn.Module, names: Union[str, list[str]]) -> None:
    """Makes ``names`` (one or several, summed; a name given twice counts once) the active adapters of
    every layer that holds them; layers holding none of them run their base layer only. Raises for an
    unknown name, changing nothing."""
    names = [names] if isinstance(names, str) else list(names)
    bad = [n for n in names if not isinstance(n, str)]
    if bad:
        raise TypeError(f"loracuda.set_adapter: argument 'names' must be a name or a list of names, got {bad[0]!r}")
    names = list(dict.fromkeys(names))
    known = {n for _, layer in lora_layers(model) for n in layer.lora_A} | experts.adapter_names(model)
    missing = [n for n in names if n not in known]
    if missing:
        raise ValueError(f"loracuda.set_adapter: no adapter named {missing} in the model (adapters: {sorted(known)})")
    for _, layer in lora_layers(model):
        layer.active_adapters = [n for n in names if n in layer.lora_A]
    experts.set_active(model, names)


def active_adapters(model: nn.Module) -> list[str]:
    seen = []
    for _, layer in lora_layers(model):
        for n in layer.active_adapters:
            if n not in seen:
                seen.append(n)
    return seen


@locked
def delete_adapter(model: nn.Module, name: str) -> None:
    """Removes adapter ``name`` from every layer (a layer left without adapters goes back to its plain
    base layer). Raises, changing nothing, for an unknown or merged adapter."""
    layers = [(p, layer) for p, layer in lora_layers(model) if name in layer.lora_A]
    if not layers and name not in experts.adapter_names(model):
        raise ValueError(f"loracuda.delete_adapter: no adapter named {name!r} in the model")
    for p, layer in layers:
        if name in layer.merged:
            raise RuntimeError(f"loracuda.delete_adapter: adapter {name!r} is merged into layer {p!r}; unmerge it first")
    experts.delete(model, name)  # checks its own merged state before changing anything
    for p, layer in layers:
        layer.delete_adapter(name)
        if not layer.adapters:
            model.set_submodule(p, layer.base_layer)
    table = dict(configs(model))
    table.pop(name, None)
    setattr(model, CONFIGS_ATTR, table)


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """Within the block every LoRALinear runs its base layer only (merged adapters must be unmerged first)."""
    layers = [layer for _, layer in lora_layers(model)] + [m for _, m in experts.expert_layers(model)]
    merged = [p for p, layer in [*lora_layers(model), *experts.expert_layers(model)] if layer.merged]
    if merged:
        raise RuntimeError(f"loracuda.disable_adapters: layers {merged[:3]} have merged adapters; unmerge them first")
    previous = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer, was in zip(layers, previous):
            layer.disabled = was


@locked
@torch.no_grad()
def combine_adapters(model: nn.Module, weights: dict[str, float], name: str, method: str = "cat") -> None:
    """Adds adapter ``name`` built from existing ones, weighted, on the layers that hold any of them.

    method "cat": delta = sum_i w_i * delta_i exactly; A stacked along the rank, B stacked with w_i * s_i
    folded in, scale 1 (rank = sum of the ranks). method "linear": all ranks equal r; A = sum_i c_i A_i,
    B = sum_i sign(w_i) c_i B_i with c_i = sqrt(|w_i| s_i), scale 1: rank r, but not the exact weighted sum
    of the deltas (cross terms), as weight averaging of LoRA factors is. The new adapter is not activated."""
    if method not in ("cat", "linear"):
        raise ValueError(f"loracuda.combine_adapters: argument 'method' must be 'cat' or 'linear', got {method!r}")
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"loracuda.combine_adapters: argument 'name' must be a non-empty string without '.', got {name!r}")
    if name in configs(model) or any(name in layer.lora_A for _, layer in lora_layers(model)):
        raise ValueError(f"loracuda.combine_adapters: the model already has an adapter named {name!r}")
    if not isinstance(weights, dict) or not weights:
        raise ValueError(f"loracuda.combine_adapters: argument 'weights' must be a non-empty {{name: weight}} dict, got {weights!r}")
    for n, w in weights.items():
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise ValueError(f"loracuda.combine_adapters: argument 'weights' maps {n!r} to {w!r}; weights are finite numbers")
    on_experts = sorted(set(weights) & experts.adapter_names(model))
    if on_experts:
        raise ValueError(
            f"loracuda.combine_adapters: adapters {on_experts} adapt experts (target_parameters), which "
            "combine_adapters does not support; the model is unchanged"
        )
    known = {n for _, layer in lora_layers(model) for n in layer.lora_A}
    missing = [n for n in weights if n not in known]
    if missing:
        raise ValueError(f"loracuda.combine_adapters: no adapter named {missing} in the model")
    plan = []
    for path, layer in lora_layers(model):
        names = [n for n in weights if n in layer.lora_A]
        if not names:
            continue
        if method == "linear" and len({layer.r[n] for n in names}) != 1:
            raise ValueError(
                f"loracuda.combine_adapters: method 'linear' needs equal ranks; layer {path!r} has "
                f"{ {n: layer.r[n] for n in names} } (use method='cat')"
            )
        plan.append((path, layer, names))
    if not any(n in configs(model) for n in weights):
        raise ValueError(f"loracuda.combine_adapters: adapters {list(weights)} have no config on the model (inject or load them)")
    rank_pattern, alpha_pattern, new = {}, {}, []
    for path, layer, names in plan:
        dtype = layer.lora_A[names[0]].dtype
        if method == "cat":
            a = torch.cat([layer.lora_A[n].float() for n in names], 0)
            b = torch.cat([layer.lora_B[n].float() * (weights[n] * layer.scaling[n]) for n in names], 1)
        else:
            c = {n: math.sqrt(abs(weights[n]) * abs(layer.scaling[n])) for n in names}
            sign = {n: math.copysign(1.0, weights[n] * layer.scaling[n]) for n in names}
            a = sum(layer.lora_A[n].float() * c[n] for n in names)
            b = sum(layer.lora_B[n].float() * (c[n] * sign[n]) for n in names)
        r = a.shape[0]
        a, b = a.to(dtype), b.to(dtype)
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise ValueError(f"loracuda.combine_adapters: the combined factors of layer {path!r} are not finite in {dtype}")
        new.append((layer, a, b, r, max(layer.dropout_p[n] for n in names)))
        key = "^" + path.replace(".", r"\.")  # an exact-path key (PEFT matches keys at the path's end)
        rank_pattern[key] = r
        alpha_pattern[key] = r
    # Everything is computed and checked: write.
    for layer, a, b, r, dropout in new:
        layer.lora_A[name] = nn.Parameter(a)
        layer.lora_B[name] = nn.Parameter(b)
        layer.r[name], layer.alpha[name], layer.scaling[name] = r, float(r), 1.0
        layer.dropout_p[name] = dropout
    first = configs(model)[next(n for n in weights if n in configs(model))]
    config = copy.deepcopy(first)
    config.r, config.alpha, config.use_rslora = 8, 8, False
    config.rank_pattern, config.alpha_pattern = rank_pattern, alpha_pattern
    config.target_modules = [path for path, _, _ in plan]
    config.layers_to_transform = None
    config.layers_pattern = None
    config.exclude_modules = None
    table = dict(configs(model))
    table[name] = config
    setattr(model, CONFIGS_ATTR, table)
    _freeze(model, config, [p for p, _, _ in plan])


@locked
@torch.no_grad()
def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merges each layer's active adapters into its weight (inexact: nothing is kept to undo it) and
    replaces every LoRALinear by its plain base layer. Returns ``model`` (changed in place)."""
    from .merge import merge

    merge(model, exact=False)
    for path, layer in list(lora_layers(model)):
        layer.merged.clear()
        model.set_submodule(path, layer.base_layer)
    experts.unload(model)
    if hasattr(model, CONFIGS_ATTR):
        delattr(model, CONFIGS_ATTR)
    return model


def from_peft(peft_model: nn.Module) -> nn.Module:
    """A loracuda model (LoRALinear layers, loracuda's model API) that shares the parameters and buffers
    of an in-memory PEFT LoRA model (PeftModel or LoraModel): the same adapters, scales, dropout and
    active adapters; modules_to_save wrappers become their active trained copy. The PEFT model must not
    be merged; DoRA and non-linear LoRA layers are refused.

    The PEFT model itself is not taken apart: it stays a working PeftModel (save_pretrained, checkpoints,
    merge_and_unload, ... as before), and it is switched to loracuda's kernels with
    ``loracuda.apply_to_peft`` (so ``from_peft(trainer.model)`` inside a Trainer makes that training run
    on loracuda and lose nothing). The returned model is a separate module tree over the same tensors:
    an optimizer built on either trains both; use one of the two at a time for merging (a merge through
    one changes the shared base weights under the other). To run a PEFT model on loracuda, call
    ``apply_to_peft`` directly."""
    try:
        from peft.tuners.lora.layer import LoraLayer
        from peft.utils.other import ModulesToSaveWrapper
    except Exception as error:  # pragma: no cover - peft missing
        raise ImportError(f"loracuda.from_peft needs peft installed ({error})") from error
    inner = peft_model
    if hasattr(inner, "base_model") and hasattr(inner, "peft_config"):
        inner = inner.base_model  # PeftModel -> LoraModel
    base = getattr(inner, "model", None)
    if base is None or not hasattr(inner, "peft_config"):
        raise TypeError("loracuda.from_peft: argument 'peft_model' must be a PEFT PeftModel or LoraModel")
    peft_configs = dict(inner.peft_config)
    table = {}
    for n, cfg in peft_configs.items():
        data = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
        table[n] = LoraConfig.from_peft(data)  # refuses non-LoRA types and DoRA
        if table[n].target_parameters:
            raise ValueError(
                f"loracuda.from_peft: PEFT adapter {n!r} uses target_parameters={table[n].target_parameters!r} "
                "(LoRA on experts), which from_peft does not convert; save it with save_pretrained and "
                "loracuda.load_adapter the folder instead. The model is unchanged"
            )
    plan = []
    for path, module in base.named_modules():
        if isinstance(module, LoraLayer):
            if getattr(module, "merged_adapters", None):
                raise RuntimeError(f"loracuda.from_peft: PEFT layer {path!r} is merged; unmerge it first")
            if any(getattr(module, "use_dora", {}).get(n, False) for n in module.lora_A):
                raise ValueError(f"loracuda.from_peft: PEFT layer {path!r} uses DoRA, which is not supported")
            inner_base = module.get_base_layer()
            if not (isinstance(inner_base, nn.Linear) or is_conv1d(inner_base)):
                raise ValueError(
                    f"loracuda.from_peft: PEFT layer {path!r} adapts a {type(inner_base).__name__}; only "
                    "nn.Linear and Conv1D layers are supported"
                )
            for n in module.lora_A:
                if not isinstance(module.lora_A[n], nn.Linear) or module.lora_A[n].bias is not None:
                    raise ValueError(f"loracuda.from_peft: PEFT layer {path!r} adapter {n!r} is not a plain LoRA pair")
            plan.append((path, module, inner_base))
        elif isinstance(module, ModulesToSaveWrapper):
            plan.append((path, module, None))
    if not any(b is not None for _, _, b in plan):
        raise ValueError("loracuda.from_peft: the PEFT model has no LoRA layers")
    from .integrations.peft import apply_to_peft

    apply_to_peft(peft_model)
    # A structural copy: new module objects, the same parameter and buffer tensors (the memo maps each
    # of them to itself), so the PEFT model keeps its own layers.
    shared = {id(t): t for t in list(base.parameters()) + list(base.buffers())}
    base = copy.deepcopy(base, memo=shared)
    plan = [(path, base.get_submodule(path), None if b is None else base.get_submodule(path).get_base_layer())
            for path, _, b in plan]
    for path, module, inner_base in plan:
        if inner_base is None:
            active = module.active_adapters if hasattr(module, "active_adapters") else [module.active_adapter]
            active = [a for a in active if a in module.modules_to_save]
            replacement = module.modules_to_save[active[0]] if active else module.original_module
            base.set_submodule(path, replacement)
            continue
        layer = LoRALinear(inner_base)
        for n in module.lora_A:
            drop = module.lora_dropout[n]
            p = float(drop.p) if isinstance(drop, nn.Dropout) else 0.0
            layer.attach_adapter(n, module.lora_A[n].weight, module.lora_B[n].weight, module.scaling[n], p)
            layer.r[n] = module.r[n]
            layer.alpha[n] = float(module.lora_alpha[n])
        active = module.active_adapters
        layer.active_adapters = [a for a in ([active] if isinstance(active, str) else active) if a in layer.lora_A]
        layer.disabled = bool(getattr(module, "disable_adapters", False))
        layer.train(module.training)
        base.set_submodule(path, layer)
    setattr(base, CONFIGS_ATTR, table)
    _guard_full_saves(base)
    return base
