"""Loads the compiled extension loracuda._C, which registers the torch.ops.loracuda ops.

There is no fallback: without the compiled ops loracuda cannot run, and says how to build them.
"""

import torch  # noqa: F401  (libtorch must be loaded before the extension)

try:
    from . import _C
except ImportError as error:  # pragma: no cover - exercised only on a broken install
    raise ImportError(
        "loracuda: the compiled extension loracuda._C is missing or does not load "
        f"({error}). Build it from the repository root with "
        "`pip install --no-build-isolation -e .` (or `make build`), against the torch you run."
    ) from error

__all__ = ["_C"]
