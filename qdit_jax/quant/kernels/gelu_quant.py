"""The step between an MLP's two quantized GEMMs in one pass: fc1's scale epilogue, the tanh GELU and
fc2's per-token dynamic activation quantization, as a Pallas (Triton) kernel, with its guard and the
XLA formulation it replaces.

Why: for real W8A8 / fp8, XLA compiles this step into a multi-output reduction (epilogue + GELU +
row abs-max, which also writes GELU's output in bf16) and a quantize pass that reads that output
back: ~2.1 GB of memory traffic per DiT-XL/2 block at batch 256, 945 us on an H100, the largest
cost the quantized forward adds (profile in docs/RESULTS.md). A program here owns ``block_m`` whole
rows (N = 4,608 in ``chunk``-wide pieces), keeps them in registers, reads fc1's product once and
writes the codes once (~0.9 GB).

Same math as the unfused real path: the epilogue ``product * s_a[m] * s_w[n] + bias`` rounded to the
layer's output dtype, then ``jax.nn.gelu(approximate=True)`` as JAX defines it on an array of that
dtype (its constants and every step rounded to the dtype: ``gelu="dtype"``, the default), then the
quantizer's symmetric per-token scale and codes. The tanh is the GPU's ``tanh.approx.f32``
(``approx_tanh``, the default; libdevice's ``tanhf`` in interpret mode): on an H100 the codes and
scales are identical to XLA's unfused path at XL/2's fc1 shape (100% of entries, fp8 and int8, with
either tanh), and so are the model's outputs (``qdit bench --diff-against``); GELU evaluated in
float32 instead would move 5% of fp8 codes.

Group-wise fc2 inputs (128-wide groups): one scale per token and group, from a group-wise fc1's bf16
output (``sa=None``: that fc1 applies its scales inside its GEMM, ``kernels.scaled_gemm``).

Used by the real path for every DiT ``Mlp`` it can serve (``RealOptions.fused_mlp``). Measured at
batch 256 (back-to-back calls): 397-402 us (fp8) / 457-477 us (int8) with ``tanh.approx``, against
XLA's 886-897 (docs/RESULTS.md). The same tiling moving the same bytes without the math runs 311-315 us
(2.9 TB/s), and so does this kernel without fc1's scale / bias epilogue (``sa=None`` on the same
product): the ~90 us over the floor is that epilogue (its per-column scale and bias loads, 8 bytes per
element against the product's 2), which neither rows sharing those loads, nor persistent programs
keeping them in registers, nor a bf16x2 GELU removed (nineteenth session). ``fast``, ``recompute``
and the other GELU modes are kept for ``scripts/bench_block_ops.py --sections fc2in``.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qdit_jax.quant.config import QuantSpec
from qdit_jax.quant.kernels.row_quant import check_row_spec, check_row_tiling, codes_dtype, scale_and_codes

BLOCK_M, CHUNK, NUM_WARPS = 1, 512, 4  # the fastest tiling measured on the H100
# group-wise codes (128-wide groups: 128-wide pieces, one reduction each): 4 rows per program, measured
# on the H100 at XL/2's batch 256: fp8 396 us, int8 520 us, against 839 / 909 us at one row
GROUP_BLOCK_M = 4


def gelu_quant_applies(m: int, n: int, spec: QuantSpec, *, block_m: int | None = None, chunk: int = CHUNK,
                       platform: str | None = None) -> tuple[bool, str]:
    """Whether the kernel can take an (M, N) fc1 product to fc2's codes (per token, or per token and
    group as ``spec`` says), and if not, why."""
    chunk = group_chunk(spec, n, chunk)
    block_m = default_block_m(spec) if block_m is None else block_m
    why = check_row_tiling(m, n, block_m, chunk, platform) or check_row_spec(spec)
    group = spec.group_size or n
    if not why and (group % chunk or n % group):
        why = f"groups of {group} channels are not whole {chunk}-wide pieces of N = {n}"
    return (not why), (why or "ok")


def default_block_m(spec: QuantSpec) -> int:
    """Rows per program: BLOCK_M per token, GROUP_BLOCK_M for group-wise codes."""
    return GROUP_BLOCK_M if spec.group_size else BLOCK_M


def group_chunk(spec: QuantSpec, n: int, chunk: int = CHUNK) -> int:
    """The piece width for ``spec``'s groups: ``chunk``, narrowed to the group when that is narrower."""
    return min(chunk, spec.group_size or n)


