"""Number formats of the quantizers: bit widths, fp8, validation and the shared group machinery.

Pure ``jax.numpy`` (no Flax). Everything here is jit- and vmap-safe; arguments that decide shapes
or the program (bits, group size, format, method) are static Python values and are validated in
Python, before they reach JAX, with a one-line :class:`QditError`.

Groups are ``group_size`` consecutive elements of the last axis (the input channels of a weight
stored ``(out, in)``, or the channels of one token of an activation); ``group_size=0`` means one
group per row (the whole last axis).

fp8 (``fp8_e4m3`` = ``float8_e4m3fn``, max 448; ``fp8_e5m2``, max 57344) is symmetric with one
float scale per group: ``scale = absmax / fmt_max`` so that the group's largest magnitude lands on
the format's largest finite value; values are divided by the scale, clipped to the finite range,
cast to the fp8 dtype (round to nearest even) and back, and multiplied by the scale.
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

from qdit_jax.errors import QditError

MIN_BITS, MAX_BITS = 2, 8
FORMATS: tuple[str, ...] = ("int", "fp8_e4m3", "fp8_e5m2")
METHODS: tuple[str, ...] = ("max", "mse")

# Q-DiT's clipping search: 100 candidate ranges shrunk by 0.1% steps, scored by the L_2.4 error.
MSE_GRID = 100
MSE_STEP = 0.001
MSE_NORM = 2.4

FP8_DTYPES: dict[str, jnp.dtype] = {
    "fp8_e4m3": jnp.dtype(jnp.float8_e4m3fn),
    "fp8_e5m2": jnp.dtype(jnp.float8_e5m2),
}


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------
def check_bits(bits: int) -> int:
    """Return ``bits`` if it is an integer in 2..8, else raise a QditError naming the fix."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise QditError(
            f"unsupported bit width {bits!r}: bits must be an integer in {MIN_BITS}..{MAX_BITS} "
            f"(leave a layer unquantized for full precision)"
        )
    return bits


def check_format(fmt: str) -> str:
    """Return ``fmt`` if it names a known number format, else raise a QditError listing them."""
    if fmt not in FORMATS:
        raise QditError(f"unknown quantization format {fmt!r}: use one of {', '.join(FORMATS)}")
    return fmt


def check_method(method: str) -> str:
    """Return ``method`` if it is a known range-estimation method ('max' or 'mse')."""
    if method not in METHODS:
        raise QditError(f"unknown quantization method {method!r}: use one of {', '.join(METHODS)}")
    return method


def check_clip_ratio(clip_ratio: float) -> float:
    """Return ``clip_ratio`` as a float if it lies in (0, 1]."""
    try:
        value = float(clip_ratio)
    except (TypeError, ValueError):
        raise QditError(f"clip_ratio must be a number in (0, 1], got {clip_ratio!r}") from None
    if not 0.0 < value <= 1.0:
        raise QditError(f"clip_ratio must be in (0, 1], got {clip_ratio!r}")
    return value


def divisors(n: int) -> list[int]:
    """All positive divisors of ``n`` in increasing order."""
    return [d for d in range(1, n + 1) if n % d == 0]


def check_group_size(width: int, group_size: int) -> int:
    """Return the effective group size (``width`` for 0) or raise a QditError naming the divisors."""
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 0:
        raise QditError(f"group_size must be a non-negative integer (0 = one group per row), got {group_size!r}")
    if width <= 0:
        raise QditError(f"cannot quantize an empty last axis (width {width})")
    if group_size == 0:
        return width
    if width % group_size:
        valid = ", ".join(str(d) for d in divisors(width))
        raise QditError(
            f"group_size {group_size} does not divide the width {width}; "
            f"use 0 (one group per row) or a divisor of {width}: {valid}"
        )
    return group_size


def check_fp8_spec(fmt: str, bits: int, symmetric: bool) -> None:
    """fp8 formats are 8-bit and symmetric: reject anything else with the fix."""
    if fmt in FP8_DTYPES:
        if bits != 8:
            raise QditError(f"format {fmt} is an 8-bit format, got bits={bits}; set bits=8 or use format 'int'")
        if not symmetric:
            raise QditError(f"format {fmt} is symmetric (no zero point); set symmetric=True or use format 'int'")


# ---------------------------------------------------------------------------------------------
# Groups and the clipping search shared by every format
# ---------------------------------------------------------------------------------------------
def compute_dtype(dtype: jnp.dtype) -> jnp.dtype:
    """Arithmetic dtype of the quantizers: at least float32 (float64 stays float64)."""
    return jnp.promote_types(jnp.dtype(dtype), jnp.float32) if jnp.issubdtype(dtype, jnp.floating) else jnp.dtype(jnp.float32)


