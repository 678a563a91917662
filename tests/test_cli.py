"""The `loracuda bench` command, CPU only: help, one-line errors on bad input, a tiny run that writes
JSON, and --compare against itself (passes) and against a baseline doctored to be 2x faster (fails,
naming the cases). Tiny shapes (LORACUDA_BENCH_TINY=1) keep each run to seconds."""

import json
import os
import statistics
import subprocess
import sys

import pytest
import torch

import loracuda

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bench(*args: str, tiny: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    if tiny:
        env["LORACUDA_BENCH_TINY"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "loracuda.cli.main", "bench", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )


def assert_one_line_error(proc: subprocess.CompletedProcess, *words: str) -> None:
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "error" in lines[0]
    for word in words:
        assert word in lines[0], lines[0]


def test_help_explains_every_option():
    proc = bench("--help")
    assert proc.returncode == 0
    for option in ("--suite", "--device", "--dtype", "--quick", "--json", "--compare", "--threshold", "--plot"):
        assert option in proc.stdout
    for word in ("ops", "layer", "train", "serving", "cuda", "bfloat16", "matplotlib"):
        assert word in proc.stdout


def test_unknown_suite_is_a_one_line_error():
    assert_one_line_error(bench("--suite", "nope"), "nope", "ops", "layer")


def test_unknown_device_is_a_one_line_error():
    assert_one_line_error(bench("--device", "tpu"), "tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible here, so cuda is a device that is there")
def test_absent_cuda_is_a_one_line_error():
    assert_one_line_error(bench("--device", "cuda"), "cuda")


def test_unknown_option_is_a_one_line_error():
    assert_one_line_error(bench("--frobnicate"), "--frobnicate")


def test_missing_baseline_is_a_one_line_error(tmp_path):
    assert_one_line_error(bench("--compare", str(tmp_path / "absent.json")), "absent.json")


@pytest.mark.parametrize("text", ["not json at all", '{"cases": 3}', '{"cases": [{"no_id": 1}]}'])
def test_malformed_baseline_is_a_one_line_error(tmp_path, text):
    path = tmp_path / "bad.json"
    path.write_text(text)
    assert_one_line_error(bench("--compare", str(path)), "bad.json")


def test_plot_without_matplotlib_is_a_one_line_error():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert_one_line_error(bench("--plot", "out.png"), "matplotlib")
    else:
        pytest.skip("matplotlib is installed (the plot itself is tested by test_plot_of_a_saved_run)")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One tiny quick run of every suite, its JSON and its stdout."""
    path = tmp_path_factory.mktemp("bench") / "run.json"
    proc = bench("--quick", "--json", str(path))
    assert proc.returncode == 0, proc.stderr
    return json.loads(path.read_text()), proc


def test_quick_run_writes_a_complete_record(tiny_run):
    record, proc = tiny_run
    assert record["torch"] == torch.__version__
    assert record["build_info"]["version"] == loracuda.__version__
    assert record["device"]["type"] == "cpu" and record["device"]["cpu_model"]
    assert record["ceilings"]["copy_bytes_per_s"] > 0 and record["ceilings"]["gemm_flop_per_s"]["float32"] > 0
    suites = {c["suite"] for c in record["cases"]}
    assert suites == {"ops", "layer", "train", "serving", "multi_lora"}
    ops = {c["op"] for c in record["cases"] if c["suite"] == "ops"}
    assert ops == {"shrink", "expand_add_", "backward", "merge_"}
    modes = {c["op"] for c in record["cases"] if c["suite"] == "layer"}
    assert modes == {"forward", "backward", "fwd+bwd"}
    for case in record["cases"]:
        assert case["bytes"] > 0 and case["flops"] > 0
        # The train suite compares whole models (loracuda, PEFT, reference); the addmm recipe is a layer.
        # The serving suite compares a model's forward with the base model's (and PEFT's mixed batch).
        if case["suite"] == "serving":
            expected = {"loracuda", "base"}
        elif case["suite"] == "multi_lora":
            expected = {"loracuda", "single", "loop", "reference"}
        else:
            expected = {"loracuda", "reference"} | (set() if case["suite"] == "train" else {"addmm"})
        assert expected <= set(case["results"])
        for name, entry in case["results"].items():
            if "error" in entry:
                continue
            assert 0 < entry["p20_ms"] <= entry["median_ms"] <= entry["p80_ms"]
            assert entry["GBps"] > 0 and entry["TFLOPs"] > 0
        if case["suite"] in ("layer", "serving"):
            assert "base" in case["results"]
    # The table on stdout names every case.
    for case in record["cases"]:
        assert case["id"] in proc.stdout
    assert "\n[" not in proc.stdout  # the progress bar goes to stderr
    assert "[" in proc.stderr


def test_figures_are_computed_from_the_samples(tiny_run):
    """Every derived figure follows from the recorded samples: the median and percentiles, the ratios to
    loracuda and to the baseline, GB/s, and the per-round ratio to the anchor (recomputed here)."""
    from bench.harness.timer import percentile

    record, _ = tiny_run
    for case in record["cases"]:
        results = case["results"]
        ours = results["loracuda"]
        assert "median_ms" in ours, (case["id"], ours)
        for name, entry in results.items():
            if "median_ms" not in entry:
                continue
            samples = entry["samples_ms"]
            assert len(samples) == entry["repeats"] >= 3
            assert entry["median_ms"] == pytest.approx(statistics.median(samples), rel=1e-5)
            assert entry["p20_ms"] == pytest.approx(percentile(samples, 0.2), rel=1e-5)
            assert entry["x_loracuda"] == pytest.approx(entry["median_ms"] / ours["median_ms"])
            if case.get("baseline") in results:
                assert entry["x_base"] == pytest.approx(entry["median_ms"] / results[case["baseline"]]["median_ms"])
            nbytes = entry["GBps"] * 1e9 * entry["median_ms"] / 1e3
            assert nbytes == pytest.approx(case["bytes"]) or name == "base"
        per_round = case["per_round"]
        anchor = results[per_round["anchor"]]["samples_ms"]
        ratios = [a / b for a, b in zip(ours["samples_ms"], anchor)]
        assert per_round["median"] == pytest.approx(statistics.median(ratios), rel=1e-5)
        assert per_round["anchor"] == (case.get("baseline") or "addmm")


def test_compare_against_itself_passes(tiny_run, tmp_path):
    record, _ = tiny_run
    path = tmp_path / "run.json"
    path.write_text(json.dumps(record))
    proc = bench("--load", str(path), "--compare", str(path), "--threshold", "0.05")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"{len(record['cases'])} case(s) compared, 0 slower" in proc.stdout


def _doctored(record: dict, factor: float) -> dict:
    """The record as if loracuda had been ``factor`` times as fast (its times and its per-round ratios)."""
    faster = json.loads(json.dumps(record))
    for case in faster["cases"]:
        entry = case["results"]["loracuda"]
        for key in ("median_ms", "p20_ms", "p80_ms"):
            if key in entry:
                entry[key] *= factor
        entry["samples_ms"] = [t * factor for t in entry.get("samples_ms", [])]
        for key in ("median", "p20", "p80"):
            if key in case.get("per_round", {}):
                case["per_round"][key] *= factor
    return faster


def _steady(record: dict) -> dict:
    """The record with loracuda's samples all equal to its median (no noise): the comparison's plumbing
    is checked here, its statistics in tests/test_bench_compare.py."""
    steady = json.loads(json.dumps(record))
    for case in steady["cases"]:
        entry = case["results"]["loracuda"]
        entry["p20_ms"] = entry["p80_ms"] = entry["median_ms"]
        entry["samples_ms"] = [entry["median_ms"]] * len(entry["samples_ms"])
        if "per_round" in case:
            case["per_round"]["p20"] = case["per_round"]["p80"] = case["per_round"]["median"]
    return steady


def test_compare_against_a_faster_baseline_fails_naming_cases(tiny_run, tmp_path):
    record = _steady(tiny_run[0])
    run_path, base_path = tmp_path / "run.json", tmp_path / "base.json"
    run_path.write_text(json.dumps(record))
    base_path.write_text(json.dumps(_doctored(record, 0.5)))
    proc = bench("--load", str(run_path), "--compare", str(base_path))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    for case in record["cases"]:
        assert f"SLOWER {case['id']}" in proc.stdout
    assert "slower than" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert "rule: a case is slower when" in proc.stdout


def test_a_fresh_run_against_a_faster_baseline_fails(tiny_run, tmp_path):
    # A new measurement, not a copy: the baseline is made 10x faster so run-to-run noise of tiny
    # shapes cannot bring the new times within the threshold and the noise.
    record, _ = tiny_run
    base_path = tmp_path / "base.json"
    base_path.write_text(json.dumps(_doctored(_steady(record), 0.1)))
    proc = bench("--quick", "--suite", "ops", "--case", "merge_", "--rounds", "30", "--compare", str(base_path))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "SLOWER ops/merge_" in proc.stdout


def test_a_looser_threshold_accepts_the_same_slow_down(tiny_run, tmp_path):
    record, _ = tiny_run
    run_path, base_path = tmp_path / "run.json", tmp_path / "base.json"
    run_path.write_text(json.dumps(record))
    base_path.write_text(json.dumps(_doctored(record, 0.5)))
    proc = bench("--load", str(run_path), "--compare", str(base_path), "--threshold", "1.5")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_plot_of_a_saved_run(tiny_run, tmp_path):
    pytest.importorskip("matplotlib", reason="--plot needs matplotlib (installed by make deps)")
    record, _ = tiny_run
    run = tmp_path / "run.json"
    run.write_text(json.dumps(record))
    png = tmp_path / "plot.png"
    proc = bench("--load", str(run), "--plot", str(png))
    assert proc.returncode == 0, proc.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
