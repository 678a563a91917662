"""Human-facing output of a run: the progress bar (stderr), the table (stdout), the optional plot."""

import importlib.util
import sys
import time
from typing import Callable, Optional, TextIO


def _fmt(value: Optional[float], digits: int = 3) -> str:
    if value is None:
        return "-"
    if value == 0:
        return "0"
    if abs(value) >= 1000:
        return f"{value:.0f}"
    return f"{value:.{digits}g}"


def _bytes(value: Optional[float]) -> str:
    if value is None:
        return "-"
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if value >= size:
            return f"{value / size:.1f} {unit}"
    return f"{value:.0f} B"


class ProgressBar:
    """``[#####-----] 12/40  ops/shrink M=1 ... [peft]`` on stderr: redrawn in place on a terminal,
    one line per case otherwise (logs, pipes)."""

    WIDTH = 24

    def __init__(self, total: int, stream: TextIO = sys.stderr):
        self.total = max(total, 1)
        self.stream = stream
        self.tty = stream.isatty()
        self.started = time.perf_counter()
        self._last_step = -1

    def __call__(self, step: int, label: str) -> None:
        done = int(self.WIDTH * step / self.total)
        bar = "#" * done + "-" * (self.WIDTH - done)
        elapsed = time.perf_counter() - self.started
        line = f"[{bar}] {step}/{self.total} {elapsed:5.0f}s  {label}"
        if self.tty:
            self.stream.write("\r\033[K" + line[:160])
            if step >= self.total:
                self.stream.write("\n")
        elif step != self._last_step or step >= self.total:
            self.stream.write(line + "\n")
        self._last_step = step
        self.stream.flush()


def progress_factory(stream: TextIO = sys.stderr) -> Callable[[int], Callable[[int, str], None]]:
    return lambda total: ProgressBar(total, stream)


COLUMNS = (
    ("provider", 10),
    ("median ms", 10),
    ("p20-p80 ms", 17),
    ("GB/s", 8),
    ("%copy", 6),
    ("TFLOP/s", 8),
    ("%gemm", 6),
    ("x loracuda", 10),
    ("x base", 7),
    ("peak extra", 11),
)


def _row(cells: list[str]) -> str:
    return "  ".join(cell.rjust(width) if i else cell.ljust(width) for i, (cell, (_, width)) in
                     enumerate(zip(cells, COLUMNS)))


def format_table(record: dict) -> str:
    """The whole run as text: a header with the machine and ceilings, then one block per case."""
    dev = record["device"]
    ceil = record["ceilings"]
    lines = [
        f"loracuda bench  device: {dev.get('name')} ({dev.get('type')}, {dev.get('threads')} threads"
        + (f", load {dev['load_average_1min']:.1f}" if dev.get("load_average_1min") is not None else "")
        + ")  "
        f"torch {record['torch']}  commit {str(record.get('commit'))[:12]}{' (dirty)' if record.get('dirty') else ''}",
        "ceilings: copy "
        + (f"{ceil['copy_bytes_per_s'] / 1e9:.1f} GB/s" if ceil.get("copy_bytes_per_s") else "-")
        + "  GEMM "
        + ", ".join(f"{k} {v / 1e12:.2f} TFLOP/s" for k, v in ceil.get("gemm_flop_per_s", {}).items()),
        "x loracuda / x base: provider time over loracuda's / the frozen base layer's (> 1: slower)",
    ]
    header = _row([name for name, _ in COLUMNS])
    for case in record["cases"]:
        lines.append("")
        title = f"{case['id']}   {_bytes(case['bytes'])} moved, {case['flops'] / 1e9:.3g} GFLOP"
        if case.get("target") is not None:
            title += f"   target: loracuda <= {case['target']:.2f}x base"
        lines.append(title)
        for note in case.get("notes", []):
            lines.append(f"  note: {note}")
        if case.get("error"):
            lines.append(f"  case failed: {case['error']}")
            continue
        lines.append("  " + header)
        for name, entry in case["results"].items():
            if "error" in entry:
                lines.append(f"  {name.ljust(COLUMNS[0][1])}  error: {entry['error']}")
                continue
            cells = [
                name,
                _fmt(entry["median_ms"], 4),
                f"{_fmt(entry['p20_ms'])}-{_fmt(entry['p80_ms'])}",
                _fmt(entry["GBps"]),
                _fmt(entry["pct_copy_bw"]),
                _fmt(entry["TFLOPs"]),
                _fmt(entry["pct_gemm"]),
                _fmt(entry.get("x_loracuda")),
                _fmt(entry.get("x_base")),
                _bytes(entry["peak_extra_bytes"]) if entry.get("peak_extra_bytes") is not None else "-",
            ]
            lines.append("  " + _row(cells))
        ratio = case["results"].get("loracuda", {}).get("x_base")
        if case.get("target") is not None and ratio is not None:
            verdict = "met" if ratio <= case["target"] else "missed"
            others = ", ".join(
                f"{name} {entry['x_base']:.3f}x" for name, entry in case["results"].items()
                if name not in ("loracuda", "base") and entry.get("x_base") is not None
            )
            lines.append(f"  loracuda {ratio:.3f}x base: target <= {case['target']:.2f}x {verdict} ({others})")
        if case.get("memory_method"):
            lines.append(f"  peak extra: {case['memory_method']}")
    return "\n".join(lines) + "\n"


def plot_available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def write_plot(record: dict, path: str) -> None:
    """One horizontal bar per case and provider: median time (log scale), grouped by case."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = [c for c in record["cases"] if c.get("results")]
    providers: list[str] = []
    for case in cases:
        for name in case["results"]:
            if name not in providers:
                providers.append(name)
    height = 0.8 / max(len(providers), 1)
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(cases) * max(len(providers), 1) * 0.5 + 1.5))
    for j, name in enumerate(providers):
        ys, xs = [], []
        for i, case in enumerate(cases):
            entry = case["results"].get(name, {})
            if "median_ms" in entry:
                ys.append(i + j * height)
                xs.append(entry["median_ms"])
        ax.barh(ys, xs, height=height, label=name)
    ax.set_yticks([i + 0.4 - height / 2 for i in range(len(cases))])
    ax.set_yticklabels([c["id"] for c in cases], fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("median time (ms, log scale)")
    ax.set_title(f"loracuda bench on {record['device'].get('name')}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
