"""The Mosaic GPU kernel body of ``kernels.scaled_gemm``: its static plan, the K step of each group
mode, the compute warpgroups' tile epilogue (scales, bias, gated residual or the next layer's codes,
store) and the kernel's frame.

Split from ``scaled_gemm`` (its guard, tiling choices, entry point and XLA reference) and from
``scaled_gemm_fourth_wg`` (the optional fourth warpgroup's three forms) so that each part reads in one
sitting. Every function here runs while the kernel is traced: they emit Mosaic GPU
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
import numpy as np
from jax import lax

from qdit_jax.quant.kernels.gelu_quant import GELU_C1, GELU_C2

TILE_K = 128  # one K step (and, with group scales, one group) per pipeline slot
BF16_TILE_K = TILE_K // 2  # the bf16 form's K step: one 128-byte row of bf16, as TILE_K is of fp8 / int8

# rows the epilogue warpgroup takes at a time (one wgmma-layout row block), each piece stored by TMA as
# soon as it is written: storing the whole tile at the end cost q, k, v 446 vs 422 us, fc1 589 vs 550
# (docs/RESULTS.md, twentieth session)
EPILOGUE_ROWS = 64

# registers per thread of each compute warpgroup and of the codes warpgroup (with the memory
# warpgroup's 40: 512, the 64K register file over 128-thread warpgroups). 168 is what the compute
# warpgroups compile to in the three-warpgroup kernel (here ptxas spills 8 bytes); at 160 / 152 they
# spill more and run 1.3x slower, 176 / 120 and 184 / 104 died with an illegal instruction on the H100
# (RESULTS.md, sixteenth session). 'overlap' holds a third register tile and spills at 168 (2.2x
# slower), so the codes warpgroup goes with 'split'
CODES_WG_REGISTERS = 168, 136

# ``store_wg``: the memory and store warpgroups at setmaxnreg's floor leave the compute warpgroups the 232
# registers a thread of the three-warpgroup kernel (24 + 2 x 232 + 24 = 512)
STORE_WG_REGISTERS = 24
STORE_WG_COMPUTE_REGISTERS = 232
PAIR_AXIS = "pair"  # the cluster axis of ``Plan.cta_pairs``
GELU_MODES = ("dtype", "float32")  # the codes epilogue's GELU evaluations (``gelu_h``)
_GELU_C1 = float(np.float32(GELU_C1))  # the tanh GELU's constants in float32, C2 folded in ('float32' mode)
_GELU_C12 = float(np.float32(GELU_C1 * GELU_C2))


def pipeline_steps(k: int, tile_k: int, k_tiles: int = 1) -> int:
    """K steps of the pipeline: ``k_tiles`` K tiles a step (``group_pairs``: two, an odd group count's last
    step one)."""
    return -(-k // (tile_k * k_tiles))


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
    codes_wg: bool = False  # the codes epilogue run by a fourth warpgroup (``scaled_gemm_fourth_wg.codes_warpgroup``)
    bf16: bool = False  # bf16 operands, no scales (the float model's GEMM with this epilogue)
    w_kn: bool = False  # weights stored (K, N) (a Flax Dense kernel; bf16 only), else (N, K)
    prefetch: str | None = None  # the epilogue's vectors loaded 'before' the K loop or 'after' it in one batch
    out_blocks: int = 1  # outputs: the n columns as this many (M, n / out_blocks) arrays (q, k, v in one call)
    epilogue_wg: bool = False  # the epilogue (scales, bias, residual) and store on a fourth warpgroup
    store_wg: bool = False  # only the stores on a fourth warpgroup of few registers (``scaled_gemm_fourth_wg``)
    bias_first: bool = False  # group scales: the bias is the float32 sums' initial value, not an epilogue add
    cta_pairs: bool = False  # clusters of two CTAs on vertically adjacent tiles, the weight tile multicast to both
    gelu_mode: str = "dtype"  # the codes epilogue's GELU: 'dtype' (the bf16 model's roundings) or 'float32' (none)
    # 'split' group scales: a compute warpgroup's two parts stacked along M (all the CTA tile's rows, half its
    # columns) instead of side by side along N: 16 column scales a thread and K step instead of 32
    stacked: bool = False
    group_pairs: bool = False  # ('split', stacked) two groups a pipeline step, their four parts' wgmmas in flight

    @property
    def k_tiles(self) -> int:
        """128-wide K tiles (fp8 / int8; bf16: 64-wide) in each pipeline step: two with ``group_pairs``."""
        return 2 if self.group_pairs else 1

    @property
    def pipeline_steps(self) -> int:
        return pipeline_steps(self.k, self.tile_k, self.k_tiles)

    @property
    def tile_k(self) -> int:
        """K elements per pipeline step: one 128-byte swizzled row (fp8 / int8: 128, bf16: 64)."""
        return BF16_TILE_K if self.bf16 else TILE_K

    @property
    def shape(self) -> tuple[int, int]:
        return self.tile_m, self.tile_n

    @property
    def cta_m(self) -> int:
        return 2 * self.tile_m

    @property
    def wg_shape(self) -> tuple[int, int]:
        """A compute warpgroup's share of the CTA tile: ``tile_m`` rows of all ``tile_n`` columns, or
        (``stacked``) all ``cta_m`` rows of half the columns."""
        return (self.cta_m, self.tile_n // 2) if self.stacked else (self.tile_m, self.tile_n)

    @property
    def n_tiles(self) -> int:
        return self.n // self.tile_n

    @property
    def loop_tiles(self) -> int:
        """Steps of the persistent tile loop: the output tiles, or with ``cta_pairs`` the pairs of them."""
        return self.m_tiles * self.n_tiles // (2 if self.cta_pairs else 1)

    @property
    def block_tiles(self) -> int:
        """Column tiles per output array."""
        return self.n_tiles // self.out_blocks

    @property
    def fourth_wg(self) -> bool:
        """Whether a fourth warpgroup takes the tile's epilogue (the codes, or the scales and the store)."""
        return self.codes_wg or self.epilogue_wg

    @property
    def stage_slots(self) -> int:
        """Slots of the stage the compute warpgroups hand their tiles over in: two for the codes warpgroup's
        64-row tiles; one CTA tile (64 KB: 256 x 128 bf16, or 128 x 128 float32 group sums) for the epilogue
        warpgroup (two do not fit beside the pipeline: 144 KB + 2 x 64 KB > 227 KB per channel), which it
        hands back once its stores have read it."""
        return 1 if self.epilogue_wg else 2

    @property
    def stage_dtype(self) -> Any:
        """What the compute warpgroups hand over: bf16 (the codes warpgroup's biased output, the per-channel
        epilogue warpgroup's fp8 product) or, to the group epilogue warpgroup, the float32 group sum."""
        return jnp.float32 if self.epilogue_wg and self.groups > 1 else jnp.bfloat16

    @property
    def out_slots(self) -> int:
        """Output slots per compute warpgroup: with ``store_wg`` two where shared memory has room (64-row
        warpgroup tiles), so that the compute warpgroups stage (or load the residual into) one while the
        store warpgroup still stores the other, else one."""
        return 2 if self.store_wg and self.tile_m <= 64 else 1

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
    out: Any  # the output, or ``plan.out_blocks`` of them
    out_scales: Any  # the codes epilogue's (n // tile_n, M) scales, or None
    o_smem: Any  # (2, tile_m, tile_n): one output slot per compute warpgroup (codes warpgroup: per 64-row half;
    # epilogue warpgroup: None, it stores from ``stage``; with group scales one 64-row block: ``_output_slots``)
    s_smem: Any
    r_bar: Any  # residual-tile barriers, one per warpgroup
    stage: Any = None  # fourth warpgroup: (slots, 2 warpgroups, tile_m, tile_n), the biased output in bf16 (codes
    # warpgroup), the product rounded to bf16 or the float32 group sums (epilogue warpgroup)
    full: Any = None  # fourth warpgroup: per stage slot, both compute warpgroups have staged their rows
    empty: Any = None  # fourth warpgroup: per stage slot, the fourth warpgroup is done with it


