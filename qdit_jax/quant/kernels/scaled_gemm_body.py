"""The Mosaic GPU kernel body of ``kernels.scaled_gemm``: its static plan, the K step of each group
mode, and the tile epilogue (scales, bias, gated residual or the next layer's codes, store).

Split from ``scaled_gemm`` (its guard, tiling choices, entry point and XLA reference) so that each
part reads in one sitting. Every function here runs while the kernel is traced: they emit Mosaic GPU
ops in the order they are called, and the order is the schedule (what overlaps what is written out in
each docstring). Refactors here are checked by lowering every configuration for CUDA on a CPU and
comparing the text (tests/quant/kernels/test_scaled_gemm_lowering.py).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

TILE_K = 128  # one K step (and, with group scales, one group) per pipeline slot


@dataclasses.dataclass(frozen=True)
class Plan:
    """The static shape of one ``scaled_gemm_mosaic`` call: everything its kernel branches on."""

    n_off: int  # first output column (of w's rows)
    n: int  # output columns
    k: int
    tile_m: int  # rows per compute warpgroup (a CTA tile is two warpgroups' rows)
    tile_n: int
    steps: int  # pipeline depth
    chained: bool  # one pipeline across each CTA's tiles (``chained_steps``)
    m_tiles: int  # CTA tiles along M
    groups: int  # scale groups along K (1: per token x per channel)
    group_mode: str | None
    int_codes: bool  # int8 codes (int32 accumulator), else fp8 (float32)
    residual: bool
    rows_per_gate: int
    gelu_codes: Any  # the next layer's activation spec, or None
    out_dtype: Any
    defer_codes: bool = False  # the codes epilogue run under the next tile's first K steps (``_deferred_codes``)

    @property
    def shape(self) -> tuple[int, int]:
        return self.tile_m, self.tile_n

    @property
    def cta_m(self) -> int:
        return 2 * self.tile_m

    @property
    def n_tiles(self) -> int:
        return self.n // self.tile_n

    @property
    def acc_dtype(self) -> Any:
        return jnp.int32 if self.int_codes else jnp.float32

    @property
    def n_parts(self) -> int:
        """Column parts with their own wgmma ('split': two; four were slower on the H100)."""
        return 2 if self.group_mode == "split" else 1

    @property
    def part(self) -> tuple[int, int]:
        return self.tile_m, self.tile_n // self.n_parts


class _Refs(NamedTuple):
    """The kernel's operands in global memory and its scoped shared-memory buffers."""

    sa: Any
    sw: Any
    bias: Any
    residual: Any  # (M, n) bf16, or None
    gate: Any  # flattened (G * n,) float32, or None
    out: Any
    out_scales: Any  # the codes epilogue's (n // tile_n, M) scales, or None
    o_smem: Any  # (2, tile_m, tile_n): one output slot per compute warpgroup
    s_smem: Any
    r_bar: Any  # residual-tile barriers, one per warpgroup
    stage: Any = None  # (2, tile_m, tile_n) bf16: a tile's output waiting for its deferred codes epilogue
    amax: Any = None  # (2, 2, tile_m) float32: its rows' running abs-max, in two alternating slots


