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
SAMPLE_COUNTS = (2, 8)  # each mesh size compiles the sampler anew (most of this file's CI time)
COLLECTIVES = ("all-gather", "all-reduce", "collective-permute", "all-to-all", "reduce-scatter")
results: dict[str, list] = {}


def check(name: str, ok: bool, detail: str = "") -> None:
    results[name] = [bool(ok), detail]


def random_params(cfg: DiTConfig, seed: int = 0):
    """Every leaf random (N(0, 0.15^2)), from the param shapes alone: op-by-op Flax init and a random
    draw per leaf took 15 s of this subprocess on CI's CPU."""
    shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(seed)))
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda x: jnp.asarray(0.15 * rng.standard_normal(x.shape), x.dtype), shapes)


def collectives(text: str) -> list[str]:
    return [c for c in COLLECTIVES if c in text]


def sampling(params) -> None:
    labels = np.arange(16) % 10
    for sampler, eta in (("ddim", 0.0), ("ddpm", 0.0)):
        scfg = SamplerConfig(sampler=sampler, steps=2, eta=eta, cfg_scale=1.5, clip_denoised=True)
        # Per-device batch 2 everywhere: 8 sequential batches on 1 device, one on 8 devices.
        ref = generate(dit_apply_fn(CFG), params, CFG, scfg, labels, seed=3, batch_size=2)
        outs = {n: generate(dit_apply_fn(CFG), params, CFG, scfg, labels, seed=3, batch_size=2 * n,
                            mesh=make_mesh(n)) for n in SAMPLE_COUNTS}
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


def quantize_pipeline(params) -> None:
    """collect_calibration and quantize_model (static ranges + GPTQ) on a 4-device mesh against
    one device at the same per-device batch: identical calibration data and static ranges; GPTQ
    codes equal up to the Hessians' float32 summation order."""
    from qdit_jax.quant.calibration import collect_calibration
    from qdit_jax.quant.config import QuantConfig, qdit_rules
    from qdit_jax.quant.quantize import quantize_model

    scfg = SamplerConfig(sampler="ddpm", steps=3, cfg_scale=1.5, clip_denoised=True)
    ref = collect_calibration(dit_apply_fn(CFG), params, CFG, scfg, num_samples=7, batch_size=2, seed=4)
    got = collect_calibration(dit_apply_fn(CFG), params, CFG, scfg, num_samples=7, batch_size=8, seed=4,
                              mesh=make_mesh(4))
    same = all(np.array_equal(getattr(ref, f), getattr(got, f)) for f in ("x", "t", "y"))
    check("calibration_data_equal", same and len(ref) == 14, f"{len(ref)} inputs")
    qcfg = QuantConfig(qdit_rules(4, 8, w_group=32, a_group=32), {}, act_mode="static", gptq=True)
    q1 = quantize_model(params, CFG, qcfg, calib=ref, batch_size=2)
    q4 = quantize_model(params, CFG, qcfg, calib=ref, batch_size=8, mesh=make_mesh(4))
    ranges = all(np.array_equal(np.asarray(a.scale), np.asarray(b.scale)) for p in q1.static
                 for a, b in zip(q1.static[p], q4.static[p]))
    agree = np.mean(np.concatenate([(np.asarray(q1.codes[p][0]) == np.asarray(q4.codes[p][0])).ravel()
                                    for p in q1.codes]))
    check("quantize_model_mesh", ranges and agree >= 0.999, f"static ranges equal: {ranges}, codes agree {agree:.5f}")


def inception_features() -> None:
    """Inception features batch-sharded over 8 devices (params replicated) against one device."""
    from qdit_jax.models.inception import extract_features, init_inception_params

    params = init_inception_params(0)
    imgs = np.random.default_rng(3).integers(0, 256, (12, 32, 32, 3), dtype=np.uint8)
    ref = extract_features(params, imgs, batch_size=8, outputs=("pool", "logits_unbiased"))
    got = extract_features(params, imgs, batch_size=8, outputs=("pool", "logits_unbiased"), mesh=make_mesh(8))
    err = max(float(np.abs(got[k] - ref[k]).max() / np.abs(ref[k]).max()) for k in ref)
    check("inception_features_equal", got["pool"].shape == (12, 2048) and err < 1e-5, f"max rel err {err:.2e}")


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


def search_epoch(params) -> None:
    """One search epoch (population 6), its candidate sampling batch-sharded over 8 devices or
    candidate-sharded over 4 and 8, against one device.

    Batch sharding at the reference's per-device batch (2) computes the same shapes: fitness
    values, best candidate and samples must be bit-identical. Candidate sharding changes how many
    candidates one vmapped matmul holds (6 on one device, 1-3 per device), which changes float
    rounding: same ranking and best candidate, fitness within 1e-4 relative."""
    from qdit_jax.io.loading import LoadedModel
    from qdit_jax.search.evolution import EvolutionConfig
    from qdit_jax.search.runner import SearchSettings, run_search

    model = LoadedModel(params, CFG, {"sampling": {"clip_denoised": True, "guidance_channels": None}})
    evo = EvolutionConfig(population=6, top_k=2, mutation_num=2, crossover_num=2, epochs=1, seed=0)

    def run(n: int, shard: str):
        bs = 2 * n if shard == "batch" else 2
        s = SearchSettings(wbits=4, abits=8, groups=(16, 32, 64), budget="mean-group=32", num_samples=16, steps=2,
                           batch_size=bs)
        r = run_search(model, s, evo, progress=False, mesh=None if n == 1 else make_mesh(n), shard=shard)
        cands = sorted(r.state.cache)[:3]
        if n == 8:  # the compiled sharded sampler: no collective at all (params and stacks replicated)
            cs = r.sampler
            _, z, y, key, ids = next(cs._batches())
            idx = jnp.zeros((8 if shard == "candidates" else 3, len(cs.space)), jnp.int32)
            text = cs._vmapped.lower(cs.stacks, cs.base_params, idx, z, y, key, ids).compile().as_text()
            hlo[shard] = collectives(text)
        return r.state.cache, r.best, r.sampler.samples([tuple(int(g) for g in c.split(",")) for c in cands])

    hlo: dict[str, list] = {}
    ref_cache, ref_best, ref_x = run(1, "batch")
    ranking = sorted(ref_cache, key=ref_cache.get)
    ok_all, detail = len(ref_cache) >= 6, []
    # candidates: 6 do not divide over 4 devices (padded); 8 devices for the HLO check
    for shard, counts in (("batch", (8,)), ("candidates", (4, 8))):
        for n in counts:
            cache, best, x = run(n, shard)
            if shard == "batch":
                ok = cache == ref_cache and best == ref_best and np.array_equal(x, ref_x)
            else:
                rel = max(abs(cache[k] - v) / abs(v) for k, v in ref_cache.items()) if cache.keys() == ref_cache.keys() else 1.0
                ok = best == ref_best and sorted(cache, key=cache.get) == ranking and rel <= 1e-4
            ok_all &= ok
            detail.append(f"{shard}/{n}: {'ok' if ok else 'DIFFERS'} max |dx| {float(np.abs(x - ref_x).max()):.1e}")
    check("search_epoch_equal", ok_all, "; ".join(detail))
    check("search_hlo_no_collectives", hlo == {"batch": [], "candidates": []}, str(hlo))


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
    for part in (lambda: sampling(params), lambda: calibration(params), fid_stats, lambda: model_axis(params),
                 lambda: search_epoch(params), lambda: quantize_pipeline(params), inception_features):
        t0 = time.time()
        part()
        print(f"# {time.time() - t0:.1f}s", file=sys.stderr)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
