"""The thread-safety contract (loracuda/__init__.py): concurrent merges of one model merge once;
batches of one AdapterPool in different threads each see their own ids, and a thread without a batch
sees the base model; pool.load waits for open batches. Barriers force the interleavings, many trials."""

import copy
import threading

import pytest
import torch

import loracuda
from loracuda import LoraConfig
from loracuda.inject import lora_layers
from tiny_models import ids as token_batch, mlp, randomize_adapters

TRIALS = 30


def merged_model():
    model = mlp(dtype=torch.bfloat16)
    loracuda.inject(model, LoraConfig(r=4, alpha=8))
    randomize_adapters(model, seed=4)
    return model


def run_together(*targets):
    """Runs each target in its own thread, released together by a barrier; re-raises the first error."""
    barrier = threading.Barrier(len(targets))
    errors = []

    def body(fn):
        barrier.wait()
        try:
            fn()
        except BaseException as error:  # noqa: BLE001 - reported to the test thread
            errors.append(error)

    threads = [threading.Thread(target=body, args=(fn,)) for fn in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def test_two_threads_merging_one_model_merge_once():
    template = merged_model()
    once = copy.deepcopy(template)
    loracuda.merge(once)
    for trial in range(TRIALS):
        model = copy.deepcopy(template)
        base = {p: layer.weight.detach().clone() for p, layer in lora_layers(model)}
        run_together(lambda: loracuda.merge(model), lambda: loracuda.merge(model))
        for (p, layer), (_, want) in zip(lora_layers(model), lora_layers(once)):
            assert torch.equal(layer.weight.view(torch.int16), want.weight.view(torch.int16)), f"trial {trial}: {p} merged twice"
        run_together(lambda: loracuda.unmerge(model), lambda: loracuda.unmerge(model))
        for p, layer in lora_layers(model):
            assert torch.equal(layer.weight.view(torch.int16), base[p].view(torch.int16)), f"trial {trial}: {p} not restored"
            assert not layer.merged


def pool_with_two(tmp_path):
    base = mlp()
    folders = []
    for i, r in enumerate((2, 4)):
        model = copy.deepcopy(base)
        loracuda.inject(model, LoraConfig(r=r, alpha=2 * r))
        randomize_adapters(model, scale_b=0.3, seed=10 + i)
        loracuda.save_adapter(model, tmp_path / f"a{i}")
        folders.append(tmp_path / f"a{i}")
    pool = loracuda.AdapterPool(copy.deepcopy(base), max_adapters=4, max_rank=4)
    for f in folders:
        pool.load(f)
    return base, pool


def test_batches_in_different_threads_see_their_own_ids(tmp_path):
    base, pool = pool_with_two(tmp_path)
    tokens = token_batch(batch=3, length=5)
    with torch.no_grad():
        want = {}
        for ids in ([0, 1, -1], [1, 1, 0]):
            with pool.batch(torch.tensor(ids)):
                want[tuple(ids)] = pool.model(tokens)
        plain = base(tokens)
    assert not torch.equal(want[(0, 1, -1)], want[(1, 1, 0)])
    for trial in range(TRIALS):
        inside = threading.Barrier(3)  # every thread runs its forward while the others' batches are open
        got = {}

        def serve(ids):
            def fn():
                with pool.batch(torch.tensor(ids)):
                    inside.wait()
                    with torch.no_grad():
                        got[tuple(ids)] = pool.model(tokens)
                    inside.wait()
            return fn

        def no_batch():
            inside.wait()
            with torch.no_grad():
                got["plain"] = pool.model(tokens)
            inside.wait()

        run_together(serve([0, 1, -1]), serve([1, 1, 0]), no_batch)
        for key, value in want.items():
            assert torch.equal(got[key], value), f"trial {trial}: batch {key} saw other ids"
        assert torch.equal(got["plain"], plain), f"trial {trial}: a forward without a batch saw another thread's ids"


def test_pool_load_waits_for_open_batches_and_refuses_inside_its_own(tmp_path):
    _, pool = pool_with_two(tmp_path)
    opened, order = threading.Event(), []

    def reader():
        with pool.batch(torch.tensor([0])):
            opened.set()
            threading.Event().wait(0.2)  # the writer is blocked meanwhile
            order.append("batch closed")

    def writer():
        opened.wait()
        pool.load(tmp_path / "a1", slot=2)
        order.append("loaded")

    run_together(reader, writer)
    assert order == ["batch closed", "loaded"]
    with pool.batch(torch.tensor([0])):
        with pytest.raises(RuntimeError, match="a batch is open in this thread"):
            pool.load(tmp_path / "a1", slot=3)
        with pytest.raises(RuntimeError, match="already open in this thread"):
            with pool.batch(torch.tensor([0])):
                pass
