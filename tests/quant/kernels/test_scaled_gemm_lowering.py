"""The Mosaic GPU scaled GEMM lowers (Pallas -> Mosaic GPU, layouts inferred) for every configuration
the real path uses, checked on a CPU machine by lowering for CUDA: what can break in the kernel's
construction without a GPU to run it (running and numerics: test_gpu_kernels.py)."""
from __future__ import annotations

import re

from typing import Any

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
    "fp8 per channel, vectors prefetched": (F8, C, C, 1, dict(prefetch="before")),
    "int8 per channel + residual, vectors after": (jnp.int8, 4 * C, C, 1, dict(residual=True, prefetch="after")),
    "fp8 group-128 (split) + residual, vectors prefetched": (F8, C, C, 2, dict(residual=True, prefetch="before")),
    "fp8 per channel, three outputs": (F8, C, 6 * C, 1, dict(out_blocks=3)),
    "int8 group-128 three outputs": (jnp.int8, C, 6 * C, 2, dict(out_blocks=3, prefetch="before")),
    # a fourth warpgroup for the codes epilogue (opt-in)
    "fp8 group-128 gelu_codes, codes warpgroup": (F8, C, 4 * C, 2, dict(codes_wg=True, gelu_codes=QuantSpec(
        bits=8, format="fp8_e4m3", group_size=128, symmetric=True))),
    "int8 group-128 overlap gelu_codes, codes warpgroup": (jnp.int8, C, 4 * C, 2, dict(
        group_mode="overlap", codes_wg=True, gelu_codes=QuantSpec(bits=8, group_size=128, symmetric=True))),
    # a fourth warpgroup for the per-channel scale / bias epilogue and the store
    "fp8 per channel, epilogue warpgroup": (F8, C, 4 * C, 1, dict(epilogue_wg=True)),
    "fp8 per channel, three outputs, epilogue warpgroup": (F8, C, 6 * C, 1, dict(out_blocks=3, epilogue_wg=True)),
    "fp8 per channel + residual, epilogue warpgroup": (F8, 4 * C, C, 1, dict(residual=True, epilogue_wg=True)),
    "fp8 group-128 three outputs, epilogue warpgroup": (F8, C, 6 * C, 2, dict(out_blocks=3, epilogue_wg=True)),
    "int8 group-128 + residual, epilogue warpgroup": (jnp.int8, 4 * C, C, 8, dict(residual=True, epilogue_wg=True)),
    # the TMA stores on a fourth warpgroup of 24 registers (two output slots a warpgroup with 64-row tiles)
    "fp8 group-128 three outputs, store warpgroup": (F8, C, 6 * C, 2, dict(out_blocks=3, store_wg=True)),
    "int8 group-128 overlap + residual, store warpgroup": (jnp.int8, 4 * C, C, 8, dict(residual=True, store_wg=True)),
    "fp8 per channel + residual, store warpgroup": (F8, 4 * C, C, 1, dict(residual=True, store_wg=True)),
    "fp8 group-128 gelu_codes, store warpgroup": (F8, C, 4 * C, 2, dict(store_wg=True, gelu_codes=QuantSpec(
        bits=8, format="fp8_e4m3", group_size=128, symmetric=True))),
    # the bias as the group sums' initial value (a kernel option; RealOptions sets it for fp8)
    "fp8 group-128 (split) + residual, bias first, store warpgroup": (F8, C, C, 2, dict(
        residual=True, bias_first=True, store_wg=True)),
    "int8 group-128 overlap three outputs, bias first, vectors prefetched": (jnp.int8, C, 6 * C, 2, dict(
        out_blocks=3, bias_first=True, prefetch="before")),
    "int8 group-128 gelu_codes, codes warpgroup, bias first": (jnp.int8, C, 4 * C, 2, dict(
        codes_wg=True, bias_first=True, gelu_codes=QuantSpec(bits=8, group_size=128, symmetric=True))),
    "fp8 group-128 plain, bias first": (F8, 4 * C, C, 8, dict(group_mode="plain", bias_first=True)),
    # the codes epilogue's GELU on the float32 sums (a kernel option; RealOptions.fc1_gelu's default)
    "fp8 group-128 gelu_codes, GELU in float32, store warpgroup": (F8, C, 4 * C, 2, dict(
        store_wg=True, gelu_mode="float32", gelu_codes=QuantSpec(bits=8, format="fp8_e4m3", group_size=128,
                                                                 symmetric=True))),
    "int8 group-128 gelu_codes, codes warpgroup, GELU in float32": (jnp.int8, C, 4 * C, 2, dict(
        codes_wg=True, gelu_mode="float32", gelu_codes=QuantSpec(bits=8, group_size=128, symmetric=True))),
    # CTA pairs sharing the weight tile by TMA multicast (opt-in)
    "fp8 group-128 (split) + residual, CTA pairs, store warpgroup": (F8, C, C, 2, dict(
        residual=True, cta_pairs=True, store_wg=True)),
    "int8 group-128 gelu_codes, codes warpgroup, CTA pairs": (jnp.int8, C, 4 * C, 2, dict(
        codes_wg=True, cta_pairs=True, gelu_codes=QuantSpec(bits=8, group_size=128, symmetric=True))),
    "fp8 per channel three outputs, epilogue warpgroup, CTA pairs": (F8, C, 6 * C, 1, dict(
        out_blocks=3, epilogue_wg=True, cta_pairs=True)),
    # 'split' parts stacked along M (a kernel option; RealOptions.stacked)
    "fp8 group-128 (split) + residual, bias first, store warpgroup, stacked": (F8, C, C, 2, dict(
        residual=True, bias_first=True, store_wg=True, stacked=True)),
    "fp8 group-128 three outputs, bias first, store warpgroup, stacked": (F8, C, 6 * C, 2, dict(
        out_blocks=3, bias_first=True, store_wg=True, stacked=True)),
    "int8 group-128 split + residual, stacked": (jnp.int8, 4 * C, C, 8, dict(
        group_mode="split", residual=True, stacked=True)),
    "int8 group-128 split three outputs, store warpgroup, stacked": (jnp.int8, C, 6 * C, 2, dict(
        group_mode="split", out_blocks=3, store_wg=True, stacked=True)),
    # two groups a pipeline step (a kernel option, not yet run on a GPU)
    "fp8 group-128 pairs + residual, bias first, store warpgroup, stacked": (F8, 4 * C, C, 8, dict(
        residual=True, bias_first=True, store_wg=True, stacked=True, group_pairs=True)),
    "int8 group-128 pairs three outputs, store warpgroup, stacked": (jnp.int8, C, 6 * C, 2, dict(
        out_blocks=3, store_wg=True, stacked=True, group_pairs=True)),
    "int8 group-128 pairs + residual, stacked": (jnp.int8, 4 * C, C, 8, dict(
        residual=True, stacked=True, group_pairs=True)),
    "fp8 group-128 pairs, 3 groups, bias first, store warpgroup, stacked": (F8, 3 * 128, C, 3, dict(
        bias_first=True, store_wg=True, stacked=True, group_pairs=True)),
}


