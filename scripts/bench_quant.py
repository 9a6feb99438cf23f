"""Real low-bit DiT on the GPU, in one run: kernel check, layer profile, forward / sampling bench.

    python scripts/bench_quant.py --sections check,layer,forward --batch 256 --out /tmp/bq

1. check: the Pallas group GEMM against its float32 reference on random data (never zeros) at
   DiT-XL/2's fc1 shape, int8 / packed-int4 weights, per-channel and group 128, symmetric and
   asymmetric weights, in-kernel activation quantization; relative errors printed.
2. layer: one fc1-shaped layer (M = batch x 256 tokens, K 1152, N 4608) timed in pieces: bf16
   dot, int8 dot alone (int32 out), per-token quantize pass alone, the XLA W8A8 layer, fp8 dots,
   the Pallas kernel (tile variants), W4, fused quantization, the grouped XLA fallback.
3. forward (and sampling): ``qdit bench`` with the fastest tiles from section 2.
Medians of repeated timed calls after warm-up, block_until_ready, rotating two random input sets.
"""
from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from qdit_jax.cli import bench
from qdit_jax.perf.timing import synced_calls
from qdit_jax.perf.trace import KINDS, hlo_kinds
from qdit_jax.quant.kernels.group_gemm import (Tiles, group_gemm_pallas, group_gemm_reference, group_gemm_xla,
                                               pack_blocked)
from qdit_jax.quant.quantizers import QuantSpec
from qdit_jax.quant.real import quantize_act


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b)) if np.all(np.isfinite(a)) else float("nan")


def operands(key: int, m: int, n: int, k: int, g: int, bits: int, asym: bool):
    r = np.random.default_rng(key)
    x = jnp.asarray(r.standard_normal((m, k)), jnp.bfloat16)
    lim = 2 ** (bits - 1)
    w = jnp.asarray(r.integers(-lim, lim, (n, k)), jnp.int8)
    store = pack_blocked(w) if bits == 4 else w
    sw = jnp.asarray(r.uniform(0.5, 1.5, (g, n)) / (lim * 30), jnp.float32)
    zw = jnp.asarray(r.integers(-3, 4, (g, n)), jnp.float32) if asym else None
    bias = jnp.asarray(r.standard_normal(n), jnp.float32)
    return x, store, sw, zw, bias


