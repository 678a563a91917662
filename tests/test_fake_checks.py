"""The fake (meta) implementations check what the kernels check: for each op, arguments that do not
fit together (K, R, N, slices, ranks, dtypes) make the fake raise the same exception type with the
same message as the CPU kernel, so under torch.compile a mismatch fails while tracing."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import loracuda  # noqa: F401  (registers the ops)

ops = torch.ops.loracuda
F32, BF16 = torch.float32, torch.bfloat16


def t(*shape, dtype=F32):
    return torch.randn(*shape).to(dtype) if dtype.is_floating_point else torch.zeros(*shape, dtype=dtype)


def seed():
    return torch.tensor([7], dtype=torch.int64)


# (op name, argument builder) of calls the kernels refuse. Each builder returns fresh tensors.
BAD = [
    ("shrink", "K mismatch", lambda: (ops.shrink, (t(5, 8), t(2, 9), 0.0, None))),
    ("shrink", "lora_a 3-D", lambda: (ops.shrink, (t(5, 8), t(1, 2, 8), 0.0, None))),
    ("shrink", "adapter dtype", lambda: (ops.shrink, (t(5, 8, dtype=BF16), t(2, 8, dtype=torch.float16), 0.0, None))),
    ("shrink", "int x", lambda: (ops.shrink, (t(5, 8, dtype=torch.int32), t(2, 8), 0.0, None))),
    ("shrink", "dropout without seed", lambda: (ops.shrink, (t(5, 8), t(2, 8), 0.1, None))),
    ("shrink", "dropout p = 1", lambda: (ops.shrink, (t(5, 8), t(2, 8), 1.0, seed()))),
    ("expand_add_", "N mismatch", lambda: (ops.expand_add_, (t(5, 6), t(5, 2), t(7, 2), 1.0, []))),
    ("expand_add_", "M mismatch", lambda: (ops.expand_add_, (t(5, 6), t(4, 2), t(6, 2), 1.0, []))),
    ("expand_add_", "h columns vs slices", lambda: (ops.expand_add_, (t(5, 6), t(5, 2), t(6, 2), 1.0, [0, 3, 6]))),
    ("expand_add_", "slices not to N", lambda: (ops.expand_add_, (t(5, 6), t(5, 4), t(6, 2), 1.0, [0, 3, 5]))),
    ("expand_add_", "slices not increasing", lambda: (ops.expand_add_, (t(5, 6), t(5, 4), t(6, 2), 1.0, [0, 0, 6]))),
    ("expand_add_", "h dtype", lambda: (ops.expand_add_, (t(5, 6, dtype=BF16), t(5, 2, dtype=BF16), t(6, 2), 1.0, []))),
    ("merge_", "K mismatch", lambda: (ops.merge_, (t(6, 8), t(2, 9), t(6, 2), 1.0, False))),
    ("merge_", "rank mismatch", lambda: (ops.merge_, (t(6, 8), t(2, 8), t(6, 3), 1.0, False))),
    ("merge_", "transposed layout", lambda: (ops.merge_, (t(6, 8), t(2, 8), t(6, 2), 1.0, True))),
    ("merge_", "factor dtypes differ", lambda: (ops.merge_, (t(6, 8, dtype=BF16), t(2, 8, dtype=BF16), t(6, 2), 1.0, False))),
    ("restore_codes", "N mismatch", lambda: (ops.restore_codes, (t(6, 8), t(2, 8), t(5, 2), 1.0, False))),
    ("merge_exact_", "K mismatch", lambda: (ops.merge_exact_, (t(6, 8), t(2, 7), t(6, 2), 1.0, False, -1))),
    ("unmerge_exact_", "codes size", lambda: (ops.unmerge_exact_, (t(6, 8), t(2, 8), t(6, 2), 1.0, False,
                                                                   t(5, dtype=torch.uint8), None))),
    ("unmerge_exact_", "codes dtype", lambda: (ops.unmerge_exact_, (t(6, 8), t(2, 8), t(6, 2), 1.0, False,
                                                                    t(12, dtype=torch.int32), None))),
    ("backward", "h columns", lambda: (ops.backward, (t(5, 6), t(5, 8), t(5, 3), t(2, 8), t(6, 2), 1.0, 0.0, None,
                                                      [], None))),
    ("backward", "slices vs rank", lambda: (ops.backward, (t(5, 6), t(5, 8), t(5, 2), t(2, 8), t(6, 2), 1.0, 0.0,
                                                           None, [0, 3, 6], None))),
    ("backward", "grad_y rows", lambda: (ops.backward, (t(4, 6), t(5, 8), t(5, 2), t(2, 8), t(6, 2), 1.0, 0.0, None,
                                                        [], None))),
    ("backward", "grad_x shape", lambda: (ops.backward, (t(5, 6), t(5, 8), t(5, 2), t(2, 8), t(6, 2), 1.0, 0.0, None,
                                                         [], t(5, 7)))),
    ("lora_linear", "weight K", lambda: (ops.lora_linear, (t(5, 8), t(6, 9), None, t(2, 8), t(6, 2), 1.0, 0.0, None,
                                                           []))),
    ("lora_linear", "lora_b N", lambda: (ops.lora_linear, (t(5, 8), t(6, 8), None, t(2, 8), t(7, 2), 1.0, 0.0, None,
                                                           []))),
    ("lora_linear", "bias N", lambda: (ops.lora_linear, (t(5, 8), t(6, 8), t(5), t(2, 8), t(6, 2), 1.0, 0.0, None,
                                                         []))),
    ("lora_linear", "slices vs rank", lambda: (ops.lora_linear, (t(5, 8), t(6, 8), None, t(2, 8), t(6, 2), 1.0, 0.0,
                                                                 None, [0, 2, 6]))),
    ("multi_shrink", "K mismatch", lambda: (ops.multi_shrink, (t(5, 8), t(3, 2, 9), t(3, dtype=torch.int32),
                                                               t(5, dtype=torch.int32), 1))),
    ("multi_shrink", "ranks length", lambda: (ops.multi_shrink, (t(5, 8), t(3, 2, 8), t(2, dtype=torch.int32),
                                                                 t(5, dtype=torch.int32), 1))),
    ("multi_shrink", "ids dtype", lambda: (ops.multi_shrink, (t(5, 8), t(3, 2, 8), t(3, dtype=torch.int32),
                                                              t(5, dtype=torch.int64), 1))),
    ("multi_shrink", "num_slices", lambda: (ops.multi_shrink, (t(5, 8), t(3, 3, 8), t(3, dtype=torch.int32),
                                                               t(5, dtype=torch.int32), 2))),
    ("multi_expand_add_", "N mismatch", lambda: (ops.multi_expand_add_, (t(5, 6), t(5, 2), t(3, 7, 2), t(3),
                                                                         t(3, dtype=torch.int32),
                                                                         t(5, dtype=torch.int32), []))),
    ("multi_expand_add_", "scales dtype", lambda: (ops.multi_expand_add_, (t(5, 6), t(5, 2), t(3, 6, 2),
                                                                           t(3, dtype=torch.float64),
                                                                           t(3, dtype=torch.int32),
                                                                           t(5, dtype=torch.int32), []))),
    ("multi_expand_add_", "ids length", lambda: (ops.multi_expand_add_, (t(5, 6), t(5, 2), t(3, 6, 2), t(3),
                                                                         t(3, dtype=torch.int32),
                                                                         t(4, dtype=torch.int32), []))),
]


def _error(fn, args):
    with pytest.raises((ValueError, TypeError, RuntimeError)) as info:
        fn(*args)
    return type(info.value), str(info.value).splitlines()[0]


def _fake(args, mode):
    def convert(a):
        return mode.from_tensor(a) if isinstance(a, torch.Tensor) else a

    return tuple(convert(a) for a in args)


@pytest.mark.parametrize("op,what,build", BAD, ids=[f"{op}-{what}" for op, what, _ in BAD])
def test_fake_raises_what_the_kernel_raises(op, what, build):
    fn, args = build()
    kernel_type, kernel_message = _error(fn, args)
    assert kernel_type in (ValueError, TypeError), (kernel_type, kernel_message)
    assert kernel_message.startswith(f"loracuda.{op}: argument '"), kernel_message
    fn, args = build()
    with FakeTensorMode() as mode:
        fake_type, fake_message = _error(fn, _fake(args, mode))
    assert (fake_type, fake_message) == (kernel_type, kernel_message)


@pytest.mark.parametrize("op", sorted({op for op, _, _ in BAD}))
def test_every_op_has_a_mismatch_case(op):
    assert op in {o for o, _, _ in BAD}


def test_fakes_accept_what_the_kernels_accept():
    """The checks are not stricter than the kernels: valid calls, slices and dropout included, trace."""
    with FakeTensorMode() as mode:
        f = mode.from_tensor
        assert ops.shrink(f(t(5, 8, dtype=BF16)), f(t(4, 8)), 0.1, f(seed())).shape == (5, 4)
        ops.expand_add_(f(t(5, 6)), f(t(5, 4)), f(t(6, 2)), 1.0, [0, 3, 6])
        ops.merge_(f(t(8, 6)), f(t(2, 8)), f(t(6, 2)), 1.0, True)
        grads = ops.backward(f(t(5, 6)), f(t(5, 8)), f(t(5, 4)), f(t(4, 8)), f(t(6, 2)), 1.0, 0.0, None, [0, 2, 6],
                             f(t(5, 8)))
        assert grads[0].shape == (4, 8) and grads[1].shape == (6, 2)
        y, h = ops.lora_linear(f(t(5, 8)), f(t(6, 8)), f(t(6)), f(t(2, 8)), f(t(6, 2)), 1.0, 0.0, None, [])
        assert y.shape == (5, 6) and h.shape == (5, 2)
        ids = f(t(5, dtype=torch.int32))
        h = ops.multi_shrink(f(t(5, 8)), f(t(3, 4, 8)), f(t(3, dtype=torch.int32)), ids, 2)
        ops.multi_expand_add_(f(t(5, 6)), h, f(t(3, 6, 2)), f(t(3)), f(t(3, dtype=torch.int32)), ids, [0, 3, 6])


def test_compile_fails_while_tracing_on_a_mismatch():
    def step(x, a):
        return loracuda.ops.shrink(x, a) * 2

    compiled = torch.compile(step, backend="eager", fullgraph=True)
    try:
        with pytest.raises(Exception) as info:
            compiled(t(5, 8), t(2, 9))
    finally:
        torch._dynamo.reset()
    # Raised by dynamo while it traced (fake tensors), not by the kernel at run time.
    assert "torch._dynamo" in type(info.value).__module__, type(info.value)
    assert "loracuda.shrink: argument 'lora_a' must be [R, K] with K = 8 (from 'x'), got shape [2, 9]" in str(info.value)
