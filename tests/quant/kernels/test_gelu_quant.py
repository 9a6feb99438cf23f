"""The MLP-middle kernel (fc1's scale epilogue + tanh GELU + fc2's per-token quantization; Pallas
interpret mode on CPU) against the XLA formulation and a float64 NumPy version of the same steps."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qdit_jax.quant.kernels.gelu_quant import gelu_quant_applies, gelu_quant_pallas, gelu_quant_xla
from qdit_jax.quant.quantizers import QuantSpec
from tests.quant.kernels import CPU_NUMERICS

SPECS = {"int8": QuantSpec(bits=8, group_size=0, symmetric=True),
         "fp8": QuantSpec(bits=8, format="fp8_e4m3", group_size=0, symmetric=True)}


def _inputs(m: int = 8, n: int = 1024, seed: int = 0):
    r = np.random.default_rng(seed)
    p = jnp.asarray(r.standard_normal((m, n)) * 100, jnp.float32)
    sa = jnp.asarray(r.uniform(0.005, 0.02, (1, m)), jnp.float32)
    sw = jnp.asarray(r.uniform(0.5, 1.5, (1, n)), jnp.float32)
    b = jnp.asarray(r.standard_normal(n) * 0.1, jnp.float32)
    return p, sa, sw, b


def _codes(q) -> np.ndarray:
    return np.asarray(jnp.asarray(q).astype(jnp.float32), np.float64)


@CPU_NUMERICS
@pytest.mark.parametrize("name", sorted(SPECS))
def test_kernel_equals_xla_in_float32(name):
    """With a float32 layer output neither rounds in between: scales equal to float32 rounding (XLA's
    fused tanh may differ by an ulp from the one evaluated op by op), codes equal but for values that
    such an ulp moves across a rounding boundary."""
    spec = SPECS[name]
    args = _inputs()
    q, s = gelu_quant_pallas(*args, spec, jnp.float32, interpret=True)
    q0, s0 = gelu_quant_xla(*args, spec, jnp.float32)
    assert q.dtype == q0.dtype and s.shape == s0.shape == (1, 8)
    np.testing.assert_allclose(np.asarray(s), np.asarray(s0), rtol=1e-6)
    got, want = _codes(q), _codes(q0)
    assert np.mean(got == want) > 0.999
    assert np.all(np.abs(got - want) <= np.maximum(np.abs(want) * 2 ** -3, 1.0))
    assert np.abs(_codes(q)).max() >= (127 if name == "int8" else 448)  # each row's max reaches the top code


@CPU_NUMERICS
@pytest.mark.parametrize("fast,recompute,block_m,gelu", [(False, False, 1, "dtype"), (True, False, 1, "dtype"),
                                                        (False, True, 4, "dtype"), (False, False, 1, "float32")])
@pytest.mark.parametrize("name", sorted(SPECS))
def test_kernel_matches_float64_reference_in_bfloat16(name, fast, recompute, block_m, gelu):
    """bf16 layer, against float64 NumPy: the epilogue rounded to bf16, then the GELU as
    ``jax.nn.gelu`` defines it on a bf16 array (bf16 constants, every step rounded to bf16: mode
    'dtype', the default) or in float (mode 'float32', rounded once), then scales and codes. Float32
    against float64 arithmetic may move a value across a bf16 rounding boundary: a few codes may
    differ by one step."""
    spec = SPECS[name]
    p, sa, sw, b = _inputs(seed=1)
    p = p.astype(jnp.bfloat16)
    q, s = gelu_quant_pallas(p, sa, sw, b, spec, jnp.bfloat16, fast=fast, recompute=recompute, block_m=block_m,
                             gelu=gelu, interpret=True)

    def bf(v):
        return np.asarray(jnp.asarray(v, jnp.float32).astype(jnp.bfloat16).astype(jnp.float32), np.float64)

    y = bf(np.asarray(p, np.float64) * np.asarray(sa, np.float64)[0][:, None] * np.asarray(sw, np.float64)
           + np.asarray(b, np.float64))
    if gelu == "dtype":
        r, c1, c2 = bf, bf(np.sqrt(2 / np.pi)), bf(0.044715)
    else:
        r, c1, c2 = (lambda v: v), np.sqrt(2 / np.pi), 0.044715
    u = r(r(y + r(r(r(y * y) * y) * c2)) * c1)
    h = bf(r(y * r(r(r(np.tanh(u)) + 1.0) * 0.5)))
    amax = np.abs(h).max(axis=1)
    if name == "int8":
        s_ref = amax / 127
        q_ref = np.clip(np.round(h / s_ref[:, None]), -128, 127)
        step = np.ones_like(q_ref)
    else:
        s_ref = amax / 448
        q_ref = _codes(jnp.asarray(np.clip(h / s_ref[:, None], -448, 448), jnp.float32).astype(jnp.float8_e4m3fn))
        step = np.maximum(np.abs(q_ref) * 2 ** -3, 2 ** -9)  # an e4m3 step at the code's magnitude
    np.testing.assert_allclose(np.asarray(s)[0], s_ref, rtol=1e-6)
    got = _codes(q)
    assert np.mean(got == q_ref) > 0.99
    assert np.all(np.abs(got - q_ref) <= step * 1.0001)


@CPU_NUMERICS
def test_gelu_modes_differ_and_dtype_mode_is_jax_gelu():
    """Mode 'dtype' is ``jax.nn.gelu(approximate=True)`` on a bf16 array, value for value; 'float32'
    is a different function of the same inputs (bf16 constants and roundings matter)."""
    from qdit_jax.quant.kernels.gelu_quant import _gelu

    y = jnp.asarray(np.random.default_rng(0).standard_normal(4096) * 2, jnp.bfloat16)
    want = np.asarray(jax.nn.gelu(y, approximate=True).astype(jnp.float32))
    got = {m: np.asarray(_gelu(y.astype(jnp.float32), jnp.bfloat16, m, False).astype(jnp.bfloat16)
                         .astype(jnp.float32)) for m in ("dtype", "float32")}
    np.testing.assert_array_equal(got["dtype"], want)
    assert np.mean(got["float32"] != want) > 0.1
    with pytest.raises(ValueError, match="gelu mode"):
        _gelu(y.astype(jnp.float32), jnp.bfloat16, "bf16", False)


def test_guard_names_why():
    xl2_fc2 = (65536, 4608)
    assert not gelu_quant_applies(*xl2_fc2, SPECS["int8"], platform="cpu")[0]
    assert gelu_quant_applies(*xl2_fc2, SPECS["fp8"], platform="gpu")[0]
    ok, why = gelu_quant_applies(65536, 4600, SPECS["int8"], platform="gpu")
    assert not ok and "4600" in why
    ok, why = gelu_quant_applies(*xl2_fc2, QuantSpec(bits=4, group_size=0, symmetric=True), platform="gpu")
    assert not ok and "4 bits" in why
    ok, why = gelu_quant_applies(*xl2_fc2, QuantSpec(bits=8, group_size=0, symmetric=False), platform="gpu")
    assert not ok and "symmetric" in why


@CPU_NUMERICS
@pytest.mark.parametrize("name", sorted(SPECS))
def test_group_codes_from_the_layer_output(name):
    """A group-wise fc2 input from a group-wise fc1's bf16 output (``sa`` None: no epilogue): the
    GELU, then one scale per token and 128 channels; against the XLA formulation, and each group's
    scale is that group's own abs-max (not the row's)."""
    spec = QuantSpec(bits=8, format=SPECS[name].format, group_size=128, symmetric=True)
    r = np.random.default_rng(4)
    y = r.standard_normal((8, 512)) * np.array([0.5, 2.0, 8.0, 1.0]).repeat(128)[None, :]  # groups of unequal range
    y = jnp.asarray(y, jnp.bfloat16)
    assert gelu_quant_applies(8, 512, spec, platform="gpu") == (True, "ok")
    q, s = gelu_quant_pallas(y, None, None, None, spec, jnp.bfloat16, interpret=True)
    q0, s0 = gelu_quant_xla(y, None, None, None, spec, jnp.bfloat16)
    assert s.shape == s0.shape == (4, 8)
    np.testing.assert_allclose(np.asarray(s), np.asarray(s0), rtol=2 ** -7)
    h = np.asarray(jax.nn.gelu(y, approximate=True).astype(jnp.float32), np.float64)
    amax = np.abs(h.reshape(8, 4, 128)).max(axis=2).T
    np.testing.assert_allclose(np.asarray(s), amax / (127 if name == "int8" else 448), rtol=2 ** -7)
    got, want = _codes(q), _codes(q0)
    assert np.mean(got == want) > 0.99
    assert np.all(np.abs(got - want) <= np.maximum(np.abs(want) * 2 ** -3, 1.0))


def test_group_guard():
    g128 = QuantSpec(bits=8, group_size=128, symmetric=True)
    assert gelu_quant_applies(64, 4608, g128, platform="gpu") == (True, "ok")
    g96 = QuantSpec(bits=8, group_size=96, symmetric=True)
    assert not gelu_quant_applies(64, 4608, g96, platform="gpu")[0]
