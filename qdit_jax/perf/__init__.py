"""Performance tooling: where a compiled program spends its device time (``perf.trace``)."""
