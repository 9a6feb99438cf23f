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
batch 256 (back-to-back calls): 408 us (fp8) / 468 us (int8) with ``tanh.approx``, 468 / 635 with
``tanhf``, against XLA's 886 / 882 (docs/RESULTS.md); its byte floor is ~300 us. ``fast``,
``recompute`` and the other GELU modes are kept for ``scripts/bench_block_ops.py --sections fc2in``.
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


GELU_MODES = ("dtype", "consts", "float32", "bf16x2")
HOLDS = ("float32", "dtype")  # how a row's GELU outputs wait in registers for its scale


def _gelu(y: jax.Array, dtype: Any, mode: str, fast: bool, approx_tanh: bool = False) -> jax.Array:
    """tanh GELU of float32 ``y`` (holding ``dtype`` values), as ``jax.nn.gelu(approximate=True)``
    evaluates it on a ``dtype`` array: ``mode`` 'dtype' rounds every step and its constants to
    ``dtype``; 'consts' rounds the constants only (XLA's fusions keep float32 between steps);
    'float32': neither; 'bf16x2': 'dtype' on bf16 with tanh.approx.f32, two values per instruction
    (:func:`_gelu_bf16x2`; 'dtype' itself where no inline PTX runs: ``approx_tanh`` off, interpret
    mode). ``fast``: tanh written as 2 sigmoid(2u) - 1 with one ``exp``."""
    if mode not in GELU_MODES:
        raise ValueError(f"gelu mode must be one of {GELU_MODES}, got {mode!r}")
    if mode == "bf16x2":
        if jnp.dtype(dtype) != jnp.dtype(jnp.bfloat16):
            raise ValueError(f"gelu mode 'bf16x2' evaluates a bf16 layer's GELU, not {jnp.dtype(dtype)}")
        if approx_tanh:
            return _gelu_bf16x2(y.astype(jnp.bfloat16)).astype(jnp.float32)
        mode = "dtype"
    if mode == "float32":
        dtype = jnp.float32
    c1, c2 = (float(np.asarray(c, dtype=jnp.dtype(dtype))) for c in (np.sqrt(2 / np.pi), 0.044715))

    def r(v: jax.Array) -> jax.Array:
        return v.astype(dtype).astype(jnp.float32) if mode == "dtype" else v

    v = r(r(y + r(r(r(y * y) * y) * c2)) * c1)
    if approx_tanh:  # the GPU's tanh.approx.f32 (max relative error ~2^-11): fewer instructions
        from jax.experimental.pallas import triton as plgpu

        th = plgpu.approx_tanh(v)
    else:
        th = 2.0 / (1.0 + jnp.exp(-2.0 * v)) - 1.0 if fast else jnp.tanh(v)
    return r(y * r(r(r(th) + 1.0) * 0.5))


def _bf16_pair(c: float) -> str:
    """A bf16x2 immediate holding ``c`` (rounded to bf16) in both halves."""
    bits = int(np.asarray(c, dtype=jnp.bfloat16).view(np.uint16))
    return f"0x{bits:04X}{bits:04X}"


def _gelu_bf16x2(y: jax.Array) -> jax.Array:
    """Mode 'dtype' with tanh.approx.f32 on a bf16 array, as inline PTX on bf16 pairs (Hopper): each
    step a bf16x2 multiply or add, which rounds once to bf16 as 'dtype' rounds each float32 step (a
    product of two bf16 values is exact in float32; so is a sum unless the exponents differ by more
    than 16 bits, and then both give the larger operand), the tanh in float32 on the unpacked pair.
    7 bf16x2 operations + 2 MUFU + 5 moves per pair against ~15 float32 instructions per value, in a
    kernel whose instructions, not its bytes, set its time (RESULTS.md, nineteenth session)."""
    from jax.experimental.pallas import triton as plgpu

    asm = f"""{{
    .reg .b32 g<12>;
    .reg .f32 f<2>;
    mov.b32 g0, {_bf16_pair(0.044715)};
    mov.b32 g1, {_bf16_pair(float(np.sqrt(2 / np.pi)))};
    mul.rn.bf16x2 g2, $1, $1;
    mul.rn.bf16x2 g3, g2, $1;
    mul.rn.bf16x2 g4, g3, g0;
    add.rn.bf16x2 g5, $1, g4;
    mul.rn.bf16x2 g6, g5, g1;
    shl.b32 g7, g6, 16;
    and.b32 g8, g6, 0xFFFF0000;
    mov.b32 f0, g7;
    mov.b32 f1, g8;
    tanh.approx.f32 f0, f0;
    tanh.approx.f32 f1, f1;
    cvt.rn.bf16x2.f32 g9, f1, f0;
    mov.b32 g10, {_bf16_pair(1.0)};
    add.rn.bf16x2 g9, g9, g10;
    mov.b32 g11, {_bf16_pair(0.5)};
    mul.rn.bf16x2 g9, g9, g11;
    mul.rn.bf16x2 $0, $1, g9;
    }}"""
    (out,) = plgpu.elementwise_inline_asm(asm, args=[y], constraints="=r,r", pack=2,
                                          result_shape_dtypes=[jax.ShapeDtypeStruct(y.shape, jnp.bfloat16)])
    return out


