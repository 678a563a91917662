"""Adapter files in PEFT's folder format (docs/design.md, section 'PEFT adapter format'): save_adapter, load_adapter,
hot_swap.

A folder holds adapter_config.json (PEFT's keys; unknown keys kept from loading are written back) and
adapter_model.safetensors (metadata {"format": "pt"}) with, adapter name removed:
  base_model.model.<layer path>.lora_A.weight [r, K]   base_model.model.<layer path>.lora_B.weight [N, r]
  base_model.model.<layer path>.base_layer.bias        (bias="lora_only" or "all")
  base_model.model.<other path>.bias                   (bias="all": every other parameter named *bias*)
  base_model.model.<module path>.<param>               (modules_to_save)
Files whose keys lack the "base_model.model." prefix are read too.

Loading reads only safetensors (a pickle file is refused), and checks every key, shape and dtype against
the model before any parameter is touched: on any error the model is unchanged. Saving replaces both
files as one set (loracuda.adapter_folder): a failed or killed save leaves the previous adapter or the
new one, never a mix, and other files in the folder are left alone.
"""

import json
import os

import torch
from torch import Tensor, nn

from . import adapter_folder, experts
from .model_lock import locked
from .config import CONFIG_NAME, LoraConfig, is_conv1d
from .inject import CONFIGS_ATTR, adapter_paths, configs, inject, lora_layers, modules_to_save_params

WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
PREFIX = "base_model.model."
_FILE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# ---- saving --------------------------------------------------------------------------------------


def _extra_params(model: nn.Module, config: LoraConfig, lora_paths: list[str]) -> dict[str, nn.Parameter]:
    """{file key without prefix: model parameter} of the biases and modules_to_save parameters an adapter
    carries besides its factors. ``lora_paths``: the layers that hold (or will hold) the adapter; a bias
    of such a layer is named <path>.base_layer.bias whether or not the layer is wrapped yet."""
    out = {}
    wrapped = set(lora_paths)
    if config.bias != "none":
        for name, p in model.named_parameters():
            if "lora_" in name or "bias" not in name.rpartition(".")[2]:
                continue
            owner, _, leaf = name.rpartition(".")
            if owner in wrapped:  # not yet wrapped: <path>.bias becomes <path>.base_layer.bias
                key = f"{owner}.base_layer.{leaf}"
            else:
                key = name
            layer_path = key[: -len(".base_layer." + leaf)] if key.endswith(".base_layer." + leaf) else None
            if config.bias == "lora_only" and layer_path not in wrapped:
                continue
            out[key] = p
    out.update(modules_to_save_params(model, config))
    return out


def adapter_state_dict(model: nn.Module, adapter: str = "default") -> dict[str, Tensor]:
    """The tensors save_adapter writes, keyed as in PEFT's files (with the base_model.model. prefix)."""
    if adapter not in configs(model):
        raise ValueError(f"loracuda.save_adapter: the model has no adapter named {adapter!r} (adapters: {sorted(configs(model))})")
    config = configs(model)[adapter]
    paths = adapter_paths(model, adapter)
    out = {}
    for path, layer in lora_layers(model):
        if adapter in layer.lora_A:
            out[f"{PREFIX}{path}.lora_A.weight"] = layer.lora_A[adapter]
            out[f"{PREFIX}{path}.lora_B.weight"] = layer.lora_B[adapter]
    for key, p in _extra_params(model, config, paths).items():
        out[PREFIX + key] = p
    for key, t in experts.adapter_tensors(model, adapter).items():  # target_parameters, PEFT's layout
        out[PREFIX + key] = t
    # Own contiguous copies: safetensors refuses shared storage (e.g. tied embeddings in modules_to_save).
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


def _write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


