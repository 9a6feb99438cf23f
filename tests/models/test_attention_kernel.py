"""The Triton attention kernel (``models.attention_kernel``) against a float64 NumPy attention: in Pallas'
interpreter on any machine (the tail arithmetic: each head column counted once), compiled on a GPU (the
Triton lowering, masked loads and stores), and its guard and the model's routing to it."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qdit_jax.errors import QditError
from qdit_jax.models import attention_kernel as ak
from qdit_jax.models.dit import AttentionCore
from tests.models.test_dit import _attention_np

on_gpu = jax.default_backend() == "gpu"


def _f64(q, k, v) -> np.ndarray:
    """test_dit's float64 NumPy attention on bf16 arrays."""
    return _attention_np(*(np.asarray(a, np.float64) for a in (q, k, v)))


def _qkv(shape, seed=0, dtype=jnp.bfloat16):
    ks = jax.random.split(jax.random.key(seed), 3)
    return tuple(jax.random.normal(kk, shape, jnp.float32).astype(dtype) * 2 for kk in ks)


@pytest.mark.parametrize("d,mode", [(72, "masked"), (72, "overlap"), (24, "masked"), (24, "overlap"), (80, "masked"),
                                    (64, "masked")])
def test_interpreted_kernel_matches_float64(d, mode):
    q, k, v = _qkv((2, 128, 3, d), seed=d)
    out = ak.attention_triton(q, k, v, ak.Tiles(64, 64, 4, 3, mode), interpret=True)
    ref = _f64(q, k, v)
    err = np.abs(np.asarray(out, np.float64) - ref).max()
    # the float32 reference rounded to bf16 is as far from float64 as rounding allows; the kernel also
    # rounds P to bf16 before P @ V (flash attention's usual step), so allow it 1.5x that
    rounding = np.abs(np.asarray(ak.attention_reference(q, k, v), np.float64) - ref).max()
    assert err <= 1.5 * rounding + 1e-3, (err, rounding)
    # and the check can fail: the head without its last 8 columns gives a visibly different result
    cut = _f64(q.at[..., -8:].set(0), k, v)
    assert np.abs(cut - ref).max() > 20 * err


def test_guard_refuses_gpus_without_bf16_tensor_cores(monkeypatch):
    """Under 'auto' a refused cuDNN falls back here: a GPU the kernel cannot compile for (pre-Ampere, or
    not NVIDIA) must be refused by the guard, so XLA's attention runs instead of a lowering error."""
    class _Dev:
        def __init__(self, cc):
            self.compute_capability = cc

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    for cc, ok in (("7.0", False), ("gfx90a", False), ("8.0", True), ("9.0", True)):
        monkeypatch.setattr(jax, "devices", lambda *a, cc=cc: [_Dev(cc)])
        got, why = ak.attention_applies((2, 256, 16, 72), jnp.bfloat16)
        assert got == ok and (ok or "compute capability" in why), (cc, why)


def test_guard_names_what_does_not_fit():
    assert ak.attention_applies((2, 256, 16, 72), jnp.bfloat16, platform="gpu") == (True, "ok")
    cases = {((2, 256, 16, 72), jnp.bfloat16, "cpu"): "GPU-only",
             ((2, 256, 16, 72), jnp.float32, "gpu"): "bfloat16 or float16",
             ((2, 256, 16, 96), jnp.bfloat16, "gpu"): "head size 96",
             ((2, 256, 16, 8), jnp.bfloat16, "gpu"): "head size 8",
             ((2, 200, 16, 72), jnp.bfloat16, "gpu"): "200 tokens",
             ((256, 16, 72), jnp.bfloat16, "gpu"): "(B, T, N, D)"}
    for (shape, dtype, platform), words in cases.items():
        ok, why = ak.attention_applies(shape, dtype, platform=platform)
        assert not ok and words in why, (shape, why)
    ok, why = ak.attention_applies((2, 256, 16, 72), jnp.bfloat16, ak.Tiles(tail="pad"), platform="gpu")
    assert not ok and "tail mode" in why
    q = jnp.zeros((2, 200, 4, 72), jnp.bfloat16)
    with pytest.raises(ValueError, match="200 tokens"):
        ak.attention_triton(q, q, q, interpret=True)
    with pytest.raises(ValueError, match="share shape and dtype"):
        ak.attention_triton(q, q, q.astype(jnp.float16), interpret=True)


@pytest.mark.skipif(on_gpu, reason="on a GPU the kernel applies")
def test_model_asking_for_triton_off_gpu_says_why():
    q = jnp.ones((1, 128, 2, 72), jnp.bfloat16)
    with pytest.raises(QditError, match="GPU-only.*use attention='auto' or 'xla'"):
        AttentionCore("triton").apply({}, q, q, q)


@pytest.mark.skipif(not on_gpu, reason="compiles the Triton kernel: GPU only")
@pytest.mark.parametrize("mode", ak.TAIL_MODES)
def test_compiled_kernel_matches_float64_at_xl2_heads(mode):
    q, k, v = _qkv((4, 256, 16, 72), seed=1)
    out = ak.attention_triton(q, k, v, ak.Tiles(tail=mode))
    ref = _f64(q, k, v)
    rounding = np.abs(np.asarray(ak.attention_reference(q, k, v), np.float64) - ref).max()
    assert np.abs(np.asarray(out, np.float64) - ref).max() <= 1.5 * rounding + 1e-3


@pytest.mark.skipif(not on_gpu, reason="routes to the Triton kernel: GPU only")
def test_model_triton_attention_matches_xla_attention():
    q, k, v = _qkv((2, 256, 16, 72), seed=2)
    got = AttentionCore("triton").apply({}, q, k, v)
    want = AttentionCore("xla").apply({}, q, k, v)
    assert np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64)).max() < 0.05
