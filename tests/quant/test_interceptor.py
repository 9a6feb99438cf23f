"""The interceptor quantizes exactly the planned layers, dynamically per sample and timestep."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qdit_jax.diffusion.pipeline import dit_apply_fn
from qdit_jax.errors import QditError
from qdit_jax.models.dit import DiT, dit_config
from qdit_jax.quant.config import LayerQuant, QuantConfig, QuantRule, preset, resolve
from qdit_jax.quant.interceptor import discover_layers, make_bundle, quantized, quantized_apply_fn
from qdit_jax.quant.quantizers import QuantSpec, fake_quant_spec, qparams_spec

from tests.quant.conftest import inputs

A8 = QuantSpec(bits=8, group_size=32)
W4 = QuantSpec(bits=4, group_size=32)


def _tapped_layers(cfg, params, plan, x, t, y):
    seen = set()

    def tap(path, i, a):
        seen.add(path)

    with quantized(plan, None, tap):
        DiT(cfg).apply({"params": params}, x, t, y)
    return seen


def test_no_matching_rule_leaves_model_untouched(tiny):
    cfg, params = tiny
    qcfg = QuantConfig((QuantRule(r"no_such_layer/.*", W4, A8),))
    plan = resolve(qcfg, discover_layers(cfg))
    assert plan.layers == () and plan.unmatched_rules == (r"no_such_layer/.*",)
    assert "matched no layer" in plan.report()
    x, t, y = inputs(cfg, 3)
    ref = dit_apply_fn(cfg)(params, x, t, y)
    out = quantized_apply_fn(cfg, plan.as_dict())(make_bundle(params), x, t, y)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))


def test_quantizes_exactly_the_named_layers(tiny):
    cfg, params = tiny
    qcfg = QuantConfig((QuantRule(r"blocks_1/mlp/fc1", None, A8), QuantRule(r"blocks_0/attn/(qkv|proj)", None, A8)))
    plan = resolve(qcfg, discover_layers(cfg)).as_dict()
    assert set(plan) == {"blocks_1/mlp/fc1", "blocks_0/attn/qkv", "blocks_0/attn/proj"}
    x, t, y = inputs(cfg, 2)
    assert _tapped_layers(cfg, params, plan, x, t, y) == set(plan)
    out = quantized_apply_fn(cfg, plan)(make_bundle(params), x, t, y)
    ref = dit_apply_fn(cfg)(params, x, t, y)
    err = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
    assert 0 < err < 0.05


def test_first_matching_rule_wins_and_skip_rules(tiny):
    cfg, _ = tiny
    a4 = QuantSpec(bits=4, group_size=0)
    qcfg = QuantConfig((QuantRule(r"blocks_0/.*", skip=True), QuantRule(r"blocks_\d+/mlp/fc\d", W4, a4),
                        QuantRule(r"blocks_\d+/mlp/fc1", W4, A8)))
    plan = resolve(qcfg, discover_layers(cfg))
    d = plan.as_dict()
    assert set(d) == {"blocks_1/mlp/fc1", "blocks_1/mlp/fc2"}
    assert d["blocks_1/mlp/fc1"].act == a4  # the earlier rule won
    assert plan.unmatched_rules == (r"blocks_\d+/mlp/fc1",)


def test_per_layer_config_overrides_rules(tiny):
    cfg, _ = tiny
    override = LayerQuant(QuantSpec(bits=4, group_size=16), QuantSpec(bits=8, group_size=16))
    qcfg = preset("w4a8", w_group=32, a_group=32).replace(per_layer={"blocks_0/mlp/fc2": override})
    d = resolve(qcfg, discover_layers(cfg)).as_dict()
    assert d["blocks_0/mlp/fc2"] == override
    assert d["blocks_1/mlp/fc2"].weight.group_size == 32


def test_dynamic_activation_quantization_is_per_sample(tiny):
    """Sample i's output must not depend on the other samples of its batch, and the scales of a
    layer's input differ between samples and between timesteps."""
    cfg, params = tiny
    plan = resolve(preset("w4a8", w_group=32, a_group=32), discover_layers(cfg)).as_dict()
    apply_q = jax.jit(quantized_apply_fn(cfg, plan))
    x, t, y = inputs(cfg, 3, seed=1)
    a = apply_q(make_bundle(params), x[:2], t[:2], y[:2])
    b = apply_q(make_bundle(params), jnp.stack([x[0], 10.0 * x[2]]), jnp.stack([t[0], t[2]]), jnp.stack([y[0], y[2]]))
    np.testing.assert_allclose(np.asarray(a[0]), np.asarray(b[0]), rtol=0, atol=1e-6)

    # Record the raw input of one quantized linear for 2 samples at 2 timesteps.
    seen = {}
    rec_plan = {"blocks_0/mlp/fc1": LayerQuant(None, None)}

    def tap(path, i, arr):
        seen[path] = arr

    xs = jnp.concatenate([x[:2], x[:2]])
    ts = jnp.asarray([10, 10, 900, 900], jnp.int32)
    ys = jnp.concatenate([y[:2], y[:2]])
    with quantized(rec_plan, None, tap):
        DiT(cfg).apply({"params": params}, xs, ts, ys)
    scales = np.asarray(qparams_spec(seen["blocks_0/mlp/fc1"], plan["blocks_0/mlp/fc1"].act).scale)  # (4, T, G)
    assert not np.allclose(scales[0], scales[1])  # two samples, same timestep
    assert not np.allclose(scales[0], scales[2])  # one sample, two timesteps
    # The interceptor's quantized input equals the dynamic group quantizer applied to that input.
    q_seen = {}
    with quantized({"blocks_0/mlp/fc1": plan["blocks_0/mlp/fc1"]}, None, lambda p, i, arr: q_seen.setdefault(p, arr)):
        DiT(cfg).apply({"params": params}, xs, ts, ys)
    np.testing.assert_allclose(np.asarray(q_seen["blocks_0/mlp/fc1"]),
                               np.asarray(fake_quant_spec(seen["blocks_0/mlp/fc1"], plan["blocks_0/mlp/fc1"].act)),
                               atol=1e-6)


