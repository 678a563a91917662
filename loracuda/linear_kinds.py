"""Which modules are linear layers to loracuda, and their layout: nn.Linear (weight [N, K]) and
transformers' Conv1D (GPT-2 style, weight stored [K, N]). Depends on nothing else in loracuda, so the
config (matching), the layers and the serving pool can all use it without importing each other."""

from torch import nn


def _conv1d_class():
    try:
        from transformers.pytorch_utils import Conv1D
    except Exception:  # transformers is optional
        return None
    return Conv1D


def is_conv1d(module: nn.Module) -> bool:
    """True for transformers' Conv1D (a linear layer whose weight is stored [K, N])."""
    cls = _conv1d_class()
    return cls is not None and isinstance(module, cls)


def is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def linear_layout(base_layer: nn.Module, owner: str) -> tuple[bool, int, int]:
    """(fan_in_fan_out, in_features K, out_features N) of an nn.Linear (weight [N, K]) or a transformers
    Conv1D (weight [K, N], fan_in_fan_out True); TypeError naming ``owner``'s argument otherwise."""
    if isinstance(base_layer, nn.Linear):
        n, k = base_layer.weight.shape
        return False, k, n
    if is_conv1d(base_layer):
        k, n = base_layer.weight.shape
        return True, k, n
    raise TypeError(
        f"loracuda.{owner}: argument 'base_layer' must be an nn.Linear or transformers Conv1D, "
        f"got {type(base_layer).__name__}"
    )
