"""Runs the cases of the chosen suites and turns timings into figures.

The providers of a case are timed round-robin (timer.measure_interleaved), so load from elsewhere
on a shared machine falls on all of them alike. For each case and provider: median / p20 / p80
time (ms), achieved GB/s and TFLOP/s (the case's bytes and FLOPs over the median time) and their
share of the measured ceilings, the ratio of the provider's time to loracuda's (``x_loracuda``;
> 1: the provider is slower) and, for cases with a baseline, to the baseline's (``x_base``). A provider
that fails records its error and the run goes on.

Per round: every provider's samples are kept (``samples_ms``, sample i from round i), and the case
records loracuda's time over an anchor provider's within each round (``per_round``: the anchor, and the
median, 20th and 80th percentile of those ratios). The anchor (the case's baseline, else the addmm_
recipe, else any other provider that does not run loracuda) runs no loracuda code, so load from
elsewhere that slows a whole round cancels in the ratio while a change in loracuda's kernels does not:
`--compare` compares these (results.py).

Test hook: LORACUDA_BENCH_INJECT_SLOWDOWN="TEXT:FRACTION" (e.g. "merge_:0.15") makes loracuda's timed
call in every case whose id contains TEXT take (1 + FRACTION) times as long, by a busy wait after the
call (CPU only), so that tests can show what --compare makes of a known slow-down.
"""

import gc
import os
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from . import memory
from .ceilings import CeilingMeter, dtype_name
from .cases import Case, SuiteContext, suites
from .timer import TimerConfig, measure_interleaved, percentile

PROVIDER_ORDER = ("loracuda", "base", "peft", "addmm", "reference")
ANCHOR_ORDER = ("addmm", "base", "single", "peft")  # after the case's baseline
INJECT_ENV = "LORACUDA_BENCH_INJECT_SLOWDOWN"


def injected_slowdown() -> Optional[tuple[str, float]]:
    """(case id text, fraction) from LORACUDA_BENCH_INJECT_SLOWDOWN, or None; ValueError if malformed."""
    text = os.environ.get(INJECT_ENV, "").strip()
    if not text:
        return None
    match, sep, fraction = text.rpartition(":")
    try:
        value = float(fraction)
    except ValueError:
        value = -1.0
    if not sep or not match or not value > 0.0:
        raise ValueError(f"{INJECT_ENV} must be 'CASE_TEXT:FRACTION' with FRACTION > 0, got {text!r}")
    return match, value


def slowed(fn: Callable, fraction: float) -> Callable:
    """fn, followed by a busy wait of ``fraction`` times the call's own duration (inside the timed region)."""

    def call(*args):
        t0 = time.perf_counter()
        out = fn(*args)
        end = time.perf_counter() + (time.perf_counter() - t0) * fraction
        while time.perf_counter() < end:
            pass
        return out

    return call


@dataclass(frozen=True)
class RunOptions:
    device: torch.device
    dtype: torch.dtype
    quick: bool = False
    tiny: bool = False
    case_filter: Optional[str] = None  # keep cases whose id contains this text
    rounds: Optional[int] = None  # a fixed number of timing rounds instead of the time budget


def timer_config(options: RunOptions) -> TimerConfig:
    if options.rounds is not None:
        warmup = 2 if options.tiny else 1 if options.quick else 3
        return TimerConfig(warmup=warmup, repeats=options.rounds, min_repeats=options.rounds, budget_s=0.0)
    if options.tiny:
        return TimerConfig(warmup=2, repeats=25, min_repeats=9, budget_s=0.1)
    if options.quick:
        return TimerConfig(warmup=1, repeats=15, min_repeats=7, budget_s=0.5)
    return TimerConfig(warmup=3, repeats=50, min_repeats=7, budget_s=4.0)


def collect_cases(names: list[str], options: RunOptions, with_peft: bool) -> list[Case]:
    ctx = SuiteContext(options.device, options.dtype, options.quick, options.tiny, with_peft)
    registry = suites()
    cases = []
    for name in names:
        cases.extend(registry[name].build(ctx))
    if options.case_filter:
        cases = [c for c in cases if options.case_filter in c.case_id]
    return cases


def _error_text(error: BaseException) -> str:
    """The first line of an error; the dispatcher's long "Could not run ..." as "no kernel: ...". """
    first = (str(error).strip().splitlines() or [""])[0]
    if isinstance(error, NotImplementedError) and first.startswith("Could not run"):
        return "no kernel: " + first.split(". ")[0]
    return f"{type(error).__name__}: {first}"[:300]


def _ordered(benches: dict) -> list:
    known = [p for p in PROVIDER_ORDER if p in benches]
    return known + [p for p in benches if p not in known]


