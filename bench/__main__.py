"""`python -m bench ...` from the repository root: the same as `loracuda bench ...`."""

import sys

from loracuda.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
