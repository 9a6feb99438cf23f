"""The step between an MLP's two quantized GEMMs in one pass: fc1's scale epilogue, the tanh GELU and
fc2's per-token dynamic activation quantization, as a Pallas (Triton) kernel, with its guard and the
XLA formulation it replaces.

Why: for real W8A8 / fp8, XLA compiles this step into a multi-output reduction (epilogue + GELU +
row abs-max, which also writes GELU's output in bf16) and a quantize pass that reads that output
back: ~2.1 GB of memory traffic per DiT-XL/2 block at batch 256, 945 us on an H100, the largest
cost the quantized forward adds (profile in docs/RESULTS.md). A program here owns ``block_m`` whole
rows (N = 4,608 in ``chunk``-wide pieces), keeps them in registers, reads fc1's product once and
writes the codes once (~0.9 GB).

Same math as the unfused real path: the epilogue ``product * s_a[m] * s_w[n] + bias`` rounded to the
layer's output dtype, ``jax.nn.gelu(approximate=True)`` rounded to that dtype again (the fc2 input
the fake-quant mode sees), then the quantizer's symmetric scale and codes. Triton's ``tanh`` and
float32 division are not XLA's, and XLA's fusions do not round where the dtypes say, so on a GPU a
value near a rounding boundary can land a code apart (94.7% / 98.1% of fp8 / int8 codes equal to
XLA's at XL/2's fc1 shape). On the CPU (interpret mode) it follows a float64 version of the steps
above (tested).

Status: measured, not wired into the real path. Best tiling 1 row x 512-wide pieces x 4 warps: 709-727
us against XLA's 1,040-1,088 for fp8 at batch 256, far from the ~300 us byte floor; see
docs/PERF_NOTES.md ("Fifth session") for why and what wiring it would take.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from qdit_jax.quant.config import QuantSpec
from qdit_jax.quant.kernels.group_gemm import _pow2, _round_even

BLOCK_M, CHUNK, NUM_WARPS = 1, 512, 4  # the fastest tiling measured on the H100


def _check_spec(spec: QuantSpec) -> str:
    """Why ``spec`` is outside what the kernel computes ('' when inside)."""
    if not spec.symmetric or spec.method != "max" or spec.clip_ratio != 1.0 or spec.scale_dtype != "float32":
        return "the kernel computes symmetric max-calibrated activation scales in float32 only"
    if spec.format == "int" and spec.bits == 8:
        return ""
    if spec.format == "fp8_e4m3":
        return ""
    return f"activation format {spec.format} at {spec.bits} bits (the kernel writes int8 or fp8 e4m3 codes)"


def gelu_quant_applies(m: int, n: int, spec: QuantSpec, *, block_m: int = BLOCK_M, chunk: int = CHUNK,
                       platform: str | None = None) -> tuple[bool, str]:
    """Whether the kernel can take an (M, N) fc1 product to fc2's codes, and if not, why."""
    platform = platform or jax.default_backend()
    if platform != "gpu":
        return False, f"platform is {platform}, the kernel is GPU-only"
    if not (_pow2(block_m) and _pow2(chunk)):
        return False, f"block_m {block_m} and chunk {chunk} must be powers of two"
    if m % block_m or n % chunk:
        return False, f"(M, N) = ({m}, {n}) is not a multiple of ({block_m}, {chunk})"
    why = _check_spec(spec)
    return (not why), (why or "ok")


def _scale_and_codes(h: list[jax.Array], amax: jax.Array, spec: QuantSpec,
                     fast: bool) -> tuple[jax.Array, list[jax.Array]]:
    """The quantizer's symmetric per-row scale from ``amax`` and the codes of each chunk of ``h``
    (``fast``: multiply by the scale's reciprocal instead of dividing)."""
    from qdit_jax.quant import formats as F
    from qdit_jax.quant.quantizers import _int_params, fp8_scale, int_range

    if spec.format == "int":
        qmin, qmax = int_range(spec.bits, True)
        s, _ = _int_params(-amax, amax, spec.bits, True, spec.scale_dtype)
    else:
        s = fp8_scale(amax, spec)
    inv = 1.0 / s
    scaled = [x * inv[:, None] if fast else x / s[:, None] for x in h]
    if spec.format == "int":
        return s, [jnp.clip(_round_even(x), qmin, qmax).astype(jnp.int8) for x in scaled]
    return s, [F.fp8_round(x, spec.format) for x in scaled]


