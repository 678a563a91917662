"""loracuda.AdapterPool: many adapters in one batch of a tiny Llama / GPT-2.

- A mixed batch (1 to 64 distinct adapters of different ranks and targets, some sequences without an
  adapter) equals PEFT's mixed batch (``adapter_names``) and each sequence run alone through a model
  with loracuda.load_adapter, under the tolerance rule (DESIGN.md §7; float64 reference: PEFT's mixed
  batch on a float64 copy of the model); rows with id -1 equal the base model bit for bit.
- Per-token ids against the pool run on the plain-PyTorch reference ops (float32 and float64).
- Loading, unloading and reloading slots equals a fresh pool bit for bit.
- Every error (ids, full pool, ranks, files, misuse) leaves every buffer and slot as it was.
- torch.compile(fullgraph=True): equal to eager, and no recompile for new ids or a newly loaded slot.
"""

import contextlib
import copy
import os
import threading

import peft
import pytest
import torch

import loracuda
from conftest import DEVICES, snapshot, assert_unchanged, use_device
from loracuda import AdapterPool, LoraConfig, reference
from loracuda.benchmarking.providers import lora_layers_calling, reference_layer_call
from loracuda.serving import layer as pooled_layer
from tiny_models import BUILDERS, assert_within_rule, ids as token_batch, randomize_adapters

OPS = ("multi_shrink", "multi_expand_add_")
MAX_ADAPTERS, MAX_RANK = 64, 16
LENGTH = 7

# Adapter configs (cycled): ranks 1..16, different targets, rank / alpha patterns, rsLoRA.
CONFIGS = {
    "llama": [
        dict(r=4, alpha=8, target_modules="all-linear"),
        dict(r=8, alpha=8, target_modules=["q_proj", "v_proj"]),
        dict(r=2, alpha=6, target_modules=["o_proj", "down_proj", "up_proj"], use_rslora=True),
        dict(r=16, alpha=16, target_modules="all-linear", rank_pattern={"v_proj": 3},
             alpha_pattern={r"layers\.1\.mlp\.up_proj": 5}),
        dict(r=1, alpha=3, target_modules=["k_proj", "gate_proj"], layers_to_transform=[1]),
        dict(r=6, alpha=12, target_modules="all-linear", exclude_modules=["q_proj"]),
    ],
    "gpt2": [
        dict(r=4, alpha=8, target_modules="all-linear"),
        dict(r=8, alpha=4, target_modules=["c_attn"]),
        dict(r=3, alpha=6, target_modules=["c_fc", "c_proj"], use_rslora=True),
    ],
}


def adapter_config(model_name: str, i: int) -> LoraConfig:
    return LoraConfig(**CONFIGS[model_name][i % len(CONFIGS[model_name])])


def save(tmp_path, base, config: LoraConfig, seed: int, name: str) -> str:
    """An adapter folder written by loracuda for ``base`` with random factors."""
    model = copy.deepcopy(base)
    loracuda.inject(model, config)
    randomize_adapters(model, seed=seed)
    folder = os.path.join(str(tmp_path), name)
    loracuda.save_adapter(model, folder)
    return folder


