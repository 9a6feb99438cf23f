"""The scaled fp8 GEMM's guard (the kernel itself needs a Hopper GPU: test_gpu_kernels.py) and its XLA
formulation against a float64 NumPy version of the same steps."""
from __future__ import annotations

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from qdit_jax.quant.kernels.scaled_gemm import bf16_gemm_applies, gemm_bf16_xla, scaled_gemm_applies, scaled_gemm_xla
from qdit_jax.quant.quantizers import QuantSpec

F8 = jnp.float8_e4m3fn


def test_guard_names_why():
    assert scaled_gemm_applies(65536, 1152, 1152, F8, F8, platform="gpu") == (True, "ok")
    assert "GPU-only" in scaled_gemm_applies(65536, 1152, 1152, F8, F8, platform="cpu")[1]
    assert scaled_gemm_applies(65536, 1152, 1152, jnp.int8, jnp.int8, platform="gpu") == (True, "ok")
    assert "int8 x int8" in scaled_gemm_applies(65536, 1152, 1152, jnp.int8, F8, platform="gpu")[1]
    assert "int8 x int8" in scaled_gemm_applies(65536, 1152, 1152, jnp.uint8, jnp.uint8, platform="gpu")[1]
    assert "multiple" in scaled_gemm_applies(65536, 1000, 1152, F8, F8, platform="gpu")[1]
    assert "multiple" in scaled_gemm_applies(100, 1152, 1152, F8, F8, platform="gpu")[1]


def test_bf16_guard_names_why():
    """The bf16 form steps K by 64 (128-byte rows of bf16), so K = 64 x odd fits it and not the codes form."""
    assert bf16_gemm_applies(65536, 1152, 1152, rows_per_gate=256, platform="gpu") == (True, "ok")
    assert bf16_gemm_applies(512, 256, 192, platform="gpu") == (True, "ok")
    assert not scaled_gemm_applies(512, 256, 192, F8, F8, platform="gpu")[0]
    assert "GPU-only" in bf16_gemm_applies(65536, 1152, 1152, platform="cpu")[1]
    assert "(256, 128, 64)" in bf16_gemm_applies(65536, 1152, 1000, platform="gpu")[1]
    assert "rows per gate" in bf16_gemm_applies(65536, 1152, 1152, rows_per_gate=64, platform="gpu")[1]


