"""The per-model lock of the model API (see loracuda's 'Thread safety' contract in loracuda/__init__.py).

Every call that changes a model's adapters, weights or bookkeeping (inject, load_adapter, hot_swap,
merge, unmerge, delete_adapter, set_adapter, combine_adapters, merge_and_unload) and save_adapter run
under one re-entrant lock per model object, so two threads calling them on one model run one after
the other instead of interleaving (two concurrent merges would otherwise both see the adapter as not
merged and add it twice). The locks live in a weak table keyed by the model, not on the model, so a
model stays deep-copyable and picklable, and a model's lock goes away with the model.
"""

import functools
import threading
import weakref

_locks: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_table_lock = threading.Lock()


def model_lock(model) -> threading.RLock:
    """The re-entrant lock of ``model`` (created on first use)."""
    with _table_lock:
        lock = _locks.get(model)
        if lock is None:
            lock = _locks[model] = threading.RLock()
        return lock


def locked(fn):
    """Runs ``fn(model, ...)`` holding ``model_lock(model)`` (model: the first argument, or model=)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        model = args[0] if args else kwargs.get("model")
        try:
            lock = model_lock(model)
        except TypeError:  # not weak-referenceable (not a module): fn raises its own clear error
            return fn(*args, **kwargs)
        with lock:
            return fn(*args, **kwargs)

    return wrapper
