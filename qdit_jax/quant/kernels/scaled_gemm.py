"""An fp8 / int8 GEMM that applies the per-token x per-channel scales, the bias and optionally
adaLN-Zero's gated residual in its epilogue: a Pallas Mosaic GPU kernel (Hopper wgmma), its guard
and the XLA formulation it replaces.

Why: in the real low-bit DiT every per-token GEMM's scale epilogue was its own pass (cuBLASLt takes
only per-tensor fp8 scales and no per-token int8 scales), reading the GEMM's product and writing the
layer output: for q, k, v 28 x ~300 us at DiT-XL/2's batch 256, and after proj and fc2 a pass that
also adds ``gate * y`` to the residual stream (56 x ~156 us). Only a GEMM that scales its own
accumulator removes them. Each call computes one output column block (all of proj / fc2; or q, k and v
together, written as three outputs: ``out_blocks``): a persistent kernel (one CTA per SM looping over
output tiles, one pipeline chained across them: ``chained_steps``), warp-specialized (a memory
warpgroup streams the A and W tiles through a ``steps``-deep pipeline while two compute warpgroups
run wgmma on 128 rows each), each compute warpgroup applying ``acc * s_a[m] * s_w[n] + b[n]`` in
registers and storing its tile through its own SMEM slot asynchronously. With a residual, the
residual tile is copied by TMA into that slot before the K loop and added in the epilogue. The
epilogue can instead go to a fourth warpgroup (``epilogue_wg``: the compute warpgroups stage the bf16
fp8 product, or the float32 group sums, and go on with the next tile): per-channel fp8's mainloop alone
runs as fast as cuBLAS' fp8 GEMM, and the epilogue, mostly its global store, was what the tensor cores
waited for. The kernel body (K step per group mode, tile epilogue) is ``kernels.scaled_gemm_body``, the
fourth warpgroup's forms (epilogue, codes, store) ``kernels.scaled_gemm_fourth_wg``.

Group scales (Q-DiT's granularity: weights and activations in 128-channel groups along K): the
(G, M) x (G, N) scale rows come by TMA with each K step's tiles, each step's product goes into a fresh
wgmma accumulator and is scaled into a float32 running sum in registers (64-row warpgroup tiles; see
GROUP_MODES). At XL/2's shapes 1.4-1.7x the per-channel kernel's time, 2.2-2.8x faster than the
Triton group kernel (``kernels.group_gemm``), which stays for 4-bit weights kept packed on the
device (``RealModel.variables(unpack_w4=False)``; by default they are unpacked to int8 codes at load).

bf16 form (``gemm_bf16_mosaic``, reference ``gemm_bf16_xla``): the same kernel on bf16 operands (64-deep
K steps, no scales, weights (N, K) or a Flax Dense kernel's (K, N)), for the float model's proj / fc2
with the gated residual in the epilogue (``quant.fused_float``). At XL/2's batch 256 on an H100 it runs
at cuBLAS' speed (proj 264.4 vs 266.7 us with the bias, fc2 923.9 vs 961.2), and with the residual in
338.8 / 990.6 us against cuBLAS + XLA's 552.4 / 1,229.9 (docs/RESULTS.md, eighteenth session).

Same math as the XLA path (``group_gemm_xla`` at one group): the accumulator rounded as the XLA
product is (fp8: float32 to bf16; int8: int32 to float32), then scaled and biased in float32 and
rounded to bf16, then ``x + gate * y`` with the model's bf16 roundings. On an H100 the outputs equal
cuBLAS + XLA's epilogue on 99.9%+ of entries (the rest one bf16 ulp): q, k, v in 474-487 us against
667-677 us, proj / fc2 with the residual in 229 / 549 us against 288 / 608 us (docs/RESULTS.md,
``scripts/bench_block_ops.py --sections qkvgemm resgemm --mosaic-only``).
"""
from __future__ import annotations

import contextlib
import functools
import threading
from typing import Any, Iterator

import jax
import jax.numpy as jnp

from qdit_jax.perf.device import is_hopper
from qdit_jax.quant.kernels.scaled_gemm_body import (BF16_TILE_K, CODES_WG_REGISTERS, GELU_MODES, PAIR_AXIS,
                                                  STORE_WG_COMPUTE_REGISTERS, TILE_K, Plan, kernel_body,
                                                  pipeline_steps)

