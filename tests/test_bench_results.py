"""bench/results/history.jsonl is well-formed data (every record names its case, command or the row whose
command it shares, machine, torch and commit), and the plot script draws it."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HISTORY = os.path.join(ROOT, "bench", "results", "history.jsonl")


def records() -> list:
    with open(HISTORY) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_every_record_names_what_it_measured_and_where():
    rows = records()
    assert [r["row"] for r in rows] == list(range(1, len(rows) + 1))
    for r in rows:
        assert r["case"] and r["machine"] and r["torch"] and r["commit"], r
        assert r["command"] or r["command_note"], r
        assert r["figures"]["loracuda"], r


def test_the_plot_script_draws_the_history(tmp_path):
    out = tmp_path / "history.png"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "results", "plot_history.py"), str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
