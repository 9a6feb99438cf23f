"""The per-token quantization kernel (optionally with the adaLN LayerNorm + modulation before it;
Pallas interpret mode on CPU) against the XLA formulation and a float64 NumPy version of the same steps."""
from __future__ import annotations

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from qdit_jax.quant.kernels.norm_quant import norm_quant_applies, norm_quant_pallas, norm_quant_xla
from qdit_jax.quant.quantizers import QuantSpec
from tests.quant.kernels import CPU_NUMERICS

SPECS = {"int8": QuantSpec(bits=8, group_size=0, symmetric=True),
         "fp8": QuantSpec(bits=8, format="fp8_e4m3", group_size=0, symmetric=True)}
B, T, K = 2, 4, 384


def _inputs(dtype, seed: int = 0):
    r = np.random.default_rng(seed)
    x = r.standard_normal((B * T, K)) * 3 + r.standard_normal(K)  # per-channel offsets, as a residual stream
    shift, scale = r.standard_normal((B, K)) * 0.3, r.standard_normal((B, K)) * 0.3
    return tuple(jnp.asarray(a, dtype) for a in (x, shift, scale))


def _f64(a) -> np.ndarray:
    return np.asarray(jnp.asarray(a).astype(jnp.float32), np.float64)


@CPU_NUMERICS
@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("name", sorted(SPECS))
def test_kernel_equals_xla(name, dtype, norm):
    """Codes and scales as the unfused path computes them; with the LayerNorm the sums run in another
    order, so a normalized value may move by an ulp: scales within that, nearly all codes equal and
    the rest one step apart."""
    spec = SPECS[name]
    x, shift, scale = _inputs(dtype)
    kw = dict(shift=shift, scale=scale, tokens=T) if norm else {}
    q, s = norm_quant_pallas(x, spec, chunk=128, interpret=True, **kw)
    q0, s0 = norm_quant_xla(x, spec, **kw)
    assert q.dtype == q0.dtype and q.shape == (B * T, K) and s.shape == s0.shape == (1, B * T)
    np.testing.assert_allclose(np.asarray(s), np.asarray(s0), rtol=1e-6 if dtype == jnp.float32 else 2 ** -7)
    got, want = _f64(q), _f64(q0)
    assert np.mean(got == want) > 0.999
    assert np.all(np.abs(got - want) <= np.maximum(np.abs(want) * 2 ** -3, 1.0))
    assert np.abs(got).max(axis=1).min() >= (127 if name == "int8" else 448)  # each row reaches the top code


@CPU_NUMERICS
@pytest.mark.parametrize("block_m,chunk", [(1, 128), (2, 64), (4, 128)])
@pytest.mark.parametrize("name", sorted(SPECS))
def test_norm_matches_float64_reference_in_bfloat16(name, block_m, chunk):
    """bf16 model, against float64 NumPy: LayerNorm (no affine, eps 1e-6) rounded to bf16, then
    ``x * (1 + scale) + shift`` with each step rounded to bf16, then the per-token scale and codes."""
    spec = SPECS[name]
    x, shift, scale = _inputs(jnp.bfloat16, seed=1)
    q, s = norm_quant_pallas(x, spec, shift=shift, scale=scale, tokens=T, block_m=block_m, chunk=chunk,
                             interpret=True)

    def bf(v: np.ndarray) -> np.ndarray:
        return v.astype(ml_dtypes.bfloat16).astype(np.float64)

    xv, sh, sc = (_f64(a) for a in (x, shift, scale))
    mean = xv.mean(axis=1, keepdims=True)
    var = ((xv - mean) ** 2).mean(axis=1, keepdims=True)
    y = bf((xv - mean) / np.sqrt(var + 1e-6))
    sh, sc = np.repeat(sh, T, axis=0), np.repeat(sc, T, axis=0)
    y = bf(bf(y * bf(1 + sc)) + sh)
    amax = np.abs(y).max(axis=1)
    want_s = amax / (127.0 if name == "int8" else 448.0)
    np.testing.assert_allclose(np.asarray(s)[0], want_s, rtol=2 ** -7)
    ratio = y / want_s[:, None]
    want = np.clip(np.round(ratio), -128, 127) if name == "int8" else _f64(jnp.asarray(ratio, jnp.float8_e4m3fn))
    got = _f64(q)
    assert np.mean(got == want) > 0.99
    assert np.all(np.abs(got - want) <= np.maximum(np.abs(want) * 2 ** -3, 1.0))


