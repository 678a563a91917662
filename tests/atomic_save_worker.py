"""Worker of tests/test_atomic_save.py: a process that imports loracuda once and then, per command
line on stdin, forks a child that saves adapters into a folder until it is killed, writing the
child's pid (and, once reaped, its exit status) on stdout.

Commands:
  loop <folder>           the child saves adapter "a" (rank 2) and "b" (rank 5) alternately, forever;
  crash <folder> <k> <x>  the child saves adapter <x> ("a" or "b") once and dies (os._exit) at the
                          k-th step of the save that writes the folder (a mkdir, fsync,
                          rename or unlink in loracuda.adapter_folder), as a kill there would.
The two adapters are built from fixed seeds by ``adapters()``; the test builds the same ones.
"""

import os
import sys

import torch

import loracuda
from loracuda import adapter_folder

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiny_models import mlp, randomize_adapters  # noqa: E402


def adapters() -> dict:
    """{"a": model with adapter rank 2, "b": model with adapter rank 5} (fixed seeds)."""
    out = {}
    for name, r, seed in (("a", 2, 21), ("b", 5, 22)):
        model = mlp()
        loracuda.inject(model, loracuda.LoraConfig(r=r, alpha=2 * r))
        randomize_adapters(model, scale_b=0.5, seed=seed)
        out[name] = model
    return out


class _DyingOs:
    """adapter_folder's view of ``os``: the k-th write-side call exits the process instead."""

    def __init__(self, k: int):
        self._k = k
        self._count = 0

    def _step(self):
        self._count += 1
        if self._count == self._k:
            os._exit(17)

    def __getattr__(self, name):
        real = getattr(os, name)
        if name in ("replace", "unlink", "fsync", "makedirs", "mkdir"):
            def wrapped(*args, **kwargs):
                self._step()
                return real(*args, **kwargs)

            return wrapped
        return real


def main() -> None:
    torch.set_num_threads(1)  # the children are forked: keep the parent free of worker threads
    models = adapters()
    for line in sys.stdin:
        parts = line.split()
        if not parts:
            continue
        pid = os.fork()
        if pid == 0:
            try:
                if parts[0] == "loop":
                    while True:
                        for name in ("a", "b"):
                            loracuda.save_adapter(models[name], parts[1])
                else:
                    adapter_folder.os = _DyingOs(int(parts[2]))
                    loracuda.save_adapter(models[parts[3]], parts[1])
                    os._exit(0)
            finally:
                os._exit(3)
        print(pid, flush=True)
        _, status = os.waitpid(pid, 0)
        print(status, flush=True)


if __name__ == "__main__":
    main()
