"""The attention kernel that writes the output projection's group codes (``kernels.attention_codes``): its
plan of head groups and quantization groups, its guard, its lowering for CUDA on any machine, the real
interceptor's route to it (a stand-in on the CPU), and, on a Hopper GPU, its codes and scales against the
unfused path (the Mosaic attention kernel, then ``kernels.norm_quant``'s pass over its bf16 output)."""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qdit_jax.models import attention_mosaic as am
from qdit_jax.perf.device import is_hopper
from qdit_jax.quant.kernels import attention_codes as ac
from qdit_jax.quant.quantizers import QuantSpec

on_hopper = jax.default_backend() == "gpu" and is_hopper()
SPECS = {"fp8": QuantSpec(bits=8, group_size=128, symmetric=True, format="fp8_e4m3"),
         "int8": QuantSpec(bits=8, group_size=128, symmetric=True)}


class _H100:
    core_count = 132
    compute_capability = "9.0"


@pytest.mark.parametrize("width,head_group,group", [(1152, 144, 128), (256, 64, 128), (1024, 64, 128),
                                                     (2304, 144, 128), (4096, 64, 128), (1152, 144, 1152 // 8)])
def test_plan_covers_each_column_once_and_writes_each_head_group_after_its_groups(width, head_group, group):
    plan = ac.codes_plan(width, head_group, group)
    heads = width // head_group
    owner = np.full(width, -1)
    for h, pieces in enumerate(plan.pieces):
        for q, lo, hi in pieces:
            assert 0 <= lo < hi <= head_group
            assert (owner[h * head_group + lo:h * head_group + hi] == -1).all()
            owner[h * head_group + lo:h * head_group + hi] = q
    assert (owner == np.arange(width) // group).all()  # every column in its own group, once
    done_at = {q: h for h, qs in enumerate(plan.done) for q in qs}
    assert sorted(done_at) == list(range(width // group)) == list(range(plan.groups))
    for q, h in done_at.items():  # complete once the head group holding its last column is
        assert h == ((q + 1) * group - 1) // head_group
    emitted = [e for es in plan.emit for e in es]
    assert sorted(emitted) == list(range(heads))  # each head group's codes written once
    for h, es in enumerate(plan.emit):
        for e in es:
            assert e in (h - 1, h) and all(done_at[q] <= h for q, _, _ in plan.pieces[e])


def test_plan_refuses_what_the_kernel_cannot_hold():
    assert "divide the width" in ac.codes_plan(1152, 144, 100)
    assert "more than two head groups" in ac.codes_plan(1152, 144, 1152)
    assert "more than two groups" in ac.codes_plan(1152, 144, 64)


def test_guard_names_what_it_refuses():
    assert ac.attention_codes_applies((2, 256, 16, 72), jnp.bfloat16, SPECS["fp8"], platform="gpu") == (True, "ok")
    assert ac.attention_codes_applies((2, 256, 4, 64), jnp.bfloat16, SPECS["int8"], platform="gpu") == (True, "ok")
    cases = {((2, 256, 16, 72), SPECS["fp8"], "cpu"): "GPU-only",
             ((2, 256, 16, 80), SPECS["fp8"], "gpu"): "head size 80",
             ((2, 256, 16, 72), QuantSpec(bits=8, group_size=0, symmetric=True), "gpu"): "per-token",
             ((2, 256, 16, 72), QuantSpec(bits=8, group_size=128, symmetric=False), "gpu"): "symmetric",
             ((2, 256, 16, 72), QuantSpec(bits=4, group_size=128, symmetric=True), "gpu"): "4 bits",
             ((2, 256, 16, 72), QuantSpec(bits=8, group_size=100, symmetric=True), "gpu"): "divide the width"}
    for (shape, spec, platform), why in cases.items():
        ok, got = ac.attention_codes_applies(shape, jnp.bfloat16, spec, platform=platform)
        assert not ok and why in got, (shape, spec, got)
    with pytest.raises(ValueError, match="per-token"):
        q = jnp.zeros((1, 256, 16, 72), jnp.bfloat16)
        ac.attention_codes(q, q, q, QuantSpec(bits=8, group_size=0, symmetric=True))


@pytest.mark.parametrize("name", sorted(SPECS))
@pytest.mark.parametrize("d,heads", [(72, 16), (64, 4)])
def test_kernel_lowers_for_cuda_as_one_mosaic_call(name, d, heads, monkeypatch):
    """The whole Pallas -> Mosaic GPU lowering succeeds (a loop over the head groups, the codes' boxes at
    16-byte column starts), one kernel writing the codes and the (groups, tokens) scales."""
    monkeypatch.setattr(jax, "devices", lambda *a: [_H100()])
    sds = jax.ShapeDtypeStruct((2, 256, heads, d), jnp.bfloat16)
    text = ac._attention_codes.trace(sds, sds, sds, SPECS[name]).lower(lowering_platforms=("cuda",)).as_text()
    calls = re.findall(r"stablehlo.custom_call @mosaic_gpu[^\n]*", text)
    assert len(calls) == 1, calls
    code = "f8E4M3FN" if name == "fp8" else "i8"
    assert f"tensor<2x256x{heads * d}x{code}>" in calls[0] and f"tensor<{heads * d // 128}x512xf32>" in calls[0]


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="a CPU stand-in for the kernel; on a GPU "
                    "test_real_model_with_attention_codes_matches_the_unfused_route runs the kernel itself")
@pytest.mark.parametrize("fmt", ["fp8_e4m3", "int"])
def test_real_proj_takes_its_codes_from_the_attention_route(fmt, monkeypatch):
    """With the GPU guard forced open and the kernel replaced by a stand-in computing what it must (the
    attention output quantized as the unfused path does), the proj layer's codes come from the attention
    call (once per block, with that block's q, k, v) and the model's output equals the unfused route's
    (RealOptions(attention_codes=False)) bit for bit; the route also holds with the attention core's inputs
    quantized (``quantize_attention``)."""
    from qdit_jax.models.dit import AttentionCore, DiTConfig, param_shapes
    from qdit_jax.quant.config import QuantConfig, qdit_rules
    from qdit_jax.quant.real import RealOptions, real_from_params
    from qdit_jax.quant.real_layers import quantize_act

    cfg = DiTConfig(input_size=32, patch_size=2, in_channels=1, hidden_size=256, depth=2, num_heads=4,
                    num_classes=10, dtype="bfloat16")  # 256 tokens, heads of 64: the kernel's shapes
    r = np.random.default_rng(0)
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(0.05 * r.standard_normal(a.shape), jnp.float32),
                                    param_shapes(cfg))
    inputs = (jnp.asarray(r.standard_normal((2, 32, 32, 1)), jnp.float32), jnp.asarray([10, 500]),
              jnp.asarray([1, 3]))
    calls = []

    def stand_in(q, k, v, spec):
        calls.append((q.shape, spec.group_size))
        o = AttentionCore(cfg.attention).apply({}, q, k, v)  # the model's own attention (Mosaic on Hopper)
        codes, scales = quantize_act(o.reshape(-1, o.shape[-1]), spec, spec.group_size)
        return codes.reshape(o.shape), scales

    monkeypatch.setattr(ac, "attention_codes_applies", lambda *a, **k: (True, "ok"))
    monkeypatch.setattr(ac, "attention_codes", stand_in)
    for attention in (False, True):
        rules = dict(wbits=8, abits=8, w_group=128, a_group=128, w_sym=True, a_sym=True, fmt=fmt,
                     quantize_attention=attention)
        rm = real_from_params(params, cfg, QuantConfig(qdit_rules(**rules)))
        ref = np.asarray(jax.jit(rm.apply_fn(RealOptions(attention_codes=False)))(rm.variables(), *inputs))
        assert not calls
        got = np.asarray(jax.jit(rm.apply_fn(RealOptions(attention_codes=True)))(rm.variables(), *inputs))
        assert calls == [((2, 256, 4, 64), 128)] * cfg.depth
        calls.clear()
        jax.make_jaxpr(rm.apply_fn(RealOptions()))(rm.variables(), *inputs)  # off by default
        assert not calls
        np.testing.assert_array_equal(got, ref)
        # and the route matters: codes from a wrong attention output change the model's
        monkeypatch.setattr(ac, "attention_codes", lambda q, k, v, spec: stand_in(q, v, k, spec))
        bad = np.asarray(jax.jit(rm.apply_fn(RealOptions(attention_codes=True)))(rm.variables(), *inputs))
        monkeypatch.setattr(ac, "attention_codes", stand_in)
        calls.clear()
        assert np.abs(bad.astype(np.float64) - ref).max() > 1e-3


def _qkv(shape, seed):
    r = np.random.default_rng(seed)
    return tuple(jnp.asarray(r.standard_normal(shape) * s, jnp.bfloat16) for s in (1.0, 1.0, 2.0))


@pytest.mark.skipif(not on_hopper, reason="runs the Mosaic GPU kernel: Hopper only")
@pytest.mark.parametrize("name", sorted(SPECS))
@pytest.mark.parametrize("b,heads,d", [(3, 16, 72), (2, 4, 64), (35, 16, 72)])
def test_codes_equal_the_unfused_path(name, b, heads, d):
    """The kernel's codes and scales against the attention kernel's bf16 output quantized by the quantize
    pass (``norm_quant``): scales equal up to the division's ulp, codes equal but where the division's last
    ulp moves a rounding (one code step then); and the scales are right where it matters, each row of
    each group reaching the top code. 35 samples: CTAs own unequal item counts."""
    from qdit_jax.quant.kernels.norm_quant import norm_quant_pallas

    spec = SPECS[name]
    q, k, v = _qkv((b, 256, heads, d), seed=b + d)
    c, s = ac.attention_codes(q, k, v, spec)
    o = am.attention_mosaic(q, k, v)
    c0, s0 = norm_quant_pallas(o.reshape(-1, heads * d), spec)
    assert c.shape == (b, 256, heads * d) and s.shape == s0.shape == (heads * d // 128, b * 256)
    s, s0 = np.asarray(s, np.float64), np.asarray(s0, np.float64)
    np.testing.assert_allclose(s, s0, rtol=3e-7)
    got = np.asarray(c.astype(jnp.float32), np.float64).reshape(-1, heads * d)
    want = np.asarray(c0.astype(jnp.float32), np.float64)
    assert np.mean(got == want) > 0.999, np.mean(got == want)
    assert np.all(np.abs(got - want) <= np.maximum(np.abs(want) * 2 ** -3, 1.0))
    top = 448 if name == "fp8" else 127
    groups = np.abs(got).reshape(b * 256, -1, 128).max(axis=2)
    assert (groups == top).mean() > 0.999
    # dequantized, the codes are the attention output to within the format's rounding
    scale = np.repeat(s.T, 128, axis=1)
    ref = np.asarray(o.astype(jnp.float32), np.float64).reshape(b * 256, -1) / scale  # in code units
    # half a step: int8 0.5; e4m3 2^-4 of the value (3 mantissa bits), 2^-10 among the subnormals
    half = 0.5 if name == "int8" else np.maximum(np.abs(ref) * 2.0 ** -4, 2.0 ** -10)
    assert np.all(np.abs(got - ref) <= half * (1 + 1e-5) + 1e-6)


@pytest.mark.skipif(not on_hopper, reason="runs the Mosaic GPU kernel: Hopper only")
def test_real_model_with_attention_codes_matches_the_unfused_route():
    """A bf16 DiT with XL/2's width and heads (one block): the real fp8 g128 forward with proj's codes from
    the attention kernel equals the unfused route's but where a division's ulp moved a code."""
    from qdit_jax.models.dit import DiTConfig, init_params
    from qdit_jax.quant.config import QuantConfig, qdit_rules
    from qdit_jax.quant.real import RealOptions, real_from_params

    cfg = DiTConfig(input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=1, num_heads=16,
                    num_classes=10, dtype="bfloat16")
    params = init_params(cfg, jax.random.PRNGKey(0))
    params = jax.tree_util.tree_map(lambda a: a + 0.02 * jax.random.normal(jax.random.PRNGKey(1), a.shape, a.dtype),
                                    params)  # adaLN-Zero's zeros would make the block an identity
    rm = real_from_params(params, cfg, QuantConfig(qdit_rules(wbits=8, abits=8, w_group=128, a_group=128,
                                                              w_sym=True, a_sym=True, fmt="fp8_e4m3")))
    r = np.random.default_rng(2)
    inputs = (jnp.asarray(r.standard_normal((4, 32, 32, 4)), jnp.float32), jnp.asarray([10, 500, 20, 900]),
              jnp.asarray([1, 3, 5, 7]))
    outs = []
    for flag in (True, False):  # one attention kernel: writing the codes, or bf16
        fn = jax.jit(rm.apply_fn(RealOptions(attention_codes=flag))).lower(rm.variables(), *inputs).compile()
        calls = [ln for ln in fn.as_text().splitlines() if "custom-call(" in ln and "attention_mosaic" in ln]
        assert len(calls) == 1 and ("f8e4m3fn[4,256,1152]" in calls[0]) == flag, calls
        outs.append(np.asarray(fn(rm.variables(), *inputs), np.float64))
    got, ref = outs
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1e-3
