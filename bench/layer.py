"""Benchmark of the LoRA layer (forward, backward, forward+backward) beside a frozen nn.Linear;
full-size shapes, every provider side by side.

    python bench/layer.py [--device cuda] [--dtype bfloat16] [--json out.json] [--compare base.json] ...

Runs the 'layer/' cases of `loracuda bench --suite layer`; any option of that command may follow.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from loracuda.cli.main import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["bench", "--suite", "layer", "--case", "layer/", *sys.argv[1:]]))
