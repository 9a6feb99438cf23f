"""Run the Mosaic GEMM forms once each on random codes, for a kernel profiler or a compiler dump.

This script launches only the kernels asked for, with inputs made on the host (no XLA kernels
besides the GEMMs; ``bench_block_ops.py --sections groupgemm`` times them against XLA), so that

    ncu --section SpeedOfLight --section WarpStateStats python scripts/profile_gemm_kernels.py
    MOSAIC_GPU_DUMP_TO=/tmp/dump python scripts/profile_gemm_kernels.py --forms 64x128x4s

report on exactly those kernels (Nsight Compute's sections; Mosaic's PTX, ptxas log and SASS).
Forms: ``channel`` (per token x per channel, the default tiling), ``channel`` followed by tile_m x
tile_n x steps (per channel at another tiling, e.g. ``channel64x128x4``: the group kernels' tile), or
tile_m x tile_n x steps followed by the group mode letter (p: plain, o: overlap, s: split), as in
``bench_block_ops.py``. ``--time N`` also prints each kernel's median time (``perf.timing.chained_median``).
"""
from __future__ import annotations

import argparse

import jax
import ml_dtypes
import numpy as np

from qdit_jax.perf.timing import chained_median
from qdit_jax.quant.kernels.scaled_gemm import scaled_gemm_mosaic

SHAPES = {"proj": (1152, 1152), "fc1": (1152, 4608), "fc2": (4608, 1152)}  # (K, N) at DiT-XL/2's width


def inputs(m: int, k: int, n: int, codes: str, grouped: bool, rng: np.random.Generator) -> tuple:
    """Codes, scales and bias with the value ranges of real activations (never zeros)."""
    dt, lim = (ml_dtypes.float8_e4m3fn, 448.0) if codes == "fp8" else (np.int8, 127.0)
    a = np.clip(rng.standard_normal((m, k)) * lim / 4, -lim, lim)
    w = np.clip(rng.standard_normal((n, k)) * lim / 4, -lim, lim)
    if codes == "int8":
        a, w = np.round(a), np.round(w)
    g = k // 128
    sa = rng.uniform(0.001, 0.003, (g, m) if grouped else (m,)).astype(np.float32)
    sw = rng.uniform(0.001, 0.003, (g, n) if grouped else (n,)).astype(np.float32)
    b = (rng.standard_normal(n) * 0.1).astype(np.float32)
    return tuple(jax.device_put(v) for v in (a.astype(dt), w.astype(dt), sa, sw, b))


def parse_form(form: str) -> tuple[str, dict]:
    """(the form, its ``scaled_gemm_mosaic`` keywords), or an argparse error naming the bad form."""
    import re

    m = re.fullmatch(r"channel(?:(\d+)x(\d+)x(\d+))?|(\d+)x(\d+)x(\d+)([pos])", form)
    if m is None:
        raise argparse.ArgumentTypeError(
            f"form {form!r}: expected 'channel', 'channelTMxTNxS' or 'TMxTNxS' + p / o / s (e.g. 64x128x4s)")
    g = m.groups()
    if g[6] is not None:
        return form, dict(tile_m=int(g[3]), tile_n=int(g[4]), steps=int(g[5]),
                          group_mode={"o": "overlap", "p": "plain", "s": "split"}[g[6]])
    return form, ({} if g[0] is None else dict(tile_m=int(g[0]), tile_n=int(g[1]), steps=int(g[2])))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=65536, help="M: batch x 256 tokens (XL/2 at batch 256)")
    p.add_argument("--shapes", nargs="+", default=["proj"], choices=sorted(SHAPES))
    p.add_argument("--codes", nargs="+", default=["fp8"], choices=["fp8", "int8"])
    p.add_argument("--forms", nargs="+", type=parse_form,
                   default=[parse_form(f) for f in ("channel", "64x128x4s", "64x128x4p", "64x128x4o")])
    p.add_argument("--calls", type=int, default=1, help="launches of each kernel after its compile")
    p.add_argument("--time", type=int, default=0, help="also time N back-to-back calls (medians of 5 rounds)")
    a = p.parse_args()
    if jax.default_backend() != "gpu":
        p.error(f"the Mosaic GPU kernels need a Hopper GPU; JAX's backend here is {jax.default_backend()}")
    rng = np.random.default_rng(0)
    for shape in a.shapes:
        k, n = SHAPES[shape]
        for codes in a.codes:
            for form, kw in a.forms:
                args = inputs(a.tokens, k, n, codes, "group_mode" in kw, rng)
                fn = jax.jit(lambda *v, kw=kw: scaled_gemm_mosaic(*v, **kw))
                for _ in range(a.calls):
                    out = jax.block_until_ready(fn(*args))
                line = (f"{shape} {codes} {form}: ran {a.calls}x, out {out.shape} {out.dtype}, "
                        f"mean |y| {float(np.abs(np.asarray(out, np.float32)).mean()):.4g}")
                if a.time:
                    line += f", {chained_median(fn, args, a.time)[1] * 1e6:.1f} us per call"
                print(line, flush=True)


if __name__ == "__main__":
    main()