def _kernel(*refs, block_m: int, chunk: int, n_chunks: int, group_chunks: int, spec: QuantSpec, out_dtype: Any,
            fast: bool, recompute: bool, gelu: str, approx_tanh: bool, epilogue: bool, programs: int, row_blocks: int,
            hold: str, hoist: bool, split: bool, stream: dict):
    from jax.experimental import pallas as pl

    p_ref, sa_ref, sw_ref, b_ref, q_ref, s_ref = refs if epilogue else (refs[0], None, None, None, *refs[1:])
    cols = [pl.ds(j * chunk, chunk) for j in range(n_chunks)]
    consts = None
    if epilogue and hoist:  # per-channel scales and bias, loaded once per program (persistent form)
        consts = [(sw_ref[0, c][None, :], b_ref[c].astype(jnp.float32)[None, :]) for c in cols]

    def row_block(rb: Any) -> None:
        # ``split``: the block's rows as separate (1, chunk) pieces sharing each chunk's scale / bias
        # load (a 2-D block's layout spreads its rows over warps, so each row loads them again)
        slices = ([pl.ds(rb * block_m + i, 1) for i in range(block_m)] if split else [pl.ds(rb * block_m, block_m)])
        sas = [sa_ref[0, rows] if epilogue else None for rows in slices]

        def epi(j: int) -> tuple[jax.Array, jax.Array] | None:
            if not epilogue:
                return None
            return consts[j] if consts else (sw_ref[0, cols[j]][None, :], b_ref[cols[j]].astype(jnp.float32)[None, :])

        def gelu_chunk(j: int, i: int, c: tuple[jax.Array, jax.Array] | None) -> jax.Array:
            if stream:  # read once: through L2 only (ld.global.cg), leaving L1 to the scales and bias
                from jax.experimental.pallas import triton as plgpu

                y = plgpu.load(p_ref.at[slices[i], cols[j]], **stream).astype(jnp.float32)
            else:
                y = p_ref[slices[i], cols[j]].astype(jnp.float32)
            if c is not None:
                y = y * sas[i][:, None] * c[0] + c[1]
            y = y.astype(out_dtype).astype(jnp.float32)
            h = _gelu(y, out_dtype, gelu, fast, approx_tanh).astype(out_dtype)
            return h if hold == "dtype" else h.astype(jnp.float32)

        # unrolled over the row's chunks; either every chunk stays in registers (as float32, or as the
        # layer dtype its values are rounded to: ``hold``), or (``recompute``) the codes pass recomputes
        # them, its loads hitting L2 (per group of pieces when the spec is group-wise: one group is the row)
        for gi in range(n_chunks // group_chunks):
            js = range(gi * group_chunks, (gi + 1) * group_chunks)
            hs, amax = [[] for _ in slices], [None for _ in slices]
            for j in js:
                c = epi(j)
                for i in range(len(slices)):
                    h = gelu_chunk(j, i, c)
                    # elementwise across pieces: no cross-thread step until the row's last piece
                    amax[i] = jnp.abs(h) if amax[i] is None else jnp.maximum(amax[i], jnp.abs(h))
                    if not recompute:
                        hs[i].append(h)
            for i, rows in enumerate(slices):
                row_max = jnp.max(amax[i], axis=1).astype(jnp.float32)  # one row reduction per group
                hi = [gelu_chunk(j, i, epi(j)) for j in js] if recompute else hs[i]
                s, codes = scale_and_codes([h.astype(jnp.float32) for h in hi], row_max, spec, fast)
                for j, q in zip(js, codes):
                    q_ref[rows, cols[j]] = q
                s_ref[gi, rows] = s

    if not programs:
        row_block(pl.program_id(0))
        return
    pid = pl.program_id(0)

    def step(i: Any, carry: Any) -> Any:
        rb = i * programs + pid
        pl.when(rb < row_blocks)(lambda: row_block(rb))
        return carry

    jax.lax.fori_loop(0, -(-row_blocks // programs), step, 0)


def gelu_quant_pallas(p: jax.Array, sa: jax.Array | None, sw: jax.Array | None, bias: jax.Array | None,
                      spec: QuantSpec, out_dtype: Any, *, block_m: int | None = None, chunk: int = CHUNK,
                      num_warps: int = NUM_WARPS, fast: bool = False, recompute: bool = False, gelu: str = "dtype",
                      approx_tanh: bool = True, programs: int = 0, hold: str = "float32", hoist: bool = True,
                      split: bool = False, stream: tuple = (),
                      num_stages: int = 1, interpret: bool = False) -> tuple[jax.Array, jax.Array]:
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
    if hold not in HOLDS:
        raise ValueError(f"hold must be one of {HOLDS}, got {hold!r}")
    row_blocks = m // block_m
    kern = functools.partial(_kernel, block_m=block_m, chunk=chunk, n_chunks=n // chunk, group_chunks=group // chunk,
                             spec=spec, out_dtype=jnp.dtype(out_dtype), fast=fast, recompute=recompute, gelu=gelu,
                             approx_tanh=approx_tanh and not interpret,  # an inline PTX instruction
                             epilogue=epilogue, programs=programs, row_blocks=row_blocks, hold=hold,
                             hoist=hoist and bool(programs), split=split and block_m > 1,
                             stream={} if interpret else dict(stream))
    args = (p, sa, sw, jnp.zeros((n,), jnp.float32) if bias is None else bias) if epilogue else (p,)
    kw: dict[str, Any] = {}
    if not interpret:
        from jax.experimental.pallas import triton as plgpu

        kw["compiler_params"] = plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    out_shape = (jax.ShapeDtypeStruct((m, n), codes_dtype(spec)), jax.ShapeDtypeStruct((n // group, m), jnp.float32))
    grid = (min(programs, row_blocks) if programs else row_blocks,)
    return pl.pallas_call(kern, out_shape=out_shape, grid=grid, interpret=interpret, **kw)(*args)


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
