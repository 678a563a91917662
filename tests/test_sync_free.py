"""Host synchronisation on CUDA: what loracuda documents as free of it makes none, and what it documents
to synchronise does (loracuda/ops.py, loracuda/functional.py, loracuda/serving/pool.py).

torch.cuda.set_sync_debug_mode("error") makes torch raise at each synchronising call it instruments: a
blocking copy between host and device (``.item()``, ``.cpu()``, ``torch.tensor(..., device="cuda")``, a
blocking ``.to()``), ops that size their output from device data (``nonzero``, ``masked_select``,
boolean indexing) and stream / device synchronisation. Each case builds its inputs first, runs once
unchecked (lazy initialisation, and any error that has nothing to do with synchronisation, shows up
there), then runs again under the "error" mode. The cases documented to synchronise must raise there,
which also shows that the mode is on.

The "cpu" parameter is a dry run of the same cases without any check (torch has none for the CPU): it
keeps the cases' own code working on machines without a GPU; only the "cuda" parameter tests anything
about synchronisation.

torch sees only what goes through torch: a CUDA runtime call made by a launcher itself (cudaMemcpy,
cudaStreamSynchronize, ...) is invisible to the mode, so the launchers' sources are checked for the
runtime's synchronising calls too (test_launchers_make_no_synchronising_runtime_call, on every machine).
"""

import contextlib
import re
import warnings
from pathlib import Path

import pytest
import torch

import loracuda
from loracuda import AdapterPool, LoraConfig, ops
from loracuda.buildinfo import op_names
from conftest import use_device
from tiny_models import ids as token_batch, mlp, randomize_adapters


@contextlib.contextmanager
def host_syncs_raise(device: torch.device):
    """Within the block, a host synchronisation raises RuntimeError on CUDA; nothing is checked on the CPU."""
    if device.type != "cuda":
        yield
        return
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch warns that the mode is a prototype
        torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def _randn(g, *shape, device, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)


# ---- the cases: each builder makes its inputs and returns a callable that runs the code under test -----


def _shrink(dtype, adapter_dtype, m, k, r, dropout=None, layout="contiguous"):
    def build(device, tmp_path):
        g = torch.Generator().manual_seed(0)
        x = _randn(g, m, k, device=device, dtype=dtype)
        if layout == "transposed":  # column-major: the binding makes a unit-stride copy on the device
            x = x.t().contiguous().t()
        a = _randn(g, r, k, device=device, dtype=adapter_dtype, scale=k**-0.5)
        seeds = {
            None: None,
            "device seed": torch.tensor([1234], dtype=torch.int64, device=device),
            "cpu seed": torch.tensor([1234], dtype=torch.int64),
            "int seed": 1234,
        }
        return lambda: ops.shrink(x, a, 0.0 if dropout is None else 0.25, seeds[dropout])

    return build


def _expand(m, n, r, slices=(), y_layout="contiguous"):
    def build(device, tmp_path):
        g = torch.Generator().manual_seed(1)
        rank = r * max(1, len(slices) - 1)
        h = _randn(g, m, rank, device=device)
        b = _randn(g, n, r, device=device, scale=0.1)
        if y_layout == "row-strided":
            y = _randn(g, m, n + 11, device=device, dtype=torch.bfloat16)[:, :n]
            b = b.to(torch.bfloat16)
        elif y_layout == "one row, column stride 2":  # the binding updates a unit-stride copy, copies back
            y = _randn(g, n, 2, device=device)[:, 0].unsqueeze(0)
        else:
            y = _randn(g, m, n, device=device)
        return lambda: (ops.expand_add_(y, h, b, 0.5, slices), y)[1]

    return build


def _merge_inputs(device, transposed=False, dtype=torch.bfloat16, n=129, k=203, r=5):
    g = torch.Generator().manual_seed(2)
    w = _randn(g, *((k, n) if transposed else (n, k)), device=device, dtype=dtype, scale=0.02)
    a = _randn(g, r, k, device=device, dtype=dtype, scale=k**-0.5)
    b = _randn(g, n, r, device=device, dtype=dtype, scale=0.1)
    return w, a, b


def _merge(transposed):
    def build(device, tmp_path):
        w, a, b = _merge_inputs(device, transposed)
        return lambda: (ops.merge_(w, a, b, 0.5, transposed), w)[1]

    return build


def _restore_codes(device, tmp_path):
    w, a, b = _merge_inputs(device)
    return lambda: ops.restore_codes(w, a, b, 0.5)


