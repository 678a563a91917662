"""`loracuda bench`: run benchmark suites, print the table, write JSON, compare against a baseline.

The harness and its suites are the `bench` package of the source repository (bench/harness,
bench/suites), not part of the installed library: this command finds it beside the package in a
source checkout (an editable install) or on sys.path, and otherwise says where to get it.

Exit codes: 0 done (and no regression), 1 a regression against --compare, 2 bad input.
"""

import argparse
import importlib
import math
import os
import sys

from .main import UsageError

DTYPES = ("float32", "bfloat16", "float16")
DEVICES = ("cpu", "cuda")
# Tiny shapes for the command's own tests (seconds instead of minutes): LORACUDA_BENCH_TINY=1.
TINY_ENV = "LORACUDA_BENCH_TINY"

DESCRIPTION = """\
Times loracuda's ops and LoRA layer beside PEFT's LoRA layer (when installed), the plain-PyTorch
reference and the addmm_ recipe of fast training libraries. Each case reports the median time with
its 20th-80th percentile range after warm-up, the achieved GB/s and TFLOP/s (from the bytes and
FLOPs its formulas need) as a share of this machine's measured copy bandwidth and GEMM rate, and
each provider's time relative to loracuda's (and, for the layer, to a frozen nn.Linear's).
"""

EPILOG = """\
examples:
  loracuda bench --quick                          both suites, CPU, short run
  loracuda bench --suite layer --json base.json   the layer suite, saved as a baseline
  loracuda bench --suite layer --compare base.json --threshold 0.05
  loracuda bench --load run.json --compare base.json   compare two saved runs, no measuring

exit status: 0 done, 1 a case regressed against --compare, 2 bad input.
"""


def _repository_root() -> str:
    """The folder above the loracuda package: the repository root in a source checkout."""
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def harness(module: str):
    """Imports ``bench.<module>`` (e.g. "harness.runner") from the source repository's bench/ package;
    UsageError with what to do when this installation does not include it (a wheel)."""
    root = _repository_root()
    if os.path.isfile(os.path.join(root, "bench", "harness", "__init__.py")) and root not in sys.path:
        sys.path.insert(0, root)
    try:
        return importlib.import_module(f"bench.{module}")
    except ModuleNotFoundError as error:
        if error.name not in ("bench", "bench.harness", f"bench.{module}"):
            raise
        raise UsageError(
            "the benchmark harness is not installed: it lives in the bench/ folder of loracuda's source "
            "repository, which a wheel does not include; clone the repository, build it in place "
            "(make build) and run `loracuda bench` (or `python -m bench`) there"
        ) from None


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "bench",
        help="benchmark loracuda's ops and layer against other providers",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--suite",
        default="all",
        metavar="NAME",
        help="which suite to run: ops (shrink, expand_add_, merge_, backward one by one), layer "
        "(lora_linear forward, backward, forward+backward), train (a LoRA training step of a Llama-style "
        "model), serving (a forward of a batch mixing adapters: AdapterPool, PEFT, base model), multi_lora "
        "(multi_shrink + multi_expand_add_ over a mixed batch) or all (default: all)",
    )
    p.add_argument(
        "--device",
        default="cpu",
        metavar="DEVICE",
        help="where to run: cpu or cuda (default: cpu); cuda needs a visible GPU",
    )
    p.add_argument(
        "--dtype",
        default=None,
        metavar="DTYPE",
        help="activation and weight dtype: float32, bfloat16 or float16 (default: float32 on cpu, "
        "bfloat16 on cuda); merge_ cases always run in float32 and bfloat16 too",
    )
    p.add_argument(
        "--quick", action="store_true", help="fewer shapes and repeats (a smoke run of about 2 minutes on a small CPU)"
    )
    p.add_argument(
        "--rounds", type=int, metavar="N",
        help="timing rounds per case (each provider called once per round); default: as many as a time budget "
        "allows, between 7 and 15 with --quick, 7 and 50 otherwise",
    )
    p.add_argument(
        "--json", metavar="OUT.json", help="write every figure, with device, commit and versions, to this file"
    )
    p.add_argument(
        "--compare",
        metavar="BASE.json",
        help="compare loracuda's times with a saved run; exit 1 naming each case whose median (loracuda's time over "
        "an anchor provider's in the same rounds, where both runs have one) rose by more than --threshold and by "
        "more than both runs' combined p20-p80 spread",
    )
    p.add_argument(
        "--threshold",
        type=float,
        default=0.05,
        metavar="FRACTION",
        help="allowed slow-down for --compare, as a fraction of the baseline time (default: 0.05 = 5%%)",
    )
    p.add_argument("--plot", metavar="OUT.png", help="plot time against tokens (M) per provider, with the memory roofline from the measured copy "
                   "bandwidth, one panel per op (needs matplotlib)")
    p.add_argument(
        "--case",
        metavar="TEXT",
        help="run only the cases whose id contains TEXT (e.g. 'shrink', 'M=2048', 'p=0.1')",
    )
    p.add_argument(
        "--load",
        metavar="RUN.json",
        help="do not measure: read a saved run, print its table and compare it (with --compare)",
    )
    p.set_defaults(run=run)