def _layouts() -> tuple[Any, Any]:
    """The wgmma accumulator's row vector and column vector layouts."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    return plgpu.Layout.WGMMA.reduce(1), plgpu.Layout.WGMMA.reduce(0)


def _pipeline(plan: Plan, body: Any, ctx: Any, state: Any = None) -> Any:
    """The warp-specialized K loop: a memory warpgroup streams the A / W tiles (and the group scale
    rows) through ``plan.steps`` slots; two compute warpgroups run ``body`` per K step inside ``ctx``."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    tr = (plgpu.TilingTransform((8, TILE_K)), plgpu.SwizzleTransform(128))  # 128-byte rows of fp8
    specs = [plgpu.BlockSpec((plan.cta_m, TILE_K), lambda kk: (0, kk), transforms=tr),
             plgpu.BlockSpec((plan.tile_n, TILE_K), lambda kk: (0, kk), transforms=tr)]
    if plan.groups > 1:  # this K step's scale rows come with its tiles, by TMA
        specs += [plgpu.BlockSpec((1, plan.cta_m), lambda kk: (kk, 0)),
                  plgpu.BlockSpec((1, plan.tile_n), lambda kk: (kk, 0))]
    return plgpu.emit_pipeline_warp_specialized(
        body, grid=(plan.k // TILE_K,), memory_registers=40, in_specs=specs,
        wg_axis="wg", num_compute_wgs=2, max_concurrent_steps=plan.steps, compute_context=ctx,
        pipeline_state=state)


def _pipeline_operands(plan: Plan, a_gmem: Any, w_gmem: Any, sa_gmem: Any, sw_gmem: Any, pm: Any, pn: Any) -> tuple:
    """The pipeline's inputs for CTA tile (pm, pn): A rows, W rows, and the group scale rows."""
    from jax.experimental import pallas as pl

    cols = pl.ds((plan.n_off // plan.tile_n + pn) * plan.tile_n, plan.tile_n)
    ops = (a_gmem.at[pl.ds(pm * plan.cta_m, plan.cta_m)], w_gmem.at[cols])
    if plan.groups > 1:
        ops += (sa_gmem.at[:, pl.ds(pm * plan.cta_m, plan.cta_m)], sw_gmem.at[:, cols])
    return ops


def _chain_state(info: Any) -> jax.Array:
    """Pallas' pipeline state for this CTA's tile: its first starts the chain, its last drains it."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    last = info.local_index == info.num_local_steps - 1
    return jnp.where(info.local_index == 0, int(plgpu.PipelinePipeline.START),
                     jnp.where(last, int(plgpu.PipelinePipeline.STOP),
                               int(plgpu.PipelinePipeline.STEADY))).astype(jnp.int32)


# ---- the K step: one wgmma per step (per channel), or a product scaled into a running sum (groups)

def _issue(plan: Plan, wg: Any, a_smem: Any, w_smem: Any, acc_ref: Any) -> None:
    """This warpgroup's wgmma (fp8 / int8 takes B K-major: the (tile_n, K) weight tile, transposed as a
    view)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    plgpu.wgmma(acc_ref, a_smem.at[pl.ds(wg * plan.tile_m, plan.tile_m)], plgpu.transpose_ref(w_smem, (1, 0)))


def _product(plan: Plan, wg: Any, a_smem: Any, w_smem: Any, acc_ref: Any) -> None:
    from jax.experimental.pallas import mosaic_gpu as plgpu

    _issue(plan, wg, a_smem, w_smem, acc_ref)
    plgpu.wgmma_wait(0)


def _scaled(plan: Plan, p: jax.Array, s_a: jax.Array, s_w: jax.Array, shape: tuple[int, int] | None = None
            ) -> jax.Array:
    """One group's product (int32 sums are exact in float32: |sum| < 2^24) times its scales, over the
    warpgroup tile or a column part of ``shape``."""
    shape = plan.shape if shape is None else shape
    p = p.astype(jnp.float32)
    return p * lax.broadcast_in_dim(s_a, shape, [0]) * lax.broadcast_in_dim(s_w, shape, [1])


def _group_scales(plan: Plan, wg: Any, sa_smem: Any, sw_smem: Any, parts: int = 1) -> tuple[jax.Array, list]:
    """This K step's scale rows (TMA'd with its tiles): this warpgroup's rows, and the tile's columns
    in ``parts`` column parts."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    row_l, col_l = _layouts()
    s_a = plgpu.load(sa_smem.at[0, pl.ds(wg * plan.tile_m, plan.tile_m)], (), layout=row_l, optimized=False)
    if parts == 1:
        return s_a, [plgpu.load(sw_smem.at[0], (), layout=col_l, optimized=False)]
    width = plan.tile_n // parts
    return s_a, [plgpu.load(sw_smem.at[0, pl.ds(j * width, width)], (), layout=col_l, optimized=False)
                 for j in range(parts)]


def _step_channel(plan: Plan, wg: Any, _: Any, a_smem: Any, w_smem: Any, acc_ref: Any) -> Any:
    """Per channel: accumulate in the wgmma accumulator; the scales come in the epilogue."""
    _product(plan, wg, a_smem, w_smem, acc_ref)
    return acc_ref


def _step_plain(plan: Plan, wg: Any, _: Any, a_smem: Any, w_smem: Any, sa_smem: Any, sw_smem: Any,
                total: Any) -> Any:
    """'plain': this group's scales first, then its product in a fresh accumulator, scaled into the sum."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    s_a, (s_w,) = _group_scales(plan, wg, sa_smem, sw_smem)

    @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC(plan.shape, plan.acc_dtype))
    def p(acc_ref: Any) -> jax.Array:
        _product(plan, wg, a_smem, w_smem, acc_ref)
        return acc_ref[...]

    return total + _scaled(plan, p, s_a, s_w)


def _step_overlap(plan: Plan, wg: Any, _: Any, a_smem: Any, w_smem: Any, sa_smem: Any, sw_smem: Any,
                  carry: Any) -> Any:
    """'overlap': issue this group's wgmma, scale and add the previous group's product meanwhile (on the
    CUDA cores while the tensor cores run), then wait and keep this product raw."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    total, p_prev, sa_prev, sw_prev = carry
    s_a, (s_w,) = _group_scales(plan, wg, sa_smem, sw_smem)

    @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC(plan.shape, plan.acc_dtype))
    def step(acc_ref: Any) -> tuple[jax.Array, jax.Array]:
        _issue(plan, wg, a_smem, w_smem, acc_ref)
        new_total = total + _scaled(plan, p_prev, sa_prev, sw_prev)
        plgpu.wgmma_wait(0)
        return new_total, acc_ref[...]

    return step[0], step[1], s_a, s_w


def _step_split(plan: Plan, wg: Any, indices: Any, a_smem: Any, w_smem: Any, sa_smem: Any, sw_smem: Any,
                sums: Any, deferred: Any = None) -> Any:
    """'split': the tile's column parts as wgmmas all in flight at once; each part's product is scaled
    into its sum while the later parts' wgmmas still run. ``deferred(k_step)``, if given, runs right
    after the wgmmas are issued (a piece of the previous tile's codes epilogue, ``_deferred_codes``).
    The scale rows are loaded before the issue in either case: loaded after the deferred piece (to
    free registers meanwhile), ptxas waited for both parts at once (fifteenth session's SASS)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    n_parts, (_, part_n) = plan.n_parts, plan.part
    s_a, s_w = _group_scales(plan, wg, sa_smem, sw_smem, n_parts)
    a_rows = a_smem.at[pl.ds(wg * plan.tile_m, plan.tile_m)]

    def step(*accs: Any) -> tuple[jax.Array, ...]:
        for j, acc in enumerate(accs):
            w_part = plgpu.transpose_ref(w_smem.at[pl.ds(j * part_n, part_n)], (1, 0))
            plgpu.wgmma(acc, a_rows, w_part)
        if deferred is not None:
            deferred(indices[0])
        new = []
        for j, acc in enumerate(accs):
            # part j's wgmma (issued and committed in order) is done, the later ones may still run;
            # ``acc[...]`` would wait for all of them (wait_group 0) and serialize the parts
            p = plgpu.wgmma_accumulator_load(acc, wait_n=n_parts - 1 - j)
            new.append(sums[j] + _scaled(plan, p, s_a, s_w[j], plan.part))
        return tuple(new)

    return pl.run_scoped(step, *[plgpu.ACC(plan.part, plan.acc_dtype) for _ in range(n_parts)])


DEFER_PIECES = 4  # column pieces of a tile per pass of the deferred codes epilogue (GELU, then codes)
DEFER_STEPS = 2 * DEFER_PIECES  # K steps it is spread over: a tile needs at least this many


def _deferred_codes(plan: Plan, refs: _Refs, wg: Any, prev: tuple[Any, Any, Any], k_step: Any) -> None:
    """The previous tile's fc1 codes epilogue (``gelu_group_codes``' math) in ``DEFER_STEPS`` pieces, one per
    K step of this tile, under that step's wgmmas: steps 0-3 the GELU of one column quarter of the staged
    bf16 output each (written back in place), the rows' running abs-max kept in ``amax`` (the last piece
    writes the rows' scales to ``s_smem``), steps 4-7 one quarter's codes each into the output slot, then
    its stores. ``prev``: (whether there is a previous tile, its first row, its column tile). Each thread
    reads back what it wrote (one layout throughout); the row values cross threads through shared
    memory behind ``commit_smem``'s warpgroup barrier, the running abs-max in two alternating slots (a
    piece reads one and writes the other, so that no thread overwrites a row another is still reading).

    Quarters, not halves: the fifteenth session's halves (~330 instructions per warp a
    step) outlasted a step's wgmmas and made fc1 19-24% slower (RESULTS.md); a quarter is ~160."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu
    from qdit_jax.quant.kernels.row_quant import row_amax, row_scale

    row_l, _ = _layouts()
    has_prev, p_rows, p_pn = prev
    width = plan.tile_n // DEFER_PIECES
    wgmma_l = plgpu.Layout.WGMMA

    def piece(ref: Any, j: int) -> Any:
        return ref.at[wg, :, pl.ds(j * width, width)]

    def scales() -> jax.Array:
        return plgpu.load(refs.s_smem.at[wg], (), layout=row_l, optimized=False)

    for j in range(DEFER_PIECES):
        @pl.when(has_prev & (k_step == j))
        def _gelu_piece() -> None:
            h = gelu_h(plgpu.load(piece(refs.stage, j), (), layout=wgmma_l, optimized=False).astype(jnp.float32))
            piece(refs.stage, j)[...] = h.astype(jnp.bfloat16)
            m = row_amax([h])
            if j == 0:
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous stores have read s_smem / o_smem
            else:
                m = jnp.maximum(m, plgpu.load(refs.amax.at[wg, (j - 1) % 2], (), layout=row_l, optimized=False))
            if j == DEFER_PIECES - 1:
                refs.s_smem[wg] = row_scale(m, plan.gelu_codes)
            else:
                refs.amax[wg, j % 2] = m
            plgpu.commit_smem()

    for j in range(DEFER_PIECES):
        @pl.when(has_prev & (k_step == DEFER_PIECES + j))
        def _codes_piece() -> None:
            h = plgpu.load(piece(refs.stage, j), (), layout=wgmma_l, optimized=False).astype(jnp.float32)
            piece(refs.o_smem, j)[...] = group_codes(h, scales(), plan.gelu_codes).astype(plan.out_dtype)
            if j == DEFER_PIECES - 1:
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(refs.o_smem.at[wg], refs.out.at[pl.ds(p_rows, plan.tile_m),
                                                                        pl.ds(p_pn * plan.tile_n, plan.tile_n)])
                plgpu.copy_smem_to_gmem(refs.s_smem.at[wg], refs.out_scales.at[p_pn, pl.ds(p_rows, plan.tile_m)])


_STEP_BODIES = {None: _step_channel, "plain": _step_plain, "overlap": _step_overlap, "split": _step_split}


# ---- the tile's epilogue: the K loop's result, scales / bias / residual / codes, the store

def _accumulate(plan: Plan, refs: _Refs, wg: Any, rows: Any, wcols: Any, eval_pipeline: Any) -> list[jax.Array]:
    """Run the K loop; the tile's float32 result (scaled; before bias) in column parts."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    row_l, col_l = _layouts()

    def zeros(shape: tuple[int, ...], dtype: Any, layout: Any = plgpu.Layout.WGMMA) -> jax.Array:
        return plgpu.layout_cast(jnp.zeros(shape, dtype), layout)

    if plan.groups == 1:
        @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC(plan.shape, plan.acc_dtype))
        def y(acc_ref: Any) -> jax.Array:
            eval_pipeline(acc_ref)
            return acc_ref[...]

        s_a = plgpu.load(refs.sa.at[pl.ds(rows, plan.tile_m)], (), layout=row_l, optimized=False)
        s_w = plgpu.load(refs.sw.at[wcols], (), layout=col_l, optimized=False)
        # rounded as the XLA path's product: int32 sums to float32, fp8 to bf16
        y = _scaled(plan, y if plan.int_codes else y.astype(jnp.bfloat16), s_a, s_w)
    elif plan.group_mode == "plain":  # the scaled groups' float32 sum, from the K loop
        y = eval_pipeline(zeros(plan.shape, jnp.float32))
    elif plan.group_mode == "split":  # the column parts' sums
        y = eval_pipeline(tuple(zeros(plan.part, jnp.float32) for _ in range(plan.n_parts)))
    else:  # 'overlap': the sum of all but the last group, and the last group's product and scales
        y, p, s_a, s_w = eval_pipeline((zeros(plan.shape, jnp.float32), zeros(plan.shape, plan.acc_dtype),
                                        zeros((plan.tile_m,), jnp.float32, row_l),
                                        zeros((plan.tile_n,), jnp.float32, col_l)))
        y = y + _scaled(plan, p, s_a, s_w)
    return list(y) if isinstance(y, tuple) else [y]  # Mosaic has no concatenate: parts stay parts


def _biased(plan: Plan, refs: _Refs, pn: Any, parts: list[jax.Array]) -> list[jax.Array]:
    """The tile's float32 column parts plus the bias of column tile ``pn``."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    _, col_l = _layouts()
    width = plan.tile_n // len(parts)
    out = []
    for j, yj in enumerate(parts):
        bj = plgpu.load(refs.bias.at[pl.ds(plan.n_off + pn * plan.tile_n + j * width, width)], (), layout=col_l,
                        optimized=False)
        out.append(yj + lax.broadcast_in_dim(bj, (plan.tile_m, width), [1]))
    return out


def _finish(plan: Plan, refs: _Refs, wg: Any, rows: Any, pn: Any, ocols: Any, parts: list[jax.Array]) -> None:
    """Bias, then the gated residual (its tile already in this warpgroup's slot) or the next layer's
    codes, then the store by TMA from the warpgroup's SMEM slot."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    _, col_l = _layouts()
    width = plan.tile_n // len(parts)
    pshape = (plan.tile_m, width)
    if plan.residual:
        plgpu.barrier_wait(refs.r_bar.at[wg])
    parts = _biased(plan, refs, pn, parts)
    for j, yj in enumerate(parts):
        pcols = pl.ds(j * width, width)
        if plan.residual:  # x + gate * y, each step rounded to bf16 as the model's
            gj = plgpu.load(refs.gate.at[pl.ds((rows // plan.rows_per_gate) * plan.n + pn * plan.tile_n + j * width,
                                               width)], (), layout=col_l, optimized=False)
            yj = yj.astype(jnp.bfloat16).astype(jnp.float32)
            yj = (lax.broadcast_in_dim(gj, pshape, [1]) * yj).astype(jnp.bfloat16).astype(jnp.float32)
            res = plgpu.load(refs.o_smem.at[wg, :, pcols], (), layout=plgpu.Layout.WGMMA, optimized=False)
            yj = res.astype(jnp.float32) + yj
        parts[j] = yj
    if plan.gelu_codes is not None:  # the next layer's codes and group scales instead of y
        s_g, parts = gelu_group_codes(parts, plan.gelu_codes)
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # this slot's previous store has read it
    for j, yj in enumerate(parts):
        refs.o_smem[wg, :, pl.ds(j * width, width)] = yj.astype(plan.out_dtype)
    if plan.gelu_codes is not None:
        refs.s_smem[wg] = s_g
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(refs.o_smem.at[wg], refs.out.at[pl.ds(rows, plan.tile_m), ocols])
    if plan.gelu_codes is not None:  # group pn of the output's columns (tile_n is one group)
        plgpu.copy_smem_to_gmem(refs.s_smem.at[wg], refs.out_scales.at[pn, pl.ds(rows, plan.tile_m)])


def _tile_epilogue(plan: Plan, refs: _Refs, wg: Any, rows: Any, pn: Any, wcols: Any, last: Any,
                   eval_pipeline: Any) -> None:
    """One output tile of this warpgroup: the residual tile's copy issued first (by TMA into the
    warpgroup's output slot once its previous store has read it, so that it lands during the K loop),
    then the K loop, then :func:`_finish`. With ``plan.defer_codes`` a tile other than the CTA's
    ``last`` one only stages its biased output as bf16 (the GELU's first rounding) for
    :func:`_deferred_codes` under the next tile's K steps."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    ocols = pl.ds(pn * plan.tile_n, plan.tile_n)
    if plan.residual:
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        plgpu.copy_gmem_to_smem(refs.residual.at[pl.ds(rows, plan.tile_m), ocols], refs.o_smem.at[wg],
                                refs.r_bar.at[wg])
    parts = _accumulate(plan, refs, wg, rows, wcols, eval_pipeline)
    if not plan.defer_codes:
        _finish(plan, refs, wg, rows, pn, ocols, parts)
        return

    @pl.when(last)
    def _now() -> None:
        _finish(plan, refs, wg, rows, pn, ocols, parts)

    @pl.when(jnp.logical_not(last))
    def _stage() -> None:
        width = plan.tile_n // len(parts)
        for j, yj in enumerate(_biased(plan, refs, pn, parts)):
            refs.stage[wg, :, pl.ds(j * width, width)] = yj.astype(jnp.bfloat16)


def kernel_body(plan: Plan, a_gmem: Any, w_gmem: Any, sa_gmem: Any, sw_gmem: Any, b_gmem: Any, *rest: Any) -> None:
    """The persistent kernel: each CTA (one per SM) loops over its output tiles."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    r_gmem, g_gmem = rest[:2] if plan.residual else (None, None)
    o_gmem, s_gmem = (rest[-2], rest[-1]) if plan.gelu_codes is not None else (rest[-1], None)

    def ignore(*_: Any, **__: Any) -> None:
        return None

    allocations = _pipeline(plan, ignore, ignore).get_allocations(
        *_pipeline_operands(plan, a_gmem, w_gmem, sa_gmem, sw_gmem, 0, 0))

    @functools.partial(pl.run_scoped, allocs=allocations,
                       o_smem=plgpu.SMEM((2, plan.tile_m, plan.tile_n), plan.out_dtype),
                       s_smem=None if plan.gelu_codes is None else plgpu.SMEM((2, plan.tile_m), jnp.float32),
                       r_bar=None if not plan.residual else plgpu.Barrier(num_barriers=2),
                       stage=plgpu.SMEM((2, plan.tile_m, plan.tile_n), jnp.bfloat16) if plan.defer_codes else None,
                       amax=plgpu.SMEM((2, 2, plan.tile_m), jnp.float32) if plan.defer_codes else None,
                       collective_axes="wg")
    def scope(allocs: Any, o_smem: Any, s_smem: Any, r_bar: Any, stage: Any, amax: Any) -> None:
        refs = _Refs(sa_gmem, sw_gmem, b_gmem, r_gmem, g_gmem, o_gmem, s_gmem, o_smem, s_smem, r_bar, stage, amax)
        wg = lax.axis_index("wg")

        @plgpu.nd_loop((plan.m_tiles * plan.n_tiles,), collective_axes="sm")
        def tile(info: Any) -> None:
            (lin,) = info.index
            pm, pn = lin // plan.n_tiles, lin % plan.n_tiles
            rows = pm * plan.cta_m + wg * plan.tile_m
            wcols = pl.ds(plan.n_off + pn * plan.tile_n, plan.tile_n)
            body = functools.partial(_STEP_BODIES[plan.group_mode], plan, wg)
            last = info.local_index == info.num_local_steps - 1
            if plan.defer_codes:  # the CTA's previous tile (nd_loop strides tiles by the SM count)
                prev_lin = lin - lax.axis_size("sm")
                prev = (info.local_index > 0, (prev_lin // plan.n_tiles) * plan.cta_m + wg * plan.tile_m,
                        prev_lin % plan.n_tiles)
                body = functools.partial(body, deferred=functools.partial(_deferred_codes, plan, refs, wg, prev))
            epilogue = functools.partial(_tile_epilogue, plan, refs, wg, rows, pn, wcols, last)
            state = _chain_state(info) if plan.chained else None
            _pipeline(plan, body, epilogue, state)(*_pipeline_operands(plan, a_gmem, w_gmem, sa_gmem, sw_gmem, pm, pn),
                                                   allocations=allocs)

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def gelu_group_codes(parts: list[jax.Array], spec: Any) -> tuple[jax.Array, list[jax.Array]]:
    """Inside the kernel: the tanh GELU of float32 column parts of a tile holding the layer's
    bf16-rounded output (``kernels.gelu_quant``'s 'dtype' evaluation; the tanh is whatever the kernel's
    ``approx_math`` makes of ``jnp.tanh``: tanh.approx.f32 or libdevice's tanhf), and their
    symmetric codes with one scale per row (the tile is one group wide): (scales (rows,), codes as
    float32, part by part). The codes step of ``row_quant.scale_and_codes``, written for Mosaic: a row
    vector broadcast with ``broadcast_in_dim`` (``s[:, None]`` does not lower there) and ``jnp.round``."""
    from qdit_jax.quant.kernels.row_quant import row_amax, row_scale

    hs = [gelu_h(y) for y in parts]
    s = row_scale(row_amax(hs), spec)
    return s, [group_codes(h, s, spec) for h in hs]


def gelu_h(y: jax.Array) -> jax.Array:
    """The tanh GELU of a float32 tile (or part) of the layer's output, rounded as the model's bf16 GELU
    (input, every step and the result: ``gelu_quant._gelu``'s 'dtype' evaluation), in float32."""
    from qdit_jax.quant.kernels.gelu_quant import _gelu

    bf16 = jnp.bfloat16
    return _gelu(y.astype(bf16).astype(jnp.float32), bf16, "dtype", fast=False).astype(bf16).astype(jnp.float32)


def group_codes(h: jax.Array, s: jax.Array, spec: Any) -> jax.Array:
    """Symmetric codes (as float32) of a tile (or part) ``h`` with one scale per row ``s``. No clip to the
    code range (row_quant's codes clip): s is the rows' abs-max over the largest code (127 / 448, rounded
    to nearest), so |h / s| <= qmax (1 + 2^-22), which rounds to qmax at most (int8: never -128; fp8: the
    store's float32 -> e4m3 conversion is PTX's cvt.rn.satfinite, the only one PTX has, saturating at 448
    as the clip would); the two FMNMX per element cost 4-5% of fc1 with this epilogue on the H100
    (RESULTS.md, fifteenth session)."""
    if spec.format == "int":
        return jnp.round(h / lax.broadcast_in_dim(s, h.shape, [0]))
    return h / lax.broadcast_in_dim(s, h.shape, [0])
