"""DiT forward throughput (images/s and fraction of the card's bf16 peak), random weights.

    python scripts/bench_forward.py --model XL/2 --batch 64 256 --dtype bfloat16

Speed does not depend on trained weights, so the released DiT-XL/2 is stood in for by random
parameters of its shape. Timings: warm-up, then the median of ``--repeats`` timed calls, each
synchronised with ``block_until_ready``; inputs are random normals (never zeros).
"""
from __future__ import annotations

import argparse
import json
import statistics

import jax
import jax.numpy as jnp
import numpy as np

from qdit_jax.cli import bench
from qdit_jax.perf.timing import synced_calls
from qdit_jax.models.dit import DiT, dit_config, flops_per_forward

PEAK_BF16 = bench.PEAK_BF16


def peak_for(device: jax.Device) -> float | None:
    for name, peak in PEAK_BF16.items():
        if name.lower() in device.device_kind.lower():
            return peak
    return None


def measured_matmul_peak(n: int, repeats: int) -> float:
    """FLOP/s of an n x n x n bf16 matmul on random data: the ceiling actually reachable here."""
    return bench.matmul_peak(n, repeats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="XL/2")
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--batch", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--matmul-peak", type=int, default=8192,
                    help="also time an NxNxN bf16 matmul as the measured ceiling (0: skip)")
    args = ap.parse_args()

    cfg = dit_config(args.model, image_size=args.image_size, dtype=args.dtype)
    params = bench.random_params(cfg)
    model = DiT(cfg)
    fwd = jax.jit(lambda p, x, t, y: model.apply({"params": p}, x, t, y))
    dev = jax.devices()[0]
    peak = peak_for(dev)
    measured = measured_matmul_peak(args.matmul_peak, args.repeats) if args.matmul_peak else None
    if measured:
        print(f"measured bf16 matmul {args.matmul_peak}^3: {measured / 1e12:.1f} TFLOP/s", flush=True)
    flops = flops_per_forward(cfg)
    rows = []
    for b in args.batch:
        rng = np.random.default_rng(b)
        inputs = [
            (params,
             jnp.asarray(rng.standard_normal((b, cfg.input_size, cfg.input_size, cfg.in_channels)), jnp.float32),
             jnp.asarray(rng.integers(0, 1000, b), jnp.int32),
             jnp.asarray(rng.integers(0, cfg.num_classes, b), jnp.int32))
            for _ in range(3)
        ]
        t = statistics.median(synced_calls(fwd, inputs, args.repeats, warmup=3))
        ips = b / t
        frac = ips * flops / peak if peak else float("nan")
        mfrac = ips * flops / measured if measured else float("nan")
        rows.append(dict(model=args.model, batch=b, dtype=args.dtype, median_s=t, images_per_s=ips,
                         tflops=ips * flops / 1e12, datasheet_peak_fraction=frac,
                         measured_peak_fraction=mfrac, device=dev.device_kind))
        print(f"{args.model} {args.dtype} batch {b:4d}: {t * 1e3:8.2f} ms  {ips:8.1f} img/s  "
              f"{ips * flops / 1e12:6.1f} TFLOP/s  {frac:.3f} of datasheet peak, {mfrac:.3f} of measured "
              f"matmul peak ({dev.device_kind})", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(jax=jax.__version__, rows=rows), f, indent=2)


if __name__ == "__main__":
    main()
