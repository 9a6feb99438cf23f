"""The Mosaic GPU scaled GEMM's fourth warpgroup, in its three forms: the epilogue warpgroup (scales,
bias, gated residual and store, ``epilogue_wg``), the codes warpgroup (fc1's GELU and fc2's group codes,
``codes_wg``) and the store warpgroup (only the TMA stores, ``store_wg``); each runs beside the compute
warpgroups' next K loop, on what they staged in shared memory.

Split from ``scaled_gemm_body`` (the plan, the K steps, the compute warpgroups' epilogue, the kernel's
frame, which calls these). The body's helpers are called through the module (``body._copy_out``, ...):
the benchmarks' diagnostics patch them there (scripts/bench_block_ops.py ``_patched_epilogue``).
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from qdit_jax.quant.kernels import scaled_gemm_body as body
from qdit_jax.quant.kernels.scaled_gemm_body import Plan, _Refs


def epilogue_warpgroup(plan: Plan, refs: _Refs) -> None:
    """The fourth warpgroup of ``plan.epilogue_wg``: for each of the CTA's tiles, in the compute
    warpgroups' order, load the column vectors, wait until both compute warpgroups have staged their bf16
    products (group scales: float32 sums), then piece by piece (``_epilogue_pieces``) scale and bias them
    (the same float32 steps as the compute warpgroups' own epilogue, so the same bits), add the gated
    residual if any (read from global memory into registers, a piece ahead), write the piece back in
    place (group scales: into ``o_smem``) and store each row block by TMA once written; hand the slot back
    once the stores have read it. All while the compute warpgroups run the next tile's K loop: in the
    three-warpgroup kernel the tensor cores wait for the epilogue (per-channel fp8 q, k, v at XL/2's batch
    256: 458 us with it, 357 without its arithmetic and store; docs/RESULTS.md, twentieth session)."""
    _fourth_warpgroup(plan, refs, functools.partial(_epilogue_tile, plan, refs))


def _epilogue_tile(plan: Plan, refs: _Refs, pm: Any, pn: Any, slot: Any, ocols: Any) -> None:
    """:func:`epilogue_warpgroup`'s work on CTA tile (pm, pn) from stage slot ``slot``."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    row_l, col_l = body._layouts()
    pieces = _epilogue_pieces(plan)
    width = pieces[0][3]

    def vectors(j: int) -> tuple:
        """Column part ``j``'s weight scales (per channel), bias and (one gate row per CTA tile) gate."""
        cols = pl.ds(plan.n_off + pn * plan.tile_n + j * width, width)
        s_w = plgpu.load(refs.sw.at[cols], (), layout=col_l, optimized=False) if _channel_scaled(plan) else None
        gate = body._gate_part(plan, refs, pm * plan.cta_m, pn, j * width, width) if plan.residual else None
        return s_w, body._bias_part(plan, refs, pn, j * width, width), gate

    def residual(piece: tuple) -> jax.Array | None:
        half, r, j, _ = piece
        if not plan.residual:
            return None
        rows = pl.ds(pm * plan.cta_m + half * plan.tile_m + r, body.EPILOGUE_ROWS)
        return plgpu.load(refs.residual.at[rows, pl.ds(pn * plan.tile_n + j * width, width)], (),
                          layout=plgpu.Layout.WGMMA, optimized=False)

    vec = {0: vectors(0)}  # column part 0's vectors and the first residual piece in flight during the K loop
    res_next = residual(pieces[0])
    s_as = {}  # per channel: the row scales of each row block (half, r)
    for half, r, _, _ in pieces if _channel_scaled(plan) else ():
        if (half, r) not in s_as:
            rows = pl.ds(pm * plan.cta_m + half * plan.tile_m + r, body.EPILOGUE_ROWS)
            s_as[half, r] = plgpu.load(refs.sa.at[rows], (), layout=row_l, optimized=False)
    plgpu.barrier_wait(refs.full.at[slot])
    for i, piece in enumerate(pieces):
        half, r, j, _ = piece
        if j not in vec:
            vec[j] = vectors(j)
        res, res_next = res_next, residual(pieces[i + 1]) if i + 1 < len(pieces) else None
        r0 = pm * plan.cta_m + half * plan.tile_m + r
        row_block = refs.stage.at[slot, half, pl.ds(r, body.EPILOGUE_ROWS)]
        view = row_block.at[:, pl.ds(j * width, width)]
        p = plgpu.load(view, (), layout=plgpu.Layout.WGMMA)
        y = _piece_output(plan, p, s_as.get((half, r)), vec[j], res).astype(plan.out_dtype)
        if plan.groups > 1:  # the float32 stage cannot hold bf16 in place: the row block goes via o_smem
            row_block = refs.o_smem.at[0]
            if j == 0:  # its previous row block's store has read it
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            view = row_block.at[:, pl.ds(j * width, width)]
        view[...] = y
        if j == plan.tile_n // width - 1:  # the row block's last part: store it (TMA takes whole swizzled rows)
            plgpu.commit_smem()
            body._copy_out(plan, refs, row_block, pl.ds(r0, body.EPILOGUE_ROWS), pn, ocols)
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
    plgpu.barrier_arrive(refs.empty.at[slot])


def _channel_scaled(plan: Plan) -> bool:
    """Whether the epilogue applies per-token x per-channel scales (not the group or bf16 forms)."""
    return plan.groups == 1 and not plan.bf16


def _epilogue_pieces(plan: Plan) -> list[tuple[int, int, int, int]]:
    """The epilogue warpgroup's pieces of a CTA tile, in order: (compute warpgroup half, first row in it,
    column part, part width). Rows by ``EPILOGUE_ROWS`` (a wgmma-layout row block); with a residual the
    tile's columns in two parts, per channel part-major (each part's scale / bias / gate vectors then held
    for its pieces only: 16 registers each instead of 32, beside the residual pieces in flight), with group
    scales row-block-major (each row block goes out through the one-row-block ``o_smem``); a row block is
    stored once its last part is written."""
    parts = 2 if plan.residual else 1
    width = plan.tile_n // parts
    rows = [(half, r) for half in range(2) for r in range(0, plan.tile_m, body.EPILOGUE_ROWS)]
    if plan.groups > 1:
        return [(half, r, j, width) for half, r in rows for j in range(parts)]
    return [(half, r, j, width) for j in range(parts) for half, r in rows]


def _piece_output(plan: Plan, p: jax.Array, s_a: Any, vec: tuple, res: jax.Array | None) -> jax.Array:
    """One piece's output from its bf16 product: ``p * s_a * s_w + b`` in float32 (``_scaled``,
    ``_biased``; group scales: ``p`` is the scaled float32 sum, plus ``b``; the bf16 form: ``p + b``), then
    with a residual ``res + gate * y`` with the model's bf16 roundings (as ``_finish``)."""
    s_w, bias, gate = vec
    shape = p.shape
    if plan.bf16:  # the bf16 form: the product, no scales
        y = p.astype(jnp.float32)
    else:
        y = p if plan.groups > 1 else body._scaled(plan, p, s_a, s_w, shape)  # group sums come scaled
    y = y + lax.broadcast_in_dim(bias, shape, [1])
    if res is None:
        return y
    y = y.astype(jnp.bfloat16).astype(jnp.float32)
    y = (lax.broadcast_in_dim(gate, shape, [1]) * y).astype(jnp.bfloat16).astype(jnp.float32)
    return res.astype(jnp.float32) + y


def codes_warpgroup(plan: Plan, refs: _Refs) -> None:
    """The fourth warpgroup of ``plan.codes_wg`` (fc1 with fc2's group codes in its epilogue): for each
    of the CTA's tiles, in the compute warpgroups' order, wait until both have staged their biased bf16
    rows in ``stage`` (two slots, alternating: the compute warpgroups wait only when it is a whole tile
    behind), read both 64-row halves and hand the slot back, compute the GELU and the codes
    (``gelu_group_codes``, both halves in one go for the instruction-level parallelism), and store the
    codes and the scales by TMA; all while the compute warpgroups run the next tile's K loop, where in
    the immediate epilogue the tensor cores wait for it."""
    _fourth_warpgroup(plan, refs, functools.partial(_codes_tile, plan, refs))


def _codes_tile(plan: Plan, refs: _Refs, pm: Any, pn: Any, slot: Any, ocols: Any) -> None:
    """:func:`codes_warpgroup`'s work on CTA tile (pm, pn) from stage slot ``slot``."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    plgpu.barrier_wait(refs.full.at[slot])
    ys = [plgpu.load(refs.stage.at[slot, half], (), layout=plgpu.Layout.WGMMA) for half in range(2)]
    plgpu.barrier_arrive(refs.empty.at[slot])
    res = [body.gelu_group_codes([y.astype(jnp.float32)], plan.gelu_codes, plan.gelu_mode) for y in ys]
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous tile's stores have read o_smem / s_smem
    for half, (s_g, (q,)) in enumerate(res):
        refs.o_smem[half] = q.astype(plan.out_dtype)
        refs.s_smem[half] = s_g
    plgpu.commit_smem()
    for half in range(2):
        body._store_slot(plan, refs, half, pl.ds(pm * plan.cta_m + half * plan.tile_m, plan.tile_m), pn, ocols)


def _fourth_warpgroup(plan: Plan, refs: _Refs, tile_body: Any) -> None:
    """A fourth warpgroup's frame: its register request, every stage slot handed over empty, then
    ``tile_body(pm, pn, slot, ocols)`` for each of the CTA's tiles in the compute warpgroups' order."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    plgpu.set_max_registers(body.CODES_WG_REGISTERS[1], action="increase")
    for b in range(plan.stage_slots):  # every slot starts empty
        plgpu.barrier_arrive(refs.empty.at[b])

    @plgpu.nd_loop((plan.loop_tiles,), collective_axes="sm")
    def tile(info: Any) -> None:
        pm, pn = body.tile_index(plan, info)
        tile_body(pm, pn, info.local_index % plan.stage_slots, pl.ds(pn * plan.tile_n, plan.tile_n))


def store_warpgroup(plan: Plan, refs: _Refs) -> None:
    """The fourth warpgroup of ``plan.store_wg``: for each of the CTA's tiles, in the compute warpgroups'
    order, wait for each warpgroup's staged output (``full``; with the codes epilogue, the codes and their
    scales), issue its TMA stores, and hand the slot back (``empty``) once the stores have read it. The
    warpgroup issuing a TMA store stalls on it (~0.4 us a store, measured from stores issued inside the K
    loop); here that stalls only this warpgroup, not the wgmmas (RESULTS.md, twenty-first session). 24
    registers a thread: it holds no tile."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    plgpu.set_max_registers(body.STORE_WG_REGISTERS, action="decrease")
    for b in range(2 * plan.out_slots):  # every slot starts empty
        plgpu.barrier_arrive(refs.empty.at[b])

    @plgpu.nd_loop((plan.loop_tiles,), collective_axes="sm")
    def tile(info: Any) -> None:
        pm, pn = body.tile_index(plan, info)
        slots = [body._out_slot(plan, wg, info.local_index) for wg in range(2)]
        for wg, oslot in enumerate(slots):
            plgpu.barrier_wait(refs.full.at[oslot])
            rows = pl.ds(body._wg_row0(plan, wg, pm), plan.wg_shape[0])
            body._store_slot(plan, refs, oslot, rows, pn, body._wg_cols(plan, wg, pn))
        copies = 1 if plan.gelu_codes is None else 2  # TMA stores (bulk groups) a warpgroup's tile
        for wg, oslot in enumerate(slots):
            plgpu.wait_smem_to_gmem((1 - wg) * copies, wait_read_only=True)  # this warpgroup's stores have read
            plgpu.barrier_arrive(refs.empty.at[oslot])