@locked
def save_adapter(model: nn.Module, path: str, adapter: str = "default") -> None:
    """Writes adapter ``adapter`` to folder ``path`` (created if needed) in PEFT's format. The two files
    replace the previous ones as one set (loracuda.adapter_folder): an error (permission denied, a full
    disk, a write failing part-way) leaves a previous adapter there intact, a kill at any instant leaves
    the previous adapter or the new one, and other files in the folder are left alone."""
    import safetensors.torch

    tensors = adapter_state_dict(model, adapter)
    from .integrations.transformers import fill_adapter_metadata

    # task_type / base_model_name_or_path from a transformers model (AutoPeftModelFor* need them).
    config = fill_adapter_metadata(configs(model)[adapter].to_peft(), model)
    text = json.dumps(config, indent=2, sort_keys=True)

    def write_weights(file: str) -> None:
        safetensors.torch.save_file(tensors, file, metadata={"format": "pt"})

    # Both files are replaced as one set: after an error the folder holds the previous adapter, after
    # a kill at any instant the previous or the new one (loracuda.adapter_folder); other files stay.
    adapter_folder.write_files(path, {WEIGHTS_NAME: write_weights, CONFIG_NAME: lambda file: _write_text(file, text)})


# ---- reading and checking ------------------------------------------------------------------------


