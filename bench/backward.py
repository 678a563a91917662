"""Benchmark of the LoRA backward (grad_a, grad_b, grad_x += its LoRA term); full-size shapes,
every provider side by side.

    python bench/backward.py [--device cuda] [--dtype bfloat16] [--json out.json] [--compare base.json] ...

Runs the 'ops/backward ' cases of `loracuda bench --suite ops`; any option of that command may follow.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from loracuda.cli.main import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["bench", "--suite", "ops", "--case", "ops/backward ", *sys.argv[1:]]))
