"""Real low-bit execution: equals the fake-quant mode on the same codes and scales; quantized layers'
dot_generals take int8 / fp8 operands; unsupported plans fail with a clear error."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qdit_jax.errors import QditError
from qdit_jax.models.dit import DiTConfig, param_shapes
from qdit_jax.quant.config import QuantConfig, qdit_rules
from qdit_jax.quant.quantize import quantize_model
from qdit_jax.quant.real import build_real, checkpoint_bytes, real_from_params

CFG = DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=1, num_heads=2, num_classes=10)

FORMATS = {
    "w8a8-int8-perchannel-asymw": dict(wbits=8, abits=8, w_group=0, a_group=0, w_sym=False, a_sym=True),
    "w4a8-packed-g32": dict(wbits=4, abits=8, w_group=32, a_group=32, w_sym=True, a_sym=True),
    "w4a8-packed-g32w-pertoken-asymw": dict(wbits=4, abits=8, w_group=32, a_group=0, w_sym=False, a_sym=True),
    "fp8-e4m3-perchannel": dict(wbits=8, abits=8, w_group=0, a_group=0, w_sym=True, a_sym=True, fmt="fp8_e4m3"),
    "fp8-e4m3-g32": dict(wbits=8, abits=8, w_group=32, a_group=32, w_sym=True, a_sym=True, fmt="fp8_e4m3"),
}


@pytest.fixture(scope="module")
def params():
    shapes = param_shapes(CFG)  # every weight random (numpy: no per-shape compiles)
    r = np.random.default_rng(1)
    return jax.tree_util.tree_map(lambda a: jnp.asarray(0.05 * r.standard_normal(a.shape), jnp.float32), shapes)


@pytest.fixture(scope="module")
def inputs():
    r = np.random.default_rng(0)
    return (jnp.asarray(r.standard_normal((2, 8, 8, 4)), jnp.float32), jnp.asarray([10, 500], jnp.int32),
            jnp.asarray([1, 3], jnp.int32))


def _dot_operand_dtypes(jaxpr) -> list[tuple[str, str]]:
    """dtypes of every dot_general's operands, recursing into sub-jaxprs (pjit, scan, custom calls)."""
    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            out.append(tuple(str(v.aval.dtype) for v in eqn.invars))
        for val in eqn.params.values():
            for sub in (val if isinstance(val, (list, tuple)) else [val]):
                inner = getattr(sub, "jaxpr", None)
                if inner is not None and hasattr(inner, "eqns"):
                    out += _dot_operand_dtypes(inner)
                elif hasattr(sub, "eqns"):
                    out += _dot_operand_dtypes(sub)
    return out


@pytest.mark.parametrize("name", list(FORMATS))
def test_real_equals_fake_on_same_codes(name, params, inputs):
    qm = quantize_model(params, CFG, QuantConfig(qdit_rules(**FORMATS[name])))
    fake = np.asarray(jax.jit(qm.apply_fn())(qm.bundle, *inputs), np.float64)
    rm = build_real(qm)
    real = np.asarray(jax.jit(rm.apply_fn())(rm.variables(), *inputs), np.float64)
    err = np.linalg.norm(real - fake) / np.linalg.norm(fake)
    assert np.all(np.isfinite(real)) and err < 1e-4, err
    # and the quantization mattered: the FP model differs by far more than the accumulation error
    from qdit_jax.models.dit import DiT

    fp = np.asarray(DiT(CFG).apply({"params": params}, *inputs), np.float64)
    assert np.linalg.norm(fp - fake) / np.linalg.norm(fake) > 10 * err


@pytest.mark.parametrize("name,want", [("w8a8-int8-perchannel-asymw", "int8"), ("w4a8-packed-g32", "int8"),
                                       ("fp8-e4m3-g32", "float8_e4m3fn")])
def test_quantized_dots_take_low_bit_operands(name, want, params, inputs):
    rm = real_from_params(params, CFG, QuantConfig(qdit_rules(**FORMATS[name])))
    jaxpr = jax.make_jaxpr(rm.apply_fn())(rm.variables(), *inputs)
    dtypes = _dot_operand_dtypes(jaxpr.jaxpr)
    n_wa = sum(1 for lq in rm.plan.values() if lq.weight is not None and lq.act is not None)
    assert n_wa == 4 * CFG.depth
    low = [d for d in dtypes if d == (want, want)]
    assert len(low) == n_wa, dtypes
    # the planned layers' float kernels are gone from the params: nothing but codes can feed them
    from qdit_jax.quant.interceptor import get_kernel

    for path in rm.weights:
        with pytest.raises(QditError):
            get_kernel(rm.variables()["params"], path)