def test_bias_first_changes_the_group_kernel_and_needs_its_own_epilogue(monkeypatch):
    """``bias_first`` builds another kernel (the bias loaded before the K loop as the sums' start) and is
    refused per channel (no group sums) and with the epilogue warpgroup (which adds the bias itself)."""
    monkeypatch.setattr(jax, "devices", lambda *a: [_H100()])
    assert _lower(F8, C, C, 2, bias_first=True) != _lower(F8, C, C, 2)
    for kw in (dict(groups=1), dict(groups=2, epilogue_wg=True)):
        with pytest.raises(ValueError, match="bias_first"):
            _lower(F8, C, C, kw.pop("groups"), bias_first=True, **kw)


def test_stacked_builds_another_split_kernel_and_is_refused_where_it_cannot_apply(monkeypatch):
    """``stacked`` changes the 'split' group kernel (each warpgroup all the CTA tile's rows, half its
    columns: one column-scale load of 64 a K step, two row-scale loads) and is refused per channel, in
    the other group modes, with the codes epilogue, a fourth epilogue / codes warpgroup, prefetched
    vectors or CTA pairs."""
    monkeypatch.setattr(jax, "devices", lambda *a: [_H100()])
    assert _lower(F8, C, C, 2, stacked=True) != _lower(F8, C, C, 2)

    def vector_loads(**kw) -> list[str]:
        """The kernel's float32 vector loads, each as the wgmma layout's reduced axis it takes: '1' a row
        vector (row scales), '0' a column vector (column scales, bias); sorted."""
        return sorted(re.findall(r"f32\[64\] = load\[(?:(?!= load\[).)*?\n\s*\w+:f32\[64\] = layout_cast\[\s*"
                                  r"new_layout=ReducedLayout\(layout=<Layout.WGMMA: \d>, axes=\((\d),\)",
                                  str(_group_kernel_jaxpr(F8, C, C, 2, **kw)), flags=re.S))

    # the K step: one row vector and two column parts' scales side by side, two row vectors and one
    # column vector stacked; the epilogue's bias, one column vector a part in both
    assert vector_loads() == ["0", "0", "0", "0", "1"]
    assert vector_loads(stacked=True) == ["0", "0", "0", "1", "1"]
    spec = QuantSpec(bits=8, format="fp8_e4m3", group_size=128, symmetric=True)
    for kw in (dict(groups=1), dict(groups=2, group_mode="overlap"), dict(groups=2, group_mode="plain"),
               dict(groups=2, gelu_codes=spec), dict(groups=2, epilogue_wg=True), dict(groups=2, prefetch="before"),
               dict(groups=2, cta_pairs=True)):
        with pytest.raises(ValueError, match="stacked"):
            _lower(F8, C, 4 * C if "gelu_codes" in kw else C, kw.pop("groups"), stacked=True, **kw)


