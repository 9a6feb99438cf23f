"""The float DiT with the gated residuals in its GEMMs' epilogues (``quant.fused_float``): on a CPU
the route stays off and the output is the model's; with the kernel stood in for by its XLA
reference, every block's proj and fc2 take the route and the output stays the model's; on a Hopper
GPU, the real kernel against the model as written."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qdit_jax.models.dit import DiT, dit_config, init_params
from qdit_jax.quant import fused_float as ff
from qdit_jax.quant.kernels.scaled_gemm import gemm_bf16_xla
from qdit_jax.quant.runtime import with_compute_params


def _model(depth: int = 2, **kw):
    cfg = dit_config("S/2", dtype="bfloat16", **kw).replace(depth=depth)
    params = init_params(cfg, jax.random.PRNGKey(0))
    # adaLN-Zero starts at zero gates: give every layer weights so the residual branches count
    params = jax.tree_util.tree_map(lambda p: p + 0.02 * jax.random.normal(jax.random.PRNGKey(1), p.shape, p.dtype),
                                    params)
    r = np.random.default_rng(0)
    x = jnp.asarray(r.standard_normal((2, cfg.input_size, cfg.input_size, cfg.in_channels)), jnp.float32)
    t = jnp.asarray([10, 500], jnp.int32)
    y = jnp.asarray([3, 7], jnp.int32)
    return cfg, with_compute_params(params, cfg), (x, t, y)


def _rel(a: jax.Array, b: jax.Array) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="on a GPU the route may apply")
def test_auto_is_the_model_where_the_kernel_cannot_run():
    cfg, params, args = _model()
    want = DiT(cfg).apply({"params": params}, *args)
    np.testing.assert_array_equal(np.asarray(ff.fused_float_apply_fn(cfg)(params, *args)), np.asarray(want))
    with pytest.raises(ValueError, match="GPU-only"):
        ff.fused_float_apply_fn(cfg, "mosaic")(params, *args)


def test_bad_choice_names_the_choices():
    with pytest.raises(ValueError, match="residual_gemm must be one of"):
        ff.fused_float_apply_fn(dit_config("S/2"), "cublas")


def test_every_block_routes_proj_and_fc2_through_the_kernel(monkeypatch):
    """The kernel stood in for by its reference: 2 calls a block (proj with the attention's residual,
    fc2 with the MLP's), each with the Dense's own input and weights (K, N), and the model's output."""
    cfg, params, args = _model(depth=3)
    calls = []

    def stand_in(a, w, bias, **kw):
        calls.append((a.shape, w.shape, kw["w_kn"], kw["residual"].shape))
        return gemm_bf16_xla(a, w, bias, **kw)

    monkeypatch.setattr(ff, "bf16_gemm_applies", lambda *a, **k: (True, "ok"))
    monkeypatch.setattr(ff, "gemm_bf16_mosaic", stand_in)
    got = jax.jit(ff.fused_float_apply_fn(cfg, "mosaic"))(params, *args)
    want = DiT(cfg).apply({"params": params}, *args)
    c, m = cfg.hidden_size, 2 * (cfg.input_size // cfg.patch_size) ** 2
    assert calls == [((m, c), (c, c), True, (m, c)), ((m, cfg.mlp_hidden), (cfg.mlp_hidden, c), True, (m, c))] * 3
    assert _rel(got, want) < 2e-2  # bf16 roundings in another order (the model's own bf16 noise)


def test_the_epilogue_warpgroup_reaches_the_kernel_where_a_gate_row_spans_a_tile(monkeypatch):
    """``fused_float_apply_fn(epilogue_wg=True)`` asks the kernel for its fourth warpgroup on every
    residual GEMM whose gate rows span the CTA tiles, and not where they do not; off by default."""
    cfg, params, args = _model(depth=2)
    seen = []

    def stand_in(a, w, bias, *, epilogue_wg=False, **kw):
        seen.append(epilogue_wg)
        return gemm_bf16_xla(a, w, bias, **kw)

    monkeypatch.setattr(ff, "bf16_gemm_applies", lambda *a, **k: (True, "ok"))
    monkeypatch.setattr(ff, "gemm_bf16_mosaic", stand_in)
    want = np.asarray(jax.jit(ff.fused_float_apply_fn(cfg, "mosaic"))(params, *args))
    assert seen == [False] * 4
    for fits in (True, False):
        seen.clear()
        monkeypatch.setattr(ff, "epilogue_wg_residual_fits", lambda m, rows, fits=fits: fits)
        got = np.asarray(jax.jit(ff.fused_float_apply_fn(cfg, "mosaic", epilogue_wg=True))(params, *args))
        assert seen == [fits] * 4
        np.testing.assert_array_equal(got, want)  # the stand-in computes the same either way


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="the Mosaic GPU kernel: Hopper only")
def test_on_hopper_the_kernel_is_as_close_to_float32_as_the_model():
    """XL/2's width at two blocks: the fused bf16 forward and the bf16 model as written, each against
    the float32 model; the fused one no further from it than bf16 rounding allows."""
    if not ff.kernel_available():
        pytest.skip("not a Hopper GPU with Pallas Mosaic GPU")
    cfg, params, args = _model(depth=2)
    cfg = cfg.replace(hidden_size=1152, num_heads=16)
    params = with_compute_params(init_params(cfg, jax.random.PRNGKey(0)), cfg)
    params = jax.tree_util.tree_map(lambda p: p + 0.02 * jax.random.normal(jax.random.PRNGKey(1), p.shape, p.dtype),
                                    params)
    x = jnp.tile(args[0], (8, 1, 1, 1))
    t, y = jnp.tile(args[1], 8), jnp.tile(args[2], 8)
    f32 = cfg.replace(dtype="float32")
    ref = DiT(f32).apply({"params": jax.tree_util.tree_map(lambda p: p.astype(jnp.float32), params)}, x, t, y)
    fused = jax.jit(ff.fused_float_apply_fn(cfg, "mosaic"))(params, x, t, y)
    plain = jax.jit(ff.fused_float_apply_fn(cfg, "xla"))(params, x, t, y)
    def kernels(choice: str) -> int:  # Mosaic calls in the compiled program (the attention's too)
        return jax.jit(ff.fused_float_apply_fn(cfg, choice)).lower(params, x, t, y).compile().as_text().count(
            'custom_call_target="mosaic_gpu')

    assert kernels("mosaic") - kernels("xla") == 2 * cfg.depth
    assert _rel(fused, ref) < 1.5 * _rel(plain, ref) + 1e-3
    assert _rel(fused, plain) < 2e-2


def test_shapes_the_kernel_refuses_run_as_written_or_fail_when_forced(monkeypatch):
    """Where the guard refuses a layer, 'auto' leaves that residual to the model (no kernel call) and
    'mosaic' raises naming the guard's reason."""
    cfg, params, args = _model()
    monkeypatch.setattr(ff, "kernel_available", lambda: True)
    monkeypatch.setattr(ff, "bf16_gemm_applies", lambda *a, **k: (False, "rows per gate: 7"))
    monkeypatch.setattr(ff, "gemm_bf16_mosaic", lambda *a, **k: pytest.fail("the kernel was called"))
    want = DiT(cfg).apply({"params": params}, *args)
    np.testing.assert_array_equal(np.asarray(ff.fused_float_apply_fn(cfg, "auto")(params, *args)), np.asarray(want))
    with pytest.raises(ValueError, match="residual_gemm='mosaic': rows per gate: 7"):
        ff.fused_float_apply_fn(cfg, "mosaic")(params, *args)
