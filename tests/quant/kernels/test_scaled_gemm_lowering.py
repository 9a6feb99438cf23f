"""The Mosaic GPU scaled GEMM lowers (Pallas -> Mosaic GPU, layouts inferred) for every configuration
the real path uses, checked on a CPU machine by lowering for CUDA: what can break in the kernel's
construction without a GPU to run it (running and numerics: test_gpu_kernels.py)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from qdit_jax.quant.kernels import scaled_gemm as sg
from qdit_jax.quant.quantizers import QuantSpec

F8 = jnp.float8_e4m3fn
M, C = 512, 256


class _H100:
    core_count = 132


def _lower(dtype, k: int, n: int, groups: int, **kw) -> str:
    def sds(shape, dt=jnp.float32):
        return jax.ShapeDtypeStruct(shape, dt)

    args = (sds((M, k), dtype), sds((n, k), dtype), sds((M,) if groups == 1 else (groups, M)),
            sds((n,) if groups == 1 else (groups, n)), sds((n,)))
    extra = {}
    if kw.pop("residual", False):
        extra = dict(residual=sds((M, n), jnp.bfloat16), gate=sds((M // 256, n), jnp.bfloat16))
    fn = jax.jit(lambda a, w, sa, sw, b, **e: sg.scaled_gemm_mosaic(a, w, sa, sw, b, **kw, **e))
    return fn.trace(*args, **extra).lower(lowering_platforms=("cuda",)).as_text()


CASES = {
    "fp8 per channel": (F8, C, C, 1, {}),
    "int8 per channel + residual": (jnp.int8, 4 * C, C, 1, dict(residual=True)),
    "fp8 group-128 (split) + residual": (F8, C, C, 2, dict(residual=True)),
    "int8 group-128 overlap": (jnp.int8, 4 * C, C, 8, {}),
    "fp8 group-128 overlap + residual": (F8, C, C, 2, dict(group_mode="overlap", residual=True)),
    "int8 group-128 split + residual": (jnp.int8, 4 * C, C, 8, dict(group_mode="split", residual=True)),
    "fp8 group-128 plain": (F8, 4 * C, C, 8, dict(group_mode="plain")),
    "fp8 group-128 plain, gelu_codes": (F8, C, 4 * C, 2, dict(group_mode="plain", gelu_codes=QuantSpec(
        bits=8, format="fp8_e4m3", group_size=128, symmetric=True))),
    "fp8 group-128 gelu_codes": (F8, C, 4 * C, 2, dict(gelu_codes=QuantSpec(bits=8, format="fp8_e4m3", group_size=128,
                                                                              symmetric=True))),
    "int8 group-128 gelu_codes": (jnp.int8, C, 4 * C, 2, dict(gelu_codes=QuantSpec(bits=8, group_size=128,
                                                                                     symmetric=True))),
    # 8 K steps: the codes epilogue deferred under the next tile's first eight (opt-in)
    "fp8 group-128 gelu_codes deferred": (F8, 4 * C, 4 * C, 8, dict(defer_codes=True, gelu_codes=QuantSpec(
        bits=8, format="fp8_e4m3", group_size=128, symmetric=True))),
    "int8 group-128 split gelu_codes deferred": (jnp.int8, 4 * C, 4 * C, 8, dict(
        group_mode="split", defer_codes=True, gelu_codes=QuantSpec(bits=8, group_size=128, symmetric=True))),
}


@pytest.mark.parametrize("case", list(CASES))
def test_kernel_lowers_for_cuda(case, monkeypatch):
    monkeypatch.setattr(jax, "devices", lambda *a: [_H100()])
    dtype, k, n, groups, kw = CASES[case]
    text = _lower(dtype, k, n, groups, **kw)
    assert "mosaic_gpu" in text  # the kernel's custom call, with its serialized module


class _TwoSMs:
    core_count = 2  # every CTA owns two tiles or more at these shapes: the chained pipeline applies


CHAINED = {
    "fp8 per channel": (F8, C, C, 1, {}),
    "int8 group-128 overlap + residual": (jnp.int8, 4 * C, C, 8, dict(residual=True)),
    "fp8 group-128 split, 3 K steps": (F8, 3 * 128, C, 3, {}),
    "fp8 group-128 gelu_codes": (F8, C, 4 * C, 2, dict(gelu_codes=QuantSpec(bits=8, format="fp8_e4m3", group_size=128,
                                                                              symmetric=True))),
}


@pytest.mark.parametrize("case", list(CHAINED))
def test_chained_kernel_lowers_for_cuda(case, monkeypatch):
    monkeypatch.setattr(jax, "devices", lambda *a: [_TwoSMs()])
    dtype, k, n, groups, kw = CHAINED[case]
    m_tile = 256 if groups == 1 else 128
    assert sg.chained_steps(k // 128, (M // m_tile) * (n // 128), 2, sg.default_tiling(groups)[1], True)[1]
    chained = _lower(dtype, k, n, groups, **kw)
    unchained = _lower(dtype, k, n, groups, chain=False, **kw)
    assert "mosaic_gpu" in chained and chained != unchained


@pytest.mark.parametrize("k_steps, tiles, steps, explicit, want", [
    (9, 1000, 3, False, (3, True)),      # XL/2's K = 1,152 per channel
    (9, 1000, 4, False, (3, True)),      # group default depth 4 drops to a divisor of 9
    (36, 1000, 4, False, (4, True)),     # fc2's K = 4,608
    (7, 1000, 4, False, (4, False)),     # no divisor from 2 to 4: per-tile pipelines
    (9, 1000, 4, True, (4, False)),      # an explicit depth is kept, unchained
    (9, 200, 3, False, (3, False)),      # some CTA would own one tile only
    (2, 1000, 4, False, (2, True)),
])
def test_chained_steps(k_steps, tiles, steps, explicit, want):
    assert sg.chained_steps(k_steps, tiles, 132, steps, True, explicit=explicit) == want
    assert sg.chained_steps(k_steps, tiles, 132, steps, False, explicit=explicit)[1] is False


def test_gelu_codes_epilogue_uses_the_approximate_tanh_only_when_asked(monkeypatch):
    """``approx_tanh`` (the default) puts the GPU's tanh.approx.f32 in the kernel for the GELU of the
    codes epilogue; without it, or in a kernel with no GELU, it is absent."""
    monkeypatch.setattr(jax, "devices", lambda *a: [_H100()])
    spec = QuantSpec(bits=8, format="fp8_e4m3", group_size=128, symmetric=True)
    assert "tanh.approx" in _lower(F8, C, 4 * C, 2, gelu_codes=spec)
    assert "tanh.approx" not in _lower(F8, C, 4 * C, 2, gelu_codes=spec, approx_tanh=False)
    assert "tanh.approx" not in _lower(F8, C, 4 * C, 2)


def _jaxpr_tokens(pattern: str, dtype, k: int, n: int, groups: int, **kw) -> list[str]:
    """The matches of ``pattern`` in the group-scaled kernel's jaxpr, in program order."""
    import re

    def sds(shape, dt=jnp.float32):
        return jax.ShapeDtypeStruct(shape, dt)

    args = (sds((M, k), dtype), sds((n, k), dtype), sds((groups, M)), sds((groups, n)), sds((n,)))
    return re.findall(pattern, str(jax.make_jaxpr(lambda *a: sg.scaled_gemm_mosaic(*a, **kw))(*args)))


