"""loracuda-injected models inside transformers: full-model saves that load back, adapter folders from the
Trainer's saves, and the adapter metadata that AutoPeftModelFor*.from_pretrained needs.

A model ``loracuda.inject`` adapted holds each target layer's weight as ``<path>.base_layer.weight`` and
its factors as ``<path>.lora_A.<adapter>`` / ``<path>.lora_B.<adapter>``. transformers knows none of these
names: a plain ``save_pretrained`` would write them and ``from_pretrained`` would then initialise every
adapted layer at random. ``guard_full_saves`` (which inject calls on transformers models) makes the
model's ``save_pretrained`` (and so ``Trainer.save_model`` and every Trainer checkpoint) write:

- ``config.json`` and ``model.safetensors`` with the base weights under transformers' own names
  (``<path>.weight``), plus the LoRA factors under loracuda's names (transformers skips them as unused
  keys when loading; the Trainer's resume loads them back into the injected model);
- the active adapter as a PEFT adapter folder in the same directory (``adapter_config.json`` +
  ``adapter_model.safetensors``), and each other adapter in a subfolder named after it.

``AutoModelFor*.from_pretrained(folder)`` then loads the base weights and, with PEFT installed, the
adapter found in the folder: the fine-tuned model. Loading the folder's state dict into an injected model
(``load_state_dict``, the Trainer's resume) maps ``<path>.weight`` back to ``<path>.base_layer.weight``.
A model with merged adapters, or with several active adapters, is refused with a message saying what to
do (merge_and_unload first, or one active adapter). ``accelerate``'s ``Accelerator.save_model`` writes
``model.state_dict()`` under loracuda's names with no config: it loads back with ``load_state_dict`` into
an injected model; for a folder transformers loads, call ``model.save_pretrained`` or
``loracuda.save_adapter``.
"""

import functools
import os
from typing import Optional

from torch import nn

_GUARD_FLAG = "_loracuda_save_guard"

# transformers' auto-model mapping (attribute of transformers.models.auto.modeling_auto) -> PEFT task_type,
# in the order they are tried (a class may be listed under several).
_TASK_MAPPINGS = (
    ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "CAUSAL_LM"),
    ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "SEQ_2_SEQ_LM"),
    ("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", "SEQ_CLS"),
    ("MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES", "TOKEN_CLS"),
    ("MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES", "QUESTION_ANS"),
    ("MODEL_MAPPING_NAMES", "FEATURE_EXTRACTION"),
)
# Class-name endings for models that are not in the auto mappings (custom or remote-code models).
_TASK_SUFFIXES = (
    ("ForCausalLM", "CAUSAL_LM"),
    ("LMHeadModel", "CAUSAL_LM"),
    ("ForSeq2SeqLM", "SEQ_2_SEQ_LM"),
    ("ForSequenceClassification", "SEQ_CLS"),
    ("ForTokenClassification", "TOKEN_CLS"),
    ("ForQuestionAnswering", "QUESTION_ANS"),
)


def task_type(model: nn.Module) -> Optional[str]:
    """PEFT's task_type for a transformers model (from its class: CAUSAL_LM for *ForCausalLM, ...), or None
    for a model that is not a transformers model or whose task is not known."""
    name = type(model).__name__
    try:
        from transformers.models.auto import modeling_auto
    except Exception:  # transformers is optional
        modeling_auto = None
    if modeling_auto is not None:
        for attr, task in _TASK_MAPPINGS:
            mapping = getattr(modeling_auto, attr, None) or {}
            if any(name == v or (isinstance(v, (list, tuple)) and name in v) for v in mapping.values()):
                return task
    for suffix, task in _TASK_SUFFIXES:
        if name.endswith(suffix):
            return task
    return None


def base_model_name_or_path(model: nn.Module) -> Optional[str]:
    """The path or hub name the model was loaded from (transformers' config._name_or_path), or None."""
    config = getattr(model, "config", None)
    value = getattr(config, "_name_or_path", None) or getattr(config, "name_or_path", None)
    return str(value) if value else None


def fill_adapter_metadata(peft_config: dict, model: nn.Module) -> dict:
    """adapter_config.json's content with task_type and base_model_name_or_path filled from ``model`` where
    they are missing (values the config already holds, e.g. from a loaded file, are kept)."""
    out = dict(peft_config)
    if not out.get("task_type"):
        out["task_type"] = task_type(model)
    if not out.get("base_model_name_or_path"):
        out["base_model_name_or_path"] = base_model_name_or_path(model)
    return out


# ---- full-model saves ------------------------------------------------------------------------------


def _transformers_key(key: str, lora_paths: set) -> str:
    """``<lora path>.base_layer.<leaf>`` -> ``<lora path>.<leaf>``; any other key unchanged."""
    head, sep, leaf = key.rpartition(".base_layer.")
    if sep and head in lora_paths and "." not in leaf:
        return f"{head}.{leaf}"
    return key


