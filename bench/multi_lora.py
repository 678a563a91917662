"""The multi-LoRA serving ops (multi_shrink + multi_expand_add_) at full size: the `multi_lora` suite of
`loracuda bench` (cases and providers in bench/suites/multi_lora.py).

    python bench/multi_lora.py [--device cuda] [--dtype bfloat16] [--threads N] [--budget SECONDS] ...

--threads sets torch's CPU threads; --budget below 1 second runs the suite's --quick timing; any other
option of `loracuda bench` may follow (e.g. --json out.json, --compare base.json).
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from loracuda.cli.main import main  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--budget", type=float)
    known, rest = parser.parse_known_args()
    if known.threads:
        import torch

        torch.set_num_threads(known.threads)
    quick = ["--quick"] if known.budget is not None and known.budget < 1.0 else []
    sys.exit(main(["bench", "--suite", "multi_lora", *quick, *rest]))
