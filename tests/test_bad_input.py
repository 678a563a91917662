"""Rejected input: each op raises an error that names an op and the offending argument (ValueError
for shapes and values, TypeError for dtypes) and leaves every tensor it was given bit for bit as it
was, the in-place outputs included. Accepted input at the edge of the contract (a row-strided y or
grad_x) is handled, not rejected."""

import pytest
import torch

import loracuda
from loracuda import reference

from conftest import FACTOR_GRADIENTS, LORA_LINEAR_OPS, assert_unchanged, assert_within_rule, snapshot, to64, use_device
from samples import BF16, F16, F32, guarded

M, K, N, R = 4, 6, 5, 2

SCHEMAS = {
    "shrink": ("x", "lora_a", "dropout_p", "seed"),
    "expand_add_": ("y", "h", "lora_b", "scale", "slice_offsets"),
    "merge_": ("weight", "lora_a", "lora_b", "scale", "transposed"),
    "restore_codes": ("weight", "lora_a", "lora_b", "scale", "transposed"),
    "unmerge_exact_": ("weight", "lora_a", "lora_b", "scale", "transposed", "codes"),
    "backward": ("grad_y", "x", "h", "lora_a", "lora_b", "scale", "dropout_p", "seed", "slice_offsets", "grad_x"),
    "lora_linear": ("x", "weight", "bias", "lora_a", "lora_b", "scale", "dropout_p", "seed", "slice_offsets"),
}


