"""LoRA on mixture-of-experts layers: LoRAExperts wraps a transformers experts module whose weights are
fused 3-D parameters (``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``; Qwen3-MoE, Mixtral, OLMoE and
every experts class decorated with transformers' ``use_experts_implementation``) and adds, per targeted
parameter, one low-rank adapter per expert: ``lora_A [E, r, K]`` and ``lora_B [E, N, r]``, so that
expert e's weight acts as ``W_e + s · B_e A_e``.

Forward (docs/design.md, section 'Mixture of experts'): the routed (token, expert) pairs are sorted by
expert once; the gathered rows go through one grouped LoRA linear call for gate_up (base GEMM + LoRA,
per row the weight of its expert), the experts module's own gate (``_apply_gate``: act(gate) * up), one
grouped call for down, then the routing-weighted sum back to the tokens. No ``[E, N, K]`` delta is
formed and there is no Python loop over experts in the adapter path; an expert that receives no token
costs nothing and gets a zero gradient.

Model parameter names: ``<experts path>.lora_A.<parameter>.<adapter>`` [E, r, K] and
``<experts path>.lora_B.<parameter>.<adapter>`` [E, N, r]. PEFT's files (``target_parameters``) hold
``A_flat [r·E, K]`` with ``A_e = A_flat.view(E, r, K)[e]`` and ``B_flat [N, r·E]`` with rank-major
columns, ``B_e[n, j] = B_flat[n, j·E + e]``; ``peft_factors`` / ``from_peft_factors`` convert.
"""

import math
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

EXPERT_PARAMS = ("gate_up_proj", "down_proj")
_FACTOR_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


# ---- layout -------------------------------------------------------------------------------------