GELU_MODES = ("dtype", "consts", "float32")
GELU_C1, GELU_C2 = float(np.sqrt(2 / np.pi)), 0.044715  # tanh GELU: 0.5 y (1 + tanh(C1 (y + C2 y^3)))


def _gelu(y: jax.Array, dtype: Any, mode: str, fast: bool, approx_tanh: bool = False) -> jax.Array:
    """tanh GELU of float32 ``y`` (holding ``dtype`` values), as ``jax.nn.gelu(approximate=True)``
    evaluates it on a ``dtype`` array: ``mode`` 'dtype' rounds every step and its constants to
    ``dtype``; 'consts' rounds the constants only (XLA's fusions keep float32 between steps);
    'float32': neither. ``fast``: tanh written as 2 sigmoid(2u) - 1 with one ``exp``."""
    if mode not in GELU_MODES:
        raise ValueError(f"gelu mode must be one of {GELU_MODES}, got {mode!r}")
    if mode == "float32":
        dtype = jnp.float32
    c1, c2 = (float(np.asarray(c, dtype=jnp.dtype(dtype))) for c in (GELU_C1, GELU_C2))

    def r(v: jax.Array) -> jax.Array:
        return v.astype(dtype).astype(jnp.float32) if mode == "dtype" else v

    v = r(r(y + r(r(r(y * y) * y) * c2)) * c1)
    if approx_tanh:  # the GPU's tanh.approx.f32 (max relative error ~2^-11): fewer instructions
        from jax.experimental.pallas import triton as plgpu

        th = plgpu.approx_tanh(v)
    else:
        th = 2.0 / (1.0 + jnp.exp(-2.0 * v)) - 1.0 if fast else jnp.tanh(v)
    return r(y * r(r(r(th) + 1.0) * 0.5))


