"""Test helpers shared by every test module: devices and kernel-availability skips, bitwise snapshots,
poisoned allocations, and the tolerance rule (docs/design.md, section 'Tolerance rule').

Devices: every test runs on "cpu" and "cuda". The CUDA cases carry pytest.mark.cuda and are skipped,
with the reason in the report, when no GPU is visible or when the op's CUDA kernel is not
registered; they never pass without running. A missing CPU kernel is a failure, not a skip: the CPU
path is what the project always ships.
"""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
from torch import Tensor

import loracuda  # noqa: F401  (registers torch.ops.loracuda)
from loracuda.buildinfo import has_kernel

from samples import DTYPE_NAMES, F64, Case, bit_pattern

DEVICES = ("cpu", pytest.param("cuda", marks=pytest.mark.cuda))


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    """A device to run on; the CUDA parameter skips when no GPU is visible."""
    return use_device(request.param)


def use_device(name: str, *ops: str) -> torch.device:
    """torch.device(name) after the availability checks: skip CUDA without a GPU or without the CUDA
    kernels of ``ops``; fail on CPU when a CPU kernel is missing."""
    if name == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("CUDA case: no GPU is visible")
        missing = [op for op in ops if not has_kernel(op, "CUDA")]
        if missing:
            pytest.skip(f"CUDA case: no CUDA kernel registered for loracuda.{', loracuda.'.join(missing)}")
    else:
        missing = [op for op in ops if not has_kernel(op, "CPU")]
        if missing:
            pytest.fail(f"no CPU kernel registered for loracuda.{', loracuda.'.join(missing)}")
    return torch.device(name)


# lora_linear's CPU/CUDA kernel is the composite of these, and its backward calls loracuda.backward.
LORA_LINEAR_OPS = ("lora_linear", "shrink", "expand_add_", "backward")


def device_cases(cases: list[Case]) -> list:
    """pytest params (device name, case) for every device; float64 cases only on the CPU (the kernels
    take float64 on the CPU alone, for gradcheck)."""
    params = []
    for case in cases:
        params.append(pytest.param("cpu", case, id=f"cpu-{case}"))
        if case.dtype != F64:
            params.append(pytest.param("cuda", case, id=f"cuda-{case}", marks=pytest.mark.cuda))
    return params


# ---- bitwise snapshots --------------------------------------------------------------------------


def snapshot(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """The bits of every tensor that has storage (meta tensors have none)."""
    return {name: bit_pattern(t) for name, t in tensors.items() if isinstance(t, Tensor) and t.device.type != "meta"}


def assert_unchanged(before: dict[str, Tensor], tensors: dict[str, Tensor], context: str = "") -> None:
    for name, bits in before.items():
        now = bit_pattern(tensors[name])
        changed = int((now != bits).sum())
        assert changed == 0, f"{context}: input '{name}' changed in {changed} of {bits.numel()} elements"


def assert_guards_intact(sample) -> None:
    for name, guard in sample.guards.items():
        changed = guard.changed_outside()
        assert changed == 0, f"{sample.op} [{sample.case}]: {changed} guard elements around '{name}' were written"


@contextlib.contextmanager
def poisoned_allocations():
    """Every tensor allocated without initial values (torch.empty, at::empty in the kernels) is filled
    with NaN (integers: their maximum), so an output element a kernel forgets to write shows up.
    Uses torch's deterministic mode with its fill of uninitialised memory; warn_only, so ops without
    a deterministic implementation still run, and their warnings are silenced here."""
    previous = torch.are_deterministic_algorithms_enabled()
    previous_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    previous_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            yield
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=previous_warn)
        torch.utils.deterministic.fill_uninitialized_memory = previous_fill


# ---- the tolerance rule (docs/design.md, section 'Tolerance rule') ----------------------------------------

# Unit roundoff u = 2^-p of each dtype's p-bit significand: the largest relative error of one
# rounding to nearest.
UNIT_ROUNDOFF = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}

# The absolute floor of the rule, in units of u(result dtype) * ||ref64||: a result within two
# roundings of the exact one passes even where plain PyTorch happens to be exact (K = 1, r = 1, a
# single element). One correctly rounded result is off by at most u * ||ref64|| in norm.
FLOOR_ROUNDINGS = 2.0
FACTOR_VALUES = 2.0  # kernel error / plain-PyTorch error, forward values
FACTOR_GRADIENTS = 3.0  # the same for gradients


def assert_within_rule(what: str, got: Tensor, plain: Tensor, ref64: Tensor, factor: float = FACTOR_VALUES) -> None:
    """||got - ref64|| <= factor * ||plain - ref64|| + FLOOR_ROUNDINGS * u(got.dtype) * ||ref64||.

    got: the kernel's result; plain: loracuda.reference on the same (same-dtype) inputs; ref64:
    loracuda.reference on float64 copies of those inputs. Norms are Frobenius norms in float64.
    """
    assert got.shape == ref64.shape, f"{what}: shape {tuple(got.shape)}, expected {tuple(ref64.shape)}"
    got64 = got.detach().to(device=ref64.device, dtype=torch.float64)
    bad = int((~torch.isfinite(got64)).sum())
    assert bad == 0, f"{what}: {bad} of {got64.numel()} elements are not finite (unwritten or out-of-bounds reads?)"
    ref_norm = float(torch.linalg.vector_norm(ref64))
    err = float(torch.linalg.vector_norm(got64 - ref64))
    err_plain = float(torch.linalg.vector_norm(plain.detach().to(device=ref64.device, dtype=torch.float64) - ref64))
    floor = FLOOR_ROUNDINGS * UNIT_ROUNDOFF[got.dtype] * ref_norm
    bound = factor * err_plain + floor
    assert err <= bound, (
        f"{what} ({DTYPE_NAMES.get(got.dtype, got.dtype)}): ||kernel - ref64|| = {err:.3e} > "
        f"{factor} * ||plain - ref64|| ({err_plain:.3e}) + floor {floor:.3e}; ||ref64|| = {ref_norm:.3e}"
    )


def assert_exact(what: str, got: Tensor, ref64: Tensor) -> None:
    """Exact: got equals ref64 rounded to got's dtype, where ref64 must itself be representable
    (the test's inputs were chosen so; a failure of that check is a defect of the test)."""
    assert got.shape == ref64.shape, f"{what}: shape {tuple(got.shape)}, expected {tuple(ref64.shape)}"
    expected = ref64.to(got.dtype)
    assert torch.equal(expected.to(torch.float64), ref64), f"{what}: test defect, reference not representable"
    # Values, not bits: -0 and +0 are the same exact result (a sum's sign of zero is order-dependent).
    bad = int((~torch.isfinite(got.detach().to(torch.float64))).sum())
    assert bad == 0, f"{what}: {bad} of {got.numel()} elements are not finite (unwritten or out-of-bounds reads?)"
    mismatch = int((got.detach() != expected.to(got.device)).sum())
    assert mismatch == 0, f"{what}: {mismatch} of {got.numel()} elements differ from the exact result"


def check_result(what: str, case: Case, got: Tensor, plain: Tensor, ref64: Tensor,
                 factor: float = FACTOR_VALUES) -> None:
    """Exact equality where the case's math is exact, the tolerance rule otherwise."""
    if case.exact:
        assert_exact(what, got, ref64)
    else:
        assert_within_rule(what, got, plain, ref64, factor)


def to64(t):
    """A float64 copy of a tensor (None passes through)."""
    return None if t is None else t.detach().to(torch.float64)
