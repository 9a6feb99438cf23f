"""One-pass dynamic activation quantization on the GPU: a Pallas (Triton) kernel, its guard and the
XLA path it replaces.

Real W8A8 / W4A8 layers quantize every input row on the fly: per token (one scale per row) or per
(token, group of input channels). XLA compiles ``quantize_act`` into three fusions (abs-max
reduction, divide-round-clip, convert) and reads the activation twice from memory; the H100 profile
put it at 324 us for fc1's 151 MB input at batch 256, 4.6x its byte floor (docs/RESULTS.md). Here
one program instance owns ``block_m`` rows: it walks each group in ``chunk``-wide column tiles
twice (abs-max, then codes; the second walk hits the L2 cache, the rows of one instance being a
few hundred KB at most) and writes the int8 codes and the scales once.

Same math as the fake-quant mode: scale = absmax / qmax (1 where absmax is 0), codes =
clip(round_half_even(x / scale), -qmax - 1, qmax). Triton's float32 division may differ from
XLA's by an ulp, which can move a value that sits exactly on a rounding boundary: the GPU check
(``scripts/bench_quant.py --sections check``) reports the fraction of equal codes; in interpret mode
(CPU) the codes are bit-identical to the XLA path.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from qdit_jax.quant.kernels.group_gemm import _pow2, _round_even

CHUNK = 128  # column tile along K


def quant_applies(m: int, k: int, group: int, bits: int, dtype: Any, *, block_m: int = 32, chunk: int = CHUNK,
                  platform: str | None = None) -> tuple[bool, str]:
    """Whether the one-pass kernel can quantize an (M, K) activation in groups of ``group``
    (``group == K``: per token), and if not, why (the XLA path is used then)."""
    platform = platform or jax.default_backend()
    if platform != "gpu":
        return False, f"platform is {platform}, the kernel is GPU-only"
    if not (_pow2(block_m) and _pow2(chunk)):
        return False, f"block_m {block_m} and chunk {chunk} must be powers of two"
    if m % block_m:
        return False, f"M={m} is not a multiple of block_m {block_m}"
    if k % group or group % chunk:
        return False, f"group {group} does not divide K={k} or is not a multiple of the {chunk}-wide tile"
    if not 2 <= bits <= 8:
        return False, f"{bits}-bit activations: the kernel writes int8 codes of 2..8 bits"
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32)):
        return False, f"activations of dtype {jnp.dtype(dtype)}"
    return True, "ok"


def _kernel(x_ref, q_ref, s_ref, *, block_m: int, chunk: int, n_groups: int, chunks_per_group: int, qmax: float):
    from jax.experimental import pallas as pl

    rows = pl.ds(pl.program_id(0) * block_m, block_m)

    def cols(gi, c):
        return pl.ds(pl.multiple_of((gi * chunks_per_group + c) * chunk, chunk), chunk)

    def group_body(gi, carry):
        def amax_body(c, amax):
            x = x_ref[rows, cols(gi, c)].astype(jnp.float32)
            return jnp.maximum(amax, jnp.max(jnp.abs(x), axis=1))

        amax = lax.fori_loop(0, chunks_per_group, amax_body, jnp.zeros((block_m,), jnp.float32))
        s = amax / qmax
        s = jnp.where(s > 0, s, 1.0)

        def code_body(c, carry):
            x = x_ref[rows, cols(gi, c)].astype(jnp.float32)
            q = jnp.clip(_round_even(x / s[:, None]), -qmax - 1, qmax)
            q_ref[rows, cols(gi, c)] = q.astype(jnp.int8)
            return carry

        lax.fori_loop(0, chunks_per_group, code_body, 0)
        s_ref[gi, rows] = s
        return carry

    lax.fori_loop(0, n_groups, group_body, 0)


def quantize_rows_pallas(x: jax.Array, group: int, bits: int = 8, *, block_m: int = 32, chunk: int = CHUNK,
                         num_warps: int = 4, interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """Symmetric dynamic codes (M, K) int8 and scales (K // group, M) float32 of ``x`` (M, K)."""
    from jax.experimental import pallas as pl

    m, k = x.shape
    g = k // group
    qmax = float(2 ** (bits - 1) - 1)
    kern = functools.partial(_kernel, block_m=block_m, chunk=chunk, n_groups=g, chunks_per_group=group // chunk,
                             qmax=qmax)
    kw: dict[str, Any] = {}
    if not interpret:
        from jax.experimental.pallas import triton as plgpu

        kw["compiler_params"] = plgpu.CompilerParams(num_warps=num_warps, num_stages=1)
    return pl.pallas_call(kern, out_shape=(jax.ShapeDtypeStruct((m, k), jnp.int8), jax.ShapeDtypeStruct((g, m), jnp.float32)),
                          grid=(m // block_m,), interpret=interpret, **kw)(x)
