"""The Mosaic GPU attention kernel (``models.attention_mosaic``): its guard, its lowering for CUDA on any
machine (Pallas -> Mosaic GPU, layouts inferred, TMA boxes on tile boundaries), the model's routing to
it, and, on a Hopper GPU, its outputs against a float64 NumPy attention."""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qdit_jax.errors import QditError
from qdit_jax.models import attention_kernel as ak
from qdit_jax.models import attention_mosaic as am
from qdit_jax.models.dit import AttentionCore
from qdit_jax.perf.device import is_hopper
from tests.models.test_attention_kernel import _f64, _qkv

on_hopper = jax.default_backend() == "gpu" and is_hopper()


class _H100:
    core_count = 132
    compute_capability = "9.0"


def test_guard_takes_dit_heads_and_names_what_it_refuses():
    for shape in ((2, 256, 16, 72), (2, 256, 16, 64), (2, 128, 12, 64), (2, 256, 2, 72)):
        assert am.mosaic_attention_applies(shape, jnp.bfloat16, platform="gpu") == (True, "ok"), shape
    cases = {((2, 256, 16, 72), jnp.float32, "gpu"): "bfloat16 or float16",
             ((2, 256, 16, 80), jnp.bfloat16, "gpu"): "head size 80",
             ((2, 256, 15, 72), jnp.bfloat16, "gpu"): "groups of 2",
             ((2, 200, 16, 72), jnp.bfloat16, "gpu"): "200 tokens",
             ((256, 16, 72), jnp.bfloat16, "gpu"): "(B, T, N, D)",
             ((2, 256, 16, 72), jnp.bfloat16, "cpu"): "GPU-only"}
    for (shape, dtype, platform), why in cases.items():
        ok, got = am.mosaic_attention_applies(shape, dtype, platform=platform)
        assert not ok and why in got, (shape, got)


def test_guard_refuses_gpus_before_hopper(monkeypatch):
    class _A100:
        compute_capability = "8.0"

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(jax, "devices", lambda *a: [_A100()])
    ok, why = am.mosaic_attention_applies((2, 256, 16, 72), jnp.bfloat16)
    assert not ok and "9.x" in why


def test_unsupported_shapes_raise_before_any_kernel():
    q = jnp.zeros((2, 256, 4, 80), jnp.bfloat16)
    with pytest.raises(ValueError, match="head size 80"):
        am.attention_mosaic(q, q, q)
    with pytest.raises(ValueError, match="share shape and dtype"):
        am.attention_mosaic(q, q, q.astype(jnp.float16))


@pytest.mark.parametrize("d,heads,tokens", [(72, 16, 256), (64, 16, 256), (72, 4, 128)])
def test_kernel_lowers_for_cuda_as_one_mosaic_call(d, heads, tokens, monkeypatch):
    """The whole Pallas -> Mosaic GPU lowering (TMA boxes of 64 / 16 columns at 16-aligned starts for
    head pairs of 72) succeeds, and the program is that one kernel between free reshapes."""
    monkeypatch.setattr(jax, "devices", lambda *a: [_H100()])
    sds = jax.ShapeDtypeStruct((2, tokens, heads, d), jnp.bfloat16)
    text = am.attention_mosaic.trace(sds, sds, sds).lower(lowering_platforms=("cuda",)).as_text()
    assert len(re.findall(r"stablehlo.custom_call @mosaic_gpu", text)) == 1
    assert "stablehlo.dot" not in text and "stablehlo.broadcast" not in text  # no XLA attention beside it
    # in the attention_mosaic name scope, so that profiles (perf.trace) file it under attention
    debug = am.attention_mosaic.trace(sds, sds, sds).lower(lowering_platforms=("cuda",)).as_text(debug_info=True)
    call = next(line for line in debug.splitlines() if "custom_call @mosaic_gpu" in line)
    loc = re.search(r"loc\((#loc\d+)\)\s*$", call).group(1)
    assert "attention_mosaic" in next(line for line in debug.splitlines() if line.startswith(loc + " "))


def test_vmap_folds_the_mapped_axis_into_one_launch(monkeypatch):
    """Under jax.vmap (the search runs the model so) the kernel runs once on the mapped axis folded into
    the samples, (V * B, T, N * D), with an unmapped operand broadcast."""
    monkeypatch.setattr(jax, "devices", lambda *a: [_H100()])
    qs = jax.ShapeDtypeStruct((3, 2, 256, 16, 72), jnp.bfloat16)
    ks = jax.ShapeDtypeStruct((2, 256, 16, 72), jnp.bfloat16)
    fn = jax.jit(jax.vmap(am.attention_mosaic, in_axes=(0, None, 0)))
    text = fn.trace(qs, ks, qs).lower(lowering_platforms=("cuda",)).as_text()
    calls = re.findall(r"stablehlo.custom_call @mosaic_gpu[^\n]*", text)
    assert len(calls) == 1 and "-> tensor<6x256x1152xbf16>" in calls[0], calls


