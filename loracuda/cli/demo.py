"""`loracuda demo`: the whole library at work in one command, on any machine, with no downloads.

Builds the built-in byte-level Llama-style model (loracuda.tiny_llama), injects LoRA on every linear
layer, fine-tunes it on an embedded text, saves a PEFT adapter, loads it into a fresh model, merges,
checks that merged logits equal unmerged ones, unmerges and checks that the base weights are restored
bit for bit, and prints a summary with a training step timed beside the plain-PyTorch reference layer.
Exit code 0 when every check holds, 1 when one fails, 2 for bad input.
"""

import argparse
import os
import sys
import tempfile
import time

from .main import UsageError

# The fine-tuning text: bytes are the tokens, so any text works; this one describes the library.
TEXT = (
    "loracuda adapts a frozen weight W by a low-rank update s times B A. The down projection reads x once, "
    "the up projection adds into the base output in place, and the backward makes one pass over dy and one "
    "over x. Dropout masks are regenerated from a seed, never stored. Merging adds s B A into W in one read "
    "and one write; unmerging restores the base weights bit for bit. Adapters are saved and loaded in the "
    "PEFT format, so a model trained here loads there, and a model trained there loads here. "
)

DTYPES = {"float32", "bfloat16", "float16"}


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="fine-tune, save, load, merge and unmerge a small built-in model, with checks and timings",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when a GPU is visible, else cpu)")
    p.add_argument("--dtype", default="float32", help="base model dtype: float32, bfloat16 or float16 "
                   "(adapters stay float32; default float32)")
    p.add_argument("--steps", type=int, default=40, help="fine-tuning steps (default 40)")
    p.add_argument("--out", default=None, help="folder for the saved adapter (default: a new temporary folder)")
    p.add_argument("--seed", type=int, default=0, help="seed of the base weights and the batches (default 0)")
    p.set_defaults(run=run)


def _resolve(args):
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda"):
        raise UsageError(f"unknown device {device!r} (choose cpu or cuda)")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda, but no GPU is visible")
    if device == "cuda" and "cuda" not in __import__("loracuda").build_info()["backends"]:
        raise UsageError("--device cuda, but this build of loracuda has no CUDA kernels")
    if args.dtype not in DTYPES:
        raise UsageError(f"unknown dtype {args.dtype!r} (choose one of {', '.join(sorted(DTYPES))})")
    if device == "cpu" and args.dtype == "float16":
        raise UsageError("float16 is not offered on the CPU (use float32 or bfloat16)")
    if args.steps < 1:
        raise UsageError("--steps must be at least 1")
    return torch.device(device), getattr(torch, args.dtype)


def _progress(step: int, total: int, loss: float, tokens_per_s: float) -> None:
    width = 30
    done = int(width * step / total)
    bar = "#" * done + "." * (width - done)
    sys.stderr.write(f"\r  fine-tune [{bar}] {step:3d}/{total}  loss {loss:6.3f}  {tokens_per_s:8.0f} tokens/s")
    if step == total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def _batches(data, batch: int, seq: int, generator):
    import torch

    while True:
        starts = torch.randint(0, data.numel() - seq - 1, (batch,), generator=generator)
        window = torch.stack([data[s : s + seq + 1] for s in starts.tolist()])
        yield window[:, :-1], window[:, 1:]


