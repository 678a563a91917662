"""The sample inputs of the single-adapter loracuda ops (the multi-LoRA ops draw theirs in
tests/test_multi_lora_ops.py): one case grid and one builder per op.

Every test module draws its inputs from here (comparison with loracuda.reference, opcheck, gradient
checks, torch.compile), so a shape, dtype or layout added to the grid reaches all of them.

A ``Case`` names the sizes (notation of docs/design.md, section 'Math and memory passes': x [M, K],
lora_a [R, K] with R = S * r, lora_b [N, r], y [M, N], weight [N, K] or [K, N] when transposed), the dtypes of the values and of the adapter
factors, the dropout probability, the memory layout of the inputs and how the values are drawn:

- values "random": normal values (scaled so that h and the LoRA term are O(1)) for float32 /
  bfloat16 / float16; for float64, dyadic values k / 8 with a power-of-two scale (and p = 0.5, whose
  1 / (1 - p) = 2 is exact), so every product and sum is exact in float64 and the float64 reference
  is the exact answer.
- values "integers": small integers (and scales +-1, +-0.5) chosen so that every intermediate and
  every output is exactly representable even in bfloat16: the math is exact in every dtype and the
  kernels must match the reference bit for bit.

Layouts: "contiguous"; "padded": each input is a view into a NaN-filled buffer, one row and one
column in, with a row stride larger than its width (so the data pointer is not 16-byte aligned and
a kernel that reads past a row sees NaN); "transposed": each input is column-major (stride (1, rows)).
Outputs updated in place (y, grad_x, weight) always live inside a NaN-filled guard buffer
(``Guard``) whose bits outside the view must survive the op unchanged; for layout "contiguous"
the view is a contiguous stretch of a 1-D buffer, otherwise a row-strided window of a 2-D buffer.
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Any, Optional

import torch
from torch import Tensor

from loracuda import reference

F64, F32, BF16, F16 = torch.float64, torch.float32, torch.bfloat16, torch.float16
DTYPE_NAMES = {F64: "f64", F32: "f32", BF16: "bf16", F16: "f16"}

# (value dtype, adapter dtype): adapters are stored in the values' dtype or in float32.
DTYPE_PAIRS = ((F32, F32), (BF16, BF16), (BF16, F32), (F16, F16), (F16, F32), (F64, F64))
LAYOUTS = ("contiguous", "padded", "transposed")

# (M, K, N, r, slice_offsets). Together they use every value of M in {1, 3, 127, 1000}, K and N in
# {1, 13, 67, 250} (none a multiple of 8), r in {1, 8, 16, 64}; two have S = 3 unequal slices; one
# has M = 0.
SHAPES = (
    (1, 13, 67, 8, ()),
    (3, 250, 1, 1, ()),
    (127, 1, 13, 16, ()),
    (1000, 67, 250, 64, ()),
    (3, 67, 67, 8, (0, 20, 45, 67)),
    (127, 250, 13, 1, (0, 1, 4, 13)),
    (1000, 13, 1, 16, ()),
    (0, 13, 67, 8, ()),
)

# Small shapes for the integer-valued cases, sized so that every result fits bfloat16's 8-bit
# significand exactly: |x|, |lora_a|, |lora_b|, |grad_y| <= 1, |y|, |grad_x| <= 2, K <= 13, R <= 8,
# M <= 3, per-slice N <= 13, |scale| <= 1, keep scale 2 (p = 0.5): every value stays below 256 and
# is a multiple of 1/2 below 128.
INTEGER_SHAPES = (
    (3, 13, 13, 8, ()),
    (1, 7, 9, 2, (0, 2, 5, 9)),
    (3, 1, 1, 1, ()),
)

# (N, K, r, transposed) for the merge family; weight [N, K], or [K, N] when transposed.
MERGE_SHAPES = (
    (1, 1, 1, False),
    (13, 67, 8, True),
    (67, 13, 16, False),
    (250, 67, 64, True),
    (67, 250, 1, False),
    (250, 13, 8, False),
)


@dataclasses.dataclass(frozen=True)
class Case:
    m: int
    k: int
    n: int
    r: int
    dtype: torch.dtype
    adapter_dtype: torch.dtype
    offsets: tuple = ()
    p: float = 0.0
    layout: str = "contiguous"
    values: str = "random"
    scale: float = 1.0
    transposed: bool = False  # merge family only
    bias: bool = True  # lora_linear only
    grad_x: bool = True  # backward only: accumulate into a grad_x (else None)

    @property
    def slices(self) -> int:
        return max(len(self.offsets) - 1, 1)

    @property
    def rank_total(self) -> int:
        """R = S * r, the rows of lora_a and the columns of h."""
        return self.slices * self.r

    @property
    def exact(self) -> bool:
        """True when the math is exact in the case's dtype: the kernel must match bit for bit."""
        return self.values == "integers" or self.dtype == F64

    def __str__(self) -> str:
        parts = [f"M{self.m}", f"K{self.k}", f"N{self.n}", f"r{self.r}"]
        if self.offsets:
            parts.append("S" + "-".join(str(b - a) for a, b in zip(self.offsets[:-1], self.offsets[1:])))
        parts.append(f"{DTYPE_NAMES[self.dtype]}.{DTYPE_NAMES[self.adapter_dtype]}")
        if self.p:
            parts.append(f"p{self.p}")
        if self.transposed:
            parts.append("T")
        if not self.bias:
            parts.append("nobias")
        if not self.grad_x:
            parts.append("nogx")
        parts += [self.layout, self.values, f"s{self.scale}"]
        return "_".join(parts)


