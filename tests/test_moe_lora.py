"""LoRA on experts beyond PEFT equivalence: exact unmerge after merge, merge_and_unload, experts that
receive no token, several adapters, clear errors with the model unchanged, and the features that refuse
expert adapters by name."""

import copy

import pytest
import torch

import loracuda
from loracuda import experts as lx
from moe_models import EXPERT_TARGETS, mixtral, qwen3_moe, randomize, tokens


def injected(builder=qwen3_moe, dtype=torch.float32, targets=("q_proj",), scale_b=0.05, **kwargs):
    model = builder(dtype=dtype, **kwargs)
    loracuda.inject(model, loracuda.LoraConfig(r=4, alpha=8, target_modules=list(targets), target_parameters=EXPERT_TARGETS))
    randomize(model, scale_b=scale_b)
    return model


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_merge_unmerge_exact(dtype):
    model = injected(dtype=dtype, scale_b=0.002)  # a delta small beside the weights, as after training
    ids = tokens()
    before, unmerged = weights(model), logits(model, ids)
    report = loracuda.merge(model)
    assert any("experts.gate_up_proj" in k for k in report.layers) and any("experts.down_proj" in k for k in report.layers)
    merged = logits(model, ids)
    # Merged logits: the same model up to the rounding of the merged weights.
    tol = 2e-4 if dtype == torch.float32 else 0.1
    assert (merged - unmerged).abs().max() < tol * max(1.0, float(unmerged.abs().max()))
    changed = [n for n, w in weights(model).items() if "experts" in n and not torch.equal(w, before[n])]
    assert len(changed) == 4  # gate_up_proj and down_proj of both layers
    loracuda.unmerge(model)
    after = weights(model)
    for n, w in before.items():
        assert torch.equal(after[n].view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                           w.view(torch.int16 if dtype == torch.bfloat16 else torch.int32)), n
    assert torch.equal(logits(model, ids), unmerged)


def test_merge_and_unload_experts():
    model = injected(scale_b=0.002)
    ids = tokens()
    expected = logits(model, ids)
    plain = loracuda.merge_and_unload(model)
    assert not any(isinstance(m, (lx.LoRAExperts, loracuda.LoRALinear)) for m in plain.modules())
    assert type(plain.model.layers[0].mlp.experts).__name__ == "Qwen3MoeExperts"
    assert (logits(plain, ids) - expected).abs().max() < 2e-4 * max(1.0, float(expected.abs().max()))


class FixedRouter(torch.nn.Module):
    """A router that sends every token to experts 0 and 1 with weights 0.6 and 0.4."""

    def __init__(self, num_experts):
        super().__init__()
        self.num_experts = num_experts

    def forward(self, hidden):
        t = hidden.shape[0]
        index = torch.tensor([[0, 1]]).expand(t, 2)
        weights = torch.tensor([[0.6, 0.4]], dtype=hidden.dtype).expand(t, 2)
        return hidden.new_zeros(t, self.num_experts), weights, index


def test_unrouted_experts_get_zero_gradient():
    """Every token routed to experts 0 and 1 of 8: the other experts' factors get exactly zero gradient,
    the routed ones a non-zero one."""
    model = injected(targets=(), experts=8, top_k=2)
    for layer in model.model.layers:
        layer.mlp.gate = FixedRouter(8)
    ids = tokens()
    model.train()
    out = model(ids, labels=ids)
    out.loss.backward()
    for path, m in lx.expert_layers(model):
        for p in lx.EXPERT_PARAMS:
            for factor in (m.lora_A[p]["default"], m.lora_B[p]["default"]):
                g = factor.grad
                assert g is not None
                assert torch.count_nonzero(g[2:]) == 0, f"{path}.{p}: an unrouted expert has a gradient"
                assert torch.count_nonzero(g[0]) > 0 and torch.count_nonzero(g[1]) > 0, f"{path}.{p}"


