"""The JSON record of a run, and the comparison of a run against a baseline record.

Record: {"schema": 1, "created", "device": {type, name, cpu_model, threads, load_average_1min},
"commit", "dirty", "torch", "python", "build_info", "dtype", "quick", "ceilings", "cases": [...]},
each case as runner.run_case writes it (id, suite, op, shape, dtype, bytes, flops, results per
provider: median_ms, p20_ms, p80_ms, repeats, samples_ms, GBps, TFLOPs, pct_copy_bw, pct_gemm,
x_loracuda, x_base, peak_extra_bytes where measured, or error; per_round).

Comparison (``compare``; RULE says it in one sentence, and --compare prints it). Two measures per case:
loracuda's median time, and the median of its per-round time over an anchor provider's (runner.py,
``per_round``; only where both runs have one with the same anchor). A case regresses when each measure
rose by more than the threshold (a fraction: 0.05 = 5%) AND by more than the two runs' combined noise,
sqrt(n_base^2 + n_now^2), each run's noise being the larger of half its p20-p80 spread and three
standard errors of its median (Measure.noise); or when loracuda has a time in the baseline and none now.
Why: a shared machine moves single medians by 5-10% between runs a minute apart, which a fixed
threshold alone reports as regressions. Load that slows a whole round moves the time but cancels in the
per-round ratio; load that falls on one provider's turn moves the ratio but mostly not the median time
over many rounds; a slower loracuda moves both. Half the spread of single samples (not only the
standard error of the median) is used on purpose: it also covers drift between runs that one run's
samples cannot show. Cases are matched by id (op, shape and dtype); ids in only one record are listed,
not failed.
"""

import json
import math
import os
import platform
import subprocess
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Optional

import torch

SCHEMA = 1
COMPARED_PROVIDER = "loracuda"


class ResultsError(Exception):
    """A baseline that cannot be read or does not have the shape of a record."""


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info(device: torch.device) -> dict:
    info = {"type": device.type, "cpu_model": cpu_model(), "threads": torch.get_num_threads()}
    try:
        # Load of the machine when the run began: CPU figures from a busy machine are not comparable.
        info["load_average_1min"] = os.getloadavg()[0]
    except OSError:
        pass
    if device.type == "cuda":
        info["name"] = torch.cuda.get_device_name(device)
        props = torch.cuda.get_device_properties(device)
        info["capability"] = f"{props.major}.{props.minor}"
        info["memory_bytes"] = props.total_memory
    else:
        info["name"] = info["cpu_model"]
    return info


