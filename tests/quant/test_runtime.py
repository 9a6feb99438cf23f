"""Float params stored in the compute dtype: bit-exact in every execution mode, and really cast."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qdit_jax.models.dit import DiTConfig, param_shapes
from qdit_jax.quant.config import QuantConfig, qdit_rules
from qdit_jax.quant.quantize import quantize_model
from qdit_jax.quant.real import real_from_params
from qdit_jax.quant.runtime import with_compute_params

CFG = DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=2, num_classes=10,
                dtype="bfloat16")
RULES = dict(wbits=8, abits=8, w_group=32, a_group=32, w_sym=True, a_sym=True)


@pytest.fixture(scope="module")
def setup():
    r = np.random.default_rng(5)
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(0.05 * r.standard_normal(a.shape), jnp.float32),
                                    param_shapes(CFG))
    x = jnp.asarray(r.standard_normal((3, 8, 8, 4)), jnp.float32)
    t, y = jnp.asarray([1, 400, 999], jnp.int32), jnp.asarray([0, 4, 10], jnp.int32)
    return params, (x, t, y)


def _float_dtypes(tree):
    return {str(a.dtype) for a in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(a.dtype, jnp.floating)}


@pytest.mark.parametrize("mode", ["fake", "real"])
def test_compute_dtype_params_are_exact_per_mode(setup, mode):
    params, (x, t, y) = setup
    qcfg = QuantConfig(qdit_rules(**RULES), name="w8a8")
    if mode == "fake":
        qm = quantize_model(params, CFG, qcfg)
        fn, arg = qm.apply_fn(), qm.bundle
    else:
        rm = real_from_params(params, CFG, qcfg)
        fn, arg = rm.apply_fn(), rm.variables()
    cast = with_compute_params(arg, CFG)
    assert _float_dtypes(arg["params"]) == {"float32"} and _float_dtypes(cast["params"]) == {"bfloat16"}
    assert set(cast) == set(arg)  # static scales / quantized weights travel along untouched
    for key in set(arg) - {"params"}:
        assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda a, b: a is b, arg[key], cast[key]))
    run = jax.jit(fn)
    a, b = np.asarray(run(arg, x, t, y)), np.asarray(run(cast, x, t, y))
    assert np.isfinite(a).all() and np.abs(a).max() > 0
    np.testing.assert_array_equal(a, b)


def test_plain_params_and_float32_models_pass_through(setup):
    params, _ = setup
    assert _float_dtypes(with_compute_params(params, CFG)) == {"bfloat16"}
    assert with_compute_params(params, CFG.replace(dtype="float32")) is params