def base_args(device="cpu") -> dict:
    """A valid set of every argument name (shapes M = 4, K = 6, N = 5, r = 2), fresh each call."""
    g = torch.Generator().manual_seed(1)

    def rand(*shape, dtype=F32):
        return torch.randn(shape, generator=g).to(device=device, dtype=dtype)

    return {
        "x": rand(M, K), "lora_a": rand(R, K), "lora_b": rand(N, R), "h": rand(M, R), "y": rand(M, N),
        "weight": rand(N, K), "grad_y": rand(M, N), "grad_x": rand(M, K), "bias": rand(N),
        "codes": torch.zeros((N * K + 3) // 4, dtype=torch.uint8, device=device),
        "seed": torch.tensor([3], dtype=torch.int64), "dropout_p": 0.0, "scale": 0.5, "slice_offsets": [],
        "transposed": False,
    }


def t(*shape, dtype=F32, device="cpu"):
    return torch.randn(shape).to(device=device, dtype=dtype)


def col_major(*shape, dtype=F32):
    """A [rows, cols] tensor with strides (1, rows): unit stride along the first dim, not the last."""
    return t(*reversed(shape), dtype=dtype).t()


V, T = ValueError, TypeError

# (op, overrides, exception, argument named in the message). Overrides are functions of the base
# arguments returning the replaced ones, so every case gets fresh tensors.
CASES = [
    # shrink
    ("shrink", lambda a: {"x": t(K)}, V, "x"),
    ("shrink", lambda a: {"x": t(2, M, K)}, V, "x"),
    ("shrink", lambda a: {"x": t(M, K, dtype=torch.int32)}, T, "x"),
    ("shrink", lambda a: {"lora_a": t(R)}, V, "lora_a"),
    ("shrink", lambda a: {"lora_a": t(R, K + 1)}, V, "lora_a"),
    ("shrink", lambda a: {"lora_a": t(0, K)}, V, "lora_a"),  # r = 0
    ("shrink", lambda a: {"x": t(M, 0), "lora_a": t(R, 0)}, V, "x"),  # K = 0
    ("shrink", lambda a: {"x": t(M, K, dtype=BF16), "lora_a": t(R, K, dtype=F16)}, T, "lora_a"),
    ("shrink", lambda a: {"x": t(M, K, dtype=F16), "lora_a": t(R, K, dtype=BF16)}, T, "lora_a"),
    ("shrink", lambda a: {"x": t(M, K, dtype=F32), "lora_a": t(R, K, dtype=BF16)}, T, "lora_a"),
    ("shrink", lambda a: {"dropout_p": 1.0, "seed": a["seed"]}, V, "dropout_p"),
    ("shrink", lambda a: {"dropout_p": -0.1}, V, "dropout_p"),
    ("shrink", lambda a: {"dropout_p": float("nan")}, V, "dropout_p"),
    ("shrink", lambda a: {"dropout_p": 0.1, "seed": None}, V, "seed"),
    ("shrink", lambda a: {"dropout_p": 0.1, "seed": torch.tensor([3], dtype=torch.int32)}, T, "seed"),
    ("shrink", lambda a: {"dropout_p": 0.1, "seed": torch.tensor([3, 4])}, V, "seed"),
    # expand_add_
    ("expand_add_", lambda a: {"y": t(N)}, V, "y"),
    ("expand_add_", lambda a: {"y": t(M, N, dtype=torch.int64)}, T, "y"),
    ("expand_add_", lambda a: {"h": t(M, R, 1)}, V, "h"),
    ("expand_add_", lambda a: {"h": t(M, R, dtype=BF16)}, T, "h"),
    ("expand_add_", lambda a: {"y": t(M, N, dtype=BF16), "h": t(M, R, dtype=BF16), "lora_b": t(N, R, dtype=BF16)},
     T, "h"),
    ("expand_add_", lambda a: {"y": t(M, N, dtype=BF16), "lora_b": t(N, R, dtype=F16)}, T, "lora_b"),
    ("expand_add_", lambda a: {"lora_b": t(N + 1, R)}, V, "lora_b"),
    ("expand_add_", lambda a: {"lora_b": t(N, 0), "h": t(M, 0)}, V, "lora_b"),  # r = 0
    ("expand_add_", lambda a: {"h": t(M, R + 1)}, V, "h"),
    ("expand_add_", lambda a: {"h": t(M + 1, R)}, V, "h"),
    ("expand_add_", lambda a: {"y": col_major(M, N)}, V, "y"),  # the last dim must have unit stride
    ("expand_add_", lambda a: {"scale": float("inf")}, V, "scale"),
    ("expand_add_", lambda a: {"scale": float("nan")}, V, "scale"),
    ("expand_add_", lambda a: {"slice_offsets": [1, N]}, V, "slice_offsets"),
    ("expand_add_", lambda a: {"slice_offsets": [0, N - 1]}, V, "slice_offsets"),
    ("expand_add_", lambda a: {"slice_offsets": [N]}, V, "slice_offsets"),
    ("expand_add_", lambda a: {"slice_offsets": [0, 3, 3, N], "h": t(M, 3 * R)}, V, "slice_offsets"),
    ("expand_add_", lambda a: {"slice_offsets": [0, 3, 2, N], "h": t(M, 3 * R)}, V, "slice_offsets"),
    ("expand_add_", lambda a: {"slice_offsets": [0, 2, N]}, V, "h"),  # two slices need 2 * r columns of h
    # merge_ / restore_codes / unmerge_exact_
    ("merge_", lambda a: {"weight": col_major(N, K)}, V, "weight"),  # non-contiguous: rejected
    ("merge_", lambda a: {"weight": t(N, 2 * K)[:, :K]}, V, "weight"),
    ("merge_", lambda a: {"weight": t(N * K)}, V, "weight"),
    ("merge_", lambda a: {"weight": t(N, K, dtype=torch.int32)}, T, "weight"),
    ("merge_", lambda a: {"lora_a": t(0, K), "lora_b": t(N, 0)}, V, "lora_a"),  # r = 0
    ("merge_", lambda a: {"lora_a": t(R, K + 1)}, V, "lora_a"),
    ("merge_", lambda a: {"lora_b": t(N + 1, R)}, V, "lora_b"),
    ("merge_", lambda a: {"lora_b": t(N, R + 1)}, V, "lora_b"),
    ("merge_", lambda a: {"lora_b": t(N, R, dtype=BF16)}, T, "lora_b"),
    ("merge_", lambda a: {"weight": t(N, K, dtype=BF16), "lora_a": t(R, K, dtype=F16), "lora_b": t(N, R, dtype=F16)},
     T, "lora_a"),
    ("merge_", lambda a: {"transposed": True}, V, "lora_a"),  # [N, K] read as [K, N]: K and N swap
    ("merge_", lambda a: {"scale": float("nan")}, V, "scale"),
    ("restore_codes", lambda a: {"weight": col_major(N, K)}, V, "weight"),
    ("restore_codes", lambda a: {"lora_a": t(R, K + 1)}, V, "lora_a"),
    ("restore_codes", lambda a: {"lora_b": t(N, R, dtype=F16)}, T, "lora_b"),
    ("unmerge_exact_", lambda a: {"codes": a["codes"].to(torch.int8)}, T, "codes"),
    ("unmerge_exact_", lambda a: {"codes": torch.zeros(N * K // 4, dtype=torch.uint8)}, V, "codes"),
    ("unmerge_exact_", lambda a: {"codes": torch.zeros(2, (N * K + 3) // 8, dtype=torch.uint8)}, V, "codes"),
    ("unmerge_exact_", lambda a: {"weight": col_major(N, K)}, V, "weight"),
    # backward
    ("backward", lambda a: {"grad_y": t(M, N, dtype=BF16)}, T, "grad_y"),
    ("backward", lambda a: {"grad_y": t(M + 1, N)}, V, "grad_y"),
    ("backward", lambda a: {"grad_y": t(M * N)}, V, "grad_y"),
    ("backward", lambda a: {"x": t(M, K, dtype=torch.int32)}, T, "x"),
    ("backward", lambda a: {"h": t(M, R, dtype=F16)}, T, "h"),
    ("backward", lambda a: {"h": t(M, R + 1)}, V, "h"),
    ("backward", lambda a: {"lora_a": t(R, K + 1)}, V, "lora_a"),
    ("backward", lambda a: {"lora_a": t(0, K), "h": t(M, 0)}, V, "lora_a"),  # r = 0
    ("backward", lambda a: {"lora_b": t(N + 1, R)}, V, "lora_b"),
    ("backward", lambda a: {"x": t(M, 0), "lora_a": t(R, 0), "grad_x": t(M, 0)}, V, "x"),  # K = 0
    ("backward", lambda a: {"x": t(M, K, dtype=BF16), "grad_y": t(M, N, dtype=BF16), "lora_a": t(R, K, dtype=F16)},
     T, "lora_a"),
    ("backward", lambda a: {"slice_offsets": [0, 2, 2, N]}, V, "slice_offsets"),
    ("backward", lambda a: {"slice_offsets": [0, 2, N]}, V, "lora_a"),  # two slices need 2 * r rows of lora_a
    ("backward", lambda a: {"dropout_p": 1.5, "seed": a["seed"]}, V, "dropout_p"),
    ("backward", lambda a: {"dropout_p": 0.5, "seed": None}, V, "seed"),
    ("backward", lambda a: {"grad_x": t(M, K + 1)}, V, "grad_x"),
    ("backward", lambda a: {"grad_x": t(M, K, dtype=F16)}, T, "grad_x"),
    ("backward", lambda a: {"grad_x": col_major(M, K)}, V, "grad_x"),
    ("backward", lambda a: {"scale": float("inf")}, V, "scale"),
    # lora_linear (the op)
    ("lora_linear", lambda a: {"x": t(K)}, V, "x"),
    ("lora_linear", lambda a: {"weight": t(N, K + 1)}, V, "weight"),
    ("lora_linear", lambda a: {"weight": t(N, K, dtype=BF16)}, T, "weight"),
    ("lora_linear", lambda a: {"bias": t(N + 1)}, V, "bias"),
    ("lora_linear", lambda a: {"bias": t(N, dtype=F16)}, T, "bias"),
    ("lora_linear", lambda a: {"lora_b": t(N + 1, R)}, V, "lora_b"),
    ("lora_linear", lambda a: {"lora_a": t(R, K + 1)}, V, "lora_a"),
    ("lora_linear", lambda a: {"lora_a": t(0, K), "lora_b": t(N, 0)}, V, "lora_a"),  # r = 0
    ("lora_linear", lambda a: {"x": t(M, 0), "weight": t(N, 0), "lora_a": t(R, 0)}, V, "x"),  # K = 0
    ("lora_linear", lambda a: {"slice_offsets": [0, 2, N]}, V, "lora_a"),
    ("lora_linear", lambda a: {"slice_offsets": [0, N + 1]}, V, "slice_offsets"),
    ("lora_linear", lambda a: {"dropout_p": 1.0, "seed": a["seed"]}, V, "dropout_p"),
    ("lora_linear", lambda a: {"dropout_p": 0.1, "seed": None}, V, "seed"),
]

# Arguments placed on a second device, one case per op: the op must name the argument on the wrong device.
DEVICE_CASES = [
    ("shrink", "lora_a"),
    ("expand_add_", "h"),
    ("expand_add_", "lora_b"),
    ("merge_", "lora_a"),
    ("merge_", "lora_b"),
    ("restore_codes", "lora_b"),
    ("unmerge_exact_", "codes"),
    ("backward", "h"),
    ("backward", "lora_a"),
    ("backward", "grad_x"),
    ("lora_linear", "weight"),
    ("lora_linear", "bias"),
]


def _call(op: str, args: dict):
    return getattr(torch.ops.loracuda, op)(*(args[name] for name in SCHEMAS[op]))


def _expect_rejection(op, args, exc, arg):
    tensors = {n: v for n, v in args.items() if isinstance(v, torch.Tensor) and n in SCHEMAS[op]}
    before = snapshot(tensors)
    with pytest.raises(exc, match=rf"loracuda\.{op}: argument '{arg}'"):
        _call(op, args)
    assert_unchanged(before, tensors, f"{op} after rejecting '{arg}'")


def _id(case):
    op, _, exc, arg = case
    return f"{op}-{arg}-{exc.__name__}"


def _on(value, device: torch.device):
    """value moved to device with its strides and storage offset kept (views stay views of a buffer)."""
    if not isinstance(value, torch.Tensor) or value.device == device:
        return value
    base = value if value._base is None else value._base
    return base.to(device).as_strided(value.size(), value.stride(), value.storage_offset())


@pytest.mark.parametrize("case", CASES, ids=[f"{_id(c)}-{i}" for i, c in enumerate(CASES)])
def test_rejected(device, case):
    op, overrides, exc, arg = case
    use_device(device.type, *(LORA_LINEAR_OPS if op == "lora_linear" else (op,)))
    args = base_args()
    args.update(overrides(args))
    # Every tensor on the device under test; the seed stays on the CPU, where it may always live.
    args = {n: v if n == "seed" else _on(v, device) for n, v in args.items()}
    _expect_rejection(op, args, exc, arg)


@pytest.mark.parametrize("other", ("meta", pytest.param("cuda", marks=pytest.mark.cuda)))
@pytest.mark.parametrize("op, arg", DEVICE_CASES, ids=[f"{o}-{a}" for o, a in DEVICE_CASES])
def test_rejected_device_mix(op, arg, other):
    """One argument on another device than the rest (CPU): meta is enough without a GPU; with one,
    the argument on the GPU reaches the CUDA kernel's checks."""
    ops = LORA_LINEAR_OPS if op == "lora_linear" else (op,)
    if other == "cuda":
        use_device("cuda", *ops)
    use_device("cpu", *ops)
    args = base_args()
    args[arg] = args[arg].to(other)
    _expect_rejection(op, args, ValueError, arg)


def test_functional_rejects_bad_dropout_p_and_rank(device):
    use_device(device.type, *LORA_LINEAR_OPS)
    a = base_args(device)
    for p in (1.0, -0.5, 2.0):
        for training in (True, False):  # an invalid p is an error in eval mode too, not silently ignored
            before = snapshot({"x": a["x"]})
            with pytest.raises(ValueError, match=r"loracuda\.lora_linear: argument 'dropout_p'"):
                loracuda.lora_linear(a["x"], a["weight"], a["bias"], a["lora_a"], a["lora_b"], 1.0, dropout_p=p,
                                     training=training)
            assert_unchanged(before, {"x": a["x"]})
    with pytest.raises(ValueError, match=r"loracuda\.lora_linear: argument 'x'"):
        loracuda.lora_linear(torch.tensor(1.0, device=device), a["weight"], a["bias"], a["lora_a"], a["lora_b"], 1.0)


@pytest.mark.parametrize("layout", ("contiguous", "padded"))
def test_strided_y_and_grad_x_are_handled(device, layout):
    """Row-strided y (expand_add_) and grad_x (backward) are accepted and updated in place, with the
    buffer around them untouched (for layout "contiguous", a contiguous stretch of a larger buffer)."""
    use_device(device.type, "expand_add_", "backward")
    a = base_args(device)
    y = guarded(a["y"], layout, device, F32)
    y0 = y.view.clone()
    torch.ops.loracuda.expand_add_(y.view, a["h"], a["lora_b"], 0.5, [])
    assert_within_rule("strided y", y.view, reference.expand_add(y0, a["h"], a["lora_b"], 0.5),
                       reference.expand_add(to64(y0), to64(a["h"]), to64(a["lora_b"]), 0.5))
    assert y.changed_outside() == 0

    grad_x = guarded(a["grad_x"], layout, device, F32)
    gx0 = grad_x.view.clone()
    lora_args = (a["grad_y"], a["x"], a["h"], a["lora_a"], a["lora_b"], 0.5)
    torch.ops.loracuda.backward(*lora_args, 0.0, None, [], grad_x.view)
    plain = gx0 + reference.backward(*lora_args)[2]
    ref64 = to64(gx0) + reference.backward(*(to64(v) if isinstance(v, torch.Tensor) else v for v in lora_args))[2]
    assert_within_rule("strided grad_x", grad_x.view, plain, ref64, FACTOR_GRADIENTS)
    assert grad_x.changed_outside() == 0