def test_head_pairs_split_each_head_into_its_own_columns():
    """The layout's bookkeeping: in a pair's parts, every column of the group belongs to exactly one
    head and each head owns exactly D columns (what makes the masked products exact)."""
    for d, lay in am.LAYOUTS.items():
        owner = np.zeros(lay.group, int)
        for head in lay.heads:
            cols = [lay.parts[p][0] + c for p, lo, hi in head for c in range(lo, hi)]
            assert len(cols) == d
            owner[cols] += 1
        assert (owner == 1).all(), d
        assert sum(w for _, w in lay.parts) == lay.group
        assert all(off % (lay.swizzle // 2) == 0 for off, _ in lay.parts)  # tile-aligned boxes


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="on a GPU the route exists")
def test_model_asking_for_mosaic_off_gpu_says_why():
    q = jnp.ones((1, 128, 2, 72), jnp.bfloat16)
    with pytest.raises(QditError, match="GPU-only.*use attention='auto' or 'xla'"):
        AttentionCore("mosaic").apply({}, q, q, q)


@pytest.mark.skipif(not on_hopper, reason="runs the Mosaic GPU kernel: Hopper only")
@pytest.mark.parametrize("d,tokens", [(72, 256), (64, 256), (72, 128)])
def test_compiled_kernel_matches_float64(d, tokens):
    q, k, v = _qkv((4, tokens, 16, d), seed=d + tokens)
    out = np.asarray(am.attention_mosaic(q, k, v), np.float64)
    ref = _f64(q, k, v)
    # the float32 reference rounded to bf16 is as far from float64 as rounding allows; the kernel also
    # rounds P to bf16 before P @ V (flash attention's step), so allow it 1.5x that
    rounding = np.abs(np.asarray(ak.attention_reference(q, k, v), np.float64) - ref).max()
    err = np.abs(out - ref).max()
    assert err <= 1.5 * rounding + 1e-3, (err, rounding)
    # and the check can fail: a head without its last 8 columns (the shared part) is visibly different
    cut = _f64(q.at[..., -8:].set(0), k, v)
    assert np.abs(cut - ref).max() > 20 * err


@pytest.mark.skipif(not on_hopper, reason="runs the Mosaic GPU kernel: Hopper only")
def test_vmapped_kernel_equals_one_call_per_slice():
    """Each sample is computed alike whatever else is in the launch, so the folded vmap is bit-exact."""
    q, k, v = _qkv((3, 2, 256, 16, 72), seed=5)
    got = np.asarray(jax.vmap(am.attention_mosaic)(q, k, v))
    for i in range(3):
        np.testing.assert_array_equal(got[i], np.asarray(am.attention_mosaic(q[i], k[i], v[i])))


@pytest.mark.skipif(not on_hopper, reason="routes to the Mosaic GPU kernel: Hopper only")
def test_model_auto_attention_runs_the_mosaic_kernel_at_xl2_heads():
    from qdit_jax.perf.trace import hlo_kinds

    q, k, v = _qkv((2, 256, 16, 72), seed=3)
    fn = jax.jit(lambda q, k, v: AttentionCore("auto").apply({}, q, k, v))
    assert "mosaic_gpu" in fn.lower(q, k, v).as_text()
    kinds = [kind for kind, _ in hlo_kinds(fn.lower(q, k, v).compile().as_text()).values()]
    assert "attention" in kinds and "pallas/triton" not in kinds  # profiles file the kernel under attention
    want = AttentionCore("xla").apply({}, q, k, v)
    assert np.abs(np.asarray(fn(q, k, v), np.float64) - np.asarray(want, np.float64)).max() < 0.05


def test_auto_routes_to_the_kernel_only_up_to_the_measured_token_count(monkeypatch):
    """'auto' on a Hopper GPU: the Mosaic kernel at DiT's 256 tokens, cuDNN beyond (not timed there);
    'mosaic' asks for the kernel at any length it computes (the routing with both kernels stubbed)."""
    calls = []
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(jax, "devices", lambda *a: [_H100()])
    monkeypatch.setattr(am, "attention_mosaic", lambda q, k, v: calls.append("mosaic") or q)

    def cudnn(q, k, v, implementation=None):
        calls.append(implementation)
        return q

    monkeypatch.setattr(jax.nn, "dot_product_attention", cudnn)
    for tokens, impl, want in ((256, "auto", "mosaic"), (512, "auto", "cudnn"), (512, "mosaic", "mosaic")):
        q = jnp.ones((1, tokens, 2, 72), jnp.bfloat16)
        AttentionCore(impl).apply({}, q, q, q)
        assert calls.pop() == want, (tokens, impl)
