"""loracuda: hand-written CUDA and C++ kernels for LoRA, with autograd, model patching and PEFT files.

The ops live under torch.ops.loracuda (typed wrappers in loracuda.ops); loracuda.lora_linear is the
differentiable layer call; loracuda.build_info() says what this build can run on.

Thread safety (the contract; docs/design.md, section 'Thread safety'):
- Forwards (and backwards) of one model may run concurrently in several threads, as long as no thread
  changes the model meanwhile.
- AdapterPool: each thread may open its own ``pool.batch(ids)``; the ids are per thread, so a forward
  sees the ids of the batch its own thread opened (the base model outside one). ``pool.load`` /
  ``pool.unload`` wait until no batch is open in any thread and hold off new batches while they run;
  calling them inside a batch of the same thread is an error.
- The calls that change a model (inject, load_adapter, hot_swap, merge, unmerge, delete_adapter,
  set_adapter, combine_adapters, merge_and_unload) and save_adapter take a per-model re-entrant lock
  (loracuda.model_lock), so concurrent calls on one model run one after the other: merging from two
  threads merges once. The lock does not cover forwards: changing a model while another thread runs it
  forward is the caller's to avoid, as for any PyTorch module.
- save_adapter and the loaders (load_adapter, hot_swap, AdapterPool.load) take a file lock (flock) on
  the adapter folder, so concurrent saves and loads of one folder, from threads or processes, see one
  whole adapter each.
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
from .integrations import apply_to_peft, remove_from_peft, to_peft

__all__ = ["__version__", "build_info", "grouped_lora_linear", "lora_linear", "ops"]
__all__ += [
    "AdapterPool",
    "apply_to_peft",
    "remove_from_peft",
    "to_peft",
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
