"""The row kernels' shared code arithmetic (``kernels.row_quant``): ``int8_codes`` against ``jnp.round`` and
a float64 NumPy rounding, on every kind of value a code can come from (ties included)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from qdit_jax.quant.kernels.row_quant import int8_codes


def _values() -> np.ndarray:
    rng = np.random.default_rng(0)
    ties = np.arange(-128, 128, dtype=np.float64) + 0.5  # halfway cases: to even
    steps = np.arange(-128, 128, dtype=np.float64)
    near = np.array([np.nextafter(np.float32(v), np.float32(lim)) for v in ties for lim in (-1e9, 1e9)])
    rand = rng.uniform(-128, 127, 100_000)
    tiny = rng.standard_normal(10_000) * 1e-6
    return np.concatenate([ties, steps, near, rand, tiny, [0.0, -0.0, 127.0, -128.0]]).astype(np.float32)


def test_int8_codes_round_half_to_even_like_jnp_round():
    y = _values()
    y = y[(y >= -128) & (y <= 127)]
    got = np.asarray(jax.jit(int8_codes)(jnp.asarray(y)))
    assert got.dtype == np.int8
    np.testing.assert_array_equal(got, np.asarray(jnp.round(jnp.asarray(y))).astype(np.int8))
    np.testing.assert_array_equal(got, np.rint(y.astype(np.float64)).astype(np.int8))  # rint: half to even
    assert np.asarray(int8_codes(jnp.asarray([2.5, -2.5, 3.5, -0.5], jnp.float32))).tolist() == [2, -2, 4, 0]


def test_int8_codes_wrap_outside_the_code_range():
    """The add only rounds; out of range the low byte wraps (200 -> -56, -300 -> -44: callers keep y in
    range), so the property above is the arithmetic's, not a saturating conversion's."""
    got = np.asarray(int8_codes(jnp.asarray([200.0, -300.0], jnp.float32)))
    assert got.tolist() == [-56, -44]
