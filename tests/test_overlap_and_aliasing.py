"""The overlap rule of every op that writes (csrc/checks.h, 'memory overlap'), the scale and seed
policies, and torch's in-place rules for the writing ops (csrc/inplace_autograd.cpp).

Each test is a repro of a failure that was found by attacking the ops (aliasing, expanded outputs,
non-finite scales, out-of-range seeds, in-place writes inside a graph): the call now raises a clean
error naming the op and the argument, and every tensor involved is bit for bit as it was -- or, where
the call is legitimate (disjoint column slices of one buffer), it gives the reference's result.
"""

import pytest
import torch

from loracuda import ops, reference
from conftest import assert_unchanged, assert_within_rule, snapshot, to64

MATCH_SHARES = "shares memory with"
# An expanded output is refused by the overlap rule, or earlier by the unit-column-stride rule of outputs.
MATCH_SELF = "(has elements that share memory|must have unit stride along its last dimension)"


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def randn(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=gen(seed)).to(dtype)


def raises_unchanged(exc, match, fn, **tensors):
    """fn() raises exc matching `match`, and every tensor in `tensors` keeps its bits."""
    before = snapshot(tensors)
    with pytest.raises(exc, match=match):
        fn()
    assert_unchanged(before, tensors, match)


# ---- case 1: outputs aliasing inputs --------------------------------------------------------------