def _layouts() -> tuple[Any, Any]:
    """The wgmma accumulator's row vector and column vector layouts."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    return plgpu.Layout.WGMMA.reduce(1), plgpu.Layout.WGMMA.reduce(0)


def _pipeline(plan: Plan, body: Any, ctx: Any, state: Any = None) -> Any:
    """The warp-specialized K loop: a memory warpgroup streams the A / W tiles (and the group scale
    rows) through ``plan.steps`` slots; two compute warpgroups run ``body`` per K step inside ``ctx``."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    tk = plan.tile_k
    tr = (plgpu.TilingTransform((8, tk)), plgpu.SwizzleTransform(128))  # 128-byte rows
    # with cta_pairs the weight tile and its scale row are the pair's: each CTA loads half, both get all
    pair = {"collective_axes": (PAIR_AXIS,)} if plan.cta_pairs else {}

    def tile_specs(k_tile: Any) -> list:
        """The A and W tiles of K tile ``k_tile(kk)`` of step kk (with group scales, their scale rows too)."""
        specs = [plgpu.BlockSpec((plan.cta_m, tk), lambda kk: (0, k_tile(kk)), transforms=tr),
                 plgpu.BlockSpec((tk, plan.tile_n), lambda kk: (k_tile(kk), 0), transforms=tr, **pair) if plan.w_kn
                 else plgpu.BlockSpec((plan.tile_n, tk), lambda kk: (0, k_tile(kk)), transforms=tr, **pair)]
        if plan.groups > 1:  # this K step's scale rows come with its tiles, by TMA
            specs += [plgpu.BlockSpec((1, plan.cta_m), lambda kk: (k_tile(kk), 0)),
                      plgpu.BlockSpec((1, plan.tile_n), lambda kk: (k_tile(kk), 0), **pair)]
        return specs

    def second(kk: Any) -> Any:  # group_pairs: K tile 2 kk + 1; an odd count's last step its one group again
        return 2 * kk + 1 if plan.groups % 2 == 0 else jnp.minimum(2 * kk + 1, plan.groups - 1)

    specs = tile_specs(lambda kk: 2 * kk) + tile_specs(second) if plan.group_pairs else tile_specs(lambda kk: kk)
    return plgpu.emit_pipeline_warp_specialized(
        body, grid=(plan.pipeline_steps,), memory_registers=STORE_WG_REGISTERS if plan.store_wg else 40,
        in_specs=specs,
        wg_axis="wg", num_compute_wgs=2, max_concurrent_steps=plan.steps, compute_context=ctx,
        pipeline_state=state)


