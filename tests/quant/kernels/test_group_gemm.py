"""The group GEMM: Pallas kernel (interpret mode on CPU), XLA fallback and guard against a float64
NumPy reference; the blocked 4-bit packing round trip."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qdit_jax.quant.kernels.group_gemm import (Tiles, fit_tiles, group_gemm, group_gemm_pallas,
                                               group_gemm_reference, group_gemm_xla, kernel_applies, pack_blocked,
                                               unpack_blocked)
from tests.quant.kernels import CPU_NUMERICS

TILES = Tiles(32, 32, 128)


def numpy_ref(qa, sa, w, sw, bias, zw):
    """float64 NumPy: dequantize by group and multiply."""
    qa, w = np.asarray(qa, np.float64), np.asarray(w, np.float64)
    sa, sw = np.asarray(sa, np.float64), np.asarray(sw, np.float64)
    g, m = sa.shape
    n, k = w.shape
    a = (qa.reshape(m, g, -1) * sa.T[:, :, None]).reshape(m, k)
    wz = w.reshape(n, g, -1) - (0 if zw is None else np.asarray(zw, np.float64).T[:, :, None])
    return a @ (wz * sw.T[:, :, None]).reshape(n, k).T + np.asarray(bias, np.float64)


def make(seed, m, n, k, g, bits, asym):
    r = np.random.default_rng(seed)
    qa = r.integers(-128, 128, (m, k)).astype(np.int8)
    sa = r.uniform(0.01, 0.1, (g, m)).astype(np.float32)
    lim = 2 ** (bits - 1)
    w = r.integers(-lim, lim, (n, k)).astype(np.int8)
    sw = r.uniform(0.01, 0.1, (g, n)).astype(np.float32)
    zw = r.integers(-3, 4, (g, n)).astype(np.float32) if asym else None
    bias = r.standard_normal(n).astype(np.float32)
    store = pack_blocked(jnp.asarray(w)) if bits == 4 else jnp.asarray(w)
    return qa, sa, w, store, sw, zw, bias


def relerr(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


@pytest.mark.parametrize("k", [256, 64, 10])
def test_pack_blocked_round_trip(k):
    w = np.random.default_rng(k).integers(-8, 8, (6, k)).astype(np.int8)
    p = pack_blocked(jnp.asarray(w))
    assert p.dtype == jnp.uint8 and p.shape == (6, k // 2)
    np.testing.assert_array_equal(np.asarray(unpack_blocked(p)), w)


def test_pack_blocked_layout_pairs_halves_of_a_block():
    w = np.random.default_rng(0).integers(-8, 8, (2, 256)).astype(np.int8)
    p = np.asarray(pack_blocked(jnp.asarray(w)))
    lo = ((p & 0xF).astype(np.int16) ^ 8) - 8
    hi = ((p >> 4).astype(np.int16) ^ 8) - 8
    np.testing.assert_array_equal(lo[:, :64], w[:, :64])  # byte j of block 0: codes j and j + 64
    np.testing.assert_array_equal(hi[:, :64], w[:, 64:128])
    np.testing.assert_array_equal(lo[:, 64:], w[:, 128:192])


@pytest.mark.parametrize("g,bits,asym", [(2, 8, False), (1, 8, True), (2, 4, False), (2, 4, True)])
def test_reference_and_xla_agree_with_numpy(g, bits, asym):
    qa, sa, w, store, sw, zw, bias = make(g * 10 + bits, 48, 40, 256, g, bits, asym)
    ref64 = numpy_ref(qa, sa, w, sw, bias, zw)
    zj = None if zw is None else jnp.asarray(zw)
    ref = group_gemm_reference(jnp.asarray(qa), jnp.asarray(sa), store, jnp.asarray(sw), jnp.asarray(bias), zj)
    xla = group_gemm_xla(jnp.asarray(qa), jnp.asarray(sa), store, jnp.asarray(sw), jnp.asarray(bias), zj)
    assert relerr(ref, ref64) < 1e-5
    assert relerr(xla, ref64) < 1e-5
    assert relerr(xla, np.asarray(ref, np.float64)) < 1e-5


@pytest.mark.parametrize("g,bits,asym", [(2, 8, True), (2, 4, False), (1, 4, True)])
def test_pallas_interpret_matches_reference(g, bits, asym):
    m, n, k = 64, 64, 256
    qa, sa, w, store, sw, zw, bias = make(7 + g + bits, m, n, k, g, bits, asym)
    ref64 = numpy_ref(qa, sa, w, sw, bias, zw)
    zj = None if zw is None else jnp.asarray(zw)
    rs = None if zw is None else jnp.sum(jnp.asarray(qa).reshape(m, g, -1).astype(jnp.int32), -1).T
    out = group_gemm_pallas(jnp.asarray(qa), jnp.asarray(sa), store, jnp.asarray(sw), jnp.asarray(bias), zj, rs,
                            out_dtype=jnp.float32, tiles=TILES, interpret=True)
    assert relerr(out, ref64) < 1e-5


def test_pallas_fused_quant_matches_quantize_then_reference():
    m, n, k, g = 64, 32, 256, 2
    r = np.random.default_rng(3)
    x = r.standard_normal((m, k)).astype(np.float32) * r.uniform(0.1, 5, (m, 1)).astype(np.float32)
    _, _, w, store, sw, _, bias = make(3, m, n, k, g, 4, False)
    xg = x.reshape(m, g, -1).astype(np.float64)
    s = np.abs(xg).max(-1) / 127
    q = np.clip(np.round(xg / s[..., None]), -128, 127).reshape(m, k)
    ref64 = numpy_ref(q, s.T, w, sw, bias, None)
    out = group_gemm_pallas(jnp.asarray(x), None, store, jnp.asarray(sw), jnp.asarray(bias), out_dtype=jnp.float32,
                            tiles=TILES, fuse_quant=True, interpret=True)
    assert relerr(out, ref64) < 1e-4


def test_guard_routes_unsupported_shapes_to_fallback():
    i8, u8 = jnp.int8, jnp.uint8
    assert kernel_applies(256, 256, 256, 2, i8, i8, platform="gpu") == (True, "ok")
    assert not kernel_applies(256, 256, 256, 2, i8, i8, platform="cpu")[0]
    assert not kernel_applies(200, 256, 256, 2, i8, i8, platform="gpu")[0]  # M not a tile multiple
    assert not kernel_applies(256, 256, 256, 4, i8, i8, platform="gpu")[0]  # group 64 < K tile 128
    assert not kernel_applies(256, 256, 256, 2, jnp.float8_e4m3fn, jnp.float8_e4m3fn, platform="gpu")[0]
    assert not kernel_applies(256, 256, 256, 2, i8, u8, tiles=Tiles(128, 128, 64), platform="gpu")[0]
    assert not kernel_applies(256, 256, 256, 2, jnp.bfloat16, i8, platform="gpu")[0]  # float acts need fuse_quant
    assert kernel_applies(256, 256, 256, 2, jnp.bfloat16, i8, platform="gpu", fuse_quant=True)[0]
    assert not kernel_applies(256, 256, 256, 1, jnp.bfloat16, i8, platform="gpu", fuse_quant=True)[0]


def test_group_gemm_falls_back_on_cpu_and_matches():
    qa, sa, w, store, sw, zw, bias = make(11, 40, 24, 128, 2, 8, False)  # M=40: no tile multiple anyway
    out = group_gemm(jnp.asarray(qa), jnp.asarray(sa), store, jnp.asarray(sw), jnp.asarray(bias),
                     out_dtype=jnp.float32)
    assert relerr(out, numpy_ref(qa, sa, w, sw, bias, None)) < 1e-5
    jaxpr = jax.make_jaxpr(lambda a: group_gemm(a, jnp.asarray(sa), store, jnp.asarray(sw)))(jnp.asarray(qa))
    assert "pallas_call" not in str(jaxpr)
    with pytest.raises(ValueError, match="does not apply"):
        group_gemm(jnp.asarray(qa), jnp.asarray(sa), store, jnp.asarray(sw), backend="pallas")


def test_kernel_round_is_numpy_round_half_even():
    """The kernel's floor-based rounding (Triton has no round) must equal np.round, ties included."""
    from qdit_jax.quant.kernels.group_gemm import _round_even

    rng = np.random.default_rng(0)
    x = np.concatenate([np.arange(-130, 130, 0.5), rng.normal(0, 60, 20000), [-0.5, 0.5, 1.5, -1.5, 2.5]])
    x = x.astype(np.float32)
    np.testing.assert_array_equal(np.asarray(_round_even(jnp.asarray(x))), np.round(x))


