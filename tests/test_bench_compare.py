"""`loracuda bench --compare`'s decision (bench/harness/results.py): flag a slower loracuda, not noise.

The decision logic runs on synthetic records whose samples are drawn from known distributions (no
timing, milliseconds to run): runs of the same code under the same noise are not flagged, runs that
only differ by load that slows whole rounds are not flagged, and a 15% slower loracuda is flagged and
named. One quick real run checks the slow-down test hook end to end."""

import json
import os
import random
import statistics
import subprocess
import sys

import pytest

from bench.harness import results as R
from bench.harness.timer import percentile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _entry(samples: list) -> dict:
    return {"median_ms": statistics.median(samples), "p20_ms": percentile(samples, 0.2),
            "p80_ms": percentile(samples, 0.8), "repeats": len(samples), "samples_ms": samples}


def synthetic_case(rng: random.Random, case_id: str, rounds: int, noise: float, slowdown: float = 0.0,
                   load: float = 0.0) -> dict:
    """A case timed in ``rounds`` rounds: each round's machine speed varies (lognormal, sigma ``noise``)
    and slows both providers alike; each call adds its own jitter (sigma noise / 2). loracuda's work is
    1.0 ms (times 1 + slowdown), the anchor's 2.0 ms; ``load`` slows every round of the run."""
    ours, theirs = [], []
    for _ in range(rounds):
        speed = (1.0 + load) * rng.lognormvariate(0.0, noise)
        ours.append(1.0 * (1.0 + slowdown) * speed * rng.lognormvariate(0.0, noise / 2))
        theirs.append(2.0 * speed * rng.lognormvariate(0.0, noise / 2))
    ratios = [a / b for a, b in zip(ours, theirs)]
    return {
        "id": case_id,
        "results": {"loracuda": _entry(ours), "addmm": _entry(theirs)},
        "per_round": {"anchor": "addmm", "median": statistics.median(ratios), "p20": percentile(ratios, 0.2),
                      "p80": percentile(ratios, 0.8), "rounds": rounds},
    }


def record(cases: list) -> dict:
    return {"device": {"type": "cpu", "name": "synthetic"}, "cases": cases}


IDS = [f"ops/case{i}" for i in range(8)]


def run(rng, rounds=15, noise=0.05, slow=(), fraction=0.15, load=0.0) -> dict:
    return record([synthetic_case(rng, i, rounds, noise, fraction if i in slow else 0.0, load) for i in IDS])


@pytest.mark.parametrize("noise", [0.02, 0.05, 0.10])
def test_same_code_under_the_same_noise_is_not_flagged(noise):
    rng = random.Random(1)
    flagged = 0
    for _ in range(100):  # 100 comparisons of 8 cases each
        flagged += len(R.compare(run(rng, noise=noise), run(rng, noise=noise), 0.05).regressions)
    assert flagged <= 4, f"{flagged} of 800 self-comparisons flagged at noise {noise}"


def test_load_that_slows_whole_rounds_is_not_flagged():
    """10% slower rounds all through the new run (another job on the machine): the median times rise by
    10%, past the threshold, but the per-round ratio to the anchor does not."""
    rng = random.Random(2)
    flagged = sum(len(R.compare(run(rng, load=0.10), run(rng), 0.05).regressions) for _ in range(50))
    assert flagged <= 2, flagged


def test_a_fifteen_percent_slower_case_is_flagged_and_named():
    rng = random.Random(3)
    hits, others = 0, 0
    for _ in range(50):
        comparison = R.compare(run(rng, slow={"ops/case3"}), run(rng), 0.05)
        names = {v.case_id for v in comparison.regressions}
        hits += "ops/case3" in names
        others += len(names - {"ops/case3"})
    assert hits >= 48, f"the slow case was flagged in {hits} of 50 comparisons"
    assert others <= 2, others


def test_a_slowdown_within_the_threshold_is_not_flagged():
    rng = random.Random(4)
    flagged = sum(len(R.compare(run(rng, noise=0.01, slow=set(IDS), fraction=0.03), run(rng, noise=0.01), 0.05)
                      .regressions) for _ in range(20))
    assert flagged == 0, flagged


