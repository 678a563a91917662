"""Builds the emulation tier of the CUDA kernels (docs/design.md, section 'Emulation tier').

Two artifacts, both cached under build/emulation/ of the repository:

- the emulated kernel library: the real csrc/cuda/*.cu compiled by the host C++ compiler as C++ against
  csrc/emulation/cuda_emulation.h (fibers, checked barriers and collectives, checked shared memory, the
  mma.sync emulation), linked with csrc/emulation/runtime.cpp and kernel_library.cpp. Objects are cached
  by the hash of their source tree and flags, so a library built from a copy of the sources with one
  planted change recompiles only what the change touches.
- the torch extension ``loracuda_emulation`` (csrc/emulation/ops.cpp): the real csrc/cuda/bindings.cpp
  for host tensors, the launchers forwarded to a kernel library loaded at run time.

Usage from the tests: ``kernel_library()`` and ``extension_path()`` return the paths (building if needed);
``load(path_of_library)`` imports the extension in this process and loads the library.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# LORACUDA_EMULATION_BUILD: another cache folder (e.g. to time a build from scratch).
BUILD = Path(os.environ.get("LORACUDA_EMULATION_BUILD", ROOT / "build" / "emulation"))
KERNEL_SOURCES = ("shrink.cu", "expand.cu", "merge.cu", "backward.cu", "multi_lora.cu", "grouped.cu")
SUPPORT_SOURCES = ("runtime.cpp", "kernel_library.cpp")
# -O1: a fraction of -O2's compile time; the emulation's cost is the fibers, not the arithmetic.
# -ffp-contract=off: no fused multiply-add the source does not write (fmaf is written where wanted).
CXX_FLAGS = ("-std=c++17", "-O1", "-g0", "-fPIC", "-ffp-contract=off", "-fno-strict-aliasing", "-DLORACUDA_EMULATION")
EXTENSION_NAME = "loracuda_emulation"


def _cxx() -> str:
    return os.environ.get("CXX", "g++")


def _tree_headers(csrc: Path) -> list[Path]:
    headers = [csrc / "dropout_hash.h"]
    for folder in (csrc / "cuda", csrc / "emulation", csrc / "emulation" / "include"):
        headers += sorted(p for p in folder.rglob("*") if p.suffix in (".h", ".cuh"))
    return headers


def _object_key(source: Path, csrc: Path) -> str:
    digest = hashlib.sha256()
    digest.update(" ".join((_cxx(),) + CXX_FLAGS).encode())
    digest.update(source.name.encode())
    digest.update(source.read_bytes())
    for header in _tree_headers(csrc):
        digest.update(header.relative_to(csrc).as_posix().encode())
        digest.update(header.read_bytes())
    return digest.hexdigest()[:20]


def _compile(source: Path, csrc: Path, objects: Path) -> Path:
    key = _object_key(source, csrc)
    target = objects / f"{source.stem}-{key}.o"
    if target.exists():
        return target
    tmp = target.with_suffix(f".{os.getpid()}.tmp.o")
    language = ["-x", "c++"] if source.suffix == ".cu" else []
    cmd = [_cxx(), *CXX_FLAGS, "-I", str(csrc / "emulation" / "include"), *language, "-c", str(source), "-o", str(tmp)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"emulation build of {source} failed:\n{' '.join(cmd)}\n{result.stderr[-6000:]}")
    os.replace(tmp, target)
    return target


def kernel_library(csrc: Path | None = None, jobs: int = 2) -> Path:
    """The emulated kernel library of the source tree ``csrc`` (default: the repository's csrc/)."""
    csrc = Path(csrc) if csrc is not None else ROOT / "csrc"
    objects = BUILD / "objects"
    objects.mkdir(parents=True, exist_ok=True)
    sources = [csrc / "cuda" / name for name in KERNEL_SOURCES] + [csrc / "emulation" / name for name in SUPPORT_SOURCES]
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        objs = list(pool.map(lambda s: _compile(s, csrc, objects), sources))
    key = hashlib.sha256("".join(o.name for o in objs).encode()).hexdigest()[:20]
    library = BUILD / f"libloracuda_emulated_kernels-{key}.so"
    if not library.exists():
        tmp = library.with_suffix(f".{os.getpid()}.tmp")
        result = subprocess.run([_cxx(), "-shared", "-o", str(tmp), *map(str, objs)], capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"emulation link failed:\n{result.stderr[-4000:]}")
        os.replace(tmp, library)
    return library


def extension_path() -> Path:
    """The torch extension's shared object (built with torch.utils.cpp_extension into build/emulation/ops)."""
    from torch.utils import cpp_extension

    build_dir = BUILD / "ops"
    build_dir.mkdir(parents=True, exist_ok=True)
    module = cpp_extension.load(
        name=EXTENSION_NAME,
        sources=[str(ROOT / "csrc" / "emulation" / "ops.cpp")],
        extra_cflags=["-O1", "-g0", "-DLORACUDA_EMULATION"],
        extra_include_paths=[str(ROOT / "csrc" / "emulation" / "include")],
        build_directory=str(build_dir),
        with_cuda=False,
        verbose=False,
    )
    return Path(module.__file__)


def load(library: Path | str, extension: Path | str | None = None):
    """The extension module, imported in this process, with ``library`` loaded as its kernels."""
    extension = Path(extension) if extension is not None else extension_path()
    module = sys.modules.get(EXTENSION_NAME)
    if module is None:
        spec = importlib.util.spec_from_file_location(EXTENSION_NAME, extension)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[EXTENSION_NAME] = module
    module.load_kernels(str(library))
    return module


def copy_sources(destination: Path) -> Path:
    """A copy of the kernel sources (csrc/cuda, csrc/emulation, csrc/dropout_hash.h) under destination;
    returns the copy's csrc folder, for kernel_library(csrc=...)."""
    csrc = Path(destination) / "csrc"
    shutil.copytree(ROOT / "csrc" / "cuda", csrc / "cuda")
    shutil.copytree(ROOT / "csrc" / "emulation", csrc / "emulation")
    shutil.copy2(ROOT / "csrc" / "dropout_hash.h", csrc / "dropout_hash.h")
    return csrc


if __name__ == "__main__":
    print(kernel_library())
    print(extension_path())
