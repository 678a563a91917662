"""Quick checks of the CPU kernels against loracuda/reference.py on a few shapes.

Tolerance (docs/design.md, section 'Tolerance rule'): the kernel's error against a float64 reference is at most 2x
(3x for
gradients) the error of plain PyTorch computing the same thing in the same dtype. A floor of a few
units of float64 rounding covers results that plain PyTorch happens to get exactly right.
"""

import pytest
import torch

from loracuda import ops, reference as ref

VALUE_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def err(got, want):
    return (got.double() - want.double()).abs().max().item() if got.numel() else 0.0


def assert_close_rule(got, plain, exact, factor=2.0):
    floor = 8 * torch.finfo(torch.float64).eps * max(1.0, exact.abs().max().item() if exact.numel() else 0.0)
    assert err(got, exact) <= factor * err(plain, exact) + floor, (err(got, exact), err(plain, exact))


def randn(*shape, dtype, gen, scale=1.0):
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


@pytest.mark.parametrize("dtype", VALUE_DTYPES)
@pytest.mark.parametrize("m,k,r", [(0, 5, 3), (1, 7, 1), (127, 33, 16), (300, 257, 8)])
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_shrink(dtype, m, k, r, p):
    gen = torch.Generator().manual_seed(m * 1000 + k)
    x = randn(m, 2 * k, dtype=dtype, gen=gen)[:, ::2]  # strided columns
    a = randn(r, k, dtype=dtype, gen=gen)
    h = ops.shrink(x, a, p, 1234)
    assert h.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and h.shape == (m, r)
    exact = ref.shrink(x.double(), a.double(), p, 1234)
    assert_close_rule(h, ref.shrink(x, a, p, 1234), exact)


def test_shrink_dropout_mask_exact():
    # Integer-valued inputs and p = 0.5 (keep_scale = 2): every product and sum is exact.
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(-4, 5, (67, 45), generator=gen).float()
    a = torch.randint(-4, 5, (3, 45), generator=gen).float()
    assert torch.equal(ops.shrink(x, a, 0.5, 99), ref.shrink(x, a, 0.5, 99))
    assert not torch.equal(ops.shrink(x, a, 0.5, 99), ops.shrink(x, a, 0.5, 100))


@pytest.mark.parametrize("dtype", VALUE_DTYPES)
@pytest.mark.parametrize("m,offsets,r", [(0, [0, 6], 2), (3, [0, 5], 1), (129, [0, 40, 48, 75], 16)])
def test_expand_add(dtype, m, offsets, r):
    gen = torch.Generator().manual_seed(m)
    n, s = offsets[-1], len(offsets) - 1
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    big = randn(m, n + 9, dtype=dtype, gen=gen)
    y = big[:, 4 : 4 + n]  # strided rows, guard columns on both sides
    y0, guard = y.clone(), big.clone()
    h = randn(m, s * r, dtype=acc, gen=gen)
    b = randn(n, r, dtype=dtype, gen=gen)
    ops.expand_add_(y, h, b, 0.75, offsets)
    exact = ref.expand_add(y0.double(), h.double(), b.double(), 0.75, offsets)
    assert_close_rule(y, ref.expand_add(y0, h, b, 0.75, offsets), exact)
    assert torch.equal(big[:, :4], guard[:, :4]) and torch.equal(big[:, 4 + n :], guard[:, 4 + n :])


@pytest.mark.parametrize("dtype", VALUE_DTYPES)
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("n,k,r", [(1, 1, 1), (37, 53, 5), (64, 130, 16)])
def test_merge(dtype, transposed, n, k, r):
    gen = torch.Generator().manual_seed(n * k)
    w = randn(*((k, n) if transposed else (n, k)), dtype=dtype, gen=gen)
    a, b = randn(r, k, dtype=dtype, gen=gen), randn(n, r, dtype=dtype, gen=gen)
    w0 = w.clone()
    ops.merge_(w, a, b, 0.5, transposed)
    exact = ref.merge(w0.double(), a.double(), b.double(), 0.5, transposed)
    assert_close_rule(w, ref.merge(w0, a, b, 0.5, transposed), exact)


def unpack_codes(codes, numel):
    shifts = torch.arange(4, dtype=torch.uint8) * 2
    return ((codes.unsqueeze(1) >> shifts) & 3).flatten()[:numel]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("transposed", [False, True])
