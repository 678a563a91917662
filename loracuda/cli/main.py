"""The `loracuda` command: `loracuda <subcommand> ...` (also `python -m loracuda.cli.main`).

Subcommands are listed in ``_SUBCOMMANDS`` as (name, module); each module provides
``add_parser(subparsers)``, which sets ``run(args) -> int`` as the parser's default; heavy imports
(the suites, peft) wait until a subcommand runs. Errors the user can fix (bad arguments, missing
files, a device that is not there) are one line on stderr and exit code 2, never a traceback.
"""

import argparse
import importlib
import sys
from typing import Optional, Sequence

_SUBCOMMANDS: tuple[tuple[str, str], ...] = (("demo", "loracuda.cli.demo"), ("bench", "loracuda.cli.bench"))


class UsageError(Exception):
    """An error in what the user asked for: reported as one line, exit code 2."""


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (no usage dump) and exit code 2."""

    def error(self, message: str):  # noqa: D401 - argparse's hook
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="loracuda", description="loracuda: LoRA kernels for PyTorch; command-line tools.")
    sub = parser.add_subparsers(dest="command", metavar="<command>", parser_class=Parser)
    for _, module in _SUBCOMMANDS:
        importlib.import_module(module).add_parser(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args.run(args) or 0)
    except UsageError as error:
        sys.stderr.write(f"loracuda {args.command}: error: {error}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write(f"loracuda {args.command}: interrupted\n")
        return 130


if __name__ == "__main__":
    # Run the main of the imported module, not of __main__, so that UsageError raised by the
    # subcommands (which import loracuda.cli.main) is the class caught here.
    from loracuda.cli.main import main as _main

    sys.exit(_main())
