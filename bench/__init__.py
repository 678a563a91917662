"""loracuda's benchmarks: the harness (bench/harness), the suites (bench/suites) and a few studies
(bench/*.py scripts). It lives in the source repository, not in the installed package: `loracuda bench`
runs it from a source checkout (or `python -m bench` from the repository root). Results recorded from
runs are data in bench/results/."""
