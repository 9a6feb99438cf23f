"""bf16 GEMMs at DiT-XL/2's shapes (batch 256: M = 65,536 tokens): cuBLAS alone, with the bias, and
with the bias and adaLN-Zero's gated residual (``x + gate * (h @ W + b)``) as XLA compiles them;
against the Mosaic GPU bf16 matmul of JAX's Pallas examples (``hopper_matmul_mgpu``, used as a
library) at a few tilings. What a GEMM-with-residual-epilogue route for the float model would have
to beat.

    python scripts/bench_bf16_gemm.py            # on a Hopper GPU, ~1.5 min
"""
from __future__ import annotations

import argparse
import itertools

import jax
import jax.numpy as jnp
import numpy as np

from qdit_jax.perf.timing import chained_median

C = 1152  # DiT-XL/2's width


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=20)
    a = p.parse_args()
    from jax.experimental.pallas.ops.gpu import hopper_matmul_mgpu as hm

    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}", flush=True)
    r = np.random.default_rng(0)
    m, bf = a.batch * a.tokens, jnp.bfloat16
    for k, n in ((C, C), (C, 4 * C), (4 * C, C)):
        h = jnp.asarray(r.standard_normal((m, k)), bf)
        w = jnp.asarray(r.standard_normal((k, n)) / np.sqrt(k), bf)
        b = jnp.asarray(r.standard_normal(n) * 0.1, bf)
        x = jnp.asarray(r.standard_normal((m, n)), bf)
        g = jnp.asarray(r.standard_normal((a.batch, n)), bf)
        flop = 2 * m * k * n
        ref, t0 = chained_median(jax.jit(lambda h, w: h @ w), (h, w), a.repeats)
        _, t1 = chained_median(jax.jit(lambda h, w, b: h @ w + b), (h, w, b), a.repeats)
        res = jax.jit(lambda h, w, b, x, g: (x.reshape(a.batch, -1, n)
                                             + g[:, None] * (h @ w + b).reshape(a.batch, -1, n)).reshape(m, n))
        _, t2 = chained_median(res, (h, w, b, x, g), a.repeats)
        print(f"K={k} N={n}: cuBLAS {t0 * 1e6:.1f} us ({flop / t0 / 1e12:.0f} TFLOP/s), + bias {t1 * 1e6:.1f} us, "
              f"+ bias + gated residual {t2 * 1e6:.1f} us", flush=True)
        for tn, steps, wgd in itertools.product((128, 256), (3, 4), (hm.MatmulDimension.N, hm.MatmulDimension.M)):
            if n % (tn * (2 if wgd == hm.MatmulDimension.N else 1)) or m % (128 * (2 if wgd == hm.MatmulDimension.M else 1)):
                continue
            cfg = hm.TuningConfig(tile_m=128, tile_n=tn, tile_k=64, max_concurrent_steps=steps, epi_tile_n=64,
                                  epi_tile_m=64, wg_dimension=wgd)
            label = f"  Mosaic 128x{tn}, {steps} steps, warpgroups along {wgd}"
            try:
                out, t = chained_median(jax.jit(lambda h, w, cfg=cfg: hm.matmul(h, w, None, cfg)), (h, w), a.repeats)
            except Exception as e:  # noqa: BLE001 - a tiling that does not fit is reported, not fatal
                print(f"{label}: failed: {str(e)[:160]}", flush=True)
                continue
            err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref.astype(jnp.float32))))
            print(f"{label}: {t * 1e6:.1f} us ({flop / t / 1e12:.0f} TFLOP/s), max |diff| vs cuBLAS {err:.3g}", flush=True)


if __name__ == "__main__":
    main()