def git_commit() -> tuple[Optional[str], Optional[bool]]:
    """(commit, dirty) of the repository this package lives in; outside one (a copy of the tree without
    .git, as sent to a GPU machine), (the LORACUDA_COMMIT environment variable or None, None)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root, capture_output=True, text=True, timeout=10, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("LORACUDA_COMMIT") or None, None
    return commit or None, bool(status.strip())


def make_record(cases: list, device: torch.device, dtype_name: str, quick: bool, ceilings: dict, build: dict) -> dict:
    commit, dirty = git_commit()
    return {
        "schema": SCHEMA,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": device_info(device),
        "commit": commit,
        "dirty": dirty,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "build_info": build,
        "dtype": dtype_name,
        "quick": quick,
        "ceilings": ceilings,
        "cases": cases,
    }


def write_record(record: dict, path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with open(path, "w") as f:
        json.dump(record, f, indent=1, sort_keys=False)
        f.write("\n")


def load_record(path: str) -> dict:
    """Reads a record written by write_record; ResultsError (one line) if unreadable or malformed."""
    try:
        with open(path) as f:
            record = json.load(f)
    except FileNotFoundError:
        raise ResultsError(f"cannot read baseline {path!r}: no such file") from None
    except OSError as error:
        raise ResultsError(f"cannot read baseline {path!r}: {error.strerror or error}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ResultsError(f"baseline {path!r} is not valid JSON ({error})".replace("\n", " ")) from None
    if not isinstance(record, dict) or not isinstance(record.get("cases"), list):
        raise ResultsError(f"baseline {path!r} is not a loracuda bench record (no 'cases' list)")
    for case in record["cases"]:
        if not isinstance(case, dict) or not isinstance(case.get("id"), str) or not isinstance(
            case.get("results"), dict
        ):
            raise ResultsError(f"baseline {path!r} has a malformed case entry (needs 'id' and 'results')")
    return record


@dataclass(frozen=True)
class Measure:
    """What --compare compares for one case in one run: a median with its 20th / 80th percentiles, in
    ``unit`` ("ms": loracuda's own time; "x <anchor>": loracuda's time over the anchor's per round)."""

    median: float
    p20: float
    p80: float
    unit: str
    count: int  # samples (rounds) behind the median

    @property
    def noise(self) -> float:
        """How far this run's median may sit from the machine's typical value by chance: the larger of half
        the p20-p80 spread of single samples (it also covers drift between runs, which one run's samples
        cannot show) and three standard errors of the median, 3 * 1.2533 * sigma / sqrt(n) with
        sigma = (p80 - p20) / 1.6832 for normal noise (it dominates when a run has few rounds)."""
        spread = max(0.0, self.p80 - self.p20)
        return spread * max(0.5, SE_FACTOR / math.sqrt(max(1, self.count)))


@dataclass(frozen=True)
class Part:
    """One measure of a case compared: baseline, now, the two runs' combined noise, and whether it rose."""

    base: Measure
    now: Measure
    noise: float
    rose: bool

    def describe(self) -> str:
        change = 100.0 * (self.now.median / self.base.median - 1.0)
        noise = 100.0 * self.noise / self.base.median
        return (f"{self.now.median:.4g} vs {self.base.median:.4g} {self.now.unit} ({change:+.1f}%, noise "
                f"{noise:.1f}%{': rose' if self.rose else ''})")


@dataclass(frozen=True)
class Verdict:
    case_id: str
    parts: list  # Part per measure; empty when loracuda has no time now
    regressed: bool
    base_ms: float

    def describe(self) -> str:
        if not self.parts:
            return f"{self.case_id}: loracuda has no time now (baseline {self.base_ms:.4g} ms)"
        return f"{self.case_id}: " + "; ".join(part.describe() for part in self.parts)


SE_FACTOR = 3 * 1.2533 / 1.6832  # three standard errors of a median, per unit of p20-p80 spread, times sqrt(n)

RULE = ("a case is slower when loracuda's median time AND its median time over an anchor provider's in the "
        "same rounds (the case's baseline or the addmm_ recipe, which run no loracuda code; where both runs "
        "have one) each rose by more than the threshold and by more than the two runs' combined noise (per run: "
        "the larger of half its p20-p80 spread and three standard errors of its median; added in quadrature)")


def _results(case: dict) -> dict:
    entry = case.get("results", {}).get(COMPARED_PROVIDER, {})
    return entry if isinstance(entry, dict) else {}


def _positive(value) -> Optional[float]:
    return float(value) if isinstance(value, (int, float)) and value > 0 else None


def _anchored(case: dict) -> Optional[Measure]:
    r = case.get("per_round")
    if not isinstance(r, dict) or not all(_positive(r.get(k)) for k in ("median", "p20", "p80")):
        return None
    return Measure(r["median"], r["p20"], r["p80"], f"x {r.get('anchor')}", int(r.get("rounds") or 1))


def _timed(case: dict) -> Optional[Measure]:
    entry = _results(case)
    median = _positive(entry.get("median_ms"))
    if median is None:
        return None
    p20 = _positive(entry.get("p20_ms")) or median
    p80 = _positive(entry.get("p80_ms")) or median
    return Measure(median, p20, p80, "ms", int(entry.get("repeats") or 1))


def measures(base_case: dict, now_case: dict) -> list[tuple[Measure, Optional[Measure]]]:
    """(baseline, now) pairs of what is compared for one case: loracuda's median time, and its per-round
    ratio to the anchor where both runs have one with the same anchor. Empty when the baseline has no
    time for loracuda; now is None when loracuda has no time now."""
    base_time, now_time = _timed(base_case), _timed(now_case)
    if base_time is None:
        return []
    pairs = [(base_time, now_time)]
    base_ratio, now_ratio = _anchored(base_case), _anchored(now_case)
    if base_ratio is not None and now_ratio is not None and base_ratio.unit == now_ratio.unit and now_time is not None:
        pairs.append((base_ratio, now_ratio))
    return pairs


def _part(base: Measure, now: Measure, threshold: float) -> Part:
    noise = math.hypot(base.noise, now.noise)
    gap = now.median - base.median
    return Part(base, now, noise, gap > threshold * base.median and gap > noise)


def judge(case_id: str, pairs: list, threshold: float) -> Verdict:
    """Slower when every measure in ``pairs`` rose by more than ``threshold`` (a fraction) and by more than
    the two runs' combined noise (Measure.noise, in quadrature); a case loracuda failed in is slower."""
    if pairs[0][1] is None:
        return Verdict(case_id, [], True, pairs[0][0].median)
    parts = [_part(base, now, threshold) for base, now in pairs]
    return Verdict(case_id, parts, all(part.rose for part in parts), pairs[0][0].median)


@dataclass(frozen=True)
class Comparison:
    regressions: list  # Verdicts that regressed
    verdicts: list  # every compared case's Verdict
    compared: int
    only_in_base: list
    only_now: list
    warnings: list


def compare(current: dict, base: dict, threshold: float) -> Comparison:
    warnings = []
    for key in ("type", "name"):
        a, b = current.get("device", {}).get(key), base.get("device", {}).get(key)
        if a != b:
            warnings.append(f"device {key} differs: now {a!r}, baseline {b!r}")
    now_cases = {c["id"]: c for c in current["cases"]}
    base_cases = {c["id"]: c for c in base["cases"]}
    verdicts = []
    for case_id, base_case in base_cases.items():
        if case_id not in now_cases:
            continue
        pairs = measures(base_case, now_cases[case_id])
        if pairs:
            verdicts.append(judge(case_id, pairs, threshold))
    return Comparison(
        regressions=[v for v in verdicts if v.regressed],
        verdicts=verdicts,
        compared=len(verdicts),
        only_in_base=[i for i in base_cases if i not in now_cases],
        only_now=[i for i in now_cases if i not in base_cases],
        warnings=warnings,
    )