def run_case(
    case: Case,
    options: RunOptions,
    meter: CeilingMeter,
    config: TimerConfig,
    progress: Callable[[str], None],
) -> dict:
    copy_bw = meter.copy_bytes_per_s()
    gemm_rate = meter.gemm_flop_per_s(case.dtype)
    record = {
        "id": case.case_id,
        "suite": case.suite,
        "op": case.op,
        "shape": case.shape,
        "dtype": dtype_name(case.dtype),
        "bytes": case.bytes,
        "flops": case.flops,
        "baseline": case.baseline,
        "target": case.target,
        "notes": list(case.notes),
        "results": {},
    }
    try:
        benches = case.make()
    except Exception as error:  # a case that cannot even be set up is reported, not fatal
        record["error"] = _error_text(error)
        return record
    inject = injected_slowdown()
    if inject is not None and inject[0] in case.case_id and "loracuda" in benches:
        if options.device.type != "cpu":
            raise ValueError(f"{INJECT_ENV} is a CPU-only test hook (its busy wait is on the host clock)")
        benches["loracuda"].fn = slowed(benches["loracuda"].fn, inject[1])
        record["notes"].append(f"test hook: loracuda slowed by {100 * inject[1]:.0f}% ({INJECT_ENV})")
    order = _ordered(benches)
    progress(f"{case.case_id} [{', '.join(order)}]")
    timings, errors = measure_interleaved(
        {name: (benches[name].fn, benches[name].setup) for name in order}, options.device, config
    )
    for name in order:
        bench = benches[name]
        if name in errors or name not in timings:
            error = errors.get(name, RuntimeError("no timing"))
            record["results"][name] = {"error": _error_text(error)}
            continue
        timing = timings[name]
        nbytes = bench.bytes if bench.bytes is not None else case.bytes
        flops = bench.flops if bench.flops is not None else case.flops
        entry = {
            "median_ms": timing.median_s * 1e3,
            "p20_ms": timing.p20_s * 1e3,
            "p80_ms": timing.p80_s * 1e3,
            "repeats": timing.repeats,
            "samples_ms": [round(t * 1e3, 6) for t in timing.samples],
            "GBps": nbytes / timing.median_s / 1e9,
            "TFLOPs": flops / timing.median_s / 1e12,
            "pct_copy_bw": 100.0 * nbytes / timing.median_s / copy_bw,
            "pct_gemm": 100.0 * flops / timing.median_s / gemm_rate,
        }
        if case.measure_memory and bench.setup is None:
            try:
                entry["peak_extra_bytes"] = memory.peak_extra_bytes(bench.fn, options.device)
            except Exception as error:
                entry["peak_extra_error"] = _error_text(error)
        record["results"][name] = entry
    del benches
    gc.collect()
    if options.device.type == "cuda":
        torch.cuda.empty_cache()
    _add_ratios(record)
    _add_per_round(record, case.baseline)
    if case.measure_memory:
        record["memory_method"] = memory.method(options.device)
    return record


def _add_ratios(record: dict) -> None:
    results = record["results"]

    def median(name: str) -> Optional[float]:
        entry = results.get(name, {})
        return entry.get("median_ms")

    for key, ref in (("x_loracuda", "loracuda"), ("x_base", record.get("baseline"))):
        ref_time = median(ref) if ref else None
        if not ref_time:
            continue
        for entry in results.values():
            if "median_ms" in entry:
                entry[key] = entry["median_ms"] / ref_time


def _add_per_round(record: dict, baseline: Optional[str]) -> None:
    """record["per_round"]: loracuda's time over the anchor's within each round (see the module docstring)."""
    results = record["results"]
    ours = results.get("loracuda", {}).get("samples_ms")
    if not ours:
        return
    for anchor in ([baseline] if baseline else []) + [p for p in ANCHOR_ORDER if p != baseline]:
        theirs = results.get(anchor, {}).get("samples_ms")
        if anchor == "loracuda" or not theirs:
            continue
        ratios = [a / b for a, b in zip(ours, theirs) if b > 0]
        if not ratios:
            continue
        record["per_round"] = {
            "anchor": anchor,
            "median": statistics.median(ratios),
            "p20": percentile(ratios, 0.2),
            "p80": percentile(ratios, 0.8),
            "rounds": len(ratios),
        }
        return


def run(
    names: list[str],
    options: RunOptions,
    with_peft: bool,
    progress_factory: Callable[[int], Callable[[int, str], None]],
) -> tuple[list[dict], CeilingMeter]:
    """Runs every case of the named suites; progress_factory(total) gives progress(step, label)."""
    cases = collect_cases(names, options, with_peft)
    meter = CeilingMeter(options.device, tiny=options.tiny, quick=options.quick)
    config = timer_config(options)
    steps = sum(1 for _ in cases)
    progress = progress_factory(steps)
    records = []
    for index, case in enumerate(cases):
        records.append(run_case(case, options, meter, config, lambda label, i=index: progress(i, label)))
    progress(steps, "done")
    return records, meter
