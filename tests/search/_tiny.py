"""A tiny random DiT shared by the search tests (hidden 64, depth 1, 8x8x1 input)."""
from __future__ import annotations

import functools

import jax

from qdit_jax.models.dit import DiTConfig, init_params

TINY = DiTConfig(input_size=8, patch_size=2, in_channels=1, hidden_size=64, depth=1, num_heads=2, num_classes=3)


@functools.lru_cache(maxsize=1)
def tiny_params():
    return init_params(TINY, jax.random.PRNGKey(0))