def _step_time(model, ids, targets, device, repeats: int = 5) -> float:
    """Median seconds of one forward + backward of the language-model loss."""
    import torch
    from torch.nn import functional as F

    def once():
        logits = model(ids)
        F.cross_entropy(logits.float().flatten(0, 1), targets.flatten()).backward()

    once()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        once()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    model.zero_grad(set_to_none=True)
    return sorted(times)[len(times) // 2]


def run(args) -> int:
    device, dtype = _resolve(args)
    import torch
    from torch.nn import functional as F

    import loracuda
    from loracuda import tiny_llama
    from loracuda.layers import use_impl

    torch.manual_seed(args.seed)
    out = args.out or tempfile.mkdtemp(prefix="loracuda-demo-")
    print(f"loracuda {loracuda.__version__} demo on {device} ({args.dtype}); backends {loracuda.build_info()['backends']}")

    # 1. A small Llama-style model, LoRA on every linear layer but the output head.
    model = tiny_llama.build(args.seed, device=device, dtype=dtype)
    config = loracuda.LoraConfig(r=16, alpha=32, dropout=0.05, target_modules="all-linear")
    loracuda.inject(model, config)
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_lora = sum(p.numel() for p in trainable)
    n_all = sum(p.numel() for p in model.parameters())
    n_layers = sum(isinstance(m, loracuda.LoRALinear) for m in model.modules())
    print(f"  injected LoRA r=16 into {n_layers} linear layers: {n_lora:,} trainable of {n_all:,} parameters")

    # 2. Fine-tune on the embedded text.
    data = torch.tensor(list((TEXT * 4).encode()), dtype=torch.long)
    generator = torch.Generator().manual_seed(args.seed)
    batches = _batches(data, batch=8, seq=64, generator=generator)
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    model.train()
    first_loss = last_loss = None
    start = time.perf_counter()
    tokens = 0
    for step in range(1, args.steps + 1):
        ids, targets = (t.to(device) for t in next(batches))
        loss = F.cross_entropy(model(ids).float().flatten(0, 1), targets.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        tokens += ids.numel()
        last_loss = loss.item()
        first_loss = last_loss if first_loss is None else first_loss
        _progress(step, args.steps, last_loss, tokens / (time.perf_counter() - start))
    train_seconds = time.perf_counter() - start
    model.eval()

    # 3. Save a PEFT adapter; load it into a fresh copy of the base model.
    loracuda.save_adapter(model, out)
    fresh = tiny_llama.build(args.seed, device=device, dtype=dtype).eval()
    loracuda.load_adapter(fresh, out)
    probe = torch.tensor([list(TEXT[:64].encode())], dtype=torch.long, device=device)
    with torch.no_grad():
        trained_logits = model(probe)
        loaded_logits = fresh(probe)
    loaded_equal = torch.equal(trained_logits, loaded_logits)

    # 4. Merge; merged logits against unmerged ones. 5. Unmerge; base weights bit for bit.
    base = {n: p.detach().clone() for n, p in fresh.named_parameters() if not p.requires_grad}
    start = time.perf_counter()
    report = loracuda.merge(fresh)
    merge_seconds = time.perf_counter() - start
    with torch.no_grad():
        merged_logits = fresh(probe)
    diff = (merged_logits.double() - loaded_logits.double()).norm() / loaded_logits.double().norm()
    # The merged model rounds W + s·B·A to the weight dtype once per element; its logits may differ
    # from the unmerged model's by a few units of that dtype's rounding (float32: ~1e-7 per element).
    bound = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}[dtype]
    merged_close = float(diff) <= bound
    start = time.perf_counter()
    loracuda.unmerge(fresh)
    unmerge_seconds = time.perf_counter() - start
    restored = all(torch.equal(p.detach(), base[n]) for n, p in fresh.named_parameters() if n in base)

    # 6. A training step timed with loracuda's layer and with the plain-PyTorch reference formula.
    ids, targets = (t.to(device) for t in next(batches))
    model.train()
    loracuda_step = _step_time(model, ids, targets, device)
    with use_impl(model, "reference"):
        reference_step = _step_time(model, ids, targets, device)

    checks = {
        "loss went down": last_loss < first_loss,
        "saved adapter reloads to identical logits": loaded_equal,
        f"merged logits equal unmerged (rel. diff {float(diff):.1e} <= {bound:g})": merged_close,
        "unmerge restored every base weight bit for bit": restored,
    }
    tok = ids.numel()
    rows = [
        ("fine-tune", f"{args.steps} steps", f"{train_seconds:.2f} s", f"loss {first_loss:.3f} -> {last_loss:.3f}"),
        ("train step, loracuda", f"{tok} tokens", f"{loracuda_step * 1e3:.1f} ms", f"{tok / loracuda_step:,.0f} tokens/s"),
        ("train step, reference", f"{tok} tokens", f"{reference_step * 1e3:.1f} ms",
         f"{reference_step / loracuda_step:.2f}x loracuda's time"),
        ("merge", f"{len(report.layers)} layers", f"{merge_seconds * 1e3:.1f} ms",
         f"restore record {report.total_record_bytes / 2**20:.2f} MiB for {report.weight_bytes / 2**20:.2f} MiB of weights"),
        ("unmerge", f"{len(report.layers)} layers", f"{unmerge_seconds * 1e3:.1f} ms", "bit-exact" if restored else "NOT exact"),
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    print()
    for r in rows:
        print("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)))
    print()
    for name, ok in checks.items():
        print(f"  [{'ok' if ok else 'FAILED'}] {name}")
    print(f"\n  adapter saved in {out} (adapter_config.json, adapter_model.safetensors)")
    return 0 if all(checks.values()) else 1
