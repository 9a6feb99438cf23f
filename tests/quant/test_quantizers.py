"""Group quantizers and fp8 against float64 NumPy / ml_dtypes references written from the formulas."""
from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qdit_jax.errors import QditError
from qdit_jax.quant import formats as F
from qdit_jax.quant.quantizers import (
    QParams,
    QuantSpec,
    compute_qparams,
    dequantize,
    fake_quant,
    fake_quant_spec,
    fake_quant_with,
    qparams_from_range,
    qparams_spec,
    quantize,
    quantize_tensor,
)
from tests.reference import numpy_quant as R

WIDTH = 256


def _inputs() -> np.ndarray:
    """Rows with a constant group, an all-constant row, zeros, one-signed rows, outliers, mixed scales."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(10, WIDTH)).astype(np.float32)
    x[0, :128] = 0.7  # a constant group for group sizes up to 128
    x[1] = -1.3  # a constant row
    x[2] = 0.0
    x[3] = np.abs(x[3]) + 0.5  # positive only
    x[4] = -np.abs(x[4]) - 0.2  # negative only
    x[5] *= 100.0
    x[6, 17] = 40.0  # an outlier
    x[7] *= 1e-3
    return x


X = _inputs()


def _check_close(out: np.ndarray, ref: np.ndarray, scale: np.ndarray, group_size: int) -> None:
    """Equal up to float32 rounding; a rare element may sit on a rounding tie and move one step."""
    step = np.repeat(scale, WIDTH // scale.shape[-1], axis=-1)
    diff = np.abs(out.astype(np.float64) - ref)
    off = diff > 1e-5 * step + 1e-6 * np.abs(ref)
    assert off.mean() <= 2e-3, f"{off.sum()} elements differ from the reference"
    assert np.all(diff[off] <= step[off] * 1.0001), "a mismatch larger than one quantization step"


MAX_GRID = list(itertools.product([2, 3, 4, 6, 8], [0, 32, 128], [False, True]))
MSE_SUBSET = [(2, 0, False), (3, 32, True), (4, 128, False), (4, 32, False), (6, 0, True), (8, 32, True)]


def _run(x: jax.Array, spec: QuantSpec) -> tuple:
    """fake_quant, qparams, codes and dequantized codes in one compiled program per spec."""

    @jax.jit
    def run(x: jax.Array) -> tuple:
        kw = dict(bits=spec.bits, group_size=spec.group_size, symmetric=spec.symmetric)
        out = fake_quant(x, method=spec.method, **kw)
        qp = compute_qparams(x, method=spec.method, **kw)
        codes = quantize(x, qp, **kw)
        return out, qp, codes, dequantize(codes, qp, spec.group_size, jnp.float32)

    return jax.tree_util.tree_map(np.asarray, run(x))


@pytest.mark.parametrize("bits,group_size,symmetric", MAX_GRID)
def test_max_matches_numpy_and_round_trips(bits: int, group_size: int, symmetric: bool) -> None:
    spec = QuantSpec(bits=bits, group_size=group_size, symmetric=symmetric)
    out, qp, codes, deq = _run(jnp.asarray(X), spec)
    ref = R.int_fake_quant(X, bits, group_size, symmetric)
    s_ref, z_ref = R.int_qparams(X, bits, group_size, symmetric)
    assert np.all(np.isfinite(out))
    _check_close(out, ref, s_ref, group_size)

    n_groups = 1 if group_size == 0 else WIDTH // group_size
    assert qp.scale.shape == qp.zero_point.shape == (X.shape[0], n_groups)
    np.testing.assert_allclose(qp.scale, s_ref, rtol=1e-6)
    np.testing.assert_array_equal(qp.zero_point, z_ref)
    assert codes.dtype == (np.int8 if symmetric else np.uint8)
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)
    assert codes.astype(np.int32).min() >= lo and codes.astype(np.int32).max() <= hi
    # The storage form reproduces fake quantization bit for bit.
    np.testing.assert_array_equal(deq, out)


@pytest.mark.parametrize("bits,group_size,symmetric", MSE_SUBSET)
def test_mse_search_matches_numpy(bits: int, group_size: int, symmetric: bool) -> None:
    out, _, _, deq = _run(jnp.asarray(X), QuantSpec(bits=bits, group_size=group_size, symmetric=symmetric, method="mse"))
    ref = R.int_fake_quant(X, bits, group_size, symmetric, method="mse")
    g_out, g_ref, g_x = (R.groups(a.astype(np.float64), group_size) for a in (out, ref, X))
    err_out = np.mean(np.abs(g_x - g_out) ** 2.4, -1)
    err_ref = np.mean(np.abs(g_x - g_ref) ** 2.4, -1)
    same = np.all(np.abs(g_out - g_ref) <= 1e-5 * np.abs(g_ref).max(-1, keepdims=True) + 1e-12, -1)
    # Near-ties between candidates may resolve differently in float32; then the error must tie too.
    assert same.mean() >= 0.9, f"only {same.mean():.2%} of groups agree with the reference search"
    np.testing.assert_allclose(err_out[~same], err_ref[~same], rtol=1e-3)
    # The search never does worse than plain max (candidate 0 is the max range) on any group.
    g_max = R.groups(R.int_fake_quant(X, bits, group_size, symmetric), group_size)
    assert np.all(err_out <= np.mean(np.abs(g_x - g_max) ** 2.4, -1) * (1 + 1e-4) + 1e-30)
    np.testing.assert_array_equal(deq, out)


def test_mse_search_reduces_error_on_outliers() -> None:
    """A property that can fail: with an outlier, some clipping beats the full range at 3 bits."""
    x = np.random.default_rng(1).normal(size=(4, 128)).astype(np.float32)
    x[:, 5] = 12.0
    err = lambda y: np.mean(np.abs(np.asarray(y, np.float64) - x) ** 2.4)
    kw = dict(bits=3, group_size=0, symmetric=False)
    assert err(fake_quant(jnp.asarray(x), method="mse", **kw)) < 0.95 * err(fake_quant(jnp.asarray(x), **kw))


def test_degenerate_groups_are_exact() -> None:
    """Constant and all-zero groups come back exactly (asymmetric) and finite (symmetric)."""
    for symmetric in (False, True):
        out = np.asarray(fake_quant(jnp.asarray(X), bits=4, group_size=128, symmetric=symmetric))
        assert np.all(np.isfinite(out))
        np.testing.assert_array_equal(out[2], 0.0)
        if not symmetric:
            np.testing.assert_array_equal(out[0, :128], X[0, :128])
            np.testing.assert_array_equal(out[1], X[1])


@pytest.mark.parametrize("symmetric", [False, True])
def test_clip_ratio_and_include_zero(symmetric: bool) -> None:
    x = jnp.asarray(X)
    out = fake_quant(x, bits=4, group_size=32, symmetric=symmetric, clip_ratio=0.8, include_zero=True)
    ref = R.int_fake_quant(X, 4, 32, symmetric, clip_ratio=0.8, include_zero=True)
    s_ref, _ = R.int_qparams(X, 4, 32, symmetric, clip_ratio=0.8, include_zero=True)
    _check_close(np.asarray(out), ref, s_ref, 32)


def test_include_zero_fixes_one_signed_groups() -> None:
    """Q-DiT's range (no zero) clamps the zero point on a positive-only row; include_zero does not."""
    x = jnp.asarray(X[3:4])
    err = lambda y: float(np.max(np.abs(np.asarray(y) - X[3:4])))
    plain = fake_quant(x, bits=4, group_size=0, symmetric=False)
    widened = fake_quant(x, bits=4, group_size=0, symmetric=False, include_zero=True)
    assert err(widened) < 0.5 * err(plain)