def _locate(path) -> tuple[str, str, bool]:
    """(folder, weights file name, whether ``path`` named the folder) for an adapter folder or a path
    to its safetensors file."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return path, WEIGHTS_NAME, True
    return os.path.dirname(path) or ".", os.path.basename(path), False


def _check_weights_file(file: str, path: str, is_folder: bool) -> None:
    """Refuses a missing file and a pickle file (``path``: what the caller named)."""
    if not os.path.exists(file):
        if is_folder:
            pickles = [n for n in PICKLE_NAMES if os.path.exists(os.path.join(path, n))]
            if pickles:
                raise ValueError(
                    f"loracuda: {os.path.join(path, pickles[0])!r} is a pickle file; only safetensors adapter files "
                    "are loaded (pickle can run arbitrary code). Convert it with safetensors first."
                )
            raise FileNotFoundError(f"loracuda: no {WEIGHTS_NAME} in {path!r}")
        raise FileNotFoundError(f"loracuda: no adapter file or folder at {path!r}")
    if os.path.isdir(file):
        raise ValueError(f"loracuda: {file!r} is a folder, not a safetensors file")
    with open(file, "rb") as f:
        head = f.read(9)
    # A safetensors file starts with its header's length (u64, little endian) and the JSON header "{".
    # torch.save writes a zip archive ("PK") or a raw pickle (protocol byte 0x80).
    if head[8:9] != b"{" and (head[:2] == b"PK" or head[:1] == b"\x80"):
        raise ValueError(
            f"loracuda: {file!r} is a pickle / torch.save file, not safetensors; only safetensors adapter files "
            "are loaded (pickle can run arbitrary code)"
        )


def _header_end(file: str, header) -> int:
    """The end (bytes after the header) of the data a parsed safetensors header describes; ValueError
    naming the file and the key for a header that is not safetensors' {name: {dtype, shape,
    data_offsets [begin, end]}} object."""
    if not isinstance(header, dict):
        raise ValueError(
            f"loracuda: {file!r} has a safetensors header that is a JSON {type(header).__name__}, not an object"
        )
    end = 0
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        if not isinstance(entry, dict):
            raise ValueError(f"loracuda: {file!r}: safetensors header entry {key!r} is {entry!r}, not an object")
        offsets = entry.get("data_offsets")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
            or offsets[0] > offsets[1]
        ):
            raise ValueError(
                f"loracuda: {file!r}: safetensors header entry {key!r} has data_offsets {offsets!r}; "
                "expected [begin, end] with 0 <= begin <= end"
            )
        for field in ("dtype", "shape"):
            if field not in entry:
                raise ValueError(f"loracuda: {file!r}: safetensors header entry {key!r} has no {field!r}")
        end = max(end, offsets[1])
    return end


def _read_tensors(file: str) -> dict[str, Tensor]:
    import safetensors.torch

    size = os.path.getsize(file)
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"loracuda: {file!r} is truncated or not a safetensors file ({size} bytes)")
        header_len = int.from_bytes(head, "little")
        if header_len <= 0 or 8 + header_len > size:
            raise ValueError(
                f"loracuda: {file!r} is truncated or not a safetensors file (header of {header_len} bytes, file of {size})"
            )
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"loracuda: {file!r} has a corrupt safetensors header ({error})") from None
    end = _header_end(file, header)
    if 8 + header_len + end > size:
        raise ValueError(
            f"loracuda: {file!r} is truncated: its header describes {8 + header_len + end} bytes, the file has {size}"
        )
    try:
        return safetensors.torch.load_file(file)
    except Exception as error:
        raise ValueError(f"loracuda: {file!r} is not a valid safetensors file ({error})") from None


def _strip(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    out = {}
    for key, t in tensors.items():
        short = key[len(PREFIX) :] if key.startswith(PREFIX) else key
        if short in out:
            raise ValueError(f"loracuda: adapter file has key {short!r} both with and without the {PREFIX!r} prefix")
        out[short] = t
    return out


def _expected(model: nn.Module, config: LoraConfig, adapter: str):
    """(paths, {file key without prefix: (kind "A" | "B" | "param", layer path or parameter, shape)}) for
    loading ``adapter``: the layers already holding it, else those ``config`` targets."""
    existing = adapter_paths(model, adapter)
    paths = existing if existing else config.target_paths(model)
    expected = experts.expected_tensors(model, config, adapter)  # target_parameters (loracuda.experts)
    if not paths and not expected:
        raise ValueError(f"loracuda.load_adapter: no module of the model matched {config.describe_targets()}")
    for path in paths:
        module = model.get_submodule(path)
        base = getattr(module, "base_layer", module)
        n, k = (base.weight.shape[1], base.weight.shape[0]) if is_conv1d(base) else tuple(base.weight.shape)
        r = module.r[adapter] if existing else config.rank_for(path)
        expected[f"{path}.lora_A.weight"] = ("A", path, (r, k))
        expected[f"{path}.lora_B.weight"] = ("B", path, (n, r))
    for key, p in _extra_params(model, config, paths).items():
        expected[key] = ("param", p, tuple(p.shape))
    return paths, expected


def _check(file: str, tensors: dict[str, Tensor], expected: dict, pad_rank: bool) -> None:
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    problems = []
    if missing:
        problems.append(f"missing keys {missing[:5]}" + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    if unexpected:
        problems.append(
            f"unexpected keys {unexpected[:5]}" + (f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else "")
        )
    for key, (kind, _, shape) in expected.items():
        t = tensors.get(key)
        if t is None:
            continue
        if t.dtype not in _FILE_DTYPES:
            problems.append(f"key {key!r} has dtype {t.dtype}; expected a floating dtype ({', '.join(map(str, _FILE_DTYPES))})")
            continue
        ok = tuple(t.shape) == shape
        if not ok and pad_rank and kind in ("A", "B") and t.dim() == 2:
            # hot_swap: a smaller rank is zero-padded up to the layer's rank.
            if kind == "A":
                ok = t.shape[1] == shape[1] and 1 <= t.shape[0] <= shape[0]
            else:
                ok = t.shape[0] == shape[0] and 1 <= t.shape[1] <= shape[1]
        if not ok:
            what = "at most " if pad_rank and kind in ("A", "B") else ""
            problems.append(f"key {key!r} has shape {list(t.shape)}; the model expects {what}{list(shape)}")
    if problems:
        raise ValueError(f"loracuda: adapter file {file!r} does not fit the model: " + "; ".join(problems) + ". The model is unchanged.")


def _check_ranks(file: str, tensors: dict[str, Tensor], expected: dict) -> None:
    for key, (kind, path, _) in expected.items():
        if kind == "A":
            a, b = tensors[key], tensors[f"{path}.lora_B.weight"]
            if a.shape[0] != b.shape[1]:
                raise ValueError(
                    f"loracuda: adapter file {file!r}: key {key!r} has rank {a.shape[0]} but "
                    f"'{path}.lora_B.weight' has rank {b.shape[1]}. The model is unchanged."
                )


def read_adapter(path: str) -> tuple[str, LoraConfig, dict[str, Tensor]]:
    """(weights file, config, tensors keyed without the base_model.model. prefix) of the adapter folder
    (or safetensors file) at ``path``. Reads safetensors only (a pickle file is refused) and checks the
    file's integrity; the keys and shapes are checked against a model by ``check_tensors``."""
    folder, name, is_folder = _locate(path)
    # The two files are read as one set: under a shared lock against saves of this library, and, after
    # a save that was killed mid-way, as its journal says (loracuda.adapter_folder).
    with adapter_folder.reading(folder, [name, CONFIG_NAME]) as files:
        file = files[name]
        _check_weights_file(file, os.fspath(path), is_folder)
        config = LoraConfig.from_peft(files[CONFIG_NAME])
        tensors = _strip(_read_tensors(file))
    return file, config, tensors