def test_unmerge_exact_codes_aliasing_weight_is_refused():
    # The repro at a size that does not take seconds: codes are a uint8 view of the weight's bytes.
    w = torch.randn(16, 4096, generator=gen(1))
    c = w.view(torch.uint8).reshape(-1)[: (w.numel() + 3) // 4]
    w[0] = 0
    a, b = torch.randn(2, 4096, generator=gen(2)), torch.randn(16, 2, generator=gen(3)) * 100
    raises_unchanged(
        ValueError,
        "loracuda.unmerge_exact_: argument 'codes' shares memory with 'weight'",
        lambda: ops.unmerge_exact_(w, a, b, 1.0, c, escape_values=torch.empty(0)),
        w=w,
        a=a,
        b=b,
    )


def test_unmerge_exact_escape_values_aliasing_weight_is_refused():
    w = randn(8, 8, seed=4)
    codes = torch.zeros(16, dtype=torch.uint8)
    a, b = randn(2, 8, seed=5), randn(8, 2, seed=6)
    raises_unchanged(
        ValueError,
        "argument 'escape_values' shares memory with 'weight'",
        lambda: ops.unmerge_exact_(w, a, b, 1.0, codes, escape_values=w.view(-1)[:0 + 3]),
        w=w,
        codes=codes,
    )


@pytest.mark.parametrize("op", ["merge_", "merge_exact_"])
@pytest.mark.parametrize("which", ["lora_a", "lora_b"])
def test_merge_weight_aliasing_a_factor_is_refused(op, which):
    # weight [8, 8] float32 and a factor that is a view of its own rows.
    buf = randn(12, 8, seed=7)
    w = buf[:8]
    a, b = (buf[6:8], randn(8, 2, seed=8)) if which == "lora_a" else (randn(2, 8, seed=9), buf[4:12].reshape(16, 4)[:8, :2])
    fn = (lambda: ops.merge_(w, a, b, 0.5)) if op == "merge_" else (lambda: ops.merge_exact_(w, a, b, 0.5))
    raises_unchanged(ValueError, f"loracuda.{op}: argument '{which}' shares memory with 'weight'", fn, buf=buf)


def test_merge_weight_equal_to_factor_is_refused():
    w = randn(8, 8, seed=10)
    raises_unchanged(ValueError, "argument 'lora_a' shares memory with 'weight'", lambda: ops.merge_(w, w, w, 1.0), w=w)


def test_expand_add_h_aliasing_y_is_refused():
    buf = randn(4, 12, seed=11)
    y, h = buf[:, :8], buf[:, 6:8]  # overlapping columns of one buffer
    b = randn(8, 2, seed=12)
    raises_unchanged(ValueError, "loracuda.expand_add_: argument 'h' shares memory with 'y'",
                     lambda: ops.expand_add_(y, h, b, 1.0), buf=buf)


def test_disjoint_column_slices_of_one_buffer_are_accepted():
    # y and h interleave by rows in one buffer but share no element: a legitimate call, reference result.
    buf = randn(5, 12, seed=13)
    y, h = buf[:, :8], buf[:, 8:10]
    b = randn(8, 2, seed=14)
    expected64 = reference.expand_add(to64(y), to64(h), to64(b), 0.75)
    plain = reference.expand_add(y.clone(), h.clone(), b, 0.75)
    h_before = h.clone()
    ops.expand_add_(y, h, b, 0.75)
    assert torch.equal(h, h_before)
    assert_within_rule("expand_add_ into a column slice", y, plain, expected64)


def test_backward_grad_x_aliasing_x_is_refused():
    x = randn(6, 8, seed=15)
    a, b = randn(2, 8, seed=16), randn(4, 2, seed=17)
    gy = randn(6, 4, seed=18)
    h = reference.shrink(x, a)
    raises_unchanged(ValueError, "loracuda.backward: argument 'x' shares memory with 'grad_x'",
                     lambda: ops.backward(gy, x, h, a, b, 1.0, grad_x=x), x=x, gy=gy, a=a, b=b)


def test_multi_expand_add_y_aliasing_lora_b_all_is_refused():
    y = randn(8, 4, seed=19)
    lb = y.reshape(2, 4, 4)  # lora_b_all [L=2, N=4, r_max=4] on y's own storage
    h = randn(8, 4, seed=20)
    ranks, ids = torch.full((2,), 4, dtype=torch.int32), torch.zeros(8, dtype=torch.int32)
    raises_unchanged(ValueError, "loracuda.multi_expand_add_: argument 'lora_b_all' shares memory with 'y'",
                     lambda: ops.multi_expand_add_(y, h, lb, torch.ones(2), ranks, ids), y=y, h=h)


# ---- case 3: outputs whose elements share memory -------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("expanded", ["rows", "one_column"])
def test_expand_add_expanded_y_is_refused(dtype, expanded):
    m, n, r = 6, 8, 2
    base = torch.zeros(1, 1, dtype=dtype) if expanded == "one_column" else torch.zeros(1, n, dtype=dtype)
    y = base.expand(m, 1) if expanded == "one_column" else base.expand(m, n)
    ncols = y.shape[1]
    h, b = randn(m, r, seed=21), randn(ncols, r, seed=22).to(dtype)
    raises_unchanged(ValueError, "loracuda.expand_add_: argument 'y' .*" + MATCH_SELF,
                     lambda: ops.expand_add_(y, h, b, 1.0), base=base, h=h, b=b)


def test_expand_add_expanded_y_with_slices_writes_nothing():
    # float32 with slice offsets used to write the first slice and then raise.
    base = torch.zeros(1, 6)
    y = base.expand(4, 6)
    h, b = randn(4, 4, seed=23), randn(6, 2, seed=24)
    raises_unchanged(ValueError, MATCH_SELF, lambda: ops.expand_add_(y, h, b, 1.0, [0, 3, 6]), base=base)


def test_expand_add_expanded_m1_n_column_is_refused():
    # torch.zeros(M, 1).expand(M, N): column stride 0.
    base = torch.zeros(5, 1)
    y = base.expand(5, 7)
    h, b = randn(5, 2, seed=25), randn(7, 2, seed=26)
    raises_unchanged(ValueError, "argument 'y'", lambda: ops.expand_add_(y, h, b, 1.0), base=base)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_multi_expand_add_expanded_y_is_refused(dtype):
    base = torch.zeros(1, 1, dtype=dtype)
    y = base.expand(6, 1)
    h = randn(6, 2, seed=27)
    lb = randn(2, 1, 2, seed=28).to(dtype)
    ranks = torch.full((2,), 2, dtype=torch.int32)
    ids = torch.tensor([0, 1, 0, 0, 1, 1], dtype=torch.int32)
    raises_unchanged(ValueError, "loracuda.multi_expand_add_: argument 'y' .*" + MATCH_SELF,
                     lambda: ops.multi_expand_add_(y, h, lb, torch.ones(2), ranks, ids), base=base)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_expanded_grad_x_is_refused(dtype):
    m, k, n, r = 6, 1, 4, 2
    x, a, b = randn(m, k, seed=29).to(dtype), randn(r, k, seed=30), randn(n, r, seed=31)
    gy = randn(m, n, seed=32).to(dtype)
    h = reference.shrink(x, a)
    base = torch.zeros(1, 1, dtype=dtype)
    gx = base.expand(m, k)
    raises_unchanged(ValueError, "loracuda.backward: argument 'grad_x' .*" + MATCH_SELF,
                     lambda: ops.backward(gy, x, h, a, b, 1.0, grad_x=gx), base=base, x=x, gy=gy)


def test_overlapping_strides_output_is_refused():
    # Rows 1 element apart but 4 wide: every row overlaps the next.
    buf = torch.zeros(16)
    y = buf.as_strided((4, 4), (1, 1))
    h, b = randn(4, 2, seed=33), randn(4, 2, seed=34)
    raises_unchanged(ValueError, MATCH_SELF, lambda: ops.expand_add_(y, h, b, 1.0), buf=buf)


# ---- case 5 (op part): scales and seeds ----------------------------------------------------------


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -float("inf"), 1e39, -1e39])
@pytest.mark.parametrize("op", ["merge_", "merge_exact_", "unmerge_exact_", "restore_codes"])
def test_merge_family_refuses_scale_not_finite_in_float32(op, scale):
    w, a, b = randn(8, 8, seed=35), randn(2, 8, seed=36), randn(8, 2, seed=37)
    codes = torch.zeros(16, dtype=torch.uint8)
    call = {
        "merge_": lambda: ops.merge_(w, a, b, scale),
        "merge_exact_": lambda: ops.merge_exact_(w, a, b, scale),
        "unmerge_exact_": lambda: ops.unmerge_exact_(w, a, b, scale, codes),
        "restore_codes": lambda: ops.restore_codes(w, a, b, scale),
    }[op]
    raises_unchanged(ValueError, f"loracuda.{op}: argument 'scale' must be finite as a float32", call, w=w, a=a, b=b)


