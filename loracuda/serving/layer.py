"""PooledLinear: a frozen linear layer (nn.Linear, or transformers Conv1D whose weight is stored [K, N])
plus the stacked factors of every adapter slot of an AdapterPool, so that one batch can mix adapters.

Buffers, allocated once (L = max_adapters, R = max_rank, K = in features, N = out features):
  lora_a_all [L, R, K]   slot l's A [r_l, K] in rows :r_l, zeros below
  lora_b_all [L, N, R]   slot l's B [N, r_l] in columns :r_l, zeros right of them
  scales     [L] float32 slot l's alpha / r (or alpha / sqrt(r)) for this layer; 0 for an empty slot
  ranks      [L] int32   slot l's rank in this layer; 0 where the slot holds nothing for it
The factors are float32 for a bfloat16 / float16 base weight (the kernels read float32 factors
directly and accumulate in float32), the weight's dtype otherwise. The buffers are not persistent
(the pool's contents come from adapter files, not from the model's state_dict).

forward(x [..., K]) = base_layer(x), then, inside AdapterPool.batch only, for every token with an
adapter id l >= 0: y += scales[l] * lora_b_all[l] @ (lora_a_all[l] @ x), by one multi_shrink and one
multi_expand_add_ over the whole batch (no loop over adapters). Tokens with id -1 keep the base
output bit for bit. The ids are read from the pool's BatchState, a tensor that a compiled graph takes
as an input, so new ids (same shape) or a newly loaded slot do not recompile. BatchState is
thread-local: each thread's forwards read the ids of the batch that thread opened.
"""

import threading
from typing import Optional

import torch
from torch import Tensor, nn

from .. import ops
from ..config import linear_layout
from ..layers import BaseLayerView


class BatchState(threading.local):
    """The ids of the batch being served, shared by every PooledLinear of one pool, one value per
    thread: a batch opened in one thread is invisible to forwards in any other thread (which serve
    their own batch, or the base model outside one).

    ids: None outside a batch; else int32 on the layers' device, [B] (one id per sequence: x [B, ..., K])
    or [B, T] (one id per token: x [B, T, K], or [B * T, K])."""

    def __init__(self):
        self.ids: Optional[Tensor] = None


def token_ids(ids: Tensor, lead: torch.Size) -> Tensor:
    """int32 [M] (M = prod(lead)): one adapter id per row of x reshaped to [M, K], from the batch's ids:
    [B] per sequence (lead[0] = B), or per token, of the shape of ``lead`` (or [B, T] with B * T = M for
    a flattened x [M, K]). Traceable: shape arithmetic only."""
    if ids.dim() == 1:
        if len(lead) == 0 or lead[0] != ids.shape[0]:
            raise ValueError(
                f"loracuda.AdapterPool: the batch has {ids.shape[0]} per-sequence adapter ids, but a pooled layer "
                f"got input of leading shape {list(lead)} (its first dimension must be the {ids.shape[0]} sequences)"
            )
        per_row = ids.reshape((ids.shape[0],) + (1,) * (len(lead) - 1))
        return per_row.expand(lead).reshape(-1)
    m = 1
    for d in lead:
        m *= d
    # [B, T] ids for x [B, T, K], or for x already flattened to [B * T, K].
    if tuple(ids.shape) != tuple(lead) and not (len(lead) == 1 and ids.numel() == m):
        raise ValueError(
            f"loracuda.AdapterPool: the batch has per-token adapter ids of shape {list(ids.shape)}, but a pooled "
            f"layer got input of leading shape {list(lead)} (the ids need one entry per token)"
        )
    return ids.reshape(-1)


class PooledLinear(BaseLayerView, nn.Module):
    """base_layer: the wrapped nn.Linear or Conv1D (its parameters are not copied); max_adapters L and
    max_rank R size the buffers; state: the pool's BatchState.

    Attributes: in_features K, out_features N, fan_in_fan_out (True for Conv1D)."""

    def __init__(self, base_layer: nn.Module, max_adapters: int, max_rank: int, state: BatchState):
        super().__init__()
        self.fan_in_fan_out, self.in_features, self.out_features = linear_layout(base_layer, "PooledLinear")
        self.base_layer = base_layer
        weight = base_layer.weight
        dtype = torch.float32 if weight.dtype in (torch.bfloat16, torch.float16) else weight.dtype
        k, n, dev = self.in_features, self.out_features, weight.device
        self.register_buffer("lora_a_all", torch.zeros(max_adapters, max_rank, k, dtype=dtype, device=dev), persistent=False)
        self.register_buffer("lora_b_all", torch.zeros(max_adapters, n, max_rank, dtype=dtype, device=dev), persistent=False)
        self.register_buffer("scales", torch.zeros(max_adapters, dtype=torch.float32, device=dev), persistent=False)
        self.register_buffer("ranks", torch.zeros(max_adapters, dtype=torch.int32, device=dev), persistent=False)
        # A plain attribute, not a submodule: every layer of the pool shares this one object.
        self._state = state

    # ---- slots (called by AdapterPool, after it has checked everything) --------------------------

    @torch.no_grad()
    def write_slot(self, slot: int, lora_a: Tensor, lora_b: Tensor, scale: float) -> None:
        """Slot ``slot`` := lora_a [r, K], lora_b [N, r] (any float dtype, cast on copy), ``scale``;
        the padded rows / columns are zeroed, so a reloaded slot holds nothing of its old adapter."""
        r = lora_a.shape[0]
        a, b = self.lora_a_all[slot], self.lora_b_all[slot]
        a[:r].copy_(lora_a)
        a[r:].zero_()
        b[:, :r].copy_(lora_b)
        b[:, r:].zero_()
        self.scales[slot] = scale
        self.ranks[slot] = r

    @torch.no_grad()
    def clear_slot(self, slot: int) -> None:
        """Slot ``slot`` holds no adapter for this layer (rank 0: its tokens get the base output)."""
        self.lora_a_all[slot].zero_()
        self.lora_b_all[slot].zero_()
        self.scales[slot] = 0.0
        self.ranks[slot] = 0

    # ---- forward --------------------------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        y = self.base_layer(x)
        ids = self._state.ids
        if ids is None:
            return y
        lead = x.shape[:-1]
        tokens = token_ids(ids, lead)
        # The in-place add needs y's own storage as [M, N]: contiguous() is a no-op for the base
        # layer's fresh output, and makes sure the add is never lost into a reshape copy.
        y = y.contiguous()
        y2 = y.view(-1, self.out_features)
        h = ops.multi_shrink(x.reshape(-1, self.in_features), self.lora_a_all, self.ranks, tokens, 1)
        ops.multi_expand_add_(y2, h, self.lora_b_all, self.scales, self.ranks, tokens)
        return y

    def extra_repr(self) -> str:
        slots, r_max = self.lora_a_all.shape[0], self.lora_a_all.shape[1]
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, fan_in_fan_out={self.fan_in_fan_out}, "
            f"max_adapters={slots}, max_rank={r_max}, factor_dtype={self.lora_a_all.dtype}"
        )