def test_packed_storage_is_smaller(params):
    r8 = real_from_params(params, CFG, QuantConfig(qdit_rules(**FORMATS["w8a8-int8-perchannel-asymw"])))
    r4 = real_from_params(params, CFG, QuantConfig(qdit_rules(**FORMATS["w4a8-packed-g32"])))
    b8, b4 = r8.weight_bytes(), r4.weight_bytes()
    assert b8["quantized"] < 0.3 * b8["fp32"] and b4["quantized"] < 0.6 * b8["quantized"]
    assert all(w.codes.dtype == jnp.uint8 for w in r4.weights.values())
    assert checkpoint_bytes(r4.variables()) < checkpoint_bytes(r8.variables()) < checkpoint_bytes(params)


def test_asymmetric_activations_are_rejected(params):
    qc = QuantConfig(qdit_rules(8, 8, w_group=0, a_group=0, a_sym=False))
    with pytest.raises(QditError, match="symmetric activation"):
        real_from_params(params, CFG, qc)


def test_non_nesting_groups_are_rejected():
    from qdit_jax.quant.config import LayerQuant
    from qdit_jax.quant.quantizers import QuantSpec
    from qdit_jax.quant.real import effective_group

    lq = LayerQuant(QuantSpec(bits=8, group_size=32, symmetric=True), QuantSpec(bits=8, group_size=48, symmetric=True))
    with pytest.raises(QditError, match="nest"):
        effective_group(lq, 96)
    lq = LayerQuant(QuantSpec(bits=8, group_size=32, symmetric=True), QuantSpec(bits=8, group_size=0, symmetric=True))
    assert effective_group(lq, 96) == 32


def test_materialized_codes_compute_the_same_function(params, inputs):
    """The optimization barrier (codes materialized before the XLA GEMM) changes scheduling only."""
    from qdit_jax.quant.real import RealOptions

    rm = real_from_params(params, CFG, QuantConfig(qdit_rules(**FORMATS["w8a8-int8-perchannel-asymw"])))
    plain = jax.jit(rm.apply_fn(RealOptions(backend="xla")))(rm.variables(), *inputs)
    mat_fn = rm.apply_fn(RealOptions(backend="xla", materialize=True))
    mat = jax.jit(mat_fn)(rm.variables(), *inputs)
    np.testing.assert_allclose(np.asarray(mat), np.asarray(plain), rtol=1e-6, atol=1e-6)
    text = str(jax.make_jaxpr(mat_fn)(rm.variables(), *inputs))
    assert "optimization_barrier" in text


@pytest.mark.parametrize("name", ["w8a8-int8-perchannel-asymw", "w4a8-packed-g32w-pertoken-asymw"])
def test_quant_kernel_route_gives_the_same_outputs(name, params, inputs, monkeypatch):
    """RealOptions(quant_kernel=True) routed through the one-pass kernel (interpret mode, guard
    forced open as on a GPU) computes the same model output as the XLA quantize path."""
    from qdit_jax.quant.kernels import act_quant
    from qdit_jax.quant.real import RealOptions

    calls = []

    def interp(x, group, bits=8, **kw):
        calls.append((x.shape, group))
        return original(x, group, bits, block_m=2, chunk=32, interpret=True)

    original = act_quant.quantize_rows_pallas
    monkeypatch.setattr(act_quant, "quant_applies", lambda m, k, g, b, d, **kw: (m % 2 == 0 and g % 32 == 0, "test"))
    monkeypatch.setattr(act_quant, "quantize_rows_pallas", interp)
    rm = real_from_params(params, CFG, QuantConfig(qdit_rules(**FORMATS[name])))
    ref = jax.jit(rm.apply_fn(RealOptions(backend="xla")))(rm.variables(), *inputs)
    got = jax.jit(rm.apply_fn(RealOptions(backend="xla", quant_kernel=True)))(rm.variables(), *inputs)
    assert calls, "the kernel route was not taken"
    np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
