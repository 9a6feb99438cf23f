"""Sharded DiT sampling on 1 device against all devices of the host: images/s, scaling efficiency and
whether the samples are identical (issue 8).

    python scripts/bench_sharded.py --model XL/2 --variants bf16 real-w8a8 --batch 64 --json out.json

DiT (random weights; speed does not depend on trained weights), DDIM with classifier-free guidance,
the same global batch and seed on a 1-device mesh and on an N-device mesh (``--devices``, default
all): the sampler runs under ``shard_map`` (``make_sample_fn(mesh=)``), params replicated, noise
and labels split over the 'data' axis. Medians of ``--repeats`` timed calls after one warm-up,
synchronised by copying the samples to the host; the 1- and N-device samples are compared
element-wise (per-sample keys make them equal up to the reduction order of the devices' kernels).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qdit_jax.cli import bench  # noqa: E402
from qdit_jax.diffusion.pipeline import SamplerConfig, initial_noise, make_sample_fn  # noqa: E402
from qdit_jax.models.dit import dit_config  # noqa: E402
from qdit_jax.parallel.mesh import make_mesh, replicate  # noqa: E402


def time_sampling(fn, args: tuple, repeats: int) -> tuple[float, np.ndarray]:
    """(median seconds, samples) of ``fn(*args)`` after one warm-up; host copies synchronise."""
    x = np.asarray(fn(*args))
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        x = np.asarray(fn(*args))
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), x


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="XL/2")
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--variants", nargs="+", default=["bf16", "real-w8a8"])
    ap.add_argument("--batch", type=int, default=64, help="global batch (a multiple of the device count)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--cfg-scale", type=float, default=4.0)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--devices", type=int, default=None, help="devices of the sharded run (default: all)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                    help="compute dtype (float32 separates reduction-order effects from bf16 rounding)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    n_all = a.devices or jax.device_count()
    counts = sorted({1, n_all})
    cfg = dit_config(a.model, image_size=a.image_size, dtype=a.dtype)
    params = bench.random_params(cfg)
    scfg = SamplerConfig(sampler="ddim", steps=a.steps, cfg_scale=a.cfg_scale)
    shape = (cfg.input_size, cfg.input_size, cfg.in_channels)
    ids = np.arange(a.batch)
    noise = initial_noise(0, ids, shape)
    labels = jnp.asarray(np.random.default_rng(0).integers(0, cfg.num_classes, a.batch), jnp.int32)
    key = jax.random.PRNGKey(1)
    dev = jax.devices()[0].device_kind
    print(f"{jax.device_count()} x {dev}, jax {jax.__version__}; {a.model} ({a.dtype}) DDIM {a.steps} CFG {a.cfg_scale}, "
          f"global batch {a.batch}", flush=True)
    rows = []
    for name in a.variants:
        apply_fn, vparams, _ = bench.build_variant(name, cfg, params, bench.parse_tiles("128,128,128,8,3"), False)
        ref = None
        for n in counts:
            mesh = make_mesh(n)
            fn = make_sample_fn(apply_fn, cfg, scfg, mesh=mesh)
            args = (replicate(vparams, mesh), noise, labels, key, jnp.asarray(ids, jnp.uint32))
            t0 = time.perf_counter()
            t, x = time_sampling(fn, args, a.repeats)
            row = dict(variant=name, devices=n, batch=a.batch, steps=a.steps, median_s=t, images_per_s=a.batch / t,
                       first_call_s=time.perf_counter() - t0 - t * a.repeats)
            if ref is None:
                ref = x
            else:
                base = next(r for r in rows if r["variant"] == name and r["devices"] == 1)
                row["speedup"] = row["images_per_s"] / base["images_per_s"]
                row["efficiency"] = row["speedup"] / n
                row["max_abs_diff_vs_1"] = float(np.max(np.abs(x - ref)))
                row["max_abs_x_1"] = float(np.max(np.abs(ref)))
                row["rel_rms_diff_vs_1"] = float(np.sqrt(np.mean((x - ref) ** 2) / max(np.mean(ref ** 2), 1e-30)))
                row["samples_differing"] = int(np.sum(np.any((x != ref).reshape(len(x), -1), axis=1)))
                row["identical_to_1"] = bool(np.array_equal(x, ref))
            rows.append(row)
            extra = (f"  speedup {row['speedup']:.2f}x, efficiency {row['efficiency']:.2f}, max |x - x_1| "
                     f"{row['max_abs_diff_vs_1']:.2e} (max |x_1| {row['max_abs_x_1']:.2e}, relative RMS "
                     f"{row['rel_rms_diff_vs_1']:.2e}, {row['samples_differing']}/{len(x)} samples differ)"
                     f"{' (identical)' if row['identical_to_1'] else ''}"
                     if "speedup" in row else "")
            print(f"{name:12s} {n} device(s): {t:7.3f} s  {row['images_per_s']:8.2f} img/s{extra}", flush=True)
            if a.json:
                with open(a.json, "w") as f:
                    json.dump(dict(device=dev, device_count=jax.device_count(), args=vars(a), rows=rows), f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
