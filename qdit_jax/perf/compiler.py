"""XLA compiler options that the heavy programs (sampling, the benchmark's forward) compile with.

On GPUs XLA first wraps every dot, with its bias add, in a Triton GEMM fusion and only later
(after autotuning) may turn it back into a cuBLAS call; by then its cuBLAS rewriter can no longer
move the following tanh GELU into the cuBLASLt epilogue. With Triton GEMM fusions off the dot
reaches that rewriter bare: on an H100 the DiT-XL/2 MLP at batch 256 went from 2,463 to 2,070 us
and the whole bf16 forward from 2,004 to 2,158 images/s, compiles 2-7x faster (docs/RESULTS.md).
Pallas kernels are custom calls and are not affected. ``QDIT_XLA_DEFAULTS=0`` turns this off.
"""
from __future__ import annotations

import os
from typing import Any

import jax

GPU_OPTIONS: dict[str, Any] = {"xla_gpu_enable_triton_gemm": False}


def compiler_options(backend: str | None = None) -> dict[str, Any] | None:
    """Options for ``jax.jit(..., compiler_options=...)`` on ``backend`` (default: JAX's), or None."""
    if os.environ.get("QDIT_XLA_DEFAULTS", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    backend = backend or jax.default_backend()
    return dict(GPU_OPTIONS) if backend in ("gpu", "cuda", "rocm") else None


def jit(fn: Any, options: dict[str, Any] | None = None, **kwargs: Any) -> Any:
    """``jax.jit`` compiled with ``options``, or with this backend's :func:`compiler_options` when
    None (an empty dict: XLA's own defaults)."""
    opts = compiler_options() if options is None else options
    return jax.jit(fn, compiler_options=opts or None, **kwargs)
