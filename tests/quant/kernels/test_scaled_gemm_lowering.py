"""The Mosaic GPU scaled GEMM lowers (Pallas -> Mosaic GPU, layouts inferred) for every configuration
the real path uses, checked on a CPU machine by lowering for CUDA: what can break in the kernel's
construction without a GPU to run it (running and numerics: test_gpu_kernels.py)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from qdit_jax.quant.kernels import scaled_gemm as sg
from qdit_jax.quant.quantizers import QuantSpec

F8 = jnp.float8_e4m3fn
M, C = 512, 256


class _H100:
    core_count = 132


def _lower(dtype, k: int, n: int, groups: int, **kw) -> str:
    def sds(shape, dt=jnp.float32):
        return jax.ShapeDtypeStruct(shape, dt)

    args = (sds((M, k), dtype), sds((n, k), dtype), sds((M,) if groups == 1 else (groups, M)),
            sds((n,) if groups == 1 else (groups, n)), sds((n,)))
    extra = {}
    if kw.pop("residual", False):
        extra = dict(residual=sds((M, n), jnp.bfloat16), gate=sds((M // 256, n), jnp.bfloat16))
    fn = jax.jit(lambda a, w, sa, sw, b, **e: sg.scaled_gemm_mosaic(a, w, sa, sw, b, **kw, **e))
    return fn.trace(*args, **extra).lower(lowering_platforms=("cuda",)).as_text()


CASES = {
    "fp8 per channel": (F8, C, C, 1, {}),
    "int8 per channel + residual": (jnp.int8, 4 * C, C, 1, dict(residual=True)),
    "fp8 group-128 (split) + residual": (F8, C, C, 2, dict(residual=True)),
    "int8 group-128 overlap": (jnp.int8, 4 * C, C, 8, {}),
    "fp8 group-128 overlap + residual": (F8, C, C, 2, dict(group_mode="overlap", residual=True)),
    "int8 group-128 split + residual": (jnp.int8, 4 * C, C, 8, dict(group_mode="split", residual=True)),
    "fp8 group-128 plain": (F8, 4 * C, C, 8, dict(group_mode="plain")),
    "fp8 group-128 plain, gelu_codes": (F8, C, 4 * C, 2, dict(group_mode="plain", gelu_codes=QuantSpec(
        bits=8, format="fp8_e4m3", group_size=128, symmetric=True))),
    "fp8 group-128 gelu_codes": (F8, C, 4 * C, 2, dict(gelu_codes=QuantSpec(bits=8, format="fp8_e4m3", group_size=128,
                                                                              symmetric=True))),
    "int8 group-128 gelu_codes": (jnp.int8, C, 4 * C, 2, dict(gelu_codes=QuantSpec(bits=8, group_size=128,
                                                                                     symmetric=True))),
}


@pytest.mark.parametrize("case", list(CASES))
def test_kernel_lowers_for_cuda(case, monkeypatch):
    monkeypatch.setattr(jax, "devices", lambda *a: [_H100()])
    dtype, k, n, groups, kw = CASES[case]
    text = _lower(dtype, k, n, groups, **kw)
    assert "mosaic_gpu" in text  # the kernel's custom call, with its serialized module