def to_groups(x: jax.Array, group_size: int) -> jax.Array:
    """View ``(..., n)`` as ``(..., n // g, g)``; ``group_size`` must already be effective (> 0)."""
    return x.reshape(*x.shape[:-1], x.shape[-1] // group_size, group_size)


def from_groups(xg: jax.Array) -> jax.Array:
    """Inverse of :func:`to_groups`."""
    return xg.reshape(*xg.shape[:-2], xg.shape[-2] * xg.shape[-1])


def lp_error(xg: jax.Array, deq: jax.Array) -> jax.Array:
    """Mean ``|x - deq|^2.4`` over each group (the last axis): Q-DiT's (LAPQ's) clipping score."""
    return jnp.mean(jnp.abs(xg - deq) ** MSE_NORM, axis=-1)


def clip_search(
    xg: jax.Array,
    params_at: Callable[[jax.Array], tuple[jax.Array, ...]],
    fake_with: Callable[[tuple[jax.Array, ...]], jax.Array],
    clip_ratio: float,
) -> tuple[jax.Array, ...]:
    """Per group, the parameters of the candidate range with the smallest L_2.4 error.

    Candidate ``i`` (0..99) shrinks the range by ``clip_ratio * (1 - 0.001 i)``; ``params_at(r)``
    returns parameters of shape ``(..., n_groups)`` for ratio ``r``, ``fake_with(params)`` the
    fake-quantized groups. A ``fori_loop`` keeps a running best (ties keep the larger range, as
    Q-DiT's strict ``<``), so memory stays 1x and the program compiles once.
    """
    dt = xg.dtype

    def ratio(i: jax.Array) -> jax.Array:
        return (clip_ratio * (1.0 - MSE_STEP * i.astype(dt))).astype(dt)

    first = params_at(ratio(jnp.asarray(0)))
    best_score = jnp.full(xg.shape[:-1], jnp.inf, dt)

    def body(i: jax.Array, carry: tuple) -> tuple:
        best, score_best = carry
        cand = params_at(ratio(i))
        score = lp_error(xg, fake_with(cand))
        better = score < score_best
        best = tuple(jnp.where(better, c, b) for c, b in zip(cand, best))
        return best, jnp.where(better, score, score_best)

    best, _ = lax.fori_loop(0, MSE_GRID, body, (first, best_score))
    return best


# ---------------------------------------------------------------------------------------------
# fp8
# ---------------------------------------------------------------------------------------------
def fp8_max(fmt: str) -> float:
    """Largest finite value of an fp8 format."""
    return float(jnp.finfo(FP8_DTYPES[fmt]).max)


def _check_fp8(fmt: str) -> None:
    if fmt not in FP8_DTYPES:
        raise QditError(f"unknown fp8 format {fmt!r}: use one of {', '.join(FP8_DTYPES)}")


def fp8_scale_from_absmax(absmax: jax.Array, fmt: str) -> jax.Array:
    """Scale mapping ``absmax`` to the format's max finite value; all-zero groups get scale 1."""
    return jnp.where(absmax > 0, absmax / fp8_max(fmt), jnp.ones_like(absmax))


def fp8_round(y: jax.Array, fmt: str) -> jax.Array:
    """Round already-scaled values to the nearest fp8 value (saturating), returned as fp8 codes."""
    m = fp8_max(fmt)
    return jnp.clip(y, -m, m).astype(FP8_DTYPES[fmt])


def fp8_fake_groups(xg: jax.Array, scale: jax.Array, fmt: str) -> jax.Array:
    """Fake-quantize grouped values ``(..., G, g)`` with per-group ``scale`` ``(..., G)``."""
    s = scale[..., None]
    return fp8_round(xg / s, fmt).astype(xg.dtype) * s


@functools.partial(jax.jit, static_argnames=("fmt", "group_size", "clip_ratio", "method"))
def fp8_compute_scale(
    x: jax.Array, *, fmt: str, group_size: int, clip_ratio: float = 1.0, method: str = "max"
) -> jax.Array:
    """Per-group fp8 scales ``(..., n_groups)`` (``method='mse'``: Q-DiT's clipping search)."""
    _check_fp8(fmt)
    check_method(method)
    clip_ratio = check_clip_ratio(clip_ratio)
    gs = check_group_size(x.shape[-1], group_size)
    xg = to_groups(x.astype(compute_dtype(x.dtype)), gs)
    absmax = jnp.max(jnp.abs(xg), axis=-1)
    if method == "max":
        return fp8_scale_from_absmax(absmax * clip_ratio, fmt)
    (scale,) = clip_search(
        xg,
        lambda r: (fp8_scale_from_absmax(absmax * r, fmt),),
        lambda p: fp8_fake_groups(xg, p[0], fmt),
        clip_ratio,
    )
    return scale


def fp8_quantize(x: jax.Array, scale: jax.Array, *, fmt: str, group_size: int) -> jax.Array:
    """fp8 codes (dtype ``float8_*``) of ``x`` under per-group ``scale``."""
    _check_fp8(fmt)
    gs = check_group_size(x.shape[-1], group_size)
    xg = to_groups(x.astype(compute_dtype(x.dtype)), gs)
    return from_groups(fp8_round(xg / scale[..., None].astype(xg.dtype), fmt))


def fp8_dequantize(codes: jax.Array, scale: jax.Array, *, group_size: int, dtype: jnp.dtype = jnp.float32) -> jax.Array:
    """Values of fp8 ``codes`` under per-group ``scale``, cast to ``dtype``."""
    gs = check_group_size(codes.shape[-1], group_size)
    s = scale.astype(compute_dtype(scale.dtype))
    return from_groups(to_groups(codes, gs).astype(s.dtype) * s[..., None]).astype(dtype)


@functools.partial(jax.jit, static_argnames=("fmt", "group_size", "clip_ratio", "method"))
def fp8_fake_quant(
    x: jax.Array, *, fmt: str, group_size: int, clip_ratio: float = 1.0, method: str = "max"
) -> jax.Array:
    """fp8 fake quantization with per-group scaling; returns ``x.dtype``."""
    scale = fp8_compute_scale(x, fmt=fmt, group_size=group_size, clip_ratio=clip_ratio, method=method)
    gs = check_group_size(x.shape[-1], group_size)
    xg = to_groups(x.astype(compute_dtype(x.dtype)), gs)
    return from_groups(fp8_fake_groups(xg, scale, fmt)).astype(x.dtype)
