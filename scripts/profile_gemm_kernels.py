"""Run the Mosaic GEMM forms once each on random codes, for a kernel profiler or a compiler dump.

This script launches only the kernels asked for, with inputs made on the host (no XLA kernels
besides the GEMMs; ``bench_block_ops.py --sections groupgemm`` times them against XLA), so that

    ncu --section SpeedOfLight --section WarpStateStats python scripts/profile_gemm_kernels.py
    MOSAIC_GPU_DUMP_TO=/tmp/dump python scripts/profile_gemm_kernels.py --forms 64x128x4s

report on exactly those kernels (Nsight Compute's sections; Mosaic's PTX, ptxas log and SASS).
Forms: ``channel`` (per token x per channel, the default tiling), ``channel`` followed by tile_m x
tile_n x steps (per channel at another tiling, e.g. ``channel64x128x4``: the group kernels' tile), or
tile_m x tile_n x steps followed by the group mode letter (p: plain, o: overlap, s: split), as in
``bench_block_ops.py`` (steps ``d``: the default depth, as the model runs: an explicit depth that does
not divide the K steps restarts the pipeline per tile). ``--gelu-codes`` adds fc1's group forms with the
GELU + codes epilogue (the MLP's fc1 on group-wise layers), ``--store-wg`` the forms with their stores
on the store warpgroup (with ``--gelu-codes`` the codes' too), ``--codes-wg`` that epilogue on the
kernel's fourth warpgroup too, ``--cta-pairs`` each also as two-CTA clusters sharing the weight tile,
``--gelu-f32`` the codes forms also with their GELU in float32 (``gelu_mode``), ``--group-pairs`` the stacked
forms also with two groups a pipeline step (``group_pairs``).
``--time N`` also prints each kernel's median time (``perf.timing.chained_median``); ``--sustain R`` also
times R rounds of 12 chained calls back to back with the GPU's clock and power sampled (``perf.power``): long
enough to run at the card's power cap, as the forward does at batch 256. ``--xla`` adds XLA's own dots
(cuBLAS) on the same shapes and codes: bf16, int8 -> int32, fp8 -> float32, fp8 -> bf16.

    python scripts/profile_gemm_kernels.py --shapes fc1 --codes int8 fp8 --forms channel 64x128xds \
        --store-wg --stacked --xla --time 12 --sustain 120

is the twenty-ninth session's int8 vs fp8 table (docs/RESULTS.md).
"""
from __future__ import annotations

import argparse
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from qdit_jax.perf.timing import chained_median
from qdit_jax.quant.config import QuantSpec
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


_DN = (((1,), (1,)), ((), ()))  # a (M, K) x w (N, K) -> (M, N)


def xla_dots(m: int, k: int, n: int, rng: np.random.Generator) -> list[tuple[str, Any, tuple]]:
    """(label, jitted fn, args) of XLA's dots at this shape on random operands (never zeros): bf16 -> bf16,
    int8 -> int32, fp8 e4m3 -> float32 and -> bf16, the library GEMMs our kernels are compared with."""
    from jax import lax

    def dot(out_dtype: Any) -> Any:
        return jax.jit(lambda a, w: lax.dot_general(a, w, _DN, preferred_element_type=out_dtype))

    ab = jax.device_put(rng.standard_normal((m, k)).astype(jnp.bfloat16))
    wb = jax.device_put(rng.standard_normal((n, k)).astype(jnp.bfloat16))
    i8 = inputs(m, k, n, "int8", False, rng)[:2]
    f8 = inputs(m, k, n, "fp8", False, rng)[:2]
    return [("xla bf16 -> bf16", dot(jnp.bfloat16), (ab, wb)), ("xla int8 -> int32", dot(jnp.int32), i8),
            ("xla fp8 -> float32", dot(jnp.float32), f8), ("xla fp8 -> bf16", dot(jnp.bfloat16), f8)]


def sustained(fn: Any, args: tuple, rounds: int) -> str:
    """Median time of ``rounds`` rounds of 12 chained calls run back to back, with the SM clock, power and
    power-capped share of nvidia-smi's samples over them (12 a round: each output stays alive until its
    round syncs, and an fc1 output at XL/2's batch 256 is 0.6-1.2 GB)."""
    from qdit_jax.perf.power import PowerLog

    with PowerLog(interval_ms=50) as log:
        log.mark()
        _, t = chained_median(fn, args, 12, rounds=rounds, warmup=1)
        log.mark()
    s = log.summary()
    power = "" if s is None else (f" at {s['sm_mhz']:.0f} MHz, {s['power_w']:.0f} W, "
                                  f"{100 * s['power_capped']:.0f}% power-capped")
    return f", sustained {t * 1e6:.1f} us per call{power}"


def codes_spec(codes: str) -> QuantSpec:
    """fc2's input spec in a group-wise MLP: symmetric 8-bit codes per token and 128-channel group."""
    return QuantSpec(bits=8, format="int" if codes == "int8" else "fp8_e4m3", symmetric=True, group_size=128)


