"""How a benchmark case is defined, and the registry of suites: the one way to add a measurement.

A ``Case`` is one op, layer mode or model step at one shape and dtype, with the bytes it must move
and the FLOPs it must do (docs/design.md, section 'Math and memory passes') and a ``make()`` that
allocates its tensors and returns provider name -> ``providers.Bench``. ``make`` runs only when the
case is measured, so one case's tensors are alive at a time. A suite is a function
``build(ctx) -> list[Case]`` registered with ``@register_suite(name, description)``; the suite
modules are listed in ``SUITE_MODULES`` and imported on first use.
"""

import importlib
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .ceilings import dtype_name


@dataclass(frozen=True)
class SuiteContext:
    """What a suite builds for: device, dtype, --quick (fewer shapes), tiny (tests: seconds, not
    minutes) and whether PEFT is installed."""

    device: torch.device
    dtype: torch.dtype
    quick: bool = False
    tiny: bool = False
    with_peft: bool = True


@dataclass
class Case:
    """One measured thing. ``make()`` allocates the tensors and returns provider -> Bench."""

    suite: str
    op: str
    shape: dict
    dtype: torch.dtype
    bytes: float  # bytes read + written by the case's formulas (docs/design.md, 'Math and memory passes')
    flops: float  # multiply-adds count 2
    make: Callable[[], dict]
    baseline: Optional[str] = None  # the provider the case reports ratios to ("base", "peft")
    measure_memory: bool = False
    target: Optional[float] = None  # the project's goal for loracuda's ratio to the baseline
    notes: list = field(default_factory=list)

    @property
    def case_id(self) -> str:
        dims = " ".join(f"{k}={v}" for k, v in self.shape.items())
        return f"{self.suite}/{self.op} {dims} {dtype_name(self.dtype)}"


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    build: Callable[[SuiteContext], list]


_SUITES: dict[str, Suite] = {}
# The modules that define suites, in the order `loracuda bench --suite all` runs them.
SUITE_MODULES: tuple[str, ...] = ("bench.suites.ops", "bench.suites.layer", "bench.suites.train",
                                  "bench.suites.serving", "bench.suites.multi_lora")


def register_suite(name: str, description: str):
    """Decorator: registers ``build(ctx) -> list[Case]`` as the suite ``name``."""

    def wrap(build: Callable[[SuiteContext], list]) -> Callable[[SuiteContext], list]:
        if name in _SUITES or name == "all":
            raise ValueError(f"benchmark suite {name!r} is already registered")
        _SUITES[name] = Suite(name, description, build)
        return build

    return wrap


def suites() -> dict[str, Suite]:
    """Every registered suite by name, in SUITE_MODULES order."""
    for module in SUITE_MODULES:
        importlib.import_module(module)
    return dict(_SUITES)


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def randn(shape, dtype, device, generator, scale=1.0) -> torch.Tensor:
    return (torch.randn(shape, generator=generator, device=device) * scale).to(dtype)


def generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)
