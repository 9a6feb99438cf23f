"""Flash attention for head sizes that are not a power of two (DiT-XL/2's 72): a Pallas Triton
kernel, its guard, and the float32 reference it must equal.

Why: ``jax.nn.dot_product_attention`` has two implementations on a GPU: cuDNN's fused kernel, and
XLA's, which materializes the scores (4.5x slower at XL/2's shape on an H100). Where cuDNN refuses
(an old cuDNN, a build without it), this kernel keeps attention fused: ``DiTConfig.attention="auto"``
falls back to it before XLA's, ``"triton"`` asks for it. On the H100 (docs/RESULTS.md, B 256, T 256,
16 heads of 72) it takes 380 us a call against cuDNN's 390-397 (which is cuDNN's head-128 kernel, 325
us, after a 46 us memset of the output that XLA issues), and the XL/2 forward with it runs at
0.976-0.986x the one with cuDNN's: so cuDNN goes before it. (On Hopper ``models.attention_mosaic``'s
kernel goes before both: 313 us at that shape.)

The head is a power-of-two part plus a 16-wide tail (16: the smallest MMA depth for 16-bit operands);
72 = 64 + 8 runs as a 64-wide part and a tail whose columns past 72 are masked (``Tiles.tail``
'masked'), or one that overlaps the part (columns 56..71, the repeated query columns zeroed: 'overlap').
Either way each column's product counts once, exactly, and no padding is materialized.

One program per (head, ``block_q`` query rows, sample): scores in float32, online softmax in base 2,
P (rounded to the input dtype, as flash attention does) times V accumulated in float32.
"""
from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from qdit_jax.perf.device import compute_capability

DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
TAIL = 16  # the tail part's width: the smallest MMA depth for 16-bit operands
# 'masked': a 16-wide tail starting where the main part ends, its loads and stores masked past D;
# 'overlap': a 16-wide tail ending at D, overlapping the main part (its repeated query columns zeroed),
# every access in bounds. Within 3% of each other on the H100 (docs/RESULTS.md); padding the head to
# one power-of-two block instead, as cuDNN does, was 25-75% slower in this kernel (measured, removed).
TAIL_MODES = ("masked", "overlap")


class Tiles(NamedTuple):
    """Launch shape: query rows and keys per step of one program, Triton warps and pipeline stages."""

    block_q: int = 64
    block_kv: int = 64
    num_warps: int = 4
    num_stages: int = 3
    tail: str = "masked"  # how a head past its power-of-two part is covered (see TAIL_MODES)


def default_tiles(d: int) -> Tiles:
    """The fastest launch shape measured on the H100 (B 256, T 256, 16 heads; docs/RESULTS.md): 64 query
    rows and 64 keys per step, 4 warps, 'masked' tail; 2 pipeline stages with a tail (head 72: 380 vs
    393 us at 3), 3 without (head 64: 254 vs 281 us at 2)."""
    return Tiles(num_stages=3 if main_part(d) == d else 2)


def main_part(d: int) -> int:
    """The head's main part: its largest power-of-two prefix (the tail covers the other columns)."""
    return 1 << (d.bit_length() - 1)


def tail_offset(d: int, mode: str) -> int | None:
    """Where the 16-wide tail starts in a head of ``d`` ('masked': at the main part's end; 'overlap':
    ending at ``d``), or None when the main part is the whole head."""
    main = main_part(d)
    if main == d:
        return None
    return main if mode == "masked" else d - TAIL


def attention_applies(shape: tuple[int, ...], dtype: Any, tiles: Tiles | None = None,
                      platform: str | None = None) -> tuple[bool, str]:
    """Whether the kernel can compute attention on (B, T, N, D) q / k / v of ``dtype`` with ``tiles``
    (None: ``default_tiles``); if not, why."""
    platform = platform or jax.default_backend()
    if platform != "gpu":
        return False, f"platform is {platform}, the kernel is GPU-only"
    if platform == jax.default_backend():  # this process's GPU: an NVIDIA one with bf16 tensor cores
        cc = compute_capability()
        if cc is None or cc[0] < 8:
            shown = getattr(jax.devices()[0], "compute_capability", "") or "unknown"
            return False, f"GPU compute capability {shown}: the kernel needs an NVIDIA GPU of 8.0 or newer"
    if len(shape) != 4:
        return False, f"q / k / v must be (B, T, N, D), got shape {tuple(shape)}"
    _, t, _, d = shape
    if jnp.dtype(dtype) not in DTYPES:
        return False, f"dtype {jnp.dtype(dtype)}: the kernel takes bfloat16 or float16"
    if d < TAIL or d > 256 or d - main_part(d) > TAIL:
        return False, (f"head size {d}: the kernel takes a power of two from 16 to 256 plus at most "
                       f"{TAIL} columns (e.g. 72 = 64 + 8)")
    tiles = default_tiles(d) if tiles is None else tiles
    if tiles.tail not in TAIL_MODES:
        return False, f"tail mode {tiles.tail!r}: one of {TAIL_MODES}"
    if t % tiles.block_q or t % tiles.block_kv:
        return False, f"{t} tokens is not a multiple of {tiles.block_q} query rows and {tiles.block_kv} keys"
    return True, "ok"


