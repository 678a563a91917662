"""to_peft: a PeftModel over a loracuda-injected model's own parameters (the way back from
loracuda.inject to PEFT's API, e.g. to hand the model to a library that expects a PeftModel).

The PeftModel is built by PEFT (get_peft_model / add_adapter with each adapter's config, targeting the
exact layer paths that hold it) on a structural copy of the model: new module objects over the same
parameter and buffer tensors. Its LoRA factors are then the injected model's Parameter objects, so
training either trains both and an optimizer built on one keeps working for the other. The injected
model is left as it was.
"""

import copy
import dataclasses

from torch import nn


def _peft_config(config, paths: list):
    """peft.LoraConfig for a loracuda LoraConfig, targeting exactly ``paths``."""
    import peft

    data = config.to_peft()
    data["target_modules"] = list(paths)
    for key in ("layers_to_transform", "layers_pattern", "exclude_modules"):
        data[key] = None
    known = {f.name for f in dataclasses.fields(peft.LoraConfig)}
    data = {k: v for k, v in data.items() if k in known and k != "peft_type"}
    return peft.LoraConfig(**data)


def to_peft(model: nn.Module, *, accelerate: bool = True):
    """A peft.PeftModel equivalent to the loracuda-injected ``model`` (same adapters, scales, dropout,
    active adapters, biases and modules_to_save), sharing its parameters. ``accelerate``: run it on
    loracuda's kernels (apply_to_peft). Refuses a model with merged adapters (unmerge first)."""
    import peft

    from ..inject import CONFIGS_ATTR, active_adapters, adapter_paths, configs, lora_layers

    table = configs(model)
    layers = dict(lora_layers(model))
    if not layers or not table:
        raise ValueError("loracuda.to_peft: the model has no loracuda adapter (loracuda.inject it first)")
    merged = [p for p, layer in layers.items() if layer.merged]
    if merged:
        raise RuntimeError(f"loracuda.to_peft: layers {merged[:3]} have merged adapters; loracuda.unmerge(model) first")
    trainable = {id(p): p.requires_grad for p in model.parameters()}
    shared = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    view = copy.deepcopy(model, memo=shared)
    for key in ("save_pretrained", "_loracuda_save_guard", CONFIGS_ATTR):
        view.__dict__.pop(key, None)
    for path, layer in list(lora_layers(view)):
        view.set_submodule(path, layer.base_layer)
    names = list(table)
    paths = {n: adapter_paths(model, n) for n in names}
    pm = peft.get_peft_model(view, _peft_config(table[names[0]], paths[names[0]]), adapter_name=names[0],
                             low_cpu_mem_usage=True)
    for n in names[1:]:
        pm.add_adapter(n, _peft_config(table[n], paths[n]), low_cpu_mem_usage=True)
    inner = pm.base_model.model
    for path, ours in layers.items():
        theirs = inner.get_submodule(path)
        for n in ours.adapters:
            theirs.lora_A[n].weight = ours.lora_A[n]
            theirs.lora_B[n].weight = ours.lora_B[n]
            theirs.scaling[n] = ours.scaling[n]
    # modules_to_save: the injected model trains the module itself; PEFT's wrapper gets that module as its
    # trained copy (so the parameters stay shared).
    from peft.utils.other import ModulesToSaveWrapper

    for _, wrapper in inner.named_modules():
        if isinstance(wrapper, ModulesToSaveWrapper):
            for n in list(wrapper.modules_to_save):
                wrapper.modules_to_save[n] = wrapper.original_module
    pm.base_model.set_adapter(active_adapters(model) or names[:1])
    # PEFT's set-up marks trainable what its own rules say; the shared tensors keep the injected model's flags.
    for p in pm.parameters():
        if id(p) in trainable:
            p.requires_grad_(trainable[id(p)])
    pm.train(model.training)
    if accelerate:
        from .peft import apply_to_peft

        apply_to_peft(pm)
    return pm
