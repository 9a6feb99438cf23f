"""DiT module: configuration checks and the attention core against a float64 NumPy reference."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qdit_jax.errors import QditError
from qdit_jax.models.dit import AttentionCore, DiTConfig


def _attention_np(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    q, k, v = (a.astype(np.float64) for a in (q, k, v))
    s = np.einsum("bnhd,bmhd->bhnm", q, k) / np.sqrt(q.shape[-1])
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhnm,bmhd->bnhd", p, v)


@pytest.mark.parametrize("impl", ["auto", "xla"])
def test_attention_core_matches_numpy(impl):
    rng = np.random.default_rng(0)
    q, k, v = (rng.normal(size=(2, 16, 4, 8)).astype(np.float32) for _ in range(3))
    out = AttentionCore(impl).apply({}, jnp.asarray(q), jnp.asarray(k), jnp.asarray(v))
    np.testing.assert_allclose(np.asarray(out), _attention_np(q, k, v), rtol=1e-5, atol=1e-5)


def test_unknown_attention_is_a_config_error():
    with pytest.raises(QditError, match="attention must be one of"):
        DiTConfig(attention="flash")


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="cuDNN exists on GPU")
def test_forced_cudnn_without_cudnn_says_so():
    q = jnp.ones((1, 8, 2, 8), jnp.bfloat16)
    with pytest.raises(QditError, match="use attention='xla'"):
        AttentionCore("cudnn").apply({}, q, q, q)


def test_config_round_trips_through_dict():
    cfg = DiTConfig(attention="xla", hidden_size=64, num_heads=4)
    assert DiTConfig.from_dict(cfg.to_dict()) == cfg