@pytest.mark.parametrize("w_kn", [False, True])
def test_bf16_xla_formulation(w_kn):
    """``gemm_bf16_xla`` (the bf16 kernel's reference): bf16(bf16(a @ w) + b), then the gated residual
    with each step rounded to bf16, against float64 NumPy."""
    r = np.random.default_rng(2)
    m, k, n_all, n_off, n, g_rows = 32, 64, 96, 32, 32, 4
    a = r.standard_normal((m, k)).astype(ml_dtypes.bfloat16)
    w = (r.standard_normal((k, n_all)) / 8).astype(ml_dtypes.bfloat16)
    b = r.standard_normal(n_all).astype(np.float32)
    x = (r.standard_normal((m, n)) * 4).astype(ml_dtypes.bfloat16)
    gate = r.standard_normal((g_rows, n)).astype(ml_dtypes.bfloat16)
    wj = jnp.asarray(w if w_kn else w.T)
    kw = dict(n_off=n_off, n=n, w_kn=w_kn)
    plain = np.asarray(gemm_bf16_xla(jnp.asarray(a), wj, jnp.asarray(b), **kw), np.float64)
    gated = np.asarray(gemm_bf16_xla(jnp.asarray(a), wj, jnp.asarray(b), residual=jnp.asarray(x),
                                     gate=jnp.asarray(gate), **kw), np.float64)

    def bf(v: np.ndarray) -> np.ndarray:
        return v.astype(ml_dtypes.bfloat16).astype(np.float64)

    f64 = np.float64
    y = bf(bf(a.astype(f64) @ w.astype(f64)[:, n_off:n_off + n]) + b[n_off:n_off + n])
    g = np.repeat(gate.astype(f64), m // g_rows, axis=0)
    want = bf(x.astype(f64) + bf(g * y))
    assert np.mean(plain == y) > 0.99 and np.mean(gated == want) > 0.99
    np.testing.assert_allclose(plain, y, rtol=2 ** -7)
    np.testing.assert_allclose(gated, want, rtol=2 ** -7, atol=2 ** -5)
    assert np.abs(want - x.astype(f64)).max() > 0.5  # the GEMM term is not negligible


def test_xla_formulation_is_bf16_product_then_scales():
    """Columns n_off:n_off+n of bf16(a @ w.T) * sa * sw + b, rounded to bf16, against float64 NumPy."""
    r = np.random.default_rng(0)
    m, k, n_all, n_off, n = 32, 64, 96, 32, 32
    a = jnp.asarray(r.integers(-16, 16, (m, k)), jnp.float32).astype(F8)  # exact in e4m3
    w = jnp.asarray(r.integers(-16, 16, (n_all, k)), jnp.float32).astype(F8)
    sa, sw = r.uniform(0.01, 0.02, m).astype(np.float32), r.uniform(0.01, 0.02, n_all).astype(np.float32)
    b = r.standard_normal(n_all).astype(np.float32)
    got = np.asarray(scaled_gemm_xla(a, w, jnp.asarray(sa), jnp.asarray(sw), jnp.asarray(b), n_off=n_off, n=n),
                     np.float64)

    def bf(v: np.ndarray) -> np.ndarray:
        return v.astype(ml_dtypes.bfloat16).astype(np.float64)

    p = bf(np.asarray(a, np.float64) @ np.asarray(w, np.float64).T)[:, n_off:n_off + n]
    want = bf(p * sa[:, None] * sw[None, n_off:n_off + n] + b[n_off:n_off + n])
    np.testing.assert_allclose(got, want, rtol=2 ** -8)
    assert np.mean(got == want) > 0.98


def test_xla_formulation_with_gated_residual():
    """residual + gate * y, each step rounded to bf16 as the DiT block computes it in bf16, with one
    gate row per sample (M // G consecutive rows), against float64 NumPy."""
    r = np.random.default_rng(1)
    m, k, n, g_rows = 32, 64, 32, 4
    a = jnp.asarray(r.integers(-16, 16, (m, k)), jnp.float32).astype(F8)
    w = jnp.asarray(r.integers(-16, 16, (n, k)), jnp.float32).astype(F8)
    sa, sw = r.uniform(0.01, 0.02, m).astype(np.float32), r.uniform(0.01, 0.02, n).astype(np.float32)
    b = r.standard_normal(n).astype(np.float32)
    x = r.standard_normal((m, n)).astype(ml_dtypes.bfloat16)
    gate = r.standard_normal((g_rows, n)).astype(ml_dtypes.bfloat16)
    got = np.asarray(scaled_gemm_xla(a, w, jnp.asarray(sa), jnp.asarray(sw), jnp.asarray(b), residual=jnp.asarray(x),
                                     gate=jnp.asarray(gate)), np.float64)

    def bf(v: np.ndarray) -> np.ndarray:
        return v.astype(ml_dtypes.bfloat16).astype(np.float64)

    y = bf(bf(np.asarray(a, np.float64) @ np.asarray(w, np.float64).T) * sa[:, None] * sw[None] + b)
    gr = np.repeat(gate.astype(np.float64), m // g_rows, axis=0)
    want = bf(x.astype(np.float64) + bf(gr * y))
    assert np.abs(want - x.astype(np.float64)).max() > 0.1
    np.testing.assert_allclose(got, want, rtol=2 ** -7, atol=2 ** -8)
    assert np.mean(got == want) > 0.95


def test_guard_checks_the_gate_rows():
    assert scaled_gemm_applies(65536, 1152, 1152, F8, F8, rows_per_gate=256, platform="gpu") == (True, "ok")
    assert "rows per gate" in scaled_gemm_applies(65536, 1152, 1152, F8, F8, rows_per_gate=64, platform="gpu")[1]


def test_guard_takes_128_wide_groups_only():
    assert scaled_gemm_applies(65536, 1152, 1152, F8, F8, groups=9, platform="gpu") == (True, "ok")
    assert scaled_gemm_applies(65536, 1152, 4608, jnp.int8, jnp.int8, groups=36, platform="gpu") == (True, "ok")
    assert "group size 128" in scaled_gemm_applies(65536, 1152, 1152, F8, F8, groups=18, platform="gpu")[1]
    assert "group size 128" in scaled_gemm_applies(65536, 1152, 1152, F8, F8, groups=3, platform="gpu")[1]
    # group scales run 64-row warpgroup tiles: gates every 64 rows fit, every 32 do not
    assert scaled_gemm_applies(65536, 1152, 1152, F8, F8, groups=9, rows_per_gate=64, platform="gpu")[0]
    assert "rows per gate" in scaled_gemm_applies(65536, 1152, 1152, F8, F8, groups=9, rows_per_gate=32,
                                                  platform="gpu")[1]


@pytest.mark.parametrize("dtype", [F8, jnp.int8])
def test_xla_formulation_with_group_scales(dtype):
    """Group scales: sum over 128-wide K groups of (a_g @ w_g.T) * sa[g] * sw[g] (each group's product
    in float32), + b, rounded to bf16, then the gated residual; against float64 NumPy."""
    r = np.random.default_rng(2)
    m, g, n_all, n_off, n, g_rows = 32, 3, 96, 32, 32, 4
    k = 128 * g
    lim = 16 if dtype == F8 else 127
    a = jnp.asarray(r.integers(-lim, lim, (m, k)), jnp.float32).astype(dtype)
    w = jnp.asarray(r.integers(-lim, lim, (n_all, k)), jnp.float32).astype(dtype)
    sa, sw = r.uniform(0.01, 0.02, (g, m)).astype(np.float32), r.uniform(0.01, 0.02, (g, n_all)).astype(np.float32)
    b = r.standard_normal(n_all).astype(np.float32)
    x = r.standard_normal((m, n)).astype(ml_dtypes.bfloat16)
    gate = r.standard_normal((g_rows, n)).astype(ml_dtypes.bfloat16)
    args = (a, w, jnp.asarray(sa), jnp.asarray(sw), jnp.asarray(b))
    got = np.asarray(scaled_gemm_xla(*args, n_off=n_off, n=n), np.float64)
    got_r = np.asarray(scaled_gemm_xla(*args, n_off=n_off, n=n, residual=jnp.asarray(x), gate=jnp.asarray(gate)),
                       np.float64)

    def bf(v: np.ndarray) -> np.ndarray:
        return v.astype(ml_dtypes.bfloat16).astype(np.float64)

    a64, w64 = np.asarray(a, np.float64).reshape(m, g, 128), np.asarray(w, np.float64)[n_off:n_off + n].reshape(n, g, 128)
    parts = np.einsum("mgk,ngk->gmn", a64, w64)  # exact: integers below 2^24
    y = (parts * sa[:, :, None] * sw[:, None, n_off:n_off + n]).sum(0) + b[n_off:n_off + n]
    np.testing.assert_allclose(got, bf(y), rtol=2 ** -8)
    assert np.mean(got == bf(y)) > 0.95
    gr = np.repeat(gate.astype(np.float64), m // g_rows, axis=0)
    want_r = bf(x.astype(np.float64) + bf(gr * bf(y)))
    np.testing.assert_allclose(got_r, want_r, rtol=2 ** -7, atol=2 ** -7)
    # a per-channel reading of the same scales (the first group's rows only) would be far off
    assert np.abs(got - bf(parts.sum(0) * sa[0][:, None] * sw[0][None, n_off:n_off + n])).max() > 0.1


def test_kernel_rejects_scales_that_do_not_match_k():
    a = jnp.zeros((256, 256), F8)
    with pytest.raises(ValueError, match="K = G x 128"):
        from qdit_jax.quant.kernels.scaled_gemm import scaled_gemm_mosaic

        scaled_gemm_mosaic(a, jnp.zeros((128, 256), F8), jnp.ones((4, 256)), jnp.ones((4, 128)), None)


@pytest.mark.parametrize("fmt", ["int", "fp8_e4m3"])
def test_gelu_codes_epilogue_math_equals_gelu_quant(fmt):
    """The fc1 epilogue's per-tile math (``_gelu_group_codes``, plain jnp: the kernel runs the same ops
    on its register tile) against gelu_quant's XLA formulation of the next layer's group codes."""
    from qdit_jax.quant.kernels.gelu_quant import gelu_quant_xla
    from qdit_jax.quant.kernels.scaled_gemm_body import gelu_group_codes as _gelu_group_codes
    from qdit_jax.quant.quantizers import QuantSpec

    spec = QuantSpec(bits=8, format=fmt, group_size=128, symmetric=True)
    r = np.random.default_rng(5)
    y = (r.standard_normal((64, 128)) * r.uniform(0.2, 5, (64, 1))).astype(np.float32)  # rows of unequal range
    q0, s0 = gelu_quant_xla(jnp.asarray(y, jnp.bfloat16), None, None, None, spec, jnp.bfloat16)
    want = np.asarray(q0.astype(jnp.float32))
    assert np.abs(want).max(axis=1).min() >= (127 if fmt == "int" else 448)
    # the tile whole, and in two column halves ('split' mode: the row max spans both)
    for parts in ([jnp.asarray(y)], [jnp.asarray(y[:, :64]), jnp.asarray(y[:, 64:])]):
        s, codes = _gelu_group_codes(parts, spec)
        assert len(codes) == len(parts)
        np.testing.assert_allclose(np.asarray(s), np.asarray(s0)[0], rtol=1e-6)
        got = np.concatenate([np.asarray(c.astype(q0.dtype).astype(jnp.float32)) for c in codes], axis=1)
        assert np.mean(got == want) > 0.999
        # the codes are left unclipped (the bound makes the clip a no-op): never past the largest code
        raw = np.concatenate([np.asarray(c) for c in codes], axis=1)
        if fmt == "fp8_e4m3":  # (+ rounding; the store's conversion saturates there)
            assert 447.9 < np.abs(raw).max() <= 448 * (1 + 2**-20)
        else:
            assert np.abs(raw).max() == 127 and raw.min() >= -127


@pytest.mark.parametrize("fmt", ["int", "fp8_e4m3"])
def test_float32_gelu_codes_match_a_float64_reference(fmt):
    """``gelu_mode='float32'`` (the codes epilogue's GELU on the float32 sums, no bf16 roundings) against
    the tanh GELU and symmetric group codes computed in float64 from the same sums: scales within float32
    rounding, codes equal but for rounding ties, fewer of them off than with the default evaluation's
    (every step rounded to bf16)."""
    from qdit_jax.quant.kernels.scaled_gemm_body import gelu_group_codes
    from qdit_jax.quant.quantizers import QuantSpec

    spec = QuantSpec(bits=8, format=fmt, group_size=128, symmetric=True)
    qmax = 127.0 if fmt == "int" else 448.0
    r = np.random.default_rng(6)
    y = (r.standard_normal((64, 128)) * r.uniform(0.2, 5, (64, 1))).astype(np.float32)
    y64 = y.astype(np.float64)
    h = 0.5 * y64 * (1 + np.tanh(np.sqrt(2 / np.pi) * (y64 + 0.044715 * y64 ** 3)))
    s_ref = np.abs(h).max(axis=1) / qmax
    x = h / s_ref[:, None]  # the exact codes before rounding

    def codes(q: np.ndarray) -> np.ndarray:
        return np.round(q) if fmt == "int" else np.asarray(q, np.float32).astype(jnp.float8_e4m3fn).astype(np.float64)

    want = codes(x)
    err = {}
    for mode in ("float32", "dtype"):
        for parts in ([jnp.asarray(y)], [jnp.asarray(y[:, :64]), jnp.asarray(y[:, 64:])]):
            s, q = gelu_group_codes(parts, spec, mode)
            got = codes(np.concatenate([np.asarray(c, np.float64) for c in q], axis=1))
            if mode == "float32":
                np.testing.assert_allclose(np.asarray(s), s_ref, rtol=2e-6)
                assert np.mean(got == want) > 0.995
            err[mode] = np.mean(got != want)
    assert err["float32"] < 0.5 * err["dtype"]


def test_gelu_mode_is_checked(monkeypatch):
    """An unknown GELU mode, or 'float32' without the codes epilogue it belongs to, is refused by name."""
    from qdit_jax.quant.kernels.scaled_gemm import scaled_gemm_mosaic
    from qdit_jax.quant.quantizers import QuantSpec

    a, w = jnp.zeros((256, 256), F8), jnp.zeros((512, 256), F8)
    sa, sw = jnp.ones((2, 256)), jnp.ones((2, 512))
    spec = QuantSpec(bits=8, format="fp8_e4m3", group_size=128, symmetric=True)
    with pytest.raises(ValueError, match="gelu_mode 'bf16'"):
        scaled_gemm_mosaic(a, w, sa, sw, None, gelu_codes=spec, gelu_mode="bf16")
    with pytest.raises(ValueError, match="only with gelu_codes"):
        scaled_gemm_mosaic(a, w, sa, sw, None, gelu_mode="float32")


def test_gelu_codes_needs_group_wise_8_bit_spec():
    from qdit_jax.quant.kernels.scaled_gemm import scaled_gemm_mosaic
    from qdit_jax.quant.quantizers import QuantSpec

    a = jnp.zeros((256, 256), F8)
    args = (a, jnp.zeros((256, 256), F8), jnp.ones((2, 256)), jnp.ones((2, 256)), None)
    with pytest.raises(ValueError, match="gelu_codes"):
        scaled_gemm_mosaic(*args, gelu_codes=QuantSpec(bits=8, group_size=0, symmetric=True))
    with pytest.raises(ValueError, match="gelu_codes"):
        scaled_gemm_mosaic(*args, gelu_codes=QuantSpec(bits=8, group_size=128, symmetric=False))


def test_group_modes_default_to_split_and_reject_unknown_ones():
    """Per channel has no group mode; group scales default to 'split' for fp8 and int8 (the faster on the
    H100); another can be asked for; anything else is named in an error."""
    from qdit_jax.quant.kernels.scaled_gemm import GROUP_MODES, group_mode_for

    assert group_mode_for(1) is None and group_mode_for(1, "overlap") is None
    assert group_mode_for(2) == "split" and group_mode_for(36) == "split"
    assert group_mode_for(8, "overlap") == "overlap"
    assert group_mode_for(36, "plain") == "plain"
    assert set(GROUP_MODES) == {"plain", "overlap", "split"}
    with pytest.raises(ValueError, match="overlap"):
        group_mode_for(2, "zigzag")


def test_out_blocks_and_prefetch_are_checked():
    """Three outputs need whole tiles per output and no residual / codes epilogue; prefetch modes are named."""
    from qdit_jax.quant.kernels.scaled_gemm import scaled_gemm_mosaic

    args = (jnp.zeros((256, 256), F8), jnp.zeros((384, 256), F8), jnp.ones((256,)), jnp.ones((384,)), None)
    with pytest.raises(ValueError, match="out_blocks 3"):  # 384 / 3 = 128 columns each is fine, 256 is not
        scaled_gemm_mosaic(*args, n=256, out_blocks=3)
    with pytest.raises(ValueError, match="out_blocks 2"):
        scaled_gemm_mosaic(*args, n=256, out_blocks=2, residual=jnp.zeros((256, 256), jnp.bfloat16),
                           gate=jnp.zeros((1, 256), jnp.bfloat16))
    with pytest.raises(ValueError, match="prefetch must be one of"):
        scaled_gemm_mosaic(*args, prefetch="early")


def test_epilogue_warpgroup_is_checked():
    """The per-channel epilogue warpgroup stages the fp8 product in bf16: int8 codes (int32 sums) per
    channel, a residual with more than one gate row per 256-row CTA tile, or a codes epilogue are refused
    with a message naming the option (group scales, fp8 or int8, stage a float32 sum: allowed)."""
    from qdit_jax.quant.kernels.scaled_gemm import scaled_gemm_mosaic

    f8 = (jnp.zeros((256, 256), F8), jnp.zeros((256, 256), F8))
    i8 = (jnp.zeros((256, 256), jnp.int8), jnp.zeros((256, 256), jnp.int8))
    per_channel, groups = (jnp.ones((256,)), jnp.ones((256,))), (jnp.ones((2, 256)), jnp.ones((2, 256)))
    # a gate row per 128 rows: the two warpgroups' halves of a 256-row tile would take different gates
    res = dict(residual=jnp.zeros((256, 256), jnp.bfloat16), gate=jnp.zeros((2, 256), jnp.bfloat16))
    codes = dict(gelu_codes=QuantSpec(bits=8, format="fp8_e4m3", group_size=128, symmetric=True))
    for ops, scales, kw in ((i8, per_channel, {}), (f8, groups, codes)):
        with pytest.raises(ValueError, match="epilogue_wg takes fp8 codes per channel"):
            scaled_gemm_mosaic(*ops, *scales, None, epilogue_wg=True, **kw)
    with pytest.raises(ValueError, match="epilogue_wg with a residual needs one gate row per CTA tile of 256 rows"):
        scaled_gemm_mosaic(*f8, *per_channel, None, epilogue_wg=True, **res)
