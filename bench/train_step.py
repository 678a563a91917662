"""One LoRA training step of a Llama-style model, loracuda against PEFT, at dropout 0 and 0.1.

    python bench/train_step.py [--quick] [--rounds 7] [--loss-steps 20] [--profile] [--threads N]

The train suite's case (bench/suites/train.py, train_shape): hidden 1024, intermediate 2816,
4 layers, r = 16 on every linear layer but the head, float32, batch 4 x 256 tokens, on the CPU:
forward, cross-entropy, backward, AdamW on the LoRA factors. All four (provider, dropout) steps are
timed in interleaved rounds (the order rotates each round, so load from elsewhere falls on all of
them alike). Printed: the median step time and tokens/s, the ratio to PEFT (in the table: of the
medians; in the goal lines: the median of the per-round ratios, with their 20th / 80th percentiles),
the peak memory above the pre-step level (VmHWM on the CPU) and the bytes autograd saves for
backward, then the loss curves of 20 steps from the same seed and whether they agree
(train_suite.compare_curves says what agreeing means at each dropout). --profile prints
torch.profiler tables of one step of each provider (self CPU time by op). Also printed: each step's
minor page faults (glibc's malloc trims its heap top past a threshold and faults it back in; here it is
PEFT's steps that pay, about 8,000 faults each, and a run with MALLOC_TRIM_THRESHOLD_=1073741824
MALLOC_MMAP_THRESHOLD_=33554432 removes them for both). Exits 1 when the loss curves disagree.
"""

import argparse
import os
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

import torch  # noqa: E402

from bench.harness import memory  # noqa: E402
from bench.harness.cases import SuiteContext  # noqa: E402
from bench.suites import train as T  # noqa: E402

DROPOUTS = (0.0, 0.1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="hidden 256, 2 layers, 2 x 128 tokens")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds (one step each)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per provider before the rounds")
    parser.add_argument("--loss-steps", type=int, default=20, help="steps of the loss-curve check (0: skip)")
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table per provider")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device("cpu"), torch.float32
    s = T.train_shape(SuiteContext(device, dtype, quick=args.quick))
    tokens = s["batch"] * s["tokens"]
    print(f"shape {s}, r={T.RANK}, {dtype}, {torch.get_num_threads()} threads, torch {torch.__version__}")

    steps, saved = {}, {}
    for p in DROPOUTS:
        models, ids = T.build_models(s, p, device, dtype, with_peft=True)
        for name, model in models.items():
            steps[(name, p)] = T.make_step(model, ids)
            saved[(name, p)] = T.saved_activation_bytes(model, ids)
    keys = list(steps)
    for key in keys:
        for _ in range(args.warmup):
            steps[key]()
    times = {key: [] for key in keys}
    faults = {key: 0 for key in keys}  # minor page faults during the timed steps (see bench/layer_ratio.py)
    for round_ in range(args.rounds):
        order = keys[round_ % len(keys):] + keys[: round_ % len(keys)]
        for key in order:
            faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            start = time.perf_counter()
            steps[key]()
            times[key].append(time.perf_counter() - start)
            faults[key] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before
    peaks = {key: memory.peak_extra_bytes(steps[key], device) for key in keys}

    print(f"\n{'provider':<13} {'p':>4} {'median ms':>10} {'p20-p80 ms':>16} {'tokens/s':>9} {'x PEFT':>7} {'saved MB':>9} {'peak MB':>8} {'faults/step':>11}")
    for key in keys:
        name, p = key
        t = sorted(times[key])
        med = statistics.median(t)
        p20, p80 = t[int(0.2 * (len(t) - 1))], t[int(round(0.8 * (len(t) - 1)))]
        speed = statistics.median(times[("peft", p)]) / med if ("peft", p) in times else float("nan")
        peak = peaks[key]
        peak_text = f"{peak / 2**20:8.1f}" if peak is not None else "       -"
        print(f"{name:<13} {p:>4} {med * 1e3:10.1f} {p20 * 1e3:7.1f}-{p80 * 1e3:<8.1f} {tokens / med:9.0f} {speed:7.3f} {saved[key] / 2**20:9.1f} {peak_text} {faults[key] / args.rounds:11.0f}")
    for p in DROPOUTS:
        goal = 1.0 / T.TARGETS_VS_PEFT[p]
        # The ratio within each round (both steps under the same machine conditions), then its median
        # and 20th / 80th percentiles: steadier on a shared machine than the ratio of the medians.
        for ours in ("loracuda", "peft+loracuda"):
            if (ours, p) not in times:
                continue
            per_round = sorted(a / b for a, b in zip(times[("peft", p)], times[(ours, p)]))
            speed = statistics.median(per_round)
            p20, p80 = per_round[int(0.2 * (len(per_round) - 1))], per_round[int(round(0.8 * (len(per_round) - 1)))]
            print(f"p={p}: {ours} {speed:.3f}x PEFT's tokens/s, median of per-round ratios (p20 {p20:.3f}, "
                  f"p80 {p80:.3f}; goal >= {goal:.2f}x: {'met' if speed >= goal else 'missed'})")
    print("(medians of interleaved rounds; on a shared machine other load makes them noisy. saved MB: what\n"
          " autograd keeps for backward, parameters left out; peak MB: resident-set growth during one step,\n"
          " a lower bound, 0 once the allocator has grown)")

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        for key in [("loracuda", 0.1), ("peft", 0.1), ("loracuda", 0.0), ("peft", 0.0)]:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                steps[key]()
            print(f"\n=== profile: {key[0]}, p={key[1]} ===")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))
    del steps

    ok = True
    if args.loss_steps:
        print()
        for p in DROPOUTS:
            agree, line = T.compare_curves(T.loss_curves(s, p, device, dtype, args.loss_steps), p)
            ok &= agree
            print(line)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