def attention_reference(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """softmax(q k^T / sqrt(D)) v per (sample, head) in float32, rounded to q's dtype."""
    d = q.shape[-1]
    s = jnp.einsum("btnd,bsnd->bnts", q.astype(jnp.float32), k.astype(jnp.float32)) / math.sqrt(d)
    p = jax.nn.softmax(s, axis=-1)
    return jnp.einsum("bnts,bsnd->btnd", p, v.astype(jnp.float32)).astype(q.dtype)


def _kernel(q_ref: Any, k_ref: Any, v_ref: Any, o_ref: Any, *, d: int, t: int, tiles: Tiles) -> None:
    """One program: ``block_q`` query rows of one (head, sample) against all ``t`` keys."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plt

    bq, bkv = tiles.block_q, tiles.block_kv
    head, sample = pl.program_id(0), pl.program_id(2)
    rows = pl.ds(pl.program_id(1) * bq, bq)
    dtype = q_ref.dtype
    nt = (((1,), (1,)), ((), ()))  # x @ y.T
    nn = (((1,), (0,)), ((), ()))  # x @ y
    f32 = dict(preferred_element_type=jnp.float32)
    qk_scale = math.log2(math.e) / math.sqrt(d)  # exp(x / sqrt(d)) = exp2(x * qk_scale)
    main, t_off = main_part(d), tail_offset(d, tiles.tail)
    zero = pl.program_id(0) * 0  # a traced 0: Pallas checks static slices against the array's bounds

    def load(ref: Any, r: Any, off: int, width: int, fresh_from: int = 0) -> jax.Array:
        """Head columns off : off + width of rows ``r``; zeros past D and before ``fresh_from``."""
        if off + width <= d and not fresh_from:
            return ref[sample, r, head, pl.ds(off, width)]
        col = lax.broadcasted_iota(jnp.int32, (r.size, width), 1)
        ok = (col + off < d) & (col >= fresh_from)
        return plt.load(ref.at[sample, r, head, pl.ds(zero + off, width)], mask=ok, other=0.0)

    q_main = load(q_ref, rows, 0, main)
    if t_off is not None:  # 'overlap': the tail's columns the main part covers are zeroed on the query side
        q_tail = load(q_ref, rows, t_off, TAIL, fresh_from=main - t_off)

    def step(j: jax.Array, carry: tuple) -> tuple:
        acc, acc_t, m_i, l_i = carry
        keys = pl.ds(j * bkv, bkv)
        s = lax.dot_general(q_main, load(k_ref, keys, 0, main), nt, **f32)
        if t_off is not None:
            s = s + lax.dot_general(q_tail, load(k_ref, keys, t_off, TAIL), nt, **f32)
        s = s * qk_scale
        m_new = jnp.maximum(m_i, jnp.max(s, axis=1))
        alpha = jnp.exp2(m_i - m_new)
        p = jnp.exp2(s - m_new[:, None])
        l_i = l_i * alpha + jnp.sum(p, axis=1)
        p = p.astype(dtype)
        acc = acc * alpha[:, None] + lax.dot_general(p, load(v_ref, keys, 0, main), nn, **f32)
        if t_off is not None:
            acc_t = acc_t * alpha[:, None] + lax.dot_general(p, load(v_ref, keys, t_off, TAIL), nn, **f32)
        return acc, acc_t, m_new, l_i

    init = (jnp.zeros((bq, main), jnp.float32), jnp.zeros((bq, TAIL), jnp.float32),
            jnp.full((bq,), -jnp.inf, jnp.float32), jnp.zeros((bq,), jnp.float32))
    acc, acc_t, _, l_i = lax.fori_loop(0, t // bkv, step, init)
    inv = 1.0 / l_i

    def store(off: int, width: int, y: jax.Array, fresh_from: int = 0) -> None:
        y = (y * inv[:, None]).astype(dtype)
        if off + width <= d and not fresh_from:
            o_ref[sample, rows, head, pl.ds(off, width)] = y
            return
        col = lax.broadcasted_iota(jnp.int32, (bq, width), 1)
        plt.store(o_ref.at[sample, rows, head, pl.ds(zero + off, width)], y, mask=(col + off < d) & (col >= fresh_from))

    store(0, main, acc)
    if t_off is not None:  # only the columns the main part did not write
        store(t_off, TAIL, acc_t, fresh_from=main - t_off)


@functools.partial(jax.jit, static_argnames=("tiles", "interpret"))
def attention_triton(q: jax.Array, k: jax.Array, v: jax.Array, tiles: Tiles | None = None,
                     interpret: bool = False) -> jax.Array:
    """softmax(q k^T / sqrt(D)) v for (B, T, N, D) q, k, v of one half-precision dtype (the layout of
    ``jax.nn.dot_product_attention``), launched with ``tiles`` (None: ``default_tiles``). Raises
    ValueError for shapes the kernel does not take (ask ``attention_applies`` first); ``interpret`` runs
    Pallas' interpreter (any backend; for tests)."""
    from jax.experimental import pallas as pl

    if not (q.shape == k.shape == v.shape and q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share shape and dtype, got {q.shape} {q.dtype}, {k.shape} {k.dtype}, "
                         f"{v.shape} {v.dtype}")
    ok, why = attention_applies(q.shape, q.dtype, tiles, platform="gpu")
    if not ok:
        raise ValueError(why)
    b, t, n, d = q.shape
    tiles = default_tiles(d) if tiles is None else tiles
    kw: dict[str, Any] = {}
    if not interpret:
        from jax.experimental.pallas import triton as plt

        kw["compiler_params"] = plt.CompilerParams(num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    kern = functools.partial(_kernel, d=d, t=t, tiles=tiles)
    with jax.named_scope("attention_triton"):  # profiles file the custom call under attention (perf.trace)
        return pl.pallas_call(kern, out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
                              grid=(n, t // tiles.block_q, b), interpret=interpret, **kw)(q, k, v)