def _pipeline_operands(plan: Plan, a_gmem: Any, w_gmem: Any, sa_gmem: Any, sw_gmem: Any, pm: Any, pn: Any) -> tuple:
    """The pipeline's inputs for CTA tile (pm, pn): A rows, W rows, and the group scale rows."""
    from jax.experimental import pallas as pl

    cols = pl.ds((plan.n_off // plan.tile_n + pn) * plan.tile_n, plan.tile_n)
    ops = (a_gmem.at[pl.ds(pm * plan.cta_m, plan.cta_m)], w_gmem.at[:, cols] if plan.w_kn else w_gmem.at[cols])
    if plan.groups > 1:
        ops += (sa_gmem.at[:, pl.ds(pm * plan.cta_m, plan.cta_m)], sw_gmem.at[:, cols])
    return ops * plan.k_tiles  # group_pairs: the same operands for each of a step's two K tiles


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
    view; bf16 weights stored (K, N) go as they are)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    b = w_smem if plan.w_kn else plgpu.transpose_ref(w_smem, (1, 0))
    plgpu.wgmma(acc_ref, a_smem.at[pl.ds(wg * plan.tile_m, plan.tile_m)], b)


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


def _part_scales(plan: Plan, wg: Any, sa_smem: Any, sw_smem: Any) -> list[tuple[jax.Array, jax.Array]]:
    """This K step's (row, column) scale vectors of each of the warpgroup's ``plan.n_parts`` parts: side by
    side, one row vector and each part's columns (:func:`_group_scales`); ``stacked``, each part's rows and
    the warpgroup's one column vector (half the column loads)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    if not plan.stacked:
        s_a, s_w = _group_scales(plan, wg, sa_smem, sw_smem, plan.n_parts)
        return [(s_a, v) for v in s_w]
    row_l, col_l = _layouts()
    width = plan.wg_shape[1]
    s_w = plgpu.load(sw_smem.at[0, pl.ds(wg * width, width)], (), layout=col_l, optimized=False)
    return [(plgpu.load(sa_smem.at[0, pl.ds(j * plan.tile_m, plan.tile_m)], (), layout=row_l, optimized=False), s_w)
            for j in range(plan.n_parts)]


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


def _step_split(plan: Plan, wg: Any, _: Any, a_smem: Any, w_smem: Any, sa_smem: Any, sw_smem: Any,
                sums: Any) -> Any:
    """'split': the warpgroup tile's parts (column blocks, or ``stacked`` row blocks) as wgmmas all in flight
    at once; each part's product is scaled into its sum while the later parts' wgmmas still run."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    n_parts = plan.n_parts
    scales = _part_scales(plan, wg, sa_smem, sw_smem)
    a_parts, w_parts = _split_operands(plan, wg, a_smem, w_smem)

    def step(*accs: Any) -> tuple[jax.Array, ...]:
        for j, acc in enumerate(accs):
            plgpu.wgmma(acc, a_parts[j], plgpu.transpose_ref(w_parts[j], (1, 0)))
        new = []
        for j, acc in enumerate(accs):
            # part j's wgmma (issued and committed in order) is done, the later ones may still run;
            # ``acc[...]`` would wait for all of them (wait_group 0) and serialize the parts
            p = plgpu.wgmma_accumulator_load(acc, wait_n=n_parts - 1 - j)
            new.append(sums[j] + _scaled(plan, p, *scales[j], plan.part))
        return tuple(new)

    return pl.run_scoped(step, *[plgpu.ACC(plan.part, plan.acc_dtype) for _ in range(n_parts)])


def _split_operands(plan: Plan, wg: Any, a_smem: Any, w_smem: Any) -> tuple[list, list]:
    """The A and W shared-memory views of each 'split' part: ``stacked``, the CTA tile's j-th row block times
    this warpgroup's columns; side by side, this warpgroup's rows times the tile's j-th column block."""
    from jax.experimental import pallas as pl

    n_parts, (part_m, part_n) = plan.n_parts, plan.part
    if plan.stacked:
        return ([a_smem.at[pl.ds(j * part_m, part_m)] for j in range(n_parts)],
                [w_smem.at[pl.ds(wg * part_n, part_n)]] * n_parts)
    return ([a_smem.at[pl.ds(wg * plan.tile_m, plan.tile_m)]] * n_parts,
            [w_smem.at[pl.ds(j * part_n, part_n)] for j in range(n_parts)])


def _step_split_pairs(plan: Plan, wg: Any, indices: Any, *refs: Any) -> Any:
    """'split' with ``group_pairs``: this step's two groups' parts (2 x ``n_parts`` wgmmas) all issued, then
    each product scaled into its part's sum as it finishes, the second group's scale vectors loaded after
    the first group's promotions (fewer live registers); three of four promotions with a wgmma in flight.
    An odd group count's last step has one group (its second slot holds that group again, unused)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    *tiles, sums = refs  # (a, w, sa, sw) of K tile 2 kk, then of 2 kk + 1; the parts' float32 sums
    groups = [tiles[:4], tiles[4:]]
    n_parts = plan.n_parts
    scales0 = _part_scales(plan, wg, groups[0][2], groups[0][3])
    operands = [_split_operands(plan, wg, a, w) for a, w, _, _ in groups]

    def step(*accs: Any) -> tuple[jax.Array, ...]:
        def promote(count: int) -> tuple[jax.Array, ...]:
            """Issue the step's first ``count`` groups' parts, then scale each into its sum as it finishes."""
            for g in range(count):
                a_parts, w_parts = operands[g]
                for j in range(n_parts):
                    plgpu.wgmma(accs[g * n_parts + j], a_parts[j], plgpu.transpose_ref(w_parts[j], (1, 0)))
            new = list(sums)
            for g in range(count):
                scales = scales0 if g == 0 else _part_scales(plan, wg, groups[1][2], groups[1][3])
                for j in range(n_parts):
                    t = g * n_parts + j
                    p = plgpu.wgmma_accumulator_load(accs[t], wait_n=count * n_parts - 1 - t)
                    new[j] = new[j] + _scaled(plan, p, *scales[j], plan.part)
            return tuple(new)

        if plan.groups % 2 == 0:
            return promote(2)
        (kk,) = indices
        return lax.cond(kk == plan.groups // 2, lambda: promote(1), lambda: promote(2))

    return pl.run_scoped(step, *[plgpu.ACC(plan.part, plan.acc_dtype) for _ in range(2 * n_parts)])


_STEP_BODIES = {None: _step_channel, "plain": _step_plain, "overlap": _step_overlap, "split": _step_split}


# ---- the tile's epilogue: the K loop's result, scales / bias / residual / codes, the store

def _scale_vectors(plan: Plan, refs: _Refs, rows: Any, wcols: Any) -> tuple[jax.Array, jax.Array]:
    """Per channel: this warpgroup's row scales and the tile's column scales."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    row_l, col_l = _layouts()
    return (plgpu.load(refs.sa.at[pl.ds(rows, plan.tile_m)], (), layout=row_l, optimized=False),
            plgpu.load(refs.sw.at[wcols], (), layout=col_l, optimized=False))


def _part_col(plan: Plan, wg: Any, j: int, width: int) -> Any:
    """The first column (within the CTA tile) of part ``j`` of ``width`` columns of warpgroup ``wg``'s tile."""
    return wg * width if plan.stacked else j * width


def _bias_part(plan: Plan, refs: _Refs, pn: Any, col: Any, width: int) -> jax.Array:
    """The bias of the ``width`` columns from column ``col`` of column tile ``pn`` (a column part)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    cols = pl.ds(plan.n_off + pn * plan.tile_n + col, width)
    return plgpu.load(refs.bias.at[cols], (), layout=_layouts()[1], optimized=False)


def _gate_part(plan: Plan, refs: _Refs, rows: Any, pn: Any, col: Any, width: int) -> jax.Array:
    """The gate row of these rows' sample for the ``width`` columns from column ``col`` of column tile ``pn``."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    start = (rows // plan.rows_per_gate) * plan.n + pn * plan.tile_n + col
    return plgpu.load(refs.gate.at[pl.ds(start, width)], (), layout=_layouts()[1], optimized=False)


def _epilogue_vectors(plan: Plan, refs: _Refs, rows: Any, pn: Any, wcols: Any) -> dict:
    """The epilogue's per-row / per-column vectors of this warpgroup's tile, all loads issued together
    (``plan.prefetch``): the scales (per channel), the bias and the gate per column part."""
    width = plan.tile_n // plan.n_parts
    vec: dict = {}
    if plan.groups == 1 and not plan.bf16:
        vec["s_a"], vec["s_w"] = _scale_vectors(plan, refs, rows, wcols)
    vec["bias"] = [_bias_part(plan, refs, pn, j * width, width) for j in range(plan.n_parts)]
    if plan.residual:
        vec["gate"] = [_gate_part(plan, refs, rows, pn, j * width, width) for j in range(plan.n_parts)]
    return vec


def _accumulate(plan: Plan, refs: _Refs, wg: Any, rows: Any, pn: Any, wcols: Any, eval_pipeline: Any,
                vec: Any = None) -> tuple[list[jax.Array], dict | None]:
    """Run the K loop; the tile's float32 result (scaled; before the bias unless ``plan.bias_first``) in
    column parts, and the epilogue's vectors (``vec``: loaded before the K loop, or a function loading
    them, called right after it)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    row_l, col_l = _layouts()

    def zeros(shape: tuple[int, ...], dtype: Any, layout: Any = plgpu.Layout.WGMMA) -> jax.Array:
        return plgpu.layout_cast(jnp.zeros(shape, dtype), layout)

    def sums(parts: int) -> list[jax.Array]:
        """The group sums' initial values, column part by part: zeros, or (``plan.bias_first``) the bias."""
        width = plan.tile_n // parts
        if not plan.bias_first:
            return [zeros((plan.tile_m, width), jnp.float32) for _ in range(parts)]
        if isinstance(vec, dict):
            bias = vec["bias"]
        elif plan.stacked:  # both parts have this warpgroup's columns
            bias = [_bias_part(plan, refs, pn, _part_col(plan, wg, 0, width), width)] * parts
        else:
            bias = [_bias_part(plan, refs, pn, j * width, width) for j in range(parts)]
        return [plgpu.layout_cast(lax.broadcast_in_dim(b, (plan.tile_m, width), [1]), plgpu.Layout.WGMMA)
                for b in bias]

    if plan.groups == 1:
        @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC(plan.shape, plan.acc_dtype))
        def y(acc_ref: Any) -> jax.Array:
            eval_pipeline(acc_ref)
            return acc_ref[...]

        vec = vec() if callable(vec) else vec  # 'after': right after the K loop, before the scaling
        if plan.bf16:  # rounded as the float model's bf16 product
            return [y.astype(jnp.bfloat16).astype(jnp.float32)], vec
        s_a, s_w = (vec["s_a"], vec["s_w"]) if vec is not None else _scale_vectors(plan, refs, rows, wcols)
        # rounded as the XLA path's product: int32 sums to float32, fp8 to bf16
        y = _scaled(plan, y if plan.int_codes else y.astype(jnp.bfloat16), s_a, s_w)
    elif plan.group_mode == "plain":  # the scaled groups' float32 sum, from the K loop
        y = eval_pipeline(sums(1)[0])
    elif plan.group_mode == "split":  # the column parts' sums
        y = eval_pipeline(tuple(sums(plan.n_parts)))
    else:  # 'overlap': the sum of all but the last group, and the last group's product and scales
        y, p, s_a, s_w = eval_pipeline((sums(1)[0], zeros(plan.shape, plan.acc_dtype),
                                        zeros((plan.tile_m,), jnp.float32, row_l),
                                        zeros((plan.tile_n,), jnp.float32, col_l)))
        y = y + _scaled(plan, p, s_a, s_w)
    vec = vec() if callable(vec) else vec  # group modes: 'after' the K loop and its last scaling
    return (list(y) if isinstance(y, tuple) else [y]), vec  # Mosaic has no concatenate: parts stay parts