def _grid(shapes, with_dropout: bool) -> list[Case]:
    """Every shape with every dtype pair; layout, dropout and scale rotate so each appears with each."""
    cases = []
    for i, (m, k, n, r, offsets) in enumerate(shapes):
        for j, (dtype, adapter_dtype) in enumerate(DTYPE_PAIRS):
            exact = dtype == F64
            dropout = with_dropout and (i + j) % 2 == 1
            p = (0.5 if exact else 0.1) if dropout else 0.0
            scale = (0.5 if exact else 1.7) if j % 2 == 0 else (-2.0 if exact else -0.45)
            cases.append(
                Case(m, k, n, r, dtype, adapter_dtype, offsets, p, LAYOUTS[(i + j) % 3], "random", scale,
                     bias=(i + j) % 4 != 3, grad_x=(i + j) % 5 != 4)
            )
    return cases


def _integer_grid(with_dropout: bool) -> list[Case]:
    pairs = ((F32, F32), (BF16, BF16), (BF16, F32), (F16, F16))
    cases = []
    for i, (m, k, n, r, offsets) in enumerate(INTEGER_SHAPES):
        for j, (dtype, adapter_dtype) in enumerate(pairs):
            p = 0.5 if with_dropout and (i + j) % 2 == 0 else 0.0
            scale = (1.0, -0.5, 0.5, -1.0)[(i + j) % 4]
            cases.append(Case(m, k, n, r, dtype, adapter_dtype, offsets, p, LAYOUTS[(i + j) % 3], "integers", scale))
    return cases


def _merge_grid() -> list[Case]:
    cases = []
    for i, (n, k, r, transposed) in enumerate(MERGE_SHAPES):
        for j, (dtype, adapter_dtype) in enumerate(DTYPE_PAIRS):
            scale = (0.5 if dtype == F64 else 1.7) if (i + j) % 2 == 0 else (-2.0 if dtype == F64 else -0.45)
            # merge_ needs a contiguous weight; the layout applies to the adapter factors.
            cases.append(Case(0, k, n, r, dtype, adapter_dtype, (), 0.0, LAYOUTS[(i + j) % 3], "random", scale,
                              transposed))
    for i, (n, k, r, transposed) in enumerate(((13, 9, 8, False), (9, 13, 3, True))):
        for j, (dtype, adapter_dtype) in enumerate(((F32, F32), (BF16, BF16), (BF16, F32), (F16, F16))):
            cases.append(Case(0, k, n, r, dtype, adapter_dtype, (), 0.0, LAYOUTS[(i + j) % 3], "integers",
                              (1.0, -1.0)[(i + j) % 2], transposed))
    return cases


SHRINK_CASES = _grid(SHAPES, with_dropout=True) + _integer_grid(with_dropout=True)
EXPAND_CASES = _grid(SHAPES, with_dropout=False) + _integer_grid(with_dropout=False)
BACKWARD_CASES = _grid(SHAPES, with_dropout=True) + _integer_grid(with_dropout=True)
LORA_LINEAR_CASES = _grid(SHAPES, with_dropout=True) + _integer_grid(with_dropout=True)
MERGE_CASES = _merge_grid()

DROPOUT_SEED = 0x5EED_1234_ABCD  # above 2^32, so both halves of the 64-bit seed matter


def pick(cases: list[Case], count: int) -> list[Case]:
    """``count`` cases spread over the list (for the costlier checks: opcheck, compile)."""
    if count >= len(cases):
        return list(cases)
    step = len(cases) / count
    return [cases[int(i * step)] for i in range(count)]


# ---- value generation -------------------------------------------------------------------------


def _generator(case: Case, salt: str) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(zlib.crc32(f"{case}/{salt}".encode()))
    return g


