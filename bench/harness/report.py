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


def _token_series(record: dict) -> dict:
    """Cases that differ only in M (tokens), grouped: (suite/op, other dims, dtype) -> [case sorted by M]."""
    groups: dict = {}
    for case in record["cases"]:
        if not case.get("results") or "M" not in case.get("shape", {}):
            continue
        rest = " ".join(f"{k}={v}" for k, v in case["shape"].items() if k != "M")
        groups.setdefault(f"{case['suite']}/{case['op']} {rest} {case['dtype']}", []).append(case)
    return {key: sorted(cases, key=lambda c: c["shape"]["M"]) for key, cases in groups.items()}


def write_plot(record: dict, path: str) -> None:
    """Time against tokens (M), one panel per op (and shape), one line per provider, and the memory
    roofline: the bytes the case's formulas must move over the copy bandwidth measured in the run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _token_series(record)
    if not groups:
        raise ValueError("the run has no case measured at several token counts (M) to plot")
    copy_bw = record.get("ceilings", {}).get("copy_bytes_per_s")
    order: list[str] = []
    for cases in groups.values():
        for c in cases:
            order += [n for n in c["results"] if n not in order]
    colors = {name: f"C{i}" for i, name in enumerate(order)}  # one color per provider in every panel
    cols = min(3, len(groups))
    rows = (len(groups) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.8 * rows), squeeze=False)
    for ax, (title, cases) in zip(axes.flat, groups.items()):
        tokens = [c["shape"]["M"] for c in cases]
        providers = []
        for c in cases:
            providers += [n for n in c["results"] if n not in providers]
        for name in providers:
            pts = [(c["shape"]["M"], c["results"][name]["median_ms"]) for c in cases
                   if "median_ms" in c["results"].get(name, {})]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name, color=colors[name])
        if copy_bw:
            ax.plot(tokens, [c["bytes"] / copy_bw * 1e3 for c in cases], "k--", label="memory roofline")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("tokens (M)")
        ax.set_ylabel("median time (ms)")
        ax.set_title(title, fontsize=8)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(groups):]:
        ax.set_visible(False)
    fig.suptitle(f"loracuda bench on {record['device'].get('name')}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
