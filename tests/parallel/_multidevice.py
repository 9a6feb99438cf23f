"""All 8-virtual-device checks in one process (run by test_sharded.py as a subprocess, because
XLA_FLAGS must be set before JAX starts). Prints one JSON object: check name -> [ok, detail]."""
from __future__ import annotations

import json
import os
import sys
import time

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from qdit_jax.diffusion.pipeline import SamplerConfig, dit_apply_fn, generate, initial_noise, make_sample_fn  # noqa: E402
from qdit_jax.errors import QditError  # noqa: E402
from qdit_jax.models.dit import DiT, DiTConfig, init_params  # noqa: E402
from qdit_jax.parallel.mesh import make_mesh, shard_params  # noqa: E402

CFG = DiTConfig(input_size=8, patch_size=2, in_channels=1, hidden_size=64, depth=1, num_heads=2, num_classes=10)
COUNTS = (1, 2, 4, 8)
COLLECTIVES = ("all-gather", "all-reduce", "collective-permute", "all-to-all", "reduce-scatter")
results: dict[str, list] = {}


def check(name: str, ok: bool, detail: str = "") -> None:
    results[name] = [bool(ok), detail]


def random_params(cfg: DiTConfig, seed: int = 0):
    params = init_params(cfg, jax.random.PRNGKey(seed))
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
    return jax.tree_util.tree_unflatten(tree, [0.15 * jax.random.normal(k, x.shape, x.dtype)
                                               for k, x in zip(keys, leaves)])


def collectives(text: str) -> list[str]:
    return [c for c in COLLECTIVES if c in text]


def sampling(params) -> None:
    labels = np.arange(16) % 10
    for sampler, eta in (("ddim", 0.0), ("ddpm", 0.0)):
        scfg = SamplerConfig(sampler=sampler, steps=2, eta=eta, cfg_scale=1.5, clip_denoised=True)
        # Per-device batch 2 everywhere: 8 sequential batches on 1 device, one on 8 devices.
        ref = generate(dit_apply_fn(CFG), params, CFG, scfg, labels, seed=3, batch_size=2)
        outs = {n: generate(dit_apply_fn(CFG), params, CFG, scfg, labels, seed=3, batch_size=2 * n,
                            mesh=make_mesh(n)) for n in COUNTS}
        diffs = {n: float(np.abs(o - ref).max()) for n, o in outs.items()}
        check(f"sample_{sampler}_bitwise", all(np.array_equal(o, ref) for o in outs.values()), str(diffs))
    # The compiled data-parallel sampler holds no collective at all (no all-gather of params).
    mesh = make_mesh(8)
    fn = make_sample_fn(dit_apply_fn(CFG), CFG, SamplerConfig(sampler="ddpm", steps=2, cfg_scale=1.5), mesh=mesh)
    ids = jnp.arange(16, dtype=jnp.uint32)
    text = fn.lower(params, initial_noise(0, np.arange(16), (8, 8, 1)), jnp.asarray(labels), jax.random.PRNGKey(0),
                    ids).compile().as_text()
    check("sampler_hlo_no_collectives", collectives(text) == [], str(collectives(text)))
    try:
        generate(dit_apply_fn(CFG), params, CFG, SamplerConfig(steps=2), labels, batch_size=12, mesh=mesh)
        check("indivisible_batch_error", False, "no error")
    except QditError as e:
        check("indivisible_batch_error", "does not divide over 8 devices" in str(e) and "16" in str(e), str(e))