@CPU_NUMERICS
@pytest.mark.parametrize("g", [1, 4])
def test_split_epilogue_is_the_same_function(g):
    """The barrier between the int8 GEMM and its scale epilogue changes scheduling, not values."""
    r = np.random.default_rng(g)
    m, n, k = 16, 24, 64
    qa = jnp.asarray(r.integers(-128, 128, (m, k)), jnp.int8)
    qw = jnp.asarray(r.integers(-128, 128, (n, k)), jnp.int8)
    sa = jnp.asarray(r.uniform(0.01, 0.1, (g, m)), jnp.float32)
    sw = jnp.asarray(r.uniform(0.01, 0.1, (g, n)), jnp.float32)
    b = jnp.asarray(r.standard_normal(n), jnp.float32)
    a = group_gemm_xla(qa, sa, qw, sw, b)
    fn = lambda *args: group_gemm_xla(*args, split_epilogue=True)  # noqa: E731
    np.testing.assert_array_equal(np.asarray(jax.jit(fn)(qa, sa, qw, sw, b)), np.asarray(jax.jit(group_gemm_xla)(qa, sa, qw, sw, b)))
    np.testing.assert_allclose(np.asarray(fn(qa, sa, qw, sw, b)), np.asarray(a), rtol=1e-6)
    assert "optimization_barrier" in str(jax.make_jaxpr(fn)(qa, sa, qw, sw, b))