def _biased(plan: Plan, refs: _Refs, pn: Any, parts: list[jax.Array], vec: dict | None = None,
            wg: Any = None) -> list[jax.Array]:
    """The tile's float32 parts plus the bias of column tile ``pn`` (from ``vec`` if loaded; ``stacked``
    parts: warpgroup ``wg``'s columns); with ``plan.bias_first`` the parts hold it already."""
    if plan.bias_first:
        return parts
    width = plan.tile_n // len(parts)
    out = []
    for j, yj in enumerate(parts):
        bj = vec["bias"][j] if vec is not None else _bias_part(plan, refs, pn, _part_col(plan, wg, j, width), width)
        out.append(yj + lax.broadcast_in_dim(bj, (plan.tile_m, width), [1]))
    return out


def _finish(plan: Plan, refs: _Refs, wg: Any, rows: Any, pn: Any, ocols: Any, parts: list[jax.Array],
            vec: dict | None = None, oslot: Any = None) -> None:
    """Bias, then the gated residual (its tile already in this warpgroup's slot ``oslot``) or the next
    layer's codes, then the store by TMA from that slot (``plan.store_wg``: the slot handed to the store
    warpgroup instead)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    width = plan.tile_n // len(parts)
    pshape = (plan.tile_m, width)
    if plan.residual:
        plgpu.barrier_wait(refs.r_bar.at[wg])
    parts = _biased(plan, refs, pn, parts, vec, wg)
    for j, yj in enumerate(parts):
        if plan.residual:  # x + gate * y, each step rounded to bf16 as the model's
            if vec is not None:
                gj = vec["gate"][j]
            else:  # (a stacked part j: the tile's j-th row block)
                prows = rows + j * plan.tile_m if plan.stacked else rows
                gj = _gate_part(plan, refs, prows, pn, _part_col(plan, wg, j, width), width)
            yj = yj.astype(jnp.bfloat16).astype(jnp.float32)
            yj = (lax.broadcast_in_dim(gj, pshape, [1]) * yj).astype(jnp.bfloat16).astype(jnp.float32)
            res = plgpu.load(refs.o_smem.at[_slot_part(plan, oslot, j, width)], (), layout=plgpu.Layout.WGMMA,
                             optimized=False)
            yj = res.astype(jnp.float32) + yj
        parts[j] = yj
    if plan.gelu_codes is not None:  # the next layer's codes and group scales instead of y
        s_g, parts = gelu_group_codes(parts, plan.gelu_codes, plan.gelu_mode)
    if plan.store_wg:
        if not plan.residual:  # (with one, the slot was waited for before its residual was loaded)
            plgpu.barrier_wait(refs.empty.at[oslot])
    else:
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # this slot's previous store has read it
    for j, yj in enumerate(parts):
        refs.o_smem[_slot_part(plan, oslot, j, width)] = yj.astype(plan.out_dtype)
    if plan.gelu_codes is not None:
        refs.s_smem[oslot] = s_g
    plgpu.commit_smem()
    if plan.store_wg:
        plgpu.barrier_arrive(refs.full.at[oslot])
        return
    _store_slot(plan, refs, oslot, pl.ds(rows, plan.wg_shape[0]), pn, ocols)


def _slot_part(plan: Plan, slot: Any, j: int, width: int) -> tuple:
    """The index of part ``j`` (``width`` columns) in output slot ``slot``: its columns, or (``stacked``) its
    rows."""
    from jax.experimental import pallas as pl

    if plan.stacked:
        return slot, pl.ds(j * plan.tile_m, plan.tile_m), slice(None)
    return slot, slice(None), pl.ds(j * width, width)


def _wg_row0(plan: Plan, wg: Any, pm: Any) -> Any:
    """The first output row of warpgroup ``wg``'s share of row tile ``pm``: its half's, or (``stacked``) the
    tile's."""
    return pm * plan.cta_m if plan.stacked else pm * plan.cta_m + wg * plan.tile_m