def test_several_adapters_set_delete_disable(tmp_path):
    model = injected()
    ids = tokens()
    base = qwen3_moe()
    with_default = logits(model, ids)
    loracuda.inject(model, loracuda.LoraConfig(r=2, alpha=2, target_parameters=["mlp.experts.down_proj"]), adapter="b")
    randomize(model, seed=9)
    loracuda.set_adapter(model, "b")
    only_b = logits(model, ids)
    loracuda.set_adapter(model, ["default", "b"])
    both = logits(model, ids)
    assert not torch.allclose(only_b, both)
    with loracuda.disable_adapters(model):
        assert torch.allclose(logits(model, ids), logits(base, ids), atol=1e-5)
    loracuda.save_adapter(model, tmp_path, adapter="b")
    loracuda.delete_adapter(model, "b")
    assert all(m.adapters == ["default"] for _, m in lx.expert_layers(model))
    loracuda.load_adapter(model, tmp_path, adapter="b")
    loracuda.set_adapter(model, "b")
    assert torch.allclose(logits(model, ids), only_b, atol=1e-5)
    loracuda.delete_adapter(model, "b")
    loracuda.set_adapter(model, "default")
    assert not torch.allclose(with_default, only_b)
    loracuda.delete_adapter(model, "default")
    assert not list(lx.expert_layers(model))
    assert torch.allclose(logits(model, ids), logits(base, ids), atol=1e-6)


def _snapshot(model):
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


def _assert_same(model, snap):
    now = model.state_dict()
    assert set(now) == set(snap)
    for n, t in snap.items():
        assert torch.equal(now[n], t), n


def test_adapter_that_does_not_fit(tmp_path):
    """Expert count, rank and shapes checked before anything is written; the error names the key."""
    source = injected(experts=8)
    loracuda.save_adapter(source, tmp_path / "e8")
    for other, what in ((qwen3_moe(experts=4), "experts.base_layer.lora_A.weight"),
                        (qwen3_moe(experts=8, intermediate=16), "experts.lora_A.weight")):
        snap = _snapshot(other)
        with pytest.raises(ValueError, match="does not fit the model") as info:
            loracuda.load_adapter(other, tmp_path / "e8")
        assert what in str(info.value)
        _assert_same(other, snap)
        assert not list(lx.expert_layers(other)) and not hasattr(other, "loracuda_configs")
    # Existing adapter of another rank: the file's rank does not fit (no rank padding for experts).
    target = injected(experts=8)
    loracuda.delete_adapter(target, "default")
    loracuda.inject(target, loracuda.LoraConfig(r=2, alpha=2, target_parameters=EXPERT_TARGETS), adapter="default")
    snap = _snapshot(target)
    with pytest.raises(ValueError, match="has shape"):
        loracuda.load_adapter(target, tmp_path / "e8")
    _assert_same(target, snap)


def test_unknown_experts_layout_is_refused():
    model = qwen3_moe()
    experts = model.model.layers[0].mlp.experts
    experts.is_transposed = True
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=r"experts module 'model\.layers\.0\.mlp\.experts' \(Qwen3MoeExperts\).*is_transposed=True"):
        loracuda.inject(model, loracuda.LoraConfig(target_parameters=EXPERT_TARGETS))
    _assert_same(model, snap)
    assert not list(lx.expert_layers(model)) and not hasattr(model, "loracuda_configs")
    with pytest.raises(ValueError, match="matched no parameter"):
        loracuda.inject(qwen3_moe(), loracuda.LoraConfig(target_parameters=["mlp.experts.up_proj"]))
    with pytest.raises(ValueError, match="adapts only the experts"):
        loracuda.inject(qwen3_moe(), loracuda.LoraConfig(target_parameters=["mlp.gate.weight"]))


def test_features_without_expert_support_refuse_by_name(tmp_path):
    model = injected()
    loracuda.save_adapter(model, tmp_path)
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="target_parameters"):
        loracuda.hot_swap(model, tmp_path)
    _assert_same(model, snap)
    with pytest.raises(ValueError, match="target_parameters"):
        loracuda.combine_adapters(model, {"default": 1.0}, "sum")
    _assert_same(model, snap)
    pool = loracuda.AdapterPool(qwen3_moe(), max_adapters=2, max_rank=8, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="target_parameters"):
        pool.load(tmp_path)