TILE_M, TILE_N, STEPS = 128, 128, 3  # per compute warpgroup; the fastest measured on the H100
# group scales: a float32 running sum beside the wgmma accumulator (two 64 x 128 float32 tiles per
# warpgroup, where one 128 x 128 tile would not fit twice in registers), and how each K step's product
# is scaled into it (static ``group_mode``; defaults: ``group_mode_for``): 'plain', after the step's
# wgmma; 'split', the tile's two 64-column halves as two wgmmas in flight, the first half scaled
# while the second runs (fp8's default: fc2 7-17% faster than 'plain' alone); 'overlap', the previous
# step's product while this step's wgmma runs (a third register tile; int8's default until the
# twenty-eighth session: with 'split' waiting for each part alone, int8's fc2 ran 17% and proj / fc1 2-5%
# faster than 'overlap' alone (an H200), yet the XL/2 forward 1-4% slower on the H100, fourteenth session;
# with the parts stacked, the store warpgroup and the row kernels' one-add codes, int8 'split' is the
# faster forward: 1.103-1.107x bf16 against 'overlap''s 1.078-1.091x over three calls, docs/RESULTS.md,
# twenty-eighth session, so 'split' is every format's default now). Measured and dropped (fourteenth
# session, git history at acb3216): A read into registers once for both halves (5-8% slower), the second
# half's product left in flight into the next step (ptxas serializes every wgmma then, C7514), 64 x 192
# warpgroup tiles (15-50% slower). Twenty-second session (git history at 5333cb6): 'carry', 'split' with
# the second half's product waited for, carried as values and scaled under the next step's first wgmma
# (bit-equal, but fp8 q, k, v 613 -> 664 us, fc2 + residual 741 -> 805, the fp8 g128 forward 1.163x -> 1.082x
# bf16); and A in registers again (ldmatrix; fc2's shared-memory throughput 92.7% -> 69.7% under Nsight
# Compute, yet 784 -> 885 us). Measured and dropped earlier: rescaling
# the fp8 accumulator itself between groups by the ratio of their scales (one 128 x 128 tile, as
# flash attention rescales): slower (290 vs 245 us) and off by fp8 wgmma's accumulation precision.
# Also measured and dropped (tenth session): a ping-pong schedule, the two compute warpgroups taking
# turns at the tensor cores through shared-memory barriers (correct, but within noise of 'plain' for
# fp8 and 4-9% slower than 'overlap' for int8), and CTA pairs sharing the weight tile by TMA multicast.
GROUP_MODES = ("plain", "overlap", "split")
GROUP_TILE_M, GROUP_STEPS = 64, 4  # the fastest tiling measured on the H100
CODE_DTYPES = (jnp.dtype(jnp.float8_e4m3fn), jnp.dtype(jnp.int8))  # wgmma: float32 / int32 accumulation


def _runtime_why(platform: str | None) -> str | None:
    """Why the kernel cannot run on ``platform`` (None: it can): GPU, Hopper, Pallas Mosaic GPU."""
    platform = platform or jax.default_backend()
    if platform != "gpu":
        return f"platform is {platform}, the kernel is GPU-only"
    if platform == jax.default_backend() and not is_hopper():
        return "the kernel uses Hopper's wgmma (compute capability 9.x)"
    try:
        from jax.experimental.pallas import mosaic_gpu as plgpu
    except ImportError as e:  # pragma: no cover - depends on the JAX build
        return f"Pallas Mosaic GPU is not available ({e})"
    if not all(hasattr(plgpu, f) for f in ("kernel", "emit_pipeline_warp_specialized", "nd_loop")):
        return "this JAX's Pallas Mosaic GPU lacks kernel / emit_pipeline_warp_specialized / nd_loop"
    return None


def _shape_why(m: int, n: int, k: int, tile_m: int, tile_n: int, tile_k: int) -> str | None:
    """Why (M, N, K) does not fit the tiles (None: it does)."""
    if m % (2 * tile_m) or n % tile_n or k % tile_k:
        return f"(M, N, K) = ({m}, {n}, {k}) is not a multiple of ({2 * tile_m}, {tile_n}, {tile_k})"
    return None


def _gate_why(m: int, tile_m: int, rows_per_gate: int | None) -> str | None:
    """Why a gate row per ``rows_per_gate`` rows does not fit the row tiles (None: it does, or no gate)."""
    if rows_per_gate is not None and (rows_per_gate % tile_m or m % rows_per_gate):
        return f"{rows_per_gate} rows per gate row is not a multiple of the {tile_m}-row tile or of M = {m}"
    return None


def scaled_gemm_applies(m: int, n: int, k: int, a_dtype: Any, w_dtype: Any, *, groups: int = 1,
                        tile_m: int | None = None, tile_n: int = TILE_N, rows_per_gate: int | None = None,
                        platform: str | None = None) -> tuple[bool, str]:
    """Whether the kernel can compute an (M, K) x (N, K)^T fp8 / int8 product block of width N, with
    ``groups`` scale groups along K (1: per token x per channel), with a gated residual whose gate
    changes every ``rows_per_gate`` rows if given; and if not, why."""
    why = _runtime_why(platform)
    if why is None and (jnp.dtype(a_dtype) != jnp.dtype(w_dtype) or jnp.dtype(a_dtype) not in CODE_DTYPES):
        why = (f"operands {jnp.dtype(a_dtype)} x {jnp.dtype(w_dtype)}: the kernel takes fp8 e4m3 x fp8 e4m3 "
               "or int8 x int8 codes")
    tile_m = default_tiling(groups)[0] if tile_m is None else tile_m
    why = why or _shape_why(m, n, k, tile_m, tile_n, TILE_K)
    if why is None and groups > 1 and k != groups * TILE_K:
        why = (f"groups of {k // groups if k % groups == 0 else k / groups} input channels; the kernel "
               f"applies group scales per {TILE_K}-deep K step (group size {TILE_K} only)")
    why = why or _gate_why(m, tile_m, rows_per_gate)
    return (False, why) if why else (True, "ok")