def check_tensors(file: str, tensors: dict[str, Tensor], expected: dict, pad_rank: bool = False) -> None:
    """Raises ValueError, naming every problem, unless ``tensors`` holds exactly the keys of ``expected``
    ({key: (kind "A" | "B" | "param", layer path or parameter, shape)}) with those shapes (``pad_rank``:
    A / B ranks up to the expected one) and each layer's A and B agree on the rank."""
    _check(file, tensors, expected, pad_rank)
    _check_ranks(file, tensors, expected)


_FLOAT32_MAX = torch.finfo(torch.float32).max


def file_scale(config: LoraConfig, path: str, rank: int) -> float:
    """The scale of layer ``path`` for factors of ``rank`` rows: alpha / rank (alpha / sqrt(rank) with
    rsLoRA), alpha from the config (alpha_pattern first)."""
    return config.alpha_for(path) / ((rank**0.5) if config.use_rslora else rank)


def check_adapter(file: str, config: LoraConfig, tensors: dict[str, Tensor], expected: dict, pad_rank: bool = False) -> None:
    """The one check of an adapter's values that every loading path runs before writing anything
    (load_adapter, hot_swap, AdapterPool.load): keys, shapes, dtypes and ranks (``check_tensors``),
    every tensor finite, and every layer's scale finite in float32 (the kernels' scale type). The
    config's own fields were range-checked when it was read (LoraConfig.from_peft). ValueError naming
    the file, the key and the bad value."""
    check_tensors(file, tensors, expected, pad_rank)
    for key, (kind, path, _) in expected.items():
        if kind == "A" and tensors[key].shape[0] != config.rank_for(path):
            raise ValueError(
                f"loracuda: adapter file {file!r}: key {key!r} has rank {tensors[key].shape[0]} but its config gives "
                f"layer {path!r} rank {config.rank_for(path)} (r / rank_pattern); the scale would be wrong. "
                "Nothing was changed."
            )
    for key in expected:
        t = tensors[key]
        if not torch.isfinite(t).all():
            bad = t[~torch.isfinite(t)].reshape(-1)[0].item()
            raise ValueError(
                f"loracuda: adapter file {file!r}: key {key!r} holds NaN or infinite values (e.g. {bad}). "
                "Nothing was changed."
            )
    for key, (kind, path, _) in expected.items():
        if kind != "A":
            continue
        scale = file_scale(config, path, tensors[key].shape[0])
        if not abs(scale) <= _FLOAT32_MAX:
            raise ValueError(
                f"loracuda: adapter {file!r}: layer {path!r} would get scale {scale!r} (alpha "
                f"{config.alpha_for(path)!r}), which is not a finite float32. Nothing was changed."
            )


