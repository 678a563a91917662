"""Timing of one callable: median and 20th / 80th percentiles after warm-up.

On CUDA each repeat is bracketed by CUDA events on the current stream (GPU time, no host gaps
counted); elsewhere by time.perf_counter around the call and a device synchronisation (a no-op on
the CPU, whose ops return when done).
A ``setup`` callable, when given, runs untimed before every repeat (e.g. the forward pass before a
timed backward) and its return value is passed to the timed callable.
"""

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional

import torch


@dataclass(frozen=True)
class Timing:
    """Seconds per call: median, 20th and 80th percentile over ``repeats`` timed calls; ``samples``: every
    timed call's seconds in the order taken (for measure_interleaved: sample i comes from round i)."""

    median_s: float
    p20_s: float
    p80_s: float
    repeats: int
    samples: tuple = ()

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class TimerConfig:
    """warmup: untimed calls first; repeats / min_repeats: the most / fewest timed calls (rounds, for
    measure_interleaved); budget_s: seconds of timed calls (of all rounds) to aim for between the two."""

    warmup: int = 3
    repeats: int = 25
    min_repeats: int = 5
    budget_s: float = 2.0  # seconds of timed calls to aim for


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0 <= q <= 1) of values by linear interpolation between order statistics."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    pos = q * (len(ordered) - 1)
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _CacheFlusher:
    """Overwrites a buffer larger than the GPU's last-level cache before each timed CUDA call, so a
    memory-bound kernel is timed reading DRAM, not an L2 still warm from the previous repeat."""

    BYTES = 256 * 1024 * 1024  # above the 50-60 MiB L2 of current data-centre GPUs

    def __init__(self, device: torch.device):
        self.buffer = torch.empty(self.BYTES // 4, dtype=torch.int32, device=device)

    def __call__(self) -> None:
        self.buffer.zero_()


def measure(
    fn: Callable[..., Any],
    device: torch.device,
    config: TimerConfig,
    setup: Optional[Callable[[], Any]] = None,
) -> Timing:
    """Times ``fn()`` (or ``fn(setup())``) on ``device``; see the module docstring.

    The number of timed calls is ``budget_s`` divided by the time of one call estimated during
    warm-up, clamped to [min_repeats, repeats]. On CUDA all timed calls are queued before one
    synchronisation, so host launch latency is hidden behind the queue, and the L2 cache is flushed
    before each call outside the timed region.
    """

    def call_once() -> None:
        if setup is None:
            fn()
        else:
            fn(setup())

    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(max(1, config.warmup)):
        call_once()
    synchronize(device)
    estimate = (time.perf_counter() - t0) / max(1, config.warmup)
    count = int(config.budget_s / estimate) if estimate > 0 else config.repeats
    count = max(config.min_repeats, min(config.repeats, count))

    samples: list[float] = []
    if device.type == "cuda":
        flush = _CacheFlusher(device)
        events = []
        for _ in range(count):
            arg = setup() if setup is not None else None
            flush()
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            if setup is None:
                fn()
            else:
                fn(arg)
            end.record()
            events.append((start, end))
        torch.cuda.synchronize(device)
        samples = [start.elapsed_time(end) / 1e3 for start, end in events]  # elapsed_time is in ms
        del flush
    else:
        for _ in range(count):
            arg = setup() if setup is not None else None
            t0 = time.perf_counter()
            if setup is None:
                fn()
            else:
                fn(arg)
            synchronize(device)
            samples.append(time.perf_counter() - t0)
    return Timing(
        median_s=statistics.median(samples),
        p20_s=percentile(samples, 0.2),
        p80_s=percentile(samples, 0.8),
        repeats=len(samples),
        samples=tuple(samples),
    )


def measure_interleaved(
    calls: dict,
    device: torch.device,
    config: TimerConfig,
) -> tuple[dict, dict]:
    """Times several callables round-robin: every round calls each once (in a rotated order), so a
    burst of load from elsewhere on the machine slows all of them alike and their ratios hold.

    calls: name -> (fn, setup or None), as for :func:`measure`. Returns ({name: Timing},
    {name: exception}) for the calls that ran and those that raised (during warm-up or a round).
    The number of rounds is ``budget_s`` over the estimated time of one round, clamped to
    [min_repeats, repeats].
    """
    errors: dict = {}
    live: dict = {}
    estimate = 0.0
    for name, (fn, setup) in calls.items():
        try:
            synchronize(device)
            t0 = time.perf_counter()
            for _ in range(max(1, config.warmup)):
                fn() if setup is None else fn(setup())
            synchronize(device)
            estimate += (time.perf_counter() - t0) / max(1, config.warmup)
            live[name] = (fn, setup)
        except Exception as error:  # reported per provider by the caller
            errors[name] = error
    if not live:
        return {}, errors
    rounds = int(config.budget_s / estimate) if estimate > 0 else config.repeats
    rounds = max(config.min_repeats, min(config.repeats, rounds))

    names = list(live)
    samples: dict = {name: [] for name in names}
    flush = _CacheFlusher(device) if device.type == "cuda" else None
    pending: dict = {name: [] for name in names}  # CUDA: event pairs read after one final sync
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            if name in errors:
                continue
            fn, setup = live[name]
            try:
                arg = setup() if setup is not None else None
                if flush is not None:
                    flush()
                    start = torch.cuda.Event(enable_timing=True)
                    end = torch.cuda.Event(enable_timing=True)
                    start.record()
                    fn() if setup is None else fn(arg)
                    end.record()
                    pending[name].append((start, end))
                else:
                    t0 = time.perf_counter()
                    fn() if setup is None else fn(arg)
                    synchronize(device)
                    samples[name].append(time.perf_counter() - t0)
            except Exception as error:
                errors[name] = error
    if flush is not None:
        torch.cuda.synchronize(device)
        for name, pairs in pending.items():
            samples[name] = [start.elapsed_time(end) / 1e3 for start, end in pairs]  # ms -> s
    timings = {}
    for name in names:
        if name in errors or not samples[name]:
            continue
        values = samples[name]
        timings[name] = Timing(
            median_s=statistics.median(values),
            p20_s=percentile(values, 0.2),
            p80_s=percentile(values, 0.8),
            repeats=len(values),
            samples=tuple(values),
        )
    return timings, errors


def round_robin_samples(fns: dict, rounds: int, warmup: int = 1) -> dict:
    """name -> the seconds of each round's call, on the host clock (CPU work): ``warmup`` untimed calls
    of each, then every round calls each fn once in the given order, so that sample i of every name
    comes from round i (for per-round ratios, steadier on a shared machine than ratios of medians)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
    return samples


def ratio_quantiles(samples: dict, name: str, base: str) -> tuple[float, float, float]:
    """Median, 20th and 80th percentile of samples[name][i] / samples[base][i] over the rounds i."""
    ratios = [a / b for a, b in zip(samples[name], samples[base])]
    return statistics.median(ratios), percentile(ratios, 0.2), percentile(ratios, 0.8)
