"""Small models for the model-level tests (random weights, built from configs: no downloads), and the
tolerance rule (docs/design.md, section 'Tolerance rule') applied to whole-model outputs.

Devices: every builder takes ``device`` (the weights are drawn on the CPU from the seed, then moved, so a
model has the same weights on every device); ``logits`` runs the tokens on the model's device; the rule
compares on the CPU, so a float64 reference may live on the CPU (the kernels take float64 there only)."""

import copy

import torch
from torch import nn

VOCAB = 128


def llama(seed: int = 0, dtype: torch.dtype = torch.float32, hidden: int = 32, layers: int = 2, device="cpu",
          attention: str | None = None) -> nn.Module:
    """attention: transformers' attn_implementation (None: its default, "sdpa"; "eager" where a test
    compares backward passes bit for bit on CUDA, whose fused attention backward may be nondeterministic)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden + 8,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        **({} if attention is None else {"attn_implementation": attention}),
    )
    return LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()


def gpt2(seed: int = 0, dtype: torch.dtype = torch.float32, hidden: int = 32, layers: int = 2, device="cpu") -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        n_embd=hidden, n_layer=layers, n_head=2, vocab_size=VOCAB, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(config).to(device=device, dtype=dtype).eval()


class MLP(nn.Module):
    """A plain torch model: embedding, two hidden linear layers with biases, an output linear layer."""

    def __init__(self, hidden: int = 40):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, hidden)
        self.fc1 = nn.Linear(hidden, 2 * hidden + 3)
        self.fc2 = nn.Linear(2 * hidden + 3, hidden)
        self.out = nn.Linear(hidden, VOCAB)

    def forward(self, ids):
        h = self.embed(ids)
        return self.out(torch.relu(self.fc2(torch.relu(self.fc1(h)))))


def mlp(seed: int = 0, dtype: torch.dtype = torch.float32, device="cpu") -> nn.Module:
    torch.manual_seed(seed)
    return MLP().to(device=device, dtype=dtype).eval()


BUILDERS = {"llama": llama, "gpt2": gpt2, "mlp": mlp}


def ids(batch: int = 2, length: int = 9, seed: int = 1, device="cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length), generator=g).to(device)


def device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def logits(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """float32 logits of ``tokens`` (moved to the model's device), on the model's device."""
    with torch.no_grad():
        out = model(tokens.to(device_of(model)))
    return (out.logits if hasattr(out, "logits") else out).float()


def randomize_adapters(model: nn.Module, scale_b: float = 0.002, seed: int = 3) -> None:
    """Gives every LoRA B (loracuda or PEFT naming) small random values, so that the adapter changes the
    outputs without swamping the base weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_A" in name:
                p.copy_(torch.randn(p.shape, generator=g) * (scale_b if "lora_B" in name else 0.3))


def assert_within_rule(ours: torch.Tensor, plain: torch.Tensor, reference: torch.Tensor, factor: float = 2.0) -> None:
    """The tolerance rule: ours' max error against the float64 reference is at most ``factor`` times that
    of plain PyTorch (here: PEFT's modules) computing the same thing in the same dtype."""
    ours, plain, reference = ours.double().cpu(), plain.double().cpu(), reference.double().cpu()
    err_ours = (ours - reference).abs().max().item()
    err_plain = (plain - reference).abs().max().item()
    # float32 evaluation of a float64 model differs by rounding at least once per output; a plain error of
    # exactly 0 would demand exact equality, which only holds where the math is exact.
    assert err_ours <= factor * err_plain or err_ours == 0.0, (err_ours, err_plain)


def double_copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).double()
