"""loracuda: hand-written CUDA and C++ kernels for LoRA, with autograd, model patching and PEFT files.

The ops live under torch.ops.loracuda (typed wrappers in loracuda.ops); loracuda.lora_linear is the
differentiable layer call; loracuda.build_info() says what this build can run on.
"""

from . import ops
from .buildinfo import build_info
from .functional import grouped_lora_linear, lora_linear
from .version import __version__
from .config import LoraConfig
from .layers import LoRALinear
from .inject import combine_adapters, delete_adapter, disable_adapters, from_peft, inject, merge_and_unload, set_adapter
from .merge import MergeReport, merge, unmerge
from .peft_io import hot_swap, load_adapter, save_adapter
from .serving import AdapterPool

__all__ = ["__version__", "build_info", "grouped_lora_linear", "lora_linear", "ops"]
__all__ += [
    "AdapterPool",
    "LoraConfig",
    "LoRALinear",
    "MergeReport",
    "combine_adapters",
    "delete_adapter",
    "disable_adapters",
    "from_peft",
    "hot_swap",
    "inject",
    "load_adapter",
    "merge",
    "merge_and_unload",
    "save_adapter",
    "set_adapter",
    "unmerge",
]
