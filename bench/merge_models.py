"""merge / unmerge of a small Llama in place, against PEFT's merge_and_unload on the same model, with the
peak extra memory of each (CPU).

Model: Llama config, hidden 1024, intermediate 2816, 2 layers (configurable), random weights, rank 16 on
every linear layer but the output head. loracuda: merge (exact, with its restore record) and unmerge
(bit-exact), timed separately. PEFT: merge_and_unload on a fresh copy each repetition (it materialises
a full-size float32 delta per layer). Peak extra memory: the largest excess of live CPU allocations
over the level at the start, from torch's profiler memory events.

    python bench/merge_models.py [--reps 5] [--dtype bf16|fp32|fp16] [--threads N]
"""

import argparse
import copy
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from bench.model_setup import randomize_lora_b  # noqa: E402


def peak_extra_bytes(fn):
    """Runs fn once under the profiler; returns (peak live CPU bytes allocated during fn over the level at
    its start, net bytes still allocated at its end), from every allocation and free the profiler saw."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [(e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort()
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak, live


def timed(fn, reps, setup=None):
    times = []
    for _ in range(reps):
        arg = setup() if setup else None
        start = time.perf_counter()
        fn(arg) if setup else fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times), max(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]

    import peft
    from transformers import LlamaConfig, LlamaForCausalLM

    import loracuda

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=16,
        num_key_value_heads=16,
        vocab_size=256,
    )
    base = LlamaForCausalLM(config).to(dtype).eval()

    ours = copy.deepcopy(base)
    loracuda.inject(ours, loracuda.LoraConfig(r=16, alpha=32))
    randomize_lora_b(ours)
    layer_bytes = max(
        m.weight.numel() * m.weight.element_size() for m in ours.modules() if isinstance(m, loracuda.LoRALinear)
    )
    snapshot = {n: p.detach().clone() for n, p in ours.named_parameters() if "base_layer" in n}

    report = loracuda.merge(ours)
    loracuda.unmerge(ours)
    merge_t = []
    unmerge_t = []
    for _ in range(args.reps):
        start = time.perf_counter()
        loracuda.merge(ours)
        merge_t.append(time.perf_counter() - start)
        start = time.perf_counter()
        loracuda.unmerge(ours)
        unmerge_t.append(time.perf_counter() - start)
    exact = all(torch.equal(p, snapshot[n]) for n, p in ours.named_parameters() if "base_layer" in n)
    ours_peak, ours_kept = peak_extra_bytes(lambda: loracuda.merge(ours))
    ours_unmerge_peak, _ = peak_extra_bytes(lambda: loracuda.unmerge(ours))

    def peft_model():
        pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
        randomize_lora_b(pm)
        return pm

    peft_t = timed(lambda pm: pm.merge_and_unload(), args.reps, setup=peft_model)
    pm = peft_model()
    peft_peak, _ = peak_extra_bytes(lambda: pm.merge_and_unload())

    med_m, med_u = statistics.median(merge_t), statistics.median(unmerge_t)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, Llama hidden {args.hidden}, intermediate "
          f"{args.intermediate}, {args.layers} layers, {args.dtype}, r=16 on {len(report.layers)} layers")
    print(f"  loracuda merge (exact)     median {med_m * 1e3:8.2f} ms  (min {min(merge_t) * 1e3:.2f}, max {max(merge_t) * 1e3:.2f})")
    print(f"  loracuda unmerge (exact)   median {med_u * 1e3:8.2f} ms  (min {min(unmerge_t) * 1e3:.2f}, max {max(unmerge_t) * 1e3:.2f})"
          f"  bit-exact after {args.reps + 1} cycles: {exact}")
    print(f"  peft merge_and_unload      median {peft_t[0] * 1e3:8.2f} ms  (min {peft_t[1] * 1e3:.2f}, max {peft_t[2] * 1e3:.2f})")
    print(f"  speed-up vs peft: merge {peft_t[0] / med_m:.1f}x, unmerge {peft_t[0] / med_u:.1f}x, "
          f"merge+unmerge {peft_t[0] / (med_m + med_u):.1f}x  (target >= 10x)")
    print(f"  restore records: {report.total_record_bytes / 2**20:.2f} MiB for {report.weight_bytes / 2**20:.2f} MiB of weights "
          f"({report.total_record_bytes / report.weight_bytes:.3f})")
    print(f"  peak extra memory: loracuda merge {ours_peak / 2**20:.2f} MiB, of which {ours_kept / 2**20:.2f} MiB are the "
          f"records it keeps (transient {(ours_peak - ours_kept) / 2**20:.2f} MiB), unmerge {ours_unmerge_peak / 2**20:.2f} MiB, "
          f"peft {peft_peak / 2**20:.2f} MiB; largest layer weight {layer_bytes / 2**20:.2f} MiB")


if __name__ == "__main__":
    main()
