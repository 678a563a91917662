"""Benchmarks of loracuda's ops and layer beside other providers (PEFT, plain PyTorch, the addmm_ recipe).

timer.py      median and 20th / 80th percentile timing after warm-up (CUDA events on CUDA)
ceilings.py   the machine's measured copy bandwidth and GEMM rate, the yardsticks of every figure
providers.py  each provider's way of computing an op or a layer, prepared on given tensors
suites.py     the suites (a registry: ops, layer; later train, serve) and their cases
runner.py     runs cases, turns timings into GB/s, TFLOP/s and ratios
results.py    the JSON record of a run and the comparison against a baseline
report.py     the table on stdout, the progress bar on stderr, the optional plot

Benchmarks measure and report; they are not tests and assert nothing about speed.
"""