# ---- loading -------------------------------------------------------------------------------------


def _layers(model: nn.Module) -> dict:
    """{path: LoRALinear or LoRAExperts} of the model."""
    return {**dict(lora_layers(model)), **dict(experts.expert_layers(model))}


def _destination(layers: dict, adapter: str, kind: str, target) -> Tensor:
    """The tensor an expected entry (``_expected``) is loaded into."""
    if kind == "param":
        return target
    if kind in ("expert_A", "expert_B"):  # (experts path, parameter): the factor in PEFT's layout
        return experts.PeftLayoutFactor(layers[target[0]], target[1], kind, adapter)
    return (layers[target].lora_A if kind == "A" else layers[target].lora_B)[adapter]


def _old_value(model: nn.Module, adapter: str, kind: str, target, exists: bool):
    if kind == "param":
        return target.detach().clone()
    if not exists:
        return None
    return _destination(_layers(model), adapter, kind, target).detach().clone()


def _scale_state(layer, adapter: str) -> tuple:
    return layer.r[adapter], layer.alpha[adapter], layer.scaling[adapter], layer.dropout_p[adapter]


def _restore_scale_state(layer, adapter: str, state: tuple) -> None:
    layer.r[adapter], layer.alpha[adapter], layer.scaling[adapter], layer.dropout_p[adapter] = state


@locked
@torch.no_grad()
def load_adapter(model: nn.Module, path: str, adapter: str = "default") -> nn.Module:
    """Loads a PEFT-format adapter folder into adapter ``adapter``, injecting it first when the model has
    no adapter of that name (with the file's config). Every key, shape and dtype is checked before any
    parameter is touched; on any error the model is unchanged. Returns ``model``."""
    file, config, tensors = read_adapter(path)
    exists = adapter in configs(model) or bool(adapter_paths(model, adapter))
    if exists:
        merged = [p for p, layer in lora_layers(model) if adapter in layer.merged]
        if merged:
            raise RuntimeError(
                f"loracuda.load_adapter: adapter {adapter!r} is merged into {merged[:3]}; unmerge it first "
                "(or use hot_swap, which handles merged adapters)"
            )
    paths, expected = _expected(model, config, adapter)
    check_adapter(file, config, tensors, expected, pad_rank=False)
    # Everything is checked. The writes below cannot fail on checked input short of running out of
    # memory; if one does, what was written is put back (the injection undone, old values restored).
    old_values = {key: _old_value(model, adapter, kind, target, exists) for key, (kind, target, _) in expected.items()}
    old_scales = {p: _scale_state(model.get_submodule(p), adapter) for p in paths} if exists else {}
    grad_flags = [(p, p.requires_grad) for p in model.parameters()]
    injected = False
    try:
        if not exists:
            inject(model, config, adapter)
            injected = True
        layers = _layers(model)
        for key, (kind, target, _) in expected.items():
            _destination(layers, adapter, kind, target).copy_(tensors[key])
        if exists:
            for p in paths:
                layers[p].set_scale(adapter, config.rank_for(p), config.alpha_for(p), config.use_rslora)
                layers[p].dropout_p[adapter] = float(config.dropout)
            experts.set_scales(model, config, adapter)
    except BaseException:
        layers = _layers(model)
        for key, (kind, target, _) in expected.items():
            if old_values[key] is not None and (kind == "param" or not injected):
                _destination(layers, adapter, kind, target).copy_(old_values[key])
        for p, state in old_scales.items():
            _restore_scale_state(layers[p], adapter, state)
        if injected:
            from .inject import delete_adapter

            delete_adapter(model, adapter)
        for p, flag in grad_flags:
            p.requires_grad_(flag)
        raise
    stored = dict(configs(model))
    config.fan_in_fan_out = stored[adapter].fan_in_fan_out if adapter in stored else config.fan_in_fan_out
    stored[adapter] = config
    setattr(model, CONFIGS_ATTR, stored)
    return model