def test_mixtral_experts_implementation_registered():
    """The base experts through the "loracuda" experts implementation equal transformers' own."""
    assert lx.register_experts_implementation()
    model = mixtral(experts=8, top_k=2)
    ids = tokens()
    expected = logits(model, ids)
    model.set_experts_implementation("loracuda")
    assert torch.allclose(logits(model, ids), expected, atol=1e-5, rtol=1e-5)


def _experts_reference(experts, hidden, index, weights, factors, seeds, p, dtype=torch.float64):
    """The experts' output in plain PyTorch (in ``dtype``): rows sorted by expert (stable), each adapted
    parameter's LoRA input dropped by the hash mask of its call's seed over the [S, K] sorted rows."""
    from loracuda import reference

    k = index.shape[1]
    ids, perm = torch.sort(index.reshape(-1), stable=True)
    x = hidden.to(dtype)[perm // k]

    def project(param, x, seed):
        w = getattr(experts, param).detach().to(dtype)[ids]  # [S, N, K]
        y = torch.einsum("snk,sk->sn", w, x)
        a, b, scale = factors[param]
        h = torch.einsum("srk,sk->sr", a[ids], reference.dropped(x, p, seed))
        return y + scale * torch.einsum("snr,sr->sn", b[ids], h)

    gate, up = project("gate_up_proj", x, seeds[0]).chunk(2, dim=-1)
    out = project("down_proj", experts.act_fn(gate) * up, seeds[1])
    out = out * weights.to(dtype).reshape(-1)[perm].unsqueeze(-1)
    return torch.zeros(hidden.shape, dtype=dtype).index_add_(0, perm // k, out)


@pytest.mark.skipif(getattr(loracuda, "grouped_lora_linear", None) is None,
                    reason="this build has no loracuda.grouped_lora_linear op (expert dropout needs it)")
def test_expert_dropout_is_the_seeded_hash_mask():
    """Dropout on expert LoRA: the mask of each grouped call is the hash of (its seed, row · K + column)
    over the sorted rows, the seed drawn from torch's generator (gate_up's first, then down's); forward
    and the factors' gradients against a float64 plain-PyTorch computation with those masks (and the
    same in float32 as the tolerance rule's plain result)."""
    from tiny_models import assert_within_rule

    p = 0.25
    model = qwen3_moe(experts=8, top_k=2)
    loracuda.inject(model, loracuda.LoraConfig(r=4, alpha=8, dropout=p, target_parameters=EXPERT_TARGETS))
    randomize(model)
    m = model.model.layers[0].mlp.experts
    m.train()
    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(20, 64, generator=g)
    index = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(20)])
    weights = torch.rand(20, 2, generator=g)
    torch.manual_seed(11)
    seeds = [int(torch.randint(0, 2**62, (1,))), int(torch.randint(0, 2**62, (1,)))]
    torch.manual_seed(11)
    ours = m(hidden, index, weights)
    ours.pow(2).sum().backward()
    results = {}
    for dtype in (torch.float64, torch.float32):
        factors = {q: (m.lora_A[q]["default"].detach().to(dtype).requires_grad_(),
                       m.lora_B[q]["default"].detach().to(dtype).requires_grad_(), m.scaling[(q, "default")])
                   for q in lx.EXPERT_PARAMS}
        out = _experts_reference(m.base_layer, hidden, index, weights, factors, seeds, p, dtype)
        out.pow(2).sum().backward()
        results[dtype] = (out.detach(), factors)
    undropped = _experts_reference(m.base_layer, hidden, index, weights, results[torch.float64][1], seeds, 0.0)
    assert not torch.allclose(ours.detach().double(), undropped.detach(), rtol=1e-3, atol=1e-4)
    assert_within_rule(ours.detach(), results[torch.float32][0], results[torch.float64][0])
    for q in lx.EXPERT_PARAMS:
        for i, name in enumerate(("lora_A", "lora_B")):
            got = getattr(m, name)[q]["default"].grad
            assert_within_rule(got, results[torch.float32][1][q][i].grad, results[torch.float64][1][q][i].grad, factor=3.0)
