"""Attention kernels at a DiT's shape: cuDNN's fused attention (what ``DiTConfig.attention="cudnn"``
runs) against ``models.attention_kernel``'s Triton kernel, by head size and launch shape.

    python scripts/bench_attention.py --batch 256 --tokens 256 --heads 16 --head-sizes 72 64

Each time is the median of rounds of back-to-back calls after warm-up (``perf.timing.chained_median``)
on random normal operands; each output is checked against the float32 reference on the first samples.
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from qdit_jax.models import attention_kernel as ak
from qdit_jax.perf.timing import chained_median

CONFIGS = [ak.Tiles(bq, bkv, w, st, mode) for bq, bkv, w, st in ((64, 64, 4, 3), (64, 64, 4, 2), (128, 64, 8, 3),
                                                                   (64, 128, 4, 2)) for mode in ak.TAIL_MODES]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-sizes", type=int, nargs="+", default=[72])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--all-configs", action="store_true", help="time every launch shape in CONFIGS, not only the default")
    args = ap.parse_args()
    print(f"device: {jax.devices()[0].device_kind}; jax {jax.__version__}")
    for d in args.head_sizes:
        ks = jax.random.split(jax.random.key(d), 3)
        q, k, v = (jax.random.normal(kk, (args.batch, args.tokens, args.heads, d), jnp.bfloat16) for kk in ks)
        ref = np.asarray(ak.attention_reference(q[:4], k[:4], v[:4]), np.float32)
        cudnn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn"))
        out, sec = chained_median(cudnn, (q, k, v), args.repeats)
        base = sec
        err = np.abs(np.asarray(out[:4], np.float32) - ref).max()
        print(f"d={d:3d} cudnn                      {sec * 1e6:8.1f} us  1.000x  max|out-ref| {err:.2e}", flush=True)
        for tiles in CONFIGS if args.all_configs else [ak.Tiles()]:
            ok, why = ak.attention_applies(q.shape, q.dtype, tiles)
            if not ok:
                print(f"d={d:3d} triton {tiles}: {why}")
                continue
            try:
                out, sec = chained_median(lambda q, k, v, t=tiles: ak.attention_triton(q, k, v, t), (q, k, v), args.repeats)
            except Exception as e:  # noqa: BLE001 - report and go on to the next launch shape
                print(f"d={d:3d} triton {tuple(tiles)} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
                continue
            err = np.abs(np.asarray(out[:4], np.float32) - ref).max()
            print(f"d={d:3d} triton {str(tuple(tiles)):32s} {sec * 1e6:8.1f} us  {base / sec:.3f}x  "
                  f"max|out-ref| {err:.2e}", flush=True)


if __name__ == "__main__":
    main()