def calibration(params) -> None:
    from qdit_jax.parallel.stats import calibrate_static_sharded, hessians_sharded
    from qdit_jax.quant.calibration import CalibrationData, calibrate_static
    from qdit_jax.quant.config import QuantConfig, qdit_rules, resolve
    from qdit_jax.quant.interceptor import discover_layers
    from qdit_jax.quant.quantize import _HessianRunner

    rng = np.random.default_rng(0)
    m = 16
    calib = CalibrationData(rng.standard_normal((m, 8, 8, 1)).astype(np.float32),
                            rng.integers(0, 1000, m).astype(np.int32), (np.arange(m) % 11).astype(np.int32))
    plan = resolve(QuantConfig(qdit_rules(4, 8, w_group=32, a_group=32), {}, act_mode="static"),
                   discover_layers(CFG)).as_dict()
    # Per-device batch 2 everywhere, as the single-device reference: the layer inputs are then
    # bit-identical, so min/max ranges must be too; sums differ only in summation order.
    ref = calibrate_static(params, CFG, plan, calib, batch_size=2)
    exact = True
    for n in (2, 8):
        got = calibrate_static_sharded(params, CFG, plan, calib, make_mesh(n), batch_size=2 * n)
        exact &= sorted(got) == sorted(ref) and all(
            np.array_equal(np.asarray(a.scale), np.asarray(b.scale))
            and np.array_equal(np.asarray(a.zero_point), np.asarray(b.zero_point))
            for p in ref for a, b in zip(got[p], ref[p]))
    check("static_ranges_equal", exact and len(ref) > 0, f"{len(ref)} layers")
    dyn = resolve(QuantConfig(qdit_rules(4, 8, w_group=32, a_group=32), {}), discover_layers(CFG)).as_dict()
    href = _HessianRunner(CFG, dyn, None)(params, calib, 2)
    worst = 0.0
    for n in (4,):
        got = hessians_sharded(params, CFG, dyn, calib, make_mesh(n), batch_size=2 * n)
        assert sorted(got) == sorted(href)
        worst = max(worst, max(float(np.abs(np.asarray(got[p]) - np.asarray(href[p])).max()
                                     / np.abs(np.asarray(href[p])).max()) for p in href))
    check("hessians_equal", worst < 1e-6 and len(href) > 0, f"max rel err {worst:.2e} over {len(href)} layers")
    # A Hessian run with several batches compiles one all-reduce; pad rows get weight 0 (13 rows).
    odd = CalibrationData(calib.x[:13], calib.t[:13], calib.y[:13])
    got = hessians_sharded(params, CFG, dyn, odd, make_mesh(8), batch_size=8)
    full = _HessianRunner(CFG, dyn, None)(params, odd, 1)
    err = max(float(np.abs(np.asarray(got[p]) - np.asarray(full[p])).max() / np.abs(np.asarray(full[p])).max())
              for p in full)
    check("hessians_padding_masked", err < 1e-6, f"max rel err {err:.2e}")


def fid_stats() -> None:
    from qdit_jax.metrics.frechet import feature_statistics
    from qdit_jax.parallel.stats import feature_moments_fn, feature_statistics_sharded

    rng = np.random.default_rng(1)
    f = (rng.standard_normal((100, 12)) @ rng.standard_normal((12, 12)) + 3.0).astype(np.float32)
    mu, sigma = feature_statistics(f.astype(np.float64))
    worst = 0.0
    for n in COUNTS:
        m2, s2 = feature_statistics_sharded(f, make_mesh(n), batch_size=32)
        worst = max(worst, float(np.abs(m2 - mu).max()), float(np.abs(s2 - sigma).max() / np.abs(sigma).max()))
    check("fid_stats_equal", worst < 1e-5, f"max err {worst:.2e}")
    fn = feature_moments_fn(make_mesh(8))
    text = fn.lower(jnp.zeros((32, 12)), jnp.ones(32), jnp.zeros(12)).compile().as_text()
    check("fid_hlo_all_reduce", "all-reduce" in text and "all-gather" not in text, str(collectives(text)))


def model_axis(params) -> None:
    """Params split over a 'model' axis (plain jit, XLA partitions): same forward as one device."""
    mesh = make_mesh(8, axes=("data", "model"), model_size=2)
    sharded = shard_params(params, mesh, min_size=4096)
    n_split = sum(1 for x in jax.tree_util.tree_leaves(sharded) if not x.sharding.is_fully_replicated)
    x = jnp.asarray(np.random.default_rng(2).standard_normal((8, 8, 8, 1)), jnp.float32)
    t, y = jnp.arange(8) * 100, jnp.arange(8) % 10
    fwd = jax.jit(lambda p, x, t, y: DiT(CFG).apply({"params": p}, x, t, y))
    a, b = fwd(params, x, t, y), fwd(sharded, x, t, y)
    err = float(jnp.abs(a - b).max())
    check("model_axis_forward", n_split > 0 and err < 1e-4, f"{n_split} split leaves, max err {err:.2e}")


def main() -> None:
    assert jax.device_count() == 8, jax.devices()
    params = random_params(CFG)
    for part in (lambda: sampling(params), lambda: calibration(params), fid_stats, lambda: model_axis(params)):
        t0 = time.time()
        part()
        print(f"# {time.time() - t0:.1f}s", file=sys.stderr)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