def _accumulator_reads(dtype, k: int, n: int, groups: int, **kw) -> list[str]:
    """The kernel's accumulator reads and bare wgmma waits, in program order, from its jaxpr."""
    return _jaxpr_tokens(r"wgmma_accumulator_deref_p\[wait_n=\w+\]|wgmma_wait\[", dtype, k, n, groups, **kw)


@pytest.mark.parametrize("dtype", [F8, jnp.int8])
def test_split_scales_each_part_while_the_later_part_runs(dtype, monkeypatch):
    """'split' issues the tile's two column parts, then reads the first once at most one wgmma is left
    in flight (the second's) and scales it, and only then waits for the second. Reading an accumulator
    with ``acc[...]`` waits for every wgmma in flight (wait_n=0): that made both reads wait for both
    parts, so no scaling ran under the tensor cores' work (fourteenth session; the SASS had
    ``WARPGROUP.DEPBAR.LE gsb0, 0x0`` before the first part's FMULs)."""
    monkeypatch.setattr(jax, "devices", lambda *a: [_H100()])
    reads = _accumulator_reads(dtype, 4 * C, C, 8, group_mode="split")
    assert reads == ["wgmma_accumulator_deref_p[wait_n=1]", "wgmma_accumulator_deref_p[wait_n=0]"]
    plain = _accumulator_reads(dtype, 4 * C, C, 8, group_mode="plain")
    assert plain[-1] == "wgmma_accumulator_deref_p[wait_n=0]" and "wgmma_accumulator_deref_p[wait_n=1]" not in plain


def _deferred_schedule(k: int, **kw) -> list[str]:
    """fp8 fc1 with the codes epilogue: its conditionals, tanh calls and accumulator reads, in program
    order (jaxpr)."""
    spec = QuantSpec(bits=8, format="fp8_e4m3", group_size=128, symmetric=True)
    return _jaxpr_tokens(r"wgmma_accumulator_deref_p\[wait_n=\w+\]|\bcond\[|tanh", F8, k, 4 * C, k // 128,
                         gelu_codes=spec, **kw)


def test_deferred_codes_epilogue_runs_between_the_wgmma_issue_and_its_waits(monkeypatch):
    """With ``defer_codes`` (8 K steps or more) the kernel gains the eight conditional pieces of the
    previous tile's epilogue in its K-step body, ahead of the first accumulator read (wait_n=1), i.e.
    while the step's wgmmas run (plus the tile epilogue's choice between finishing and staging);
    without it, or with fewer K steps than pieces, the kernel is the immediate one."""
    monkeypatch.setattr(jax, "devices", lambda *a: [_H100()])

    def conds_before_reads(sched: list[str]) -> int:
        return sched[:sched.index("wgmma_accumulator_deref_p[wait_n=1]")].count("cond[")

    deferred = _deferred_schedule(8 * 128, defer_codes=True)
    immediate = _deferred_schedule(8 * 128, defer_codes=False)
    short = _deferred_schedule(4 * 128, defer_codes=True)  # 4 K steps: too few to spread it, not deferred
    assert conds_before_reads(deferred) >= conds_before_reads(immediate) + 8, deferred
    assert short == immediate and deferred.count("wgmma_accumulator_deref_p[wait_n=0]") == 1
