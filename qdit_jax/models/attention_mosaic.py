"""Attention at DiT's shapes on Hopper: a persistent Pallas Mosaic GPU kernel for head sizes 64 and 72
(DiT-XL/2's), and its guard.

Why: for XL/2's head of 72 cuDNN runs its head-128 kernel (the head padded to 128) and XLA zeroes the
output before every call: 373-399 us a layer at batch 256 on an H100 (docs/RESULTS.md). This kernel
does the head as 64 + 16 columns and issues no memset.

Layout: Mosaic's TMA tiles the global array like the swizzled shared-memory tile, so a box must start
on a tile boundary of the (B, T, N * D) array. Head 64 starts every head on a 64-column boundary
(128-byte swizzle). Head 72 does not; two heads do (144 = 9 x 16), so the kernel takes heads in pairs,
as three 16-aligned parts with 32-byte swizzle: columns 0-63 (head A), 64-79 (A's last 8 and B's first
8) and 80-143 (B's last 64). Each head's scores sum over its parts with the other head's columns of the
shared part zeroed on the query side (in registers), so every product counts once; the shared part of
the output takes its columns from each head's P V by a select.

Schedule: one CTA per SM loops over items (sample, head group, 128 query rows). A memory warpgroup
loads an item's queries (two slots) and streams its K and V in stages of 64 keys (three slots), so the
next item's loads run under this one's math; two compute warpgroups take 64 query rows each: scores by
wgmma, online softmax in base 2, P (rounded to the input dtype, as flash attention does) times V
accumulated in float32, rows divided by their sum, staged in the warpgroup's own (used-up) query rows
and stored by TMA. ``run_kernel`` is that body with the epilogue as an argument (and items of several head
groups in a loop), which ``quant.kernels.attention_codes`` reuses to write the next layer's codes instead.
"""
from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from qdit_jax.perf.device import is_hopper

DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
BLOCK_Q = 64  # query rows per compute warpgroup (an item: two warpgroups' rows)
BLOCK_KV = 64  # keys per K / V stage (128: an 808-byte register spill with head pairs, 2.05x slower on the H100)
KV_STAGES = 3  # K / V slots (4 measured 1.8x slower with head pairs; docs/RESULTS.md)
COMPUTE_REGISTERS, MEMORY_REGISTERS = 232, 40  # setmaxnreg per thread: 2 x 232 + 40 = 504 of 512
# "auto" attention runs this kernel up to this many tokens: measured faster than cuDNN at 256 (DiT at 256
# px); longer sequences (512 px: 1,024 tokens) are computed correctly but were not timed, so "auto" keeps
# cuDNN there and ``DiTConfig.attention="mosaic"`` asks for this kernel
AUTO_MAX_TOKENS = 256


def chosen_by(implementation: str, tokens: int) -> bool:
    """Whether a model asking for ``implementation`` ('auto', 'mosaic', ...) wants this kernel at ``tokens``
    tokens where it applies (``mosaic_attention_applies`` says where)."""
    return implementation == "mosaic" or (implementation == "auto" and tokens <= AUTO_MAX_TOKENS)


class _Layout(NamedTuple):
    """How an item's head group is cut into swizzled parts: the group's columns, the parts (first
    column, width), each head's columns of each part it uses ((part, lo, hi): columns lo..hi-1 of the
    part are the head's), and the swizzle (bytes) all parts share."""

    group: int
    parts: tuple[tuple[int, int], ...]
    heads: tuple[tuple[tuple[int, int, int], ...], ...]
    swizzle: int


LAYOUTS = {
    64: _Layout(64, ((0, 64),), (((0, 0, 64),),), 128),
    72: _Layout(144, ((0, 64), (64, 16), (80, 64)), (((0, 0, 64), (1, 0, 8)), ((1, 8, 16), (2, 0, 64))), 32),
}