def _kernel(*refs, block_m: int, chunk: int, n_chunks: int, group_chunks: int, spec: QuantSpec, out_dtype: Any,
            fast: bool, recompute: bool, gelu: str, approx_tanh: bool, epilogue: bool, add_round: bool):
    from jax.experimental import pallas as pl

    p_ref, sa_ref, sw_ref, b_ref, q_ref, s_ref = refs if epilogue else (refs[0], None, None, None, *refs[1:])
    rows = pl.ds(pl.program_id(0) * block_m, block_m)
    sa = sa_ref[0, rows] if epilogue else None

    def gelu_chunk(j: int) -> jax.Array:
        cols = pl.ds(j * chunk, chunk)
        y = p_ref[rows, cols].astype(jnp.float32)
        if epilogue:
            y = y * sa[:, None] * sw_ref[0, cols][None, :] + b_ref[cols].astype(jnp.float32)[None, :]
        y = y.astype(out_dtype).astype(jnp.float32)
        h = _gelu(y, out_dtype, gelu, fast, approx_tanh).astype(out_dtype)
        return h if hold else h.astype(jnp.float32)

    # unrolled over the row's chunks; either every chunk stays in registers, or (``recompute``) the
    # codes pass recomputes them, its loads hitting L2, so more rows share each sw / bias load
    # (per group of pieces when the spec is group-wise: one group is the whole row). Per token the
    # row waits in the layer dtype its values are rounded to (``hold``; bf16: half the registers of
    # float32, 1.5-2% faster for fp8 and 3-4% for int8 on the H100, RESULTS.md nineteenth session;
    # group-wise codes keep float32, as measured before)
    hold = not spec.group_size
    for gi in range(n_chunks // group_chunks):
        js = range(gi * group_chunks, (gi + 1) * group_chunks)
        hs, amax = [], None
        for j in js:
            h = gelu_chunk(j)
            amax = jnp.abs(h) if amax is None else jnp.maximum(amax, jnp.abs(h))  # elementwise: no cross-thread step
            if not recompute:
                hs.append(h)
        amax = jnp.max(amax, axis=1).astype(jnp.float32)  # one row reduction per group
        if recompute:
            hs = [gelu_chunk(j) for j in js]
        s, codes = scale_and_codes([h.astype(jnp.float32) for h in hs], amax, spec, fast, add_round)
        for j, q in zip(js, codes):
            q_ref[rows, pl.ds(j * chunk, chunk)] = q
        s_ref[gi, rows] = s


def gelu_quant_pallas(p: jax.Array, sa: jax.Array | None, sw: jax.Array | None, bias: jax.Array | None,
                      spec: QuantSpec, out_dtype: Any, *, block_m: int | None = None, chunk: int = CHUNK,
                      num_warps: int = NUM_WARPS, fast: bool = False, recompute: bool = False, gelu: str = "dtype",
                      approx_tanh: bool = True, interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """fc2's codes (M, N) and scales (G, M) (per token: G = 1; or per token and group as ``spec``
    says) from fc1's raw product ``p`` (M, N), its per-token activation scales ``sa`` (1, M),
    per-channel weight scales ``sw`` (1, N) and bias; or, with ``sa`` None, from fc1's output ``p``
    itself (a group-wise fc1 applies its scales inside its GEMM)."""
    from jax.experimental import pallas as pl

    m, n = p.shape
    chunk = group_chunk(spec, n, chunk)
    block_m = default_block_m(spec) if block_m is None else block_m
    group = spec.group_size or n
    if group % chunk or n % group:
        raise ValueError(f"gelu_quant_pallas: groups of {group} channels are not whole {chunk}-wide pieces of N = {n}")
    epilogue = sa is not None
    kern = functools.partial(_kernel, block_m=block_m, chunk=chunk, n_chunks=n // chunk, group_chunks=group // chunk,
                             spec=spec, out_dtype=jnp.dtype(out_dtype), fast=fast, recompute=recompute, gelu=gelu,
                             approx_tanh=approx_tanh and not interpret,  # an inline PTX instruction
                             add_round=not interpret,  # (XLA evaluates an interpreted body: row_quant.int8_codes)
                             epilogue=epilogue)
    args = (p, sa, sw, jnp.zeros((n,), jnp.float32) if bias is None else bias) if epilogue else (p,)
    kw: dict[str, Any] = {}
    if not interpret:
        from jax.experimental.pallas import triton as plgpu

        kw["compiler_params"] = plgpu.CompilerParams(num_warps=num_warps, num_stages=1)
    out_shape = (jax.ShapeDtypeStruct((m, n), codes_dtype(spec)), jax.ShapeDtypeStruct((n // group, m), jnp.float32))
    return pl.pallas_call(kern, out_shape=out_shape, grid=(m // block_m,), interpret=interpret, **kw)(*args)


def gelu_quant_xla(p: jax.Array, sa: jax.Array | None, sw: jax.Array | None, bias: jax.Array | None,
                   spec: QuantSpec, out_dtype: Any) -> tuple[jax.Array, jax.Array]:
    """The unfused real path's formulation (``group_gemm_xla``'s epilogue at G = 1 unless ``sa`` is
    None, the model's GELU, ``quantize_act`` as ``spec`` groups): the kernel's reference on the GPU
    (the per-layer path computes the same when the kernel does not apply)."""
    from qdit_jax.quant.real_layers import quantize_act

    y = p.astype(jnp.float32)
    if sa is not None:
        y = y * sa[0][:, None] * sw[0][None, :]
        if bias is not None:
            y = y + bias.astype(jnp.float32)
    h = jax.nn.gelu(y.astype(out_dtype), approximate=True)
    return quantize_act(h, spec, spec.group_size or p.shape[1])