def test_jit_vmap_and_dtypes() -> None:
    x = jnp.asarray(X).reshape(2, 5, WIDTH)
    spec = QuantSpec(bits=4, group_size=32, symmetric=False, method="mse")
    direct = fake_quant_spec(x, spec)
    vmapped = jax.jit(jax.vmap(lambda t: fake_quant(t, bits=4, group_size=32, symmetric=False, method="mse")))(x)
    np.testing.assert_array_equal(np.asarray(direct), np.asarray(vmapped))
    bf = fake_quant(x.astype(jnp.bfloat16), bits=8, group_size=0, symmetric=True)
    assert bf.dtype == jnp.bfloat16 and bf.shape == x.shape


@pytest.mark.parametrize("fmt,group_size", [("fp8_e4m3", 0), ("fp8_e4m3", 32), ("fp8_e5m2", 32)])
def test_fp8_matches_ml_dtypes(fmt: str, group_size: int) -> None:
    ml_dtypes = pytest.importorskip("ml_dtypes")
    dt = {"fp8_e4m3": ml_dtypes.float8_e4m3fn, "fp8_e5m2": ml_dtypes.float8_e5m2}[fmt]
    x = X.copy()
    x[8] = np.random.default_rng(3).normal(size=WIDTH) * 1e4  # large values exercise the top of the range
    ref, scale = R.fp8_fake_quant(x, dt, group_size)
    out = np.asarray(F.fp8_fake_quant(jnp.asarray(x), fmt=fmt, group_size=group_size))
    # XLA may turn the division by the format max into a reciprocal multiply: allow one float32 ulp
    # (fp8 steps are 2^-3 relative or coarser, so a wrong rounding would still fail).
    np.testing.assert_allclose(out, ref, rtol=3e-7, atol=0)
    assert not np.allclose(out, x, rtol=1e-4)  # fp8 actually rounds
    spec = QuantSpec(bits=8, group_size=group_size, symmetric=True, format=fmt)
    np.testing.assert_array_equal(np.asarray(fake_quant_spec(jnp.asarray(x), spec)), out)
    codes, qp = quantize_tensor(jnp.asarray(x), spec)
    assert codes.dtype == jnp.dtype(dt)
    np.testing.assert_allclose(np.asarray(qp.scale), scale, rtol=3e-7)
    np.testing.assert_array_equal(np.asarray(dequantize(codes, qp, group_size)), out)