def _unmerge_without_escape_values(device, tmp_path):
    w, a, b = _merge_inputs(device)
    codes = ops.restore_codes(w, a, b, 0.5)
    ops.merge_(w, a, b, 0.5)
    return lambda: (ops.unmerge_exact_(w, a, b, 0.5, codes), w)[1]


def _backward(with_grad_x, dropout, slices=()):
    def build(device, tmp_path):
        g = torch.Generator().manual_seed(3)
        m, k, n, r = 70, 203, 300, 24
        s = max(1, len(slices) - 1)
        x = _randn(g, m, k, device=device, dtype=torch.bfloat16)
        a = _randn(g, s * r, k, device=device, dtype=torch.bfloat16, scale=k**-0.5)
        b = _randn(g, n, r, device=device, dtype=torch.bfloat16, scale=0.1)
        seed = torch.tensor([99], dtype=torch.int64, device=device) if dropout else None
        p = 0.25 if dropout else 0.0
        h = ops.shrink(x, a, p, seed)
        dy = _randn(g, m, n, device=device, dtype=torch.bfloat16)
        gx = torch.zeros(m, k, device=device, dtype=torch.bfloat16) if with_grad_x else None
        return lambda: ops.backward(dy, x, h, a, b, 0.5, p, seed, slices, gx) + ((gx,) if with_grad_x else ())

    return build


