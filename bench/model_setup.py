"""Shared set-up of the model-level benchmark scripts (bench/merge_models.py, bench/unmerged_forward.py)."""

import torch


def randomize_lora_b(model: torch.nn.Module, std: float = 0.01, seed: int = 1) -> None:
    """Gives every lora_B factor random values (PEFT's init leaves them zero), so that merging and the
    unmerged adapter path do real work; the same seed gives the same values for every provider."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * std)