def out(model, tokens, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        result = model(tokens, **kwargs)
    return result.logits if hasattr(result, "logits") else result


def slot_of(i: int) -> int:
    """Adapter i goes to a slot that is not i (a permutation of the 64 slots), so ids name slots."""
    return (37 * i + 5) % MAX_ADAPTERS


def pool_state(pool: AdapterPool) -> dict:
    return snapshot({name: b for name, b in pool.model.named_buffers() if "lora_" in name or name.endswith(("scales", "ranks"))})


def assert_pool_unchanged(pool: AdapterPool, before: dict, slots: dict, context: str) -> None:
    now = {name: b for name, b in pool.model.named_buffers() if "lora_" in name or name.endswith(("scales", "ranks"))}
    assert_unchanged(before, now, context)
    assert pool.slots == slots, context
    assert pool._state.ids is None, context


# ---- mixed batches against PEFT and against each sequence alone ---------------------------------


def mixed_case(tmp_path, model_name: str, n: int, device, length: int = LENGTH):
    """(base model, pool with n adapters, folders, adapter index per sequence (-1: none), tokens)."""
    base = BUILDERS[model_name]()
    folders = [save(tmp_path, base, adapter_config(model_name, i), seed=100 + i, name=f"a{i}") for i in range(n)]
    # Every adapter once, one sequence without adapter, a second sequence of adapter 0; not sorted.
    which = list(range(n)) + [-1, 0]
    order = torch.randperm(len(which), generator=torch.Generator().manual_seed(n)).tolist()
    which = [which[j] for j in order]
    tokens = token_batch(batch=len(which), length=length, seed=n)
    pool = AdapterPool(copy.deepcopy(base).to(device), max_adapters=MAX_ADAPTERS, max_rank=MAX_RANK)
    for i, folder in enumerate(folders):
        assert pool.load(folder, slot=slot_of(i)) == slot_of(i)
    return base, pool, folders, which, tokens


def peft_mixed(base, folders, which, tokens, dtype, device) -> torch.Tensor:
    model = copy.deepcopy(base).to(device=device, dtype=dtype)
    model = peft.PeftModel.from_pretrained(model, folders[0], adapter_name="a0")
    for i, folder in enumerate(folders[1:], start=1):
        model.load_adapter(folder, adapter_name=f"a{i}")
    model.eval()
    names = ["__base__" if i < 0 else f"a{i}" for i in which]
    return out(model, tokens.to(device), adapter_names=names).double().cpu()


@pytest.mark.parametrize("device_name", DEVICES)
@pytest.mark.parametrize(
    "model_name,n,length", [("llama", 1, LENGTH), ("llama", 8, LENGTH), ("llama", 8, 1), ("llama", 64, LENGTH), ("gpt2", 5, LENGTH)]
)
def test_mixed_batch_matches_peft_and_each_sequence_alone(tmp_path, device_name, model_name, n, length):
    """length 1: one token per sequence, the decode step's shape."""
    device = use_device(device_name, *OPS)
    base, pool, folders, which, tokens = mixed_case(tmp_path, model_name, n, device, length)
    ids = torch.tensor([slot_of(i) if i >= 0 else -1 for i in which])
    with pool.batch(ids):
        ours = out(pool.model, tokens.to(device)).double().cpu()
    plain = peft_mixed(base, folders, which, tokens, torch.float32, device)
    ref64 = peft_mixed(base, folders, which, tokens, torch.float64, "cpu")
    base_out = out(pool.model, tokens.to(device)).double().cpu()  # outside the batch: the base model
    # Each sequence alone, through loracuda.load_adapter's model with the layers on the plain-PyTorch
    # reference formula: the same thing computed in float32 by plain PyTorch.
    alone = torch.zeros_like(ours)
    alone_models = {}
    for b, i in enumerate(which):
        if i < 0:
            assert torch.equal(ours[b], base_out[b]), f"sequence {b} without adapter differs from the base model"
            continue
        assert not torch.equal(ours[b], base_out[b]), f"sequence {b}: adapter {i} changed nothing"
        if i not in alone_models:
            alone_models[i] = loracuda.load_adapter(copy.deepcopy(base).to(device), folders[i])
        with lora_layers_calling(reference_layer_call):
            alone[b] = out(alone_models[i], tokens[b : b + 1].to(device)).double().cpu()[0]
    # The rule over the sequences with an adapter (a wrong adapter or scale in any one of them is off
    # by about 1e-2, far above the float32 rounding errors compared here).
    rows = [b for b, i in enumerate(which) if i >= 0]
    assert_within_rule(ours[rows], plain[rows], ref64[rows])
    assert_within_rule(ours[rows], alone[rows], ref64[rows])


@pytest.mark.parametrize("device_name", DEVICES)
def test_outside_a_batch_and_all_minus_one_is_the_base_model_bitwise(tmp_path, device_name):
    device = use_device(device_name, *OPS)
    base, pool, _, _, tokens = mixed_case(tmp_path, "llama", 3, device)
    expected = out(copy.deepcopy(base).to(device), tokens.to(device))
    assert torch.equal(out(pool.model, tokens.to(device)), expected)
    with pool.batch(torch.full((tokens.shape[0],), -1)):
        assert torch.equal(out(pool.model, tokens.to(device)), expected)
    with pool.batch(torch.full(tokens.shape, -1)):
        assert torch.equal(out(pool.model, tokens.to(device)), expected)


# ---- per-token ids --------------------------------------------------------------------------------


@contextlib.contextmanager
def reference_ops():
    """The pooled layers call loracuda.reference's multi ops instead of the kernels."""

    def expand_add_(y, h, lora_b_all, scales, ranks, adapter_ids, slice_offsets=()):
        y.copy_(reference.multi_expand_add(y, h, lora_b_all, scales, ranks, adapter_ids, slice_offsets))

    class RefOps:
        multi_shrink = staticmethod(reference.multi_shrink)
        multi_expand_add_ = staticmethod(expand_add_)

    saved = pooled_layer.ops
    pooled_layer.ops = RefOps
    try:
        yield
    finally:
        pooled_layer.ops = saved


@pytest.mark.parametrize("device_name", DEVICES)
def test_per_token_ids_match_the_reference(tmp_path, device_name):
    device = use_device(device_name, *OPS)
    base, pool, folders, which, tokens = mixed_case(tmp_path, "llama", 6, device)
    g = torch.Generator().manual_seed(5)
    choices = torch.tensor([-1] + [slot_of(i) for i in range(6)])
    ids = choices[torch.randint(0, len(choices), tokens.shape, generator=g)]
    with pool.batch(ids):
        ours = out(pool.model, tokens.to(device)).double().cpu()
        with reference_ops():
            plain = out(pool.model, tokens.to(device)).double().cpu()
    pool64 = AdapterPool(copy.deepcopy(base).double(), max_adapters=MAX_ADAPTERS, max_rank=MAX_RANK)
    for i, folder in enumerate(folders):
        pool64.load(folder, slot=slot_of(i))
    with pool64.batch(ids), reference_ops():
        ref64 = out(pool64.model, tokens).cpu()
    assert_within_rule(ours, plain, ref64)
    # Per-token ids that repeat one id along each sequence are the per-sequence batch, bit for bit.
    per_seq = torch.tensor([slot_of(i) if i >= 0 else -1 for i in which])
    with pool.batch(per_seq):
        a = out(pool.model, tokens.to(device))
    with pool.batch(per_seq[:, None].expand(tokens.shape).contiguous()):
        b = out(pool.model, tokens.to(device))
    assert torch.equal(a, b)


# ---- slots: load, unload, reload -----------------------------------------------------------------


@pytest.mark.parametrize("device_name", DEVICES)
def test_load_unload_reload_equals_a_fresh_pool(tmp_path, device_name):
    device = use_device(device_name, *OPS)
    base = BUILDERS["llama"]()
    folders = [save(tmp_path, base, adapter_config("llama", i), seed=200 + i, name=f"a{i}") for i in range(5)]
    # A reload with a smaller rank and fewer targets than slot 0 had: the padding and untargeted
    # layers must be cleared.
    small = save(tmp_path, base, LoraConfig(r=1, alpha=2, target_modules=["q_proj"]), seed=299, name="small")
    tokens = token_batch(batch=4, length=LENGTH, seed=7, device=device)
    pool = AdapterPool(copy.deepcopy(base).to(device), max_adapters=4, max_rank=MAX_RANK)
    assert [pool.load(f) for f in folders[:3]] == [0, 1, 2]
    ids = torch.tensor([0, 1, 2, -1])
    with pool.batch(ids):
        out(pool.model, tokens)
    pool.unload(1)
    assert pool.load(folders[3]) == 1  # the first free slot
    assert pool.load(folders[3]) == 3
    pool.unload(3)
    assert pool.load(small, slot=0) == 0  # in place
    fresh = AdapterPool(copy.deepcopy(base).to(device), max_adapters=4, max_rank=MAX_RANK)
    fresh.load(small, slot=0)
    fresh.load(folders[3], slot=1)
    fresh.load(folders[2], slot=2)
    assert pool.slots == fresh.slots
    assert_unchanged(pool_state(fresh), dict(pool.model.named_buffers()), "reloaded pool against a fresh pool")
    with pool.batch(ids):
        got = out(pool.model, tokens)
    with fresh.batch(ids):
        expected = out(fresh.model, tokens)
    assert torch.equal(got, expected)
    with pytest.raises(ValueError, match="slot 3 is not loaded"):
        with pool.batch(torch.tensor([3, 0, 0, 0])):
            pass
    with pytest.raises(ValueError, match="slot 3 is not loaded"):
        pool.unload(3)


def test_factor_dtype_and_buffers(device):
    base = BUILDERS["llama"](dtype=torch.bfloat16, device=device)
    pool = AdapterPool(base, max_adapters=3, max_rank=5)
    layer = base.get_submodule("model.layers.0.self_attn.q_proj")
    assert isinstance(layer, loracuda.serving.PooledLinear)
    n, k = layer.base_layer.weight.shape
    assert layer.lora_a_all.shape == (3, 5, k) and layer.lora_a_all.dtype == torch.float32
    assert layer.lora_b_all.shape == (3, n, 5) and layer.lora_b_all.dtype == torch.float32
    assert layer.ranks.dtype == torch.int32 and layer.scales.dtype == torch.float32
    assert all(b.device == layer.base_layer.weight.device for b in layer.buffers())
    assert not isinstance(base.lm_head, loracuda.serving.PooledLinear)  # all-linear leaves the head out
    assert not any(p.requires_grad for p in base.parameters())
    assert not any("lora_a_all" in k for k in base.state_dict())
    # float64 stays on the CPU (no float64 CUDA kernels).
    pool64 = AdapterPool(BUILDERS["mlp"](dtype=torch.float64), max_adapters=2, max_rank=2, target_modules=["fc1"])
    assert pool64.layer_paths == ["fc1"]
    assert pool64.model.fc1.lora_a_all.dtype == torch.float64


@pytest.mark.parametrize("device_name", DEVICES)
def test_bfloat16_model_matches_peft(tmp_path, device_name):
    device = use_device(device_name, *OPS)
    base = BUILDERS["llama"]()
    folders = [save(tmp_path, base, adapter_config("llama", i), seed=300 + i, name=f"a{i}") for i in range(3)]
    which = [2, -1, 0, 1]
    tokens = token_batch(batch=len(which), length=LENGTH, seed=3)
    pool = AdapterPool(copy.deepcopy(base).to(device=device, dtype=torch.bfloat16), max_rank=MAX_RANK)
    slots = [pool.load(f) for f in folders]
    with pool.batch(torch.tensor([slots[i] if i >= 0 else -1 for i in which])):
        ours = out(pool.model, tokens.to(device)).double().cpu()
    plain = peft_mixed(base, folders, which, tokens, torch.bfloat16, device)
    ref64 = peft_mixed(copy.deepcopy(base).to(torch.bfloat16), folders, which, tokens, torch.float64, "cpu")
    for b in range(len(which)):
        assert_within_rule(ours[b], plain[b], ref64[b])


# ---- errors leave the pool as it was --------------------------------------------------------------


def write_bad_files(tmp_path, base, good: str) -> dict:
    """{what is wrong: (folder, the error's pattern)}."""
    import safetensors.torch

    cases = {}
    tensors = safetensors.torch.load_file(os.path.join(good, "adapter_model.safetensors"))

    def variant(name, change, pattern, config_change=None):
        folder = tmp_path / name
        folder.mkdir()
        cfg = open(os.path.join(good, "adapter_config.json")).read()
        if config_change is not None:
            cfg = config_change(cfg)
        (folder / "adapter_config.json").write_text(cfg)
        t = dict(tensors)
        change(t, folder)
        if t and not (folder / "adapter_model.safetensors").exists():
            safetensors.torch.save_file(t, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
        cases[name] = (str(folder), pattern)

    key = sorted(k for k in tensors if "lora_A" in k)[0]
    variant("missing_key", lambda t, f: t.pop(key), "missing keys")
    variant("wrong_shape", lambda t, f: t.__setitem__(key, t[key][:, :-1].contiguous()), "has shape")
    variant("nan", lambda t, f: t.__setitem__(key, t[key] * float("nan")), "NaN")

    def truncate(t, f):
        safetensors.torch.save_file(t, str(f / "adapter_model.safetensors"), metadata={"format": "pt"})
        data = (f / "adapter_model.safetensors").read_bytes()
        (f / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])

    variant("truncated", truncate, "truncated")

    def pickle(t, f):
        torch.save(t, str(f / "adapter_model.bin"))
        t.clear()

    variant("pickle", pickle, "pickle")
    variant("dora", lambda t, f: None, "use_dora", lambda cfg: cfg.replace('"use_dora": false', '"use_dora": true'))
    cases["bias"] = (save(tmp_path, base, LoraConfig(r=2, target_modules=["q_proj"], bias="all"), 9, "bias"), "bias='all'")
    cases["too_big"] = (
        save(tmp_path, base, LoraConfig(r=MAX_RANK + 1, target_modules=["q_proj"]), 9, "big"), "above the pool's max_rank"
    )
    cases["pattern_too_big"] = (
        save(tmp_path, base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": MAX_RANK + 3}), 9,
             "pbig"),
        f"rank {MAX_RANK + 3} at layer",
    )
    cases["head"] = (save(tmp_path, base, LoraConfig(r=2, target_modules=["lm_head"]), 9, "head"), "does not wrap")
    return cases


@pytest.mark.parametrize("device_name", DEVICES)
def test_errors_leave_the_pool_unchanged(tmp_path, device_name):
    device = use_device(device_name, *OPS)
    base = BUILDERS["llama"]()
    good = save(tmp_path, base, adapter_config("llama", 0), seed=400, name="good")
    pool = AdapterPool(copy.deepcopy(base).to(device), max_adapters=3, max_rank=MAX_RANK)
    pool.load(good, slot=1)
    before, slots = pool_state(pool), dict(pool.slots)
    for what, (folder, pattern) in write_bad_files(tmp_path, base, good).items():
        for slot in (None, 1):  # into a free slot, and reloading a loaded one in place
            with pytest.raises((ValueError, FileNotFoundError), match=pattern):
                pool.load(folder, slot=slot)
            assert_pool_unchanged(pool, before, slots, f"bad file {what}, slot {slot}")
    with pytest.raises(FileNotFoundError):
        pool.load(tmp_path / "absent")
    for bad_slot in (3, -1, 1.0, True):
        with pytest.raises(ValueError, match="argument 'slot'"):
            pool.load(good, slot=bad_slot)
    tokens = token_batch(batch=2, length=LENGTH).to(device)
    for ids, pattern in [
        (torch.tensor([3, -1]), r"holds 3; ids must be in \[-1, max_adapters = 3\)"),
        (torch.tensor([-2, 1]), "holds -2"),
        (torch.tensor([0, 1]), "slot 0 is not loaded"),
        (torch.tensor([[1, 2] * 4, [1] * 8]), "slot 2 is not loaded"),
    ]:
        for where in ("cpu", device):
            with pytest.raises(ValueError, match=pattern):
                with pool.batch(ids.to(where)):
                    pass
            assert_pool_unchanged(pool, before, slots, f"ids {ids.tolist()}")
    with pytest.raises(TypeError, match="must hold integers"):
        pool.batch(torch.tensor([1.0, 1.0])).__enter__()
    with pytest.raises(ValueError, match=r"\[batch\] \(per sequence\)"):
        pool.batch(torch.ones(2, 2, 2, dtype=torch.long)).__enter__()
    # Misuse: nesting, loading inside a batch, ids that do not fit the input.
    with pool.batch(torch.tensor([1, -1])):
        with pytest.raises(RuntimeError, match="already open"):
            with pool.batch(torch.tensor([1, 1])):
                pass
        with pytest.raises(RuntimeError, match="a batch is open"):
            pool.load(good)
        with pytest.raises(RuntimeError, match="a batch is open"):
            pool.unload(1)
        with pytest.raises(ValueError, match="2 per-sequence adapter ids"):
            out(pool.model, token_batch(batch=3, length=LENGTH).to(device))
    # Another thread opens its own batch of the same pool while one is open here: allowed, each thread
    # sees its own ids (tests/test_threads.py checks the outputs).
    seen = []

    def other_thread():
        with pool.batch(torch.tensor([1, 1])):
            seen.append(pool._state.ids.tolist())

    with pool.batch(torch.tensor([1, -1])):
        worker = threading.Thread(target=other_thread)
        worker.start()
        worker.join()
        assert pool._state.ids.tolist() == [1, -1]
    assert seen == [[1, 1]]
    with pool.batch(torch.ones(2, LENGTH + 1, dtype=torch.long)):
        with pytest.raises(ValueError, match="per-token adapter ids of shape"):
            out(pool.model, tokens)
    assert_pool_unchanged(pool, before, slots, "misuse")
    # Full pool.
    pool.load(good)
    pool.load(good)
    full, full_slots = pool_state(pool), dict(pool.slots)
    with pytest.raises(RuntimeError, match="the pool is full"):
        pool.load(good)
    assert_pool_unchanged(pool, full, full_slots, "full pool")


def test_constructor_refuses_adapter_layers_and_bad_sizes():  # CPU only: refused before any tensor is made
    model = BUILDERS["llama"]()
    loracuda.inject(model, LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="loracuda adapter layer"):
        AdapterPool(model)
    theirs = peft.get_peft_model(BUILDERS["llama"](), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="PEFT adapter layer"):
        AdapterPool(theirs)
    plain = BUILDERS["llama"]()
    snap = snapshot(dict(plain.named_parameters()))
    for kwargs, pattern in [
        (dict(max_adapters=0), "max_adapters"),
        (dict(max_rank=0), "max_rank"),
        (dict(target_modules=["nope"]), "no module"),
        (dict(target_modules=["rotary_emb"]), "not an nn.Linear"),
    ]:
        with pytest.raises(ValueError, match=pattern):
            AdapterPool(plain, **kwargs)
    assert not any(isinstance(m, loracuda.serving.PooledLinear) for m in plain.modules())
    assert_unchanged(snap, dict(plain.named_parameters()), "refused pool")
    AdapterPool(plain, max_adapters=1, max_rank=1)
    with pytest.raises(ValueError, match="an AdapterPool's layer"):
        AdapterPool(plain)


# ---- torch.compile ----------------------------------------------------------------------------------


@pytest.mark.parametrize("device_name", DEVICES)
@pytest.mark.parametrize("model_name", ["llama", "mlp"])
def test_compile_fullgraph_no_recompile(tmp_path, model_name, device_name):
    import torch._dynamo

    device = use_device(device_name, *OPS)
    base = BUILDERS[model_name]()
    configs = [LoraConfig(r=4, alpha=8), LoraConfig(r=2, alpha=2), LoraConfig(r=8, alpha=4)]
    if model_name == "llama":
        configs[1] = LoraConfig(r=2, alpha=2, target_modules=["q_proj", "down_proj"])
    else:
        configs[1] = LoraConfig(r=2, alpha=2, target_modules=["fc2"])
    folders = [save(tmp_path, base, c, seed=500 + i, name=f"a{i}") for i, c in enumerate(configs)]
    pool = AdapterPool(copy.deepcopy(base).to(device), max_adapters=4, max_rank=8)
    pool.load(folders[0])
    pool.load(folders[1])
    tokens = token_batch(batch=3, length=LENGTH, seed=11, device=device)
    torch._dynamo.reset()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        # Through AOT autograd (functionalization of the in-place op), as every real backend does.
        from torch._dynamo.backends.debugging import aot_eager

        return aot_eager(gm, example_inputs)

    compiled = torch.compile(pool.model, backend=backend, fullgraph=True)
    try:
        for ids, load in [([0, 1, -1], None), ([1, -1, 0], None), ([1, 1, 1], None), ([2, 0, -1], folders[2])]:
            if load is not None:
                assert pool.load(load) == 2
            ids = torch.tensor(ids)
            with pool.batch(ids):
                got = out(compiled, tokens)
                expected = out(pool.model, tokens)
            torch.testing.assert_close(got, expected, rtol=0, atol=0)
        assert len(graphs) == 1, f"{len(graphs)} graphs compiled; new ids or a new slot must not recompile"
    finally:
        torch._dynamo.reset()


# ---- the serving benchmark suite ---------------------------------------------------------------------


def test_bench_serving_suite_runs_and_writes_json(tmp_path):
    import json
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, LORACUDA_BENCH_TINY="1")
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    path = tmp_path / "serving.json"
    proc = subprocess.run(
        [sys.executable, "-m", "loracuda.cli.main", "bench", "--suite", "serving", "--quick", "--json", str(path)],
        cwd=root, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    cases = json.loads(path.read_text())["cases"]
    assert [c["shape"]["adapters"] for c in cases] == [1, 4]
    for case in cases:
        assert case["suite"] == "serving" and case["baseline"] == "base"
        assert set(case["results"]) == {"loracuda", "base", "peft"}
        for name, entry in case["results"].items():
            assert "error" not in entry, (name, entry)
            assert entry["median_ms"] > 0 and entry["x_base"] > 0
        assert case["results"]["base"]["x_base"] == pytest.approx(1.0)
        assert case["id"] in proc.stdout
