"""Classifier-free guidance and batching of the sampling pipeline."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qdit_jax.diffusion.pipeline import SamplerConfig, check_labels, dit_apply_fn, generate, guided_model_fn
from qdit_jax.errors import QditError
from qdit_jax.models.dit import DiT, DiTConfig, init_params

CFG4 = DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=1, num_heads=2, num_classes=10)


def _random(cfg, seed=0):
    p = init_params(cfg, jax.random.PRNGKey(seed))
    leaves, tree = jax.tree_util.tree_flatten(p)
    ks = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
    return jax.tree_util.tree_unflatten(tree, [0.2 * jax.random.normal(k, x.shape) for k, x in zip(ks, leaves)])


@pytest.mark.parametrize("gc", [3, None])
def test_guidance_matches_the_official_formula(gc):
    """eps_hat = uncond + s (cond - uncond) on the guided channels; the rest from the conditional half."""
    cfg, params = CFG4, _random(CFG4)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 8, 8, 4)), jnp.float32)
    t = jnp.asarray([10, 700], jnp.int32)
    y = jnp.asarray([3, 7], jnp.int32)
    out = np.asarray(guided_model_fn(dit_apply_fn(cfg), params, y, cfg_scale=4.0, null_label=10, in_channels=4,
                                     guidance_channels=gc)(x, t), np.float64)
    cond = np.asarray(dit_apply_fn(cfg)(params, x, t, y), np.float64)
    uncond = np.asarray(dit_apply_fn(cfg)(params, x, t, jnp.full_like(y, 10)), np.float64)
    k = 4 if gc is None else gc
    np.testing.assert_allclose(out[..., :k], uncond[..., :k] + 4.0 * (cond[..., :k] - uncond[..., :k]), atol=5e-4)
    np.testing.assert_allclose(out[..., k:], cond[..., k:], atol=5e-4)
    # The model's own batch-doubled forward_with_cfg (the official method) agrees.
    official = DiT(cfg).apply({"params": params}, jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                              jnp.concatenate([y, jnp.full_like(y, 10)]), 4.0, gc, method=DiT.forward_with_cfg)
    np.testing.assert_allclose(np.asarray(official)[:2], out, atol=5e-4)


def test_samples_do_not_depend_on_batch_size():
    cfg = CFG4.replace(in_channels=1)
    params = _random(cfg)
    scfg = SamplerConfig(steps=3, cfg_scale=1.5, clip_denoised=True)
    labels = np.arange(5) % 10
    a = generate(dit_apply_fn(cfg), params, cfg, scfg, labels, seed=4, batch_size=5)
    b = generate(dit_apply_fn(cfg), params, cfg, scfg, labels, seed=4, batch_size=2)
    np.testing.assert_allclose(a, b, atol=1e-3)  # batched matmuls round differently
    c = generate(dit_apply_fn(cfg), params, cfg, scfg, labels, seed=5, batch_size=5)
    assert np.abs(a - c).max() > 0.1


def test_bad_sampler_settings():
    with pytest.raises(QditError, match="cfg-scale"):
        SamplerConfig(cfg_scale=0.5)
    with pytest.raises(QditError, match="eta"):
        SamplerConfig(sampler="ddpm", steps=10, eta=0.5)
    with pytest.raises(QditError, match="label 10"):
        check_labels(np.array([0, 10]), 10)