def mosaic_attention_applies(shape: tuple[int, ...], dtype: Any, platform: str | None = None) -> tuple[bool, str]:
    """Whether the kernel computes attention on (B, T, N, D) q / k / v of ``dtype``; if not, why."""
    platform = platform or jax.default_backend()
    if platform != "gpu":
        return False, f"platform is {platform}, the kernel is GPU-only"
    if platform == jax.default_backend() and not is_hopper():
        return False, "the kernel uses Hopper's wgmma and TMA (compute capability 9.x)"
    if len(shape) != 4:
        return False, f"q / k / v must be (B, T, N, D), got shape {tuple(shape)}"
    _, t, n, d = shape
    if jnp.dtype(dtype) not in DTYPES:
        return False, f"dtype {jnp.dtype(dtype)}: the kernel takes bfloat16 or float16"
    if d not in LAYOUTS:
        return False, f"head size {d}: the kernel takes {sorted(LAYOUTS)}"
    per_group = LAYOUTS[d].group // d
    if n % per_group:
        return False, f"{n} heads of {d}: the kernel takes them in groups of {per_group}"
    if t % (2 * BLOCK_Q) or t % BLOCK_KV:
        return False, f"{t} tokens is not a multiple of {2 * BLOCK_Q}"
    try:
        from jax.experimental.pallas import mosaic_gpu as plgpu
    except ImportError as e:  # pragma: no cover - depends on the JAX build
        return False, f"Pallas Mosaic GPU is not available ({e})"
    if not all(hasattr(plgpu, f) for f in ("kernel", "nd_loop", "set_max_registers", "wgmma")):
        return False, "this JAX's Pallas Mosaic GPU lacks kernel / nd_loop / set_max_registers / wgmma"
    return True, "ok"


class Scratch(NamedTuple):
    """The kernel's shared memory and barriers: per layout part, an item's queries (2 slots) and its K / V
    stages; ``extra``: the allocations a caller's epilogue asked for."""

    qb: tuple
    kb: tuple
    vb: tuple
    kv_full: Any
    kv_empty: Any
    q_full: Any
    q_empty: Any
    extra: tuple


class Item(NamedTuple):
    """What a compute warpgroup's epilogue knows of the head group it finishes: the sample, the head group
    (``g``; ``u``: its place among the item's head groups, traced), the query row block, the warpgroup,
    its 64 rows of the block and the query slot (``qs``; the epilogue releases it)."""

    bi: Any
    g: Any
    u: Any
    qi: Any
    wg: Any
    rows: Any
    qs: Any


def cols(lay: _Layout, g: Any, p: int) -> Any:
    """Part ``p`` of head group ``g``: its columns of the (B, T, N * D) arrays."""
    from jax.experimental import pallas as pl

    off, width = lay.parts[p]
    return pl.ds(g * lay.group + off, width)


