"""FID Inception-v3 feature-extraction throughput (images/s), random weights, bf16 and fp32.

    python scripts/bench_inception.py                      # batch 200, 256x256 inputs, both dtypes
    python scripts/bench_inception.py --small              # CPU smoke run (batch 4)

Times the on-device part of ``extract_features``: resize 256 -> 299 plus the network, for inputs
already on the device (host transfer and uint8 conversion excluded). Warm-up, then the median
of ``--repeats`` timed calls, each synchronised with ``block_until_ready``. Speed does not depend
on the trained weights, so random parameters of the real shapes stand in for them.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp

from qdit_jax.models.inception import InceptionV3, init_inception_params


def bench(dtype: str, batch: int, size: int, repeats: int, warmup: int, preprocess: str) -> dict:
    params = init_inception_params(seed=0)
    model = InceptionV3(preprocess=preprocess, dtype=jnp.dtype(dtype))
    fn = jax.jit(lambda p, x: model.apply({"params": p}, x))
    x = jax.random.uniform(jax.random.PRNGKey(1), (batch, size, size, 3), jnp.float32)
    t0 = time.perf_counter()
    jax.block_until_ready(fn(params, x))
    compile_s = time.perf_counter() - t0
    for _ in range(warmup):
        jax.block_until_ready(fn(params, x))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(params, x))
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {"dtype": dtype, "batch": batch, "input": f"{size}x{size}", "preprocess": preprocess,
            "median_s": med, "images_per_s": batch / med, "min_s": min(times),
            "first_call_s": compile_s, "repeats": repeats}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=200)
    ap.add_argument("--size", type=int, default=256, help="input side before the resize to 299")
    ap.add_argument("--dtype", nargs="+", default=["bfloat16", "float32"])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--preprocess", default="pytorch_fid", choices=["pytorch_fid", "tf1"])
    ap.add_argument("--small", action="store_true", help="tiny CPU run: batch 4, 2 repeats, 1 warm-up")
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args()
    if args.small:
        args.batch, args.repeats, args.warmup = 4, 2, 1
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind} ({dev.platform}), jax {jax.__version__}")
    rows = [bench(d, args.batch, args.size, args.repeats, args.warmup, args.preprocess) for d in args.dtype]
    for r in rows:
        print(f"{r['dtype']:>9}  batch {r['batch']:4d}  {r['input']}  median {r['median_s'] * 1e3:9.2f} ms  "
              f"{r['images_per_s']:10.1f} img/s  (first call {r['first_call_s']:.1f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": dev.device_kind, "jax": jax.__version__, "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