def test_fp8_clip_is_saturating() -> None:
    """Clipping pushes values past the format's max: they saturate instead of becoming NaN/inf."""
    out = F.fp8_fake_quant(jnp.asarray(X), fmt="fp8_e4m3", group_size=32, clip_ratio=0.5)
    assert np.all(np.isfinite(np.asarray(out)))


@pytest.mark.parametrize("bits", [1, 9, 0, 16])
def test_bad_bits(bits: int) -> None:
    with pytest.raises(QditError, match=r"2\.\.8"):
        fake_quant(jnp.asarray(X), bits=bits, group_size=0, symmetric=False)
    with pytest.raises(QditError, match=r"bit width"):
        QuantSpec(bits=bits)


def test_group_size_must_divide_width() -> None:
    x = jnp.zeros((2, 1152))
    with pytest.raises(QditError, match=r"group_size 100 does not divide the width 1152.*128") as e:
        fake_quant(x, bits=4, group_size=100, symmetric=False)
    assert "\n" not in str(e.value)
    with pytest.raises(QditError, match=r"width 1152"):
        compute_qparams(x, bits=4, group_size=500, symmetric=True)
    with pytest.raises(QditError, match=r"group_size 100 does not divide"):
        fake_quant_spec(x, QuantSpec(bits=4, group_size=100))


def test_spec_validation_and_dict_round_trip() -> None:
    spec = QuantSpec(bits=4, group_size=128, symmetric=True, method="mse", clip_ratio=0.9)
    assert QuantSpec.from_dict(spec.to_dict()) == spec
    assert hash(spec) == hash(QuantSpec.from_dict(spec.to_dict()))
    with pytest.raises(QditError, match="unknown quantization format 'int4'"):
        QuantSpec(bits=4, format="int4")
    with pytest.raises(QditError, match="unknown quantization method"):
        QuantSpec(bits=4, method="percentile")
    with pytest.raises(QditError, match="8-bit format"):
        QuantSpec(bits=4, symmetric=True, format="fp8_e4m3")
    with pytest.raises(QditError, match="symmetric"):
        QuantSpec(bits=8, format="fp8_e5m2")
    with pytest.raises(QditError, match="unknown quantization spec keys"):
        QuantSpec.from_dict({"bits": 4, "gropu_size": 32})
    with pytest.raises(QditError, match="clip_ratio"):
        QuantSpec(bits=4, clip_ratio=1.5)


