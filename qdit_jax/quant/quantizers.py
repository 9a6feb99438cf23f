"""Functional group quantizers of Q-DiT (arXiv 2406.17343): fake quantization and storage form.

Pure ``jax.numpy``, jit- and vmap-safe; ``bits``, ``group_size``, ``symmetric``, ``method`` and
``clip_ratio`` are static Python values validated up front with a one-line :class:`QditError`.

Groups are ``group_size`` consecutive elements of the last axis (``0``: the whole axis), so a
weight stored ``(out, in)`` is grouped along ``in`` per output channel and an activation
``(..., tokens, in)`` along ``in`` per token. Per group, with ``b`` bits:

* asymmetric: ``scale = (max - min) / (2^b - 1)``, ``zp = clamp(round(-min / scale), 0, 2^b - 1)``,
  ``q = clamp(round(x / scale) + zp, 0, 2^b - 1)`` (uint8 codes), ``x_hat = (q - zp) * scale``;
* symmetric: ``scale = absmax / (2^(b-1) - 1)``, ``q = clamp(round(x / scale), -2^(b-1), 2^(b-1) - 1)``
  (int8 codes), ``x_hat = q * scale``.

``clip_ratio`` multiplies max and min (absmax) before the scale is formed. ``method="mse"`` is
Q-DiT's clipping search: 100 candidate ranges ``clip_ratio * (1 - 0.001 i)``, i = 0..99, and per
group the one with the smallest mean ``|x - x_hat|^2.4``.

Zero in the range: like Q-DiT's ``quantize_tensor``, ``min``/``max`` are the group's own extrema
(zero is *not* forced into the range). A group of one sign then cannot be represented well (the
zero point clamps to the code range); ``include_zero=True`` widens the range to contain 0, as
GPTQ's quantizer does, and is offered for that case. Degenerate groups are exact and finite:
an asymmetric group with ``max == min == c`` gets ``scale = |c|`` (1 when c = 0), so ``c`` is a code
(``zp`` = 1 for c < 0, else 0); an all-zero symmetric group gets ``scale = 1``.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp

from qdit_jax.errors import QditError
from qdit_jax.quant import formats as F


class QParams(NamedTuple):
    """Storage parameters: ``scale`` and ``zero_point``, both ``(..., n_groups)``.

    ``zero_point`` has the codes' integer dtype (uint8 asymmetric; int8 zeros when symmetric or fp8).
    """

    scale: jax.Array
    zero_point: jax.Array


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized; hashable, so it can be a static argument of ``jax.jit``.

    ``format``: ``"int"`` (bits 2..8) or ``"fp8_e4m3"`` / ``"fp8_e5m2"`` (bits 8, symmetric).
    """

    bits: int
    group_size: int = 0
    symmetric: bool = False
    method: str = "max"
    format: str = "int"
    clip_ratio: float = 1.0
    include_zero: bool = False
    # dtype the scales are stored in (weights): "float16" / "bfloat16" round each scale *up* to that
    # dtype before codes are computed, so fake-quant, GPTQ and the real path use the very scale that
    # is stored (never clipping more, at most one ulp coarser); "float32" keeps them as computed
    scale_dtype: str = "float32"

    def __post_init__(self) -> None:
        F.check_format(self.format)
        if self.scale_dtype not in SCALE_DTYPES:
            raise QditError(f"scale_dtype must be one of {sorted(SCALE_DTYPES)}, got {self.scale_dtype!r}")
        F.check_bits(self.bits)
        F.check_method(self.method)
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 0:
            raise QditError(f"group_size must be a non-negative integer (0 = one group per row), got {self.group_size!r}")
        for name in ("symmetric", "include_zero"):
            if not isinstance(getattr(self, name), bool):
                raise QditError(f"{name} must be true or false, got {getattr(self, name)!r}")
        object.__setattr__(self, "clip_ratio", F.check_clip_ratio(self.clip_ratio))
        F.check_fp8_spec(self.format, self.bits, self.symmetric)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; :meth:`from_dict` inverts it."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "QuantSpec":
        """Build from a dict (e.g. parsed JSON); unknown keys are an error, missing ones default."""
        if not isinstance(d, Mapping):
            raise QditError(f"a quantization spec must be a mapping, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise QditError(f"unknown quantization spec keys {unknown}; allowed keys: {sorted(known)}")
        if "bits" not in d:
            raise QditError("a quantization spec needs 'bits' (2..8)")
        return cls(**dict(d))


# ---------------------------------------------------------------------------------------------
# Grouped building blocks (also used by GPTQ): xg is (..., G, g), parameters are (..., G).
# ---------------------------------------------------------------------------------------------
SCALE_DTYPES: dict[str, Any] = {"float32": jnp.float32, "float16": jnp.float16, "bfloat16": jnp.bfloat16}


def round_scale_up(scale: jax.Array, scale_dtype: str) -> jax.Array:
    """``scale`` (positive) rounded up to the nearest value of ``scale_dtype``, returned in its own
    dtype. Values that dtype cannot hold clamp to its extremes: the smallest positive value that is
    also a normal float32 (float16's subnormals count; bfloat16's would be flushed to zero where
    float32 denormals are) and the largest finite one. Every result is exactly storable."""
    if scale_dtype == "float32":
        return scale
    dt = SCALE_DTYPES[scale_dtype]
    fi = jnp.finfo(dt)
    floor = max(float(fi.smallest_subnormal), float(jnp.finfo(jnp.float32).tiny))
    r = jnp.clip(scale.astype(dt), jnp.asarray(floor, dt), fi.max)
    r = jnp.where(r.astype(scale.dtype) < scale, jnp.nextafter(r, jnp.asarray(jnp.inf, dt)), r)
    return jnp.minimum(r, fi.max).astype(scale.dtype)


def fp8_scale(absmax: jax.Array, spec: QuantSpec) -> jax.Array:
    """fp8 scale of ``spec`` for per-group abs-max values, rounded up to its ``scale_dtype``."""
    return round_scale_up(F.fp8_scale_from_absmax(absmax, spec.format), spec.scale_dtype)


def int_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """Code range ``(qmin, qmax)``."""
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)