def part_smem(lay: _Layout, shape: tuple[int, ...], dtype: Any) -> Any:
    """A shared-memory allocation of one layout part (tiled and swizzled as its TMA boxes need)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    w = lay.swizzle // 2
    return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, w)), plgpu.SwizzleTransform(lay.swizzle)))


def _per_item(per_item: int, body: Any, carry: Any = None) -> Any:
    """``body(u, carry) -> carry`` for each of an item's head groups: once (u = 0), or a loop (one copy of
    the code whatever the count: unrolled head groups measured 1.6-2.7x slower, the instruction cache)."""
    if per_item == 1:
        return body(0, carry)
    return lax.fori_loop(0, per_item, body, carry)


def run_kernel(q_ref: Any, k_ref: Any, v_ref: Any, *, b: int, t: int, n: int, d: int, per_item: int,
               epilogue: Any, extra: tuple = (), kv_loop: bool = False, kv_stages: int = KV_STAGES,
               init: Any = None, finish: Any = None) -> None:
    """The persistent attention kernel's body. Items are (sample, ``per_item`` consecutive head groups, 128
    query rows); the memory warpgroup streams each head group's queries and K / V, the compute warpgroups
    attend and call ``epilogue(scratch, item, outs, carry) -> carry`` with each head group's normalized
    float32 output parts (in the layout's parts, 64 rows each), the carry starting as ``init()`` each item
    (None without), then ``finish(scratch, item, carry)`` with the item's last head group, if given.
    ``extra``: shared-memory allocations for the epilogue (``scratch.extra``). ``kv_loop``: the K / V steps
    as a loop, not unrolled; ``kv_stages``: K / V slots."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    lay = LAYOUTS[d]
    dtype = q_ref.dtype
    groups, q_blocks, kv_steps = n * d // lay.group, t // (2 * BLOCK_Q), t // BLOCK_KV
    chunks = groups // per_item
    items = b * chunks * q_blocks
    qk_scale = math.log2(math.e) / math.sqrt(d)  # exp(x / sqrt(d)) = exp2(x * qk_scale)
    wgmma_l = plgpu.Layout.WGMMA
    row_l = wgmma_l.reduce(1)

    def item_of(i: Any) -> tuple[Any, Any, Any]:
        return i // (chunks * q_blocks), (i // q_blocks) % chunks, i % q_blocks

    def group_step(info: Any, gc: Any, u: Any) -> tuple[Any, Any]:
        """Head group ``u`` of chunk ``gc``, and its step in this CTA's sequence (the slots' parity)."""
        if per_item == 1:  # (no arithmetic traced: the bf16 kernel's program as before)
            return gc, info.local_index
        return gc * per_item + u, info.local_index * per_item + u

    def each_group(on_group: Any, start: Any = None, end: Any = None) -> None:
        """This CTA's items, each head group in turn: ``on_group(bi, g, u, qi, step, carry) -> carry`` (the
        carry starting as ``start()`` each item, None without), then ``end(bi, gc, qi, carry)``. The memory and
        the compute warpgroups both walk the items through this, so they agree on every slot."""
        @plgpu.nd_loop((items,), collective_axes="sm")
        def _item(info: Any) -> None:
            bi, gc, qi = item_of(info.index[0])

            def group(u: Any, carry: Any) -> Any:
                g, step = group_step(info, gc, u)
                return on_group(bi, g, u, qi, step, carry)

            carry = _per_item(per_item, group, None if start is None else start())
            if end is not None:
                end(bi, gc, qi, carry)

    def bcast(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        return lax.broadcast_in_dim(x, shape, [0])

    def scoped(sc: Scratch) -> None:
        qb, kb, vb = sc.qb, sc.kb, sc.vb
        kv_full, kv_empty, q_full, q_empty = sc.kv_full, sc.kv_empty, sc.q_full, sc.q_empty
        wg = lax.axis_index("wg")

        @pl.when(wg == 2)
        def _memory() -> None:
            plgpu.set_max_registers(MEMORY_REGISTERS, action="decrease")

            def load(bi: Any, g: Any, u: Any, qi: Any, step: Any, _: Any) -> None:
                qs = step % 2
                plgpu.barrier_wait(q_empty.at[qs])
                for p in range(len(lay.parts)):
                    plgpu.copy_gmem_to_smem(q_ref.at[bi, pl.ds(qi * 2 * BLOCK_Q, 2 * BLOCK_Q), cols(lay, g, p)],
                                            qb[p].at[qs], q_full.at[qs])
                for j in range(kv_steps):
                    st = (step * kv_steps + j) % kv_stages
                    plgpu.barrier_wait(kv_empty.at[st])
                    for p in range(len(lay.parts)):
                        for src, dst in ((k_ref, kb), (v_ref, vb)):
                            plgpu.copy_gmem_to_smem(src.at[bi, pl.ds(j * BLOCK_KV, BLOCK_KV), cols(lay, g, p)],
                                                    dst[p].at[st], kv_full.at[st])

            each_group(load)

        @pl.when(wg < 2)
        def _compute() -> None:
            plgpu.set_max_registers(COMPUTE_REGISTERS, action="increase")
            for st in range(kv_stages):  # every slot starts empty
                plgpu.barrier_arrive(kv_empty.at[st])
            for qs in range(2):
                plgpu.barrier_arrive(q_empty.at[qs])
            rows = pl.ds(wg * BLOCK_Q, BLOCK_Q)

            def select(x: jax.Array, lo: int, hi: int, other: jax.Array | None = None) -> jax.Array:
                """x in columns lo..hi-1, ``other`` (zeros) elsewhere."""
                col = plgpu.broadcasted_iota(jnp.int32, x.shape, 1, layout=wgmma_l)
                return jnp.where((col >= lo) & (col < hi), x, jnp.zeros_like(x) if other is None else other)

            def attend(qs: Any, step: Any) -> list[jax.Array]:
                plgpu.barrier_wait(q_full.at[qs])
                # each head's query operand per part: the shared-memory rows, or (a part the head shares)
                # its own columns in registers with the other head's zeroed
                q_ops = [[qb[p].at[qs, rows] if (lo, hi) == (0, lay.parts[p][1]) else
                          select(plgpu.load(qb[p].at[qs, rows], (), layout=wgmma_l), lo, hi)
                          for p, lo, hi in head] for head in lay.heads]
                state = [(plgpu.layout_cast(jnp.full((BLOCK_Q,), -jnp.inf, jnp.float32), row_l),
                          plgpu.layout_cast(jnp.full((BLOCK_Q,), 0.0, jnp.float32), row_l),
                          [plgpu.layout_cast(jnp.zeros((BLOCK_Q, lay.parts[p][1]), jnp.float32), wgmma_l)
                           for p, _, _ in head]) for head in lay.heads]
                def kv_step(j: Any, state: list) -> list:
                    st = (step * kv_steps + j) % kv_stages
                    plgpu.barrier_wait(kv_full.at[st])
                    state = list(state)
                    for h, head in enumerate(lay.heads):
                        m_i, l_i, accs = state[h]

                        def scores(acc_ref: Any, h: int = h, head: tuple = head) -> jax.Array:
                            for (p, _, _), a in zip(head, q_ops[h]):
                                plgpu.wgmma(acc_ref, a, plgpu.transpose_ref(kb[p].at[st], (1, 0)))
                            return acc_ref[...]

                        s = pl.run_scoped(scores, plgpu.ACC((BLOCK_Q, BLOCK_KV), jnp.float32)) * qk_scale
                        m_new = jnp.maximum(m_i, s.max(axis=1))
                        alpha = jnp.exp2(m_i - m_new)
                        pr = jnp.exp2(s - bcast(m_new, s.shape))
                        l_i = l_i * alpha + pr.sum(axis=1)
                        p16 = pr.astype(dtype)
                        new_accs = []
                        for (p, _, _), acc in zip(head, accs):
                            def pv(acc_ref: Any, p: int = p) -> None:
                                plgpu.wgmma(acc_ref, p16, vb[p].at[st])

                            new_accs.append(pl.run_state(pv)(plgpu.ACC.init(acc * bcast(alpha, acc.shape))))
                        state[h] = (m_new, l_i, new_accs)
                    plgpu.barrier_arrive(kv_empty.at[st])
                    return state

                if kv_loop:  # one copy of the step's code (an item of many head groups unrolls them)
                    state = lax.fori_loop(0, kv_steps, kv_step, state)
                else:
                    for j in range(kv_steps):
                        state = kv_step(j, state)
                outs: list[Any] = [None] * len(lay.parts)
                for (_, l_i, accs), head in zip(state, lay.heads):
                    inv = 1.0 / l_i
                    for (p, lo, hi), acc in zip(head, accs):
                        y = acc * bcast(inv, acc.shape)
                        outs[p] = y if outs[p] is None else select(y, lo, hi, outs[p])
                return outs

            def group(bi: Any, g: Any, u: Any, qi: Any, step: Any, carry: Any) -> Any:
                qs = step % 2
                outs = attend(qs, step)
                return epilogue(sc, Item(bi, g, u, qi, wg, rows, qs), outs, carry)

            def last_group(bi: Any, gc: Any, qi: Any, carry: Any) -> None:
                last = per_item - 1
                finish(sc, Item(bi, gc * per_item + last, last, qi, wg, rows, None), carry)

            each_group(group, init, None if finish is None else last_group)

            plgpu.wait_smem_to_gmem(0)

    def smem(shape: tuple[int, ...]) -> Any:
        return part_smem(lay, shape, dtype)

    np_, ne = len(lay.parts), len(extra)
    pl.run_scoped(
        lambda *a: scoped(Scratch(a[:np_], a[np_:2 * np_], a[2 * np_:3 * np_], *a[3 * np_:3 * np_ + 4],
                                  a[3 * np_ + 4:3 * np_ + 4 + ne])),
        *[smem((2, 2 * BLOCK_Q, w)) for _, w in lay.parts],  # queries (then outputs) of an item
        *[smem((kv_stages, BLOCK_KV, w)) for _, w in lay.parts],  # K
        *[smem((kv_stages, BLOCK_KV, w)) for _, w in lay.parts],  # V
        plgpu.Barrier(num_arrivals=2 * np_, num_barriers=kv_stages),  # kv_full: a stage's K and V landed
        plgpu.Barrier(num_arrivals=2, num_barriers=kv_stages),  # kv_empty: both compute warpgroups are done
        plgpu.Barrier(num_arrivals=np_, num_barriers=2),  # q_full
        plgpu.Barrier(num_arrivals=2, num_barriers=2),  # q_empty: both have stored their outputs from it
        *extra,
        collective_axes="wg",
    )


def _kernel(q_ref: Any, k_ref: Any, v_ref: Any, o_ref: Any, *, b: int, t: int, n: int, d: int, per_item: int = 1,
            kv_loop: bool = False, kv_stages: int = KV_STAGES) -> None:
    """The attention output in the input dtype: each head group's output staged in the warpgroup's own
    (used-up) query rows and stored by TMA. ``per_item``, ``kv_loop``, ``kv_stages``: run_kernel's (the
    production kernel takes the defaults; ``scripts/bench_block_ops.py --sections attnforms`` varies them)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    lay = LAYOUTS[d]

    def store(sc: Scratch, it: Item, outs: list[jax.Array], carry: Any) -> Any:
        for p, y in enumerate(outs):  # staged in this warpgroup's query rows, which are used up
            sc.qb[p][it.qs, it.rows] = y.astype(q_ref.dtype)
        plgpu.commit_smem()
        for p in range(len(lay.parts)):
            plgpu.copy_smem_to_gmem(sc.qb[p].at[it.qs, it.rows],
                                    o_ref.at[it.bi, pl.ds(it.qi * 2 * BLOCK_Q + it.wg * BLOCK_Q, BLOCK_Q),
                                             cols(lay, it.g, p)])
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the stores have read the slot
        plgpu.barrier_arrive(sc.q_empty.at[it.qs])
        return carry

    run_kernel(q_ref, k_ref, v_ref, b=b, t=t, n=n, d=d, per_item=per_item, epilogue=store, kv_loop=kv_loop,
               kv_stages=kv_stages)


def launch(body: Any, out_type: Any) -> Any:
    """``body`` (a run_kernel user) as a persistent Mosaic GPU call: one CTA per SM, three warpgroups
    (memory and two compute), approximate math (exp2, the division)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    return plgpu.kernel(body, out_type=out_type, grid=(jax.devices()[0].core_count,), grid_names=("sm",),
                        num_threads=3, thread_name="wg", compiler_params=plgpu.CompilerParams(approx_math=True))


def check_qkv(q: jax.Array, k: jax.Array, v: jax.Array) -> None:
    """ValueError unless q, k and v share one shape and dtype."""
    if not (q.shape == k.shape == v.shape and q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share shape and dtype, got {q.shape} {q.dtype}, {k.shape} {k.dtype}, "
                         f"{v.shape} {v.dtype}")


@jax.jit
def attention_mosaic(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """softmax(q k^T / sqrt(D)) v for (B, T, N, D) q, k, v of one half-precision dtype (the layout of
    ``jax.nn.dot_product_attention``). Raises ValueError for shapes the kernel does not take (ask
    ``mosaic_attention_applies`` first). Under ``jax.vmap`` (the granularity search runs the model so)
    the mapped axis is folded into B: one launch, whatever Pallas would make of a persistent kernel's
    batching. Forward only (no derivative rule): this library only runs inference."""
    check_qkv(q, k, v)
    ok, why = mosaic_attention_applies(q.shape, q.dtype, platform="gpu")
    if not ok:
        raise ValueError(why)
    return _attention(q, k, v)


@jax.custom_batching.custom_vmap
def _attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    b, t, n, d = q.shape
    call = launch(functools.partial(_kernel, b=b, t=t, n=n, d=d), jax.ShapeDtypeStruct((b, t, n * d), q.dtype))
    flat = (b, t, n * d)  # a free reshape: boxes are cut along the heads' columns
    with jax.named_scope("attention_mosaic"):  # profiles file the custom call under attention (perf.trace)
        return call(q.reshape(flat), k.reshape(flat), v.reshape(flat)).reshape(q.shape)


@_attention.def_vmap
def _attention_vmap(axis_size: int, in_batched: list[bool], q: jax.Array, k: jax.Array,
                    v: jax.Array) -> tuple[jax.Array, bool]:
    """The mapped axis (leading) folded into the samples; unmapped operands broadcast along it."""
    q, k, v = (x if batched else jnp.broadcast_to(x, (axis_size, *x.shape)) for x, batched in zip((q, k, v), in_batched))
    fold = (axis_size * q.shape[1], *q.shape[2:])
    return _attention(q.reshape(fold), k.reshape(fold), v.reshape(fold)).reshape(q.shape), True
