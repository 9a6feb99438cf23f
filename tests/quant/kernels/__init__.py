import jax
import pytest

# Interpret-mode kernels checked against XLA / float64 with CPU XLA's numerics. On a GPU, XLA may keep
# float32 where a step is written in bf16 (excess precision), so the rounded-step references no longer
# hold there; test_gpu_kernels.py checks the compiled kernels on GPUs instead.
CPU_NUMERICS = pytest.mark.skipif(jax.default_backend() == "gpu",
                                  reason="interpret mode against CPU XLA numerics (GPU: test_gpu_kernels.py)")