@locked
@torch.no_grad()
def hot_swap(model: nn.Module, path: str, adapter: str = "default") -> None:
    """Copies the adapter in folder ``path`` into the existing adapter ``adapter`` in place: same target
    layers; a file rank smaller than the layer's is zero-padded, and the file's scale is folded into B so
    the layers' scales (and a compiled graph) stay as they are. Merged layers are unmerged, updated and
    merged again. Everything that can be checked is checked before anything changes; if merging the new
    factors again fails (an exact restore record over its budget), the previous factors are put back
    and merged as before (bit for bit for exact merges), and the error names the layer."""
    from .merge import merge_layers, unmerge

    if adapter in experts.adapter_names(model):
        raise ValueError(
            f"loracuda.hot_swap: adapter {adapter!r} adapts experts (target_parameters), which hot_swap does not "
            "support; load_adapter the new file under another name and set_adapter it. The model is unchanged"
        )
    if not adapter_paths(model, adapter):
        raise ValueError(f"loracuda.hot_swap: the model has no adapter named {adapter!r}; load_adapter it first")
    file, config, tensors = read_adapter(path)
    experts.refuse_in("hot_swap", config)
    paths, expected = _expected(model, config, adapter)
    check_adapter(file, config, tensors, expected, pad_rank=True)
    layers = dict(lora_layers(model))
    for p in paths:
        if layers[p].scaling[adapter] == 0.0:
            raise ValueError(f"loracuda.hot_swap: layer {p!r} has scale 0 for adapter {adapter!r}; cannot fold the new scale in")
    # The new factors of every layer, zero-padded to the layer's rank with the file's scale folded into
    # B, computed and checked before anything is written.
    new = {}
    for p in paths:
        layer = layers[p]
        a_file, b_file = tensors[f"{p}.lora_A.weight"], tensors[f"{p}.lora_B.weight"]
        r_file = a_file.shape[0]
        factor = file_scale(config, p, r_file) / layer.scaling[adapter]
        a = torch.zeros_like(layer.lora_A[adapter])
        b = torch.zeros_like(layer.lora_B[adapter])
        a[:r_file].copy_(a_file)
        b[:, :r_file].copy_(b_file.to(torch.float64).mul(factor) if factor != 1.0 else b_file)
        if not torch.isfinite(b).all():
            raise ValueError(
                f"loracuda.hot_swap: adapter file {file!r}: layer {p!r}'s B times the scale ratio {factor!r} (the file's "
                f"scale over the layer's {layer.scaling[adapter]!r}) is not finite in {b.dtype}. The model is unchanged."
            )
        new[p] = (a, b)
    params = {key: target for key, (kind, target, _) in expected.items() if kind == "param"}
    old = {p: (layers[p].lora_A[adapter].detach().clone(), layers[p].lora_B[adapter].detach().clone()) for p in paths}
    old_params = {key: target.detach().clone() for key, target in params.items()}
    merged = {p: layers[p].merged[adapter] for p in paths if adapter in layers[p].merged}
    remerge = [(p, layers[p], list(rec.adapters), rec.exact) for p, rec in merged.items()]
    if merged:
        unmerge(model, adapter)  # checks every record before writing; raises with nothing changed

    def write(factors: dict, values: dict) -> None:
        for p, (a, b) in factors.items():
            layers[p].lora_A[adapter].copy_(a)
            layers[p].lora_B[adapter].copy_(b)
        for key, target in params.items():
            target.copy_(values[key])

    try:
        write(new, {key: tensors[key] for key in params})
        if remerge:
            merge_layers(remerge)
    except BaseException as error:
        # merge_layers left no layer merged: restore the previous factors, then merge them as before.
        write(old, old_params)
        if remerge:
            merge_layers(remerge)
        if isinstance(error, ValueError):
            raise ValueError(
                f"loracuda.hot_swap: {error} The model keeps its previous adapter {adapter!r}, merged as before."
            ) from error
        raise
