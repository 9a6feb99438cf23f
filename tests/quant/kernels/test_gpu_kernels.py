"""The kernels compiled for the GPU (the Triton row kernels; the Mosaic GPU scaled GEMM on Hopper;
skipped elsewhere) against the XLA formulation they replace, on random data at DiT-XL/2's widths:
what interpret mode cannot check (the lowering, ``tanh.approx``, the reduction order, wgmma). Run on
a GPU machine: ``pytest tests/quant/kernels``."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qdit_jax.quant.kernels.gelu_quant import gelu_quant_pallas, gelu_quant_xla
from qdit_jax.quant.kernels.norm_quant import norm_quant_pallas, norm_quant_xla
from qdit_jax.quant.quantizers import QuantSpec

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu", reason="compiles the Triton and Mosaic GPU kernels: GPU only")

SPECS = {"int8": QuantSpec(bits=8, group_size=0, symmetric=True),
         "fp8": QuantSpec(bits=8, format="fp8_e4m3", group_size=0, symmetric=True)}
B, T, C, HIDDEN = 16, 256, 1152, 4608


def _codes(q) -> np.ndarray:
    return np.asarray(jnp.asarray(q).astype(jnp.float32), np.float64)


@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("name", sorted(SPECS))
def test_norm_quant_matches_xla(name, norm):
    r = np.random.default_rng(0)
    x = jnp.asarray(r.standard_normal((B * T, C)) * 2 + r.standard_normal(C), jnp.bfloat16)
    kw = {}
    if norm:
        kw = dict(shift=jnp.asarray(r.standard_normal((B, C)) * 0.3, jnp.bfloat16),
                  scale=jnp.asarray(r.standard_normal((B, C)) * 0.3, jnp.bfloat16), tokens=T)
    q, s = jax.jit(lambda v: norm_quant_pallas(v, SPECS[name], **kw))(x)
    q0, s0 = jax.jit(lambda v: norm_quant_xla(v, SPECS[name], **kw))(x)
    rel = np.abs(np.asarray(s) - np.asarray(s0)) / np.asarray(s0)
    assert rel.max() < 2 ** -7 and np.mean(rel > 0) < 1e-3  # a bf16 ulp of a row maximum, rarely
    got, want = _codes(q), _codes(q0)
    assert np.mean(got == want) > 0.9999
    assert np.abs(got).max() >= (127 if name == "int8" else 448)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_gelu_quant_matches_xla(name):
    r = np.random.default_rng(1)
    p = jnp.asarray(r.standard_normal((B * T, HIDDEN)) * 100, jnp.bfloat16)
    sa = jnp.asarray(r.uniform(0.005, 0.015, (1, B * T)), jnp.float32)
    sw = jnp.asarray(r.uniform(0.5, 1.5, (1, HIDDEN)), jnp.float32)
    b = jnp.asarray(r.standard_normal(HIDDEN) * 0.1, jnp.float32)
    for approx in (True, False):
        q, s = jax.jit(lambda *a: gelu_quant_pallas(*a, SPECS[name], jnp.bfloat16, approx_tanh=approx))(p, sa, sw, b)
        q0, s0 = jax.jit(lambda *a: gelu_quant_xla(*a, SPECS[name], jnp.bfloat16))(p, sa, sw, b)
        np.testing.assert_allclose(np.asarray(s), np.asarray(s0), rtol=2 ** -7)
        assert np.mean(_codes(q) == _codes(q0)) > 0.999


def _random_codes(r, shape, dtype):
    if dtype == jnp.int8:
        return jnp.asarray(r.integers(-127, 128, shape), jnp.int8)
    return jnp.asarray(np.clip(r.standard_normal(shape) * 60, -448, 448), jnp.float32).astype(dtype)


@pytest.mark.parametrize("dtype", [jnp.float8_e4m3fn, jnp.int8])
def test_scaled_gemm_matches_xla(dtype):
    """The Mosaic GPU fp8 / int8 GEMM with the scale epilogue, one q / k / v column block at a time."""
    from qdit_jax.quant.kernels.scaled_gemm import scaled_gemm_applies, scaled_gemm_mosaic, scaled_gemm_xla

    r = np.random.default_rng(2)
    m = B * T
    if not scaled_gemm_applies(m, C, C, dtype, dtype)[0]:
        pytest.skip(scaled_gemm_applies(m, C, C, dtype, dtype)[1])
    a, w = _random_codes(r, (m, C), dtype), _random_codes(r, (3 * C, C), dtype)
    sa = jnp.asarray(r.uniform(0.001, 0.003, (m,)), jnp.float32)
    sw = jnp.asarray(r.uniform(0.001, 0.003, (3 * C,)), jnp.float32)
    b = jnp.asarray(r.standard_normal(3 * C) * 0.1, jnp.float32)
    for i in range(3):
        got = np.asarray(jax.jit(lambda *x: scaled_gemm_mosaic(*x, n_off=i * C, n=C))(a, w, sa, sw, b), np.float32)
        want = np.asarray(jax.jit(lambda *x: scaled_gemm_xla(*x, n_off=i * C, n=C))(a, w, sa, sw, b), np.float32)
        assert np.abs(want).max() > 0
        assert np.mean(got == want) > 0.999
        np.testing.assert_allclose(got, want, rtol=2 ** -7, atol=1e-6)


@pytest.mark.parametrize("groups", [1, 9])
@pytest.mark.parametrize("dtype", [jnp.float8_e4m3fn, jnp.int8])
def test_one_call_for_three_outputs_equals_three_calls(dtype, groups):
    """q, k, v from one call (``out_blocks=3``) and with the epilogue's vectors prefetched: the same bits
    as one call per output block."""
    from qdit_jax.quant.kernels.scaled_gemm import scaled_gemm_mosaic

    r = np.random.default_rng(5)
    m = B * T
    a, w = _random_codes(r, (m, C), dtype), _random_codes(r, (3 * C, C), dtype)
    sa = jnp.asarray(r.uniform(0.001, 0.003, (m,) if groups == 1 else (groups, m)), jnp.float32)
    sw = jnp.asarray(r.uniform(0.001, 0.003, (3 * C,) if groups == 1 else (groups, 3 * C)), jnp.float32)
    b = jnp.asarray(r.standard_normal(3 * C) * 0.1, jnp.float32)
    want = [np.asarray(jax.jit(lambda *x, i=i: scaled_gemm_mosaic(*x, n_off=i * C, n=C))(a, w, sa, sw, b), np.float32)
            for i in range(3)]
    assert all(np.abs(v).max() > 0 for v in want)
    for kw in (dict(out_blocks=3), dict(out_blocks=3, prefetch="before"), dict(out_blocks=3, prefetch="after")):
        got = jax.jit(lambda *x, kw=kw: scaled_gemm_mosaic(*x, **kw))(a, w, sa, sw, b)
        assert len(got) == 3
        for g, v in zip(got, want):
            assert g.shape == (m, C)
            np.testing.assert_array_equal(np.asarray(g, np.float32), v)


def _assert_epilogue_warpgroup_equal(seed: int, k: int, n: int, blocks: int, residual: bool, dtype, groups: int,
                                     option: str = "epilogue_wg", **kw) -> None:
    """The kernel with ``option`` (``epilogue_wg``, ``store_wg``) against the same call without it, on random
    codes: bit-equal."""
    from qdit_jax.quant.kernels.scaled_gemm import codes_wg_available, scaled_gemm_mosaic

    if not codes_wg_available():
        pytest.skip("this JAX's Pallas pipeline cannot bound the compute warpgroups' registers")
    r = np.random.default_rng(seed)
    m = B * T
    a, w = _random_codes(r, (m, k), dtype), _random_codes(r, (n, k), dtype)
    sa, sw = (jnp.asarray(r.uniform(0.001, 0.003, (v,) if groups == 1 else (groups, v)), jnp.float32) for v in (m, n))
    b = jnp.asarray(r.standard_normal(n) * 0.1, jnp.float32)
    if residual:
        kw.update(residual=jnp.asarray(r.standard_normal((m, n)) * 4, jnp.bfloat16),
                  gate=jnp.asarray(r.standard_normal((B, n)) * 0.5, jnp.bfloat16))
    outs = [jax.tree.leaves(jax.jit(lambda *v, e=e: scaled_gemm_mosaic(*v, out_blocks=blocks, **{option: e}, **kw))(
        a, w, sa, sw, b)) for e in (False, True)]
    assert len(outs[1]) == blocks and np.abs(np.asarray(outs[0][0], np.float32)).max() > 0
    for got, want in zip(outs[1], outs[0]):
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


@pytest.mark.parametrize("k, n, blocks, residual", [(C, 3 * C, 3, False), (C, HIDDEN, 1, False), (HIDDEN, C, 1, False),
                                                     (C, C, 1, True), (HIDDEN, C, 1, True)])
def test_epilogue_warpgroup_equals_the_default(k, n, blocks, residual):
    """Per-channel fp8 with the scale / bias (/ gated residual) epilogue and the store on the fourth
    warpgroup (``epilogue_wg``): the same bits as the compute warpgroups' own epilogue, for q, k, v in
    one call, at fc1's shape, and at proj's / fc2's with and without the residual (the guard refusing
    int8 per channel: test_scaled_gemm.py)."""
    _assert_epilogue_warpgroup_equal(7, k, n, blocks, residual, jnp.float8_e4m3fn, 1)


@pytest.mark.parametrize("dtype", [jnp.float8_e4m3fn, jnp.int8])
@pytest.mark.parametrize("k, n, blocks, residual", [(C, 3 * C, 3, False), (C, C, 1, True), (HIDDEN, C, 1, True)])
def test_group_epilogue_warpgroup_equals_the_default(k, n, blocks, residual, dtype):
    """Group-128 with the bias (/ gated residual) epilogue and the store on the fourth warpgroup, the
    float32 group sums staged in shared memory: the same bits as the compute warpgroups' own epilogue
    under the same schedule ('split')."""
    _assert_epilogue_warpgroup_equal(8, k, n, blocks, residual, dtype, k // 128, group_mode="split")


@pytest.mark.parametrize("dtype, groups", [(jnp.float8_e4m3fn, True), (jnp.int8, True), (jnp.float8_e4m3fn, False)])
@pytest.mark.parametrize("k, n, blocks, residual", [(C, 3 * C, 3, False), (C, C, 1, True), (HIDDEN, C, 1, True),
                                                     (HIDDEN, C, 1, False)])
def test_store_warpgroup_equals_the_default(k, n, blocks, residual, dtype, groups):
    """The TMA stores issued by the store warpgroup (``store_wg``: two output slots a warpgroup with group
    scales' 64-row tiles, one per channel): the same bits as the compute warpgroups storing themselves,
    for q, k, v in one call and proj / fc2 with and without the gated residual, in each format's default
    schedule."""
    _assert_epilogue_warpgroup_equal(9, k, n, blocks, residual, dtype, k // 128 if groups else 1, option="store_wg")


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "int"])
def test_store_warpgroup_with_the_codes_epilogue_equals_the_default(fmt):
    """fc1 with fc2's group codes in its epilogue, the codes and their scales stored by the store
    warpgroup: the same codes and scales as the compute warpgroups storing them."""
    from qdit_jax.quant.kernels.scaled_gemm import codes_wg_available, scaled_gemm_mosaic

    if not codes_wg_available():
        pytest.skip("this JAX's Pallas pipeline cannot bound the compute warpgroups' registers")
    dtype = jnp.float8_e4m3fn if fmt == "fp8_e4m3" else jnp.int8
    spec = QuantSpec(bits=8, format=fmt, group_size=128, symmetric=True)
    r = np.random.default_rng(10)
    m = B * T
    a, w = _random_codes(r, (m, C), dtype), _random_codes(r, (HIDDEN, C), dtype)
    sa, sw = (jnp.asarray(r.uniform(0.001, 0.003, (C // 128, v)), jnp.float32) for v in (m, HIDDEN))
    b = jnp.asarray(r.standard_normal(HIDDEN) * 0.1, jnp.float32)
    outs = [jax.jit(lambda *v, e=e: scaled_gemm_mosaic(*v, gelu_codes=spec, store_wg=e))(a, w, sa, sw, b)
            for e in (False, True)]
    assert np.abs(np.asarray(outs[0][0], np.float32)).max() > 0
    for got, want in zip(outs[1], outs[0]):
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


def _gemm_case(seed: int, samples: int, k: int, n: int, dtype, groups: bool, blocks: int, residual: bool,
               codes: bool, bias_scale: float = 0.1) -> tuple[tuple, dict]:
    """Operands ((a, w, sa, sw, b)) and ``scaled_gemm_mosaic`` keywords for one of the model's GEMMs on
    ``samples`` x 256 tokens: q, k, v in ``blocks`` outputs, the gated residual (a gate row per sample),
    or fc1's group codes (int8 on the codes warpgroup where this JAX allows, as the model runs it)."""
    from qdit_jax.quant.kernels.scaled_gemm import codes_wg_available

    r = np.random.default_rng(seed)
    m, g = samples * T, k // 128
    a, w = _random_codes(r, (m, k), dtype), _random_codes(r, (n, k), dtype)
    sa = jnp.asarray(r.uniform(0.001, 0.003, (g, m) if groups else (m,)), jnp.float32)
    sw = jnp.asarray(r.uniform(0.001, 0.003, (g, n) if groups else (n,)), jnp.float32)
    b = jnp.asarray(r.standard_normal(n) * bias_scale, jnp.float32)
    kw: dict = dict(out_blocks=blocks)
    if residual:
        kw.update(residual=jnp.asarray(r.standard_normal((m, n)) * 4, jnp.bfloat16),
                  gate=jnp.asarray(r.standard_normal((samples, n)) * 0.5, jnp.bfloat16))
    if codes:
        int8 = dtype == jnp.int8
        kw.update(gelu_codes=QuantSpec(bits=8, format="int" if int8 else "fp8_e4m3", group_size=128, symmetric=True),
                  codes_wg=int8 and codes_wg_available())
    return (a, w, sa, sw, b), kw


_EPILOGUE_CASES = [(C, 3 * C, 3, False, False), (HIDDEN, C, 1, True, False), (C, HIDDEN, 1, False, True)]


@pytest.mark.parametrize("dtype", [jnp.float8_e4m3fn, jnp.int8])
@pytest.mark.parametrize("k, n, blocks, residual, codes", _EPILOGUE_CASES)
def test_bias_first_matches_the_default(k, n, blocks, residual, codes, dtype):
    """``bias_first`` (the group sums start at the bias): the same outputs as the default up to the float32
    sum's order, i.e. rarely a bf16 ulp (codes: rarely one code); a bias lost or added twice, or a column
    part's bias in another part, would show. q, k, v in one call with the store warpgroup where this JAX
    allows, fc2 + residual, fc1 + codes (int8: on the codes warpgroup, as the model runs it)."""
    from qdit_jax.quant.kernels.scaled_gemm import codes_wg_available, scaled_gemm_mosaic

    args, kw = _gemm_case(13, 35, k, n, dtype, True, blocks, residual, codes, bias_scale=2)  # bias ~ products
    kw.update(store_wg=codes_wg_available() and not codes)
    outs = [jax.tree.leaves(jax.jit(lambda *v, f=f: scaled_gemm_mosaic(*v, bias_first=f, **kw))(*args))
            for f in (False, True)]
    assert np.abs(np.asarray(outs[0][0], np.float32)).max() > 1
    for i, (got, want) in enumerate(zip(outs[1], outs[0])):
        got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
        assert np.mean(got == want) > 0.99
        if not (codes and i == 0):  # (a code moved by a bf16 ulp of its GELU input moves a whole code step)
            np.testing.assert_allclose(got, want, rtol=2 ** -6, atol=2 ** -5)


@pytest.mark.parametrize("dtype, groups", [(jnp.float8_e4m3fn, True), (jnp.int8, True), (jnp.float8_e4m3fn, False)])
@pytest.mark.parametrize("k, n, blocks, residual, codes", _EPILOGUE_CASES)
def test_cta_pairs_equal_the_default(k, n, blocks, residual, codes, dtype, groups):
    """``cta_pairs`` (two-CTA clusters sharing each K step's weight tile by TMA multicast) moves data
    only: the same bits as one CTA per tile, for q, k, v in one call, fc2 + residual and fc1 + codes (group
    scales), in each format's default schedule, with the model's fourth warpgroups where this JAX allows
    (group scales: the store warpgroup or int8's codes warpgroup; fp8 per channel: the epilogue
    warpgroup), at a size where the clusters own unequal numbers of tile pairs. A CTA reading its partner's
    half too early, or a pair taking different rows' weights, would show."""
    from qdit_jax.quant.kernels.scaled_gemm import codes_wg_available, scaled_gemm_mosaic

    if codes and not groups:
        pytest.skip("the codes epilogue is group-wise")
    args, kw = _gemm_case(14, 36, k, n, dtype, groups, blocks, residual, codes)
    wg = codes_wg_available()
    if groups:
        kw.update(store_wg=wg and not (codes and dtype == jnp.int8))
    else:
        kw.update(epilogue_wg=wg and not residual)
    outs = [jax.tree.leaves(jax.jit(lambda *v, p=p: scaled_gemm_mosaic(*v, cta_pairs=p, **kw))(*args))
            for p in (False, True)]
    assert np.abs(np.asarray(outs[0][0], np.float32)).max() > 0
    for got, want in zip(outs[1], outs[0]):
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


@pytest.mark.parametrize("store", [False, True])
@pytest.mark.parametrize("dtype", [jnp.float8_e4m3fn, jnp.int8])
@pytest.mark.parametrize("k, n, blocks, residual", [(C, 3 * C, 3, False), (C, C, 1, True), (HIDDEN, C, 1, True),
                                                     (HIDDEN, C, 1, False)])
def test_stacked_parts_equal_side_by_side_parts(k, n, blocks, residual, dtype, store):
    """``stacked`` (each compute warpgroup all the CTA tile's rows and half its columns) only moves work
    between the warpgroups: the same bits as 'split''s side-by-side parts, for q, k, v in one call and proj
    / fc2 with and without the gated residual, on 35 samples (CTAs owning unequal numbers of tiles), with
    the bias in the epilogue and the compute warpgroups storing, and with the bias first and the store
    warpgroup (the fp8 model's form). A part given the other part's rows, columns, scales, bias or gate
    would show."""
    from qdit_jax.quant.kernels.scaled_gemm import codes_wg_available, scaled_gemm_mosaic

    args, kw = _gemm_case(15, 35, k, n, dtype, True, blocks, residual, False, bias_scale=2)
    kw.update(group_mode="split", store_wg=store and codes_wg_available(), bias_first=store)
    outs = [jax.tree.leaves(jax.jit(lambda *v, s=s: scaled_gemm_mosaic(*v, stacked=s, **kw))(*args))
            for s in (False, True)]
    assert len(outs[1]) == blocks and np.abs(np.asarray(outs[0][0], np.float32)).max() > 1
    for got, want in zip(outs[1], outs[0]):
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


@pytest.mark.parametrize("dtype", [jnp.float8_e4m3fn, jnp.int8])
@pytest.mark.parametrize("k, n, blocks, residual", [(HIDDEN, C, 1, True), (HIDDEN, 3 * C, 3, False),
                                                     (C, C, 1, True), (C, 3 * C, 3, False)])
def test_group_pairs_equal_one_group_a_step(k, n, blocks, residual, dtype):
    """``group_pairs`` (two groups a pipeline step, four parts' wgmmas in flight) gives the bits of the
    stacked one-group step, in the model's form (bias first, store warpgroup), with and without the gated
    residual, at 36 groups and at 9 (the last step one group), on 35 samples: a group's tile or scale row
    taken from the wrong K tile, the odd group counted twice or skipped, or a part read before its wgmma
    finished, would show."""
    from qdit_jax.quant.kernels.scaled_gemm import codes_wg_available, scaled_gemm_mosaic

    args, kw = _gemm_case(16, 35, k, n, dtype, True, blocks, residual, False, bias_scale=2)
    kw.update(group_mode="split", stacked=True, store_wg=codes_wg_available(), bias_first=True)
    outs = [jax.tree.leaves(jax.jit(lambda *v, p=p: scaled_gemm_mosaic(*v, group_pairs=p, **kw))(*args))
            for p in (False, True)]
    assert len(outs[1]) == blocks and np.abs(np.asarray(outs[0][0], np.float32)).max() > 1
    for got, want in zip(outs[1], outs[0]):
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


@pytest.mark.parametrize("prefetch", ["before", "after"])
def test_prefetched_residual_epilogue_equals_the_default(prefetch):
    from qdit_jax.quant.kernels.scaled_gemm import scaled_gemm_mosaic

    r = np.random.default_rng(6)
    m, dtype = B * T, jnp.float8_e4m3fn
    a, w = _random_codes(r, (m, 4 * C), dtype), _random_codes(r, (C, 4 * C), dtype)
    sa, sw = (jnp.asarray(r.uniform(0.001, 0.003, (n,)), jnp.float32) for n in (m, C))
    b = jnp.asarray(r.standard_normal(C) * 0.1, jnp.float32)
    x = jnp.asarray(r.standard_normal((m, C)) * 4, jnp.bfloat16)
    g = jnp.asarray(r.standard_normal((B, C)) * 0.5, jnp.bfloat16)
    outs = [np.asarray(jax.jit(lambda *v, p=p: scaled_gemm_mosaic(*v[:5], residual=v[5], gate=v[6], prefetch=p))(
        a, w, sa, sw, b, x, g), np.float32) for p in (None, prefetch)]
    assert np.abs(outs[0]).max() > 0
    np.testing.assert_array_equal(outs[1], outs[0])


@pytest.mark.parametrize("dtype", [jnp.float8_e4m3fn, jnp.int8])
@pytest.mark.parametrize("k", [C, HIDDEN])
def test_scaled_gemm_residual_matches_xla(k, dtype):
    """The same kernel with adaLN-Zero's gated residual in its epilogue (DiT's proj, K = C, and fc2,
    K = 4C) against cuBLAS + XLA's epilogue-and-residual pass."""
    from qdit_jax.quant.kernels.scaled_gemm import scaled_gemm_applies, scaled_gemm_mosaic, scaled_gemm_xla

    r = np.random.default_rng(3)
    m = B * T
    if not scaled_gemm_applies(m, C, k, dtype, dtype, rows_per_gate=T)[0]:
        pytest.skip(scaled_gemm_applies(m, C, k, dtype, dtype, rows_per_gate=T)[1])
    a, w = _random_codes(r, (m, k), dtype), _random_codes(r, (C, k), dtype)
    sa = jnp.asarray(r.uniform(0.001, 0.003, (m,)), jnp.float32)
    sw = jnp.asarray(r.uniform(0.001, 0.003, (C,)), jnp.float32)
    b = jnp.asarray(r.standard_normal(C) * 0.1, jnp.float32)
    x = jnp.asarray(r.standard_normal((m, C)) * 4, jnp.bfloat16)
    g = jnp.asarray(r.standard_normal((B, C)) * 0.5, jnp.bfloat16)
    got = np.asarray(jax.jit(lambda *v: scaled_gemm_mosaic(*v[:5], residual=v[5], gate=v[6]))(a, w, sa, sw, b, x, g),
                     np.float32)
    want = np.asarray(jax.jit(lambda *v: scaled_gemm_xla(*v[:5], residual=v[5], gate=v[6]))(a, w, sa, sw, b, x, g),
                      np.float32)
    assert np.abs(want - np.asarray(x, np.float32)).max() > 1  # the GEMM term is not negligible
    assert np.mean(got == want) > 0.999
    np.testing.assert_allclose(got, want, rtol=2 ** -7, atol=2 ** -6)


G128 = {n: QuantSpec(bits=8, format=s.format, group_size=128, symmetric=True) for n, s in SPECS.items()}


@pytest.mark.parametrize("name", sorted(G128))
def test_group_quant_kernels_match_xla(name):
    """128-wide group codes: norm_quant from the residual stream through the LayerNorm, and
    gelu_quant from a group-wise fc1's bf16 output, against the XLA formulations."""
    r = np.random.default_rng(5)
    x = jnp.asarray(r.standard_normal((B * T, C)) * 2 + r.standard_normal(C), jnp.bfloat16)
    kw = dict(shift=jnp.asarray(r.standard_normal((B, C)) * 0.3, jnp.bfloat16),
              scale=jnp.asarray(r.standard_normal((B, C)) * 0.3, jnp.bfloat16), tokens=T)
    y = jnp.asarray(r.standard_normal((B * T, HIDDEN)) * 2, jnp.bfloat16)
    for got, want, g in ((jax.jit(lambda v: norm_quant_pallas(v, G128[name], **kw))(x),
                          jax.jit(lambda v: norm_quant_xla(v, G128[name], **kw))(x), C // 128),
                         (jax.jit(lambda v: gelu_quant_pallas(v, None, None, None, G128[name], jnp.bfloat16))(y),
                          jax.jit(lambda v: gelu_quant_xla(v, None, None, None, G128[name], jnp.bfloat16))(y),
                          HIDDEN // 128)):
        (q, s), (q0, s0) = got, want
        assert s.shape == s0.shape == (g, B * T)
        np.testing.assert_allclose(np.asarray(s), np.asarray(s0), rtol=2 ** -7)
        assert np.mean(_codes(q) == _codes(q0)) > 0.999


@pytest.mark.parametrize("dtype", [jnp.float8_e4m3fn, jnp.int8])
@pytest.mark.parametrize("k", [C, HIDDEN])
def test_group_scaled_gemm_matches_xla(k, dtype):
    """The Mosaic GPU GEMM with 128-wide group scales applied in its K loop, without and with the
    gated residual, against XLA's batched group product (float32 group products) + epilogue."""
    from qdit_jax.quant.kernels.scaled_gemm import scaled_gemm_applies, scaled_gemm_mosaic, scaled_gemm_xla

    r = np.random.default_rng(6)
    m, g = B * T, k // 128
    if not scaled_gemm_applies(m, C, k, dtype, dtype, groups=g, rows_per_gate=T)[0]:
        pytest.skip(scaled_gemm_applies(m, C, k, dtype, dtype, groups=g, rows_per_gate=T)[1])
    a, w = _random_codes(r, (m, k), dtype), _random_codes(r, (2 * C, k), dtype)
    # scales that differ a lot between groups, so a group scale applied to the wrong K step shows
    sa = jnp.asarray(r.uniform(0.001, 0.003, (g, m)) * r.uniform(0.1, 10, (g, 1)), jnp.float32)
    sw = jnp.asarray(r.uniform(0.001, 0.003, (g, 2 * C)) * r.uniform(0.1, 10, (g, 1)), jnp.float32)
    b = jnp.asarray(r.standard_normal(2 * C) * 0.1, jnp.float32)
    x = jnp.asarray(r.standard_normal((m, C)) * 4, jnp.bfloat16)
    gate = jnp.asarray(r.standard_normal((B, C)) * 0.5, jnp.bfloat16)
    kw = dict(n_off=C, n=C, residual=x, gate=gate)
    y0 = np.asarray(jax.jit(lambda *v: scaled_gemm_xla(*v, n_off=C, n=C))(a, w, sa, sw, b), np.float64)
    want = np.asarray(jax.jit(lambda *v: scaled_gemm_xla(*v, **kw))(a, w, sa, sw, b), np.float64)
    # x + gate * y: an ulp of y moves the sum by an ulp of its terms (more than one of the sum where
    # they cancel)
    terms = np.abs(np.asarray(x, np.float64)) + np.abs(np.repeat(np.asarray(gate, np.float64), T, axis=0) * y0)
    for mode in ("plain", "overlap", "split"):
        y = np.asarray(jax.jit(lambda *v: scaled_gemm_mosaic(*v, n_off=C, n=C, group_mode=mode))(a, w, sa, sw, b),
                       np.float64)
        assert np.abs(y0).max() > 1
        # float32 sums over groups in another order (and fp8 wgmma's accumulation): rarely a bf16 ulp
        assert np.mean(y == y0) > 0.99
        np.testing.assert_allclose(y, y0, rtol=2 ** -7, atol=2 ** -6)
        got = np.asarray(jax.jit(lambda *v: scaled_gemm_mosaic(*v, group_mode=mode, **kw))(a, w, sa, sw, b),
                         np.float64)
        assert np.mean(got == want) > 0.99
        assert np.all(np.abs(got - want) <= 2 ** -6 * terms + 2 ** -6)


def _fc1_group_operands(name: str, m: int, seed: int) -> tuple:
    """fc1's group-128 codes, scales and bias for ``m`` tokens (skips where the Mosaic GEMM does not apply)."""
    from qdit_jax.quant.kernels.scaled_gemm import scaled_gemm_applies

    dtype = jnp.int8 if name == "int8" else jnp.float8_e4m3fn
    r = np.random.default_rng(seed)
    g = C // 128
    if not scaled_gemm_applies(m, HIDDEN, C, dtype, dtype, groups=g)[0]:
        pytest.skip(scaled_gemm_applies(m, HIDDEN, C, dtype, dtype, groups=g)[1])
    a, w = _random_codes(r, (m, C), dtype), _random_codes(r, (HIDDEN, C), dtype)
    sa = jnp.asarray(r.uniform(0.001, 0.003, (g, m)), jnp.float32)
    sw = jnp.asarray(r.uniform(0.001, 0.003, (g, HIDDEN)) / 4, jnp.float32)
    b = jnp.asarray(r.standard_normal(HIDDEN) * 0.1, jnp.float32)
    return a, w, sa, sw, b


@pytest.mark.parametrize("mode", [None, "plain", "split"])
@pytest.mark.parametrize("name", sorted(G128))
def test_gelu_codes_epilogue_matches_xla(name, mode):
    """fc1 on group-wise codes writing fc2's 128-wide group codes from its epilogue (GELU, group
    abs-max, codes in registers) against the group GEMM's XLA formulation + gelu_quant's."""
    from qdit_jax.quant.kernels.scaled_gemm import scaled_gemm_mosaic, scaled_gemm_xla

    m = B * T
    a, w, sa, sw, b = _fc1_group_operands(name, m, 7)
    q, s = jax.jit(lambda *v: scaled_gemm_mosaic(*v, gelu_codes=G128[name], group_mode=mode))(a, w, sa, sw, b)
    q0, s0 = jax.jit(lambda *v: gelu_quant_xla(scaled_gemm_xla(*v), None, None, None, G128[name], jnp.bfloat16))(
        a, w, sa, sw, b)
    assert q.dtype == q0.dtype and s.shape == s0.shape == (HIDDEN // 128, m)
    # a group's abs-max from the float32 accumulator vs the bf16-rounded GEMM output (2^-8), and
    # for fp8 the tensor core's shorter accumulator where the group max is a cancellation of large
    # products (1 scale in 147,456 off by 1.3% on the H100): nearly all within 2^-7, all within 2^-4
    s, s0 = np.asarray(s), np.asarray(s0)
    assert np.mean(np.isclose(s, s0, rtol=2 ** -7, atol=0)) > 0.999
    np.testing.assert_allclose(s, s0, rtol=2 ** -4)
    assert np.mean(_codes(q) == _codes(q0)) > 0.99  # a bf16 ulp of the GEMM output may move a code


@pytest.mark.parametrize("fourth", [False, True])
@pytest.mark.parametrize("name", sorted(G128))
def test_float32_gelu_codes_match_a_float64_reference(name, fourth):
    """fc1's codes epilogue with ``gelu_mode='float32'`` (its GELU on the float32 sums, no bf16 roundings)
    against the GEMM, tanh GELU and group codes in float64: scales within the tanh.approx and accumulation
    error, codes equal but for rounding ties, and fewer codes off than the default bf16 evaluation. With
    ``fourth``, as the model runs it: int8 on the codes warpgroup (from its staged bf16 rows), fp8 with the
    store warpgroup."""
    from qdit_jax.quant.kernels.scaled_gemm import codes_wg_available, scaled_gemm_mosaic

    if fourth and not codes_wg_available():
        pytest.skip("this JAX's Pallas pipeline cannot bound the compute warpgroups' registers")
    spec, m = G128[name], 8 * T
    a, w, sa, sw, b = _fc1_group_operands(name, m, 12)
    kw = dict(codes_wg=fourth and name == "int8", store_wg=fourth and name != "int8")
    a64, w64 = (np.asarray(jnp.asarray(v).astype(jnp.float32), np.float64) for v in (a, w))
    sa64, sw64 = np.asarray(sa, np.float64), np.asarray(sw, np.float64)
    y = np.asarray(b, np.float64)[None, :] + sum(
        (a64[:, g * 128:(g + 1) * 128] @ w64[:, g * 128:(g + 1) * 128].T) * sa64[g][:, None] * sw64[g][None, :]
        for g in range(sa64.shape[0]))
    if kw["codes_wg"]:  # (the codes warpgroup takes the tile staged in bf16)
        y = np.asarray(jnp.asarray(y, jnp.float32).astype(jnp.bfloat16).astype(jnp.float32), np.float64)
    h = 0.5 * y * (1 + np.tanh(np.sqrt(2 / np.pi) * (y + 0.044715 * y ** 3)))
    s_ref = np.abs(h).reshape(m, -1, 128).max(axis=2).T / (127.0 if name == "int8" else 448.0)
    off = {}
    for gelu in ("float32", "dtype"):
        q, s = jax.jit(lambda *v, g=gelu: scaled_gemm_mosaic(*v, gelu_codes=spec, gelu_mode=g, **kw))(a, w, sa, sw, b)
        s = np.asarray(s, np.float64)
        x = h / np.repeat(s.T, 128, axis=1)  # the exact codes at the kernel's scales, before rounding
        want = np.round(x) if name == "int8" else _codes(jnp.asarray(x, jnp.float32).astype(jnp.float8_e4m3fn))
        off[gelu] = np.mean(_codes(q) != want)
        if gelu == "float32":
            assert np.mean(np.isclose(s, s_ref, rtol=2 ** -9, atol=0)) > 0.999
            np.testing.assert_allclose(s, s_ref, rtol=2 ** -4)
            assert off[gelu] < 0.02
    assert np.abs(_codes(q)).max() > 0
    assert off["float32"] < off["dtype"]


@pytest.mark.parametrize("mode", [None, "plain"])  # None: 'split'
@pytest.mark.parametrize("name", sorted(G128))
def test_codes_warpgroup_equals_the_immediate_epilogue(name, mode):
    """fc1's codes epilogue on a fourth warpgroup (``codes_wg``: the compute warpgroups stage their
    biased bf16 rows in two alternating shared-memory slots) writes exactly what the compute
    warpgroups' own epilogue writes: a slot handed over too early or a tile's rows / columns mixed up
    would show. At a size where the CTAs own unequal numbers of tiles."""
    from qdit_jax.quant.kernels.scaled_gemm import scaled_gemm_mosaic

    a, w, sa, sw, b = _fc1_group_operands(name, 35 * T, 11)  # 2,520 CTA tiles over 132 SMs: 19 or 20 each
    outs = [jax.jit(lambda *v, c=c: scaled_gemm_mosaic(*v, gelu_codes=G128[name], group_mode=mode,
                                                       codes_wg=c))(a, w, sa, sw, b) for c in (True, False)]
    (q, s), (q0, s0) = outs
    np.testing.assert_array_equal(np.asarray(s), np.asarray(s0))
    np.testing.assert_array_equal(_codes(q), _codes(q0))
    assert np.abs(_codes(q)).max() > 0  # not a tile of zeros


@pytest.mark.parametrize("groups", [1, 9])
@pytest.mark.parametrize("dtype", [jnp.float8_e4m3fn, jnp.int8])
def test_chained_pipeline_equals_per_tile_pipelines(dtype, groups):
    """One pipeline chained across each CTA's output tiles (the next tile's loads during this tile's
    last steps and epilogue) computes exactly what per-tile pipelines do: same products, same order,
    only the schedule differs; a slot or barrier phase off by one would mix tiles' operands. With the
    gated residual, at a size where every CTA owns several tiles of different lengths."""
    from qdit_jax.quant.kernels.scaled_gemm import (chained_steps, default_tiling, scaled_gemm_applies,
                                                    scaled_gemm_mosaic, scaled_gemm_xla)

    r = np.random.default_rng(8)
    batch = 33  # 8,448 rows: per channel 33 x 9 = 297 tiles over 132 SMs (2 or 3 tiles each)
    m, k = batch * T, C
    if not scaled_gemm_applies(m, C, k, dtype, dtype, groups=groups, rows_per_gate=T)[0]:
        pytest.skip(scaled_gemm_applies(m, C, k, dtype, dtype, groups=groups, rows_per_gate=T)[1])
    tile_m, depth = default_tiling(groups)
    assert chained_steps(k // 128, m // (2 * tile_m) * (C // 128), jax.devices()[0].core_count, depth, True)[1]
    a, w = _random_codes(r, (m, k), dtype), _random_codes(r, (C, k), dtype)
    shape = (m,) if groups == 1 else (groups, m)
    sa = jnp.asarray(r.uniform(0.001, 0.003, shape) * r.uniform(0.1, 10, shape[:-1] + (1,)), jnp.float32)
    sw = jnp.asarray(r.uniform(0.001, 0.003, shape[:-1] + (C,)), jnp.float32)
    b = jnp.asarray(r.standard_normal(C) * 0.1, jnp.float32)
    x = jnp.asarray(r.standard_normal((m, C)) * 4, jnp.bfloat16)
    g = jnp.asarray(r.standard_normal((batch, C)) * 0.5, jnp.bfloat16)
    for kw in ({}, dict(residual=x, gate=g)):
        chained, per_tile = (np.asarray(jax.jit(lambda *v, c=c: scaled_gemm_mosaic(*v, chain=c, **kw))(a, w, sa, sw, b),
                                        np.float32) for c in (True, False))
        want = np.asarray(jax.jit(lambda *v: scaled_gemm_xla(*v, **kw))(a, w, sa, sw, b), np.float32)
        assert np.abs(want).max() > 1
        np.testing.assert_array_equal(chained, per_tile)
        assert np.mean(chained == want) > 0.99


@pytest.mark.parametrize("w_kn", [True, False])
@pytest.mark.parametrize("k, n", [(C, C), (HIDDEN, C), (C, HIDDEN)])
def test_bf16_gemm_matches_xla(k, n, w_kn):
    """The bf16 form of the kernel (the float model's proj / fc2 with the gated residual; fc1's shape
    without) against ``gemm_bf16_xla``, on random bf16 data."""
    from qdit_jax.quant.kernels.scaled_gemm import bf16_gemm_applies, gemm_bf16_mosaic, gemm_bf16_xla

    r = np.random.default_rng(5)
    m = B * T
    ok, why = bf16_gemm_applies(m, n, k, rows_per_gate=T)
    if not ok:
        pytest.skip(why)
    a = jnp.asarray(r.standard_normal((m, k)), jnp.bfloat16)
    w = jnp.asarray(r.standard_normal((k, n) if w_kn else (n, k)) / np.sqrt(k), jnp.bfloat16)
    b = jnp.asarray(r.standard_normal(n) * 0.1, jnp.float32)
    x = jnp.asarray(r.standard_normal((m, n)) * 4, jnp.bfloat16)
    g = jnp.asarray(r.standard_normal((B, n)) * 0.5, jnp.bfloat16)
    for kw in ({}, dict(residual=x, gate=g)):
        got = np.asarray(jax.jit(lambda *v, kw=kw: gemm_bf16_mosaic(*v, w_kn=w_kn, **kw))(a, w, b), np.float32)
        want = np.asarray(jax.jit(lambda *v, kw=kw: gemm_bf16_xla(*v, w_kn=w_kn, **kw))(a, w, b), np.float32)
        assert np.abs(want).max() > 1
        assert np.mean(got == want) > 0.99  # the rest one bf16 ulp: float32 sums in another order
        np.testing.assert_allclose(got, want, rtol=2 ** -7, atol=2 ** -6)


@pytest.mark.parametrize("k", [C, HIDDEN])
def test_bf16_epilogue_warpgroup_equals_the_default(k):
    """The bf16 form with the bias and gated residual on the fourth warpgroup (``epilogue_wg``; the float
    model's proj / fc2 as ``quant.fused_float`` runs them): the same bits as the compute warpgroups' own
    epilogue."""
    from qdit_jax.quant.kernels.scaled_gemm import codes_wg_available, gemm_bf16_mosaic

    if not codes_wg_available():
        pytest.skip("this JAX's Pallas pipeline cannot bound the compute warpgroups' registers")
    r = np.random.default_rng(9)
    m = B * T
    a = jnp.asarray(r.standard_normal((m, k)), jnp.bfloat16)
    w = jnp.asarray(r.standard_normal((k, C)) / np.sqrt(k), jnp.bfloat16)
    b = jnp.asarray(r.standard_normal(C) * 0.1, jnp.float32)
    x = jnp.asarray(r.standard_normal((m, C)) * 4, jnp.bfloat16)
    g = jnp.asarray(r.standard_normal((B, C)) * 0.5, jnp.bfloat16)
    outs = [np.asarray(jax.jit(lambda *v, e=e: gemm_bf16_mosaic(*v, w_kn=True, residual=x, gate=g, epilogue_wg=e))(
        a, w, b), np.float32) for e in (False, True)]
    assert np.abs(outs[0]).max() > 1
    np.testing.assert_array_equal(outs[1], outs[0])
