"""The JSON record of a run, and the comparison of a run against a baseline record.

Record: {"schema": 1, "created", "device": {type, name, cpu_model, threads, load_average_1min},
"commit", "dirty", "torch", "python", "build_info", "dtype", "quick", "ceilings", "cases": [...]},
each case as runner.run_case writes it (id, suite, op, shape, dtype, bytes, flops, results per
provider: median_ms, p20_ms, p80_ms, repeats, GBps, TFLOPs, pct_copy_bw, pct_gemm, x_loracuda,
x_base, peak_extra_bytes where measured, or error).

Comparison: a case regresses when loracuda's median time exceeds the baseline's by more than the
threshold (a fraction: 0.05 = 5%), or when loracuda has a time in the baseline and none now.
Cases are matched by id (op, shape and dtype); ids in only one record are listed, not failed.
"""

import json
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
class Regression:
    case_id: str
    base_ms: float
    now_ms: Optional[float]  # None: loracuda has no time now (it failed)

    def describe(self) -> str:
        if self.now_ms is None:
            return f"{self.case_id}: loracuda has no time now (baseline {self.base_ms:.4g} ms)"
        change = 100.0 * (self.now_ms / self.base_ms - 1.0)
        return f"{self.case_id}: {self.now_ms:.4g} ms vs {self.base_ms:.4g} ms (+{change:.1f}%)"


@dataclass(frozen=True)
class Comparison:
    regressions: list
    compared: int
    only_in_base: list
    only_now: list
    warnings: list


NOISE_ALLOWANCE = 0.25  # the most a baseline's own spread may excuse, as a fraction of its median


def _stat(case: dict, key: str) -> Optional[float]:
    entry = case.get("results", {}).get(COMPARED_PROVIDER, {})
    value = entry.get(key) if isinstance(entry, dict) else None
    return float(value) if isinstance(value, (int, float)) and value > 0 else None


def _median(case: dict) -> Optional[float]:
    return _stat(case, "median_ms")


def _regressed(base_case: dict, now_case: dict, threshold: float) -> bool:
    """Slower by more than ``threshold`` in the median, and outside the baseline's own spread: the new
    median is above the baseline's 80th percentile (a shared machine's jitter moves single medians by
    more than 5%; a real slow-down moves the median past most of the old samples). The spread excuses
    at most NOISE_ALLOWANCE over the baseline's median, so a noisy baseline cannot hide a large slow-down."""
    base_ms, now_ms = _median(base_case), _median(now_case)
    if now_ms is None:
        return True
    base_p80 = _stat(base_case, "p80_ms") or base_ms
    allowed = max(base_ms * (1.0 + threshold), min(base_p80, base_ms * (1.0 + NOISE_ALLOWANCE)))
    return now_ms > allowed


def compare(current: dict, base: dict, threshold: float) -> Comparison:
    warnings = []
    for key in ("type", "name"):
        a, b = current.get("device", {}).get(key), base.get("device", {}).get(key)
        if a != b:
            warnings.append(f"device {key} differs: now {a!r}, baseline {b!r}")
    now_cases = {c["id"]: c for c in current["cases"]}
    base_cases = {c["id"]: c for c in base["cases"]}
    regressions, compared = [], 0
    for case_id, base_case in base_cases.items():
        if case_id not in now_cases:
            continue
        base_ms, now_ms = _median(base_case), _median(now_cases[case_id])
        if base_ms is None:
            continue
        compared += 1
        if _regressed(base_case, now_cases[case_id], threshold):
            regressions.append(Regression(case_id, base_ms, now_ms))
    return Comparison(
        regressions=regressions,
        compared=compared,
        only_in_base=[i for i in base_cases if i not in now_cases],
        only_now=[i for i in now_cases if i not in base_cases],
        warnings=warnings,
    )
