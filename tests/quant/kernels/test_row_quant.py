"""The row kernels' shared code arithmetic (``kernels.row_quant``): ``int8_codes`` against ``jnp.round`` and
a float64 NumPy rounding, on every kind of value a code can come from (ties included), evaluated by XLA on
the CPU (XLA on the GPU miscompiles it: ``int8_codes``' docstring), and which kernel bodies take it."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qdit_jax.quant.config import QuantSpec
from qdit_jax.quant.kernels.gelu_quant import gelu_quant_pallas
from qdit_jax.quant.kernels.norm_quant import norm_quant_pallas
from qdit_jax.quant.kernels.row_quant import int8_codes, scale_and_codes

CPU = jax.devices("cpu")[0]


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
    got = np.asarray(jax.jit(int8_codes)(jax.device_put(y, CPU)))
    assert got.dtype == np.int8
    np.testing.assert_array_equal(got, np.asarray(jnp.round(jnp.asarray(y))).astype(np.int8))
    np.testing.assert_array_equal(got, np.rint(y.astype(np.float64)).astype(np.int8))  # rint: half to even
    assert np.asarray(int8_codes(jax.device_put(np.float32([2.5, -2.5, 3.5, -0.5]), CPU))).tolist() == [2, -2, 4, 0]


def test_int8_codes_wrap_outside_the_code_range():
    """The add only rounds; out of range the low byte wraps (200 -> -56, -300 -> -44: callers keep y in
    range), so the property above is the arithmetic's, not a saturating conversion's."""
    got = np.asarray(int8_codes(jax.device_put(np.float32([200.0, -300.0]), CPU)))
    assert got.tolist() == [-56, -44]


@pytest.mark.parametrize("bits", [8, 4])
def test_add_rounding_gives_the_quantizers_codes(bits):
    """scale_and_codes with the add (compiled kernels) and with round + convert (interpreted ones): the same
    scales and codes, outliers clipped alike."""
    r = np.random.default_rng(bits)
    h = [jax.device_put(np.float32(r.standard_normal((8, 128)) * 3), CPU) for _ in range(2)]
    h[0] = h[0].at[0, 0].set(40.0)  # a row's maximum far above the rest
    amax = jnp.max(jnp.maximum(jnp.abs(h[0]), jnp.abs(h[1])), axis=1)
    spec = QuantSpec(bits=bits, group_size=0, symmetric=True)
    s0, c0 = jax.jit(lambda *a: scale_and_codes(list(a), amax, spec))(*h)
    s1, c1 = jax.jit(lambda *a: scale_and_codes(list(a), amax, spec, add_round=True))(*h)
    np.testing.assert_array_equal(np.asarray(s0), np.asarray(s1))
    for a, b in zip(c0, c1):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(np.abs(np.asarray(c1[0])).max()) == 2 ** (bits - 1) - 1


def test_row_kernels_take_the_add_only_when_compiled():
    """XLA evaluates an interpreted kernel body, and XLA on the GPU miscompiles the add: interpret mode
    must round with round + convert (floor here) and the compiled bodies with the add (its bitcast)."""
    spec = QuantSpec(bits=8, group_size=128, symmetric=True)
    x, y = jax.ShapeDtypeStruct((256, 1152), jnp.bfloat16), jax.ShapeDtypeStruct((256, 4608), jnp.bfloat16)
    for interpret in (False, True):
        bodies = (str(jax.make_jaxpr(lambda v: norm_quant_pallas(v, spec, interpret=interpret))(x)),
                  str(jax.make_jaxpr(lambda v: gelu_quant_pallas(v, None, None, None, spec, jnp.bfloat16,
                                                                 interpret=interpret))(y)))
        for text in bodies:
            assert ("bitcast_convert_type" in text) != interpret
            assert ("floor" in text) == interpret
