"""Small mixture-of-experts models for the expert-LoRA tests (random weights from configs, no downloads):
Qwen3-MoE-style and Mixtral-style, with PEFT's target_parameters config for their experts."""

import torch
from torch import nn

VOCAB = 96
EXPERT_TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]  # Qwen3-MoE naming
MIXTRAL_TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def qwen3_moe(seed=0, dtype=torch.float32, hidden=64, experts=8, top_k=2, intermediate=32, layers=2,
              dense_layers=()) -> nn.Module:
    """dense_layers: indices of layers with a dense MLP (gate_proj / up_proj / down_proj linear layers)."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    config = Qwen3MoeConfig(
        hidden_size=hidden, intermediate_size=2 * hidden, moe_intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4,
        num_experts=experts, num_experts_per_tok=top_k, vocab_size=VOCAB, max_position_embeddings=64,
        norm_topk_prob=True, mlp_only_layers=list(dense_layers),
    )
    return Qwen3MoeForCausalLM(config).to(dtype).eval()


def mixtral(seed=0, dtype=torch.float32, hidden=64, experts=4, top_k=2, intermediate=48, layers=2) -> nn.Module:
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    config = MixtralConfig(
        hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, head_dim=hidden // 4, num_local_experts=experts, num_experts_per_tok=top_k,
        vocab_size=VOCAB, max_position_embeddings=64,
    )
    return MixtralForCausalLM(config).to(dtype).eval()


BUILDERS = {"qwen3_moe": qwen3_moe, "mixtral": mixtral}


def tokens(batch=2, length=12, seed=1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length), generator=g)


def randomize(model: nn.Module, seed=3, scale_a=0.3, scale_b=0.05) -> None:
    """Random values for every LoRA factor (loracuda or PEFT naming), B large enough that the experts'
    adapters change the logits visibly."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * (scale_b if "lora_B" in name else scale_a))
