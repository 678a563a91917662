"""The benchmark harness behind `loracuda bench`: loracuda beside other providers (PEFT, plain PyTorch,
the addmm_ recipe), one case definition for every measurement.

cases.py      Case (what is measured, its bytes and FLOPs, its providers) and the suite registry
timer.py      median and 20th / 80th percentile timing after warm-up, providers timed in rounds
ceilings.py   the machine's measured copy bandwidth and GEMM rate, the yardsticks of every figure
providers.py  each provider's way of computing an op or a layer, prepared on given tensors
runner.py     runs cases, turns timings into GB/s, TFLOP/s and ratios (also per round)
results.py    the JSON record of a run and the noise-aware comparison against a baseline
report.py     the table on stdout, the progress bar on stderr, the optional plot
memory.py     peak extra memory of one call

The suites themselves are in bench/suites/. Benchmarks measure and report; they assert nothing about
speed (the tests of the harness are in tests/test_cli.py and tests/test_bench_compare.py).
"""