def _gelu(y: jax.Array, fast: bool) -> jax.Array:
    """tanh GELU; ``fast``: as ``x * sigmoid(2u)`` with one ``exp`` (the same function, rounded differently)."""
    if not fast:
        return jax.nn.gelu(y, approximate=True)
    u2 = 1.5957691216057308 * (y + 0.044715 * y * y * y)
    return y / (1.0 + jnp.exp(-u2))


def _codes_dtype(spec: QuantSpec) -> Any:
    from qdit_jax.quant.formats import FP8_DTYPES

    return jnp.int8 if spec.format == "int" else FP8_DTYPES[spec.format]


def _kernel(p_ref, sa_ref, sw_ref, b_ref, q_ref, s_ref, *, block_m: int, chunk: int, n_chunks: int,
            spec: QuantSpec, out_dtype: Any, fast: bool):
    from jax.experimental import pallas as pl

    rows = pl.ds(pl.program_id(0) * block_m, block_m)
    sa = sa_ref[0, rows]
    hs, amax = [], jnp.zeros((block_m,), jnp.float32)
    for j in range(n_chunks):  # unrolled: the whole row stays in registers
        cols = pl.ds(j * chunk, chunk)
        y = p_ref[rows, cols].astype(jnp.float32) * sa[:, None] * sw_ref[0, cols][None, :]
        y = y + b_ref[cols].astype(jnp.float32)[None, :]
        y = y.astype(out_dtype).astype(jnp.float32)
        h = _gelu(y, fast).astype(out_dtype).astype(jnp.float32)
        amax = jnp.maximum(amax, jnp.max(jnp.abs(h), axis=1))
        hs.append(h)
    s, codes = _scale_and_codes(hs, amax, spec, fast)
    for j, q in enumerate(codes):
        q_ref[rows, pl.ds(j * chunk, chunk)] = q
    s_ref[0, rows] = s


def gelu_quant_pallas(p: jax.Array, sa: jax.Array, sw: jax.Array, bias: jax.Array | None, spec: QuantSpec,
                      out_dtype: Any, *, block_m: int = BLOCK_M, chunk: int = CHUNK, num_warps: int = NUM_WARPS,
                      fast: bool = False, interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """fc2's codes (M, N) and per-token scales (1, M) from fc1's raw product ``p`` (M, N), its
    per-token activation scales ``sa`` (1, M), per-channel weight scales ``sw`` (1, N) and bias."""
    from jax.experimental import pallas as pl

    m, n = p.shape
    kern = functools.partial(_kernel, block_m=block_m, chunk=chunk, n_chunks=n // chunk, spec=spec,
                             out_dtype=jnp.dtype(out_dtype), fast=fast)
    args = (p, sa, sw, jnp.zeros((n,), jnp.float32) if bias is None else bias)
    kw: dict[str, Any] = {}
    if not interpret:
        from jax.experimental.pallas import triton as plgpu

        kw["compiler_params"] = plgpu.CompilerParams(num_warps=num_warps, num_stages=1)
    out_shape = (jax.ShapeDtypeStruct((m, n), _codes_dtype(spec)), jax.ShapeDtypeStruct((1, m), jnp.float32))
    return pl.pallas_call(kern, out_shape=out_shape, grid=(m // block_m,), interpret=interpret, **kw)(*args)


def gelu_quant_xla(p: jax.Array, sa: jax.Array, sw: jax.Array, bias: jax.Array | None, spec: QuantSpec,
                   out_dtype: Any) -> tuple[jax.Array, jax.Array]:
    """The unfused real path's formulation (``group_gemm_xla``'s epilogue at G = 1, the model's GELU,
    ``quantize_act`` per token): the kernel's reference and fallback."""
    from qdit_jax.quant.real import quantize_act

    y = p.astype(jnp.float32) * sa[0][:, None] * sw[0][None, :]
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    h = jax.nn.gelu(y.astype(out_dtype), approximate=True)
    return quantize_act(h, spec, p.shape[1])