def check(tiles: Tiles, log: list) -> None:
    m, n, k = 1024, 4608, 1152
    for g, bits, asym, fuse in [(9, 8, False, False), (1, 8, False, False), (9, 4, False, False),
                                (9, 8, True, False), (9, 8, False, True), (9, 4, False, True), (1, 4, True, False)]:
        name = f"check g{k // g} w{bits} {'asym' if asym else 'sym'}{' fused' if fuse else ''}"
        try:
            x, store, sw, zw, bias = operands(g * 10 + bits, m, n, k, g, bits, asym)
            qa, sa = quantize_act(x, QuantSpec(bits=8, group_size=k // g, symmetric=True), k // g)
            ref = group_gemm_reference(qa, sa, store, sw, bias, zw)
            rs = None if zw is None else jnp.sum(qa.reshape(m, g, -1).astype(jnp.int32), -1).T
            f = jax.jit(lambda *a: group_gemm_pallas(*a, out_dtype=jnp.float32, tiles=tiles, fuse_quant=fuse))
            out = f(x, None, store, sw, bias, zw, None) if fuse else f(qa, sa, store, sw, bias, zw, rs)
            xla = group_gemm_xla(qa, sa, store, sw, bias, zw)
            line = f"{name:32s} pallas/ref {rel(out, ref):.2e}  xla/ref {rel(xla, ref):.2e}"
        except Exception as e:
            line = f"{name:32s} FAILED {type(e).__name__}: {str(e)[:400]}"
        print(line, flush=True)
        log.append(line)
    from qdit_jax.quant.kernels.act_quant import quantize_rows_pallas

    for group in (k, 128):  # the one-pass activation quantization kernel against the XLA path
        name = f"check act-quant kernel g{group}"
        try:
            x = operands(group, m, n, k, 1, 8, False)[0]
            q_ref, s_ref = quantize_act(x, QuantSpec(bits=8, group_size=0 if group == k else group, symmetric=True), group)
            q, s = jax.jit(lambda a: quantize_rows_pallas(a, group))(x)
            same = float(np.mean(np.asarray(q) == np.asarray(q_ref)))
            dmax = int(np.abs(np.asarray(q, np.int32) - np.asarray(q_ref, np.int32)).max())
            line = f"{name:32s} codes equal {same:.6f}  max |code diff| {dmax}  scales rel {rel(s, s_ref):.1e}"
        except Exception as e:
            line = f"{name:32s} FAILED {type(e).__name__}: {str(e)[:400]}"
        print(line, flush=True)
        log.append(line)


def gemm_kinds(fj, args) -> str:
    """Which GEMM implementations XLA compiled: cuBLAS(Lt) custom calls, Triton GEMM fusions, other
    kernels (the Pallas kernel shows as a Triton custom call); counts per kind."""
    try:
        text = fj.lower(*args).compile().as_text()
    except Exception as e:  # noqa: BLE001 - diagnostics only
        return f"hlo unavailable: {type(e).__name__}"
    kinds = collections.Counter(kind for kind, _ in hlo_kinds(text, entry_only=True).values())
    return ", ".join(f"{k} {kinds[k]}" for k in KINDS if kinds[k] and k != "other")


def layer_profile(batch: int, repeats: int, tile_list: list[Tiles], log: list) -> Tiles:
    m, n, k = batch * 256, 4608, 1152
    flop = 2 * m * n * k
    sets = [operands(s, m, n, k, 9, 8, False) for s in range(2)]
    sets4 = [operands(s + 5, m, n, k, 9, 4, False) for s in range(2)]
    spec0, spec128 = QuantSpec(bits=8, group_size=0, symmetric=True), QuantSpec(bits=8, group_size=128, symmetric=True)
    wbf = [jnp.asarray(np.random.default_rng(s).standard_normal((n, k)) * 0.02, jnp.bfloat16) for s in range(2)]
    dims = (((1,), (1,)), ((), ()))
    results = {}

    def t(name, fn, args_list):
        try:
            fj = jax.jit(fn)
            s = statistics.median(synced_calls(fj, args_list, repeats, warmup=2))
            results[name] = s
            line = (f"layer b{batch} {name:44s} {s * 1e6:9.1f} us  {flop / s / 1e12:7.1f} T(FL)OP/s-equiv  "
                    f"[{gemm_kinds(fj, args_list[0])}]")
        except Exception as e:
            line = f"layer b{batch} {name:44s} FAILED {type(e).__name__}: {str(e)[:300]}"
        print(line, flush=True)
        log.append(line)

    xs = [s[0] for s in sets]
    pre0 = [quantize_act(x, spec0, k) for x in xs]
    pre128 = [quantize_act(x, spec128, 128) for x in xs]
    sw1 = [jnp.ones((1, n), jnp.float32) * 1e-3, jnp.ones((1, n), jnp.float32) * 2e-3]
    t("bf16 dot (bf16 out)", lambda x, w: jax.lax.dot_general(x, w, dims, preferred_element_type=jnp.bfloat16),
      list(zip(xs, wbf)))
    t("int8 dot alone (int32 out)", lambda a, w: jax.lax.dot_general(a, w, dims, preferred_element_type=jnp.int32),
      [(p[0], s[1]) for p, s in zip(pre0, sets)])
    t("quantize pass alone (per-token)", lambda x: quantize_act(x, spec0, k), [(x,) for x in xs])
    t("quantize pass alone (group 128)", lambda x: quantize_act(x, spec128, 128), [(x,) for x in xs])
    from qdit_jax.quant.kernels.act_quant import quantize_rows_pallas

    t("quantize pass, one-pass Pallas kernel (per-token)", lambda x: quantize_rows_pallas(x, k), [(x,) for x in xs])
    t("quantize pass, one-pass Pallas kernel (group 128)", lambda x: quantize_rows_pallas(x, 128), [(x,) for x in xs])
    t("int8 dot + epilogue (pre-quantized)", lambda a, sa, w, sw, b: group_gemm_xla(a, sa, w, sw, b, out_dtype=jnp.bfloat16),
      [(p[0], p[1], s[1], s1, s[4]) for p, s, s1 in zip(pre0, sets, sw1)])
    t("int8 dot + separate epilogue pass (pre-quantized)", lambda a, sa, w, sw, b: group_gemm_xla(
        a, sa, w, sw, b, out_dtype=jnp.bfloat16, split_epilogue=True), [(p[0], p[1], s[1], s1, s[4]) for p, s, s1 in zip(pre0, sets, sw1)])

    def xla_layer(x, w, sw, b):
        qa, sa = quantize_act(x, spec0, k)
        return group_gemm_xla(qa, sa, w, sw, b, out_dtype=jnp.bfloat16)

    t("XLA W8A8 per-channel layer (quant+dot+epi)", xla_layer, [(s[0], s[1], s1, s[4]) for s, s1 in zip(sets, sw1)])

    def xla_layer_barrier(x, w, sw, b):  # codes materialized: XLA cannot fuse the quantize into the GEMM
        qa, sa = jax.lax.optimization_barrier(quantize_act(x, spec0, k))
        return group_gemm_xla(qa, sa, w, sw, b, out_dtype=jnp.bfloat16)

    t("XLA W8A8 per-channel layer, barrier", xla_layer_barrier, [(s[0], s[1], s1, s[4]) for s, s1 in zip(sets, sw1)])

    def qk_layer(x, w, sw, b):  # the one-pass Pallas quantize, then the XLA int8 GEMM + epilogue
        qa, sa = quantize_rows_pallas(x, k)
        return group_gemm_xla(qa, sa, w, sw, b, out_dtype=jnp.bfloat16)

    t("W8A8 per-channel layer, Pallas quantize + XLA GEMM", qk_layer, [(s[0], s[1], s1, s[4]) for s, s1 in zip(sets, sw1)])
    f8 = jnp.float8_e4m3fn
    a8 = [x.astype(f8) for x in xs]
    w8 = [s[1].astype(f8) for s in sets]
    t("fp8 dot alone (f32 out)", lambda a, w: jax.lax.dot_general(a, w, dims, preferred_element_type=jnp.float32),
      list(zip(a8, w8)))
    t("fp8 dot alone (bf16 out)", lambda a, w: jax.lax.dot_general(a, w, dims, preferred_element_type=jnp.bfloat16),
      list(zip(a8, w8)))
    best, best_t = tile_list[0], float("inf")
    for tl in tile_list:
        tag = f"{tl.bm}x{tl.bn}x{tl.bk} w{tl.num_warps} s{tl.num_stages}"
        t(f"pallas g128 W8 pre-quant {tag}",
          lambda a, sa, w, sw, b, tl=tl: group_gemm_pallas(a, sa, w, sw, b, tiles=tl),
          [(p[0], p[1], s[1], s[2], s[4]) for p, s in zip(pre128, sets)])
        r = results.get(f"pallas g128 W8 pre-quant {tag}")
        if r is not None and r < best_t:
            best, best_t = tl, r
    t("pallas per-channel W8 pre-quant (best tiles)",
      lambda a, sa, w, sw, b: group_gemm_pallas(a, sa, w, sw, b, tiles=best),
      [(p[0], p[1], s[1], s1, s[4]) for p, s, s1 in zip(pre0, sets, sw1)])

    def pallas_layer(x, w, sw, b, spec=spec128, grp=128):
        qa, sa = quantize_act(x, spec, grp)
        return group_gemm_pallas(qa, sa, w, sw, b, tiles=best)

    t("pallas g128 W8 layer (XLA quant + kernel)", pallas_layer, [(s[0], s[1], s[2], s[4]) for s in sets])
    t("pallas g128 W4 layer (XLA quant + kernel)", pallas_layer, [(s[0], s[1], s[2], s[4]) for s in sets4])
    t("pallas per-channel W8 layer (XLA quant + kernel)",
      lambda x, w, sw, b: pallas_layer(x, w, sw, b, spec0, k), [(s[0], s[1], s1, s[4]) for s, s1 in zip(sets, sw1)])
    t("pallas g128 W8 fused-quant kernel",
      lambda x, w, sw, b: group_gemm_pallas(x, None, w, sw, b, tiles=best, fuse_quant=True),
      [(s[0], s[1], s[2], s[4]) for s in sets])
    t("pallas g128 W4 fused-quant kernel",
      lambda x, w, sw, b: group_gemm_pallas(x, None, w, sw, b, tiles=best, fuse_quant=True),
      [(s[0], s[1], s[2], s[4]) for s in sets4])
    if batch <= 64:
        t("XLA grouped fallback g128 W8 (quant+dot)", lambda x, w, sw, b: group_gemm_xla(
            *quantize_act(x, spec128, 128), w, sw, b, out_dtype=jnp.bfloat16), [(s[0], s[1], s[2], s[4]) for s in sets])
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", default="check,layer,forward")
    ap.add_argument("--layer-batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", default=".")
    ap.add_argument("--tile-list", default="128,128,128,8,3;128,256,128,8,3;256,128,128,8,3")
    args, rest = ap.parse_known_args()
    os.makedirs(args.out, exist_ok=True)
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}", flush=True)
    sections = set(args.sections.split(","))
    tile_list = [bench.parse_tiles(s) for s in args.tile_list.split(";")]
    log: list[str] = []
    best = tile_list[0]
    t0 = time.perf_counter()
    if "check" in sections:
        check(tile_list[0], log)
    if "layer" in sections:
        best = layer_profile(args.layer_batch, args.repeats, tile_list, log)
        print(f"best tiles: {best}  ({time.perf_counter() - t0:.0f}s so far)", flush=True)
    with open(os.path.join(args.out, "kernel_layer.txt"), "w") as f:
        f.write("\n".join(log) + "\n")
    if "forward" in sections:
        p = argparse.ArgumentParser()
        bench.add_arguments(p)
        tiles = f"{best.bm},{best.bn},{best.bk},{best.num_warps},{best.num_stages}"
        fargs = p.parse_args(["--tiles", tiles, "--json", os.path.join(args.out, "bench.json")] + rest)
        bench.run(fargs)
    print("\n".join(["", "kernel / layer summary:"] + log))
    return 0


if __name__ == "__main__":
    sys.exit(main())
