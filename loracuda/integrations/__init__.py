"""Bridges to the libraries users train with: PEFT (integrations.peft: apply_to_peft, the LoracudaLinear
layer, to_peft) and transformers (integrations.transformers: save guards and SaveAdapterCallback).

The functions below import PEFT / transformers only when called, so ``import loracuda`` needs neither.
"""


def apply_to_peft(peft_model=None, *, exact_merge=None):
    from .peft import apply_to_peft as impl

    return impl(peft_model, exact_merge=exact_merge)


def remove_from_peft(peft_model=None):
    from .peft import remove_from_peft as impl

    return impl(peft_model)


def to_peft(model, *, accelerate=True):
    from .peft_view import to_peft as impl

    return impl(model, accelerate=accelerate)


apply_to_peft.__doc__ = "Runs PEFT LoRA models on loracuda's kernels; see loracuda.integrations.peft.apply_to_peft."
remove_from_peft.__doc__ = "Undoes apply_to_peft; see loracuda.integrations.peft.remove_from_peft."
to_peft.__doc__ = "A PeftModel sharing an injected model's parameters; see loracuda.integrations.peft_view.to_peft."
