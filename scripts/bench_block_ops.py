"""Time formulations of two DiT block pieces that a profile showed costing more than they should.

    python scripts/bench_block_ops.py --batch 256 --repeats 20

1. The MLP's tanh GELU: XLA evaluates ``tanh`` in float32 with a long polynomial; on the fc1
   output of DiT-XL/2 (batch 256: 302 M elements) that pass costs about half an fc1 GEMM. The
   identity ``0.5 x (1 + tanh(u)) = x * sigmoid(2u)`` gives the same function with an ``exp``;
   the script times each formulation of fc2(gelu(fc1(x))) and says whether XLA moved the GELU
   into the cuBLASLt epilogue, and measures each one's error against a float64 reference.
2. The attention's fused qkv: slicing q / k / v out of one (B, N, 3, H, D) output copies them
   (cuDNN wants each dense); three GEMMs on column slices of the same weight write them directly.
3. The real W8A8 / fp8 MLP's middle step (fc1's scale epilogue, GELU, fc2's per-token activation
   quantization): XLA's two passes against the one-pass Pallas kernel (``kernels.gelu_quant``) at
   several tilings, with the kernel's agreement with XLA (codes equal, scales).
4. The per-token quantization of the qkv / fc1 inputs (LayerNorm + modulate + abs-max + codes) and of
   the proj input (abs-max + codes): XLA's passes against the one-pass Pallas kernel
   (``kernels.norm_quant``) at several tilings, with its agreement with XLA.
5. The real fp8 qkv layer's GEMM and scale epilogue writing q, k, v: cuBLAS + XLA's epilogue pass
   against fp8 GEMMs that apply the scales in their epilogue: the Mosaic GPU kernel
   (``kernels.scaled_gemm``) and a Pallas (Triton) one (1.85x slower than cuBLAS + the pass).
6. ``fc2ing``: the group-128 MLP middle step (a group-wise fc1's bf16 output -> GELU -> fc2's group
   codes): XLA against ``kernels.gelu_quant`` at several tilings.
7. ``groupgemm``: group-128 fp8 / int8 GEMMs at the DiT's three shapes (proj, fc1, fc2): XLA's
   batched group product + epilogue, the Triton group kernel (int8, ``kernels.group_gemm``) and
   the Mosaic GPU GEMM with the group scales in its K loop (``kernels.scaled_gemm``) at several
   tilings, beside the per-channel Mosaic GEMM and cuBLAS' per-channel fp8 GEMM of the same shape.
8. ``epidiag``: the per-channel fp8 Mosaic GEMM at q, k, v (one call), fc1 and fc2 beside cuBLAS' fp8
   GEMM alone, with its epilogue on a fourth warpgroup (``epilogue_wg``), and, as diagnostics (patched
   kernel bodies, outputs not the layer's), the kernel with its epilogue's scale / bias arithmetic left
   out and with its global store left out too: how much of the gap to cuBLAS is the epilogue, run while
   the tensor cores wait.
9. ``groupepi``: group-128 fp8 / int8 q, k, v and proj / fc2 with the gated residual, the epilogue in
   the compute warpgroups or on the fourth warpgroup (``epilogue_wg``).
10. ``fwddiag``: the XL/2 forward (``qdit bench`` at ``--batch``, bf16 beside the fp8 group-128 model with
   side-by-side parts) with a
   diagnostic of ``--fwddiag-kinds`` patched into every group GEMM of the model ('default': none; the kinds of
   ``_patched_epilogue``, outputs wrong by design): what a K-step cost is worth in the power-capped forward.
12. ``attncodes``: XL/2's attention at ``--batch`` (16 heads of 72) followed by the proj input's group-128
   quantization (fp8 and int8): the Mosaic attention kernel + ``kernels.norm_quant``'s pass (the unfused
   real path) against ``kernels.attention_codes`` (the codes written by the attention kernel's epilogue),
   with the attention kernel alone, and the fused codes' agreement with the unfused ones.
13. ``attnforms``: the bf16 attention kernel's body (``attention_mosaic.run_kernel``) in the forms of
   ``--attn-forms``: head size, one or all head groups an item (looped), K / V steps unrolled or looped, K / V
   stages; each against the production kernel at that head size (outputs compared bit for bit). The compute
   warpgroups in ping-pong and K / V reused across query blocks were measured here (commit 4e7c4f9).
11. ``floor``: what moving the row kernels' bytes costs without their math: XLA's elementwise
   bf16 -> fp8 pass over the MLP middle step's (M, 4,608) and the row kernels' (M, 1,152) arrays, a
   read-only abs-max, and a Pallas (Triton) kernel with the MLP middle kernel's tiling and row
   dependency (all pieces loaded, the row's abs-max, then the scaled pieces stored) but no GELU.

Each time is the median over 5 rounds of ``--repeats`` calls dispatched back to back and
device-synchronized once, after warm-up (until 2026-11-26 each call was synchronized on its own,
which added the host round trip to every call and inflated the short kernels' times); inputs are
random.
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from qdit_jax.perf.timing import chained_median

C, HIDDEN, HEADS = 1152, 4608, 16
SQRT_2_OVER_PI = 0.7978845608028654


def gelu_jax(y):
    return jax.nn.gelu(y, approximate=True)


def gelu_sigmoid(y):
    """x * sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3): the tanh GELU, written with exp."""
    y32 = y.astype(jnp.float32)
    u2 = (2 * SQRT_2_OVER_PI) * (y32 + 0.044715 * y32 * y32 * y32)
    return (y32 / (1.0 + jnp.exp(-u2))).astype(y.dtype)


def gelu_tanh32(y):
    y32 = y.astype(jnp.float32)
    return (0.5 * y32 * (1.0 + jnp.tanh(SQRT_2_OVER_PI * (y32 + 0.044715 * y32 ** 3)))).astype(y.dtype)


GELUS = {"jax.nn.gelu": gelu_jax, "sigmoid-exp f32": gelu_sigmoid, "tanh f32": gelu_tanh32, "none": lambda y: y}


def timed(fn, args, repeats: int) -> float:
    """Median seconds per call of ``repeats`` back-to-back calls (``perf.timing.chained_median``)."""
    return chained_median(fn, args, repeats)[1]


def run_timed(label: str, fn, args, repeats: int):
    """``(fn(*args), seconds per call)``, or None after printing why ``fn`` failed to compile or run
    (a form a kernel cannot compile is reported, not fatal)."""
    try:
        return chained_median(fn, args, repeats)
    except Exception as e:  # noqa: BLE001
        print(f"{label}: failed: {str(e)[:400]}", flush=True)
        return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--mosaic-only", action="store_true", help="qkvgemm: skip the Pallas Triton forms")
    p.add_argument("--sections", nargs="+", default=["gelu", "attn", "fc2in"], choices=["gelu", "attn", *RNG_SECTIONS])
    p.add_argument("--group-forms", nargs="+", default=["64x128x4p", "64x128x4o", "64x128x5p"],
                   help="groupgemm: Mosaic tilings tile_m x tile_n x steps and group mode ("
                        "o: overlap; p: plain; s: split; see kernels.scaled_gemm.GROUP_MODES), then u for a "
                        "pipeline per output tile instead of one chained across the CTA's tiles")
    p.add_argument("--mosaic-forms", nargs="+", default=list(MOSAIC_FORMS),
                   help="qkvgemm / resgemm: the Mosaic GEMM's forms (see _mosaic_form)")
    p.add_argument("--epidiag-kinds", nargs="+", default=["default", "epi", "default+noscale", "default+nostore"],
                   help="epidiag: the kernel ('default', 'epi': epilogue_wg, 'storewg': store_wg), then "
                        "+noscale / +nostore for the diagnostics or +splitstore (see _patched_epilogue)")
    p.add_argument("--groupepi-kinds", nargs="+", default=["split", "default", "split+epi", "default+splitstore"],
                   help="groupepi: the group mode ('split' or 'default'), then +epi (epilogue_wg), +biasfirst "
                        "(bias_first), +pairs (cta_pairs), +stack (stacked) and / or a "
                        "diagnostic of _patched_epilogue (+noscale: the group scaling and bias left out; "
                        "+nostore; +nocolscale / +norowscale: constant scale vectors; +halfcolscale; +mixcolscale; "
                        "+latescales; +waitscales; +splitstore; +swizzleout; +samestore; +halfstore), or +storewg (store_wg)")
    p.add_argument("--groupepi-codes", nargs="+", default=["fp8", "int8"], choices=["fp8", "int8"])
    p.add_argument("--fwddiag-kinds", nargs="+", default=["default", "halfcolscale", "nocolscale"],
                   help="fwddiag: 'default' or a _patched_epilogue diagnostic, one forward run each")
    p.add_argument("--normq-forms", nargs="+", default=["1x128x2", "1x128x1", "1x64x1", "1x128x4", "4x128x4", "2x128x2"],
                   help="normq: rows x chunk x warps")
    p.add_argument("--fc2in-forms", nargs="+", default=list(FC2IN_FORMS),
                   help="fc2in: the MLP middle kernel's forms (see _fc2in_form)")
    p.add_argument("--attn-forms", nargs="+", default=["72/1/unroll/3", "72/1/loop/3", "72/8/loop/2", "64/1/unroll/3"],
                   help="attnforms: HEAD/HEAD_GROUPS_AN_ITEM/unroll|loop/KV_STAGES (head 64: 18 heads, XL/2's width)")
    a = p.parse_args()
    rng = np.random.default_rng(0)
    bf = jnp.bfloat16
    m = (a.batch, a.tokens)
    x = jnp.asarray(rng.standard_normal((*m, C)), bf)
    w1 = jnp.asarray(rng.standard_normal((C, HIDDEN)) / np.sqrt(C), bf)
    b1 = jnp.asarray(rng.standard_normal(HIDDEN) * 0.1, bf)
    w2 = jnp.asarray(rng.standard_normal((HIDDEN, C)) / np.sqrt(HIDDEN), bf)
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}, x {x.shape}", flush=True)

    for name, section in RNG_SECTIONS.items():  # in this order, whatever the command line's
        if name in a.sections:
            section(a, rng)
    if "gelu" in a.sections:
        gelu_forms(a, x, w1, b1, w2)
    if "attn" in a.sections:
        attention_forms(a, x, rng)


def gelu_forms(a, x, w1, b1, w2) -> None:
    bf = jnp.bfloat16
    # the formulations against float64 on a sample of values across GELU's range
    t = np.linspace(-8, 8, 20001).astype(np.float32)
    ref = 0.5 * t.astype(np.float64) * (1 + np.tanh(SQRT_2_OVER_PI * (t + 0.044715 * t.astype(np.float64) ** 3)))
    for name, g in GELUS.items():
        if name == "none":
            continue
        got = np.asarray(jax.jit(g)(jnp.asarray(t)), np.float64)
        print(f"  {name:18s} float32 max abs error vs float64: {np.abs(got - ref).max():.2e}", flush=True)

    for name, g in GELUS.items():
        f = jax.jit(lambda x, w1, b1, w2, g=g: g(x @ w1 + b1) @ w2)
        hlo = f.lower(x, w1, b1, w2).compile().as_text()
        epi = "GELU" in hlo
        s = timed(f, (x, w1, b1, w2), a.repeats)
        print(f"mlp {name:18s} {s * 1e6:8.1f} us   GELU in GEMM epilogue: {epi}", flush=True)

    # the same MLP on 2-D operands (XLA's GEMM rewriter sees the dot without a bitcast), and with a
    # float32 GEMM output: which forms does the cuBLASLt GELU epilogue match?
    x2 = x.reshape(-1, C)
    for name, f, args in (
            ("2-D jax.nn.gelu", lambda x, w1, b1, w2: gelu_jax(x @ w1 + b1) @ w2, (x2, w1, b1, w2)),
            ("2-D f32 out", lambda x, w1, b1, w2: gelu_jax(jnp.dot(x, w1, preferred_element_type=jnp.float32)
                                                           + b1.astype(jnp.float32)).astype(bf) @ w2, (x2, w1, b1, w2)),
            ("2-D no bias", lambda x, w1, b1, w2: gelu_jax(x @ w1) @ w2, (x2, w1, b1, w2))):
        jf = jax.jit(f)
        hlo = jf.lower(*args).compile().as_text()
        s = timed(jf, args, a.repeats)
        print(f"mlp {name:18s} {s * 1e6:8.1f} us   GELU in GEMM epilogue: {'GELU' in hlo}", flush=True)

    # XLA first wraps each dot (and its bias add) in a Triton GEMM fusion, so its cuBLAS rewriter never
    # sees dot -> GELU; with Triton GEMMs off the dot reaches the rewriter bare
    no_triton = {"xla_gpu_enable_triton_gemm": False}
    for name, g in (("jax.nn.gelu", gelu_jax), ("none", lambda y: y)):
        jf = jax.jit(lambda x, w1, b1, w2, g=g: g(x @ w1 + b1) @ w2).lower(x, w1, b1, w2).compile(
            compiler_options=no_triton)
        s = timed(jf, (x, w1, b1, w2), a.repeats)
        print(f"mlp {name + ' no-triton':18s} {s * 1e6:8.1f} us   GELU in GEMM epilogue: {'GELU' in jf.as_text()}",
              flush=True)


def attention_forms(a, x, rng) -> None:
    bf = jnp.bfloat16
    no_triton = {"xla_gpu_enable_triton_gemm": False}
    wqkv = jnp.asarray(rng.standard_normal((C, 3 * C)) / np.sqrt(C), bf)
    bqkv = jnp.asarray(rng.standard_normal(3 * C) * 0.1, bf)
    wp = jnp.asarray(rng.standard_normal((C, C)) / np.sqrt(C), bf)
    hd = C // HEADS
    impl = "cudnn" if jax.default_backend() == "gpu" else "xla"

    def attn_fused(x, w, b, wp):
        qkv = (x @ w + b).reshape(*x.shape[:2], 3, HEADS, hd)
        o = jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], implementation=impl)
        return o.reshape(x.shape) @ wp

    def attn_split(x, w, b, wp):
        q, k, v = ((x @ w[:, i * C:(i + 1) * C] + b[i * C:(i + 1) * C]).reshape(*x.shape[:2], HEADS, hd)
                   for i in range(3))
        o = jax.nn.dot_product_attention(q, k, v, implementation=impl)
        return o.reshape(x.shape) @ wp

    ref_o = np.asarray(jax.jit(attn_fused)(x, wqkv, bqkv, wp), np.float32)
    no_merge = {**no_triton, "xla_gpu_dot_merger_threshold_mb": 0}  # XLA merges dots that share an operand
    for name, f, opts in (("fused qkv + slices", attn_fused, no_triton), ("three GEMMs", attn_split, no_triton),
                          ("three GEMMs no-merge", attn_split, no_merge)):
        jf = jax.jit(f, compiler_options=opts)
        diff = np.abs(np.asarray(jf(x, wqkv, bqkv, wp), np.float32) - ref_o).max()
        s = timed(jf, (x, wqkv, bqkv, wp), a.repeats)
        print(f"attn {name:18s} {s * 1e6:8.1f} us   max |diff| vs fused {diff:.3g}", flush=True)


def fc2_input(a, rng) -> None:
    """fc1 product -> fc2 codes: XLA (as the unfused real path) against the Pallas kernel's tilings."""
    import functools

    from qdit_jax.perf import compiler
    from qdit_jax.quant.config import QuantSpec
    from qdit_jax.quant.kernels.gelu_quant import gelu_quant_applies, gelu_quant_pallas, gelu_quant_xla

    bf = jnp.bfloat16
    m = a.batch * a.tokens
    p = jnp.asarray(rng.standard_normal((m, HIDDEN)) * 100, bf)  # pre-activations ~ N(0, 1) after the scales
    sa = jnp.asarray(rng.uniform(0.05, 0.15, (1, m)), jnp.float32)
    sw = jnp.asarray(rng.uniform(0.05, 0.15, (1, HIDDEN)), jnp.float32)
    b = jnp.asarray(rng.standard_normal(HIDDEN) * 0.1, jnp.float32)
    for spec in (QuantSpec(bits=8, format="fp8_e4m3", symmetric=True, group_size=0),
                 QuantSpec(bits=8, format="int", symmetric=True, group_size=0)):
        ref_fn = compiler.jit(functools.partial(gelu_quant_xla, spec=spec, out_dtype=bf))
        q0, s0 = ref_fn(p, sa, sw, b)
        t = timed(ref_fn, (p, sa, sw, b), a.repeats)
        print(f"fc2in {spec.format:8s} XLA two passes            {t * 1e6:8.1f} us", flush=True)
        q0 = np.asarray(q0.astype(jnp.float32))
        for form in a.fc2in_forms:
            bm, chunk, warps, fast, rec, gelu, noepi = _fc2in_form(form)
            ok, why = gelu_quant_applies(m, HIDDEN, spec, block_m=bm, chunk=chunk)
            if not ok:
                print(f"fc2in {spec.format:8s} {form}: {why}")
                continue
            approx = gelu == "approx"  # tanh.approx.f32, GELU otherwise as mode 'dtype'
            fn = jax.jit(functools.partial(gelu_quant_pallas, spec=spec, out_dtype=bf, block_m=bm, chunk=chunk,
                                           num_warps=warps, fast=fast, recompute=rec,
                                           gelu="dtype" if gelu == "approx" else gelu, approx_tanh=approx))
            args = (p, None, None, None) if noepi else (p, sa, sw, b)  # noepi: p taken as fc1's output
            res = run_timed(f"fc2in {spec.format:8s} {form}", fn, args, a.repeats)
            if res is None:
                continue
            (q1, s1), t = res
            q1 = np.asarray(q1.astype(jnp.float32))
            rel = float(np.max(np.abs(np.asarray(s1) - np.asarray(s0)) / np.asarray(s0)))
            print(f"fc2in {spec.format:8s} Pallas {form:28s} {t * 1e6:8.1f} us   codes equal "
                  f"{np.mean(q1 == q0):.6f}, max |diff| {np.abs(q1 - q0).max():.3g}, scales max rel diff {rel:.2e}",
                  flush=True)


