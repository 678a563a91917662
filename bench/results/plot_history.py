"""Plots the ratio series of bench/results/history.jsonl by commit: loracuda's layer forward+backward
over a frozen nn.Linear's (dropout 0 and 0.1) and its training step's tokens/s over PEFT's.

    python bench/results/plot_history.py OUT.png

Each figure of a record's loracuda column is read as written ("1.038× / 1.069×" is dropout 0 / 0.1;
"1.050–1.091×" is a range, drawn as a bar; several runs separated by commas are drawn as several
points). Records that are not one of these series are left out.
"""

import json
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
SERIES = {
    "layer fwd+bwd ÷ nn.Linear": lambda case: case.startswith(("layer fwd+bwd", "the same, three of those",
                                                                "the same with glibc")),
    "training step, tokens/s ÷ PEFT's": lambda case: case.startswith("training step"),
}
NUMBER = r"(\d+\.\d+)(?:–(\d+\.\d+))?×"


def load(path: str) -> list:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def points(figure: str) -> list:
    """[(dropout index, low, high)] from a loracuda figure. ' / ' separates dropout 0 from 0.1 and ';'
    separates groups of runs; within a group either each side lists its runs ("a, b / c, d") or the
    runs are listed as pairs ("a / b, c / d"). Parenthesised notes (times, medians of ranges) are
    left out."""
    out = []
    for group in re.sub(r"\([^)]*\)", "", figure).split(";"):
        sides = group.split(" / ")
        runs = [group] if len(sides) <= 2 else group.split(", ")
        for run in runs:
            for index, part in enumerate(run.split(" / ")[:2]):
                for match in re.finditer(NUMBER, part):
                    low = float(match.group(1))
                    out.append((index, low, float(match.group(2) or low)))
    return out


def main(argv: list) -> int:
    if len(argv) != 1:
        sys.stderr.write("usage: python bench/results/plot_history.py OUT.png\n")
        return 2
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = load(os.path.join(HERE, "history.jsonl"))
    fig, axes = plt.subplots(1, len(SERIES), figsize=(6 * len(SERIES), 4))
    for ax, (title, selects) in zip(axes, SERIES.items()):
        labels = []
        for record in records:
            if not selects(record["case"]) or record["threads"] != 2:
                continue
            x = len(labels)
            labels.append(f"row {record['row']}\n{record['commit'][:7]}")
            for index, low, high in points(record["figures"]["loracuda"]):
                color = ("C0", "C1")[index]
                ax.plot([x, x], [low, high], color=color, linewidth=3) if high > low else None
                ax.plot(x, (low + high) / 2, "o", color=color, markersize=4)
        ax.set_xticks(range(len(labels)), labels, fontsize=6, rotation=90)
        ax.set_title(title, fontsize=9)
        ax.axhline(1.0, color="k", linewidth=0.5)
        ax.plot([], [], "o", color="C0", label="dropout 0")
        ax.plot([], [], "o", color="C1", label="dropout 0.1")
        ax.legend(fontsize=7)
    fig.suptitle("loracuda on a 2-core CPU, by record (bench/results/history.jsonl)", fontsize=10)
    fig.tight_layout()
    fig.savefig(argv[0], dpi=110)
    plt.close(fig)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