def _int_params(lo: jax.Array, hi: jax.Array, bits: int, symmetric: bool,
                scale_dtype: str = "float32") -> tuple[jax.Array, jax.Array]:
    """Scale and (float) zero point from a clipped range; ``hi`` is the absmax when symmetric."""
    qmin, qmax = int_range(bits, symmetric)
    if symmetric:
        s = hi / qmax
        scale = round_scale_up(jnp.where(s > 0, s, jnp.ones_like(s)), scale_dtype)
        return scale, jnp.zeros_like(scale)
    s = (hi - lo) / qmax
    fallback = jnp.where(jnp.abs(hi) > 0, jnp.abs(hi), jnp.ones_like(hi))
    scale = round_scale_up(jnp.where(s > 0, s, fallback), scale_dtype)
    zp = jnp.clip(jnp.round(-lo / scale), qmin, qmax)
    return scale, zp


def _int_codes(xg: jax.Array, scale: jax.Array, zp: jax.Array, bits: int, symmetric: bool) -> jax.Array:
    """Integer-valued (float dtype) codes of grouped values."""
    qmin, qmax = int_range(bits, symmetric)
    return jnp.clip(jnp.round(xg / scale[..., None]) + zp[..., None], qmin, qmax)


def params_of_groups(xg: jax.Array, spec: QuantSpec) -> tuple[jax.Array, jax.Array]:
    """Per-group ``(scale, zero_point)`` in the compute dtype (zero point as float) for ``spec``."""
    if spec.format != "int":
        absmax = jnp.max(jnp.abs(xg), axis=-1)
        params_at = lambda r: (fp8_scale(absmax * r, spec), jnp.zeros_like(absmax))
    else:
        if spec.symmetric:
            hi = jnp.max(jnp.abs(xg), axis=-1)
            lo = -hi
        else:
            hi, lo = jnp.max(xg, axis=-1), jnp.min(xg, axis=-1)
            if spec.include_zero:
                hi, lo = jnp.maximum(hi, 0), jnp.minimum(lo, 0)
        params_at = lambda r: _int_params(lo * r, hi * r, spec.bits, spec.symmetric, spec.scale_dtype)
    if spec.method == "max":
        return params_at(jnp.asarray(spec.clip_ratio, xg.dtype))
    return F.clip_search(xg, params_at, lambda p: fake_of_groups(xg, p[0], p[1], spec), spec.clip_ratio)