FC2IN_FORMS = ("1x512x4:approx", "1x512x4:dtype", "1x512x4:float32", "1x512x4:fast", "1x512x8:approx")


def _fc2in_form(form: str) -> tuple:
    """``rows x chunk x warps`` then ':'-separated options: a GELU mode (dtype, float32, approx: 'dtype'
    with tanh.approx), fast, recompute, noepi (a diagnostic: no scale / bias epilogue, its codes not
    fc2's). E.g. ``1x512x4:approx:noepi``. (The forms measured and dropped in the nineteenth session,
    persistent programs, rows sharing the scale / bias loads, read hints and an inline-PTX bf16x2 GELU,
    are in git history at cff175e.)"""
    dims, *opts = form.split(":")
    bm, chunk, warps = (int(v) for v in dims.split("x"))
    gelu, fast, rec, noepi = "dtype", False, False, False
    for o in opts:
        if o in ("dtype", "float32", "approx"):
            gelu = o
        elif o == "fast":
            fast = True
        elif o == "recompute":
            rec = True
        elif o == "noepi":
            noepi = True
        else:
            raise SystemExit(f"--fc2in-forms: unknown option {o!r} in {form!r}")
    return bm, chunk, warps, fast, rec, gelu, noepi


def _row_stream(x, *, chunk: int, warps: int, amax: bool):
    """Pallas (Triton), one row per program in ``chunk``-wide pieces: x's row as fp8, scaled by the row's
    abs-max (``amax``: all pieces held until it is known, as the row kernels do) or by a constant."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    m, n = x.shape

    def kern(x_ref, o_ref):
        row = pl.ds(pl.program_id(0), 1)
        hs = [x_ref[row, pl.ds(j * chunk, chunk)].astype(jnp.float32) for j in range(n // chunk)]
        if amax:
            acc = jnp.abs(hs[0])
            for h in hs[1:]:
                acc = jnp.maximum(acc, jnp.abs(h))
            inv = 448.0 / jnp.max(acc, axis=1)[:, None]
        else:
            inv = 0.5
        for j, h in enumerate(hs):
            o_ref[row, pl.ds(j * chunk, chunk)] = (h * inv).astype(jnp.float8_e4m3fn)

    return pl.pallas_call(kern, out_shape=jax.ShapeDtypeStruct((m, n), jnp.float8_e4m3fn), grid=(m,),
                          compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=1))(x)


def byte_floor(a, rng) -> None:
    """The row kernels' bytes moved without their math (see the module docstring, 8)."""
    import functools

    from qdit_jax.perf import compiler

    m = a.batch * a.tokens
    for n, chunk, warps in ((HIDDEN, 512, 4), (C, 128, 1)):
        x = jnp.asarray(rng.standard_normal((m, n)), jnp.bfloat16)
        forms = {"XLA x * 0.5 -> fp8": compiler.jit(lambda v: (v.astype(jnp.float32) * 0.5).astype(jnp.float8_e4m3fn)),
                 "XLA row abs-max (read only)": compiler.jit(lambda v: jnp.max(jnp.abs(v), axis=1)),
                 f"Triton 1 row, {chunk}-wide, {warps} warps, x * 0.5": jax.jit(functools.partial(
                     _row_stream, chunk=chunk, warps=warps, amax=False)),
                 f"Triton 1 row, {chunk}-wide, {warps} warps, x * 448 / abs-max": jax.jit(functools.partial(
                     _row_stream, chunk=chunk, warps=warps, amax=True))}
        for name, fn in forms.items():
            res = run_timed(f"floor {n} {name}", fn, (x,), a.repeats)
            if res is not None:
                t = res[1]
                nbytes = m * n * (2 if "read only" in name else 3)  # bf16 read (+ fp8 written)
                print(f"floor ({m}, {n}) {name:44s} {t * 1e6:8.1f} us   {nbytes / t / 1e12:6.2f} TB/s", flush=True)


