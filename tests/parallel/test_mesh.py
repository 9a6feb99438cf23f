"""Mesh helpers on this process's single CPU device: errors, batch sizing, parameter specs."""
from __future__ import annotations

import argparse

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from qdit_jax.errors import QditError
from qdit_jax.parallel import mesh as pm
from qdit_jax.parallel.cli import add_parallel_arguments, setup_from_args


def test_check_divisible_names_the_fix():
    pm.check_divisible(16, 8)
    with pytest.raises(QditError, match=r"batch size 12 does not divide over 8 devices; use a multiple of 8 \(e.g. 16\)"):
        pm.check_divisible(12, 8)
    with pytest.raises(QditError, match="e.g. 8"):
        pm.check_divisible(3, 8)


def test_make_mesh_counts_and_errors():
    mesh = pm.make_mesh(1)
    assert mesh.axis_names == ("data",) and pm.data_size(mesh) == 1
    with pytest.raises(QditError, match="--devices 2 asked for"):
        pm.make_mesh(len(jax.devices()) + 1)
    with pytest.raises(QditError, match="mesh axes"):
        pm.make_mesh(1, axes=("batch",))
    with pytest.raises(QditError, match="does not divide"):
        pm.make_mesh(1, axes=("data", "model"), model_size=2)


class _FakeDevice:
    def __init__(self, stats):
        self._stats = stats

    def memory_stats(self):
        return self._stats


def test_per_device_batch_from_memory_stats():
    gib = 2**30
    dev = _FakeDevice({"bytes_limit": 80 * gib, "bytes_in_use": 10 * gib})
    # 0.8 * 70 GiB free / 0.5 GiB per sample = 112
    assert pm.per_device_batch(gib // 2, device=dev) == 112
    assert pm.per_device_batch(gib // 2, device=dev, maximum=64) == 64
    assert pm.per_device_batch(gib, device=_FakeDevice(None), fallback=7) == 7  # CPU: no stats
    with pytest.raises(QditError, match="MiB"):
        pm.per_device_batch(100 * gib, device=dev)
    assert pm.global_batch(gib // 2, pm.make_mesh(1), device=dev) == 112


def test_param_specs_shard_only_large_divisible_leaves():
    params = {"big": np.zeros((64, 128)), "odd": np.zeros((63, 129)), "small": np.zeros((4, 4))}

    class _Mesh:  # param_specs reads only mesh.shape
        shape = {"data": 2, "model": 4}

    specs = pm.param_specs(params, _Mesh(), min_size=1000)
    assert specs["big"] == P(None, "model")
    assert specs["odd"] == P()  # no axis divisible by 4
    assert specs["small"] == P()


def test_shard_batch_checks_the_leading_axis():
    mesh = pm.make_mesh(1)
    out = pm.shard_batch({"x": np.arange(6.0).reshape(3, 2)}, mesh)
    np.testing.assert_array_equal(np.asarray(out["x"]), np.arange(6.0).reshape(3, 2))


def test_cli_flags_single_device():
    p = argparse.ArgumentParser()
    add_parallel_arguments(p)
    args = p.parse_args([])
    assert setup_from_args(args) is None  # one CPU device: the plain jitted path
    with pytest.raises(QditError, match="this host has"):
        setup_from_args(p.parse_args(["--devices", "64"]))
    with pytest.raises(QditError, match="go together"):
        setup_from_args(p.parse_args(["--coordinator", "localhost:1234"]))


def test_auto_batch_size_from_memory_analysis(monkeypatch):
    """The sampler's per-sample bytes come from XLA's memory analysis (more for a wider model) and
    the batch is the free memory's share divided by them, a multiple of the devices, capped."""
    import jax

    from qdit_jax.diffusion.pipeline import SamplerConfig, auto_batch_size, dit_apply_fn, make_sample_fn
    from qdit_jax.models.dit import DiTConfig, init_params
    from qdit_jax.parallel import mesh as mesh_mod
    from qdit_jax.parallel.mesh import compiled_bytes_per_sample

    scfg = SamplerConfig(steps=2, cfg_scale=1.5)
    per = {}
    for width in (32, 64):
        cfg = DiTConfig(input_size=8, patch_size=2, in_channels=1, hidden_size=width, depth=1, num_heads=2,
                        num_classes=3)
        params = init_params(cfg, jax.random.PRNGKey(0))

        def build(b, cfg=cfg, params=params):
            f = make_sample_fn(dit_apply_fn(cfg), cfg, scfg)
            args = (params, jax.ShapeDtypeStruct((b, 8, 8, 1), jax.numpy.float32),
                    jax.ShapeDtypeStruct((b,), jax.numpy.int32), jax.random.PRNGKey(0),
                    jax.ShapeDtypeStruct((b,), jax.numpy.uint32))
            return f.lower(*args).compile()

        per[width] = compiled_bytes_per_sample(build)
    assert 0 < per[32] < per[64]
    monkeypatch.setattr(mesh_mod, "free_device_bytes", lambda device=None: 1000 * per[64] // 8 * 10)
    b = auto_batch_size(dit_apply_fn(cfg), params, cfg, scfg)
    assert b == int(1000 * per[64] // 8 * 10 * 0.8) // per[64]  # fraction 0.8 of the free memory
    assert auto_batch_size(dit_apply_fn(cfg), params, cfg, scfg, num_samples=7) == 7  # capped