def _wg_cols(plan: Plan, wg: Any, pn: Any) -> Any:
    """The output columns of warpgroup ``wg``'s share of column tile ``pn``: all of the tile's, or
    (``stacked``) its half."""
    from jax.experimental import pallas as pl

    if plan.stacked:
        width = plan.wg_shape[1]
        return pl.ds(pn * plan.tile_n + wg * width, width)
    return pl.ds(pn * plan.tile_n, plan.tile_n)


def _store_slot(plan: Plan, refs: _Refs, slot: Any, rows: Any, pn: Any, ocols: Any) -> None:
    """The TMA stores of output slot ``slot`` (rows ``rows`` of column tile ``pn``): the tile, and with the
    codes epilogue its group scales (group pn of the output's columns: tile_n is one group)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    _copy_out(plan, refs, refs.o_smem.at[slot], rows, pn, ocols)
    if plan.gelu_codes is not None:
        plgpu.copy_smem_to_gmem(refs.s_smem.at[slot], refs.out_scales.at[pn, rows])


def _copy_out(plan: Plan, refs: _Refs, src: Any, rows: Any, pn: Any, ocols: Any) -> None:
    """The TMA store of a staged tile or row block (rows ``rows`` of column tile ``pn``, the output's
    columns ``ocols``: the tile's, or a ``stacked`` warpgroup's half) to the output holding it."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    if plan.out_blocks == 1:
        plgpu.copy_smem_to_gmem(src, refs.out.at[rows, ocols])
    for i in range(plan.out_blocks if plan.out_blocks > 1 else 0):  # the output array holding column tile pn
        bcols = pl.ds(ocols.start - i * plan.block_tiles * plan.tile_n, ocols.size)  # counted from output i's start
        pl.when(pn // plan.block_tiles == i)(functools.partial(plgpu.copy_smem_to_gmem, src,
                                                                refs.out[i].at[rows, bcols]))


