"""Attention that writes the output projection's activation codes: DiT's attention output quantized per
(token, group of channels) in the attention kernel's epilogue, instead of written in bf16 and read back by a
quantize pass (``kernels.norm_quant``, ~87 us a block at XL/2's batch 256 on an H100).

Why it is not free: the attention kernel owns one head group (a pair of heads of 72: 144 columns) at a
time, and a 128-wide quantization group straddles two of them (group g of XL/2 = the last 16 g columns of
pair g - 1 and the first 128 - 16 g of pair g). So an item here is a (sample, 128 query rows) block with
all its head groups in turn, in a loop (``models.attention_mosaic.run_kernel`` with ``per_item`` = every
head group; unrolled, the code outgrew the instruction cache: 1.6-2.7x slower), and each compute
warpgroup keeps the previous head group's output (rounded to the input dtype, as the unfused path
quantizes it) in shared memory until the groups it shares with the next are complete (in registers it
spilled: ptxas compiles the whole kernel to 168 registers a thread; the room is two K / V stages instead
of three, which the attention alone runs at the same speed).

Per head group: the row abs-max of its two pieces (the group its first column is in, and the next one's
start; ``codes_plan`` checks that no head group spans more and that a group's codes wait at most one
head group), the scales of the groups then complete (``row_quant.row_scale``: the quantizer's), staged;
then the codes of the previous head group (each column divided by its group's scale,
``scaled_gemm_body.group_codes``' arithmetic), stored by TMA from a per-warpgroup staging tile
(untransformed: fp8 boxes of a head pair start on 16-byte, not 32-byte, boundaries); after the last head
group, its codes and the block's scales (groups x 64 rows, the layout ``kernels.scaled_gemm`` reads). The
codes and scales equal the unfused path's bit for bit on the H100 (every XL/2 element in the tests).

Measured (docs/RESULTS.md, twenty-sixth session): attention + codes 399 -> 367 us (fp8) and 408 -> 400
(int8) against attention + the quantize pass, but the fp8 g128 forward no faster (0.7% slower on average
over three calls), so ``RealOptions.attention_codes`` is off by default.
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from qdit_jax.models import attention_mosaic as am
from qdit_jax.quant.quantizers import QuantSpec

KV_STAGES = 2  # K / V slots: shared memory for the held head group (three and it would not fit)


class CodesPlan(NamedTuple):
    """Which quantization groups each head group of a row holds and when their codes can be written.
    ``pieces[h]``: (group, lo, hi) for the columns lo..hi-1 of head group h (local) in that group;
    ``done[h]``: the groups whose abs-max is complete once head group h is; ``emit[h]``: the head groups
    whose groups are all complete then (h - 1 and / or h: a head group waits at most one for its groups).
    The kernel writes every head group's codes one head group late (the last with the row's end), which
    that bound makes valid, so its loop body is the same for every head group."""

    groups: int
    pieces: tuple[tuple[tuple[int, int, int], ...], ...]
    done: tuple[tuple[int, ...], ...]
    emit: tuple[tuple[int, ...], ...]


def codes_plan(width: int, head_group: int, group: int) -> CodesPlan | str:
    """The plan for rows of ``width`` channels in head groups of ``head_group`` and quantization groups of
    ``group``, or why there is none."""
    if width % head_group or width % group:
        return f"groups of {group} and head groups of {head_group} must divide the width {width}"
    heads = width // head_group
    last = [((q + 1) * group - 1) // head_group for q in range(width // group)]  # the head group ending q
    pieces, done, emit = [], [], []
    for h in range(heads):
        lo, hi = h * head_group, (h + 1) * head_group
        pieces.append(tuple((q, max(lo, q * group) - lo, min(hi, (q + 1) * group) - lo)
                            for q in range(lo // group, (hi - 1) // group + 1)))
        done.append(tuple(q for q, end in enumerate(last) if end == h))
    if any(len(p) > 2 for p in pieces):
        return f"a head group of {head_group} columns spans more than two groups of {group} (the kernel takes two)"
    ready = [max(last[q] for q, _, _ in pieces[h]) for h in range(heads)]
    if any(r > h + 1 for h, r in enumerate(ready)):
        return (f"a group of {group} spans more than two head groups of {head_group} columns (the kernel keeps "
                "one head group's output waiting)")
    emit = [tuple(e for e in (h - 1, h) if e >= 0 and ready[e] == h) for h in range(heads)]
    return CodesPlan(width // group, tuple(pieces), tuple(done), tuple(emit))


def attention_codes_applies(shape: tuple[int, ...], dtype: Any, spec: QuantSpec, platform: str | None = None
                            ) -> tuple[bool, str]:
    """Whether the kernel computes (B, T, N, D) attention's output codes for ``spec``; if not, why."""
    from qdit_jax.quant.kernels.row_quant import check_row_spec

    ok, why = am.mosaic_attention_applies(shape, dtype, platform)
    if not ok:
        return False, why
    why = check_row_spec(spec)
    if why:
        return False, why
    _, _, n, d = shape
    width = n * d
    if spec.group_size == 0:
        return False, "per-token scales: a row's one group spans all its head groups (the kernel takes groups)"
    plan = codes_plan(width, am.LAYOUTS[d].group, spec.group_size)
    if isinstance(plan, str):
        return False, plan
    return True, "ok"


