"""loracuda: hand-written CUDA and C++ kernels for LoRA, with autograd, model patching and PEFT files.

The ops live under torch.ops.loracuda (typed wrappers in loracuda.ops); loracuda.lora_linear is the
differentiable layer call; loracuda.build_info() says what this build can run on.
"""

from . import ops
from .buildinfo import build_info
from .functional import lora_linear
from .version import __version__

__all__ = ["__version__", "build_info", "lora_linear", "ops"]