def draw_values(case: Case, salt: str, shape, dtype: torch.dtype, std: float = 1.0, magnitude: int = 1) -> Tensor:
    """float64 CPU values (cast by the caller): normal * std, dyadic k / 8 for float64 cases, or
    integers in [-magnitude, magnitude] for integer cases."""
    g = _generator(case, salt)
    if case.values == "integers":
        return torch.randint(-magnitude, magnitude + 1, shape, generator=g).to(F64)
    if dtype == F64:
        return torch.randint(-16, 17, shape, generator=g).to(F64) / 8
    return torch.randn(shape, generator=g, dtype=F64) * std


def _place(values: Tensor, layout: str, device: torch.device, dtype: torch.dtype) -> Tensor:
    """values [rows, cols] (or [n]) as a tensor of the given layout on device."""
    values = values.to(device=device, dtype=dtype)
    if layout == "contiguous":
        return values.contiguous()
    if values.dim() == 1:
        if layout == "padded":  # every other element of a NaN buffer, one element in
            buf = torch.full((2 * values.shape[0] + 2,), float("nan"), device=device, dtype=dtype)
            view = buf[1 : 1 + 2 * values.shape[0] : 2]
            view.copy_(values)
            return view
        return values.contiguous()
    rows, cols = values.shape
    if layout == "padded":
        buf = torch.full((rows + 2, cols + 3), float("nan"), device=device, dtype=dtype)
        view = buf[1 : rows + 1, 1 : cols + 1]
        view.copy_(values)
        return view
    if layout == "transposed":
        return values.t().contiguous().t()
    raise ValueError(f"unknown layout {layout!r}")


@dataclasses.dataclass
class Guard:
    """A tensor updated in place, as a view inside a NaN-filled buffer; the bits outside the view
    must not change."""

    buffer: Tensor
    view: Tensor
    outside: Tensor  # bool on the CPU, buffer's shape: True where the buffer is not part of the view
    before: Tensor  # buffer's bits at creation, on the CPU (see bit_pattern)

    def changed_outside(self) -> int:
        """The number of guard elements whose bits differ from what they were at creation."""
        now = bit_pattern(self.buffer)
        return int((now != self.before)[self.outside].sum())


def guarded(values: Tensor, layout: str, device: torch.device, dtype: torch.dtype) -> Guard:
    """values [rows, cols] copied into a view inside a NaN buffer; see the module docstring."""
    rows, cols = values.shape
    if layout == "contiguous":
        pad = 8
        buffer = torch.full((rows * cols + 2 * pad,), float("nan"), device=device, dtype=dtype)
        view = buffer[pad : pad + rows * cols].view(rows, cols)
        inside = torch.zeros(buffer.shape, dtype=torch.bool)
        inside[pad : pad + rows * cols] = True
    else:
        buffer = torch.full((rows + 2, cols + 5), float("nan"), device=device, dtype=dtype)
        view = buffer[1 : rows + 1, 2 : cols + 2]
        inside = torch.zeros(buffer.shape, dtype=torch.bool)
        inside[1 : rows + 1, 2 : cols + 2] = True
    view.copy_(values.to(device=device, dtype=dtype))
    return Guard(buffer, view, ~inside, bit_pattern(buffer))


def bit_pattern(t: Tensor) -> Tensor:
    """The raw bits of t as integers of its element size (NaN compares equal to itself), on the CPU."""
    t = t.detach().contiguous()
    itemsize = t.element_size()
    int_dtype = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[itemsize]
    return t.view(int_dtype).cpu() if t.dtype != torch.bool else t.to(torch.uint8).cpu()


def seed_for(case: Case) -> Optional[Tensor]:
    return torch.tensor([DROPOUT_SEED], dtype=torch.int64) if case.p > 0 else None


# ---- samples ------------------------------------------------------------------------------------


@dataclasses.dataclass
class Sample:
    """The positional arguments of one call of torch.ops.loracuda.<op>, in schema order."""

    op: str
    case: Case
    args: tuple
    guards: dict[str, Guard]  # in-place outputs, by argument name
    names: tuple  # schema argument names, parallel to args

    def arg(self, name: str) -> Any:
        return self.args[self.names.index(name)]

    def run(self):
        return getattr(torch.ops.loracuda, self.op)(*self.args)

    def tensors(self) -> dict[str, Tensor]:
        return {n: a for n, a in zip(self.names, self.args) if isinstance(a, Tensor)}


def _x(case: Case, device, salt: str = "x") -> Tensor:
    return _place(draw_values(case, salt, (case.m, case.k), case.dtype), case.layout, device, case.dtype)


def _lora_a(case: Case, device) -> Tensor:
    std = case.k ** -0.5 if case.k else 1.0
    v = draw_values(case, "lora_a", (case.rank_total, case.k), case.adapter_dtype, std=std)
    return _place(v, case.layout, device, case.adapter_dtype)