@pytest.mark.parametrize(
    "spec",
    [QuantSpec(bits=4, group_size=32), QuantSpec(bits=6, group_size=0, symmetric=True, clip_ratio=0.9),
     QuantSpec(bits=8, group_size=32, symmetric=True, format="fp8_e5m2")],
)
def test_static_parameters_from_ranges(spec: QuantSpec) -> None:
    """Ranges (as calibration records them) give the dynamic quantizer's parameters; with shared
    per-group parameters every token is quantized on the same grid."""
    x = jnp.asarray(X)
    xg = R.groups(X, spec.group_size)
    qp = qparams_from_range(xg.min(-1), xg.max(-1), spec)
    dyn = qparams_spec(x, spec)
    np.testing.assert_allclose(np.asarray(qp.scale), np.asarray(dyn.scale), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(qp.zero_point), np.asarray(dyn.zero_point))
    np.testing.assert_array_equal(np.asarray(fake_quant_with(x, dyn, spec)), np.asarray(fake_quant_spec(x, spec)))
    # One shared (n_groups,) set for all rows (the tensor-wide range), against the NumPy formulas.
    if spec.format == "int":
        lo, hi = xg.min((0, -1)), xg.max((0, -1))
        shared = qparams_from_range(lo, hi, spec)
        if spec.symmetric:
            lo, hi = -np.maximum(-lo, hi), np.maximum(-lo, hi)
        s_ref, z_ref = R.int_qparams_from_range(lo * spec.clip_ratio, hi * spec.clip_ratio, spec.bits, spec.symmetric)
        ref = R.int_fake_from_params(xg, np.broadcast_to(s_ref, xg.shape[:-1]), np.broadcast_to(z_ref, xg.shape[:-1]),
                                     spec.bits, spec.symmetric).reshape(X.shape)
        out = np.asarray(fake_quant_with(x, shared, spec))
        _check_close(out, ref, np.broadcast_to(s_ref, xg.shape[:-1]), spec.group_size)


def test_dequantize_rejects_mismatched_qparams() -> None:
    codes = jnp.zeros((2, 64), jnp.uint8)
    qp = QParams(jnp.ones((2, 4)), jnp.zeros((2, 4), jnp.uint8))
    dequantize(codes, qp, 16)
    with pytest.raises(QditError, match="do not match codes"):
        dequantize(codes, qp, 32)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_scales_round_up_to_their_storage_dtype(dtype: str) -> None:
    """Stored scales are exactly representable, never smaller than computed (so nothing clips that
    would not clip in float32) and at most one ulp of the storage dtype larger; the values outside
    the dtype's range clamp to its extremes instead of becoming 0 or inf."""
    from qdit_jax.quant.quantizers import SCALE_DTYPES, round_scale_up

    dt = SCALE_DTYPES[dtype]
    s = jnp.asarray(np.exp(np.random.default_rng(0).uniform(-16, 8, 4000)), jnp.float32)
    r = np.asarray(round_scale_up(s, dtype), np.float64)
    s64 = np.asarray(s, np.float64)
    assert np.array_equal(np.asarray(jnp.asarray(r, jnp.float32).astype(dt).astype(jnp.float32)), r.astype(np.float32))
    assert (r >= s64).all()
    fi = jnp.finfo(dt)
    normal = s64 >= float(fi.tiny)
    assert (r[normal] <= s64[normal] * (1 + 2 * float(fi.eps))).all()
    floor = max(float(fi.smallest_subnormal), float(jnp.finfo(jnp.float32).tiny))  # float16: 2**-24
    below = np.float32(floor / 4) if floor / 4 >= float(jnp.finfo(jnp.float32).tiny) else np.float32(0)
    assert float(round_scale_up(jnp.asarray([below, 1e-45], jnp.float32), dtype)[0]) == floor
    if dtype == "float16":  # float16 tops out at 65504
        assert float(round_scale_up(jnp.asarray([1e30], jnp.float32), dtype)[0]) == float(fi.max)


def test_float16_scales_quantize_within_half_a_step() -> None:
    """A spec with float16 scales: the scales are float16 values, no smaller than float32's, and every
    value reconstructs within half a (stored) step: rounding the scale up never clips."""
    from qdit_jax.quant.quantizers import fake_of_groups, params_of_groups

    x = jnp.asarray(np.random.default_rng(1).standard_normal((16, 256)) * 0.02, jnp.float32)
    spec = QuantSpec(bits=8, group_size=128, symmetric=True, scale_dtype="float16")
    xg = x.reshape(16, 2, 128)
    scale, zp = params_of_groups(xg, spec)
    assert np.array_equal(np.asarray(scale.astype(jnp.float16).astype(jnp.float32)), np.asarray(scale))
    ref_scale, _ = params_of_groups(xg, QuantSpec(bits=8, group_size=128, symmetric=True))
    assert (np.asarray(scale) >= np.asarray(ref_scale)).all() and not np.array_equal(scale, ref_scale)
    fq = fake_of_groups(xg, scale, zp, spec)
    assert (np.abs(np.asarray(fq - xg)) <= 0.5 * np.asarray(scale)[..., None] * (1 + 1e-6)).all()
    with pytest.raises(QditError, match="scale_dtype"):
        QuantSpec(bits=8, scale_dtype="float8")
