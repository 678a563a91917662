"""Benchmark of merge_ (W += s B A in place) beside PEFT's merge and W.addmm_, with peak extra
memory; full-size shapes, every provider side by side.

    python bench/merge.py [--device cuda] [--dtype bfloat16] [--json out.json] [--compare base.json] ...

Runs the 'ops/merge_ ' cases of `loracuda bench --suite ops`; any option of that command may follow.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from loracuda.cli.main import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["bench", "--suite", "ops", "--case", "ops/merge_ ", *sys.argv[1:]]))