def norm_quant_forms(a, rng) -> None:
    """Residual stream -> LayerNorm + modulate -> per-token codes, and attention output -> codes: XLA
    (as the unfused real path) against the Pallas kernel's tilings."""
    import functools

    from qdit_jax.perf import compiler
    from qdit_jax.quant.config import QuantSpec
    from qdit_jax.quant.kernels.norm_quant import norm_quant_applies, norm_quant_pallas, norm_quant_xla

    bf = jnp.bfloat16
    m = a.batch * a.tokens
    x = jnp.asarray(rng.standard_normal((m, C)) * 2 + rng.standard_normal(C) * 0.5, bf)  # per-channel offsets
    shift = jnp.asarray(rng.standard_normal((a.batch, C)) * 0.3, bf)
    scale = jnp.asarray(rng.standard_normal((a.batch, C)) * 0.3, bf)
    for spec in (QuantSpec(bits=8, format="fp8_e4m3", symmetric=True, group_size=0),
                 QuantSpec(bits=8, format="int", symmetric=True, group_size=0)):
        for norm in (True, False):
            kw = dict(shift=shift, scale=scale, tokens=a.tokens) if norm else {}
            what = "norm+quant" if norm else "quant     "
            ref_fn = compiler.jit(functools.partial(norm_quant_xla, spec=spec, **kw))
            q0, s0 = ref_fn(x)
            t = timed(ref_fn, (x,), a.repeats)
            print(f"normq {spec.format:8s} {what} XLA                  {t * 1e6:8.1f} us", flush=True)
            q0 = np.asarray(q0.astype(jnp.float32))
            for form in a.normq_forms:
                bm, chunk, warps = (int(v) for v in form.split("x"))
                ok, why = norm_quant_applies(m, C, spec, bf, tokens=a.tokens if norm else 0, block_m=bm, chunk=chunk)
                if not ok:
                    print(f"normq {spec.format:8s} {what} bm {bm} chunk {chunk}: {why}")
                    continue
                fn = jax.jit(functools.partial(norm_quant_pallas, spec=spec, block_m=bm, chunk=chunk,
                                               num_warps=warps, **kw))
                res = run_timed(f"normq {spec.format:8s} {what} bm {bm} chunk {chunk} warps {warps}", fn, (x,),
                                a.repeats)
                if res is None:
                    continue
                (q1, s1), t = res
                q1 = np.asarray(q1.astype(jnp.float32))
                rel = np.abs(np.asarray(s1) - np.asarray(s0)) / np.asarray(s0)
                print(f"normq {spec.format:8s} {what} Pallas {form:18s} {t * 1e6:8.1f} us   "
                      f"codes equal {np.mean(q1 == q0):.6f}, max |diff| {np.abs(q1 - q0).max():.3g}, rows with "
                      f"another scale {np.mean(rel > 0):.2e} (max rel {rel.max():.2e})", flush=True)


