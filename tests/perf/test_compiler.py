"""The default XLA options: only on GPUs, can be switched off, and are options XLA knows."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from qdit_jax.perf.compiler import GPU_OPTIONS, compiler_options, jit


def test_options_only_for_gpus(monkeypatch):
    monkeypatch.delenv("QDIT_XLA_DEFAULTS", raising=False)
    assert compiler_options("cpu") is None and compiler_options("tpu") is None
    assert compiler_options("gpu") == GPU_OPTIONS
    monkeypatch.setenv("QDIT_XLA_DEFAULTS", "0")
    assert compiler_options("gpu") is None


def test_xla_accepts_the_gpu_option_names():
    # an unknown name fails the compile ("No such compile option"); the CPU build shares DebugOptions
    f = jax.jit(lambda x: jax.nn.gelu(x @ x.T, approximate=True), compiler_options=GPU_OPTIONS)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((8, 4)), jnp.float32)
    np.testing.assert_allclose(f(x), jax.nn.gelu(x @ x.T, approximate=True), rtol=1e-5, atol=1e-6)


def test_jit_wrapper_computes_the_function():
    f = jit(lambda a, b: a * b + 1)
    assert float(f(jnp.float32(2), jnp.float32(3))) == 7.0


def test_sampling_compiles_with_the_options(monkeypatch):
    """make_sample_fn goes through perf.compiler.jit, so a GPU run gets GPU_OPTIONS (spied here)."""
    import qdit_jax.perf.compiler as comp
    from qdit_jax.diffusion.pipeline import SamplerConfig, dit_apply_fn, make_sample_fn
    from qdit_jax.models.dit import DiTConfig

    seen = []
    real_jit = jax.jit
    monkeypatch.setattr(comp, "compiler_options", lambda backend=None: dict(GPU_OPTIONS))
    monkeypatch.setattr(comp.jax, "jit", lambda fn, **kw: seen.append(kw) or real_jit(fn, **kw))
    cfg = DiTConfig(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=1, num_heads=2, num_classes=3)
    make_sample_fn(dit_apply_fn(cfg), cfg, SamplerConfig(steps=2))
    assert seen and seen[-1].get("compiler_options") == GPU_OPTIONS