def test_merge_unmerge_exact_cycles(dtype, transposed):
    # An adapter large enough to change most elements; 50 merge -> unmerge cycles restore the bits.
    gen = torch.Generator().manual_seed(7)
    n, k, r = 45, 67, 8  # 45 * 67 elements: codes straddle rows and the last byte is partial
    w = randn(*((k, n) if transposed else (n, k)), dtype=dtype, gen=gen)
    original = w.clone()
    changed = 0
    for cycle in range(50):
        a, b = randn(r, k, dtype=dtype, gen=gen, scale=0.3), randn(n, r, dtype=dtype, gen=gen, scale=0.3)
        codes = ops.restore_codes(w, a, b, 0.8, transposed)
        assert torch.equal(w, original)  # read-only
        saved = w.flatten()[unpack_codes(codes, w.numel()) == 3].clone()
        ops.merge_(w, a, b, 0.8, transposed)
        changed += (w != original).sum().item()
        ops.unmerge_exact_(w, a, b, 0.8, codes, transposed)
        w.view(-1)[unpack_codes(codes, w.numel()) == 3] = saved
        assert torch.equal(w.view(torch.uint8 if dtype != torch.float32 else torch.int32),
                           original.view(torch.uint8 if dtype != torch.float32 else torch.int32)), cycle
    assert changed > 0.5 * 50 * w.numel()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_restore_codes_match_definition(dtype):
    # Integer adapters and a power-of-two scale make delta exact, so the definition can be evaluated
    # with plain tensor ops and compared code by code.
    gen = torch.Generator().manual_seed(3)
    w = randn(33, 21, dtype=dtype, gen=gen)
    a = torch.randint(-3, 4, (4, 21), generator=gen).float()
    b = torch.randint(-3, 4, (33, 4), generator=gen).float()
    d = ref.delta(a, b, 0.125)
    w2 = ((w.float() + d).to(dtype).float() - d).to(dtype)
    bw, b2 = w.view(torch.int16).int() & 0xFFFF, w2.view(torch.int16).int() & 0xFFFF
    want = torch.full_like(bw, 3)
    want[bw == b2 - 1] = 2
    want[bw == b2 + 1] = 1
    want[bw == b2] = 0
    got = unpack_codes(ops.restore_codes(w, a, b, 0.125), w.numel()).view_as(bw).int()
    assert torch.equal(got, want)
    assert set(want.unique().tolist()) >= {0, 1, 2}


@pytest.mark.parametrize("dtype", VALUE_DTYPES)
@pytest.mark.parametrize("m,k,offsets,r", [(1, 3, [0, 2], 1), (130, 37, [0, 11, 20, 29], 8), (300, 64, [0, 48], 16)])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_backward(dtype, m, k, offsets, r, p):
    gen = torch.Generator().manual_seed(m + k)
    n, s = offsets[-1], len(offsets) - 1
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    dy = randn(m, n, dtype=dtype, gen=gen)
    x = randn(m, k, dtype=dtype, gen=gen)
    a, b = randn(s * r, k, dtype=dtype, gen=gen), randn(n, r, dtype=dtype, gen=gen)
    h = ref.shrink(x, a, p, 5).to(acc)
    gx_base = randn(m, k + 3, dtype=dtype, gen=gen)
    gx = gx_base[:, 1 : 1 + k]
    gx0 = gx.clone()
    ga, gb = ops.backward(dy, x, h, a, b, 0.5, p, 5, offsets, gx)
    exact = ref.backward(dy.double(), x.double(), h.double(), a.double(), b.double(), 0.5, p, 5, offsets)
    plain = ref.backward(dy, x, h, a, b, 0.5, p, 5, offsets)
    assert ga.dtype == a.dtype and gb.dtype == b.dtype
    assert_close_rule(ga, plain[0], exact[0], 3.0)
    assert_close_rule(gb, plain[1], exact[1], 3.0)
    assert_close_rule(gx, (gx0.double() + plain[2].double()).to(dtype), gx0.double() + exact[2], 3.0)


def test_backward_empty_and_fp32_adapters():
    x = torch.zeros(0, 8, dtype=torch.bfloat16)
    ga, gb = ops.backward(torch.zeros(0, 6, dtype=torch.bfloat16), x, torch.zeros(0, 2), torch.ones(2, 8),
                          torch.ones(6, 2), 1.0)
    assert torch.equal(ga, torch.zeros(2, 8)) and torch.equal(gb, torch.zeros(6, 2))