def save_pretrained_with_adapter(model: nn.Module, save_directory, *args, state_dict: Optional[dict] = None, **kwargs):
    """The injected model's save_pretrained (see the module docstring). Arguments as transformers'."""
    from ..inject import active_adapters, configs, lora_layers
    from ..peft_io import save_adapter

    layers = dict(lora_layers(model))
    original = type(model).save_pretrained
    if not layers:
        return original(model, save_directory, *args, state_dict=state_dict, **kwargs)
    merged = [p for p, layer in layers.items() if layer.merged]
    if merged:
        raise RuntimeError(
            f"loracuda: save_pretrained of a model with merged adapters (layers {merged[:3]}) is refused: its "
            "weights hold base + adapter, which no loader can split again. Call loracuda.unmerge(model) first "
            "(and save the adapter), or loracuda.merge_and_unload(model) to save a plain fine-tuned model."
        )
    active = active_adapters(model)
    if len(active) != 1:
        raise ValueError(
            f"loracuda: save_pretrained needs exactly one active adapter to put beside the base weights, the "
            f"model has {active}; call loracuda.set_adapter(model, name) first, or save each adapter with "
            "loracuda.save_adapter(model, folder, adapter=name)."
        )
    lora_paths = set(layers)
    source = state_dict if state_dict is not None else model.state_dict()
    renamed = {_transformers_key(k, lora_paths): v for k, v in source.items()}
    result = original(model, save_directory, *args, state_dict=renamed, **kwargs)
    if kwargs.get("is_main_process", True):
        save_adapter(model, save_directory, adapter=active[0])
        for name in configs(model):
            if name != active[0]:
                save_adapter(model, os.path.join(os.fspath(save_directory), name), adapter=name)
    return result


def _load_base_names(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """load_state_dict pre-hook: a state dict with transformers' names for an adapted layer's weight and
    bias (``<path>.weight``) loads into ``<path>.base_layer.weight``."""
    from ..inject import lora_layers

    for path, _ in lora_layers(module):
        for leaf in ("weight", "bias"):
            src, dst = f"{prefix}{path}.{leaf}", f"{prefix}{path}.base_layer.{leaf}"
            if src in state_dict and dst not in state_dict:
                state_dict[dst] = state_dict.pop(src)


def guard_full_saves(model: nn.Module) -> None:
    """Installs, once, the injected transformers model's save_pretrained and its load_state_dict pre-hook
    (see the module docstring). A model that is not a transformers model is left alone."""
    try:
        from transformers import PreTrainedModel
    except Exception:  # transformers is optional
        return
    if not isinstance(model, PreTrainedModel) or model.__dict__.get(_GUARD_FLAG):
        return
    model.__dict__["save_pretrained"] = functools.partial(save_pretrained_with_adapter, model)
    model.register_load_state_dict_pre_hook(_load_base_names)
    model.__dict__[_GUARD_FLAG] = True


# ---- the Trainer callback ----------------------------------------------------------------------------


def _trainer_callback_base():
    try:
        from transformers import TrainerCallback
    except Exception:  # transformers is optional
        return object
    return TrainerCallback


class SaveAdapterCallback(_trainer_callback_base()):
    """A transformers TrainerCallback for a loracuda-injected model: each checkpoint the Trainer saves
    (``<output_dir>/checkpoint-<step>``) and, when training ends, ``output_dir`` get the model's adapters
    as PEFT adapter folders (the first active adapter in the folder itself, the others in subfolders
    named after them), written by loracuda.save_adapter on the main process.

    transformers models that inject adapted already write the adapter with every save_pretrained (so
    their checkpoints hold it without this callback); the callback is what a plain torch model trained
    by the Trainer needs, and harmless otherwise.

        trainer = Trainer(model=injected_model, args=args, train_dataset=data,
                          callbacks=[loracuda.integrations.transformers.SaveAdapterCallback()])
    """

    def __init__(self, adapters: Optional[list] = None):
        self.adapters = adapters

    def _write(self, model: nn.Module, folder: str) -> None:
        from ..inject import active_adapters, configs
        from ..peft_io import save_adapter

        model = getattr(model, "module", model)  # DistributedDataParallel / accelerate wrappers
        names = list(self.adapters) if self.adapters else list(configs(model))
        if not names:
            raise ValueError("loracuda.SaveAdapterCallback: the model has no loracuda adapter (inject one first)")
        active = [n for n in active_adapters(model) if n in names]
        root = active[0] if active else names[0]
        save_adapter(model, folder, adapter=root)
        for name in names:
            if name != root:
                save_adapter(model, os.path.join(folder, name), adapter=name)

    def on_save(self, args, state, control, model=None, **kwargs):
        if state.is_world_process_zero and model is not None:
            self._write(model, os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))
        return control

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if state.is_world_process_zero and model is not None:
            self._write(model, args.output_dir)
        return control
