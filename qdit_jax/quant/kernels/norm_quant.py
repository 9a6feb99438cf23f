"""Per-token (or per-token-and-group) activation quantization in one pass, optionally with the adaLN
LayerNorm + modulation that produces the activation: a Pallas (Triton) kernel, its guard and the XLA
formulation it replaces. A group-wise spec (groups of whole ``chunk``-wide pieces, e.g. Q-DiT's 128)
gets one scale per token and group, scales (K // group, M).

Why: in the real W8A8 / fp8 DiT, XLA runs every per-token quantized input as three passes over
memory: the producer writes the bf16 activation (for qkv and fc1 inputs: LayerNorm + modulate),
an abs-max reduction reads it, a quantize pass reads it again and writes the codes. At DiT-XL/2's
batch 256 that is ~680 MB per input instead of the ~230 MB of reading the source once and writing
codes once (profile in docs/RESULTS.md). A program here owns ``block_m`` whole rows (K = 1,152 in
``chunk``-wide pieces held in registers) and goes from the source row to codes and a scale:

* ``norm=False``: ``x`` is the activation itself (the proj input: attention's output);
* ``norm=True``: ``x`` is the block's residual stream and the activation is
  ``modulate(layer_norm(x, eps), shift, scale)`` with per-sample ``shift`` / ``scale`` (B, K), rows
  grouped ``tokens`` per sample, evaluated as ``models.dit.ModulatedNorm`` evaluates it: the norm in
  float32, rounded to the layer dtype, then each modulation step rounded to it.

The codes are the quantizer's (``row_quant.scale_and_codes``). The LayerNorm's mean and variance sum
in a different order from XLA's fusion, which can move a normalized value by an ulp of the layer
dtype and so a code or, through the row's maximum, a row's scale: the GPU comparison
(``scripts/bench_block_ops.py --sections normq``) reports how many.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from qdit_jax.quant.config import QuantSpec
from qdit_jax.quant.kernels.row_quant import (check_row_spec, check_row_tiling, codes_dtype, row_amax, row_sum,
                                              scale_and_codes)

BLOCK_M, CHUNK, NUM_WARPS = 1, 128, 1  # the fastest tiling measured on the H100 (RESULTS.md)
_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))


def norm_quant_applies(m: int, k: int, spec: QuantSpec, dtype: Any, *, tokens: int = 0, block_m: int = BLOCK_M,
                       chunk: int = CHUNK, platform: str | None = None) -> tuple[bool, str]:
    """Whether the kernel can quantize an (M, K) activation as ``spec`` says (per token, or per
    token and group of input channels; ``tokens`` > 0: rows of ``tokens``-token samples through the
    LayerNorm + modulation), and if not, why."""
    why = check_row_tiling(m, k, block_m, chunk, platform, dims="(M, K)")
    group = spec.group_size or k
    if not why and (group % chunk or k % group):
        why = f"groups of {group} channels are not whole {chunk}-wide pieces of K = {k}"
    if not why and tokens and tokens % block_m:
        why = f"{tokens} tokens per sample is not a multiple of block_m {block_m}"
    if not why and jnp.dtype(dtype) not in _DTYPES:
        why = f"activations of dtype {jnp.dtype(dtype)}"
    why = why or check_row_spec(spec)
    return (not why), (why or "ok")


def _kernel(*refs, block_m: int, chunk: int, n_chunks: int, group_chunks: int, spec: QuantSpec, norm: bool,
            tokens: int, eps: float, dtype: Any, add_round: bool):
    from jax.experimental import pallas as pl

    if norm:
        x_ref, shift_ref, scale_ref, q_ref, s_ref = refs
    else:
        x_ref, q_ref, s_ref = refs
    pid = pl.program_id(0)
    rows = pl.ds(pid * block_m, block_m)
    cols = [pl.ds(j * chunk, chunk) for j in range(n_chunks)]
    h = [x_ref[rows, c].astype(jnp.float32) for c in cols]
    if norm:
        def r(v: jax.Array) -> jax.Array:  # round to the layer dtype, as each XLA step on it does
            return v.astype(dtype).astype(jnp.float32)

        k = float(n_chunks * chunk)
        mean = row_sum(h) / k
        h = [v - mean for v in h]
        inv = jax.lax.rsqrt(row_sum([v * v for v in h]) / k + eps)
        sample = pl.ds((pid * block_m) // tokens, 1)
        h = [r(r(r(v * inv) * r(1.0 + scale_ref[sample, c].astype(jnp.float32)))
               + shift_ref[sample, c].astype(jnp.float32)) for v, c in zip(h, cols)]
    for gi in range(n_chunks // group_chunks):  # one scale per group of pieces (one group: per token)
        hg = h[gi * group_chunks:(gi + 1) * group_chunks]
        s, codes = scale_and_codes(hg, row_amax(hg), spec, add_round=add_round)
        for q, c in zip(codes, cols[gi * group_chunks:(gi + 1) * group_chunks]):
            q_ref[rows, c] = q
        s_ref[gi, rows] = s


def norm_quant_pallas(x: jax.Array, spec: QuantSpec, *, shift: jax.Array | None = None,
                      scale: jax.Array | None = None, tokens: int = 0, eps: float = 1e-6, block_m: int = BLOCK_M, chunk: int = CHUNK, num_warps: int = NUM_WARPS,
                      interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """Per-token codes (M, K) and scales (1, M) of ``x`` (M, K), or, given ``shift`` / ``scale``
    (B, K) and ``tokens`` (M = B * tokens), of ``modulate(layer_norm(x, eps), shift, scale)``;
    with a group-wise ``spec``: one scale per token and group of channels, scales (K // group, M)."""
    from jax.experimental import pallas as pl

    m, k = x.shape
    norm = shift is not None
    if norm and (scale is None or tokens <= 0 or shift.shape != scale.shape or shift.shape[0] * tokens != m):
        raise ValueError(f"norm_quant_pallas: shift / scale of shape (B, K) with B * tokens = M={m} needed, got "
                         f"{None if shift is None else shift.shape}, {None if scale is None else scale.shape}, "
                         f"tokens={tokens}")
    group = spec.group_size or k
    if group % chunk or k % group:
        raise ValueError(f"norm_quant_pallas: groups of {group} channels are not whole {chunk}-wide pieces of K = {k}")
    kern = functools.partial(_kernel, block_m=block_m, chunk=chunk, n_chunks=k // chunk, group_chunks=group // chunk,
                             spec=spec, norm=norm, tokens=tokens, eps=float(eps), dtype=x.dtype,
                             add_round=not interpret)  # (XLA evaluates an interpreted body: row_quant.int8_codes)
    args = (x, shift, scale) if norm else (x,)
    kw: dict[str, Any] = {}
    if not interpret:
        from jax.experimental.pallas import triton as plgpu

        kw["compiler_params"] = plgpu.CompilerParams(num_warps=num_warps, num_stages=1)
    out_shape = (jax.ShapeDtypeStruct((m, k), codes_dtype(spec)), jax.ShapeDtypeStruct((k // group, m), jnp.float32))
    return pl.pallas_call(kern, out_shape=out_shape, grid=(m // block_m,), interpret=interpret, **kw)(*args)


def norm_quant_xla(x: jax.Array, spec: QuantSpec, *, shift: jax.Array | None = None, scale: jax.Array | None = None,
                   tokens: int = 0, eps: float = 1e-6) -> tuple[jax.Array, jax.Array]:
    """The unfused real path's formulation (the model's ``ModulatedNorm``, then ``quantize_act`` per
    token or per group): the kernel's reference."""
    from qdit_jax.models.dit import layer_norm, modulate
    from qdit_jax.quant.real_layers import quantize_act

    m, k = x.shape
    if shift is not None:
        x3 = modulate(layer_norm(x.reshape(m // tokens, tokens, k), eps), shift, scale)
        x = x3.reshape(m, k)
    return quantize_act(x, spec, spec.group_size or k)