def parse_form(form: str) -> tuple[str, dict]:
    """(the form, its ``scaled_gemm_mosaic`` keywords), or an argparse error naming the bad form."""
    import re

    m = re.fullmatch(r"channel(?:(\d+)x(\d+)x(\d+))?|(\d+)x(\d+)x(\d+|d)([pos])", form)
    if m is None:
        raise argparse.ArgumentTypeError(
            f"form {form!r}: expected 'channel', 'channelTMxTNxS' or 'TMxTNxS' + p / o / s (e.g. 64x128x4s; "
            "steps 'd': the default depth, chained across tiles where it divides the K steps)")
    g = m.groups()
    if g[6] is not None:
        return form, dict(tile_m=int(g[3]), tile_n=int(g[4]), steps=None if g[5] == "d" else int(g[5]),
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
    p.add_argument("--sustain", type=int, default=0, metavar="R",
                   help="also time R rounds of 12 chained calls back to back, with the clock and power logged")
    p.add_argument("--xla", action="store_true", help="also run XLA's dots (cuBLAS) on each shape: bf16, int8 -> "
                                                      "int32, fp8 -> float32 / bf16")
    p.add_argument("--gelu-codes", action="store_true",
                   help="group forms at fc1's shape also run with the GELU + next-layer codes epilogue (as in the MLP)")
    p.add_argument("--codes-wg", action="store_true",
                   help="with --gelu-codes, group forms also run with that epilogue on a fourth warpgroup "
                        "(scaled_gemm codes_wg)")
    p.add_argument("--cta-pairs", action="store_true",
                   help="every form also as two-CTA clusters sharing the weight tile (scaled_gemm cta_pairs)")
    p.add_argument("--gelu-f32", action="store_true",
                   help="with --gelu-codes, each codes form also with its GELU in float32 (scaled_gemm gelu_mode)")
    p.add_argument("--store-wg", action="store_true",
                   help="group forms also run with their TMA stores on the store warpgroup (scaled_gemm store_wg), "
                        "with --gelu-codes the codes epilogue's too")
    p.add_argument("--stacked", action="store_true",
                   help="'split' forms (not on the codes warpgroup) also with their two parts stacked along M "
                        "(scaled_gemm stacked)")
    p.add_argument("--group-pairs", action="store_true",
                   help="stacked forms also with two groups a pipeline step (scaled_gemm group_pairs)")
    p.add_argument("--bias-first", action="store_true",
                   help="group forms start their sums at the bias (scaled_gemm bias_first; fp8's model default)")
    a = p.parse_args()
    if jax.default_backend() != "gpu":
        p.error(f"the Mosaic GPU kernels need a Hopper GPU; JAX's backend here is {jax.default_backend()}")
    rng = np.random.default_rng(0)
    for shape in a.shapes:
        k, n = SHAPES[shape]
        for label, fn, args in xla_dots(a.tokens, k, n, rng) if a.xla else []:
            _report(f"{shape} {label}", fn, args, a)
        for codes in a.codes:
            for form, kw in a.forms:
                variants = [(form, kw)]
                if a.store_wg and "group_mode" in kw:
                    variants.append((form + "+stwg", dict(kw, store_wg=True)))
                if a.gelu_codes and shape == "fc1" and "group_mode" in kw:
                    codes_kw = dict(kw, gelu_codes=codes_spec(codes))
                    variants.append((form + "+codes", codes_kw))
                    if a.codes_wg:
                        variants.append((form + "+codes+wg", dict(codes_kw, codes_wg=True)))
                    if a.store_wg:
                        variants.append((form + "+codes+stwg", dict(codes_kw, store_wg=True)))
                    if a.gelu_f32:
                        variants += [(label + "+g32", dict(vkw, gelu_mode="float32")) for label, vkw in variants
                                     if "gelu_codes" in vkw]
                if a.cta_pairs:
                    variants += [(label + "+pairs", dict(vkw, cta_pairs=True)) for label, vkw in variants]
                if a.stacked:
                    variants += [(label + "+stack", dict(vkw, stacked=True)) for label, vkw in variants
                                 if vkw.get("group_mode") == "split" and not vkw.get("codes_wg")]
                if a.group_pairs:
                    variants += [(label + "+g2", dict(vkw, group_pairs=True)) for label, vkw in variants
                                 if vkw.get("stacked")]
                if a.bias_first:
                    variants = [(label, dict(vkw, bias_first=True) if "group_mode" in vkw else vkw)
                                for label, vkw in variants]
                args = inputs(a.tokens, k, n, codes, "group_mode" in kw, rng)
                for label, vkw in variants:
                    fn = jax.jit(lambda *v, kw=vkw: scaled_gemm_mosaic(*v, **kw))
                    for _ in range(a.calls):
                        out = jax.block_until_ready(fn(*args))
                    _report(f"{shape} {codes} {label}", fn, args, a, out)


def _report(label: str, fn: Any, args: tuple, a: argparse.Namespace, out: Any = None) -> None:
    """One line for one kernel: its output's shape and mean magnitude, and the times asked for."""
    out = jax.block_until_ready(fn(*args)) if out is None else out
    y = out[0] if isinstance(out, tuple) else out
    line = f"{label}: out {y.shape} {y.dtype}, mean |y| {float(np.abs(np.asarray(y, np.float32)).mean()):.4g}"
    if a.time:
        line += f", {chained_median(fn, args, a.time)[1] * 1e6:.1f} us per call"
    if a.sustain:
        line += sustained(fn, args, a.sustain)
    print(line, flush=True)


if __name__ == "__main__":
    main()