def test_float32_gelu_builds_another_codes_kernel(monkeypatch):
    """``gelu_mode='float32'`` changes fc1's codes kernel (no bf16 roundings in its GELU) and nothing else."""
    monkeypatch.setattr(jax, "devices", lambda *a: [_H100()])
    spec = QuantSpec(bits=8, format="fp8_e4m3", group_size=128, symmetric=True)
    assert _lower(F8, C, 4 * C, 2, gelu_codes=spec, gelu_mode="float32") != _lower(F8, C, 4 * C, 2, gelu_codes=spec)
    assert _lower(F8, C, 4 * C, 2, gelu_codes=spec, gelu_mode="dtype") == _lower(F8, C, 4 * C, 2, gelu_codes=spec)


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


def _group_kernel_jaxpr(dtype, k: int, n: int, groups: int, **kw) -> Any:
    """The group-scaled kernel's closed jaxpr for (M, k) x (n, k) codes with ``groups`` scale groups."""
    def sds(shape, dt=jnp.float32):
        return jax.ShapeDtypeStruct(shape, dt)

    args = (sds((M, k), dtype), sds((n, k), dtype), sds((groups, M)), sds((groups, n)), sds((n,)))
    return jax.make_jaxpr(lambda *a: sg.scaled_gemm_mosaic(*a, **kw))(*args)


def _jaxpr_tokens(pattern: str, dtype, k: int, n: int, groups: int, **kw) -> list[str]:
    """The matches of ``pattern`` in the group-scaled kernel's jaxpr, in program order."""
    import re

    return re.findall(pattern, str(_group_kernel_jaxpr(dtype, k, n, groups, **kw)))