def _lora_b(case: Case, device) -> Tensor:
    v = draw_values(case, "lora_b", (case.n, case.r), case.adapter_dtype, std=case.r ** -0.5)
    return _place(v, case.layout, device, case.adapter_dtype)


def _h(case: Case, device) -> Tensor:
    """h [M, R] in the accumulation dtype, as shrink would produce it (computed exactly in float64)."""
    acc = reference._acc(case.dtype)
    x = draw_values(case, "x", (case.m, case.k), case.dtype)
    a = draw_values(case, "lora_a", (case.rank_total, case.k), case.adapter_dtype,
                std=case.k ** -0.5 if case.k else 1.0)
    x, a = x.to(case.dtype).to(F64), a.to(case.adapter_dtype).to(F64)  # the values the op sees
    h = reference.shrink(x, a, case.p, seed_for(case))
    return _place(h, case.layout, device, acc)


def shrink_sample(case: Case, device: torch.device) -> Sample:
    """shrink(x [M, K], lora_a [R, K], dropout_p, seed)."""
    args = (_x(case, device), _lora_a(case, device), case.p, seed_for(case))
    return Sample("shrink", case, args, {}, ("x", "lora_a", "dropout_p", "seed"))


def expand_add_sample(case: Case, device: torch.device) -> Sample:
    """expand_add_(y [M, N] (guarded), h [M, S*r] float32, lora_b [N, r], scale, slice_offsets)."""
    y = guarded(draw_values(case, "y", (case.m, case.n), case.dtype, magnitude=2), case.layout, device, case.dtype)
    args = (y.view, _h(case, device), _lora_b(case, device), case.scale, list(case.offsets))
    return Sample("expand_add_", case, args, {"y": y}, ("y", "h", "lora_b", "scale", "slice_offsets"))


def merge_sample(case: Case, device: torch.device, op: str = "merge_") -> Sample:
    """merge_ / restore_codes (weight [N, K] or [K, N] when transposed, contiguous and guarded for merge_,
    lora_a [r, K], lora_b [N, r], scale, transposed). For unmerge_exact_ the caller appends codes."""
    shape = (case.k, case.n) if case.transposed else (case.n, case.k)
    w = guarded(draw_values(case, "weight", shape, case.dtype, magnitude=2), "contiguous", device, case.dtype)
    a = _place(draw_values(case, "lora_a", (case.r, case.k), case.adapter_dtype, std=case.k ** -0.5),
               case.layout, device, case.adapter_dtype)
    b = _place(draw_values(case, "lora_b", (case.n, case.r), case.adapter_dtype, std=case.r ** -0.5),
               case.layout, device, case.adapter_dtype)
    args = (w.view, a, b, case.scale, case.transposed)
    return Sample(op, case, args, {"weight": w}, ("weight", "lora_a", "lora_b", "scale", "transposed"))


def backward_sample(case: Case, device: torch.device) -> Sample:
    """backward(grad_y [M, N], x [M, K], h [M, R], lora_a, lora_b, scale, dropout_p, seed,
    slice_offsets, grad_x [M, K] (guarded) or None)."""
    grad_y = _place(draw_values(case, "grad_y", (case.m, case.n), case.dtype), case.layout, device, case.dtype)
    guards = {}
    grad_x = None
    if case.grad_x:
        guards["grad_x"] = guarded(draw_values(case, "grad_x", (case.m, case.k), case.dtype, magnitude=2), case.layout,
                                   device, case.dtype)
        grad_x = guards["grad_x"].view
    args = (grad_y, _x(case, device), _h(case, device), _lora_a(case, device), _lora_b(case, device), case.scale,
            case.p, seed_for(case), list(case.offsets), grad_x)
    names = ("grad_y", "x", "h", "lora_a", "lora_b", "scale", "dropout_p", "seed", "slice_offsets", "grad_x")
    return Sample("backward", case, args, guards, names)


def lora_linear_sample(case: Case, device: torch.device) -> Sample:
    """lora_linear(x [M, K], weight [N, K], bias [N] or None, lora_a, lora_b, scale, dropout_p, seed,
    slice_offsets)."""
    w = _place(draw_values(case, "weight", (case.n, case.k), case.dtype, std=case.k ** -0.5 if case.k else 1.0),
               case.layout, device, case.dtype)
    bias = None
    if case.bias:
        bias = _place(draw_values(case, "bias", (case.n,), case.dtype), case.layout, device, case.dtype)
    args = (_x(case, device), w, bias, _lora_a(case, device), _lora_b(case, device), case.scale, case.p,
            seed_for(case), list(case.offsets))
    names = ("x", "weight", "bias", "lora_a", "lora_b", "scale", "dropout_p", "seed", "slice_offsets")
    return Sample("lora_linear", case, args, {}, names)