def bf16_gemm_applies(m: int, n: int, k: int, *, tile_m: int = TILE_M, tile_n: int = TILE_N,
                      rows_per_gate: int | None = None, platform: str | None = None) -> tuple[bool, str]:
    """Whether ``gemm_bf16_mosaic`` can compute an (M, K) x (K, N) bf16 product (with a gated residual
    whose gate changes every ``rows_per_gate`` rows if given); and if not, why."""
    why = (_runtime_why(platform) or _shape_why(m, n, k, tile_m, tile_n, BF16_TILE_K)
           or _gate_why(m, tile_m, rows_per_gate))
    return (False, why) if why else (True, "ok")


def _groups(sa: jax.Array) -> int:
    """Scale groups along K: (M,) per-token scales are one group, (G, M) group scales G."""
    return sa.shape[0] if sa.ndim == 2 else 1


def group_mode_for(groups: int, mode: str | None = None) -> str | None:
    """The group mode of a GEMM with ``groups`` scale groups (None per channel): 'split' for fp8 and int8
    codes alike (the faster in the XL/2 forward on the H100; int8 took 'overlap' until the twenty-eighth
    session); ``mode`` overrides it."""
    if groups == 1:
        return None
    mode = mode or "split"
    if mode not in GROUP_MODES:
        raise ValueError(f"group_mode must be one of {GROUP_MODES}, got {mode!r}")
    return mode


def default_tiling(groups: int) -> tuple[int, int]:
    """(rows per compute warpgroup, pipeline steps): 128 / 3 per channel, 64 / 4 with group scales."""
    return (TILE_M, STEPS) if groups == 1 else (GROUP_TILE_M, GROUP_STEPS)


def chained_steps(k_steps: int, tiles: int, num_sms: int, steps: int, chain: bool, *,
                  explicit: bool = False) -> tuple[int, bool]:
    """(pipeline depth, whether the tiles are chained). A chained pipeline (Pallas' START / STEADY /
    STOP pipeline states) needs its depth to divide the K steps (its buffer slots carry on from tile to
    tile) and every CTA to own two tiles or more (the first starts the chain, the last stops it): the
    default depth drops to the largest divisor of ``k_steps`` from 2 up, an explicit one is kept."""
    if not chain or tiles < 2 * num_sms:
        return min(steps, k_steps), False
    if explicit or k_steps % steps == 0:
        depth = min(steps, k_steps)
        return depth, k_steps % depth == 0
    depth = max((d for d in range(2, steps + 1) if k_steps % d == 0), default=0)
    return (depth, True) if depth else (min(steps, k_steps), False)