def fake_of_groups(xg: jax.Array, scale: jax.Array, zp: jax.Array, spec: QuantSpec) -> jax.Array:
    """Quantize-dequantize grouped values with given per-group parameters."""
    if spec.format != "int":
        return F.fp8_fake_groups(xg, scale, spec.format)
    q = _int_codes(xg, scale, zp, spec.bits, spec.symmetric)
    return (q - zp[..., None]) * scale[..., None]


def codes_dtype(spec: QuantSpec) -> jnp.dtype:
    """Storage dtype of the codes: uint8 (asymmetric int), int8 (symmetric int) or the fp8 dtype."""
    if spec.format != "int":
        return F.FP8_DTYPES[spec.format]
    return jnp.dtype(jnp.int8 if spec.symmetric else jnp.uint8)


def zp_dtype(spec: QuantSpec) -> jnp.dtype:
    return jnp.dtype(jnp.uint8 if spec.format == "int" and not spec.symmetric else jnp.int8)


def _grouped(x: jax.Array, spec: QuantSpec) -> jax.Array:
    gs = F.check_group_size(x.shape[-1], spec.group_size)
    return F.to_groups(jnp.asarray(x).astype(F.compute_dtype(x.dtype)), gs)


# ---------------------------------------------------------------------------------------------
# Spec-level API (what the interceptor, calibration and GPTQ call)
# ---------------------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("spec",))
def qparams_spec(x: jax.Array, spec: QuantSpec) -> QParams:
    """Per-group storage parameters of ``x`` under ``spec``; shapes ``(..., n_groups)``."""
    scale, zp = params_of_groups(_grouped(x, spec), spec)
    return QParams(scale, zp.astype(zp_dtype(spec)))


@functools.partial(jax.jit, static_argnames=("spec",))
def quantize_spec(x: jax.Array, qparams: QParams, spec: QuantSpec) -> jax.Array:
    """Codes of ``x`` (shape of ``x``; dtype :func:`codes_dtype`) under given parameters."""
    xg = _grouped(x, spec)
    scale = qparams.scale.astype(xg.dtype)
    if spec.format != "int":
        return F.from_groups(F.fp8_round(xg / scale[..., None], spec.format))
    q = _int_codes(xg, scale, qparams.zero_point.astype(xg.dtype), spec.bits, spec.symmetric)
    return F.from_groups(q).astype(codes_dtype(spec))


@functools.partial(jax.jit, static_argnames=("group_size", "dtype"))
def _dequantize(codes: jax.Array, qparams: QParams, group_size: int, dtype: jnp.dtype) -> jax.Array:
    gs = F.check_group_size(codes.shape[-1], group_size)
    scale = qparams.scale.astype(F.compute_dtype(qparams.scale.dtype))
    qg = F.to_groups(codes, gs).astype(scale.dtype)
    zp = qparams.zero_point.astype(scale.dtype)
    return F.from_groups((qg - zp[..., None]) * scale[..., None]).astype(dtype)


def dequantize(codes: jax.Array, qparams: QParams, group_size: int, dtype: Any = jnp.float32) -> jax.Array:
    """Values of ``codes`` (int or fp8): ``(codes - zero_point) * scale`` per group, as ``dtype``."""
    n_groups = codes.shape[-1] // F.check_group_size(codes.shape[-1], group_size)
    if qparams.scale.shape != (*codes.shape[:-1], n_groups) or qparams.zero_point.shape != qparams.scale.shape:
        raise QditError(
            f"quantization parameters of shape {tuple(qparams.scale.shape)}/{tuple(qparams.zero_point.shape)} "
            f"do not match codes {tuple(codes.shape)} with group_size {group_size} "
            f"(expected {(*codes.shape[:-1], n_groups)}); pass the group size the codes were made with"
        )
    return _dequantize(codes, qparams, group_size, jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnames=("spec",))
def fake_quant_spec(x: jax.Array, spec: QuantSpec) -> jax.Array:
    """Quantize-dequantize ``x`` under ``spec`` (dynamic: parameters from ``x`` itself); ``x.dtype``."""
    xg = _grouped(x, spec)
    scale, zp = params_of_groups(xg, spec)
    return F.from_groups(fake_of_groups(xg, scale, zp, spec)).astype(x.dtype)


