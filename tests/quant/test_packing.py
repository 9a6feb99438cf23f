"""Two 4-bit codes per byte: round trips, byte layout against NumPy, and bad input."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qdit_jax.errors import QditError
from qdit_jax.quant.packing import pack_int4, unpack_int4


@pytest.mark.parametrize("signed", [False, True])
def test_round_trip_and_half_the_bytes(signed: bool) -> None:
    rng = np.random.default_rng(0)
    lo, hi = (-8, 8) if signed else (0, 16)
    codes = rng.integers(lo, hi, size=(3, 5, 64)).astype(np.int8 if signed else np.uint8)
    codes[0, 0, :16] = np.arange(lo, hi)[:16]  # every value appears
    packed = pack_int4(jnp.asarray(codes))
    assert packed.dtype == jnp.uint8 and packed.shape == (3, 5, 32)
    assert packed.nbytes * 2 == codes.nbytes
    back = unpack_int4(packed, signed=signed)
    assert back.dtype == (jnp.int8 if signed else jnp.uint8)
    np.testing.assert_array_equal(np.asarray(back), codes)
    # Byte layout: element 2k in the low nibble, 2k+1 in the high nibble (two's complement nibbles).
    nib = codes.astype(np.int16) & 0xF
    np.testing.assert_array_equal(np.asarray(packed), (nib[..., 0::2] | (nib[..., 1::2] << 4)).astype(np.uint8))


def test_jit_and_vmap() -> None:
    codes = jnp.asarray(np.random.default_rng(1).integers(-8, 8, size=(4, 6, 10)), jnp.int8)
    rt = jax.jit(jax.vmap(lambda c: unpack_int4(pack_int4(c), signed=True)))(codes)
    np.testing.assert_array_equal(np.asarray(rt), np.asarray(codes))


def test_narrower_codes_fit() -> None:
    """3-bit signed and 2-bit unsigned codes survive the nibble packing too."""
    c3 = jnp.asarray(np.arange(-4, 4, dtype=np.int8).reshape(1, 8))
    np.testing.assert_array_equal(np.asarray(unpack_int4(pack_int4(c3), signed=True)), np.asarray(c3))
    c2 = jnp.asarray(np.array([[0, 1, 2, 3]], np.uint8))
    np.testing.assert_array_equal(np.asarray(unpack_int4(pack_int4(c2), signed=False)), np.asarray(c2))


def test_bad_input() -> None:
    with pytest.raises(QditError, match="even length; got shape \\(2, 7\\)"):
        pack_int4(jnp.zeros((2, 7), jnp.uint8))
    with pytest.raises(QditError, match="integer codes"):
        pack_int4(jnp.zeros((2, 8), jnp.float32))
    with pytest.raises(QditError, match="uint8"):
        unpack_int4(jnp.zeros((2, 8), jnp.int8), signed=True)