def test_a_slowdown_smaller_than_the_noise_is_not_flagged_however_many_rounds():
    """+15% when single samples spread by 30%: half the spread is the floor of each run's noise (it stands
    for the drift between runs that more rounds of one run cannot reveal), so the case is not flagged with
    5 rounds or with 200. With 5% noise and the --quick minimum of 7 rounds it is."""
    rng = random.Random(5)
    for rounds in (5, 200):
        flagged = sum(len(R.compare(run(rng, rounds=rounds, noise=0.3, slow={"ops/case0"}),
                                    run(rng, rounds=rounds, noise=0.3), 0.05).regressions) for _ in range(20))
        assert flagged <= 1, (rounds, flagged)
    hits = sum("ops/case0" in {v.case_id for v in R.compare(run(rng, rounds=7, slow={"ops/case0"}),
                                                            run(rng, rounds=7), 0.05).regressions}
               for _ in range(20))
    assert hits >= 18, hits


def test_records_without_per_round_ratios_compare_median_times():
    """Older records (no samples, no per_round) are still compared, on loracuda's median and spread."""
    def case(median, p20, p80):
        return {"id": "c", "results": {"loracuda": {"median_ms": median, "p20_ms": p20, "p80_ms": p80,
                                                    "repeats": 50}}}

    def slower(base, now):
        return bool(R.compare(record([now]), record([base]), 0.05).regressions)

    base = case(10.0, 9.8, 10.2)
    assert not slower(base, case(10.4, 10.2, 10.6))  # +4%: within the threshold
    assert slower(base, case(11.5, 11.3, 11.7))  # +15%, spreads of 4%
    assert not slower(case(10.0, 7.0, 13.0), case(11.5, 8.5, 14.5))  # +15%, spreads of 60%: noise
    gone = {"id": "c", "results": {"loracuda": {"error": "RuntimeError: boom"}}}
    assert slower(base, gone)


def test_the_verdict_names_the_case_and_both_measures():
    rng = random.Random(6)
    comparison = R.compare(run(rng, noise=0.01, slow={"ops/case5"}, fraction=0.5), run(rng, noise=0.01), 0.05)
    (verdict,) = comparison.regressions
    text = verdict.describe()
    assert text.startswith("ops/case5: ") and " ms (" in text and " x addmm (" in text and "rose" in text


def bench(*args, env_extra=None):
    env = dict(os.environ, LORACUDA_BENCH_TINY="1", **(env_extra or {}))
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "loracuda.cli.main", "bench", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_the_slowdown_hook_is_flagged_and_named_by_a_real_compare(tmp_path):
    """A real (tiny) run of the two merge_ cases as the baseline, then a run whose float32 merge_ is made
    three times as slow by the test hook (large enough to stand out of tiny shapes' noise on a busy
    machine; the 15% case is the synthetic test above): exit 1, that case named, the other not."""
    base = tmp_path / "base.json"
    proc = bench("--suite", "ops", "--case", "merge_", "--rounds", "60", "--json", str(base))
    assert proc.returncode == 0, proc.stderr
    proc = bench("--suite", "ops", "--case", "merge_", "--rounds", "60", "--compare", str(base),
                 env_extra={"LORACUDA_BENCH_INJECT_SLOWDOWN": "merge_ N=96 K=96 r=4 float32:2.0"})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "SLOWER ops/merge_ N=96 K=96 r=4 float32" in proc.stdout
    assert "SLOWER ops/merge_ N=96 K=96 r=4 bfloat16" not in proc.stdout
    assert "rule: a case is slower when" in proc.stdout
    assert "merge_ N=96 K=96 r=4 float32" in proc.stderr.strip().splitlines()[-1]


def test_a_malformed_hook_is_a_one_line_error():
    proc = bench("--suite", "ops", env_extra={"LORACUDA_BENCH_INJECT_SLOWDOWN": "merge_"})
    assert proc.returncode == 2
    assert "LORACUDA_BENCH_INJECT_SLOWDOWN" in proc.stderr and "Traceback" not in proc.stderr