def test_largest_float32_scale_is_accepted():
    w, a, b = torch.zeros(4, 4), torch.zeros(1, 4), torch.zeros(4, 1)
    ops.merge_(w, a, b, 3.4028234663852886e38)
    assert torch.equal(w, torch.zeros(4, 4))


@pytest.mark.parametrize("scale", [float("nan"), 1e39])
def test_expand_add_backward_lora_linear_refuse_bad_scale(scale):
    x, a, b = randn(4, 8, seed=38), randn(2, 8, seed=39), randn(6, 2, seed=40)
    w = randn(6, 8, seed=41)
    y, h = randn(4, 6, seed=42), reference.shrink(x, a)
    raises_unchanged(ValueError, "loracuda.expand_add_: argument 'scale'", lambda: ops.expand_add_(y, h, b, scale), y=y)
    raises_unchanged(ValueError, "loracuda.backward: argument 'scale'", lambda: ops.backward(y, x, h, a, b, scale),
                     x=x)
    raises_unchanged(ValueError, "loracuda.lora_linear: argument 'scale'",
                     lambda: torch.ops.loracuda.lora_linear(x, w, None, a, b, scale, 0.0, None, []), x=x)


@pytest.mark.parametrize("layout", ["contiguous_run", "scattered"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_multi_expand_add_non_finite_scale_is_refused_on_cpu(layout, bad):
    m, n, r = 16, 8, 2
    ids = torch.zeros(m, dtype=torch.int32) if layout == "contiguous_run" else torch.arange(m, dtype=torch.int32) % 2
    y, h, lb = randn(m, n, seed=43), randn(m, r, seed=44), randn(2, n, r, seed=45)
    scales = torch.tensor([bad, 1.0])
    ranks = torch.full((2,), r, dtype=torch.int32)
    raises_unchanged(ValueError, "loracuda.multi_expand_add_: argument 'scales' must be finite .* adapter 0",
                     lambda: ops.multi_expand_add_(y, h, lb, scales, ranks, ids), y=y, h=h, lb=lb)


def test_multi_expand_add_unused_non_finite_scale_is_ignored():
    # Only the scales of adapters some token uses matter (an empty pool slot may hold anything).
    m, n, r = 8, 4, 2
    y, h, lb = randn(m, n, seed=46), randn(m, r, seed=47), randn(2, n, r, seed=48)
    ids = torch.ones(m, dtype=torch.int32)
    scales, ranks = torch.tensor([float("nan"), 0.5]), torch.full((2,), r, dtype=torch.int32)
    expected = reference.multi_expand_add(to64(y), to64(h), to64(lb), scales, ranks, ids)
    plain = reference.multi_expand_add(y, h, lb, scales, ranks, ids)
    ops.multi_expand_add_(y, h, lb, scales, ranks, ids)
    assert_within_rule("multi_expand_add_", y, plain, expected)


@pytest.mark.parametrize("seed", [2**64, 2**63, -(2**63) - 1])
def test_out_of_range_seed_is_refused(seed):
    x, a = randn(4, 8, seed=49), randn(2, 8, seed=50)
    with pytest.raises(ValueError, match="loracuda.shrink: argument 'seed' must be in"):
        ops.shrink(x, a, 0.1, seed)
    w, b = randn(6, 8, seed=51), randn(6, 2, seed=52)
    with pytest.raises(ValueError, match="loracuda.lora_linear: argument 'seed' must be in"):
        loracuda_lora_linear(x, w, a, b, seed)
    h, gy = reference.shrink(x, a), randn(4, 6, seed=53)
    with pytest.raises(ValueError, match="loracuda.backward: argument 'seed' must be in"):
        ops.backward(gy, x, h, a, b, 1.0, 0.1, seed)


def loracuda_lora_linear(x, w, a, b, seed):
    import loracuda

    return loracuda.lora_linear(x, w, None, a, b, 1.0, dropout_p=0.1, training=True, seed=seed)


def test_extreme_int64_seeds_are_accepted():
    x, a = randn(4, 8, seed=54), randn(2, 8, seed=55)
    for seed in (2**63 - 1, -(2**63)):
        got = ops.shrink(x, a, 0.25, seed)
        assert torch.equal(got, ops.shrink(x, a, 0.25, torch.tensor([seed])))


def test_non_integer_seed_is_refused():
    x, a = randn(4, 8, seed=56), randn(2, 8, seed=57)
    with pytest.raises(TypeError, match="loracuda.shrink: argument 'seed' must be an int"):
        ops.shrink(x, a, 0.1, 1.5)


# ---- case 8 (op part): in-place rules ------------------------------------------------------------

LEAF = "a leaf Variable that requires grad is being used in an in-place operation"


def _merge_args():
    return randn(8, 8, seed=58), randn(2, 8, seed=59), randn(8, 2, seed=60)


@pytest.mark.parametrize("op", ["merge_", "merge_exact_", "unmerge_exact_"])
def test_merge_family_on_leaf_requiring_grad_raises_like_torch(op):
    w, a, b = _merge_args()
    w.requires_grad_(True)
    codes = torch.zeros(16, dtype=torch.uint8)
    call = {
        "merge_": lambda: ops.merge_(w, a, b, 1.0),
        "merge_exact_": lambda: ops.merge_exact_(w, a, b, 1.0),
        "unmerge_exact_": lambda: ops.unmerge_exact_(w, a, b, 1.0, codes),
    }[op]
    with pytest.raises(RuntimeError, match="a leaf Variable"):
        w.add_(1.0)  # torch's own rule, for comparison
    raises_unchanged(RuntimeError, f"loracuda.{op}: {LEAF}", call, w=w)
    with torch.no_grad():
        call()  # allowed without grad mode, as in torch


def test_merge_into_view_of_leaf_is_refused():
    w, a, b = _merge_args()
    w.requires_grad_(True)
    raises_unchanged(RuntimeError, "a view of a leaf Variable", lambda: ops.merge_(w[:], a, b, 1.0), w=w)


def test_expand_add_on_leaf_y_requiring_grad_raises():
    y, h, b = randn(4, 6, seed=61).requires_grad_(True), randn(4, 2, seed=62), randn(6, 2, seed=63)
    raises_unchanged(RuntimeError, f"loracuda.expand_add_: {LEAF}", lambda: ops.expand_add_(y, h, b, 1.0), y=y)


@pytest.mark.parametrize("which", ["h", "lora_b"])
def test_expand_add_in_a_graph_refuses_missing_gradients(which):
    x, a, b = randn(4, 8, seed=64), randn(2, 8, seed=65), randn(6, 2, seed=66)
    w = randn(6, 8, seed=67).requires_grad_(True)
    y = x @ w.t()  # non-leaf, requires grad
    if which == "h":
        a.requires_grad_(True)
    else:
        b.requires_grad_(True)
    h = x @ a.t()
    with pytest.raises(RuntimeError, match=f"loracuda.expand_add_ is not differentiable, but argument '{which}' "
                                           "requires grad.*loracuda.lora_linear"):
        ops.expand_add_(y, h, b, 1.0)


def test_expand_add_on_non_leaf_y_with_constant_inputs_keeps_y_gradient():
    # y requires grad (a graph output); h and lora_b are constants: the add's gradient is the identity.
    x, w = randn(4, 8, seed=68), randn(6, 8, seed=69).requires_grad_(True)
    h, b = randn(4, 2, seed=70), randn(6, 2, seed=71)
    y = x @ w.t()
    ops.expand_add_(y, h, b, 0.5)
    (y * 2).sum().backward()
    assert torch.allclose(w.grad, 2 * torch.ones(4, 6).t() @ x)


def test_multi_expand_add_and_backward_refuse_grad_inputs():
    m, n, r = 4, 6, 2
    y, h, lb = randn(m, n, seed=72), randn(m, r, seed=73).requires_grad_(True), randn(1, n, r, seed=74)
    ranks, ids = torch.full((1,), r, dtype=torch.int32), torch.zeros(m, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="loracuda.multi_expand_add_ is not differentiable, but argument 'h'"):
        ops.multi_expand_add_(y, h, lb, torch.ones(1), ranks, ids)
    x, a, b = randn(m, 8, seed=75).requires_grad_(True), randn(r, 8, seed=76), randn(n, r, seed=77)
    with pytest.raises(RuntimeError, match="loracuda.backward is not differentiable, but argument 'x'"):
        ops.backward(y, x, reference.shrink(x.detach(), a), a, b, 1.0)
    gx = torch.zeros(m, 8, requires_grad=True)
    with pytest.raises(RuntimeError, match=f"loracuda.backward: {LEAF}"):
        ops.backward(y, x.detach(), reference.shrink(x.detach(), a), a, b, 1.0, grad_x=gx)


# ---- the grouped (mixture-of-experts) ops follow the same rules ----------------------------------

G_GROUPS, G_N, G_K, G_R, G_M = 3, 8, 6, 2, 5


def _group_ids():
    return torch.tensor([0, 1, 2, 0, -1], dtype=torch.int64)


def test_grouped_expand_add_y_aliasing_lora_b_is_refused():
    lora_b = randn(G_GROUPS, G_N, G_R, seed=70)
    y = lora_b.view(-1)[: G_M * G_N].view(G_M, G_N)
    h = randn(G_M, G_R, seed=71)
    raises_unchanged(
        ValueError,
        "loracuda.grouped_expand_add_: argument 'lora_b' shares memory with 'y'",
        lambda: ops.grouped_expand_add_(y, h, lora_b, _group_ids(), 1.0),
        lora_b=lora_b,
        h=h,
    )


def test_grouped_expand_add_y_aliasing_group_ids_is_refused():
    y = torch.zeros(G_M, G_N, dtype=torch.float64)
    ids = y.view(torch.int64).view(-1)[:G_M]  # all zeros: valid ids that live in y's bytes
    h, lora_b = randn(G_M, G_R, dtype=torch.float64, seed=72), randn(G_GROUPS, G_N, G_R, dtype=torch.float64, seed=73)
    raises_unchanged(
        ValueError,
        "loracuda.grouped_expand_add_: argument 'group_ids' shares memory with 'y'",
        lambda: ops.grouped_expand_add_(y, h, lora_b, ids, 1.0),
        y=y,
    )


def test_grouped_backward_grad_x_aliasing_x_is_refused():
    x = randn(G_M, G_K, seed=74)
    a, b = randn(G_GROUPS, G_R, G_K, seed=75), randn(G_GROUPS, G_N, G_R, seed=76)
    h = ops.grouped_shrink(x, a, _group_ids())
    raises_unchanged(
        ValueError,
        "loracuda.grouped_backward: argument 'x' shares memory with 'grad_x'",
        lambda: ops.grouped_backward(randn(G_M, G_N, seed=77), x, h, a, b, _group_ids(), 1.0, grad_x=x),
        x=x,
    )


def test_grouped_expand_add_on_leaf_y_requiring_grad_raises():
    y = torch.zeros(G_M, G_N, requires_grad=True)
    h, lora_b = randn(G_M, G_R, seed=78), randn(G_GROUPS, G_N, G_R, seed=79)
    raises_unchanged(
        RuntimeError, f"loracuda.grouped_expand_add_: {LEAF}",
        lambda: ops.grouped_expand_add_(y, h, lora_b, _group_ids(), 1.0), y=y,
    )


def test_grouped_expand_add_in_a_graph_refuses_missing_gradients():
    y = torch.zeros(G_M, G_N)
    h = randn(G_M, G_R, seed=80).requires_grad_(True)
    lora_b = randn(G_GROUPS, G_N, G_R, seed=81)
    raises_unchanged(
        RuntimeError, "loracuda.grouped_expand_add_ is not differentiable, but argument 'h' requires grad",
        lambda: ops.grouped_expand_add_(y, h, lora_b, _group_ids(), 1.0), y=y,
    )
    with torch.no_grad():
        ops.grouped_expand_add_(y, h, lora_b, _group_ids(), 1.0)  # allowed outside a graph


def _grouped_ids(m, groups=2):
    return torch.arange(m, dtype=torch.long) % groups


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_expand_add_expanded_y_is_refused(dtype):
    m, n, r = 6, 8, 2
    base = torch.zeros(1, n, dtype=dtype)
    y = base.expand(m, n)
    h, lb = randn(m, r, seed=40), randn(2, n, r, seed=41).to(dtype)
    raises_unchanged(ValueError, "loracuda.grouped_expand_add_: argument 'y' .*" + MATCH_SELF,
                     lambda: ops.grouped_expand_add_(y, h, lb, _grouped_ids(m), 1.0), base=base, h=h, lb=lb)


def test_grouped_expand_add_h_aliasing_y_is_refused():
    y = randn(6, 8, seed=42)
    h = y[:, :2]  # h [M, r] reads the first columns of y
    lb = randn(2, 8, 2, seed=43)
    raises_unchanged(ValueError, "loracuda.grouped_expand_add_: argument 'h' shares memory with 'y'",
                     lambda: ops.grouped_expand_add_(y, h, lb, _grouped_ids(6), 1.0), y=y, lb=lb)


def test_grouped_expand_add_disjoint_column_slices_are_accepted():
    # y and h as disjoint column slices of one float32 buffer: allowed, and the result is the reference's.
    m, n, r = 6, 8, 2
    buf = randn(m, n + r, seed=48)
    y, h = buf[:, :n], buf[:, n:]
    lb, ids = randn(2, n, r, seed=49), _grouped_ids(m)
    expected64 = reference.grouped_expand_add(to64(y), to64(h), to64(lb), ids, 0.5)
    plain = reference.grouped_expand_add(y.clone(), h, lb, ids, 0.5)
    h_before = h.clone()
    ops.grouped_expand_add_(y, h, lb, ids, 0.5)
    assert torch.equal(h, h_before)
    assert_within_rule("grouped_expand_add_ into a column slice", y, plain, expected64)


def _grouped_backward_args(dtype=torch.float32, m=6, k=8, n=4, r=2):
    x, gy = randn(m, k, seed=50).to(dtype), randn(m, n, seed=51).to(dtype)
    a, b = randn(2, r, k, seed=52), randn(2, n, r, seed=53)
    ids = _grouped_ids(m)
    h = ops.grouped_shrink(x, a, ids)
    return gy, x, h, a, b, ids


def test_grouped_backward_grad_x_aliasing_grad_y_is_refused():
    gy, x, h, a, b, ids = _grouped_backward_args(k=4, n=4)
    raises_unchanged(ValueError, "loracuda.grouped_backward: argument 'grad_y' shares memory with 'grad_x'",
                     lambda: ops.grouped_backward(gy, x, h, a, b, ids, 1.0, grad_x=gy), x=x, gy=gy, a=a, b=b, h=h)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_backward_expanded_grad_x_is_refused(dtype):
    gy, x, h, a, b, ids = _grouped_backward_args(dtype)
    base = torch.zeros(1, 8, dtype=dtype)
    gx = base.expand(6, 8)
    raises_unchanged(ValueError, "loracuda.grouped_backward: argument 'grad_x' .*" + MATCH_SELF,
                     lambda: ops.grouped_backward(gy, x, h, a, b, ids, 1.0, grad_x=gx), base=base, x=x, gy=gy)