def _multi(m):
    """multi_shrink then multi_expand_add_, ids with -1 and a rank-0 slot; M <= 64: the decode path."""

    def build(device, tmp_path):
        g = torch.Generator().manual_seed(4)
        k, n, r_max, slots = 264, 136, 16, 3
        x = _randn(g, m, k, device=device, dtype=torch.bfloat16)
        a_all = _randn(g, slots, r_max, k, device=device, scale=k**-0.5)
        b_all = _randn(g, slots, n, r_max, device=device, scale=0.1)
        ranks = torch.tensor([r_max, 0, 3], dtype=torch.int32).to(device)
        scales = torch.tensor([0.5, 2.0, -1.0]).to(device)
        ids = torch.tensor([0, 2, -1, 1, 2, 0, -1, 2], dtype=torch.int32).repeat(m // 8 + 1)[:m].to(device)
        y = _randn(g, m, n, device=device, dtype=torch.bfloat16)

        def run():
            h = ops.multi_shrink(x, a_all, ranks, ids, 1)
            ops.multi_expand_add_(y, h, b_all, scales, ranks, ids)
            return h, y

        return run

    return build


def _lora_linear(seed=None, autocast=False):
    """loracuda.lora_linear forward and backward through autograd, with dropout in training."""

    def build(device, tmp_path):
        g = torch.Generator().manual_seed(5)
        m, k, n, r = 37, 96, 80, 8
        dtype = torch.float32 if autocast else torch.bfloat16
        x = _randn(g, m, k, device=device, dtype=dtype).requires_grad_(True)
        w = _randn(g, n, k, device=device, dtype=dtype, scale=k**-0.5)
        bias = _randn(g, n, device=device, dtype=dtype)
        a = _randn(g, r, k, device=device, scale=k**-0.5).requires_grad_(True)  # float32 factors
        b = _randn(g, n, r, device=device, scale=0.1).requires_grad_(True)
        dy = _randn(g, m, n, device=device, dtype=torch.bfloat16)

        def run():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                y = loracuda.lora_linear(x, w, bias, a, b, 2.0, dropout_p=0.1, training=True, seed=seed)
            y.backward(dy)
            return y.detach(), x.grad, a.grad, b.grad

        return run

    return build


def _grouped_lora_linear(seed=None):
    """loracuda.grouped_lora_linear forward and backward (PEFT-layout factor views, ids with -1 and an
    empty group, dropout): the ids are never read on the host on CUDA."""

    def build(device, tmp_path):
        g = torch.Generator().manual_seed(6)
        m, k, n, r, groups = 61, 96, 80, 8, 5
        x = _randn(g, m, k, device=device, dtype=torch.bfloat16).requires_grad_(True)
        w = _randn(g, groups, n, k, device=device, dtype=torch.bfloat16, scale=k**-0.5)
        a_flat = _randn(g, r * groups, k, device=device, scale=k**-0.5).requires_grad_(True)
        b_flat = _randn(g, n, r * groups, device=device, scale=0.1).requires_grad_(True)
        ids = (torch.arange(m) % 6 - 1).masked_fill(torch.arange(m) % 6 == 3, 0).to(device)  # -1..4, group 2 empty
        dy = _randn(g, m, n, device=device, dtype=torch.bfloat16)

        def run():
            la, lb = ops.grouped_factor_views(a_flat, b_flat, groups)
            y = loracuda.grouped_lora_linear(x, w, la, lb, ids, 2.0, dropout_p=0.1, training=True, seed=seed)
            y.backward(dy)
            return y.detach(), x.grad, a_flat.grad, b_flat.grad

        return run

    return build


def _injected_model(device, tmp_path):
    """A model with LoRALinear layers (dropout, training): forward, loss and backward."""
    model = mlp(device=device)
    loracuda.inject(model, LoraConfig(r=4, alpha=8, dropout=0.1, target_modules=["fc1", "fc2", "out"]))
    randomize_adapters(model)
    model.train()
    tokens = token_batch(batch=3, length=11, device=device)

    def run():
        loss = model(tokens).float().square().mean()
        loss.backward()
        return (loss.detach(),) + tuple(p.grad for p in model.parameters() if p.requires_grad)

    return run


def _pool(device, tmp_path):
    """An AdapterPool over a model whose layers are all pooled; per-sequence ids and their validation."""
    source = mlp()
    loracuda.inject(source, LoraConfig(r=4, alpha=8, target_modules=["fc1", "fc2"]))
    randomize_adapters(source)
    loracuda.save_adapter(source, tmp_path / "adapter")
    pool = AdapterPool(mlp(device=device), max_adapters=4, max_rank=8)
    pool.load(tmp_path / "adapter", slot=2)
    return pool, token_batch(batch=3, length=11, device=device)


def _pool_batch_with_cpu_ids(device, tmp_path):
    """Documented: CPU ids are checked on the host and copied to the device without blocking; the pooled
    forward reads them from the device."""
    pool, tokens = _pool(device, tmp_path)
    cpu_ids = torch.tensor([2, -1, 2])

    def run():
        with pool.batch(cpu_ids):
            return pool.model(tokens)

    return run


def _pooled_forward(device, tmp_path):
    """Documented: no synchronisation inside the forward, whatever the ids' device (validated at entry)."""
    pool, tokens = _pool(device, tmp_path)
    batch = pool.batch(torch.tensor([2, -1, 2]).to(device))
    batch.__enter__()  # validated here, outside the check

    def run():
        return pool.model(tokens)

    run.close = lambda: batch.__exit__(None, None, None)  # the test closes the batch when done
    return run


SYNC_FREE = {
    "shrink fp32": _shrink(torch.float32, torch.float32, 37, 203, 5),
    "shrink bf16 (tensor cores)": _shrink(torch.bfloat16, torch.bfloat16, 300, 264, 16),
    "shrink bf16 x, fp32 factors": _shrink(torch.bfloat16, torch.float32, 300, 264, 16),
    "shrink decode M=1 K=8192": _shrink(torch.bfloat16, torch.bfloat16, 1, 8192, 16),
    "shrink column-major x": _shrink(torch.bfloat16, torch.bfloat16, 37, 203, 5, layout="transposed"),
    "shrink dropout, device seed": _shrink(torch.bfloat16, torch.bfloat16, 37, 203, 5, "device seed"),
    "shrink dropout, cpu seed": _shrink(torch.bfloat16, torch.bfloat16, 37, 203, 5, "cpu seed"),
    "shrink dropout, int seed": _shrink(torch.bfloat16, torch.bfloat16, 37, 203, 5, "int seed"),
    "expand_add_": _expand(37, 129, 5),
    "expand_add_ three slices": _expand(37, 129, 5, (0, 40, 41, 129)),
    "expand_add_ row-strided y": _expand(37, 129, 5, y_layout="row-strided"),
    "expand_add_ one-row y, column stride": _expand(1, 129, 5, y_layout="one row, column stride 2"),
    "merge_": _merge(False),
    "merge_ transposed": _merge(True),
    "restore_codes": _restore_codes,
    "unmerge_exact_ without escape_values": _unmerge_without_escape_values,
    "backward": _backward(True, False),
    "backward without grad_x": _backward(False, False),
    "backward dropout, three slices": _backward(True, True, (0, 100, 261, 300)),
    "multi ops, decode M=37": _multi(37),
    "multi ops, prefill M=150": _multi(150),
    "lora_linear fwd+bwd, drawn seed": _lora_linear(),
    "lora_linear fwd+bwd, int seed": _lora_linear(seed=7),
    "lora_linear fwd+bwd, autocast": _lora_linear(autocast=True),
    "grouped_lora_linear fwd+bwd, drawn seed": _grouped_lora_linear(),
    "grouped_lora_linear fwd+bwd, int seed": _grouped_lora_linear(seed=7),
    "LoRALinear model fwd+bwd": _injected_model,
    "AdapterPool.batch with cpu ids + forward": _pool_batch_with_cpu_ids,
    "pooled forward, ids validated": _pooled_forward,
}


@pytest.mark.parametrize("case", list(SYNC_FREE))
def test_documented_sync_free(case, device, tmp_path):
    use_device(device.type, *op_names())
    run = SYNC_FREE[case](device, tmp_path)
    try:
        run()  # unchecked: lazy initialisation happens here
        with host_syncs_raise(device):
            outputs = run()
    finally:
        getattr(run, "close", lambda: None)()
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    for i, out in enumerate(outputs):
        assert torch.isfinite(out).all(), f"{case}: output {i} is not finite"


# ---- documented to synchronise: under the "error" mode they raise ------------------------------------------


def _item(device, tmp_path):
    t = torch.ones(3, device=device)
    return lambda: t.sum().item()


def _merge_exact(device, tmp_path):
    w, a, b = _merge_inputs(device)
    return lambda: ops.merge_exact_(w, a, b, 0.5)


def _merge_exact_without_escapes(device, tmp_path):
    """A zero delta: no element escapes, and the op still counts the escapes on the host."""
    w, a, b = _merge_inputs(device)
    return lambda: ops.merge_exact_(w, a, torch.zeros_like(b), 0.5)


def _unmerge_with_escape_values(device, tmp_path):
    w, a, b = _merge_inputs(device)
    codes, escapes = ops.merge_exact_(w, a, b, 0.5)
    return lambda: ops.unmerge_exact_(w, a, b, 0.5, codes, escape_values=escapes)


def _pool_batch_with_device_ids(device, tmp_path):
    pool, _ = _pool(device, tmp_path)
    ids = torch.tensor([2, -1, 2]).to(device)

    def run():
        with pool.batch(ids):  # validated on the host: one copy of the ids to the host
            pass

    return run


SYNCHRONISING = {
    "tensor.item() (the check itself)": _item,
    "merge_exact_": _merge_exact,
    "merge_exact_, no escapes": _merge_exact_without_escapes,
    "unmerge_exact_ with escape_values": _unmerge_with_escape_values,
    "AdapterPool.batch with device ids": _pool_batch_with_device_ids,
}


@pytest.mark.parametrize("case", list(SYNCHRONISING))
def test_documented_synchronising(case, device, tmp_path):
    use_device(device.type, *op_names())
    run = SYNCHRONISING[case](device, tmp_path)
    run()
    if device.type == "cuda":
        with pytest.raises(RuntimeError, match="synchroniz"):
            with host_syncs_raise(device):
                run()
    else:
        run()  # the dry run


# ---- what torch cannot see: the launchers' own CUDA runtime calls ------------------------------------------

CUDA_SOURCES = Path(__file__).resolve().parent.parent / "csrc" / "cuda"
# Runtime / driver API calls that block the host or synchronise the device (cudaMalloc and cudaFree
# included: cudaFree waits for the device, and allocations belong to torch's caching allocator).
_SYNCHRONISING_CALL = re.compile(
    r"\bcu(?:da)?(?:DeviceSynchronize|StreamSynchronize|EventSynchronize|CtxSynchronize|DeviceReset"
    r"|Memcpy(?:2D|3D)?(?:ToSymbol|FromSymbol|Peer)?|Memset(?:2D|3D)?|Malloc(?:Host|Managed|Pitch)?|HostAlloc"
    r"|Free(?:Host)?|MemAlloc|MemFree)\s*\("
)


def test_launchers_make_no_synchronising_runtime_call():
    sources = sorted(p for p in CUDA_SOURCES.iterdir() if p.suffix in (".cu", ".cuh", ".h", ".cpp"))
    assert any(p.suffix == ".cu" for p in sources), f"no CUDA sources found under {CUDA_SOURCES}"
    found = []
    for path in sources:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("//", 1)[0]
            for match in _SYNCHRONISING_CALL.finditer(code):
                found.append(f"{path.name}:{number}: {match.group(0)}")
    assert not found, "synchronising CUDA runtime calls in the launchers: " + "; ".join(found)