def _tile_epilogue(plan: Plan, refs: _Refs, wg: Any, rows: Any, pn: Any, wcols: Any, slot: Any,
                   eval_pipeline: Any) -> None:
    """One output tile of this warpgroup: the residual tile's copy issued first (by TMA into the
    warpgroup's output slot once its previous store has read it, so that it lands during the K loop),
    then the K loop, then :func:`_finish`; with ``plan.codes_wg`` the biased output is staged in bf16 (the
    GELU's first rounding) in stage slot ``slot`` for ``scaled_gemm_fourth_wg.codes_warpgroup`` instead; with
    ``plan.epilogue_wg`` the product (:func:`_stage_product`) for ``scaled_gemm_fourth_wg.epilogue_warpgroup``."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    if plan.epilogue_wg:
        _stage_product(plan, refs, wg, rows, pn, wcols, slot, eval_pipeline)
        return
    ocols = _wg_cols(plan, wg, pn)
    oslot = _out_slot(plan, wg, slot)
    if plan.residual:
        if plan.store_wg:  # the store warpgroup has read this slot's last tile
            plgpu.barrier_wait(refs.empty.at[oslot])
        else:
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        plgpu.copy_gmem_to_smem(refs.residual.at[pl.ds(rows, plan.wg_shape[0]), ocols], refs.o_smem.at[oslot],
                                refs.r_bar.at[wg])
    vec = None
    if plan.prefetch is not None:
        vec = functools.partial(_epilogue_vectors, plan, refs, rows, pn, wcols)
        vec = vec() if plan.prefetch == "before" else vec
    parts, vec = _accumulate(plan, refs, wg, rows, pn, wcols, eval_pipeline, vec)
    if not plan.codes_wg:
        _finish(plan, refs, wg, rows, pn, ocols, parts, vec, oslot)
        return
    width = plan.tile_n // len(parts)
    biased = _biased(plan, refs, pn, parts, vec)
    plgpu.barrier_wait(refs.empty.at[slot])  # the codes warpgroup has read this slot's previous tile
    for j, yj in enumerate(biased):
        refs.stage[slot, wg, :, pl.ds(j * width, width)] = yj.astype(jnp.bfloat16)
    plgpu.barrier_arrive(refs.full.at[slot])


def _stage_product(plan: Plan, refs: _Refs, wg: Any, rows: Any, pn: Any, wcols: Any, slot: Any,
                   eval_pipeline: Any) -> None:
    """``plan.epilogue_wg``, a compute warpgroup's side: the K loop, then (per channel) its product rounded
    to bf16 as the XLA path rounds the fp8 product, or (group scales) the float32 sum of the scaled group
    products, into the stage once the epilogue warpgroup has handed the slot back; then on to the next
    tile's K loop."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    if plan.groups > 1:
        parts, _ = _accumulate(plan, refs, wg, rows, pn, wcols, eval_pipeline)
        width = plan.tile_n // len(parts)
        plgpu.barrier_wait(refs.empty.at[slot])
        for j, part in enumerate(parts):
            refs.stage[slot, wg, :, pl.ds(j * width, width)] = part
        plgpu.barrier_arrive(refs.full.at[slot])
        return

    @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC(plan.shape, plan.acc_dtype))
    def p(acc_ref: Any) -> jax.Array:
        eval_pipeline(acc_ref)
        return acc_ref[...]

    plgpu.barrier_wait(refs.empty.at[slot])
    refs.stage[slot, wg] = p.astype(jnp.bfloat16)
    plgpu.barrier_arrive(refs.full.at[slot])


