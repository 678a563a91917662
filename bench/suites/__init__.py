"""The suites of `loracuda bench`, one module each (registered with bench.harness.cases.register_suite)."""
