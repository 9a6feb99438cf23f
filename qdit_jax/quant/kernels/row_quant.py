"""What the per-row quantization kernels share: which activation specs they compute, the symmetric
per-row scale from a row's abs-max, and the codes, exactly as the fake-quant quantizer computes them
(``quantizers.params_of_groups`` and its code functions). Used inside Pallas kernel bodies
(``gelu_quant``, ``norm_quant``) on lists of a row block's column pieces."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from qdit_jax.quant.config import QuantSpec
from qdit_jax.quant.kernels.group_gemm import _round_even

RNE_SHIFT = 12582912.0  # 1.5 * 2^23: float32 y + this is round(y) + this, held in the low mantissa bits


def int8_codes(y: jax.Array) -> jax.Array:
    """int8 codes ``round(y)`` (half to even: ``jnp.round``'s rule) of float32 ``y`` already within the code
    range (|y| < 2^22 is what the arithmetic needs): the float32 add of 1.5 * 2^23 rounds y to an integer
    (the sum's ulp is 1) and leaves it as two's complement in the sum's low bits, whose low byte is the
    code. One add and a byte truncation, where ``round`` then a float -> int conversion are two conversion
    instructions (quarter rate on Hopper) an element. Exact only on a quotient or any value rounded to
    float32 before the add (a product would let a compiler contract the add into an FMA). For kernel bodies
    only (the Mosaic GEMM's codes epilogue, the Triton row kernels): XLA on the GPU (JAX 0.11.2) miscompiles
    it, every code -1, because it rewrites the bitcast-convert into a type-changing ``bitcast`` inside the
    fusion (docs/RESULTS.md, twenty-eighth session), so kernels run in Pallas interpret mode, which XLA
    evaluates, round with ``jnp.round`` instead."""
    return lax.bitcast_convert_type(y + RNE_SHIFT, jnp.int32).astype(jnp.int8)


def check_row_tiling(m: int, width: int, block_m: int, chunk: int, platform: str | None, dims: str = "(M, N)") -> str:
    """Why an (M, width) array cannot go through a row kernel of ``block_m`` rows per program in
    ``chunk``-wide pieces on ``platform`` (default: JAX's backend); '' when it can."""
    from qdit_jax.quant.kernels.group_gemm import _pow2

    platform = platform or jax.default_backend()
    if platform != "gpu":
        return f"platform is {platform}, the kernel is GPU-only"
    if not (_pow2(block_m) and _pow2(chunk)):
        return f"block_m {block_m} and chunk {chunk} must be powers of two"
    if m % block_m or width % chunk:
        return f"{dims} = ({m}, {width}) is not a multiple of ({block_m}, {chunk})"
    return ""


def check_row_spec(spec: QuantSpec) -> str:
    """Why ``spec`` is outside what the row kernels compute ('' when inside)."""
    if not spec.symmetric or spec.method != "max" or spec.clip_ratio != 1.0 or spec.scale_dtype != "float32":
        return "the kernel computes symmetric max-calibrated activation scales in float32 only"
    if spec.format == "int" and spec.bits == 8:
        return ""
    if spec.format == "fp8_e4m3":
        return ""
    return f"activation format {spec.format} at {spec.bits} bits (the kernel writes int8 or fp8 e4m3 codes)"


def codes_dtype(spec: QuantSpec) -> Any:
    """The dtype of the codes a row kernel writes for ``spec``."""
    from qdit_jax.quant.formats import FP8_DTYPES

    return jnp.int8 if spec.format == "int" else FP8_DTYPES[spec.format]


def row_scale(amax: jax.Array, spec: QuantSpec) -> jax.Array:
    """The quantizer's symmetric per-row scale from a row's abs-max."""
    from qdit_jax.quant.quantizers import _int_params, fp8_scale

    if spec.format == "int":
        return _int_params(-amax, amax, spec.bits, True, spec.scale_dtype)[0]
    return fp8_scale(amax, spec)


def scale_and_codes(h: list[jax.Array], amax: jax.Array, spec: QuantSpec, fast: bool = False,
                    add_round: bool = False) -> tuple[jax.Array, list[jax.Array]]:
    """The quantizer's symmetric per-row scale from ``amax`` and the codes of each piece of ``h``
    (``fast``: multiply by the scale's reciprocal instead of dividing; ``add_round``: int codes by
    :func:`int8_codes`, for compiled kernels only, never where XLA evaluates the body)."""
    from qdit_jax.quant import formats as F
    from qdit_jax.quant.quantizers import int_range

    s = row_scale(amax, spec)
    if spec.format == "int":
        qmin, qmax = int_range(spec.bits, True)
    inv = 1.0 / s
    scaled = [x * inv[:, None] if fast else x / s[:, None] for x in h]
    if spec.format == "int":
        if add_round:  # clip first (integer bounds: the same codes), then one add rounds
            return s, [int8_codes(jnp.clip(x, qmin, qmax)) for x in scaled]
        return s, [jnp.clip(_round_even(x), qmin, qmax).astype(jnp.int8) for x in scaled]
    return s, [F.fp8_round(x, spec.format) for x in scaled]


def row_amax(h: list[jax.Array]) -> jax.Array:
    """Per-row abs-max over the pieces of ``h``: elementwise across pieces first, then one row
    reduction (a cross-thread reduction per piece costs more than the math in these kernels)."""
    acc = jnp.abs(h[0])
    for x in h[1:]:
        acc = jnp.maximum(acc, jnp.abs(x))
    return jnp.max(acc, axis=1)


def row_sum(h: list[jax.Array]) -> jax.Array:
    """Per-row sum over the pieces of ``h``, (rows, 1): elementwise across pieces, then one row reduction."""
    acc = h[0]
    for x in h[1:]:
        acc = acc + x
    return jnp.sum(acc, axis=1, keepdims=True)
