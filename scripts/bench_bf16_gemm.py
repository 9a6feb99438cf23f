"""bf16 GEMMs at DiT-XL/2's shapes (batch 256: M = 65,536 tokens): cuBLAS alone, with the bias, and
with the bias and adaLN-Zero's gated residual (``x + gate * (h @ W + b)``) as XLA compiles them;
against our persistent Mosaic GEMM in bf16 (``kernels.scaled_gemm.gemm_bf16_mosaic``, the residual in
its epilogue) at a few tilings, and the Mosaic GPU bf16 matmul of JAX's Pallas examples
(``hopper_matmul_mgpu``, used as a library). What a GEMM-with-residual-epilogue route for the float
model has to beat.

    python scripts/bench_bf16_gemm.py --impls ours            # on a Hopper GPU, ~1 min
    python scripts/bench_bf16_gemm.py --impls ours example    # ~2.5 min
"""
from __future__ import annotations

import argparse
import itertools

import jax
import jax.numpy as jnp
import numpy as np

from qdit_jax.perf.timing import chained_median

C = 1152  # DiT-XL/2's width
OURS_TILINGS = ((128, 128, 3), (128, 128, 4), (64, 256, 3), (64, 128, 4))  # (rows per warpgroup, tile_n, steps)


def _diff(out: jax.Array, ref: jax.Array) -> str:
    d = jnp.abs(out.astype(jnp.float32) - ref.astype(jnp.float32))
    return f"max |diff| {float(jnp.max(d)):.3g}, equal {float(jnp.mean(d == 0)) * 100:.2f}%"


def _ours(h, w, b, x, g, t_ref, flop, repeats, refs) -> None:
    """Our kernel at OURS_TILINGS, against ``refs``: (cuBLAS + bias, cuBLAS + bias + residual or None)."""
    from qdit_jax.quant.kernels.scaled_gemm import gemm_bf16_mosaic

    wt = jax.block_until_ready(w.T)  # (N, K): the kernel's weight layout (as timed in RESULTS.md)
    n = wt.shape[0]
    for tm, tn, steps in OURS_TILINGS:
        if n % tn or h.shape[0] % (2 * tm):
            continue
        label = f"  ours {tm}x{tn}, {steps} steps"
        kw = dict(tile_m=tm, tile_n=tn, steps=steps)
        try:
            out, t = chained_median(jax.jit(lambda h, w, b: gemm_bf16_mosaic(h, w, b, **kw)), (h, wt, b), repeats)
            print(f"{label} + bias: {t * 1e6:.1f} us ({flop / t / 1e12:.0f} TFLOP/s, {t / t_ref:.3f}x cuBLAS), "
                  f"vs cuBLAS + bias {_diff(out, refs[0])}", flush=True)
            if refs[1] is not None:
                res = jax.jit(lambda h, w, b, x, g: gemm_bf16_mosaic(h, w, b, residual=x, gate=g, **kw))
                out, t = chained_median(res, (h, wt, b, x, g), repeats)
                print(f"{label} + bias + gated residual: {t * 1e6:.1f} us ({t / t_ref:.3f}x cuBLAS), vs XLA "
                      f"{_diff(out, refs[1])}", flush=True)
        except Exception as e:  # noqa: BLE001 - a tiling that does not fit is reported, not fatal
            print(f"{label}: failed: {str(e)[:200]}", flush=True)


def _example(h, w, ref, flop, repeats) -> None:
    from jax.experimental.pallas.ops.gpu import hopper_matmul_mgpu as hm

    m, n = h.shape[0], w.shape[1]
    for tn, steps, wgd in itertools.product((128, 256), (3, 4), (hm.MatmulDimension.N, hm.MatmulDimension.M)):
        if n % (tn * (2 if wgd == hm.MatmulDimension.N else 1)) or m % (128 * (2 if wgd == hm.MatmulDimension.M else 1)):
            continue
        cfg = hm.TuningConfig(tile_m=128, tile_n=tn, tile_k=64, max_concurrent_steps=steps, epi_tile_n=64,
                              epi_tile_m=64, wg_dimension=wgd)
        label = f"  example 128x{tn}, {steps} steps, warpgroups along {wgd}"
        try:
            out, t = chained_median(jax.jit(lambda h, w, cfg=cfg: hm.matmul(h, w, None, cfg)), (h, w), repeats)
        except Exception as e:  # noqa: BLE001
            print(f"{label}: failed: {str(e)[:160]}", flush=True)
            continue
        print(f"{label}: {t * 1e6:.1f} us ({flop / t / 1e12:.0f} TFLOP/s), vs cuBLAS {_diff(out, ref)}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--impls", nargs="+", default=["ours"], choices=["ours", "example"])
    a = p.parse_args()

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
        ref_b, t1 = chained_median(jax.jit(lambda h, w, b: h @ w + b), (h, w, b), a.repeats)
        res = jax.jit(lambda h, w, b, x, g: (x.reshape(a.batch, -1, n)
                                             + g[:, None] * (h @ w + b).reshape(a.batch, -1, n)).reshape(m, n))
        ref_r, t2 = chained_median(res, (h, w, b, x, g), a.repeats)
        print(f"K={k} N={n}: cuBLAS {t0 * 1e6:.1f} us ({flop / t0 / 1e12:.0f} TFLOP/s), + bias {t1 * 1e6:.1f} us, "
              f"+ bias + gated residual {t2 * 1e6:.1f} us", flush=True)
        if "ours" in a.impls:
            _ours(h, w, b, x, g, t0, flop, a.repeats, (ref_b, ref_r if n == C else None))
        if "example" in a.impls:
            _example(h, w, ref, flop, a.repeats)


if __name__ == "__main__":
    main()