def _out_slot(plan: Plan, wg: Any, parity: Any) -> Any:
    """A compute warpgroup's output slot in ``o_smem`` for a tile of ``parity`` (its index in the CTA's
    tiles, mod 2): one per warpgroup, or two alternating (``plan.out_slots``)."""
    return wg + 2 * (parity % 2) if plan.out_slots > 1 else wg


def _swizzled(dtype: Any) -> tuple:
    """SMEM transforms for a tile that warpgroups store / load in the wgmma layout without bank conflicts
    (rows of 128 bytes, swizzled): unswizzled, a warp's 8 rows 128 / 256 bytes apart hit the same banks."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    return plgpu.TilingTransform((8, 128 // jnp.dtype(dtype).itemsize)), plgpu.SwizzleTransform(128)


def _output_slots(plan: Plan) -> Any:
    """The output staging slots: one per compute warpgroup (the codes warpgroup's swizzled, per 64-row
    half); the per-channel epilogue warpgroup stores from its stage (none), the group one through one
    swizzled row block (its float32 stage cannot take the bf16 output in place)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    if plan.epilogue_wg:
        if plan.groups == 1:
            return None
        return plgpu.SMEM((1, EPILOGUE_ROWS, plan.tile_n), plan.out_dtype, transforms=_swizzled(plan.out_dtype))
    return plgpu.SMEM((2 * plan.out_slots, *plan.wg_shape), plan.out_dtype,
                      transforms=_swizzled(plan.out_dtype) if plan.codes_wg else ())


