"""The MLP-middle kernel (fc1's scale epilogue + tanh GELU + fc2's per-token quantization; Pallas
interpret mode on CPU) against the XLA formulation and a float64 NumPy version of the same steps."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from qdit_jax.quant.kernels.gelu_quant import gelu_quant_applies, gelu_quant_pallas, gelu_quant_xla
from qdit_jax.quant.quantizers import QuantSpec

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


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("name", sorted(SPECS))
def test_kernel_matches_float64_reference_in_bfloat16(name, fast):
    """bf16 layer: the epilogue and GELU each rounded to bf16 once (the model's dtype), scales and codes
    from float64 NumPy; the kernel's float32 GELU (exact or the exp form) may move a value across a
    bf16 rounding boundary, so a few codes may differ by one step."""
    spec = SPECS[name]
    p, sa, sw, b = _inputs(seed=1)
    p = p.astype(jnp.bfloat16)
    q, s = gelu_quant_pallas(p, sa, sw, b, spec, jnp.bfloat16, fast=fast, interpret=True)

    def bf(v):
        return np.asarray(jnp.asarray(v, jnp.float32).astype(jnp.bfloat16).astype(jnp.float32), np.float64)

    y = bf(np.asarray(p, np.float64) * np.asarray(sa, np.float64)[0][:, None] * np.asarray(sw, np.float64)
           + np.asarray(b, np.float64))
    h = bf(0.5 * y * (1 + np.tanh(np.sqrt(2 / np.pi) * (y + 0.044715 * y ** 3))))
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