def qparams_from_range(lo: jax.Array, hi: jax.Array, spec: QuantSpec) -> QParams:
    """Parameters from known per-group ranges (static calibration), ``lo``/``hi`` of shape (..., n_groups).

    Applies ``clip_ratio`` and ``include_zero`` as the dynamic quantizer does (method 'max').
    """
    lo, hi = jnp.asarray(lo, jnp.float32), jnp.asarray(hi, jnp.float32)
    if spec.format != "int" or spec.symmetric:
        absmax = jnp.maximum(jnp.abs(lo), jnp.abs(hi)) * spec.clip_ratio
        if spec.format != "int":
            return QParams(fp8_scale(absmax, spec), jnp.zeros(absmax.shape, jnp.int8))
        scale, zp = _int_params(-absmax, absmax, spec.bits, True, spec.scale_dtype)
    else:
        if spec.include_zero:
            lo, hi = jnp.minimum(lo, 0), jnp.maximum(hi, 0)
        scale, zp = _int_params(lo * spec.clip_ratio, hi * spec.clip_ratio, spec.bits, False, spec.scale_dtype)
    return QParams(scale, zp.astype(zp_dtype(spec)))


@functools.partial(jax.jit, static_argnames=("spec",))
def fake_quant_with(x: jax.Array, qparams: QParams, spec: QuantSpec) -> jax.Array:
    """Quantize-dequantize ``x`` with given (e.g. static) parameters; they broadcast over ``x``'s
    leading axes, so per-tensor-group parameters of shape ``(n_groups,)`` serve every token."""
    xg = _grouped(x, spec)
    scale = jnp.broadcast_to(qparams.scale.astype(xg.dtype), xg.shape[:-1])
    zp = jnp.broadcast_to(qparams.zero_point.astype(xg.dtype), xg.shape[:-1])
    return F.from_groups(fake_of_groups(xg, scale, zp, spec)).astype(x.dtype)


def quantize_tensor(x: jax.Array, spec: QuantSpec) -> tuple[jax.Array, QParams]:
    """Storage form of ``x``: ``(codes, qparams)`` with ``dequantize(codes, qparams, ...) == fake_quant``."""
    qp = qparams_spec(x, spec)
    return quantize_spec(x, qp, spec), qp


# ---------------------------------------------------------------------------------------------
# Keyword API of the integer quantizer (the signatures)
# ---------------------------------------------------------------------------------------------
def _int_spec(bits: int, group_size: int, symmetric: bool, clip_ratio: float, method: str, include_zero: bool) -> QuantSpec:
    return QuantSpec(bits=bits, group_size=group_size, symmetric=bool(symmetric), method=method,
                     format="int", clip_ratio=clip_ratio, include_zero=bool(include_zero))


def fake_quant(
    x: jax.Array,
    *,
    bits: int,
    group_size: int,
    symmetric: bool,
    clip_ratio: float = 1.0,
    method: str = "max",
    include_zero: bool = False,
) -> jax.Array:
    """Integer group fake quantization of ``x`` along its last axis; returns ``x.dtype``."""
    spec = _int_spec(bits, group_size, symmetric, clip_ratio, method, include_zero)
    F.check_group_size(x.shape[-1], group_size)
    return fake_quant_spec(x, spec)


def compute_qparams(
    x: jax.Array,
    *,
    bits: int,
    group_size: int,
    symmetric: bool,
    clip_ratio: float = 1.0,
    method: str = "max",
    include_zero: bool = False,
) -> QParams:
    """Per-group ``QParams`` of ``x``: scale (compute float dtype) and zero point, ``(..., n_groups)``."""
    spec = _int_spec(bits, group_size, symmetric, clip_ratio, method, include_zero)
    F.check_group_size(x.shape[-1], group_size)
    return qparams_spec(x, spec)


def quantize(x: jax.Array, qparams: QParams, *, bits: int, group_size: int, symmetric: bool) -> jax.Array:
    """Integer codes of ``x`` under ``qparams``: uint8 (asymmetric) or int8 (symmetric)."""
    spec = _int_spec(bits, group_size, symmetric, 1.0, "max", False)
    n_groups = x.shape[-1] // F.check_group_size(x.shape[-1], group_size)
    if qparams.scale.shape != (*x.shape[:-1], n_groups):
        raise QditError(
            f"scale of shape {tuple(qparams.scale.shape)} does not match x {tuple(x.shape)} with "
            f"group_size {group_size} (expected {(*x.shape[:-1], n_groups)})"
        )
    return quantize_spec(x, qparams, spec)
