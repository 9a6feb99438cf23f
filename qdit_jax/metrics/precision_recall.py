"""Improved precision and recall (Kynkäänniemi et al. 2019), as the ADM evaluator computes them.

Each feature set defines a manifold: the union of balls around its points whose (squared) radius
is the squared distance to the k-th nearest neighbour (k=3, the point itself not counted).
Precision is the fraction of generated samples inside the real manifold; recall is the fraction
of real samples inside the generated manifold. Distances are squared Euclidean, computed on the
device in float32 in row blocks (ADM tries float16 first; float32 only differs at exact ties).
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qdit_jax.errors import QditError


def _check(features: Any, name: str) -> np.ndarray:
    x = np.asarray(features, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] == 0:
        raise QditError(f"{name} must be a non-empty (num_samples, dim) array, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise QditError(f"{name} contain NaN or inf: check the feature network's input")
    return x


def _sq_dists(u: jax.Array, v: jax.Array) -> jax.Array:
    uu = jnp.sum(u * u, axis=1)[:, None]
    vv = jnp.sum(v * v, axis=1)[None, :]
    uv = jnp.dot(u, v.T, precision=jax.lax.Precision.HIGHEST)
    return jnp.maximum(uu - 2.0 * uv + vv, 0.0)


@functools.partial(jax.jit, static_argnames="k")
def _kth_block(rows: jax.Array, all_x: jax.Array, k: int) -> jax.Array:
    d = _sq_dists(rows, all_x)
    return -jax.lax.top_k(-d, k + 1)[0][:, k]


@jax.jit
def _cross_block(real_rows: jax.Array, real_radii: jax.Array, fake: jax.Array,
                 fake_radii: jax.Array) -> tuple[jax.Array, jax.Array]:
    d = _sq_dists(real_rows, fake)
    fake_in = jnp.any(d <= real_radii[:, None], axis=0)  # fake j inside some real ball
    real_in = jnp.any(d <= fake_radii[None, :], axis=1)  # real i inside some fake ball
    return fake_in, real_in


def _row_blocks(x: np.ndarray, block: int):
    """Yield (start, n, padded block) with a fixed block shape so one program serves all."""
    block = min(block, x.shape[0])
    for start in range(0, x.shape[0], block):
        part = x[start:start + block]
        n = part.shape[0]
        if n < block:
            part = np.concatenate([part, np.repeat(part[-1:], block - n, axis=0)])
        yield start, n, part


def manifold_radii(features: Any, k: int = 3, batch_size: int = 1000) -> np.ndarray:
    """Squared distance of each sample to its k-th nearest neighbour in the same set, (N,)."""
    x = _check(features, "features")
    if not 1 <= k < x.shape[0]:
        raise QditError(f"k={k} nearest neighbours need more than k samples, got {x.shape[0]}")
    all_x = jnp.asarray(x)
    radii = np.empty(x.shape[0], np.float32)
    for start, n, part in _row_blocks(x, batch_size):
        radii[start:start + n] = np.asarray(_kth_block(jnp.asarray(part), all_x, k))[:n]
    return radii


def precision_recall(real_features: Any, fake_features: Any, k: int = 3,
                     batch_size: int = 1000) -> tuple[float, float]:
    """(precision, recall) of generated features against real (reference) features."""
    real = _check(real_features, "real features")
    fake = _check(fake_features, "generated features")
    if real.shape[1] != fake.shape[1]:
        raise QditError(f"feature dims differ: real {real.shape[1]} vs generated {fake.shape[1]}: "
                        "use the same feature layer for both")
    real_radii = manifold_radii(real, k, batch_size)
    fake_radii = jnp.asarray(manifold_radii(fake, k, batch_size))
    fake_j = jnp.asarray(fake)
    fake_in = np.zeros(fake.shape[0], bool)
    real_in = np.zeros(real.shape[0], bool)
    padded_radii = np.concatenate([real_radii, np.full(batch_size, -1.0, np.float32)])
    for start, n, part in _row_blocks(real, batch_size):
        radii = padded_radii[start:start + part.shape[0]].copy()
        radii[n:] = -1.0  # padding rows own no ball
        f_in, r_in = _cross_block(jnp.asarray(part), jnp.asarray(radii), fake_j, fake_radii)
        fake_in |= np.asarray(f_in)
        real_in[start:start + n] = np.asarray(r_in)[:n]
    return float(fake_in.mean()), float(real_in.mean())