def test_error_leaves_weight_untouched():
    w = torch.randn(8, 8)
    w0 = w.clone()
    with pytest.raises(ValueError, match="lora_b"):
        ops.merge_(w, torch.randn(2, 8), torch.randn(7, 2), 1.0)
    assert torch.equal(w, w0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_lora_linear_autograd(dtype, p):
    # Adapters that require grad reach the kernels (and their worker threads) with autograd enabled.
    from loracuda.functional import lora_linear

    gen = torch.Generator().manual_seed(11)
    x = randn(200, 40, dtype=dtype, gen=gen).requires_grad_()
    w = randn(24, 40, dtype=dtype, gen=gen)
    a = randn(4, 40, dtype=dtype, gen=gen).requires_grad_()
    b = randn(24, 4, dtype=dtype, gen=gen).requires_grad_()
    gy = randn(200, 24, dtype=dtype, gen=gen)
    lora_linear(x, w, None, a, b, 0.5, p, training=True, seed=21).backward(gy)
    leaves = [t.detach().double().requires_grad_() for t in (x, a, b)]
    ref.lora_linear(leaves[0], w.double(), None, leaves[1], leaves[2], 0.5, p, 21).backward(gy.double())
    plain = [t.detach().clone().requires_grad_() for t in (x, a, b)]
    ref.lora_linear(plain[0], w, None, plain[1], plain[2], 0.5, p, 21).backward(gy)
    for got, exact, pl in zip((x, a, b), leaves, plain):
        assert_close_rule(got.grad, pl.grad, exact.grad, 3.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_merge_rounding_matches_torch(dtype):
    # Exact delta (integer adapters, power-of-two scale): merge_ must round as torch's cast does,
    # bit for bit, infinities and signed zeros included. NaN stays NaN (its payload is not compared:
    # torch's scalar and vectorised casts write different NaN patterns).
    gen = torch.Generator().manual_seed(5)
    w = randn(19, 23, dtype=dtype, gen=gen, scale=100.0)
    w.view(-1)[:6] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0, 1e-30]).to(dtype)
    a = torch.randint(-3, 4, (3, 23), generator=gen).float()
    b = torch.randint(-3, 4, (19, 3), generator=gen).float()
    want = (w.float() + ref.delta(a, b, 0.0625)).to(dtype)
    ops.merge_(w, a, b, 0.0625)
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    assert w.view(-1)[0].isnan()
    assert torch.equal(w.view(-1)[1:].view(bits), want.view(-1)[1:].view(bits))


def test_blocked_backward_independent_of_thread_count():
    # Reductions over M run per fixed row chunk and are summed in order: 1 and 2 threads agree bitwise.
    gen = torch.Generator().manual_seed(13)
    m, k, n, r = 1000, 96, 80, 8
    dy, x = randn(m, n, dtype=torch.bfloat16, gen=gen), randn(m, k, dtype=torch.bfloat16, gen=gen)
    a, b = randn(r, k, dtype=torch.float32, gen=gen), randn(n, r, dtype=torch.float32, gen=gen)
    h = ref.shrink(x, a, 0.1, 8).float()
    threads = torch.get_num_threads()
    results = []
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            gx = torch.zeros(m, k, dtype=torch.bfloat16)
            results.append((*ops.backward(dy, x, h, a, b, 0.5, 0.1, 8, (), gx), gx))
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(*results):
        assert torch.equal(one, two)


@pytest.mark.parametrize("m, k, n, r, offsets, p", [
    (40, 1100, 1300, 16, (), 0.0),              # one row chunk: columns split into tiles (x and grad_y passes)
    (40, 1100, 1300, 16, (), 0.1),              # the same with dropout (the mask index of a column tile)
    (90, 700, 1500, 8, (0, 640, 1100, 1500), 0.0),  # three slices, tile edges inside slices
    (600, 520, 1030, 16, (), 0.1),              # a few row chunks and tiles
])
def test_float32_backward_independent_of_thread_count(m, k, n, r, offsets, p):
    # The one-read float32 passes split small M's work by columns too: 1, 2 and 3 threads agree bitwise.
    gen = torch.Generator().manual_seed(17)
    slices = max(1, len(offsets) - 1)
    f32 = torch.float32
    dy, x = randn(m, n, dtype=f32, gen=gen), randn(m, k, dtype=f32, gen=gen)
    a, b = randn(slices * r, k, dtype=f32, gen=gen), randn(n, r, dtype=f32, gen=gen)
    h = ref.shrink(x, a, p, 8).float()
    threads = torch.get_num_threads()
    results = []
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            gx = randn(m, k, dtype=f32, gen=torch.Generator().manual_seed(3))
            results.append((*ops.backward(dy, x, h, a, b, 0.5, p, 8 if p else None, offsets, gx), gx))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for one, two in zip(results[0], other):
            assert torch.equal(one, two)