def _kernel(q_ref: Any, k_ref: Any, v_ref: Any, c_ref: Any, s_ref: Any, *, b: int, t: int, n: int, d: int,
            spec: QuantSpec) -> None:
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    from qdit_jax.quant.kernels.row_quant import codes_dtype, row_scale

    lay = am.LAYOUTS[d]
    hg, grp, np_ = lay.group, spec.group_size, len(lay.parts)
    plan = codes_plan(n * d, hg, grp)
    heads, rows_q = len(plan.emit), am.BLOCK_Q
    wgmma_l, row_l = plgpu.Layout.WGMMA, plgpu.Layout.WGMMA.reduce(1)
    dtype = q_ref.dtype

    def cols_of(p: int, shape: tuple[int, ...]) -> jax.Array:
        """The head-group-local column of each element of a part."""
        return plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=wgmma_l) + lay.parts[p][0]

    def bounds(g: Any) -> tuple[Any, Any, Any]:
        """Head group ``g``'s first column, the group its first column is in, and where (head-group-local)
        the next group starts (the head group's width if it does not)."""
        start = g * hg
        qh = start // grp
        return start, qh, jnp.minimum((qh + 1) * grp - start, hg)

    def bcast(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        return lax.broadcast_in_dim(x, shape, [0])

    def emit(sc: am.Scratch, it: am.Item, e: Any, vals: list[jax.Array]) -> None:
        """The codes of head group ``e`` (its values ``vals``; its groups' scales are staged) by TMA."""
        c_stage, s_stage = sc.extra[:np_], sc.extra[-1]
        _, qe, be = bounds(e)
        s_head = plgpu.load(s_stage.at[it.wg, qe], (), layout=row_l, optimized=False)
        s_tail = plgpu.load(s_stage.at[it.wg, jnp.minimum(qe + 1, plan.groups - 1)], (), layout=row_l,
                            optimized=False)  # (selected only where the head group has a second group)
        for p, x in enumerate(vals):
            div = jnp.where(cols_of(p, x.shape) < be, bcast(s_head, x.shape), bcast(s_tail, x.shape))
            y = x / div  # scaled_gemm_body.group_codes' arithmetic, a scale per column
            c_stage[p][it.wg] = (jnp.round(y) if spec.format == "int" else y).astype(c_ref.dtype)
        plgpu.commit_smem()
        rows = pl.ds(it.qi * 2 * rows_q + it.wg * rows_q, rows_q)
        for p in range(np_):
            plgpu.copy_smem_to_gmem(c_stage[p].at[it.wg], c_ref.at[it.bi, rows, am.cols(lay, e, p)])

    def held_vals(sc: am.Scratch, it: am.Item) -> list[jax.Array]:
        held = sc.extra[np_:2 * np_]
        return [plgpu.load(held[p].at[it.wg], (), layout=wgmma_l).astype(jnp.float32) for p in range(np_)]

    def init() -> jax.Array:  # the abs-max so far of the group a head group starts in (none yet)
        return plgpu.layout_cast(jnp.zeros((rows_q,), jnp.float32), row_l)

    def epilogue(sc: am.Scratch, it: am.Item, outs: list[jax.Array], open_max: jax.Array) -> jax.Array:
        held, s_stage = sc.extra[np_:2 * np_], sc.extra[-1]
        plgpu.barrier_arrive(sc.q_empty.at[it.qs])  # the queries are used up (no output staged there)
        rounded = [y.astype(dtype) for y in outs]  # the attention's output, as the unfused path quantizes it
        vals = [x.astype(jnp.float32) for x in rounded]
        start, qh, bnd = bounds(it.g)
        # the row abs-max of the head group's two pieces (its first group, then the next one's start):
        # elementwise over parts of one width first, one row reduction per width and piece
        pieces: list[dict[int, jax.Array]] = [{}, {}]
        for p, x in enumerate(vals):
            a, first = jnp.abs(x), cols_of(p, x.shape) < bnd
            for piece, v in zip(pieces, (jnp.where(first, a, 0.0), jnp.where(first, 0.0, a))):
                w = x.shape[1]
                piece[w] = v if w not in piece else jnp.maximum(piece[w], v)
        head_max, tail_max = (functools.reduce(jnp.maximum, [v.max(axis=1) for v in piece.values()])
                              for piece in pieces)
        head_max = jnp.maximum(open_max, head_max)
        head_done = (qh + 1) * grp <= start + hg
        has_tail = bnd < hg
        tail_done = jnp.logical_and(has_tail, (qh + 2) * grp <= start + hg)
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last stores from staging have read it
        s_head, s_tail = row_scale(head_max, spec), row_scale(tail_max, spec)

        @pl.when(head_done)
        def _() -> None:
            s_stage[it.wg, qh] = s_head

        @pl.when(tail_done)
        def _() -> None:
            s_stage[it.wg, qh + 1] = s_tail

        @pl.when(it.u > 0)  # the previous head group: its groups are complete now (codes_plan)
        def _() -> None:
            emit(sc, it, it.g - 1, held_vals(sc, it))

        for p, x in enumerate(rounded):  # held until its groups are complete (registers would spill)
            held[p][it.wg] = x
        keep_head = jnp.where(head_done, 0.0, 1.0)
        keep_tail = jnp.where(jnp.logical_and(has_tail, jnp.logical_not(tail_done)), 1.0, 0.0)
        return head_max * keep_head + tail_max * keep_tail  # the group left open, if any

    def finish(sc: am.Scratch, it: am.Item, _: jax.Array) -> None:
        """The item's last head group (its groups end with the row), then the block's scales."""
        emit(sc, it, it.g, held_vals(sc, it))
        plgpu.commit_smem()
        row0 = it.bi * t + it.qi * 2 * rows_q + it.wg * rows_q
        plgpu.copy_smem_to_gmem(sc.extra[-1].at[it.wg], s_ref.at[:, pl.ds(row0, rows_q)])

    extra = (*[plgpu.SMEM((2, rows_q, w), codes_dtype(spec)) for _, w in lay.parts],  # codes staging
             *[am.part_smem(lay, (2, rows_q, w), dtype) for _, w in lay.parts],  # the held head group
             plgpu.SMEM((2, plan.groups, rows_q), jnp.float32))  # the row block's scales
    am.run_kernel(q_ref, k_ref, v_ref, b=b, t=t, n=n, d=d, per_item=heads, epilogue=epilogue, extra=extra,
                  kv_loop=True, kv_stages=KV_STAGES, init=init, finish=finish)


def attention_codes(q: jax.Array, k: jax.Array, v: jax.Array, spec: QuantSpec) -> tuple[jax.Array, jax.Array]:
    """softmax(q k^T / sqrt(D)) v of (B, T, N, D) half-precision q, k, v, quantized per (token, group of
    ``spec.group_size`` channels) as ``spec`` says: codes (B, T, N * D) (int8 or fp8) and float32 scales
    (N * D // group, B * T), what ``kernels.scaled_gemm`` takes. Raises ValueError where the kernel does not
    apply (ask ``attention_codes_applies`` first). Forward only, and not under ``jax.vmap``."""
    am.check_qkv(q, k, v)
    ok, why = attention_codes_applies(q.shape, q.dtype, spec, platform="gpu")
    if not ok:
        raise ValueError(why)
    return _attention_codes(q, k, v, spec)


@functools.partial(jax.jit, static_argnames=("spec",))
def _attention_codes(q: jax.Array, k: jax.Array, v: jax.Array, spec: QuantSpec) -> tuple[jax.Array, jax.Array]:
    from qdit_jax.quant.kernels.row_quant import codes_dtype

    b, t, n, d = q.shape
    width = n * d
    out_type = (jax.ShapeDtypeStruct((b, t, width), codes_dtype(spec)),
                jax.ShapeDtypeStruct((width // spec.group_size, b * t), jnp.float32))
    call = am.launch(functools.partial(_kernel, b=b, t=t, n=n, d=d, spec=spec), out_type)
    flat = (b, t, width)
    with jax.named_scope("attention_mosaic"):  # profiles file it under attention (perf.trace)
        return call(q.reshape(flat), k.reshape(flat), v.reshape(flat))
