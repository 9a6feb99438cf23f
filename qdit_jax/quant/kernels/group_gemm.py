"""Group-scaled low-bit GEMM: a Pallas (Triton) GPU kernel, its jnp reference, the guard that picks
it, and the XLA fallback.

    y[m, n] = sum_g  sa[g, m] * sw[g, n] * (sum_{k in g} qa[m, k] * qw[n, k]  -  rs[g, m] * zw[g, n])  + b[n]

``qa`` are int8 activation codes (M, K) with per-token-per-group scales ``sa`` (G, M); ``qw`` are
int8 weight codes (N, K) or 4-bit codes packed two per byte (N, K // 2) in the *blocked* layout of
:func:`pack_blocked`, with per-channel-per-group scales ``sw`` (G, N). Asymmetric weights carry a
(shifted) zero point ``zw`` (G, N); then ``rs`` (G, M) are the per-group row sums of ``qa``.
Groups are ``K // G`` consecutive input channels (G = 1: per-channel weights x per-token
activations). Scales are stored group-major so that the kernel loads one contiguous row per group.

The kernel walks K in tiles of ``bk`` (<= group size), accumulates each group exactly in int32 and
folds it into a float32 accumulator with the scale product: the scales are applied inside the
accumulation, as Q-DiT's granularity needs, and the bf16 output is written once (no int32 round
trip through memory). 4-bit weights are unpacked in registers: byte ``j`` of each 128-wide block
holds codes ``j`` (low nibble) and ``j + 64`` (high nibble), so one packed tile gives two int8
tiles without an interleave. ``fuse_quant=True`` quantizes bf16 activations inside the kernel
(possible when the K tile is one whole group): no separate quantize pass, but the tile is
re-quantized for every N tile.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from qdit_jax.errors import QditError
from qdit_jax.quant.packing import pack_int4, unpack_int4

PACK_BLOCK = 128  # 4-bit packing block along K (the kernel's K tile when weights are packed)


# ----------------------------------------------------------------------------- 4-bit layout


def pack_block_size(k: int) -> int:
    """Packing block along K: 128 when it divides K, else the whole row (K must be even)."""
    if k % 2:
        raise QditError(f"4-bit packing needs an even input width, got {k}; store int8 codes instead")
    return PACK_BLOCK if k % PACK_BLOCK == 0 else k


def pack_blocked(codes: jax.Array) -> jax.Array:
    """Signed 4-bit codes (N, K) in [-8, 7] -> uint8 (N, K // 2), blocked layout (see module doc)."""
    n, k = codes.shape
    pb = pack_block_size(k)
    perm = codes.reshape(n, k // pb, 2, pb // 2).transpose(0, 1, 3, 2).reshape(n, k)
    return pack_int4(perm)


def unpack_blocked(packed: jax.Array) -> jax.Array:
    """Inverse of :func:`pack_blocked`: uint8 (N, K // 2) -> int8 codes (N, K)."""
    n, k = packed.shape[0], packed.shape[1] * 2
    pb = pack_block_size(k)
    pairs = unpack_int4(packed, signed=True)  # (N, K): [lo_0, hi_0, lo_1, hi_1, ...] per block
    return pairs.reshape(n, k // pb, pb // 2, 2).transpose(0, 1, 3, 2).reshape(n, k)


def weight_codes_int8(qw: jax.Array) -> jax.Array:
    """int8 weight codes (N, K) from int8 or packed uint8 storage."""
    return unpack_blocked(qw) if qw.dtype == jnp.uint8 else qw


# ----------------------------------------------------------------------------- reference and fallback


def group_gemm_reference(qa: jax.Array, sa: jax.Array, qw: jax.Array, sw: jax.Array, bias: jax.Array | None = None,
                         zw: jax.Array | None = None, out_dtype: Any = jnp.float32) -> jax.Array:
    """Dequantize both operands by group in float32 and multiply (exact up to float32 rounding)."""
    w = weight_codes_int8(qw).astype(jnp.float32)
    g, m = sa.shape
    n, k = w.shape
    gs = k // g
    a = (qa.astype(jnp.float32).reshape(m, g, gs) * sa.T[:, :, None]).reshape(m, k)
    wz = w.reshape(n, g, gs) - (0.0 if zw is None else zw.T[:, :, None])
    wd = (wz * sw.T[:, :, None]).reshape(n, k)
    y = jnp.dot(a, wd.T, precision=lax.Precision.HIGHEST)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(out_dtype)


def low_bit_product(qa: jax.Array, qw: jax.Array, g: int, product_dtype: Any = None) -> jax.Array:
    """The raw (G, M, N) products of ``g`` K-groups of codes ``qa`` (M, K) and weight codes ``qw``
    (N, K, or packed 4-bit): int32 for integer codes, ``product_dtype`` (default float32) for fp8."""
    w = weight_codes_int8(qw)
    if not jnp.issubdtype(qa.dtype, jnp.integer) and jnp.issubdtype(w.dtype, jnp.integer):
        if qw.dtype != jnp.uint8:  # int8 codes may be 8-bit: fp8 would round them
            raise ValueError(f"{qw.dtype} weight codes with {qa.dtype} activation codes: only packed 4-bit codes "
                             "are exact in fp8; give fp8 weight codes (RealModel.variables converts <= 4-bit ones)")
        w = w.astype(qa.dtype)  # packed 4-bit codes under fp8 activations: exact in fp8
    m, k = qa.shape
    n = w.shape[0]
    acc_t = jnp.int32 if jnp.issubdtype(qa.dtype, jnp.integer) else (product_dtype or jnp.float32)
    if g == 1:
        return lax.dot_general(qa, w, (((1,), (1,)), ((), ())), preferred_element_type=acc_t)[None]
    a3, w3 = qa.reshape(m, g, k // g), w.reshape(n, g, k // g)
    return lax.dot_general(a3, w3, (((2,), (2,)), ((1,), (1,))), preferred_element_type=acc_t)


def group_gemm_xla(qa: jax.Array, sa: jax.Array, qw: jax.Array, sw: jax.Array, bias: jax.Array | None = None,
                   zw: jax.Array | None = None, out_dtype: Any = jnp.float32, split_epilogue: bool = False,
                   product_dtype: Any = None) -> jax.Array:
    """XLA path: one batched low-bit ``dot_general`` over groups (int32 / float32 accumulation),
    the scale products applied per group, then summed over groups. ``split_epilogue``: an
    optimization barrier on the raw product keeps XLA from fusing the scale epilogue into the GEMM
    (XLA then calls cuBLAS' int8 kernel and runs the epilogue as its own pass). ``product_dtype``:
    the raw product's dtype for float (fp8) operands (default float32); integer products are int32."""
    g, m = sa.shape
    acc = low_bit_product(qa, qw, g, product_dtype)
    a3 = qa.reshape(m, g, -1)
    if split_epilogue:
        acc = lax.optimization_barrier(acc)
    part = acc.astype(jnp.float32)
    if zw is not None:
        rs = jnp.sum(a3.astype(jnp.int32), axis=-1).T.astype(jnp.float32)  # (G, M)
        part = part - rs[:, :, None] * zw[:, None, :]
    y = jnp.sum(part * sa[:, :, None] * sw[:, None, :], axis=0)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(out_dtype)


# ----------------------------------------------------------------------------- guard


@dataclasses.dataclass(frozen=True)
class Tiles:
    """Kernel tiling: output tile (bm, bn), K tile bk, Triton warps and pipeline stages."""

    bm: int = 128
    bn: int = 128
    bk: int = 128
    num_warps: int = 8
    num_stages: int = 3


def _pow2(x: int) -> bool:
    return x > 0 and (x & (x - 1)) == 0


MIN_TILE = 16  # the smallest output tile Triton's tensor-core dots take


def fit_tiles(tiles: Tiles, m: int, n: int) -> Tiles:
    """``tiles`` with bm / bn halved until they divide M / N (not below 16), so a layer whose width
    is not a multiple of a wide tile (DiT-XL/2's proj and fc2: N = 1,152 with bn = 256) still runs
    the kernel, at a narrower tile, instead of the XLA fallback. bk stays: it is tied to the group
    and the 4-bit packing block. A shape no power-of-two tile >= 16 divides is left for the guard."""
    bm, bn = tiles.bm, tiles.bn
    while _pow2(bm) and bm > MIN_TILE and m % bm:
        bm //= 2
    while _pow2(bn) and bn > MIN_TILE and n % bn:
        bn //= 2
    return dataclasses.replace(tiles, bm=bm, bn=bn)


def kernel_applies(m: int, n: int, k: int, n_groups: int, a_dtype: Any, w_dtype: Any, *, tiles: Tiles = Tiles(),
                   platform: str | None = None, fuse_quant: bool = False) -> tuple[bool, str]:
    """Whether the Pallas kernel can run this GEMM, and if not, why (the XLA path is used then)."""
    platform = platform or jax.default_backend()
    if platform != "gpu":
        return False, f"platform is {platform}, the kernel is GPU-only"
    if not all(_pow2(t) for t in (tiles.bm, tiles.bn, tiles.bk)):
        return False, f"tiles {tiles} are not powers of two"
    if m % tiles.bm or n % tiles.bn or k % tiles.bk:
        return False, f"shape M={m} N={n} K={k} is not divisible by tiles ({tiles.bm}, {tiles.bn}, {tiles.bk})"
    if k % n_groups or (k // n_groups) % tiles.bk:
        return False, f"group size {k // max(n_groups, 1)} is not a multiple of the K tile {tiles.bk}"
    w_dtype = jnp.dtype(w_dtype)
    if w_dtype == jnp.uint8 and tiles.bk != PACK_BLOCK:
        return False, f"packed 4-bit weights need the K tile {PACK_BLOCK}"
    if w_dtype not in (jnp.dtype(jnp.int8), jnp.dtype(jnp.uint8)):
        return False, f"weights of dtype {w_dtype}: the kernel takes int8 or packed int4"
    want_a = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32)) if fuse_quant else (jnp.dtype(jnp.int8),)
    if jnp.dtype(a_dtype) not in want_a:
        return False, f"activations of dtype {jnp.dtype(a_dtype)}; the kernel takes {[str(d) for d in want_a]}"
    if fuse_quant and k // n_groups != tiles.bk:
        return False, "in-kernel activation quantization needs the K tile to be one whole group"
    return True, "ok"


# ----------------------------------------------------------------------------- Pallas kernel


def _sext4(p: jax.Array, high: bool) -> jax.Array:
    """Sign-extended nibble of int32 ``p`` (holding a byte) as int8."""
    shifted = (p << 24) >> 28 if high else (p << 28) >> 28
    return shifted.astype(jnp.int8)


def _round_even(x: jax.Array) -> jax.Array:
    """Round half to even (``jnp.round``'s rule) from floor alone: Pallas' Triton lowering has no
    ``round`` primitive, and the codes must equal the XLA path's bit for bit."""
    r = jnp.floor(x + 0.5)
    odd = (r - 2.0 * jnp.floor(r * 0.5)) == 1.0
    return jnp.where(((r - x) == 0.5) & odd, r - 1.0, r)


def _quant_tile(x: jax.Array, qmax: float) -> tuple[jax.Array, jax.Array]:
    """Symmetric per-row int8 codes of a float tile and the row scales (absmax / qmax)."""
    x = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x), axis=1)
    s = jnp.where(amax > 0, amax / qmax, 1.0)
    q = jnp.clip(_round_even(x / s[:, None]), -qmax - 1, qmax).astype(jnp.int8)
    return q, s


def _kernel(*refs, tiles: Tiles, tiles_per_group: int, n_groups: int, packed: bool, has_zero: bool,
            has_bias: bool, fuse_quant: bool, qmax: float):
    it = iter(refs)
    a_ref = next(it)
    sa_ref = None if fuse_quant else next(it)
    w_ref, sw_ref = next(it), next(it)
    zw_ref = next(it) if has_zero else None
    rs_ref = next(it) if has_zero and not fuse_quant else None
    b_ref = next(it) if has_bias else None
    o_ref = next(it)
    from jax.experimental import pallas as pl

    bm, bn, bk = tiles.bm, tiles.bn, tiles.bk
    rows = pl.ds(pl.program_id(0) * bm, bm)
    cols = pl.ds(pl.program_id(1) * bn, bn)
    dims = (((1,), (1,)), ((), ()))

    def idot(x, y):
        return lax.dot_general(x, y, dims, preferred_element_type=jnp.int32)

    def group_body(g, acc):
        def tile_body(t, carry):
            acc_i, s_a, r_s = carry
            k0 = (g * tiles_per_group + t) * bk
            if packed:
                h = bk // 2
                p = w_ref[cols, pl.ds(k0 // 2, h)].astype(jnp.int32)
                lo, hi = _sext4(p, False), _sext4(p, True)
                a_lo, a_hi = a_ref[rows, pl.ds(k0, h)], a_ref[rows, pl.ds(k0 + h, h)]
                if fuse_quant:
                    amax = jnp.maximum(jnp.max(jnp.abs(a_lo.astype(jnp.float32)), axis=1),
                                       jnp.max(jnp.abs(a_hi.astype(jnp.float32)), axis=1))
                    s_a = jnp.where(amax > 0, amax / qmax, 1.0)
                    a_lo = jnp.clip(_round_even(a_lo.astype(jnp.float32) / s_a[:, None]), -qmax - 1, qmax).astype(jnp.int8)
                    a_hi = jnp.clip(_round_even(a_hi.astype(jnp.float32) / s_a[:, None]), -qmax - 1, qmax).astype(jnp.int8)
                acc_i = acc_i + idot(a_lo, lo) + idot(a_hi, hi)
                if has_zero and fuse_quant:
                    r_s = r_s + jnp.sum(a_lo.astype(jnp.float32), axis=1) + jnp.sum(a_hi.astype(jnp.float32), axis=1)
            else:
                a = a_ref[rows, pl.ds(k0, bk)]
                if fuse_quant:
                    a, s_a = _quant_tile(a, qmax)
                    if has_zero:
                        r_s = r_s + jnp.sum(a.astype(jnp.float32), axis=1)
                acc_i = acc_i + idot(a, w_ref[cols, pl.ds(k0, bk)])
            return acc_i, s_a, r_s

        init = (jnp.zeros((bm, bn), jnp.int32), jnp.ones((bm,), jnp.float32), jnp.zeros((bm,), jnp.float32))
        acc_i, s_a, r_s = lax.fori_loop(0, tiles_per_group, tile_body, init)
        part = acc_i.astype(jnp.float32)
        if has_zero:
            if not fuse_quant:
                r_s = rs_ref[g, rows]
            part = part - r_s[:, None] * zw_ref[g, cols][None, :]
        if not fuse_quant:
            s_a = sa_ref[g, rows]
        return acc + part * (s_a[:, None] * sw_ref[g, cols][None, :])

    acc = lax.fori_loop(0, n_groups, group_body, jnp.zeros((bm, bn), jnp.float32))
    if has_bias:
        acc = acc + b_ref[cols][None, :]
    o_ref[rows, cols] = acc.astype(o_ref.dtype)


def group_gemm_pallas(a: jax.Array, sa: jax.Array | None, qw: jax.Array, sw: jax.Array, bias: jax.Array | None = None,
                      zw: jax.Array | None = None, rs: jax.Array | None = None, *, out_dtype: Any = jnp.bfloat16,
                      tiles: Tiles = Tiles(), fuse_quant: bool = False, qmax: float = 127.0,
                      interpret: bool = False) -> jax.Array:
    """The Pallas kernel. ``a``: int8 codes with ``sa`` (G, M) (and ``rs`` when ``zw`` is given), or,
    with ``fuse_quant``, float activations quantized in the kernel (``sa``/``rs`` None)."""
    from jax.experimental import pallas as pl

    m, k = a.shape
    n = qw.shape[0]
    g = sw.shape[0]
    packed = qw.dtype == jnp.uint8
    if packed:
        qw = lax.bitcast_convert_type(qw, jnp.int8)
    tpg = (k // g) // tiles.bk
    operands = [a] + ([] if fuse_quant else [sa.astype(jnp.float32)]) + [qw, sw.astype(jnp.float32)]
    if zw is not None:
        operands.append(zw.astype(jnp.float32))
        if not fuse_quant:
            operands.append(rs.astype(jnp.float32))
    if bias is not None:
        operands.append(bias.astype(jnp.float32))
    kern = functools.partial(_kernel, tiles=tiles, tiles_per_group=tpg, n_groups=g, packed=packed,
                             has_zero=zw is not None, has_bias=bias is not None, fuse_quant=fuse_quant, qmax=qmax)
    kw: dict[str, Any] = {}
    if not interpret:
        from jax.experimental.pallas import triton as plgpu

        kw["compiler_params"] = plgpu.CompilerParams(num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    return pl.pallas_call(kern, out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
                          grid=(m // tiles.bm, n // tiles.bn), interpret=interpret, **kw)(*operands)


def group_gemm(qa: jax.Array, sa: jax.Array, qw: jax.Array, sw: jax.Array, bias: jax.Array | None = None,
               zw: jax.Array | None = None, *, out_dtype: Any = jnp.bfloat16, tiles: Tiles = Tiles(),
               backend: str = "auto") -> jax.Array:
    """Group-scaled GEMM on pre-quantized activations: the Pallas kernel where
    :func:`kernel_applies`, else (or with ``backend='xla'``) the XLA path."""
    if backend not in ("auto", "pallas", "xla"):
        raise QditError(f"backend must be 'auto', 'pallas' or 'xla', got {backend!r}")
    m, k = qa.shape
    tiles = fit_tiles(tiles, m, qw.shape[0])
    ok, why = kernel_applies(m, qw.shape[0], k, sw.shape[0], qa.dtype, qw.dtype, tiles=tiles)
    if backend == "pallas" and not ok:
        raise QditError(f"the Pallas group GEMM does not apply here ({why}); use backend 'auto' or 'xla'")
    if ok and backend != "xla":
        rs = None
        if zw is not None:
            g = sw.shape[0]
            rs = jnp.sum(qa.reshape(m, g, k // g).astype(jnp.int32), axis=-1).T
        return group_gemm_pallas(qa, sa, qw, sw, bias, zw, rs, out_dtype=out_dtype, tiles=tiles)
    return group_gemm_xla(qa, sa, qw, sw, bias, zw, out_dtype=out_dtype)
