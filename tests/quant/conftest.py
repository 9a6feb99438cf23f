"""A tiny DiT with every weight random (DiT zero-initialises adaLN and the final layer) and a
small calibration set, shared by the quantization tests."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qdit_jax.models.dit import DiTConfig, init_params

TINY = DiTConfig(input_size=8, patch_size=2, in_channels=1, hidden_size=64, depth=2, num_heads=2, num_classes=10)


def random_params(cfg: DiTConfig, seed: int = 0):
    params = init_params(cfg, jax.random.PRNGKey(seed))
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
    return jax.tree_util.tree_unflatten(
        tree, [0.15 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


@pytest.fixture(scope="session")
def tiny():
    return TINY, random_params(TINY)


@pytest.fixture(scope="session")
def tiny_calib(tiny):
    from qdit_jax.diffusion.pipeline import SamplerConfig, dit_apply_fn
    from qdit_jax.quant.calibration import collect_calibration

    cfg, params = tiny
    return collect_calibration(dit_apply_fn(cfg), params, cfg, SamplerConfig(steps=4, cfg_scale=1.5),
                               num_samples=8, steps_per_sample=2, batch_size=8)


def inputs(cfg: DiTConfig, n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((n, cfg.input_size, cfg.input_size, cfg.in_channels)), jnp.float32)
    t = jnp.asarray(rng.integers(0, 1000, n), jnp.int32)
    y = jnp.asarray(rng.integers(0, cfg.num_classes, n), jnp.int32)
    return x, t, y