def test_attention_inputs_option(tiny):
    cfg, params = tiny
    plan = resolve(preset("w8a8", w_group=32, a_group=32, quantize_attention=True), discover_layers(cfg)).as_dict()
    assert "blocks_0/attn/core" in plan and plan["blocks_0/attn/core"].weight is None
    x, t, y = inputs(cfg, 2)
    assert "blocks_1/attn/core" in _tapped_layers(cfg, params, plan, x, t, y)


def test_bad_configs_give_clear_errors(tiny):
    cfg, _ = tiny
    layers = discover_layers(cfg)
    with pytest.raises(QditError, match="does not have"):
        resolve(preset("w4a8", w_group=32, a_group=32).replace(per_layer={"blocks_7/mlp/fc1": LayerQuant(W4, A8)}), layers)
    with pytest.raises(QditError, match=r"does not divide .*1152"):
        resolve(preset("w4a8", w_group=100, a_group=100), discover_layers(dit_config("XL/2")))
    for bits in (1, 9):
        with pytest.raises(QditError, match="bits"):
            preset("w4a8").replace(rules=(QuantRule("x", QuantSpec(bits=bits)),))
    with pytest.raises(QditError, match="regex"):
        QuantRule("blocks_(")


def test_xl2_has_112_block_linears():
    layers = discover_layers(dit_config("XL/2"))
    plan = resolve(preset("w4a8"), layers).as_dict()
    linears = [p for p in plan if not p.endswith("adaLN_modulation")]
    assert len(linears) == 28 * 4
    assert all(l.in_features in (1152, 4608) for l in layers if l.path in linears)


@pytest.mark.parametrize("symmetric", [False, True])
def test_choice_quantization_equals_the_chosen_spec(symmetric):
    """The search's run-time group-size choice (shared min/max, one pass) equals quantizing under
    the chosen spec directly, unbatched and under vmap over the choice index."""
    from qdit_jax.quant.interceptor import ChoiceQuant, quantize_activation_choice

    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((3, 5, 256)) * rng.uniform(0.1, 4, 256), jnp.float32)
    specs = [QuantSpec(bits=4, group_size=g, symmetric=symmetric) for g in (32, 64, 128, 256, 0)]
    cands = tuple(LayerQuant(None, s) for s in specs)
    for i, s in enumerate(specs):
        got = quantize_activation_choice(x, ChoiceQuant(cands, jnp.asarray(i)))
        np.testing.assert_allclose(np.asarray(got), np.asarray(fake_quant_spec(x, s)), rtol=0, atol=1e-6)
    idx = jnp.asarray([4, 0, 2])
    xs = jnp.stack([x, 2 * x, -x])
    got = jax.vmap(lambda v, k: quantize_activation_choice(v, ChoiceQuant(cands, k)))(xs, idx)
    for j, k in enumerate(np.asarray(idx)):
        np.testing.assert_allclose(np.asarray(got[j]), np.asarray(fake_quant_spec(xs[j], specs[k])), atol=1e-5)
