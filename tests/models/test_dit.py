"""DiT module: configuration checks and the attention core against a float64 NumPy reference."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qdit_jax.errors import QditError
from qdit_jax.models.dit import AttentionCore, DiTConfig


@pytest.fixture(autouse=True)
def _float32_matmuls():
    """float32 products in float32 (on a GPU XLA's default is TF32, far from these tolerances)."""
    with jax.default_matmul_precision("highest"):
        yield


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
    assert out.shape == (2, 16, 32)  # heads merged: the layout the output projection reads
    np.testing.assert_allclose(np.asarray(out), _attention_np(q, k, v).reshape(2, 16, 32), rtol=1e-5, atol=1e-5)


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


def test_params_in_compute_dtype_is_exact_for_a_bf16_model():
    """Casting the float32 params to bf16 once gives the bf16 forward bit for bit (every module
    casts its params at each call anyway), and the cast tree really is bf16; a float32 model's
    params are returned untouched."""
    from qdit_jax.models.dit import DiT, param_shapes, params_in_compute_dtype

    cfg = DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=2,
                    num_classes=10, dtype="bfloat16")
    r = np.random.default_rng(3)
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(0.05 * r.standard_normal(a.shape), jnp.float32),
                                    param_shapes(cfg))
    cast = params_in_compute_dtype(params, cfg)
    assert {str(a.dtype) for a in jax.tree_util.tree_leaves(cast)} == {"bfloat16"}
    x = jnp.asarray(r.standard_normal((3, 8, 8, 4)), jnp.float32)
    t, y = jnp.asarray([1, 400, 999], jnp.int32), jnp.asarray([0, 4, 10], jnp.int32)
    fwd = jax.jit(lambda p: DiT(cfg).apply({"params": p}, x, t, y))
    a, b = np.asarray(fwd(params)), np.asarray(fwd(cast))
    assert np.isfinite(a).all() and np.abs(a).max() > 0
    np.testing.assert_array_equal(a, b)
    assert params_in_compute_dtype(params, cfg.replace(dtype="float32")) is params


def test_split_qkv_gemms_compute_the_same_model():
    """qkv_gemms='split' (the default) keeps the parameter tree (checkpoints load unchanged) and the function (three
    column-block GEMMs concatenated equal the fused one), and XLA folds the concatenation away: the
    compiled program has two more dots per block and no more concatenations than the fused one."""
    from qdit_jax.models.dit import DiT, param_shapes

    cfg = DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=2, num_classes=10,
                    qkv_gemms="fused")
    split = cfg.replace(qkv_gemms="split")
    assert DiTConfig().qkv_gemms == "split"
    assert jax.tree_util.tree_structure(param_shapes(split)) == jax.tree_util.tree_structure(param_shapes(cfg))
    r = np.random.default_rng(4)
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(0.05 * r.standard_normal(a.shape), jnp.float32),
                                    param_shapes(cfg))
    x = jnp.asarray(r.standard_normal((3, 8, 8, 4)), jnp.float32)
    t, y = jnp.asarray([1, 400, 999], jnp.int32), jnp.asarray([0, 4, 10], jnp.int32)
    texts = {}
    for name, c in (("fused", cfg), ("split", split)):
        fwd = jax.jit(lambda p, c=c: DiT(c).apply({"params": p}, x, t, y))
        texts[name] = (np.asarray(fwd(params)), fwd.lower(params).compile().as_text())
    a, b = texts["fused"][0], texts["split"][0]
    assert np.abs(a).max() > 0
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
    if jax.default_backend() == "cpu":  # a GPU's program has cuBLAS calls where the CPU's has dots
        assert texts["split"][1].count(" dot(") == texts["fused"][1].count(" dot(") + 2 * cfg.depth
        assert texts["split"][1].count("concatenate(") == texts["fused"][1].count("concatenate(")
    with pytest.raises(QditError, match="qkv_gemms"):
        cfg.replace(qkv_gemms="three")