def kernel_body(plan: Plan, a_gmem: Any, w_gmem: Any, sa_gmem: Any, sw_gmem: Any, b_gmem: Any, *rest: Any) -> None:
    """The persistent kernel: each CTA (one per SM) loops over its output tiles; with ``plan.codes_wg``
    (``epilogue_wg``, ``store_wg``) a fourth warpgroup runs ``scaled_gemm_fourth_wg``'s codes (epilogue,
    store) warpgroup beside them."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    r_gmem, g_gmem = rest[:2] if plan.residual else (None, None)
    o_gmem, s_gmem = (rest[-2], rest[-1]) if plan.gelu_codes is not None else (rest[-1], None)
    if plan.out_blocks > 1:
        o_gmem = tuple(rest[-plan.out_blocks:])

    def ignore(*_: Any, **__: Any) -> None:
        return None

    # the fourth warpgroup's hand-over barriers (full / empty): per stage slot, both compute warpgroups
    # filling it; or (store_wg) per output slot, its one compute warpgroup
    slots, full_arrivals = ((plan.stage_slots, 2) if plan.fourth_wg else (2 * plan.out_slots, 1) if plan.store_wg
                            else (None, None))
    allocations = _pipeline(plan, ignore, ignore).get_allocations(
        *_pipeline_operands(plan, a_gmem, w_gmem, sa_gmem, sw_gmem, 0, 0))

    @functools.partial(pl.run_scoped, allocs=allocations,
                       o_smem=_output_slots(plan),
                       s_smem=None if plan.gelu_codes is None else plgpu.SMEM((2 * plan.out_slots, plan.tile_m),
                                                                                jnp.float32),
                       r_bar=None if not plan.residual or plan.epilogue_wg else plgpu.Barrier(num_barriers=2),
                       stage=plgpu.SMEM((plan.stage_slots, 2, plan.tile_m, plan.tile_n), plan.stage_dtype,
                                        transforms=_swizzled(plan.stage_dtype)) if plan.fourth_wg else None,
                       full=None if slots is None else plgpu.Barrier(num_arrivals=full_arrivals, num_barriers=slots),
                       empty=None if slots is None else plgpu.Barrier(num_arrivals=1, num_barriers=slots),
                       collective_axes="wg")
    def scope(allocs: Any, o_smem: Any, s_smem: Any, r_bar: Any, stage: Any, full: Any, empty: Any) -> None:
        refs = _Refs(sa_gmem, sw_gmem, b_gmem, r_gmem, g_gmem, o_gmem, s_gmem, o_smem, s_smem, r_bar, stage,
                     full, empty)
        tiles = functools.partial(_tiles, plan, refs, lax.axis_index("wg"), a_gmem, w_gmem, sa_gmem, sw_gmem, allocs)
        if plan.fourth_wg or plan.store_wg:
            from qdit_jax.quant.kernels import scaled_gemm_fourth_wg as wg4

            fourth = (wg4.codes_warpgroup if plan.codes_wg else wg4.store_warpgroup if plan.store_wg
                      else wg4.epilogue_warpgroup)
            pl.when(lax.axis_index("wg") == 3)(functools.partial(fourth, plan, refs))
            pl.when(lax.axis_index("wg") < 3)(tiles)
        else:
            tiles()

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def tile_index(plan: Plan, info: Any) -> tuple[Any, Any]:
    """(pm, pn), the output tile of a step of the persistent tile loop (``info``: ``plgpu.nd_loop``'s):
    row-major over the tiles, or with ``plan.cta_pairs`` over pairs of vertically adjacent tiles, the
    cluster's two CTAs taking one each (same columns: the weight tile they share)."""
    (lin,) = info.index
    if not plan.cta_pairs:
        return lin // plan.n_tiles, lin % plan.n_tiles
    return 2 * (lin // plan.n_tiles) + lax.axis_index(PAIR_AXIS), lin % plan.n_tiles


def _tiles(plan: Plan, refs: _Refs, wg: Any, a_gmem: Any, w_gmem: Any, sa_gmem: Any, sw_gmem: Any,
           allocs: Any) -> None:
    """The compute and memory warpgroups' loop over this CTA's output tiles, one pipeline each."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    @plgpu.nd_loop((plan.loop_tiles,), collective_axes="sm")
    def tile(info: Any) -> None:
        pm, pn = tile_index(plan, info)
        rows = _wg_row0(plan, wg, pm)
        wcols = pl.ds(plan.n_off + pn * plan.tile_n, plan.tile_n)
        body = functools.partial(_step_split_pairs if plan.group_pairs else _STEP_BODIES[plan.group_mode], plan, wg)
        epilogue = functools.partial(_tile_epilogue, plan, refs, wg, rows, pn, wcols,
                                     info.local_index % plan.stage_slots)
        state = _chain_state(info) if plan.chained else None
        _pipeline(plan, body, epilogue, state)(*_pipeline_operands(plan, a_gmem, w_gmem, sa_gmem, sw_gmem, pm, pn),
                                               allocations=allocs)


def gelu_group_codes(parts: list[jax.Array], spec: Any, mode: str = "dtype") -> tuple[jax.Array, list[jax.Array]]:
    """Inside the kernel: the tanh GELU of float32 column parts of a tile holding the layer's output
    (``gelu_h``; the tanh is whatever the kernel's ``approx_math`` makes of ``jnp.tanh``: tanh.approx.f32 or
    libdevice's tanhf), and their symmetric codes with one scale per row (the tile is one group wide):
    (scales (rows,), codes part by part, as ``group_codes`` gives them). The codes step of
    ``row_quant.scale_and_codes``, written for Mosaic: a row vector broadcast with ``broadcast_in_dim``
    (``s[:, None]`` does not lower there) and int8 codes by ``row_quant.int8_codes``."""
    from qdit_jax.quant.kernels.row_quant import row_amax, row_scale

    hs = [gelu_h(y, mode) for y in parts]
    s = row_scale(row_amax(hs), spec)
    return s, [group_codes(h, s, spec) for h in hs]


def gelu_h(y: jax.Array, mode: str = "dtype") -> jax.Array:
    """The tanh GELU of a float32 tile (or part) of the layer's output, in float32. ``mode`` 'dtype': rounded as
    the model's bf16 GELU (input, every step and the result: ``gelu_quant._gelu``'s 'dtype' evaluation, which
    XLA's bf16 GELU matches on the GPU); 'float32': from the float32 sums, no rounding at all (fewer
    instructions: no bf16 packing and unpacking; the codes then differ from the bf16 model's where a bf16
    rounding moves one, and sit closer to exact arithmetic's)."""
    from qdit_jax.quant.kernels.gelu_quant import _gelu

    if mode == "float32":  # 0.5 y (1 + tanh(y (c1 + c1 c2 y^2))): three FP32 operations, the tanh, two more
        half = 0.5 * y
        return half + half * jnp.tanh(y * (_GELU_C1 + _GELU_C12 * (y * y)))
    bf16 = jnp.bfloat16
    return _gelu(y.astype(bf16).astype(jnp.float32), bf16, "dtype", fast=False).astype(bf16).astype(jnp.float32)


def group_codes(h: jax.Array, s: jax.Array, spec: Any) -> jax.Array:
    """Symmetric codes of a tile (or part) ``h`` with one scale per row ``s``: int8 (``row_quant.int8_codes``:
    the rounding as one float add) or, for fp8, float32 values the store converts. No clip to the
    code range (row_quant's codes clip): s is the rows' abs-max over the largest code (127 / 448, rounded
    to nearest), so |h / s| <= qmax (1 + 2^-22) (the kernel's division, PTX div.full under its approximate
    math, adds at most 2 ulp), which rounds to qmax at most (int8: never -128; fp8: the store's float32 ->
    e4m3 conversion is PTX's cvt.rn.satfinite, the only one PTX has, saturating at 448 as the clip would);
    the two FMNMX per element cost 4-5% of fc1 with this epilogue on the H100 (RESULTS.md, fifteenth
    session)."""
    if spec.format == "int":
        from qdit_jax.quant.kernels.row_quant import int8_codes

        return int8_codes(h / lax.broadcast_in_dim(s, h.shape, [0]))
    return h / lax.broadcast_in_dim(s, h.shape, [0])