def test_guard_names_why():
    fp8 = SPECS["fp8"]
    assert norm_quant_applies(65536, 1152, fp8, jnp.bfloat16, tokens=256, platform="gpu") == (True, "ok")
    assert "GPU-only" in norm_quant_applies(64, 1152, fp8, jnp.bfloat16, platform="cpu")[1]
    assert "multiple" in norm_quant_applies(64, 1000, fp8, jnp.bfloat16, platform="gpu")[1]
    assert "tokens" in norm_quant_applies(64, 1152, fp8, jnp.bfloat16, tokens=6, block_m=4, platform="gpu")[1]
    assert "dtype" in norm_quant_applies(64, 1152, fp8, jnp.int32, platform="gpu")[1]
    asym = QuantSpec(bits=8, group_size=0, symmetric=False)
    assert "symmetric" in norm_quant_applies(64, 1152, asym, jnp.bfloat16, platform="gpu")[1]
    int4 = QuantSpec(bits=4, group_size=0, symmetric=True)
    assert "4 bits" in norm_quant_applies(64, 1152, int4, jnp.bfloat16, platform="gpu")[1]


def test_mismatched_modulation_is_rejected():
    x, shift, scale = _inputs(jnp.float32)
    with pytest.raises(ValueError, match="B \\* tokens"):
        norm_quant_pallas(x, SPECS["int8"], shift=shift, scale=scale, tokens=T + 1, interpret=True)


@CPU_NUMERICS
@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("name", sorted(SPECS))
def test_group_scales(name, norm):
    """A group-wise spec (128 channels): scales (K // 128, M), each its own group's abs-max, codes as
    the XLA formulation computes them."""
    spec = QuantSpec(bits=8, format=SPECS[name].format, group_size=128, symmetric=True)
    x, shift, scale = _inputs(jnp.bfloat16, seed=2)
    x = x * jnp.asarray(np.array([0.25, 1.0, 4.0]).repeat(128), jnp.bfloat16)  # groups of unequal range
    kw = dict(shift=shift, scale=scale, tokens=T) if norm else {}
    assert norm_quant_applies(B * T, K, spec, jnp.bfloat16, platform="gpu", **({"tokens": T} if norm else {}))[0]
    q, s = norm_quant_pallas(x, spec, interpret=True, **kw)
    q0, s0 = norm_quant_xla(x, spec, **kw)
    assert s.shape == s0.shape == (K // 128, B * T)
    np.testing.assert_allclose(np.asarray(s), np.asarray(s0), rtol=2 ** -7)
    got, want = _f64(q), _f64(q0)
    assert np.mean(got == want) > 0.99
    assert np.all(np.abs(got - want) <= np.maximum(np.abs(want) * 2 ** -3, 1.0))
    assert np.abs(got.reshape(B * T, K // 128, 128)).max(axis=2).min() >= (127 if name == "int8" else 448)
    if not norm:  # each group's scale is its own abs-max
        amax = np.abs(_f64(x).reshape(B * T, K // 128, 128)).max(axis=2).T
        np.testing.assert_allclose(np.asarray(s), amax / (127 if name == "int8" else 448), rtol=1e-6)
    g96 = QuantSpec(bits=8, group_size=96, symmetric=True)
    assert "pieces" in norm_quant_applies(B * T, K, g96, jnp.bfloat16, platform="gpu")[1]
