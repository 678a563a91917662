"""torch.library.opcheck for the single-adapter loracuda ops on a few samples each (the multi-LoRA ops,
multi_shrink and multi_expand_add_, are opchecked in tests/test_multi_lora_ops.py): the schema (mutation and
aliasing as declared), the fake implementation (shapes, dtypes, strides of real outputs), the
autograd registration, and AOT dispatch with dynamic shapes."""

import pytest
import torch

from loracuda import ops

from conftest import LORA_LINEAR_OPS, device_cases, use_device
from samples import (
    BACKWARD_CASES,
    EXPAND_CASES,
    LORA_LINEAR_CASES,
    MERGE_CASES,
    SHRINK_CASES,
    backward_sample,
    expand_add_sample,
    lora_linear_sample,
    merge_sample,
    pick,
    shrink_sample,
)

PER_OP = 4  # samples per op and device: opcheck runs each op several times under several modes


def _opcheck(op_name: str, args) -> None:
    torch.library.opcheck(getattr(torch.ops.loracuda, op_name).default, tuple(args))


@pytest.mark.parametrize("device_name, case", device_cases(pick(SHRINK_CASES, PER_OP)))
def test_shrink(device_name, case):
    _opcheck("shrink", shrink_sample(case, use_device(device_name, "shrink")).args)


@pytest.mark.parametrize("device_name, case", device_cases(pick(EXPAND_CASES, PER_OP)))
def test_expand_add(device_name, case):
    _opcheck("expand_add_", expand_add_sample(case, use_device(device_name, "expand_add_")).args)


@pytest.mark.parametrize("device_name, case", device_cases(pick(MERGE_CASES, PER_OP)))
def test_merge_family(device_name, case):
    device = use_device(device_name, "merge_", "restore_codes", "unmerge_exact_")
    args = merge_sample(case, device).args
    _opcheck("restore_codes", args)
    codes = ops.restore_codes(*args)
    _opcheck("merge_", args)
    weight, lora_a, lora_b, scale, transposed = args
    _opcheck("unmerge_exact_", (weight, lora_a, lora_b, scale, transposed, codes))


@pytest.mark.parametrize("device_name, case", device_cases(pick(BACKWARD_CASES, PER_OP)))
def test_backward(device_name, case):
    _opcheck("backward", backward_sample(case, use_device(device_name, "backward")).args)


@pytest.mark.parametrize("requires_grad", (False, True))
@pytest.mark.parametrize("device_name, case", device_cases(pick(LORA_LINEAR_CASES, PER_OP)))
def test_lora_linear(device_name, case, requires_grad):
    """With requires_grad, opcheck also checks that autograd is registered and that AOT dispatch
    traces the backward."""
    args = list(lora_linear_sample(case, use_device(device_name, *LORA_LINEAR_OPS)).args)
    if requires_grad:
        for i in (0, 2, 3, 4):  # x, bias, lora_a, lora_b; weight stays frozen
            if args[i] is not None:
                args[i] = args[i].detach().requires_grad_(True)
    _opcheck("lora_linear", args)


@pytest.mark.parametrize("device_name, case", device_cases(pick(MERGE_CASES, PER_OP)))
def test_merge_exact(device_name, case):
    """merge_exact_'s second output has a data-dependent length (a dynamic size in its fake); opcheck
    runs its schema, fake, autograd-registration and AOT-dispatch tests on it. unmerge_exact_ is
    checked with the record it returns."""
    device = use_device(device_name, "merge_exact_", "unmerge_exact_")
    args = merge_sample(case, device).args
    weight, lora_a, lora_b, scale, transposed = args
    _opcheck("merge_exact_", (weight, lora_a, lora_b, scale, transposed, -1))
    codes, values = ops.merge_exact_(weight.clone(), lora_a, lora_b, scale, transposed)
    _opcheck("unmerge_exact_", (weight, lora_a, lora_b, scale, transposed, codes, values))