def _fp8_gemm_epilogue(a, sa, w, sw, b, *, n_off: int, n: int, bm: int, bn: int, bk: int, warps: int, stages: int):
    """Columns ``n_off:n_off + n`` of ``a @ w.T`` (fp8 codes, float32 accumulation), rounded to bf16
    as the XLA path's product is, then ``* sa[m] * sw[n] + b[n]`` in float32, written as bf16."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    m, k = a.shape

    def kern(a_ref, sa_ref, w_ref, sw_ref, b_ref, o_ref):
        rows = pl.ds(pl.program_id(0) * bm, bm)
        cols = pl.ds(n_off + pl.program_id(1) * bn, bn)

        def body(t, acc):
            kk = pl.ds(pl.multiple_of(t * bk, bk), bk)
            return acc + jax.lax.dot_general(a_ref[rows, kk], w_ref[cols, kk], (((1,), (1,)), ((), ())),
                                             preferred_element_type=jnp.float32)

        acc = jax.lax.fori_loop(0, k // bk, body, jnp.zeros((bm, bn), jnp.float32))
        y = acc.astype(jnp.bfloat16).astype(jnp.float32) * sa_ref[0, rows][:, None] * sw_ref[0, cols][None, :]
        o_ref[rows, pl.ds(pl.program_id(1) * bn, bn)] = (y + b_ref[cols][None, :]).astype(jnp.bfloat16)

    return pl.pallas_call(kern, out_shape=jax.ShapeDtypeStruct((m, n), jnp.bfloat16), grid=(m // bm, n // bn),
                          compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=stages))(a, sa, w, sw, b)


# the default (128 x 128 per warpgroup, 3 steps, the pipeline chained across each CTA's tiles), the
# same with a pipeline per tile, and a deeper unchained one (4 steps do not divide K = 1,152's 9)
MOSAIC_FORMS = ("128x128x3", "128x128x3:nochain", "128x128x4")


def _patched_epilogue(kind: str):
    """A context patching ``scaled_gemm_body`` for the ``epidiag`` / ``groupepi`` diagnostics: 'noscale'
    leaves the per-channel scale / bias arithmetic out (the product rounded to bf16 and stored; on the
    fourth warpgroup only the scaling, the bias stays; group forms: the group scaling and the bias),
    'nostore' also the TMA store to global memory (the SMEM store stays); 'splitstore' (a schedule,
    outputs unchanged) issues each TMA store as 32-row pieces back to back: whether the store's cost is
    its size or its timing (the fourth warpgroup's 64-row pieces, spread over its arithmetic, paid);
    'nocolscale' / 'norowscale' (outputs wrong) give the group step constant column / row scale vectors
    instead of loading them from shared memory (what those loads cost: 16 ``LDS.64`` / 2 ``LDS`` a K step
    and compute warp; the scaling's arithmetic stays), 'halfcolscale' ('split'; outputs wrong) loads only
    the first column part's and scales both parts by them (half those loads and their registers);
    'mixcolscale' ('split'; outputs wrong, as 'halfcolscale') loads every part's but folds them into
    part 0's vector at once (all the loads, half the registers live through the scaling);
    'latescales' (a schedule, outputs unchanged; 'split') loads the step's scales after issuing its wgmmas,
    not before (whether the wgmma fence waits for those loads), 'waitscales' after the first part's wait
    (under the second part's wgmma);
    'swizzleout' (outputs unchanged) swizzles the compute warpgroups' output slots (unswizzled, a warp's
    rows 256 bytes apart hit the same banks); 'samestore'
    (outputs wrong) stores every tile to the output's first tile (the same bytes leave the SMs, almost none
    reach HBM), 'halfstore' (outputs wrong) only the first compute warpgroup's rows. The jitted kernel is
    retraced inside (``jax.clear_caches``), and again after."""
    import contextlib

    from qdit_jax.quant.kernels import scaled_gemm_body as body

    @contextlib.contextmanager
    def ctx():
        from jax.experimental import pallas as pl
        from jax.experimental.pallas import mosaic_gpu as plgpu

        saved, copy = (body._scaled, body._biased, body._copy_out), plgpu.copy_smem_to_gmem
        saved_slots, saved_scales = body._output_slots, body._group_scales
        if kind in ("nocolscale", "norowscale"):
            def const_only(plan, wg, sa_smem, sw_smem, parts=1):  # no loads of the replaced vectors at all
                row_l, col_l = body._layouts()
                width = plan.tile_n // parts
                cols = [plgpu.layout_cast(jnp.full((width,), 0.002, jnp.float32), col_l) for _ in range(parts)]
                if kind == "nocolscale":
                    s_a = plgpu.load(sa_smem.at[0, pl.ds(wg * plan.tile_m, plan.tile_m)], (), layout=row_l,
                                     optimized=False)
                    return s_a, cols
                return plgpu.layout_cast(jnp.full((plan.tile_m,), 0.002, jnp.float32), row_l), saved_scales(
                    plan, wg, sa_smem, sw_smem, parts)[1]

            body._group_scales = const_only
        saved_split = body._STEP_BODIES["split"]
        if kind in ("latescales", "waitscales"):  # schedules (outputs unchanged): the step's scale loads after
            # its wgmmas issue ('latescales'), or after the first part's wait ('waitscales')
            def split_late(plan, wg, _, a_smem, w_smem, sa_smem, sw_smem, sums):
                n_parts, (_, part_n) = plan.n_parts, plan.part
                a_rows = a_smem.at[pl.ds(wg * plan.tile_m, plan.tile_m)]

                def step(*accs):
                    for j, acc in enumerate(accs):
                        plgpu.wgmma(acc, a_rows, plgpu.transpose_ref(w_smem.at[pl.ds(j * part_n, part_n)], (1, 0)))
                    scales = saved_scales(plan, wg, sa_smem, sw_smem, n_parts) if kind == "latescales" else None
                    new = []
                    for j, acc in enumerate(accs):
                        p = plgpu.wgmma_accumulator_load(acc, wait_n=n_parts - 1 - j)
                        scales = scales or saved_scales(plan, wg, sa_smem, sw_smem, n_parts)
                        new.append(sums[j] + body._scaled(plan, p, scales[0], scales[1][j], plan.part))
                    return tuple(new)

                return pl.run_scoped(step, *[plgpu.ACC(plan.part, plan.acc_dtype) for _ in range(n_parts)])

            body._STEP_BODIES["split"] = split_late
        if kind == "halfcolscale":
            def half_loads(plan, wg, sa_smem, sw_smem, parts=1):  # part 0's column scales for every part
                s_a, s_w = saved_scales(plan, wg, sa_smem, sw_smem, parts)
                return s_a, [s_w[0]] * parts

            body._group_scales = half_loads
        if kind == "mixcolscale":
            def mixed_loads(plan, wg, sa_smem, sw_smem, parts=1):  # every part's loads, one part's registers
                s_a, s_w = saved_scales(plan, wg, sa_smem, sw_smem, parts)
                v = s_w[0]
                for x in s_w[1:]:  # positive scales: max(v, -x) is v, which the compiler cannot know
                    v = jnp.maximum(v, -x)
                return s_a, [v] * parts

            body._group_scales = mixed_loads
        if kind == "splitstore":
            def split_copy(plan, refs, src, rows, pn, ocols):
                for r in range(0, src.shape[0], 32):
                    saved[2](plan, refs, src.at[pl.ds(r, 32)], pl.ds(rows.start + r, 32), pn, ocols)

            body._copy_out = split_copy
        if kind in ("samestore", "halfstore"):
            def diag_copy(plan, refs, src, rows, pn, ocols):
                if kind == "samestore":  # every tile to the same place: the SM side of the store, little HBM
                    saved[2](plan, refs, src, pl.ds(0, src.shape[0]), 0, pl.ds(0, plan.tile_n))
                else:  # the first compute warpgroup's rows only: half the bytes, the same number of CTA stores
                    pl.when(jax.lax.rem(rows.start, plan.cta_m) == 0)(
                        lambda: saved[2](plan, refs, src, rows, pn, ocols))

            body._copy_out = diag_copy
        if kind == "swizzleout":  # the compute warpgroups' output slots 128-byte swizzled (no bank conflicts)
            def swizzled_slots(plan):
                if plan.fourth_wg or jnp.dtype(plan.out_dtype).itemsize != 2:
                    return saved_slots(plan)
                return plgpu.SMEM((2 * plan.out_slots, plan.tile_m, plan.tile_n), plan.out_dtype,
                                  transforms=body._swizzled(plan.out_dtype))

            body._output_slots = swizzled_slots
        if kind in ("noscale", "nostore"):
            body._scaled = lambda plan, p, s_a, s_w, shape=None: p.astype(jnp.float32)
            body._biased = lambda plan, refs, pn, parts, vec=None: parts
        if kind == "nostore":
            plgpu.copy_smem_to_gmem = lambda *args, **kw: None
        jax.clear_caches()
        try:
            yield
        finally:
            body._scaled, body._biased, body._copy_out = saved
            body._output_slots, body._group_scales = saved_slots, saved_scales
            body._STEP_BODIES["split"] = saved_split
            plgpu.copy_smem_to_gmem = copy
            jax.clear_caches()

    return ctx()


def epilogue_diagnostic(a, rng) -> None:
    """Per-channel fp8 GEMMs at q, k, v (one call, three outputs), fc1 and fc2: cuBLAS' fp8 GEMM alone
    (bf16 out, no scales), the Mosaic kernel, and the kernel without its epilogue's arithmetic / store."""
    import contextlib

    from qdit_jax.perf import compiler
    from qdit_jax.quant.kernels.scaled_gemm import scaled_gemm_mosaic

    f8 = jnp.float8_e4m3fn
    m = a.batch * a.tokens
    for name, k, n, blocks in (("q, k, v", C, 3 * C, 3), ("fc1", C, HIDDEN, 1), ("fc2", HIDDEN, C, 1)):
        qa = jnp.asarray(np.clip(rng.standard_normal((m, k)) * 100, -448, 448), jnp.float32).astype(f8)
        w = jnp.asarray(np.clip(rng.standard_normal((n, k)) * 100, -448, 448), jnp.float32).astype(f8)
        sa = jnp.asarray(rng.uniform(0.001, 0.003, (m,)), jnp.float32)
        sw = jnp.asarray(rng.uniform(0.001, 0.003, (n,)), jnp.float32)
        b = jnp.asarray(rng.standard_normal(n) * 0.1, jnp.float32)
        cublas = compiler.jit(lambda qa, w: jax.lax.dot_general(qa, w, (((1,), (1,)), ((), ())),
                                                                preferred_element_type=jnp.bfloat16))
        t = timed(cublas, (qa, w), a.repeats)
        print(f"epidiag {name}: cuBLAS fp8 GEMM alone (bf16 out)      {t * 1e6:8.1f} us", flush=True)
        ref = None
        for kind in a.epidiag_kinds:
            base, _, patch = kind.partition("+")
            ctx = _patched_epilogue(patch) if patch else contextlib.nullcontext()
            with ctx:
                fn = jax.jit(lambda qa, w, sa, sw, b: scaled_gemm_mosaic(
                    qa, w, sa, sw, b, out_blocks=blocks, prefetch="before" if blocks > 1 else None,
                    epilogue_wg=base == "epi", store_wg=base == "storewg"))
                res = run_timed(f"epidiag {name} {kind}", fn, (qa, w, sa, sw, b), a.repeats)
            if res is None:
                continue
            got = np.concatenate([np.asarray(o.astype(jnp.float32)) for o in jax.tree.leaves(res[0])], axis=1)
            ref = got if ref is None else ref
            same = f"   equal to default {np.mean(got == ref):.4f}" if kind == "epi" and ref is not got else ""
            print(f"epidiag {name}: Mosaic per channel, {kind:16s} {res[1] * 1e6:8.1f} us{same}", flush=True)


def group_epilogue_forms(a, rng) -> None:
    """Group-128 fp8 / int8 GEMMs in the forms of ``--groupepi-kinds`` (the epilogue in the compute
    warpgroups or on the fourth warpgroup, ``epilogue_wg``; the diagnostics of :func:`_patched_epilogue`):
    q, k, v (one call), proj and fc2 with the gated residual."""
    import contextlib

    from qdit_jax.quant.kernels.scaled_gemm import scaled_gemm_mosaic

    m = a.batch * a.tokens
    for dtype in [{"fp8": jnp.float8_e4m3fn, "int8": jnp.int8}[c] for c in a.groupepi_codes]:
        lim = 448 if dtype != jnp.int8 else 127
        for name, k, n, blocks, residual in (("q, k, v", C, 3 * C, 3, False), ("proj + res", C, C, 1, True),
                                             ("fc2 + res", HIDDEN, C, 1, True)):
            g = k // 128
            qa = jnp.asarray(np.clip(rng.standard_normal((m, k)) * lim / 4, -lim, lim), jnp.float32).astype(dtype)
            w = jnp.asarray(np.clip(rng.standard_normal((n, k)) * lim / 4, -lim, lim), jnp.float32).astype(dtype)
            sa = jnp.asarray(rng.uniform(0.001, 0.003, (g, m)), jnp.float32)
            sw = jnp.asarray(rng.uniform(0.001, 0.003, (g, n)), jnp.float32)
            b = jnp.asarray(rng.standard_normal(n) * 0.1, jnp.float32)
            res = {}
            if residual:
                res = dict(residual=jnp.asarray(rng.standard_normal((m, n)) * 4, jnp.bfloat16),
                           gate=jnp.asarray(rng.standard_normal((a.batch, n)) * 0.5, jnp.bfloat16))
            ref = None
            for kind in a.groupepi_kinds:
                mode, *opts = kind.split("+")
                flags = dict(epilogue_wg="epi" in opts, store_wg="storewg" in opts, bias_first="biasfirst" in opts,
                             cta_pairs="pairs" in opts, stacked="stack" in opts)
                patch = next((o for o in opts if o not in ("epi", "storewg", "biasfirst", "pairs", "stack")), None)
                mode = None if mode == "default" else mode
                fn = jax.jit(lambda qa, w, sa, sw, b, mode=mode, flags=flags: scaled_gemm_mosaic(
                    qa, w, sa, sw, b, out_blocks=blocks, group_mode=mode, **flags, **res))
                label = f"groupepi {jnp.dtype(dtype).name} {name}: {kind}"
                with _patched_epilogue(patch) if patch else contextlib.nullcontext():
                    out = run_timed(label, fn, (qa, w, sa, sw, b), a.repeats)
                if out is None:
                    continue
                got = np.concatenate([np.asarray(o.astype(jnp.float32)) for o in jax.tree.leaves(out[0])], axis=1)
                ref = got if ref is None else ref
                print(f"{label:60s} {out[1] * 1e6:8.1f} us   equal to the first {np.mean(got == ref):.4f}", flush=True)


def _mosaic_form(form: str) -> dict:
    """``tile_m x tile_n x steps`` then ':'-separated options: nochain (a pipeline per tile), before /
    after (``prefetch``: the epilogue's vectors loaded before the K loop, or in one batch after it), one
    (qkvgemm: q, k, v from one call writing the three outputs), epi (``epilogue_wg``: scales, bias and
    store on a fourth warpgroup)."""
    dims, *opts = form.split(":")
    tm, tn, st = (int(v) for v in dims.split("x"))
    kw = dict(tile_m=tm, tile_n=tn, steps=st)
    for o in opts:
        if o == "nochain":
            kw["chain"] = False
        elif o in ("before", "after"):
            kw["prefetch"] = o
        elif o == "one":  # qkvgemm: one call for q, k, v
            kw["one_call"] = True
        elif o == "epi":  # the epilogue on a fourth warpgroup
            kw["epilogue_wg"] = True
        else:
            raise SystemExit(f"--mosaic-forms: unknown option {o!r} in {form!r}")
    return kw


def residual_gemm_forms(a, rng) -> None:
    """proj / fc2 in fp8 with the block's gated residual: cuBLAS + XLA's epilogue-and-residual pass
    against kernels.scaled_gemm with the residual in its epilogue, at K = C and K = 4C."""
    from qdit_jax.perf import compiler
    from qdit_jax.quant.kernels.scaled_gemm import scaled_gemm_applies, scaled_gemm_mosaic, scaled_gemm_xla

    f8 = jnp.float8_e4m3fn
    m = a.batch * a.tokens
    for k in (C, HIDDEN):
        qa = jnp.asarray(np.clip(rng.standard_normal((m, k)) * 100, -448, 448), jnp.float32).astype(f8)
        w = jnp.asarray(np.clip(rng.standard_normal((C, k)) * 100, -448, 448), jnp.float32).astype(f8)
        sa = jnp.asarray(rng.uniform(0.001, 0.003, (m,)), jnp.float32)
        sw = jnp.asarray(rng.uniform(0.001, 0.003, (C,)) / np.sqrt(k / C), jnp.float32)
        b = jnp.asarray(rng.standard_normal(C) * 0.1, jnp.float32)
        x = jnp.asarray(rng.standard_normal((m, C)) * 4, jnp.bfloat16)
        g = jnp.asarray(rng.standard_normal((a.batch, C)) * 0.5, jnp.bfloat16)
        args = (qa, w, sa, sw, b, x, g)
        ref_fn = compiler.jit(lambda qa, w, sa, sw, b, x, g: scaled_gemm_xla(qa, w, sa, sw, b, residual=x, gate=g))
        ref = np.asarray(ref_fn(*args).astype(jnp.float32))
        t = timed(ref_fn, args, a.repeats)
        print(f"resgemm K={k}: cuBLAS fp8 + XLA epilogue / gated residual pass {t * 1e6:8.1f} us", flush=True)
        ok, why = scaled_gemm_applies(m, C, k, f8, f8)
        if not ok:
            print(f"resgemm Mosaic GPU kernel skipped: {why}", flush=True)
            continue
        for form in a.mosaic_forms:
            kw = _mosaic_form(form)
            fn = jax.jit(lambda qa, w, sa, sw, b, x, g: scaled_gemm_mosaic(qa, w, sa, sw, b, residual=x, gate=g, **kw))
            res = run_timed(f"resgemm K={k} Mosaic {form}", fn, args, a.repeats)
            if res is None:
                continue
            got, t = np.asarray(res[0].astype(jnp.float32)), res[1]
            err = np.abs(got - ref)
            print(f"resgemm K={k} Mosaic (kernels.scaled_gemm, residual epilogue) {form}: {t * 1e6:8.1f} us   equal "
                  f"{np.mean(got == ref):.4f}, max |diff| {err.max():.3g} (|ref| max {np.abs(ref).max():.3g})",
                  flush=True)


def qkv_gemm_forms(a, rng) -> None:
    """fp8 qkv layer from codes to q, k, v (three dense bf16 outputs, as cuDNN attention takes them)."""

    from qdit_jax.perf import compiler
    from qdit_jax.quant.kernels.group_gemm import group_gemm_xla

    f8 = jnp.float8_e4m3fn
    m, n3 = a.batch * a.tokens, 3 * C
    qa = jnp.asarray(np.clip(rng.standard_normal((m, C)) * 100, -448, 448), jnp.float32).astype(f8)  # e4m3 range
    w = jnp.asarray(np.clip(rng.standard_normal((n3, C)) * 100, -448, 448), jnp.float32).astype(f8)
    sa = jnp.asarray(rng.uniform(0.001, 0.003, (1, m)), jnp.float32)
    sw = jnp.asarray(rng.uniform(0.001, 0.003, (1, n3)), jnp.float32)
    b = jnp.asarray(rng.standard_normal(n3) * 0.1, jnp.float32)

    def xla(qa, sa, w, sw, b):
        y = group_gemm_xla(qa, sa, w, sw, b, out_dtype=jnp.bfloat16, split_epilogue=True,
                           product_dtype=jnp.bfloat16)
        return tuple(y[:, i * C:(i + 1) * C] for i in range(3))

    ref_fn = compiler.jit(xla)
    ref = ref_fn(qa, sa, w, sw, b)
    t = timed(ref_fn, (qa, sa, w, sw, b), a.repeats)
    print(f"qkvgemm XLA: cuBLAS fp8 + epilogue pass -> q, k, v   {t * 1e6:8.1f} us", flush=True)
    ref = np.concatenate([np.asarray(r.astype(jnp.float32)) for r in ref], axis=1)
    from qdit_jax.quant.kernels.scaled_gemm import scaled_gemm_applies, scaled_gemm_mosaic

    ok, why = scaled_gemm_applies(m, C, C, f8, f8)
    for form in a.mosaic_forms if ok else ():
        kw = _mosaic_form(form)
        if kw.pop("one_call", False):  # q, k, v from one call writing three outputs
            fn = jax.jit(lambda qa, sa, w, sw, b: scaled_gemm_mosaic(qa, w, sa[0], sw[0], b, out_blocks=3, **kw))
        else:
            fn = jax.jit(lambda qa, sa, w, sw, b: tuple(
                scaled_gemm_mosaic(qa, w, sa[0], sw[0], b, n_off=i * C, n=C, **kw) for i in range(3)))
        res = run_timed(f"qkvgemm Mosaic {form}", fn, (qa, sa, w, sw, b), a.repeats)
        if res is None:
            continue
        out, t = res
        got = np.concatenate([np.asarray(o.astype(jnp.float32)) for o in out], axis=1)
        print(f"qkvgemm Mosaic GPU fp8 GEMM + epilogue (kernels.scaled_gemm) {form}: "
              f"{t * 1e6:8.1f} us   equal to XLA {np.mean(got == ref):.4f}", flush=True)
    if not ok:
        print(f"qkvgemm Mosaic GPU kernel skipped: {why}", flush=True)
    if a.mosaic_only:
        return
    for bm, bn, bk, warps, stages in ((128, 128, 128, 8, 3), (128, 128, 128, 4, 4), (128, 128, 64, 4, 5),
                                      (256, 128, 128, 8, 3), (256, 128, 64, 8, 4), (128, 64, 128, 4, 4)):
        def pallas(qa, sa, w, sw, b):
            return tuple(_fp8_gemm_epilogue(qa, sa, w, sw, b, n_off=i * C, n=C, bm=bm, bn=bn, bk=bk, warps=warps,
                                            stages=stages) for i in range(3))
        fn = jax.jit(pallas)
        res = run_timed(f"qkvgemm Pallas {bm}x{bn}x{bk} w{warps} s{stages}", fn, (qa, sa, w, sw, b), a.repeats)
        if res is None:
            continue
        out, t = res
        got = np.concatenate([np.asarray(o.astype(jnp.float32)) for o in out], axis=1)
        rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
        print(f"qkvgemm Pallas fp8 GEMM + epilogue {bm}x{bn}x{bk} w{warps} s{stages}: {t * 1e6:8.1f} us   "
              f"rel L2 vs XLA {rel:.2e}, equal {np.mean(got == ref):.4f}", flush=True)



def group_gemm_forms(a, rng) -> None:
    """Group-128 GEMMs from codes to bf16 output at proj (K = N = C), fc1 (K = C, N = 4C) and fc2
    (K = 4C, N = C): what one group-wise layer costs on each route, against per channel."""
    from qdit_jax.perf import compiler
    from qdit_jax.quant.kernels.group_gemm import Tiles, fit_tiles, group_gemm_pallas, kernel_applies
    from qdit_jax.quant.kernels.scaled_gemm import scaled_gemm_applies, scaled_gemm_mosaic, scaled_gemm_xla

    m = a.batch * a.tokens
    for dtype in (jnp.float8_e4m3fn, jnp.int8):
        for k, n in ((C, C), (C, HIDDEN), (HIDDEN, C)):
            g = k // 128
            lim = 448 if dtype != jnp.int8 else 127
            qa = jnp.asarray(np.clip(rng.standard_normal((m, k)) * lim / 4, -lim, lim), jnp.float32).astype(dtype)
            w = jnp.asarray(np.clip(rng.standard_normal((n, k)) * lim / 4, -lim, lim), jnp.float32).astype(dtype)
            sa = jnp.asarray(rng.uniform(0.001, 0.003, (g, m)), jnp.float32)
            sw = jnp.asarray(rng.uniform(0.001, 0.003, (g, n)), jnp.float32)
            b = jnp.asarray(rng.standard_normal(n) * 0.1, jnp.float32)
            name = f"groupgemm {jnp.dtype(dtype).name} K={k} N={n}"
            ref_fn = compiler.jit(scaled_gemm_xla)
            ref = np.asarray(ref_fn(qa, w, sa, sw, b).astype(jnp.float32))
            t = timed(ref_fn, (qa, w, sa, sw, b), a.repeats)
            print(f"{name}: XLA group-128 (batched product + epilogue) {t * 1e6:8.1f} us", flush=True)
            pc = (qa, w, sa[0], sw[0], b)
            t = timed(compiler.jit(scaled_gemm_xla), pc, a.repeats)
            print(f"{name}: per channel, cuBLAS + XLA epilogue      {t * 1e6:8.1f} us", flush=True)
            if scaled_gemm_applies(m, n, k, dtype, dtype)[0]:
                res = run_timed(f"{name} Mosaic per channel", jax.jit(scaled_gemm_mosaic), pc, a.repeats)
                if res is not None:
                    print(f"{name}: per channel, Mosaic GEMM               {res[1] * 1e6:8.1f} us", flush=True)
            if dtype == jnp.int8:
                tiles = fit_tiles(Tiles(), m, n)
                if kernel_applies(m, n, k, g, jnp.int8, jnp.int8, tiles=tiles)[0]:
                    fn = jax.jit(lambda qa, sa, w, sw, b: group_gemm_pallas(qa, sa, w, sw, b, tiles=tiles))
                    res = run_timed(f"{name} Triton", fn, (qa, sa, w, sw, b), a.repeats)
                    if res is not None:
                        got = np.asarray(res[0].astype(jnp.float32))
                        print(f"{name}: Triton group kernel                {res[1] * 1e6:8.1f} us   equal "
                              f"{np.mean(got == ref):.4f}", flush=True)
            for form in a.group_forms:
                chain = not form.endswith("u")  # 'u': a pipeline per tile
                mode = {"o": "overlap", "p": "plain", "s": "split"}[form.rstrip("u")[-1]]
                tm, tn, st = (int(v) for v in form.rstrip("u")[:-1].split("x"))
                ok, why = scaled_gemm_applies(m, n, k, dtype, dtype, groups=g, tile_m=tm, tile_n=tn)
                if not ok:
                    print(f"{name}: Mosaic {form} skipped: {why}", flush=True)
                    continue
                fn = jax.jit(lambda *v, tm=tm, tn=tn, st=st, mode=mode, chain=chain: scaled_gemm_mosaic(
                    *v, tile_m=tm, tile_n=tn, steps=st, group_mode=mode, chain=chain))
                res = run_timed(f"{name} Mosaic {form}", fn, (qa, w, sa, sw, b), a.repeats)
                if res is None:
                    continue
                got = np.asarray(res[0].astype(jnp.float32))
                err = np.abs(got - ref).max() / np.abs(ref).max()
                print(f"{name}: Mosaic group-128 {form:10s}           {res[1] * 1e6:8.1f} us   equal "
                      f"{np.mean(got == ref):.4f}, max |diff| / max |ref| {err:.2e}", flush=True)
            if n == HIDDEN:  # fc1: its output to fc2's group codes, in the epilogue or by gelu_quant after it
                gelu_codes_forms(a, name, (qa, w, sa, sw, b), dtype)


def gelu_codes_forms(a, name: str, args: tuple, dtype) -> None:
    """fc1 (group-wise) to fc2's 128-wide group codes: the Mosaic GEMM writing bf16 + gelu_quant's pass,
    against the GEMM's own epilogue (``scaled_gemm_mosaic(gelu_codes=...)``), with code agreement."""
    from qdit_jax.quant.config import QuantSpec
    from qdit_jax.quant.kernels.gelu_quant import gelu_quant_pallas
    from qdit_jax.quant.kernels.scaled_gemm import scaled_gemm_mosaic

    spec = QuantSpec(bits=8, format="int" if dtype == jnp.int8 else "fp8_e4m3", symmetric=True, group_size=128)
    two = jax.jit(lambda *v: gelu_quant_pallas(scaled_gemm_mosaic(*v), None, None, None, spec, jnp.bfloat16))
    one = jax.jit(lambda *v: scaled_gemm_mosaic(*v, gelu_codes=spec))
    r2 = run_timed(f"{name} GEMM + gelu_quant", two, args, a.repeats)
    r1 = run_timed(f"{name} GEMM with the codes epilogue", one, args, a.repeats)
    if r2 is None or r1 is None:
        return
    eq = np.mean(np.asarray(r1[0][0].astype(jnp.float32)) == np.asarray(r2[0][0].astype(jnp.float32)))
    print(f"{name}: fc1 -> fc2 group codes: GEMM + gelu_quant {r2[1] * 1e6:8.1f} us, codes epilogue "
          f"{r1[1] * 1e6:8.1f} us (codes equal {eq:.4f})", flush=True)
    for mode, approx in (("plain", True), ("overlap", True), ("split", True), ("split", False)):
        res = run_timed(f"{name} codes epilogue, {mode}", jax.jit(lambda *v, mode=mode, approx=approx: scaled_gemm_mosaic(
            *v, gelu_codes=spec, group_mode=mode, approx_tanh=approx)), args, a.repeats)
        if res is not None:
            eq = np.mean(np.asarray(res[0][0].astype(jnp.float32)) == np.asarray(r1[0][0].astype(jnp.float32)))
            print(f"{name}: codes epilogue, {mode:8s}{'' if approx else ' tanhf'} {res[1] * 1e6:8.1f} us "
                  f"(codes equal {eq:.4f})", flush=True)


def fc2_input_groups(a, rng) -> None:
    """Group-128 fc2 codes from a group-wise fc1's bf16 output: XLA against gelu_quant's tilings."""
    from qdit_jax.perf import compiler
    from qdit_jax.quant.config import QuantSpec
    from qdit_jax.quant.kernels.gelu_quant import gelu_quant_applies, gelu_quant_pallas, gelu_quant_xla

    bf = jnp.bfloat16
    m = a.batch * a.tokens
    y = jnp.asarray(rng.standard_normal((m, HIDDEN)), bf)
    for fmt in ("fp8_e4m3", "int"):
        spec = QuantSpec(bits=8, format=fmt, symmetric=True, group_size=128)
        ref_fn = compiler.jit(lambda v: gelu_quant_xla(v, None, None, None, spec, bf))
        q0, s0 = ref_fn(y)
        t = timed(ref_fn, (y,), a.repeats)
        print(f"fc2ing {fmt:8s} XLA GELU + group-128 quantize      {t * 1e6:8.1f} us", flush=True)
        q0 = np.asarray(q0.astype(jnp.float32))
        for bm, warps in ((1, 4), (1, 1), (1, 2), (2, 1), (2, 2), (4, 4)):
            if not gelu_quant_applies(m, HIDDEN, spec, block_m=bm)[0]:
                continue
            fn = jax.jit(lambda v, bm=bm, warps=warps: gelu_quant_pallas(v, None, None, None, spec, bf, block_m=bm,
                                                                          num_warps=warps))
            res = run_timed(f"fc2ing {fmt} bm {bm} warps {warps}", fn, (y,), a.repeats)
            if res is None:
                continue
            (q1, s1), t = res
            print(f"fc2ing {fmt:8s} Pallas bm {bm} warps {warps}                {t * 1e6:8.1f} us   codes equal "
                  f"{np.mean(np.asarray(q1.astype(jnp.float32)) == q0):.5f}", flush=True)


def forward_diagnostic(a, rng) -> None:
    """``qdit bench --batch A.batch --variants bf16 real-fp8-g128-nostack`` once per ``--fwddiag-kinds`` entry,
    that diagnostic patched into the kernel body while the forward compiles and runs (bf16 in the same run).
    The group GEMMs run with side-by-side parts (``-nostack``): the layout the diagnostics patch (the scale
    diagnostics replace ``_group_scales``, which stacked parts do not call)."""
    import argparse
    import contextlib

    from qdit_jax.cli import bench

    for kind in a.fwddiag_kinds:
        p = argparse.ArgumentParser()
        bench.add_arguments(p)
        args = p.parse_args(["--batch", str(a.batch), "--variants", "bf16", "real-fp8-g128-nostack", "--repeats",
                             str(max(a.repeats // 2, 4)), "--matmul-peak", "0"])
        print(f"fwddiag: the forward with {kind}", flush=True)
        with _patched_epilogue(kind) if kind != "default" else contextlib.nullcontext():
            bench.run(args)


def attention_codes_forms(a, rng) -> None:
    """Attention then the proj input's group-128 codes: unfused (attention kernel + quantize pass) against
    the attention kernel writing the codes, and the attention kernel alone."""
    import functools

    from qdit_jax.models.attention_mosaic import attention_mosaic
    from qdit_jax.quant.config import QuantSpec
    from qdit_jax.quant.kernels.attention_codes import attention_codes
    from qdit_jax.quant.kernels.norm_quant import norm_quant_pallas

    bf = jnp.bfloat16
    shape = (a.batch, a.tokens, HEADS, C // HEADS)
    q, k, v = (jnp.asarray(rng.standard_normal(shape), bf) for _ in range(3))
    fn = jax.jit(attention_mosaic)
    res = run_timed("attncodes attention alone", fn, (q, k, v), a.repeats)
    if res is not None:
        print(f"attncodes attention alone (bf16 out)     {res[1] * 1e6:8.1f} us", flush=True)
    for fmt in ("fp8_e4m3", "int"):
        spec = QuantSpec(bits=8, format=fmt, symmetric=True, group_size=128)

        def unfused(q, k, v, spec=spec):
            o = attention_mosaic(q, k, v)
            return norm_quant_pallas(o.reshape(-1, C), spec)

        base = run_timed(f"attncodes {fmt} unfused", jax.jit(unfused), (q, k, v), a.repeats)
        fused = run_timed(f"attncodes {fmt} fused", jax.jit(functools.partial(attention_codes, spec=spec)),
                          (q, k, v), a.repeats)
        if base is None or fused is None:
            continue
        (c0, s0), t0 = base
        (c1, s1), t1 = fused
        c0 = np.asarray(c0.astype(jnp.float32)).reshape(-1, C)
        c1 = np.asarray(c1.astype(jnp.float32)).reshape(-1, C)
        rel = np.abs(np.asarray(s1) - np.asarray(s0)) / np.asarray(s0)
        print(f"attncodes {fmt:8s} attention + quantize pass {t0 * 1e6:8.1f} us   codes in the attention kernel "
              f"{t1 * 1e6:8.1f} us ({t0 / t1:.3f}x); codes equal {np.mean(c1 == c0):.6f}, max |diff| "
              f"{np.abs(c1 - c0).max():.3g}, scales with another value {np.mean(rel > 0):.2e} "
              f"(max rel {rel.max():.2e})",
              flush=True)


def attention_schedule_forms(a, rng) -> None:
    """The bf16 attention through ``run_kernel`` in the forms of ``--attn-forms`` (head size, head groups an
    item, K / V steps looped or unrolled, K / V stages), each against the production kernel at that head
    size (outputs compared bit for bit)."""
    import functools
    import time

    from qdit_jax.models import attention_mosaic as am

    bf = jnp.bfloat16

    def form(shape, per_item, kv_loop, kv_stages):
        b, t, n, d = shape
        body = functools.partial(am._kernel, b=b, t=t, n=n, d=d, per_item=per_item, kv_loop=kv_loop,
                                 kv_stages=kv_stages)  # the production kernel's store epilogue
        call = am.launch(body, jax.ShapeDtypeStruct((b, t, n * d), bf))
        return jax.jit(lambda q, k, v: call(q.reshape(b, t, -1), k.reshape(b, t, -1), v.reshape(b, t, -1)))

    refs = {}
    for spec in a.attn_forms:
        d, per_item, steps, stages = spec.split("/")
        d, per_item, stages = int(d), int(per_item), int(stages)
        shape = (a.batch, a.tokens, C // d, d)
        if d not in refs:
            q, k, v = (jnp.asarray(rng.standard_normal(shape), bf) for _ in range(3))
            res = run_timed(f"attnforms production head {d}", jax.jit(am.attention_mosaic), (q, k, v), a.repeats)
            if res is None:
                continue
            refs[d] = (q, k, v), np.asarray(res[0]).reshape(a.batch, a.tokens, -1)
            print(f"attnforms head {d} production kernel {res[1] * 1e6:8.1f} us", flush=True)
        args, ref = refs[d]
        t0 = time.time()
        label = f"attnforms {spec} (head {d}, {per_item} head groups an item, K / V {steps}, {stages} stages)"
        out = run_timed(label, form(shape, per_item, steps == "loop", stages), args, a.repeats)
        if out is not None:
            got = np.asarray(out[0]).reshape(ref.shape).astype(np.float32)
            err = np.abs(got - ref.astype(np.float32)).max()
            print(f"{label}: {out[1] * 1e6:8.1f} us, equal {np.array_equal(got, ref)}, max |diff| {err:.3g} "
                  f"(compile and timing {time.time() - t0:.0f} s)", flush=True)


# the sections that take (args, rng), run in this order
RNG_SECTIONS = {"normq": norm_quant_forms, "qkvgemm": qkv_gemm_forms, "resgemm": residual_gemm_forms,
                "groupgemm": group_gemm_forms, "floor": byte_floor, "epidiag": epilogue_diagnostic,
                "groupepi": group_epilogue_forms, "fc2in": fc2_input, "fc2ing": fc2_input_groups,
                "fwddiag": forward_diagnostic, "attncodes": attention_codes_forms,
                "attnforms": attention_schedule_forms}


if __name__ == "__main__":
    main()
