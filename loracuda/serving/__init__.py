"""Multi-LoRA serving: many adapters in one batch (AdapterPool), on the multi_shrink /
multi_expand_add_ ops. pool.py: the pool (slots, loading, batches); layer.py: the pooled layer."""

from .layer import PooledLinear
from .pool import AdapterPool

__all__ = ["AdapterPool", "PooledLinear"]