def _check_args(args) -> None:
    """Everything that can be wrong with the request, checked before anything is measured."""
    plot_available = harness("harness.report").plot_available
    names = list(harness("harness.cases").suites())
    if args.suite != "all" and args.suite not in names:
        raise UsageError(f"unknown suite {args.suite!r}; choose one of: {', '.join(names + ['all'])}")
    if args.device not in DEVICES:
        raise UsageError(f"unknown device {args.device!r}; choose one of: {', '.join(DEVICES)}")
    if args.dtype is not None and args.dtype not in DTYPES:
        raise UsageError(f"unknown dtype {args.dtype!r}; choose one of: {', '.join(DTYPES)}")
    if args.rounds is not None and args.rounds < 1:
        raise UsageError(f"--rounds must be >= 1, got {args.rounds}")
    if not (math.isfinite(args.threshold) and args.threshold >= 0):
        raise UsageError(f"--threshold must be a fraction >= 0, got {args.threshold}")
    if args.plot and not plot_available():
        raise UsageError("--plot needs matplotlib, which is not installed")
    try:
        harness("harness.runner").injected_slowdown()
    except ValueError as error:
        raise UsageError(str(error)) from None
    if args.load is None and args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UsageError("device 'cuda' is not available here (torch.cuda.is_available() is False)")


def run(args) -> int:
    import torch

    _check_args(args)
    R = harness("harness.results")
    runner = harness("harness.runner")
    peft_available = harness("harness.providers").peft_available
    report = harness("harness.report")
    format_table, progress_factory, write_plot = report.format_table, report.progress_factory, report.write_plot
    suites = harness("harness.cases").suites

    try:
        base = R.load_record(args.compare) if args.compare else None
        loaded = R.load_record(args.load) if args.load else None
    except R.ResultsError as error:
        raise UsageError(str(error)) from None

    if loaded is not None:
        record = loaded
    else:
        device = torch.device(args.device)
        dtype_name = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
        options = runner.RunOptions(
            device=device,
            dtype=getattr(torch, dtype_name),
            quick=args.quick,
            tiny=os.environ.get(TINY_ENV, "") not in ("", "0"),
            case_filter=args.case,
            rounds=args.rounds,
        )
        if options.tiny:
            # Tiny shapes gain nothing from threads, and on a busy machine each parallel region
            # waits for a core: one thread keeps the command's own tests fast and steady.
            torch.set_num_threads(1)
        names = list(suites()) if args.suite == "all" else [args.suite]
        with_peft = peft_available()
        if not with_peft:
            sys.stderr.write("loracuda bench: peft is not installed; its provider is left out\n")
        cases, meter = runner.run(names, options, with_peft, progress_factory(sys.stderr))
        if not cases:
            raise UsageError(f"no case matches --case {args.case!r}")
        import loracuda

        record = R.make_record(cases, device, dtype_name, args.quick, meter.snapshot(), loracuda.build_info())
        record["tiny"] = options.tiny

    sys.stdout.write(format_table(record))
    if args.json:
        try:
            R.write_record(record, args.json)
        except OSError as error:
            raise UsageError(f"cannot write {args.json!r}: {error.strerror or error}") from None
        sys.stdout.write(f"\nwrote {args.json}\n")
    if args.plot:
        write_plot(record, args.plot)
        sys.stdout.write(f"wrote {args.plot}\n")
    if base is None:
        return 0
    comparison = R.compare(record, base, args.threshold)
    out = sys.stdout
    out.write(f"\ncompare with {args.compare} (threshold {100 * args.threshold:.1f}%): ")
    out.write(f"{comparison.compared} case(s) compared, {len(comparison.regressions)} slower\n")
    out.write(f"  rule: {R.RULE}\n")
    for warning in comparison.warnings:
        out.write(f"  note: {warning}\n")
    if comparison.only_in_base:
        out.write(f"  note: {len(comparison.only_in_base)} baseline case(s) not in this run\n")
    for verdict in comparison.verdicts:
        out.write(f"  {'SLOWER' if verdict.regressed else 'same  '} {verdict.describe()}\n")
    if comparison.regressions:
        sys.stderr.write(
            f"loracuda bench: {len(comparison.regressions)} case(s) slower than {args.compare} by more than "
            f"{100 * args.threshold:.1f}% and their noise: " + "; ".join(r.case_id for r in comparison.regressions) + "\n"
        )
        return 1
    return 0
