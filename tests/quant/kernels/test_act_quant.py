"""The one-pass activation quantization kernel (Pallas interpret mode on CPU) against the XLA path
the real mode uses (``quant.real.quantize_act``, the fake-quant mode's scale math)."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from qdit_jax.quant.kernels.act_quant import quant_applies, quantize_rows_pallas
from qdit_jax.quant.quantizers import QuantSpec
from qdit_jax.quant.real import quantize_act


@pytest.mark.parametrize("group,bits,dtype", [(256, 8, jnp.bfloat16), (128, 8, jnp.float32), (128, 4, jnp.float32)])
def test_kernel_equals_xla_quantize(group, bits, dtype):
    rng = np.random.default_rng(group + bits)
    x = rng.standard_normal((64, 256)) * rng.lognormal(0, 1, (1, 256))  # outlier channels, as in DiT
    x[3] = 0.0  # an all-zero row: scale 1, codes 0
    x = jnp.asarray(x, dtype)
    spec = QuantSpec(bits=bits, group_size=0 if group == 256 else group, symmetric=True)
    q_ref, s_ref = quantize_act(x, spec, group)
    q, s = quantize_rows_pallas(x, group, bits, interpret=True)
    np.testing.assert_array_equal(np.asarray(s), np.asarray(s_ref))
    np.testing.assert_array_equal(np.asarray(q), np.asarray(q_ref))
    assert np.abs(np.asarray(q)).max() >= 2 ** (bits - 1) - 1  # the range is used, the test is not vacuous


def test_guard_names_why():
    assert not quant_applies(64, 256, 128, 8, jnp.bfloat16, platform="cpu")[0]
    ok, why = quant_applies(60, 256, 128, 8, jnp.bfloat16, platform="gpu")
    assert not ok and "block_m" in why
    ok, why = quant_applies(64, 256, 96, 8, jnp.bfloat16, platform="gpu")
    assert not ok and "group 96" in why
    assert quant_applies(65536, 1152, 1152, 8, jnp.bfloat16, platform="gpu")[0]  # XL/2 fc1, per token
    assert quant_applies(65536, 4608, 128, 8, jnp.bfloat16, platform="gpu")[0]  # XL/2 fc2, group 128
