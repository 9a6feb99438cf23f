"""Performance tooling: where a compiled program spends its device time (``perf.trace``), timing
(``perf.timing``), compiler options (``perf.compiler``) and the device capability the kernels' guards
read (``perf.device``; imports only JAX, so ``models/`` and ``quant/`` may use it)."""
