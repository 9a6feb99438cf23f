"""Packed storage of 4-bit (and narrower) codes: two codes per byte along the last axis.

Byte ``k`` of a row holds code ``2k`` in its low nibble and code ``2k + 1`` in its high nibble.
Signed codes (int8 in [-8, 7]) are stored as two's-complement nibbles and sign-extended when
unpacked; unsigned codes (uint8 in [0, 15]) as they are. Codes of 2 or 3 bits fit the same way.
Values outside the 4-bit range are not checked inside jit (only the low nibble is kept).
Pure ``jax.numpy``; jit- and vmap-safe.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from qdit_jax.errors import QditError


def pack_int4(codes: jax.Array) -> jax.Array:
    """Pack integer codes ``(..., n)`` (n even) into ``uint8`` ``(..., n // 2)``."""
    if not jnp.issubdtype(codes.dtype, jnp.integer):
        raise QditError(f"pack_int4 needs integer codes, got dtype {codes.dtype}; quantize first")
    n = codes.shape[-1] if codes.ndim else 0
    if codes.ndim == 0 or n % 2:
        raise QditError(
            f"pack_int4 packs two codes per byte along the last axis, which must have even length; "
            f"got shape {tuple(codes.shape)} (pad the last axis or store unpacked uint8/int8 codes)"
        )
    nib = (codes.astype(jnp.int32) & 0xF).astype(jnp.uint8)
    pairs = nib.reshape(*codes.shape[:-1], n // 2, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4)


def unpack_int4(packed: jax.Array, signed: bool) -> jax.Array:
    """Inverse of :func:`pack_int4`: ``uint8`` ``(..., m)`` -> codes ``(..., 2m)``, int8 if ``signed`` else uint8."""
    if packed.dtype != jnp.uint8:
        raise QditError(f"unpack_int4 needs the uint8 array made by pack_int4, got dtype {packed.dtype}")
    if packed.ndim == 0:
        raise QditError("unpack_int4 needs an array with a last axis of packed bytes, got a scalar")
    lo = packed & 0xF
    hi = packed >> 4
    both = jnp.stack([lo, hi], axis=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
    if signed:
        return ((both.astype(jnp.int32) ^ 8) - 8).astype(jnp.int8)
    return both