def experts_layout(module: nn.Module, path: str) -> dict:
    """{"num_experts": E, "hidden": H, "intermediate": I} of an experts module loracuda can adapt, or a
    ValueError naming ``path`` and what does not fit. Known layout: 3-D ``gate_up_proj [E, 2I, H]`` (gate
    rows first, then up) and ``down_proj [E, H, I]``, no biases, not transposed, gated, no norm after
    the experts, not expert-parallel, and a gate function (``_apply_gate`` or ``act_fn``)."""
    name = type(module).__name__

    def refuse(reason: str):
        return ValueError(
            f"loracuda: experts module {path!r} ({name}) has a layout loracuda does not support: {reason}. "
            "Supported: gate_up_proj [E, 2I, H] and down_proj [E, H, I] (transformers' fused experts, "
            "is_transposed=False, has_bias=False, has_gate=True); the model is unchanged"
        )

    for flag, bad in (("is_transposed", True), ("has_bias", True), ("has_gate", False),
                      ("has_post_expert_norm", True), ("_is_expert_parallel", True)):
        if getattr(module, flag, not bad) == bad:
            raise refuse(f"{flag}={bad}")
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    if not isinstance(gate_up, Tensor) or not isinstance(down, Tensor):
        raise refuse("no 3-D tensors 'gate_up_proj' and 'down_proj'")
    if gate_up.dim() != 3 or down.dim() != 3:
        raise refuse(f"gate_up_proj {list(gate_up.shape)} and down_proj {list(down.shape)} must both be 3-D")
    e, two_i, h = gate_up.shape
    if two_i % 2 or tuple(down.shape) != (e, h, two_i // 2):
        raise refuse(
            f"gate_up_proj {list(gate_up.shape)} and down_proj {list(down.shape)} are not [E, 2I, H] and [E, H, I]"
        )
    if getattr(module, "num_experts", e) != e:
        raise refuse(f"num_experts={module.num_experts} but the weights hold {e} experts")
    if not (hasattr(module, "_apply_gate") or hasattr(module, "act_fn")):
        raise refuse("no gate function (_apply_gate or act_fn)")
    if not gate_up.is_floating_point():
        raise refuse(f"weights of dtype {gate_up.dtype} (quantized experts are not supported)")
    return {"num_experts": e, "hidden": h, "intermediate": two_i // 2}


def param_shape(layout: dict, param: str) -> tuple[int, int]:
    """(N, K): out and in features of one expert's slice of ``param``."""
    h, i = layout["hidden"], layout["intermediate"]
    return (2 * i, h) if param == "gate_up_proj" else (h, i)


def target_parameter_paths(model: nn.Module, target_parameters: Optional[Sequence[str]]) -> dict[str, list[str]]:
    """{experts module path: [targeted parameter names, in the module's registration order]} for
    ``target_parameters`` (PEFT's rule: "<module path>.<parameter>" equals an entry or ends with
    "." + entry). Raises ValueError, naming it, for a matched parameter loracuda cannot adapt and for
    an entry that matches nothing. Modifies nothing."""
    if not target_parameters:
        return {}
    targets = [target_parameters] if isinstance(target_parameters, str) else list(target_parameters)
    found: dict[str, list[str]] = {}
    used = set()
    wrappers = []
    for path, module in model.named_modules():
        if any(path.startswith(w + ".") for w in wrappers):
            continue  # inside a LoRAExperts: its base module is matched through the wrapper's path
        if isinstance(module, LoRAExperts):
            wrappers.append(path)
            module, owner = module.base_layer, path
        else:
            owner = path
        for pname, _ in module.named_parameters(recurse=False):
            key = f"{owner}.{pname}" if owner else pname
            hits = [t for t in targets if key == t or key.endswith("." + t)]
            if not hits:
                continue
            used.update(hits)
            if pname not in EXPERT_PARAMS:
                raise ValueError(
                    f"loracuda: target_parameters entry {hits[0]!r} matched {key!r}; loracuda adapts only the "
                    f"experts' {' and '.join(EXPERT_PARAMS)} parameters; the model is unchanged"
                )
            experts_layout(module, owner)
            found.setdefault(owner, []).append(pname)
    unused = [t for t in targets if t not in used]
    if unused:
        raise ValueError(f"loracuda: target_parameters entries {unused} matched no parameter of the model")
    return found


# ---- PEFT's flat factor layout ------------------------------------------------------------------


def peft_factors(lora_a: Tensor, lora_b: Tensor) -> tuple[Tensor, Tensor]:
    """(A_flat [r·E, K], B_flat [N, r·E]) in PEFT's layout from lora_a [E, r, K], lora_b [E, N, r]."""
    e, r, k = lora_a.shape
    n = lora_b.shape[1]
    return lora_a.reshape(e * r, k), lora_b.permute(1, 2, 0).reshape(n, r * e)


def from_peft_factors(a_flat: Tensor, b_flat: Tensor, num_experts: int) -> tuple[Tensor, Tensor]:
    """(lora_a [E, r, K], lora_b [E, N, r]) views of PEFT's A_flat [r·E, K] and B_flat [N, r·E]."""
    re_, k = a_flat.shape
    n = b_flat.shape[0]
    r = re_ // num_experts
    return a_flat.view(num_experts, r, k), b_flat.view(n, r, num_experts).permute(2, 0, 1)


# ---- the grouped computation --------------------------------------------------------------------


def _grouped_base(x: Tensor, weight: Tensor, counts: Tensor) -> Tensor:
    """y [S, N] = x[s] W_g(s)ᵀ for rows sorted by group, counts [G] rows per group (int64): torch's
    grouped_mm where it applies (float32 / bfloat16 / float16, rows of 16-byte multiples), else one
    matmul per non-empty group."""
    grouped_mm = getattr(torch.nn.functional, "grouped_mm", None)
    n, k = weight.shape[1], weight.shape[2]
    if (grouped_mm is not None and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and (k * x.element_size()) % 16 == 0 and (n * x.element_size()) % 16 == 0 and x.is_contiguous()
            and weight.is_contiguous()):
        offsets = torch.cumsum(counts, 0, dtype=torch.int32)
        return grouped_mm(x, weight.transpose(-2, -1), offs=offsets)
    parts, start = [], 0
    for g, c in enumerate(counts.tolist()):
        if c:
            parts.append(x[start : start + c] @ weight[g].t())
            start += c
    return torch.cat(parts, 0) if parts else x.new_zeros(0, n)


def _grouped_lora_fallback(x, weight, lora_a, lora_b, group_ids, scale, dropout_p, training):
    """grouped_lora_linear's meaning in plain PyTorch, for builds whose extension lacks the grouped op:
    rows must be sorted by group. One matmul per non-empty group; float32 accumulation of the adapter
    path, one rounding of base + adapter into x's dtype."""
    if dropout_p and training:
        raise NotImplementedError("loracuda: expert LoRA dropout needs the grouped_lora_linear op of this build")
    counts = torch.bincount(group_ids, minlength=weight.shape[0]).tolist()
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    parts, start = [], 0
    for g, c in enumerate(counts):
        if c == 0:
            continue
        xs = x[start : start + c]
        base = xs @ weight[g].t()
        lora = (xs.to(acc) @ lora_a[g].to(acc).t()) @ lora_b[g].to(acc).t()
        parts.append((base.to(acc) + scale * lora).to(x.dtype))
        start += c
    if not parts:
        return x.new_zeros(0, weight.shape[1])
    return torch.cat(parts, 0)


def grouped_lora(x, weight, lora_a, lora_b, group_ids, scale, dropout_p=0.0, training=True) -> Tensor:
    """loracuda.grouped_lora_linear where the build has it, else the plain-PyTorch fallback."""
    import loracuda

    op = getattr(loracuda, "grouped_lora_linear", None)
    if op is not None:
        return op(x, weight, lora_a, lora_b, group_ids, scale, dropout_p=dropout_p, training=training)
    return _grouped_lora_fallback(x, weight, lora_a, lora_b, group_ids, scale, dropout_p, training)


def _apply_gate(experts: nn.Module, gate_up: Tensor) -> Tensor:
    fn = getattr(experts, "_apply_gate", None)
    if fn is not None:
        return fn(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return experts.act_fn(gate) * up


def grouped_experts_forward(
    experts: nn.Module,
    hidden_states: Tensor,
    top_k_index: Tensor,
    top_k_weights: Tensor,
    adapters: Optional[dict] = None,
    training: bool = False,
) -> Tensor:
    """The experts' output [T, H] for hidden_states [T, H] routed by top_k_index / top_k_weights [T, k].

    adapters: {parameter name: (lora_a [E, r, K], lora_b [E, N, r], scale, dropout_p)} for the
    adapted parameters (others run their base weight only)."""
    adapters = adapters or {}
    num_tokens, hidden = hidden_states.shape
    top_k = top_k_index.shape[-1]
    num_experts = experts.gate_up_proj.shape[0]
    expert_ids = top_k_index.reshape(-1)
    # Sort the (token, slot) pairs by expert once: every grouped call below reads its rows in place.
    sorted_ids, perm = torch.sort(expert_ids, stable=True)
    rows = hidden_states[perm // top_k]  # [S, H]
    counts = None

    def project(param: str, x: Tensor) -> Tensor:
        nonlocal counts
        weight = getattr(experts, param)
        if x.dtype != weight.dtype:
            x = x.to(weight.dtype)
        if param in adapters:
            a, b, scale, p = adapters[param]
            return grouped_lora(x, weight, a, b, sorted_ids, scale, p, training)
        if counts is None:
            counts = torch.bincount(sorted_ids, minlength=num_experts)
        return _grouped_base(x, weight, counts)

    out = project("down_proj", _apply_gate(experts, project("gate_up_proj", rows)))  # [S, H]
    weighted = out * top_k_weights.reshape(-1)[perm].unsqueeze(-1)
    # Back to (token, slot) order and a sum over the k slots: deterministic (no atomics), and the sum
    # runs in the promoted dtype of the routing weights, as transformers' own implementations do.
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel(), device=perm.device)
    return weighted[inverse].view(num_tokens, top_k, hidden).sum(dim=1).to(hidden_states.dtype)


def loracuda_experts_forward(self: nn.Module, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
    """transformers experts implementation "loracuda" (base weights only): sorted rows, grouped GEMMs."""
    return grouped_experts_forward(self, hidden_states, top_k_index, top_k_weights)


def register_experts_implementation() -> bool:
    """Registers "loracuda" in transformers' ExpertsInterface (model.set_experts_implementation("loracuda")
    then runs the base experts through grouped_experts_forward). False when transformers lacks it."""
    try:
        from transformers.integrations.moe import ExpertsInterface
    except Exception:
        return False
    ExpertsInterface.register("loracuda", loracuda_experts_forward)
    return True


# ---- the wrapper module -------------------------------------------------------------------------


class LoRAExperts(nn.Module):
    """base_layer: a transformers experts module of the layout ``experts_layout`` accepts (its parameters
    are not copied). forward(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H].

    Attributes per (parameter, adapter): lora_A / lora_B (ModuleDict of ParameterDicts keyed by the
    parameter name), r, alpha, scaling, dropout_p (dicts keyed by (parameter, adapter)); active_adapters,
    disabled, merged ({(parameter, adapter): merge record})."""

    def __init__(self, base_layer: nn.Module, path: str = "experts"):
        super().__init__()
        self.layout = experts_layout(base_layer, path)
        self.num_experts = self.layout["num_experts"]
        self.base_layer = base_layer
        self.lora_A = nn.ModuleDict({p: nn.ParameterDict() for p in EXPERT_PARAMS})
        self.lora_B = nn.ModuleDict({p: nn.ParameterDict() for p in EXPERT_PARAMS})
        self.r: dict = {}
        self.alpha: dict = {}
        self.scaling: dict = {}
        self.dropout_p: dict = {}
        self.active_adapters: list[str] = []
        self.disabled = False
        self.merged: dict = {}

    @property
    def adapters(self) -> list[str]:
        seen = []
        for p in EXPERT_PARAMS:
            seen += [n for n in self.lora_A[p] if n not in seen]
        return seen

    def params_of(self, adapter: str) -> list[str]:
        """The parameters ``adapter`` adapts, in registration order."""
        return [p for p in EXPERT_PARAMS if adapter in self.lora_A[p]]

    def add_adapter(self, name: str, param: str, r: int, alpha: float, dropout: float = 0.0,
                    use_rslora: bool = False, init: str = "default", dtype: Optional[torch.dtype] = None) -> None:
        """Adds ``name`` on ``param``: lora_A [E, r, K] (default init: each expert's A Kaiming-uniform over
        its K inputs, as PEFT's nn.Linear(K, r·E)), lora_B [E, N, r] zero, so the output is unchanged."""
        if name in self.lora_A[param]:
            raise ValueError(f"loracuda.LoRAExperts.add_adapter: adapter {name!r} already exists on {param!r}")
        weight = getattr(self.base_layer, param)
        if dtype is None:
            dtype = torch.float32 if weight.dtype in (torch.bfloat16, torch.float16) else weight.dtype
        if dtype not in _FACTOR_DTYPES:
            raise ValueError(f"loracuda.LoRAExperts.add_adapter: argument 'dtype' must be a float dtype, got {dtype}")
        n, k = param_shape(self.layout, param)
        e = self.num_experts
        a = torch.empty(e, r, k, dtype=dtype, device=weight.device)
        b = torch.zeros(e, n, r, dtype=dtype, device=weight.device)
        flat = a.view(e * r, k)  # fan_in K for every expert's rows, as one [r·E, K] linear layer
        if init in ("default", "random"):
            nn.init.kaiming_uniform_(flat, a=math.sqrt(5))
        elif init == "gaussian":
            nn.init.normal_(flat, std=1.0 / r)
        else:
            raise ValueError(f"loracuda.LoRAExperts.add_adapter: unknown init {init!r}")
        if init == "random":
            nn.init.normal_(b, std=1.0 / math.sqrt(r))
        self.lora_A[param][name] = nn.Parameter(a)
        self.lora_B[param][name] = nn.Parameter(b)
        self.set_scale(name, param, r, alpha, use_rslora)
        self.dropout_p[(param, name)] = float(dropout)
        if not self.active_adapters:
            self.active_adapters = [name]

    def set_scale(self, name: str, param: str, r: int, alpha: float, use_rslora: bool = False) -> None:
        self.r[(param, name)] = int(r)
        self.alpha[(param, name)] = float(alpha)
        self.scaling[(param, name)] = float(alpha) / (math.sqrt(r) if use_rslora else r)

    def delete_adapter(self, name: str) -> None:
        if any(key[1] == name for key in self.merged):
            raise RuntimeError(f"loracuda: adapter {name!r} is merged into the experts; unmerge before deleting it")
        for p in EXPERT_PARAMS:
            if name in self.lora_A[p]:
                del self.lora_A[p][name]
                del self.lora_B[p][name]
            for d in (self.r, self.alpha, self.scaling, self.dropout_p):
                d.pop((p, name), None)
        self.active_adapters = [a for a in self.active_adapters if a != name]

    # ---- forward --------------------------------------------------------------------------------

    def _factors(self, param: str, dtype: torch.dtype):
        """(lora_a, lora_b, scale, dropout_p) of the active unmerged adapters of ``param`` summed (stacked
        along the rank, each B times its scale), or None."""
        names = [n for n in self.active_adapters if n in self.lora_A[param] and (param, n) not in self.merged]
        if not names:
            return None
        if len(names) == 1:
            n = names[0]
            a, b = self.lora_A[param][n], self.lora_B[param][n]
            ok = (dtype, torch.float32)
            a = a if a.dtype in ok else a.to(torch.float32)
            b = b if b.dtype in ok else b.to(torch.float32)
            return a, b, self.scaling[(param, n)], self.dropout_p[(param, n)]
        ps = {self.dropout_p[(param, n)] for n in names}
        if len(ps) != 1:
            raise NotImplementedError(
                f"loracuda: active adapters {names} of the experts' {param!r} have different dropout "
                "probabilities; activate them one at a time"
            )
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        a = torch.cat([self.lora_A[param][n].to(acc) for n in names], 1)
        b = torch.cat([self.lora_B[param][n].to(acc) * self.scaling[(param, n)] for n in names], 2)
        return a, b, 1.0, ps.pop()

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        if self.disabled:
            if self.merged:
                raise RuntimeError("loracuda: adapters are disabled but merged into the experts' weights; unmerge them first")
            return self.base_layer(hidden_states, top_k_index, top_k_weights)
        dtype = self.base_layer.gate_up_proj.dtype
        adapters = {}
        for p in EXPERT_PARAMS:
            f = self._factors(p, dtype)
            if f is not None:
                adapters[p] = f
        if not adapters:
            return self.base_layer(hidden_states, top_k_index, top_k_weights)
        return grouped_experts_forward(self.base_layer, hidden_states, top_k_index, top_k_weights, adapters, self.training)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, hidden={self.layout['hidden']}, intermediate={self.layout['intermediate']}, "
            f"adapters={ {p: {n: self.r[(p, n)] for n in self.lora_A[p]} for p in EXPERT_PARAMS if len(self.lora_A[p])} }, "
            f"active={self.active_adapters}, merged={sorted(set(self.merged))}"
        )


def expert_layers(model: nn.Module):
    for path, module in model.named_modules():
        if isinstance(module, LoRAExperts):
            yield path, module


# ---- model-level hooks (called from loracuda.inject, peft_io, merge) -----------------------------


def _set_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, new)


def check_injectable(model: nn.Module, config, adapter: str) -> dict[str, list[str]]:
    """The experts targets of ``config`` ({path: [parameters]}), checked (layouts, merged state);
    modifies nothing."""
    targets = target_parameter_paths(model, config.target_parameters)
    for path in targets:
        module = model.get_submodule(path)
        if isinstance(module, LoRAExperts) and module.merged:
            raise RuntimeError(f"loracuda.inject: experts {path!r} have merged adapters; unmerge before adding one")
        if config.dropout and not _has_grouped_op():
            raise NotImplementedError(
                "loracuda.inject: dropout on expert LoRA (target_parameters) needs the grouped_lora_linear op, "
                "which this build lacks; use dropout=0"
            )
    return targets


def _has_grouped_op() -> bool:
    import loracuda

    return getattr(loracuda, "grouped_lora_linear", None) is not None


def inject_experts(model: nn.Module, config, adapter: str, targets: dict[str, list[str]], training: bool) -> None:
    """Wraps each experts module of ``targets`` (once) and adds ``adapter`` on its targeted parameters,
    with rank / alpha from ``config`` for the path "<experts path>.<parameter>" (PEFT's key)."""
    for path, params in targets.items():
        module = model.get_submodule(path)
        if not isinstance(module, LoRAExperts):
            module = LoRAExperts(module, path)
            _set_module(model, path, module)
        for p in params:
            key = f"{path}.{p}"
            module.add_adapter(adapter, p, config.rank_for(key), config.alpha_for(key), config.dropout,
                               config.use_rslora, config.init)
        module.train(training)


def factor_params(model: nn.Module) -> list[nn.Parameter]:
    return [t for _, m in expert_layers(model) for p in EXPERT_PARAMS for t in (*m.lora_A[p].values(), *m.lora_B[p].values())]


def adapter_names(model: nn.Module) -> set:
    return {n for _, m in expert_layers(model) for n in m.adapters}


def set_active(model: nn.Module, names: list[str]) -> None:
    for _, m in expert_layers(model):
        m.active_adapters = [n for n in names if n in m.adapters]


def delete(model: nn.Module, name: str) -> None:
    """Removes ``name`` from every experts wrapper (one left without adapters is unwrapped); raises,
    changing nothing, when it is merged somewhere."""
    layers = [(p, m) for p, m in expert_layers(model) if name in m.adapters]
    for p, m in layers:
        if any(key[1] == name for key in m.merged):
            raise RuntimeError(f"loracuda.delete_adapter: adapter {name!r} is merged into experts {p!r}; unmerge it first")
    for p, m in layers:
        m.delete_adapter(name)
        if not m.adapters:
            _set_module(model, p, m.base_layer)


def unload(model: nn.Module) -> None:
    """Replaces every experts wrapper by its base module (after merge_and_unload's merge)."""
    for p, m in list(expert_layers(model)):
        m.merged.clear()
        _set_module(model, p, m.base_layer)


def refuse_in(what: str, config) -> None:
    """A clear refusal for features that do not carry expert adapters."""
    if getattr(config, "target_parameters", None):
        raise ValueError(
            f"loracuda.{what}: the adapter uses target_parameters={config.target_parameters!r} (LoRA on "
            f"experts), which {what} does not support; the model is unchanged"
        )


# ---- PEFT files ---------------------------------------------------------------------------------


def peft_key(path: str, params: Sequence[str], param: str) -> str:
    """PEFT's file key stem (no "lora_A.weight") of ``param`` among the targeted ``params`` of the experts
    at ``path``: PEFT wraps each targeted parameter in turn, in the module's registration order, so the
    last one is outermost: "<path>." + "base_layer." * (number of later targeted parameters)."""
    later = len(params) - 1 - list(params).index(param)
    return path + ".base_layer" * later


def adapter_tensors(model: nn.Module, adapter: str) -> dict[str, Tensor]:
    """{file key without prefix: tensor in PEFT's flat layout} of ``adapter`` on every experts wrapper."""
    out = {}
    for path, m in expert_layers(model):
        params = m.params_of(adapter)
        for p in params:
            a_flat, b_flat = peft_factors(m.lora_A[p][adapter].detach(), m.lora_B[p][adapter].detach())
            stem = peft_key(path, params, p)
            out[f"{stem}.lora_A.weight"] = a_flat
            out[f"{stem}.lora_B.weight"] = b_flat
    return out


def expected_tensors(model: nn.Module, config, adapter: str) -> dict:
    """{file key without prefix: ("expert_A" | "expert_B", (experts path, parameter), shape)} that loading
    ``adapter`` with ``config`` needs: the parameters the model's wrappers hold for ``adapter``, else
    those ``config.target_parameters`` targets. Shapes in PEFT's layout: A [r·E, K], B [N, r·E]."""
    existing = {p: m.params_of(adapter) for p, m in expert_layers(model) if m.params_of(adapter)}
    targets = existing or target_parameter_paths(model, config.target_parameters)
    expected = {}
    for path, params in targets.items():
        module = model.get_submodule(path)
        layout = module.layout if isinstance(module, LoRAExperts) else experts_layout(module, path)
        e = layout["num_experts"]
        for p in params:
            n, k = param_shape(layout, p)
            r = module.r[(p, adapter)] if existing else config.rank_for(f"{path}.{p}")
            stem = peft_key(path, params, p)
            expected[f"{stem}.lora_A.weight"] = ("expert_A", (path, p), (r * e, k))
            expected[f"{stem}.lora_B.weight"] = ("expert_B", (path, p), (n, r * e))
    return expected


def copy_factor(model: nn.Module, kind: str, target: tuple[str, str], tensor: Tensor, adapter: str) -> None:
    """Copies a checked file tensor (PEFT layout) into the wrapper's factor."""
    path, p = target
    m = model.get_submodule(path)
    if kind == "expert_A":
        a = m.lora_A[p][adapter]
        a.copy_(tensor.view(a.shape))
    else:
        b = m.lora_B[p][adapter]
        e, n, r = b.shape
        b.copy_(tensor.view(n, r, e).permute(2, 0, 1))


def set_scales(model: nn.Module, config, adapter: str) -> None:
    for path, m in expert_layers(model):
        for p in m.params_of(adapter):
            key = f"{path}.{p}"
            m.set_scale(adapter, p, config.rank_for(key), config.alpha_for(key), config.use_rslora)
            m.dropout_p[(p, adapter)] = float(config.dropout)


# ---- merge / unmerge ----------------------------------------------------------------------------


class ExpertsMergeRecord:
    """How to undo one merge of ``adapters`` (merged together) into one 3-D parameter: per expert the
    restore codes and escape values of ops.merge_exact_ (exact) or nothing (inexact), the scale, and the
    version counters of the weight and of the factors right after the merge."""

    def __init__(self, adapters, scale, exact, codes, values):
        self.adapters = tuple(adapters)
        self.scale = scale
        self.exact = exact
        self.codes = codes
        self.values = values
        self.weight_version = 0
        self.factor_versions = ()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [*self.codes, *self.values] if t is not None)


def _merge_factors(m: LoRAExperts, param: str, names: Sequence[str]):
    """(lora_a [E, r, K], lora_b [E, N, r], scale) of ``names`` together, detached, in a dtype merge_
    accepts; built the same way on every call, so merge and unmerge see the same delta bit for bit."""
    ok = (getattr(m.base_layer, param).dtype, torch.float32)
    if len(names) == 1:
        a, b = m.lora_A[param][names[0]].detach(), m.lora_B[param][names[0]].detach()
        a = a if a.dtype in ok else a.to(torch.float32)
        b = b if b.dtype in ok else b.to(torch.float32)
        return a.contiguous(), b.contiguous(), m.scaling[(param, names[0])]
    a = torch.cat([m.lora_A[param][n].detach().to(torch.float32) for n in names], 1)
    b = torch.cat([m.lora_B[param][n].detach().to(torch.float32) * m.scaling[(param, n)] for n in names], 2)
    return a, b, 1.0


def _factor_versions(m: LoRAExperts, param: str, names) -> tuple:
    return tuple((m.lora_A[param][n]._version, m.lora_B[param][n]._version) for n in names)


def _merge_plan(model: nn.Module, adapter) -> list:
    wanted = None if adapter is None else ([adapter] if isinstance(adapter, str) else list(adapter))
    plan = []
    for path, m in expert_layers(model):
        for p in EXPERT_PARAMS:
            names = m.active_adapters if wanted is None else wanted
            names = [n for n in names if n in m.lora_A[p] and (p, n) not in m.merged]
            if names:
                plan.append((path, m, p, names))
    return plan


def _undo(m: LoRAExperts, param: str, rec: ExpertsMergeRecord) -> None:
    from . import ops

    w = getattr(m.base_layer, param)
    a, b, scale = _merge_factors(m, param, rec.adapters)
    for e in range(w.shape[0]):
        if rec.exact:
            if rec.codes[e] is not None:
                ops.unmerge_exact_(w[e], a[e], b[e], scale, rec.codes[e], False, escape_values=rec.values[e])
        else:
            ops.merge_(w[e], a[e], b[e], -scale, False)


@torch.no_grad()
def merge_experts(model: nn.Module, adapter=None, safe: bool = False, exact: bool = True) -> list:
    """Merges ``adapter`` (None: the active adapters) into every adapted experts parameter in place, one
    merge_ / merge_exact_ call per expert slice ``W[e] [N, K] += s · B_e A_e``. All or nothing: a failure
    (a restore record over a quarter of a slice's bytes, inf/NaN with ``safe``) unmerges what this call
    merged, bit for bit, before raising. Returns [(path, wrapper, parameter, record)]."""
    from . import ops

    plan = _merge_plan(model, adapter)
    for path, m, p, names in plan:
        w = getattr(m.base_layer, p)
        if not w.is_contiguous():
            raise ValueError(f"loracuda.merge: experts parameter '{path}.{p}' is not contiguous; it cannot be merged in place")
        if safe:
            a, b, scale = _merge_factors(m, p, names)
            for e in range(w.shape[0]):
                merged = (w[e].to(torch.float32) + scale * (b[e].to(torch.float32) @ a[e].to(torch.float32))).to(w.dtype)
                if not torch.isfinite(merged).all():
                    raise ValueError(
                        f"loracuda.merge: merging {names} into experts parameter '{path}.{p}' would give inf/NaN "
                        f"weights in expert {e}; nothing was merged"
                    )
    done = []
    try:
        for path, m, p, names in plan:
            w = getattr(m.base_layer, p)
            a, b, scale = _merge_factors(m, p, names)
            rec = ExpertsMergeRecord(names, scale, exact, [None] * w.shape[0], [None] * w.shape[0])
            try:
                for e in range(w.shape[0]):
                    if not exact:
                        ops.merge_(w[e], a[e], b[e], scale, False)
                        continue
                    budget = w[e].numel() * w.element_size() // 4
                    try:
                        rec.codes[e], rec.values[e] = ops.merge_exact_(w[e], a[e], b[e], scale, False, max_record_bytes=budget)
                    except ValueError as error:
                        if "max_record_bytes" not in str(error):
                            raise
                        raise ValueError(
                            f"loracuda.merge: the exact restore record of expert {e} of '{path}.{p}' would take more "
                            f"than a quarter of its weight ({budget} bytes); nothing was merged. Use "
                            "merge(..., exact=False) for an inexact merge."
                        ) from error
            except BaseException:
                _undo(m, p, rec)  # the experts of this parameter merged so far (codes None: not merged)
                raise
            done.append((path, m, p, rec))
    except BaseException:
        rollback(done)
        raise
    for path, m, p, rec in done:
        rec.weight_version = getattr(m.base_layer, p)._version
        rec.factor_versions = _factor_versions(m, p, rec.adapters)
        for n in rec.adapters:
            m.merged[(p, n)] = rec
    return done


def rollback(done: list) -> None:
    """Unmerges the records of one merge_experts call (newest first), bit for bit for exact ones."""
    for path, m, p, rec in reversed(done):
        if not rec.exact or all(c is not None for c in rec.codes):
            _undo(m, p, rec)
        for n in rec.adapters:
            m.merged.pop((p, n), None)
        previous = _records(m, p)
        if previous:
            previous[-1].weight_version = getattr(m.base_layer, p)._version


def _records(m: LoRAExperts, param: str) -> list:
    out = []
    for (p, _), rec in m.merged.items():
        if p == param and (not out or out[-1] is not rec):
            out.append(rec)
    return out


def unmerge_plan(model: nn.Module, adapter=None) -> list:
    """[(path, wrapper, parameter, records newest first)] to unmerge, after every check (raises,
    changing nothing, when a record no longer fits its tensors or the order forbids it)."""
    wanted = None if adapter is None else ({adapter} if isinstance(adapter, str) else set(adapter))
    plan = []
    for path, m in expert_layers(model):
        for p in EXPERT_PARAMS:
            recs = _records(m, p)
            todo = [r for r in recs if wanted is None or wanted & set(r.adapters)]
            if not todo:
                continue
            where = f"experts parameter '{path}.{p}'"
            if todo != recs[len(recs) - len(todo):]:
                raise ValueError(f"loracuda.unmerge: {where} has {[list(r.adapters) for r in recs]} merged in this order; unmerge the later ones first")
            for r in todo:
                if wanted is not None and not set(r.adapters) <= wanted:
                    raise ValueError(f"loracuda.unmerge: {where} has {list(r.adapters)} merged together; unmerge them together")
            newest = todo[-1]
            if newest.exact and getattr(m.base_layer, p)._version != newest.weight_version:
                raise RuntimeError(
                    f"loracuda.unmerge: {where} was modified after {list(newest.adapters)} was merged, so the exact "
                    "restore record no longer applies; nothing was unmerged"
                )
            for r in todo:
                if r.exact and _factor_versions(m, p, r.adapters) != r.factor_versions:
                    raise RuntimeError(
                        f"loracuda.unmerge: adapter {list(r.adapters)} of {where} was modified after it was merged, so "
                        "the exact restore record no longer applies; nothing was unmerged"
                    )
            plan.append((path, m, p, list(reversed(todo))))
    return plan


@torch.no_grad()
def unmerge_apply(plan: list) -> list[str]:
    done = []
    for path, m, p, todo in plan:
        for rec in todo:
            _undo(m, p, rec)
            for n in rec.adapters:
                del m.merged[(p, n)]
            remaining = _records(m, p)
            if remaining:
                remaining[-1].weight_version = getattr(m.base_layer, p)._version
        done.append(f"{path}.{p}")
    return done


def wrapped_paths(model: nn.Module) -> set:
    return {p for p, _ in expert_layers(model)}


def undo_inject(model: nn.Module, adapter: str, targets: dict, wrapped_before: set) -> None:
    """Puts the experts of ``targets`` back as they were before a failed inject of ``adapter``."""
    for path in targets:
        m = model.get_submodule(path)
        if not isinstance(m, LoRAExperts):
            continue
        if adapter in m.adapters:
            m.delete_adapter(adapter)
        if path not in wrapped_before:
            _set_module(model, path, m.base_layer)


class PeftLayoutFactor:
    """One expert factor seen in PEFT's flat layout (A [r·E, K], B [N, r·E]) for the file loader:
    ``copy_`` writes a flat tensor into the [E, r, K] / [E, N, r] parameter, ``detach`` returns a flat copy."""

    def __init__(self, module: "LoRAExperts", param: str, kind: str, adapter: str):
        self.param = (module.lora_A if kind == "expert_A" else module.lora_B)[param][adapter]
        self.kind = kind

    def copy_(self, flat: Tensor) -> "PeftLayoutFactor":
        if self.kind == "expert_A":
            self.param.copy_(flat.view(self.param.shape))
        else:
            e, n, r = self.param.shape
            self.param.copy_(flat.view(n, r, e).permute(2, 0, 1))
        return self

    def detach(self) -> Tensor:
        p = self.param.detach()
        return p.reshape(-1, p.shape[-1]).clone() if self.kind == "expert_A" else p.permute(1, 2, 0).reshape(p.shape[1], -1)