def _accumulator_reads(dtype, k: int, n: int, groups: int, **kw) -> list[str]:
    """The kernel's accumulator reads and bare wgmma waits, in program order, from its jaxpr."""
    return _jaxpr_tokens(r"wgmma_accumulator_deref_p\[wait_n=\w+\]|wgmma_wait\[", dtype, k, n, groups, **kw)


@pytest.mark.parametrize("groups", [1, 2])
def test_cta_pairs_multicast_the_weight_tile_only(groups, monkeypatch):
    """``cta_pairs`` launches clusters of two CTAs and loads each K step's weight tile (and its group scale
    row) collectively over the pair, the activation tile (and its scale row) per CTA; without it no copy
    is collective. Refused where M is not a whole number of tile pairs."""
    monkeypatch.setattr(jax, "devices", lambda *a: [_H100()])

    def copies(**kw) -> list[str]:
        if groups == 1:
            sds = jax.ShapeDtypeStruct
            args = (sds((M, C), F8), sds((C, C), F8), sds((M,), jnp.float32), sds((C,), jnp.float32),
                    sds((C,), jnp.float32))
            text = str(jax.make_jaxpr(lambda *a: sg.scaled_gemm_mosaic(*a, **kw))(*args))
        else:
            text = str(_group_kernel_jaxpr(F8, C, C, groups, **kw))
        assert ("cluster=(2,)" in text) == bool(kw)
        return re.findall(r"copy_gmem_to_smem(?:\[collective_axes=\('pair',\)\])? \w+\[", text)

    per_step = 2 if groups == 1 else 4  # A, W (and the two scale rows)
    pairs, plain = copies(cta_pairs=True), copies()
    assert len(pairs) == len(plain) and len(plain) % per_step == 0
    for i in range(0, len(pairs), per_step):  # each of the pipeline's copy sites: W (and its scale row) paired
        assert ["collective" in c for c in pairs[i:i + per_step]] == [False, True] * (per_step // 2)
    assert not any("collective" in c for c in plain)
    with pytest.raises(ValueError, match="cta_pairs"):  # three 128-row CTA tiles
        sds, g = jax.ShapeDtypeStruct, C // 128
        jax.make_jaxpr(lambda *v: sg.scaled_gemm_mosaic(*v, cta_pairs=True))(
            sds((384, C), F8), sds((C, C), F8), sds((g, 384), jnp.float32), sds((g, C), jnp.float32),
            sds((C,), jnp.float32))


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


@pytest.mark.parametrize("dtype", [F8, jnp.int8])
def test_group_pairs_issue_four_parts_and_read_each_as_it_finishes(dtype, monkeypatch):
    """``group_pairs``: a pipeline step holds two groups' A / W / scale-row slots (eight inputs instead of
    four, half the steps), issues their four stacked parts' wgmmas, then reads them in issue order, each
    once only the later ones may still run (wait_n 3, 2, 1, 0); with an odd group count a branch for the
    last step issues one group's two parts (wait_n 1, 0) beside the pair's; refused without ``stacked``,
    by name."""
    monkeypatch.setattr(jax, "devices", lambda *a: [_H100()])
    kw = dict(stacked=True, store_wg=True)
    reads = _accumulator_reads(dtype, 4 * C, C, 8, group_pairs=True, **kw)
    assert reads == [f"wgmma_accumulator_deref_p[wait_n={n}]" for n in (3, 2, 1, 0)]
    assert _accumulator_reads(dtype, 4 * C, C, 8, **kw) == [f"wgmma_accumulator_deref_p[wait_n={n}]" for n in (1, 0)]
    wgmmas = _jaxpr_tokens(r"\bwgmma_ref\b", dtype, 4 * C, C, 8, group_pairs=True, **kw)
    assert len(wgmmas) == 4 and len(_jaxpr_tokens(r"\bwgmma_ref\b", dtype, 4 * C, C, 8, **kw)) == 2
    odd = _accumulator_reads(dtype, 3 * 128, C, 3, group_pairs=True, **kw)
    assert sorted(odd) == sorted(reads + [f"wgmma_accumulator_deref_p[wait_n={n}]" for n in (1, 0)])
    assert len(_jaxpr_tokens(r"\bwgmma_ref\b", dtype, 3 * 128, C, 3, group_pairs=True, **kw)) == 6
    conds = [len(_jaxpr_tokens(r"\bcond\[", dtype, k, C, k // 128, group_pairs=True, **kw)) for k in (4 * C, 384)]
    assert conds[1] == conds[0] + 1  # the odd count's one- or two-group step
    with pytest.raises(ValueError, match="group_pairs"):
        _lower(dtype, 4 * C, C, 8, group_pairs=True, store_wg=True)


def _registers_at(dtype, k: int, n: int, groups: int, prims: tuple[str, ...], **kw) -> tuple[list, dict]:
    """The kernel's register requests (set_max_registers, in the order met) and, per primitive in
    ``prims``, the register count in force where each of its calls is (the last request before it, in
    its own block or the blocks around it), from a walk of the jaxpr."""
    from jax.extend import core as jex_core

    closed = _group_kernel_jaxpr(dtype, k, n, groups, **kw)
    requests, found = [], {p: [] for p in prims}

    def subjaxprs(value):
        if isinstance(value, jex_core.ClosedJaxpr):
            yield value.jaxpr
        elif isinstance(value, jex_core.Jaxpr):
            yield value
        elif isinstance(value, (tuple, list)):
            for v in value:
                yield from subjaxprs(v)

    def walk(jaxpr, regs):
        for eqn in jaxpr.eqns:
            name = eqn.primitive.name
            if name.startswith("set_max_registers"):
                regs = int(eqn.invars[0].val)
                requests.append((eqn.params.get("action"), regs))
            elif name in found:
                found[name].append(regs)
            for value in eqn.params.values():
                for sub in subjaxprs(value):
                    walk(sub, regs)

    walk(closed.jaxpr, None)
    return requests, found


def test_codes_warpgroup_takes_the_gelu_and_the_registers_add_up(monkeypatch):
    """With ``codes_wg`` the GELU's tanh runs only in the fourth warpgroup's code (after its register
    request), the register split fills exactly the 64K register file over four warpgroups (memory 40 +
    2 compute + codes = 512 a thread), and int8 fc1 runs 'split' (each part's accumulator read while the
    other runs; 'overlap', asked for, reads one accumulator after a full wait); without it the compute
    warpgroups hold the tanh under Pallas' own split (40 + 2 x 232)."""
    monkeypatch.setattr(jax, "devices", lambda *a: [_H100()])
    spec = QuantSpec(bits=8, format="fp8_e4m3", group_size=128, symmetric=True)
    prims = ("tanh", "wgmma_ref")
    requests, found = _registers_at(F8, C, 4 * C, C // 128, prims, gelu_codes=spec, codes_wg=True)
    by_action = sorted(requests)
    assert by_action == [("decrease", 40), ("increase", 136), ("increase", 168)], requests
    (_, memory), (_, codes), (_, compute) = by_action
    assert memory + 2 * compute + codes == 512
    assert found["tanh"] and set(found["tanh"]) == {136}, found
    assert set(found["wgmma_ref"]) == {168}, found
    int8 = QuantSpec(bits=8, group_size=128, symmetric=True)
    assert "wgmma_accumulator_deref_p[wait_n=1]" in _accumulator_reads(jnp.int8, C, 4 * C, C // 128, gelu_codes=int8,
                                                                        codes_wg=True)  # 'split'
    assert "wgmma_accumulator_deref_p[wait_n=1]" not in _accumulator_reads(jnp.int8, C, 4 * C, C // 128,
                                                                            gelu_codes=int8, group_mode="overlap")
    requests, found = _registers_at(F8, C, 4 * C, C // 128, prims, gelu_codes=spec)
    assert sorted(requests) == [("decrease", 40), ("increase", 232)], requests
    assert found["tanh"] and set(found["tanh"]) == {232}, found


def test_epilogue_warpgroup_holds_no_wgmma_and_the_registers_add_up(monkeypatch):
    """With ``epilogue_wg`` the wgmmas run only under the compute warpgroups' register request and the
    fourth warpgroup's code (scales, bias, store) under its own, and the split fills the 64K register
    file over four warpgroups (memory 40 + 2 compute + epilogue = 512 a thread)."""
    monkeypatch.setattr(jax, "devices", lambda *a: [_H100()])
    requests, found = _registers_at(F8, C, 4 * C, 1, ("wgmma_ref", "copy_smem_to_gmem"), epilogue_wg=True)
    by_action = sorted(requests)
    assert by_action == [("decrease", 40), ("increase", 136), ("increase", 168)], requests
    (_, memory), (_, epilogue), (_, compute) = by_action
    assert memory + 2 * compute + epilogue == 512
    assert set(found["wgmma_ref"]) == {168}, found
    assert found["copy_smem_to_gmem"] and set(found["copy_smem_to_gmem"]) == {136}, found


def test_store_warpgroup_holds_only_the_stores_and_the_registers_add_up(monkeypatch):
    """With ``store_wg`` the TMA stores run only under the fourth warpgroup's 24 registers and the wgmmas
    under the compute warpgroups' 232 (the three-warpgroup kernel's), the memory warpgroup at 24: the
    split fills the 64K register file (24 + 2 x 232 + 24 = 512 a thread)."""
    monkeypatch.setattr(jax, "devices", lambda *a: [_H100()])
    requests, found = _registers_at(F8, C, 4 * C, C // 128, ("wgmma_ref", "copy_smem_to_gmem"), store_wg=True)
    by_action = sorted(requests)
    assert by_action == [("decrease", 24), ("decrease", 24), ("increase", 232)], requests
    assert sum(n for _, n in by_action) + 232 == 512
    assert set(found["wgmma_ref"]) == {232}, found
    assert found["copy_smem_to_gmem"] and set(found["copy_smem_to_gmem"]) == {24}, found


def test_store_warpgroup_refuses_another_fourth_warpgroup(monkeypatch):
    monkeypatch.setattr(jax, "devices", lambda *a: [_H100()])
    with pytest.raises(ValueError, match="store_wg takes the compute warpgroups' own epilogue"):
        _lower(F8, C, C, 1, store_wg=True, epilogue_wg=True)
    spec = QuantSpec(bits=8, group_size=128, symmetric=True)
    with pytest.raises(ValueError, match="store_wg takes the compute warpgroups' own epilogue"):
        _lower(jnp.int8, C, 4 * C, C // 128, store_wg=True, codes_wg=True, gelu_codes=spec)


def test_codes_warpgroup_without_the_pallas_hook_says_so(monkeypatch):
    """Where this JAX's Pallas has no ``_compute_registers`` to bound, asking for the codes warpgroup is a
    clear error (not a deadlock on the GPU), and the real path's default leaves it off."""
    from jax._src.pallas.mosaic_gpu import pipeline as plpipe

    from qdit_jax.quant import real_layers
    from qdit_jax.quant.real import RealOptions

    monkeypatch.setattr(jax, "devices", lambda *a: [_H100()])
    assert sg.codes_wg_available() and real_layers.codes_warpgroup(RealOptions(), jnp.int8)
    monkeypatch.delattr(plpipe, "_compute_registers")
    assert not sg.codes_wg_available() and not real_layers.codes_warpgroup(RealOptions(), jnp.int8)
    spec = QuantSpec(bits=8, group_size=128, symmetric=True)
    with pytest.raises(NotImplementedError, match="codes_wg=False"):  # a shape no other test traces (jit's cache)
        _lower(jnp.int8, C, 6 * C, C // 128, gelu_codes=spec, codes_wg=True)
    with pytest.raises(NotImplementedError, match=r"fourth warpgroup \(store_wg\)"):  # the other two forms too
        _lower(jnp.int8, C, 5 * C, C // 128, store_wg=True)
    with pytest.raises(NotImplementedError, match=r"RealOptions\(epilogue_wg=False\)"):
        _lower(F8, C, 7 * C, 1, epilogue_wg=True)


BF16_CASES = {  # (K, N, weights stored (K, N), gated residual)
    "bf16 (N, K) weights": (C, C, False, False),
    "bf16 (K, N) weights + residual": (4 * C, C, True, True),
    "bf16 (K, N) weights, wide": (C, 4 * C, True, False),
    "bf16, K of 64-deep steps only": (3 * 64, C, True, False),
}


@pytest.mark.parametrize("case", list(BF16_CASES))
def test_bf16_kernel_lowers_for_cuda(case, monkeypatch):
    """``gemm_bf16_mosaic`` (the float model's proj / fc2 with the residual) lowers to one Mosaic call,
    and its weight layouts lower to different kernels."""
    monkeypatch.setattr(jax, "devices", lambda *a: [_H100()])
    k, n, w_kn, residual = BF16_CASES[case]

    def lower(w_kn: bool) -> str:
        bf = jnp.bfloat16
        args = [jax.ShapeDtypeStruct((M, k), bf), jax.ShapeDtypeStruct((k, n) if w_kn else (n, k), bf),
                jax.ShapeDtypeStruct((n,), jnp.float32)]
        extra = {}
        if residual:
            extra = dict(residual=jax.ShapeDtypeStruct((M, n), bf), gate=jax.ShapeDtypeStruct((M // 256, n), bf))
        fn = jax.jit(lambda a, w, b, **e: sg.gemm_bf16_mosaic(a, w, b, w_kn=w_kn, **e))
        return fn.trace(*args, **extra).lower(lowering_platforms=("cuda",)).as_text()

    text = lower(w_kn)
    assert text.count("custom_call @mosaic_gpu") == 1
    assert text != lower(not w_kn)


def test_bf16_kernel_with_the_epilogue_warpgroup_lowers_for_cuda(monkeypatch):
    """The bf16 form with its residual epilogue on the fourth warpgroup (``epilogue_wg``) lowers to one
    Mosaic call, another kernel than without it; a gate row per 128 rows is refused by name."""
    monkeypatch.setattr(jax, "devices", lambda *a: [_H100()])
    bf = jnp.bfloat16
    k, n = 4 * C, C
    args = [jax.ShapeDtypeStruct((M, k), bf), jax.ShapeDtypeStruct((k, n), bf), jax.ShapeDtypeStruct((n,), jnp.float32)]

    def lower(epi: bool, gate_rows: int = M // 256) -> str:
        extra = dict(residual=jax.ShapeDtypeStruct((M, n), bf), gate=jax.ShapeDtypeStruct((gate_rows, n), bf))
        fn = jax.jit(lambda a, w, b, **e: sg.gemm_bf16_mosaic(a, w, b, w_kn=True, epilogue_wg=epi, **e))
        return fn.trace(*args, **extra).lower(lowering_platforms=("cuda",)).as_text()

    text = lower(True)
    assert text.count("custom_call @mosaic_gpu") == 1 and text != lower(False)
    with pytest.raises(ValueError, match="one gate row per CTA tile"):
        lower(True, M // 128)


def test_bf16_kernel_rejects_mismatched_weights(monkeypatch):
    monkeypatch.setattr(jax, "devices", lambda *a: [_H100()])
    a = jnp.zeros((M, C), jnp.bfloat16)
    with pytest.raises(ValueError, match=r"do not match the input's K = 256"):
        sg.gemm_bf16_mosaic(a, jnp.zeros((C, 2 * C), jnp.bfloat16), None)  # (N, K) read as N = C, K = 2C