def _check_call(a: jax.Array, sa: jax.Array, sw: jax.Array, n_off: int, n: int, tile_m: int, tile_n: int,
                residual: jax.Array | None, gate: jax.Array | None, gelu_codes: Any) -> None:
    """ValueError naming what does not fit for a direct call of ``scaled_gemm_mosaic`` (the real path
    asks ``scaled_gemm_applies`` first)."""
    m, k = a.shape
    groups = _groups(sa)
    if _groups(sw) != groups or (groups > 1 and k != groups * TILE_K):
        raise ValueError(f"scales {sa.shape} x {sw.shape} for K = {k}: per token (M,) x per channel (N,), or "
                         f"(G, M) x (G, N) with K = G x {TILE_K}")
    if n_off % tile_n:
        raise ValueError(f"column offset {n_off} is not a multiple of the {tile_n}-wide tile")
    if (residual is None) != (gate is None):
        raise ValueError("the gated residual epilogue takes both residual and gate")
    if gelu_codes is not None:
        from qdit_jax.quant.kernels.row_quant import check_row_spec

        why = check_row_spec(gelu_codes)
        if why or gelu_codes.group_size != tile_n or residual is not None:
            raise ValueError(f"gelu_codes {gelu_codes}: needs a symmetric 8-bit group-wise spec with groups of the "
                             f"{tile_n}-wide output tile and no residual ({why or 'group / residual'})")
    if residual is not None:
        if residual.shape != (m, n) or gate.ndim != 2 or gate.shape[1] != n or m % gate.shape[0]:
            raise ValueError(f"residual {residual.shape} / gate {gate.shape} do not fit the ({m}, {n}) output "
                             "(residual (M, n), gate (G, n) with G dividing M)")
        if (m // gate.shape[0]) % tile_m:
            raise ValueError(f"{m // gate.shape[0]} rows per gate row is not a multiple of the {tile_m}-row tile")


# jitted so that the DiT's identical calls (the same layer shape in every block) share one lowering:
# unjitted, each of XL/2's 140 calls was lowered to Mosaic GPU again (compiles of 104-118 s per forward)
@functools.partial(jax.jit, static_argnames=("n_off", "n", "tile_m", "tile_n", "steps", "group_mode", "gelu_codes",
                                             "chain", "approx_tanh", "codes_wg", "prefetch", "out_blocks",
                                             "epilogue_wg", "store_wg", "bias_first", "cta_pairs", "gelu_mode",
                                             "stacked", "group_pairs"))
def scaled_gemm_mosaic(a: jax.Array, w: jax.Array, sa: jax.Array, sw: jax.Array, bias: jax.Array | None, *,
                       n_off: int = 0, n: int | None = None, residual: jax.Array | None = None,
                       gate: jax.Array | None = None, tile_m: int | None = None, tile_n: int = TILE_N,
                       steps: int | None = None, group_mode: str | None = None,
                       gelu_codes: Any = None, chain: bool = True, approx_tanh: bool = True,
                       codes_wg: bool = False, prefetch: str | None = None, out_blocks: int = 1,
                       epilogue_wg: bool = False, store_wg: bool = False, bias_first: bool = False,
                       cta_pairs: bool = False, gelu_mode: str = "dtype",
                       stacked: bool = False, group_pairs: bool = False) -> jax.Array | tuple[jax.Array, ...]:
    """Columns ``n_off : n_off + n`` of ``y = (a @ w.T) * sa[:, None] * sw[None, :] + bias`` as bf16:
    ``a`` (M, K) and ``w`` (N_total, K) fp8 (or int8) codes, ``sa`` (M,), ``sw`` / ``bias`` (N_total,)
    float32. The product is rounded as the XLA path's: fp8 to bf16, int8 (int32 sums) to float32.

    Group scales: ``sa`` (G, M) and ``sw`` (G, N_total) with K = G x 128, i.e.
    ``y = sum_g (a_g @ w_g.T) * sa[g][:, None] * sw[g][None, :] + bias`` over 128-wide K groups (Q-DiT's
    granularity): each K step's product (int32 sums to float32; fp8's float32 sums kept in float32) is
    scaled into the sum inside the accumulation (``group_mode``: see GROUP_MODES).

    With ``residual`` (M, n) and ``gate`` (G, n) (one row per M // G consecutive rows, i.e. per
    sample): ``residual + gate * y`` instead, each step rounded to bf16 as the DiT block's
    ``x + gate[:, None] * y`` in bf16 does (adaLN-Zero's gated residual, in the epilogue).

    With ``gelu_codes`` (the next layer's activation QuantSpec: symmetric 8-bit, groups of ``tile_n``
    channels): the epilogue computes that layer's input from the bf16 output instead of writing it:
    the tanh GELU (as ``kernels.gelu_quant`` evaluates it; its tanh the GPU's ``tanh.approx.f32`` with
    ``approx_tanh``, as gelu_quant's default, else libdevice's ``tanhf``), then per token and group the
    scale and codes; returns (codes (M, n), scales (n // tile_n, M)). A DiT MLP's fc1 on group-wise
    layers. ``gelu_mode`` 'float32' evaluates that GELU on the float32 sums without the bf16 model's roundings
    (fewer instructions an element; codes within a rounding of the default's, closer to exact arithmetic's;
    with ``codes_wg`` from the staged bf16 output).

    ``codes_wg`` (with ``gelu_codes``): that epilogue runs on a fourth warpgroup (the compute warpgroups
    stage their biased bf16 output in shared memory and go on to the next tile's K loop) instead of in
    the compute warpgroups while the tensor cores wait; 'split' becomes the default group mode, as
    'overlap' spills in the registers left. On the H100 at XL/2's fc1 (batch 256): int8 8-9% faster,
    fp8 within noise or slower (the codes warpgroup's ~128 elements a thread per tile outlast fp8's K
    loop); RealOptions.codes_wg picks it per format (docs/RESULTS.md, sixteenth session).

    ``chain``: one pipeline across each CTA's output tiles (``chained_steps``), so that the memory
    warpgroup loads the next tile's first K steps during this tile's last steps and epilogue; False
    restarts the pipeline per tile (its prologue loads wait for the previous tile's K loop to end).

    ``out_blocks`` > 1 (no residual, no codes): the ``n`` columns written as that many (M, n / out_blocks)
    arrays, returned as a tuple: q, k and v from one call (one tile schedule over the three, A read once)
    instead of three calls with ``n_off``.

    ``prefetch``: where the epilogue's scale / bias / gate vectors are loaded (``_check_prefetch``).

    ``epilogue_wg`` (per-channel fp8 codes, or group scales; no codes epilogue; a residual with one gate
    row per CTA tile): the compute warpgroups stage their products rounded to bf16 (group scales: their
    float32 sums) in shared memory and go on to the next tile's K loop; a fourth warpgroup scales,
    biases (adds the gated residual) and stores them meanwhile (``scaled_gemm_fourth_wg.epilogue_warpgroup``;
    the same bits). With group scales 'split' becomes the default group mode (168 registers).

    ``store_wg`` (no other fourth warpgroup): the compute warpgroups keep their epilogue (with
    ``gelu_codes`` too) and their 232 registers and hand the staged output to a fourth warpgroup of 24
    registers that issues the TMA stores (``scaled_gemm_fourth_wg.store_warpgroup``); the same outputs.

    ``bias_first`` (group scales, no epilogue warpgroup): the float32 group sums start at the bias instead
    of zero, so the epilogue has no bias add (one FADD an element less); the sum's order changes (the
    bias first), so outputs may differ from the default by float32 rounding.

    ``cta_pairs``: thread-block clusters of two CTAs on vertically adjacent output tiles (the same columns),
    the weight tile (and group scale row) of each K step loaded half by each and multicast to both by TMA:
    half the weight traffic from L2 (M must be a multiple of four warpgroup tiles); the same outputs.

    ``stacked`` (group scales in 'split' mode, the compute warpgroups' own epilogue without codes, vectors
    loaded where used, no CTA pairs): each compute warpgroup takes all the CTA tile's rows and half its
    columns, its two parts stacked along M, instead of half the rows and all the columns: each thread then
    holds 16 column scales a K step instead of 32 (the loads that cost the group GEMMs 5-7%); the same
    outputs (each output element's arithmetic is unchanged). Not with the codes epilogue: there a row's
    128-column group spans both warpgroups; exchanging their halves' row abs-maxima through shared memory
    was bit-equal but slower on the H100 (fp8 fc1 + codes 911 -> 947 us; git history at 72bd9b8).

    ``group_pairs`` (with ``stacked``): two groups per pipeline step (their A, W and scale rows as two
    128-wide slots of each stage, half the steps, default depth 2: the shared memory of four one-group
    steps), the four parts' wgmmas issued together and scaled into the sums one by one as each finishes, so
    that three of every four promotions run while a later wgmma of the warpgroup is in flight instead of one
    of two; with an odd group count the last step takes one group (and the pipeline is chained across tiles
    only where its depth divides the steps); the same outputs (each sum takes its groups in the same order).
    Built in the twenty-ninth session, not yet run on a GPU (docs/PERF_NOTES.md)."""
    m, k = a.shape
    n = w.shape[0] - n_off if n is None else n
    groups = _groups(sa)
    codes_wg = codes_wg and gelu_codes is not None
    # a fourth warpgroup leaves the compute warpgroups 168 registers, where 'overlap' spills: 'split'
    group_mode = group_mode_for(groups, group_mode or ("split" if codes_wg or epilogue_wg else None))
    tile_m0, steps0 = default_tiling(groups)
    tile_m = tile_m0 if tile_m is None else tile_m
    _check_call(a, sa, sw, n_off, n, tile_m, tile_n, residual, gate, gelu_codes)
    if out_blocks < 1 or (out_blocks > 1 and (n % (out_blocks * tile_n) or residual is not None
                                              or gelu_codes is not None)):
        raise ValueError(f"out_blocks {out_blocks}: the {n} columns must split into whole {tile_n}-wide tiles per "
                         "output, without a residual or codes epilogue")
    prefetch = _check_prefetch(prefetch)
    if epilogue_wg and ((groups == 1 and jnp.dtype(a.dtype) == jnp.dtype(jnp.int8)) or gelu_codes is not None):
        raise ValueError("epilogue_wg takes fp8 codes per channel (it stages the product in bf16, the fp8 product's "
                         "rounding) or fp8 / int8 with group scales (a float32 stage), and no codes epilogue; call "
                         "without it")
    _check_epilogue_wg(epilogue_wg, m, tile_m, residual, gate)
    if bias_first and (groups == 1 or epilogue_wg):
        raise ValueError("bias_first starts group scales' float32 sums at the bias: it needs group scales (sa of shape "
                         "(G, M)) and the compute warpgroups' own epilogue; call without it or without epilogue_wg")
    if gelu_mode not in GELU_MODES or (gelu_mode != "dtype" and gelu_codes is None):
        raise ValueError(f"gelu_mode {gelu_mode!r}: one of {GELU_MODES}, and other than 'dtype' only with gelu_codes "
                         "(it is the codes epilogue's GELU)")
    if store_wg and (codes_wg or epilogue_wg):
        raise ValueError("store_wg takes the compute warpgroups' own epilogue: call it without codes_wg or "
                         "epilogue_wg")
    why = stacked_why(groups, group_mode, gelu_codes, codes_wg or epilogue_wg, prefetch, cta_pairs) if stacked else None
    if why:
        raise ValueError(f"stacked: {why}; call without it")
    if group_pairs and not (stacked and groups > 1):
        raise ValueError("group_pairs takes two groups a pipeline step of the stacked 'split' GEMM: it needs "
                         "stacked=True; call without it")
    num_sms = jax.devices()[0].core_count
    if cta_pairs and not cta_pairs_fit(m, tile_m, num_sms):
        raise ValueError(f"cta_pairs pairs vertically adjacent {2 * tile_m}-row tiles on pairs of SMs: M = {m} must "
                         f"be a multiple of {4 * tile_m} and the SM count ({num_sms}) even; call without it")
    per_step = 2 if group_pairs else 1  # groups (K tiles) a pipeline step
    steps, chained = chained_steps(pipeline_steps(k, TILE_K, per_step), (m // (2 * tile_m)) * (n // tile_n), num_sms,
                                   steps0 // per_step if steps is None else steps, chain, explicit=steps is not None)
    rows_per_gate, residual, gate, bias = _epilogue_operands(m, w.shape[0], residual, gate, bias)
    if groups == 1:
        sa, sw = sa.astype(jnp.float32).reshape(-1), sw.astype(jnp.float32).reshape(-1)
    else:
        sa, sw = sa.astype(jnp.float32), sw.astype(jnp.float32)
    if gelu_codes is None:
        out_dtype = jnp.bfloat16
    else:
        from qdit_jax.quant.kernels.row_quant import codes_dtype

        out_dtype = codes_dtype(gelu_codes)
    plan = Plan(n_off=n_off, n=n, k=k, tile_m=tile_m, tile_n=tile_n, steps=steps, chained=chained,
                 m_tiles=m // (2 * tile_m), groups=groups, group_mode=group_mode,
                 int_codes=jnp.dtype(a.dtype) == jnp.dtype(jnp.int8), residual=residual is not None,
                 rows_per_gate=rows_per_gate, gelu_codes=gelu_codes, out_dtype=out_dtype, codes_wg=codes_wg,
                 prefetch=None if epilogue_wg else prefetch, out_blocks=out_blocks, epilogue_wg=epilogue_wg,
                 store_wg=store_wg, bias_first=bias_first, cta_pairs=cta_pairs, gelu_mode=gelu_mode,
                 stacked=stacked, group_pairs=group_pairs)

    return _launch(plan, num_sms, a, w, sa, sw, bias, residual, gate, approx_tanh)


def _check_epilogue_wg(epilogue_wg: bool, m: int, tile_m: int, residual: jax.Array | None,
                       gate: jax.Array | None) -> None:
    """The epilogue warpgroup's guard shared by both forms (scaled and bf16): with a residual, one gate row
    per CTA tile (whether this JAX's Pallas can bound the registers is ``_compute_registers``' check)."""
    if epilogue_wg and residual is not None and not epilogue_wg_residual_fits(m, gate.shape[0], tile_m):
        raise ValueError(f"epilogue_wg with a residual needs one gate row per CTA tile of {2 * tile_m} rows (gate "
                         f"{gate.shape} over {m} rows); call without it")


def epilogue_wg_residual_fits(m: int, gate_rows: int, tile_m: int = TILE_M) -> bool:
    """Whether the epilogue warpgroup can take a gated residual whose gate has ``gate_rows`` rows over M:
    one gate row (sample) per CTA tile of two warpgroups' rows (it loads one gate row per tile)."""
    return m % gate_rows == 0 and (m // gate_rows) % (2 * tile_m) == 0


def stacked_why(groups: int, group_mode: str | None, gelu_codes: Any, fourth_wg: bool, prefetch: str | None,
                cta_pairs: bool) -> str | None:
    """Why ``stacked`` cannot take this call (None: it can): it stacks the 'split' group mode's two parts in
    the compute warpgroups' own epilogue (bias, gated residual, store), whose vectors are loaded where used;
    the codes epilogue needs a warpgroup to hold whole 128-column groups of its rows."""
    if groups == 1 or group_mode != "split":
        return f"it takes group scales in 'split' mode (got {groups} group(s), mode {group_mode!r})"
    if gelu_codes is not None or fourth_wg:
        return "the codes epilogue and the codes / epilogue warpgroups keep side-by-side parts"
    if prefetch is not None or cta_pairs:
        return "it loads the epilogue's vectors where used and runs without CTA pairs"
    return None


def cta_pairs_fit(m: int, tile_m: int, num_sms: int | None = None) -> bool:
    """Whether ``cta_pairs`` can take an M-row GEMM: M a whole number of pairs of vertically adjacent CTA
    tiles (two warpgroups' ``tile_m`` rows each) and the SMs (default: the first device's) pairing up."""
    if num_sms is None:
        num_sms = getattr(jax.devices()[0], "core_count", 1)  # (a GPU's SM count; the guards keep others out)
    return m % (4 * tile_m) == 0 and num_sms % 2 == 0


PREFETCH_MODES = (None, "before", "after")


def _check_prefetch(prefetch: str | None) -> str | None:
    """``prefetch``: where the epilogue's scale / bias / gate vectors are loaded: None, each where it is
    used (after the K loop, in two or three dependent rounds); 'before' the K loop (held in registers
    across it); 'after' it, all in one batch."""
    if prefetch not in PREFETCH_MODES:
        raise ValueError(f"prefetch must be one of {PREFETCH_MODES}, got {prefetch!r}")
    return prefetch


def _epilogue_operands(m: int, n_total: int, residual: jax.Array | None, gate: jax.Array | None,
                       bias: jax.Array | None) -> tuple[int, Any, Any, jax.Array]:
    """(rows per gate row, residual, gate, bias) as the kernel takes them: a bf16 residual, the gate
    flattened to float32, a float32 bias (zeros when there is none)."""
    rows_per_gate = m
    if residual is not None:
        rows_per_gate = m // gate.shape[0]
        gate = gate.astype(jnp.float32).reshape(-1)
        residual = residual.astype(jnp.bfloat16)
    bias = jnp.zeros((n_total,), jnp.float32) if bias is None else bias.astype(jnp.float32)
    return rows_per_gate, residual, gate, bias


def _launch(plan: Plan, num_sms: int, a: jax.Array, w: jax.Array, sa: jax.Array, sw: jax.Array, bias: jax.Array,
            residual: jax.Array | None, gate: jax.Array | None, approx_tanh: bool) -> Any:
    """The persistent kernel of ``plan`` over ``num_sms`` CTAs."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    def kernel(*refs: Any) -> None:
        kernel_body(plan, *refs)

    m = a.shape[0]
    out_type = jax.ShapeDtypeStruct((m, plan.n), plan.out_dtype)
    if plan.out_blocks > 1:
        out_type = tuple(jax.ShapeDtypeStruct((m, plan.n // plan.out_blocks), plan.out_dtype)
                         for _ in range(plan.out_blocks))
    if plan.gelu_codes is not None:
        out_type = (out_type, jax.ShapeDtypeStruct((plan.n_tiles, m), jnp.float32))
    # approx_math: tanh.approx.f32 for the GELU's tanh; it also compiles the codes' division to PTX div.full
    # (the row scale's MUFU.RCP and a multiply, within 2 ulp: the SASS, twenty-second session)
    params = plgpu.CompilerParams(approx_math=plan.gelu_codes is not None and approx_tanh)
    # with cta_pairs the persistent loop runs over the clusters ("sm": num_sms / 2 of them), a CTA's place
    # in its cluster on PAIR_AXIS
    clusters = {"cluster": (2,), "cluster_names": (PAIR_AXIS,)} if plan.cta_pairs else {}
    call = plgpu.kernel(kernel, out_type=out_type, grid=(num_sms // (2 if plan.cta_pairs else 1),),
                        grid_names=("sm",), num_threads=4 if plan.fourth_wg or plan.store_wg else 3,
                        thread_name="wg", compiler_params=params, **clusters)
    registers = CODES_WG_REGISTERS[0] if plan.fourth_wg else STORE_WG_COMPUTE_REGISTERS if plan.store_wg else None
    option = "codes_wg" if plan.codes_wg else "epilogue_wg" if plan.epilogue_wg else "store_wg"
    with _compute_registers(registers, option):
        return call(a, w, sa, sw, bias, *(() if residual is None else (residual, gate)))


@functools.partial(jax.jit, static_argnames=("n_off", "n", "w_kn", "tile_m", "tile_n", "steps", "chain",
                                             "epilogue_wg"))
def gemm_bf16_mosaic(a: jax.Array, w: jax.Array, bias: jax.Array | None, *, n_off: int = 0, n: int | None = None,
                     residual: jax.Array | None = None, gate: jax.Array | None = None, w_kn: bool = False,
                     tile_m: int = TILE_M, tile_n: int = TILE_N, steps: int | None = None, chain: bool = True,
                     epilogue_wg: bool = False) -> jax.Array:
    """Columns ``n_off : n_off + n`` of ``a @ w.T + bias`` (or ``residual + gate * (a @ w.T + bias)``) in bf16
    with bf16 operands: the same persistent kernel and epilogue as ``scaled_gemm_mosaic`` without scales
    (64-deep K steps: 128-byte rows of bf16), the product rounded to bf16 as the float model's. ``w`` is
    (N_total, K), or with ``w_kn`` (K, N_total) as a Flax Dense kernel (``a @ w + bias``). ``epilogue_wg``:
    the epilogue (bias, gated residual) and the store on a fourth warpgroup, as ``scaled_gemm_mosaic``'s."""
    m, k = a.shape
    n_total, w_k = (w.shape[1], w.shape[0]) if w_kn else w.shape
    if w_k != k:
        raise ValueError(f"weights {w.shape} ({'(K, N)' if w_kn else '(N, K)'}) do not match the input's K = {k}")
    n = n_total - n_off if n is None else n
    unused = jnp.ones((1,), jnp.float32)  # the scale operands, which a bf16 plan never reads
    _check_call(a, unused, unused, n_off, n, tile_m, tile_n, residual, gate, None)
    _check_epilogue_wg(epilogue_wg, m, tile_m, residual, gate)
    num_sms = jax.devices()[0].core_count
    steps, chained = chained_steps(k // BF16_TILE_K, (m // (2 * tile_m)) * (n // tile_n), num_sms,
                                   STEPS if steps is None else steps, chain, explicit=steps is not None)
    rows_per_gate, residual, gate, bias = _epilogue_operands(m, n_total, residual, gate, bias)
    plan = Plan(n_off=n_off, n=n, k=k, tile_m=tile_m, tile_n=tile_n, steps=steps, chained=chained,
                m_tiles=m // (2 * tile_m), groups=1, group_mode=None, int_codes=False, residual=residual is not None,
                rows_per_gate=rows_per_gate, gelu_codes=None, out_dtype=jnp.bfloat16, bf16=True, w_kn=w_kn,
                epilogue_wg=epilogue_wg)
    return _launch(plan, num_sms, a.astype(jnp.bfloat16), w.astype(jnp.bfloat16), unused, unused, bias, residual,
                   gate, False)


_REGISTERS_LOCK = threading.Lock()


def codes_wg_available() -> bool:
    """Whether this JAX's Pallas pipeline lets the codes warpgroup have registers (``_compute_registers``)."""
    try:
        from jax._src.pallas.mosaic_gpu import pipeline as plpipe
    except ImportError:  # pragma: no cover - depends on the JAX build
        return False
    return callable(getattr(plpipe, "_compute_registers", None))


@contextlib.contextmanager
def _compute_registers(n: int | None, option: str) -> Iterator[None]:
    """While the kernel is traced, Pallas' warp-specialized pipeline raises its compute warpgroups to
    ``n`` registers a thread instead of all that the memory warpgroup leaves ((512 - 40) / 2 = 232),
    which would leave none for a fourth warpgroup (the codes warpgroup). Pallas has no argument for it:
    this replaces its private ``_compute_registers`` for the trace, and says so (naming the fourth
    warpgroup's ``option``) if that is gone."""
    if n is None:
        yield
        return
    if not codes_wg_available():
        raise NotImplementedError(f"this JAX's Pallas pipeline has no _compute_registers to bound: the fourth "
                                  f"warpgroup ({option}) cannot be used; call without it (RealOptions({option}=False))")
    from jax._src.pallas.mosaic_gpu import pipeline as plpipe

    with _REGISTERS_LOCK:  # one such trace at a time: the replacement is module-wide
        saved = plpipe._compute_registers
        plpipe._compute_registers = lambda memory_registers, num_compute_wgs: n
        try:
            yield
        finally:
            plpipe._compute_registers = saved


def scaled_gemm_xla(a: jax.Array, w: jax.Array, sa: jax.Array, sw: jax.Array, bias: jax.Array | None, *,
                    n_off: int = 0, n: int | None = None, residual: jax.Array | None = None,
                    gate: jax.Array | None = None, out_blocks: int = 1) -> jax.Array | tuple[jax.Array, ...]:
    """The real path's XLA formulation of the same columns (per channel: bf16 product; with group
    scales: each group's product in float32; float32 epilogue, then the model's bf16 gated residual
    when given): the reference; with ``out_blocks`` > 1 the columns split into that many outputs."""
    from qdit_jax.quant.kernels.group_gemm import group_gemm_xla

    n = w.shape[0] - n_off if n is None else n
    cols = slice(n_off, n_off + n)
    b = None if bias is None else bias[cols]
    groups = _groups(sa)
    y = group_gemm_xla(a, sa.reshape(groups, -1), w[cols], sw.reshape(groups, -1)[:, cols], b, out_dtype=jnp.bfloat16,
                       split_epilogue=True, product_dtype=jnp.bfloat16 if groups == 1 else jnp.float32)
    if out_blocks > 1:
        return tuple(jnp.split(y, out_blocks, axis=1))
    return y if residual is None else _gated_residual_xla(y, residual, gate)


def gemm_bf16_xla(a: jax.Array, w: jax.Array, bias: jax.Array | None, *, n_off: int = 0, n: int | None = None,
                  residual: jax.Array | None = None, gate: jax.Array | None = None, w_kn: bool = False) -> jax.Array:
    """``gemm_bf16_mosaic``'s function in XLA (the reference): the bf16 product accumulated in float32
    and rounded to bf16, the bias added and rounded, then ``residual + gate * y`` with each step rounded
    to bf16, as the bf16 DiT's Dense and GatedResidual compute them."""
    bf16 = jnp.bfloat16
    wt = w if w_kn else w.T
    n = wt.shape[1] - n_off if n is None else n
    p = jnp.dot(a.astype(bf16), wt[:, n_off:n_off + n].astype(bf16), preferred_element_type=jnp.float32).astype(bf16)
    y = p if bias is None else (p.astype(jnp.float32) + bias[n_off:n_off + n].astype(jnp.float32)).astype(bf16)
    return y if residual is None else _gated_residual_xla(y, residual, gate)


def _gated_residual_xla(y: jax.Array, residual: jax.Array, gate: jax.Array) -> jax.Array:
    """``residual + gate * y`` in bf16 as the DiT block computes it, one gate row per M // G rows of the
    (M, n) output ``y``: the references' gated residual."""
    g = gate.astype(jnp.bfloat16)
    y3 = y.reshape(g.shape[0], -1, y.shape[-1])
    return (residual.astype(jnp.bfloat16).reshape(y3.shape) + g[:, None, :] * y3).reshape(y.shape)