def test_fit_tiles_narrows_to_the_layer_and_keeps_k():
    wide = Tiles(128, 256, 128, 8, 3)
    assert fit_tiles(wide, 65536, 4608) == wide  # XL/2 fc1: fits as is
    fitted = fit_tiles(wide, 65536, 1152)  # XL/2 proj / fc2: 1,152 is not a multiple of 256
    assert (fitted.bm, fitted.bn, fitted.bk, fitted.num_warps, fitted.num_stages) == (128, 128, 128, 8, 3)
    assert kernel_applies(65536, 1152, 1152, 9, jnp.int8, jnp.int8, tiles=fitted, platform="gpu")[0]
    assert not kernel_applies(65536, 1152, 1152, 9, jnp.int8, jnp.int8, tiles=wide, platform="gpu")[0]
    odd = fit_tiles(wide, 200, 1000)  # no power-of-two tile >= 16 divides: left for the guard to refuse
    assert (odd.bm, odd.bn) == (16, 16) and not kernel_applies(200, 1000, 256, 2, jnp.int8, jnp.int8, tiles=odd,
                                                                 platform="gpu")[0]


def test_group_gemm_runs_the_kernel_at_fitted_tiles():
    m, n, k, g = 64, 96, 256, 2  # N = 96: a 64-wide tile does not divide it, 32 does
    qa, sa, w, store, sw, zw, bias = make(11, m, n, k, g, 8, False)
    ref64 = numpy_ref(qa, sa, w, sw, bias, zw)
    tiles = fit_tiles(Tiles(32, 64, 128), m, n)
    assert tiles.bn == 32
    out = group_gemm_pallas(jnp.asarray(qa), jnp.asarray(sa), store, jnp.asarray(sw), jnp.asarray(bias),
                            out_dtype=jnp.float32, tiles=tiles, interpret=True)
    assert relerr(out, ref64) < 1e-5


def test_xla_product_of_fp8_activations_and_packed_4bit_weights():
    """fp8 activation codes times packed 4-bit weight codes (W4A8 with fp8 activations): the codes convert
    to fp8 exactly, so the XLA path equals the float64 reference; unpacked int8 codes (which may be 8-bit
    and would round) are refused with a message naming the fix."""
    qa8, sa, w, store, sw, _, bias = make(3, 32, 64, 256, 2, 4, False)
    qa = jnp.asarray(np.clip(qa8.astype(np.float32) / 8, -448, 448)).astype(jnp.float8_e4m3fn)
    out = group_gemm_xla(qa, jnp.asarray(sa), store, jnp.asarray(sw), jnp.asarray(bias))
    ref = numpy_ref(np.asarray(qa.astype(jnp.float32)), sa, w, sw, bias, None)
    assert relerr(out, ref) < 1e-6
    with pytest.raises(ValueError, match="only packed 4-bit codes are exact in fp8"):
        group_gemm_xla(qa, jnp.asarray(sa), jnp.asarray(w), jnp.asarray(sw), jnp.asarray(bias))
