"""One planned layer in real low precision (the real mode's execution; ``quant.real`` builds the
stored weights and runs the model through its interceptor).

``real_dense`` runs a Dense from its stored codes: the input quantized on the fly (per token, or
per token and group), the product on int8 / fp8 operands in XLA (``lax.dot_general``, int32 /
float32 accumulation) or in the group-wise Pallas kernel, the scales and bias applied after. The
GPU routes replace several XLA passes by one kernel where its guard allows: per-token inputs in one
pass, from the residual stream through the adaLN LayerNorm + modulation when a ``ModulatedNorm``
feeds the layer (``kernels.norm_quant``); each DiT MLP's middle step as one pass
(``kernels.gelu_quant``); q, k, v, and proj / fc2 with the block's gated residual, as Hopper GEMMs
with the scales in their epilogue (``kernels.scaled_gemm``); group-128 fp8 / int8 layers through the
same GEMM with the group scales in its K loop, their inputs through the same row kernels. Each route
computes the XLA path's function; the interceptor (``quant.real``) decides which applies.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from qdit_jax.errors import QditError
from qdit_jax.models.dit import Mlp
from qdit_jax.quant.config import LayerQuant
from qdit_jax.quant.interceptor import module_path
from qdit_jax.quant.kernels.gelu_quant import gelu_quant_applies, gelu_quant_pallas
from qdit_jax.quant.kernels.group_gemm import (Tiles, fit_tiles, group_gemm_pallas, group_gemm_xla, kernel_applies,
                                               low_bit_product, weight_codes_int8)
from qdit_jax.quant.kernels.norm_quant import norm_quant_applies, norm_quant_pallas
from qdit_jax.quant.kernels.scaled_gemm import (CODE_DTYPES, GELU_MODES, GROUP_MODES, PREFETCH_MODES, TILE_K, TILE_N,
                                                codes_wg_available, cta_pairs_fit, default_tiling, group_mode_for,
                                                epilogue_wg_residual_fits, scaled_gemm_applies, scaled_gemm_mosaic)
from qdit_jax.quant.quantizers import QuantSpec, _int_codes, params_of_groups

BACKENDS = ("auto", "xla", "pallas")
FLOAT_PRODUCTS = ("auto", "float32", "bfloat16", "float16")


class RealWeight(NamedTuple):
    """Stored form of one layer: ``codes`` (N, K) int8 / fp8, or (N, K // 2) uint8 for packed
    4-bit; ``scale`` (G, N) float32 (or float16 / bfloat16: the spec's ``scale_dtype``); ``zero``
    (G, N) float32 shifted zero point (asymmetric int weights) or None; ``bias`` (N,) float32 or
    None. G is the layer's effective group count."""

    codes: jax.Array
    scale: jax.Array
    zero: jax.Array | None
    bias: jax.Array | None


@dataclasses.dataclass(frozen=True)
class RealOptions:
    """``backend``: 'auto' (per-channel layers in XLA, group-wise layers through the Pallas kernel
    where it applies), 'xla' (XLA everywhere) or 'pallas' (the kernel wherever it applies);
    ``fuse_quant``: quantize activations inside the kernel where it can."""

    backend: str = "auto"
    tiles: Tiles = Tiles()
    fuse_quant: bool = False
    # optimization_barrier on the activation codes before an XLA GEMM, so XLA cannot fuse the
    # quantize pass into the GEMM (which would move it off cuBLAS' int8 kernel)
    materialize: bool = False
    # quantize activations with the one-pass Pallas kernel (kernels.act_quant) where its guard allows
    quant_kernel: bool = False
    # XLA path: keep the low-bit GEMM a plain cuBLAS call and run the scale epilogue as its own pass;
    # measured faster for the whole XL/2 forward on the H100 (1,938 vs 1,684 images/s, RESULTS.md):
    # the pass merges with the consumer's elementwise work while the GEMM stays on cuBLAS
    split_epilogue: bool = True
    # fp8 GEMMs: dtype of the raw product ('auto': the layer's output dtype when it is 16-bit, else
    # float32). cuBLAS accumulates in float32 either way; a bf16 product halves the bytes written
    # (fc1 at batch 256: 710 us vs 1,008 us for a float32 product) and rounds like the bf16 model does.
    float_product: str = "auto"
    # a SplitQKVDense (DiTConfig.qkv_gemms="split") as three quantized column-block GEMMs, as the
    # float model runs it, instead of one GEMM of the full width; off by default: in real mode the
    # scale epilogue pass writes q, k, v anyway, so the slices cost nothing there (RESULTS.md)
    split_qkv: bool = False
    # an MLP whose fc1 is per-channel and whose fc2 input is quantized per token (int8 / fp8): fc1's
    # scale epilogue, the GELU and fc2's activation quantization in one Pallas pass
    # (kernels.gelu_quant) where its guard allows (GPU). Same outputs bit for bit on an H100; real
    # fp8 XL/2 forward 1.012x -> 1.109x bf16, int8 0.871x -> 0.921x (docs/RESULTS.md)
    fused_mlp: bool = True
    # a per-token quantized layer fed straight by a ModulatedNorm (DiT's qkv and fc1): its codes
    # computed from the norm's input in one Pallas pass (LayerNorm + modulate + abs-max + codes,
    # kernels.norm_quant) where the guard allows (GPU), instead of XLA writing the modulated
    # activation and reading it twice
    fused_norm: bool = True
    # other per-token quantized inputs (DiT's proj input) through the same kernel without the norm:
    # one read and one write instead of XLA's abs-max pass and quantize pass
    row_quant: bool = True
    # a SplitQKVDense with fp8 or int8 codes (per-channel weights, per-token inputs, bf16 output): q, k,
    # v each from one Mosaic GPU GEMM that applies the scales and bias in its epilogue
    # (kernels.scaled_gemm) where the guard allows (Hopper), instead of cuBLAS + an epilogue pass
    # writing q, k, v. Real fp8 XL/2 forward at batch 256: 1.270x -> 1.332x bf16 (docs/RESULTS.md)
    qkv_kernel: bool = True
    # a GatedResidual ``x + gate * y`` whose ``y`` is such a GEMM's bf16 output (DiT's proj and fc2):
    # the GEMM rerun by the same kernel with the scales, bias and gated residual in its epilogue
    # instead of cuBLAS + XLA's epilogue-and-residual pass (XLA drops the GEMM it emitted first).
    # Real fp8 XL/2 at batch 256: 1.355x -> 1.402x bf16
    residual_kernel: bool = True
    # with qkv_kernel, q, k and v from one kernel call writing the three outputs (one tile schedule over
    # all 27 column tiles, the input codes read once) instead of one call per output
    qkv_one_call: bool = True
    # with qkv_kernel, where a per-channel qkv epilogue's scale / bias vectors are loaded (kernels.scaled_gemm
    # ``prefetch``: None, 'before' the K loop, 'after' it in one batch). With qkv_one_call, XL/2 at batch
    # 256 on the H100: q, k, v 491 us in three calls, 467-473 in one, 456-465 in one with 'before'; the
    # fp8 forward 1.394x / 1.406x / 1.410x bf16 (RESULTS.md, nineteenth session). Group-wise layers
    # load them where used (their 64-row tiles have no registers to spare: not measured)
    qkv_prefetch: str | None = "before"
    # group-wise fp8 / int8 layers (128-wide groups on both operands, symmetric weights, bf16 output)
    # through the same Mosaic GPU GEMM with the group scales applied per K step inside its
    # accumulation, where the guard allows (Hopper), instead of the Triton group kernel
    # (kernels.group_gemm) or XLA's batched product; with it the group-wise inputs go through the
    # one-pass quantize kernels and the MLP middle step through kernels.gelu_quant
    group_kernel: bool = True
    # with group_kernel, a group-wise MLP's fc1 writes fc2's 128-wide group codes and scales from its
    # own epilogue (GELU + group abs-max + codes in registers: kernels.scaled_gemm ``gelu_codes``)
    # instead of its bf16 output and gelu_quant's pass over it. XL/2 on the H100 (same call): fp8 g128
    # 1.056x -> 1.069x / 1.066x bf16 at batch 64 / 256, int8 g128 0.980x -> 0.984x, 0.986x -> 1.008x
    gelu_epilogue: bool = True
    # the group-scaled GEMM's schedule (kernels.scaled_gemm.GROUP_MODES); None: its default, 'split' for
    # every code type (group_mode_for)
    group_mode: str | None = None
    # kernels.scaled_gemm's pipeline chained across each CTA's output tiles (the next tile's first
    # loads during this tile's last K steps and epilogue); False: a pipeline per tile, as before
    chain_tiles: bool = True
    # with gelu_epilogue, fc1's GELU + codes on a fourth warpgroup of the kernel while its compute
    # warpgroups go on with the next tile (kernels.scaled_gemm ``codes_wg``; fc1 then 'split' unless
    # group_mode says otherwise) instead of in the compute warpgroups while the tensor cores wait.
    # None: on for int8 codes (where this JAX's Pallas allows it), off for fp8 (XL/2 on the H100:
    # docs/RESULTS.md, sixteenth session)
    codes_wg: bool | None = None
    # per-channel fp8 layers on kernels.scaled_gemm (qkv; fc2 with the gated residual, see
    # residual_epilogue_wg; fc1 with fc1_kernel): the scale / bias (/ gated residual) epilogue and the
    # store on a fourth warpgroup while the compute warpgroups go on with the next tile's K loop
    # (``epilogue_wg``; the same bits). None: on where this JAX's Pallas allows it. XL/2 at batch 256 on
    # the H100: q, k, v 458-467 -> 415-422 us, fc2 + residual 560 -> 515, the fp8 forward 1.40x -> 1.43-1.45x
    # bf16 (docs/RESULTS.md, twentieth session). True also puts group-wise layers' epilogue there (a
    # float32 stage): bit-equal, but slower for fp8 and within noise for int8's forward (same session)
    epilogue_wg: bool | None = None
    # with epilogue_wg, also the gated residual GEMMs whose K is long enough (RESIDUAL_EPILOGUE_WG_MIN_K:
    # DiT's fc2, not proj)
    residual_epilogue_wg: bool = True
    # a per-channel MLP's fc1 on kernels.scaled_gemm with the scales and bias in its epilogue (fp8: the
    # fourth warpgroup's), writing fc1's bf16 output, and gelu_quant then without its per-column scale /
    # bias loads, instead of cuBLAS' raw product and gelu_quant applying them. None: int8 on, fp8 off.
    # fp8: XL/2's forward at batch 256 on the H100 ran 1.414x bf16 with it against 1.444x without (same
    # call; the kernel's fc1 542 us against cuBLAS' ~447-503; docs/RESULTS.md, twentieth session). int8:
    # cuBLAS writes an int32 product (1.2 GB at batch 256) that gelu_quant reads back, 598 + 610 us a block,
    # against the kernel's ~560 us (twenty-ninth session)
    fc1_kernel: bool | None = None
    # group-wise layers on kernels.scaled_gemm without a codes epilogue (q, k, v; proj and fc2 with the
    # gated residual): the TMA stores issued by a fourth warpgroup of 24 registers (``store_wg``; the
    # compute warpgroups keep their epilogue and 232 registers; the same bits). None: on where this JAX's
    # Pallas allows it. XL/2 at batch 256 on the H100: int8 g128 q, k, v 816 -> 704 us, fc2 + residual
    # 1,006 -> 864; fp8 643 -> 631, 780 -> 753 (docs/RESULTS.md, twenty-first session). Also fc1's codes
    # and scales where its codes epilogue stays in the compute warpgroups (fp8): fc1 + codes 977 -> 930 us,
    # the fp8 g128 forward 1.143x -> 1.155x bf16 (twenty-second session)
    store_wg: bool | None = None
    # group-wise layers on kernels.scaled_gemm whose epilogue runs in the compute warpgroups (or fc1's codes
    # warpgroup): the bias as the float32 group sums' initial value instead of an add in the epilogue
    # (``bias_first``: one FADD an element less while the tensor cores wait; the float32 sum's order
    # changes, outputs within a float32 rounding). None: fp8 on (XL/2 at batch 256 on the H100: fp8 g128
    # q, k, v 610 -> 606 us, proj + residual 293 -> 283, fc2 + residual 740 -> 734; the forward 1.144x ->
    # 1.151x bf16, same call), int8 off (q, k, v 746 -> 729, fc2 + residual 878 -> 915: not shown to pay;
    # docs/RESULTS.md, twenty-third session)
    bias_first: bool | None = None
    # layers on kernels.scaled_gemm: thread-block clusters of two CTAs on vertically adjacent tiles sharing
    # each K step's weight tile by TMA multicast (``cta_pairs``: half the weight traffic from L2; the same
    # bits), where M is a whole number of tile pairs. Opt-in: slower on the H100 (fp8 g128 forward 1.144x ->
    # 1.113x bf16, q, k, v 610 -> 624 us; twenty-third session; the tenth session's pairs were not faster)
    cta_pairs: bool = False
    # a group-wise MLP's fc1 writing fc2's codes from its epilogue: the GELU there evaluated as the bf16
    # model's ('dtype': every step rounded to bf16, the codes equal to the XLA path's) or on the float32
    # sums without roundings ('float32': fewer instructions an element; codes within a rounding of the XLA
    # path's, closer to exact arithmetic's). 'float32' by default: XL/2's fp8 fc1 + codes at batch 256 on
    # the H100 979 -> 887 us, the fp8 g128 forward 1.148x -> 1.170x bf16 (same call; docs/RESULTS.md,
    # twenty-third session)
    fc1_gelu: str = "float32"
    # group-wise layers in the 'split' group mode without a codes epilogue (q, k, v; proj and fc2 with the
    # gated residual): each compute warpgroup of kernels.scaled_gemm takes all the CTA tile's rows and half
    # its columns (``stacked``: 16 column scales a thread and K step instead of 32; the same bits). None: on
    # where it applies
    stacked: bool | None = None
    # with stacked parts, two groups a pipeline step (an odd count's last step one): four parts' wgmmas in
    # flight, three of four promotions under one (kernels.scaled_gemm ``group_pairs``; the same bits). Off:
    # built in the twenty-ninth session, not yet measured on a GPU (docs/PERF_NOTES.md)
    group_pairs: bool = False
    # a group-wise layer fed straight by the attention core (DiT's proj): its codes and scales written by
    # the attention kernel's epilogue (kernels.attention_codes) where the guard allows (Hopper, the Mosaic
    # attention's shapes), instead of the bf16 attention output and a quantize pass over it. Off by
    # default: XL/2 at batch 256 on the H100, attention + codes 399 -> 367 us (fp8) and 408 -> 400 (int8)
    # with the same bits, but the fp8 g128 forward 0.7% slower on average over three calls (-1.5% to
    # +0.7%; docs/RESULTS.md, twenty-sixth session)
    attention_codes: bool = False

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise QditError(f"real-mode backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.float_product not in FLOAT_PRODUCTS:
            raise QditError(f"float_product must be one of {FLOAT_PRODUCTS}, got {self.float_product!r}")
        if self.qkv_prefetch not in PREFETCH_MODES:
            raise QditError(f"qkv_prefetch must be one of {PREFETCH_MODES}, got {self.qkv_prefetch!r}")
        if self.fc1_gelu not in GELU_MODES:
            raise QditError(f"fc1_gelu must be one of {GELU_MODES}, got {self.fc1_gelu!r}")
        if self.group_mode is not None and self.group_mode not in GROUP_MODES:
            raise QditError(f"group_mode must be one of {GROUP_MODES} or None (the kernel's default), "
                            f"got {self.group_mode!r}")


def group_width(spec: QuantSpec | None, k: int) -> int:
    """The width of one operand's quantization groups along K (K itself when per channel / per token)."""
    return k if spec is None or spec.group_size == 0 else spec.group_size


def effective_group(lq: LayerQuant, k: int) -> int:
    """The group width both operands are split into: the finer of the two (one must divide the other)."""
    gw, ga = group_width(lq.weight, k), group_width(lq.act, k)
    lo, hi = min(gw, ga), max(gw, ga)
    if hi % lo:
        raise QditError(f"real execution needs the weight group ({gw}) and activation group ({ga}) to nest "
                        f"(one a multiple of the other); choose group sizes such as 64 and 128")
    return lo


def quantize_act(x2: jax.Array, spec: QuantSpec, group: int) -> tuple[jax.Array, jax.Array]:
    """Dynamic symmetric codes of ``x2`` (M, K) and their scales (G_eff, M), computed exactly as the
    fake-quant mode computes them (float32), repeated to ``group``-wide groups."""
    m, k = x2.shape
    ga = group_width(spec, k)
    xg = x2.astype(jnp.float32).reshape(m, k // ga, ga)
    scale, zp = params_of_groups(xg, spec)
    if spec.format == "int":
        q = _int_codes(xg, scale, zp, spec.bits, True).astype(jnp.int8)
    else:
        from qdit_jax.quant import formats as F

        q = F.fp8_round(xg / scale[..., None], spec.format)
    return q.reshape(m, k), jnp.repeat(scale, ga // group, axis=1).T


class NormSource(NamedTuple):
    """A ModulatedNorm call seen by the real interceptor: its output ``out`` (the next layer's input)
    and what it was computed from, so that layer can quantize from ``x`` in one pass."""

    out: jax.Array
    x: jax.Array
    shift: jax.Array
    scale: jax.Array
    eps: float


class AttentionSource(NamedTuple):
    """An AttentionCore call seen by the real interceptor: its output ``out`` (heads merged: the next
    layer's input), its q, k, v and implementation, so that layer can take its codes from the attention
    kernel itself (``kernels.attention_codes``)."""

    out: jax.Array
    q: jax.Array
    k: jax.Array
    v: jax.Array
    implementation: str


def _attention_codes(src: AttentionSource, spec: QuantSpec, group: int) -> tuple[jax.Array, jax.Array] | None:
    """The codes and (K // group, M) scales of ``src``'s output from the attention kernel's epilogue, or None
    where it does not apply (then the output is quantized as any other input)."""
    from qdit_jax.models import attention_mosaic
    from qdit_jax.quant.kernels.attention_codes import attention_codes, attention_codes_applies

    q = src.q
    if not attention_mosaic.chosen_by(src.implementation, q.shape[1]):
        return None  # the model asked for another attention kernel
    if group_width(spec, src.out.shape[-1]) % group or not attention_codes_applies(q.shape, q.dtype, spec)[0]:
        return None
    codes, scales = attention_codes(q, src.k, src.v, spec)
    return codes.reshape(-1, codes.shape[-1]), jnp.repeat(scales, spec.group_size // group, axis=0)


class GemmSource(NamedTuple):
    """A low-bit GEMM's output ``out`` (one ``kernels.scaled_gemm`` can compute: per token x per
    channel, or 128-wide groups) seen by the real interceptor, with the codes it was computed from, so
    the GatedResidual that takes it can rerun it with the residual in the kernel's epilogue."""

    out: jax.Array
    qa: jax.Array  # (M, K) activation codes
    sa: jax.Array  # (G, M) float32 token (G = 1) or token-and-group scales
    rw: RealWeight  # float32 scales


def _quantize_input(x2: jax.Array, spec: QuantSpec, group: int, options: RealOptions,
                    source: NormSource | AttentionSource | None = None) -> tuple[jax.Array, jax.Array]:
    """``quantize_act``, through a one-pass Pallas kernel where its guard allows: per group, from the
    attention kernel's epilogue when ``source`` is the attention (``options.attention_codes``); per token
    (and, with ``options.group_kernel``, per group), ``kernels.norm_quant`` (from ``source``'s input through
    its LayerNorm + modulation when given); otherwise per group ``kernels.act_quant`` when asked
    (``options.quant_kernel``)."""
    if isinstance(source, AttentionSource):
        out = _attention_codes(source, spec, group) if options.attention_codes and options.group_kernel else None
        if out is not None:
            return out
        source = None
    m, k = x2.shape
    ga = group_width(spec, k)
    if ga % group == 0 and (ga == k or options.group_kernel):
        def repeated(qs: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
            return qs[0], jnp.repeat(qs[1], ga // group, axis=0)  # scales (K // group, M)

        if source is not None and options.fused_norm:
            b, t = source.x.shape[0], m // source.x.shape[0]
            if (source.x.shape == (b, t, k) and source.x.dtype == x2.dtype
                    and norm_quant_applies(m, k, spec, x2.dtype, tokens=t)[0]):
                return repeated(norm_quant_pallas(source.x.reshape(m, k), spec, shift=source.shift,
                                                  scale=source.scale, tokens=t, eps=source.eps))
        if options.row_quant and norm_quant_applies(m, k, spec, x2.dtype)[0]:
            return repeated(norm_quant_pallas(x2, spec))
    if options.quant_kernel and spec.format == "int" and spec.method == "max" and spec.clip_ratio == 1.0:
        from qdit_jax.quant.kernels.act_quant import quant_applies, quantize_rows_pallas

        m, k = x2.shape
        ga = group_width(spec, k)
        if quant_applies(m, k, ga, spec.bits, x2.dtype)[0]:
            q, s = quantize_rows_pallas(x2, ga, spec.bits)
            return q, jnp.repeat(s, ga // group, axis=0)
    return quantize_act(x2, spec, group)


def _float_product(choice: str, out_dtype: Any) -> Any:
    """The raw product dtype of a float (fp8) GEMM (see ``RealOptions.float_product``)."""
    if choice == "auto":
        return out_dtype if jnp.dtype(out_dtype).itemsize == 2 else jnp.float32
    return jnp.dtype(choice)


def _dequant_weight(rw: RealWeight, dtype: Any) -> jax.Array:
    c = weight_codes_int8(rw.codes) if rw.codes.dtype == jnp.uint8 else rw.codes
    g, n = rw.scale.shape
    k = c.shape[1]
    cg = c.astype(jnp.float32).reshape(n, g, k // g)
    if rw.zero is not None:
        cg = cg - rw.zero.T[:, :, None]
    return (cg * rw.scale.T[:, :, None]).reshape(n, k).astype(dtype)


def column_block(rw: RealWeight, start: int, stop: int) -> RealWeight:
    """Output channels ``start:stop`` of a stored layer (codes are (N, K) rows; scales, zero points
    (G, N) and the bias follow N), for running a fused layer as several narrower GEMMs."""
    return RealWeight(rw.codes[start:stop], rw.scale[:, start:stop],
                      None if rw.zero is None else rw.zero[:, start:stop],
                      None if rw.bias is None else rw.bias[start:stop])


def real_dense(x: jax.Array, rw: RealWeight, lq: LayerQuant, out_dtype: Any,
               options: RealOptions = RealOptions(), source: NormSource | AttentionSource | None = None) -> jax.Array:
    """``x @ W^T + b`` for a planned Dense, in real low precision (weight-only layers: dequantize).
    ``source``: the ModulatedNorm or AttentionCore call that produced ``x``, if one did."""
    rw = _scales_f32(rw)
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    n = rw.scale.shape[1]
    if lq.act is None:  # weight-only (adaLN): tiny M, dequantize the weight and multiply
        w = _dequant_weight(rw, x.dtype)
        y = jax.lax.dot_general(x2, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        y = y if rw.bias is None else y + rw.bias
        return y.astype(out_dtype).reshape(*lead, n)
    g = rw.scale.shape[0]
    group = k // g
    is_int = lq.act.format == "int"
    m = x2.shape[0]
    use_kernel = False
    tiles = fit_tiles(options.tiles, m, n)
    if g > 1 and group_scaled_applies(m, lq, rw, k, out_dtype, options):
        qa, sa = _quantize_input(x2, lq.act, group, options, source)
        return _codes_gemm(qa, sa, rw, out_dtype, options).reshape(*lead, n)
    if is_int and (options.backend == "pallas" or (options.backend == "auto" and g > 1)):
        a_dtype = x2.dtype if options.fuse_quant else jnp.int8
        use_kernel, _ = kernel_applies(m, n, k, g, a_dtype, rw.codes.dtype, tiles=tiles,
                                       fuse_quant=options.fuse_quant)
        fusable = (options.fuse_quant and group_width(lq.act, k) == group and lq.act.method == "max"
                   and lq.act.clip_ratio == 1.0 and lq.act.bits == 8)
        if use_kernel and options.fuse_quant and not fusable:
            use_kernel = False
        if use_kernel and options.fuse_quant:
            y = group_gemm_pallas(x2, None, rw.codes, rw.scale, rw.bias, rw.zero, out_dtype=out_dtype,
                                  tiles=tiles, fuse_quant=True)
            return y.reshape(*lead, n)
        if not use_kernel and options.fuse_quant:  # retry without in-kernel quantization
            use_kernel, _ = kernel_applies(m, n, k, g, jnp.int8, rw.codes.dtype, tiles=tiles)
    qa, sa = _quantize_input(x2, lq.act, group, options, source)
    if use_kernel:
        rs = None
        if rw.zero is not None:
            rs = jnp.sum(qa.reshape(m, g, group).astype(jnp.int32), axis=-1).T
        y = group_gemm_pallas(qa, sa, rw.codes, rw.scale, rw.bias, rw.zero, rs, out_dtype=out_dtype,
                              tiles=tiles)
    else:
        if options.materialize:
            qa, sa = jax.lax.optimization_barrier((qa, sa))
        y = _codes_gemm(qa, sa, rw, out_dtype, options)
    return y.reshape(*lead, n)


def _scales_f32(rw: RealWeight) -> RealWeight:
    """``rw`` with float32 scales (float16 / bfloat16 storage is exact in float32; XLA fuses the cast)."""
    return rw if rw.scale.dtype == jnp.float32 else rw._replace(scale=rw.scale.astype(jnp.float32))


def _scaled_groups(lq: LayerQuant, rw: RealWeight, k: int) -> int | None:
    """The scale-group count G with which ``kernels.scaled_gemm`` computes this layer (1: per channel x
    per token; G > 1: both operands in 128-wide groups), or None (asymmetric weights, 4-bit or other
    codes, other groups)."""
    if lq.act is None or rw.zero is not None or rw.codes.dtype not in CODE_DTYPES:
        return None
    g = rw.scale.shape[0]
    if g == 1:
        return 1 if group_width(lq.act, k) == k else None
    return g if k == g * TILE_K else None


def _group_route(m: int, k: int, a_dtype: Any, rw: RealWeight, out_dtype: Any, options: RealOptions) -> bool:
    """Whether (M, K) activation codes of ``a_dtype`` times group-wise ``rw`` run on
    ``kernels.scaled_gemm`` (``RealOptions.group_kernel``; bf16 output, symmetric weights)."""
    g, n = rw.scale.shape
    return (g > 1 and options.group_kernel and options.backend == "auto" and not options.fuse_quant
            and rw.zero is None and jnp.dtype(out_dtype) == jnp.dtype(jnp.bfloat16)
            and jnp.dtype(a_dtype) == rw.codes.dtype
            and scaled_gemm_applies(m, n, k, rw.codes.dtype, rw.codes.dtype, groups=g)[0])


def group_scaled_applies(m: int, lq: LayerQuant, rw: RealWeight, k: int, out_dtype: Any,
                          options: RealOptions) -> bool:
    """Whether a group-wise layer runs on ``kernels.scaled_gemm`` (its input codes as ``lq.act`` makes them)."""
    from qdit_jax.quant.kernels.row_quant import codes_dtype

    g = _scaled_groups(lq, rw, k)
    return g is not None and g > 1 and _group_route(m, k, codes_dtype(lq.act), rw, out_dtype, options)


def _codes_gemm(qa: jax.Array, sa: jax.Array, rw: RealWeight, out_dtype: Any, options: RealOptions) -> jax.Array:
    """The low-bit GEMM from activation codes and scales: product, then scales and bias; in XLA, or
    for group-wise codes through ``kernels.scaled_gemm`` where it applies (``RealOptions.group_kernel``)."""
    if _group_route(*qa.shape, qa.dtype, rw, out_dtype, options):
        return scaled_gemm_mosaic(qa, rw.codes, sa, rw.scale, rw.bias,
                                  **_kernel_schedule(options, qa.shape[0], rw.scale.shape[0]),
                                  **_group_epilogue(options, rw.scale.shape[0], qa.dtype))
    return group_gemm_xla(qa, sa, rw.codes, rw.scale, rw.bias, rw.zero, out_dtype=out_dtype,
                          split_epilogue=options.split_epilogue,
                          product_dtype=_float_product(options.float_product, out_dtype))


def dense_with_codes(x: jax.Array, rw: RealWeight, lq: LayerQuant, out_dtype: Any, options: RealOptions,
                      source: NormSource | AttentionSource | None) -> GemmSource | None:
    """``real_dense`` of a layer ``kernels.scaled_gemm`` can compute (symmetric int8 / fp8 codes, per
    channel x per token or 128-wide groups), keeping its codes (see GemmSource), or None for others."""
    lead, k = x.shape[:-1], x.shape[-1]
    g = _scaled_groups(lq, rw, k)
    if (g is None or options.backend == "pallas" or options.materialize
            or (g > 1 and not group_scaled_applies(int(np.prod(lead)), lq, rw, k, out_dtype, options))):
        return None  # those ask for the Pallas GEMM / the barrier of real_dense / its group route
    rw = _scales_f32(rw)
    qa, sa = _quantize_input(x.reshape(-1, k), lq.act, k // g, options, source)
    y = _codes_gemm(qa, sa, rw, out_dtype, options)
    return GemmSource(y.reshape(*lead, y.shape[-1]), qa, sa, rw)


def codes_warpgroup(options: RealOptions, codes: Any) -> bool:
    """Whether fc1's codes epilogue runs on the kernel's fourth warpgroup for these activation codes (by
    default: int8 codes, where this JAX allows it)."""
    if options.codes_wg is not None:
        return options.codes_wg
    return jnp.dtype(codes) == jnp.dtype(jnp.int8) and codes_wg_available()


def epilogue_warpgroup(options: RealOptions, codes: Any, groups: int = 1) -> bool:
    """Whether a GEMM with these codes and scale groups on kernels.scaled_gemm runs its epilogue on the
    fourth warpgroup: per channel fp8 only (the stage holds the product in bf16, the fp8 product's
    rounding), by default; with group scales (a float32 stage) only when asked (``epilogue_wg=True``: it
    measured slower for fp8, within noise for int8)."""
    if groups > 1:
        return options.epilogue_wg is True and codes_wg_available()
    if jnp.dtype(codes) != jnp.dtype(jnp.float8_e4m3fn):
        return False
    return codes_wg_available() if options.epilogue_wg is None else options.epilogue_wg


def store_warpgroup(options: RealOptions, groups: int) -> bool:
    """Whether a GEMM with this many scale groups on kernels.scaled_gemm (no codes or epilogue warpgroup)
    has its TMA stores issued by the store warpgroup: group-wise layers (fc1's codes epilogue included),
    by default where this JAX allows."""
    if groups == 1:
        return False
    return codes_wg_available() if options.store_wg is None else options.store_wg


def _group_epilogue(options: RealOptions, groups: int, codes: Any, store: bool = True,
                    stack: bool = True) -> dict[str, Any]:
    """kernels.scaled_gemm's epilogue options for a GEMM with this many scale groups on ``codes``-typed
    operands whose epilogue is not on the epilogue warpgroup: ``store_wg=True`` where :func:`store_warpgroup`
    says so (and ``store``: no codes warpgroup), ``bias_first=True`` for group scales where
    :func:`bias_first` says so, ``stacked=True`` where :func:`stacked_parts` says so (and ``stack``: no codes
    epilogue), and then ``group_pairs=True`` where ``options.group_pairs`` asks."""
    kw: dict[str, Any] = {"store_wg": True} if store and store_warpgroup(options, groups) else {}
    if groups > 1 and bias_first(options, codes):
        kw["bias_first"] = True
    if groups > 1 and stack and stacked_parts(options, groups):
        kw["stacked"] = True
        if options.group_pairs:
            kw["group_pairs"] = True
    return kw


def stacked_parts(options: RealOptions, groups: int) -> bool:
    """Whether group-wise GEMMs without a codes epilogue stack their two parts along M
    (``RealOptions.stacked``; None: wherever the group mode is 'split' and no CTA pairs run)."""
    if group_mode_for(groups, options.group_mode) != "split" or options.cta_pairs:
        return False
    return options.stacked is not False


def bias_first(options: RealOptions, codes: Any) -> bool:
    """Whether group-wise GEMMs on ``codes``-typed operands start their float32 sums at the bias
    (``RealOptions.bias_first``; None: fp8, as measured)."""
    if options.bias_first is None:
        return jnp.dtype(codes) != jnp.dtype(jnp.int8)
    return options.bias_first


def _kernel_schedule(options: RealOptions, m: int, groups: int) -> dict[str, Any]:
    """The schedule arguments of ``kernels.scaled_gemm`` that RealOptions set, for an (M, K) input with this
    many scale groups (``cta_pairs`` where M is a whole number of tile pairs and the SMs pair up)."""
    kw: dict[str, Any] = dict(group_mode=options.group_mode, chain=options.chain_tiles)
    if options.cta_pairs and cta_pairs_fit(m, default_tiling(groups)[0]):
        kw["cta_pairs"] = True
    return kw


def residual_mismatch(x: jax.Array, gate: jax.Array, out: jax.Array, m: int, n: int) -> str | None:
    """Why a GatedResidual's ``x`` (B, T, n) and ``gate`` (B, n) cannot go into the epilogue of a GEMM
    whose (M, n) output is ``out`` (None: they can): shapes that do not match, or not all bf16."""
    if x.ndim != 3 or x.shape[0] * x.shape[1] != m or x.shape[2] != n or gate.shape != (x.shape[0], n):
        return f"residual {x.shape} / gate {gate.shape} do not match the GEMM's ({m}, {n}) output"
    if any(jnp.dtype(a.dtype) != jnp.dtype(jnp.bfloat16) for a in (x, gate, out)):
        return "the residual, gate and GEMM output must be bf16"
    return None


# the gated residual on the epilogue warpgroup only where the K loop is long enough to hide it (the
# fourth warpgroup reads the residual from global memory): XL/2 at batch 256 on the H100, fc2 (K = 4,608)
# 559.6 -> 514.7 us, proj (K = 1,152) 238.1 -> 247.4 (docs/RESULTS.md, twentieth session)
RESIDUAL_EPILOGUE_WG_MIN_K = 4096


def residual_scaled(x: jax.Array, gate: jax.Array, src: GemmSource, options: RealOptions) -> jax.Array | None:
    """``x + gate[:, None] * src.out`` as one fp8 / int8 GEMM with the gated residual in its epilogue
    (``kernels.scaled_gemm``, scheduled as ``options`` say), or None where the kernel does not apply."""
    m, k = src.qa.shape
    n = src.rw.scale.shape[1]
    if residual_mismatch(x, gate, src.out, m, n) is not None:
        return None
    g = src.sa.shape[0]
    if not scaled_gemm_applies(m, n, k, src.qa.dtype, src.rw.codes.dtype, groups=g, rows_per_gate=x.shape[1])[0]:
        return None
    epi = (options.residual_epilogue_wg and k >= RESIDUAL_EPILOGUE_WG_MIN_K
           and epilogue_warpgroup(options, src.qa.dtype, g)
           and epilogue_wg_residual_fits(m, gate.shape[0], default_tiling(g)[0]))
    wg = {"epilogue_wg": True} if epi else _group_epilogue(options, g, src.qa.dtype)
    y = scaled_gemm_mosaic(src.qa, src.rw.codes, src.sa, src.rw.scale, src.rw.bias, residual=x.reshape(m, n),
                           gate=gate, **_kernel_schedule(options, m, g), **wg)
    return y.reshape(x.shape)


def _per_channel_per_token(lq: LayerQuant, rw: RealWeight, k: int) -> bool:
    """Whether a layer has one symmetric scale per output channel and per-token activations (what
    the fused MLP and qkv kernels take)."""
    return lq.act is not None and rw.scale.shape[0] == 1 and rw.zero is None and group_width(lq.act, k) == k


def mlp_fused(mlp: Mlp, x: jax.Array, plan: Mapping[str, LayerQuant], weights: Mapping[str, RealWeight],
               options: RealOptions, source: NormSource | None = None) -> GemmSource | None:
    """The DiT ``Mlp`` (fc1, tanh GELU, fc2) with its middle step in one kernel, or None where that
    does not apply (the layers then run one by one). Per channel: fc1 is a per-token x per-channel
    low-bit GEMM, whose raw product (cuBLAS) or, with ``fc1_kernel`` (int8's default), bf16 output
    (``kernels.scaled_gemm``) the kernel takes to fc2's per-token codes; group-wise (both
    layers on ``kernels.scaled_gemm`` with 128-wide groups): fc1's bf16 output to fc2's group codes.
    fc2: low-bit GEMM and scale epilogue. Returned with fc2's codes (its output is ``.out``)."""
    base = module_path(mlp)
    (l1, w1), (l2, w2) = ((plan.get(f"{base}/{n}"), weights.get(f"{base}/{n}")) for n in ("fc1", "fc2"))
    if None in (l1, w1, l2, w2) or options.backend == "pallas":
        return None
    lead, k, n = x.shape[:-1], x.shape[-1], w1.scale.shape[1]
    m = int(np.prod(lead))
    out_dtype = mlp.dtype or x.dtype
    w1, w2 = _scales_f32(w1), _scales_f32(w2)
    if w1.scale.shape[0] > 1:  # group-wise: fc1 through the group-scaled GEMM, then GELU + fc2's group codes
        g2 = w2.scale.shape[0]
        if not (group_scaled_applies(m, l1, w1, k, out_dtype, options)
                and group_scaled_applies(m, l2, w2, n, out_dtype, options)
                and group_width(l2.act, n) % (n // g2) == 0 and gelu_quant_applies(m, n, l2.act)[0]):
            return None
        qa, sa = _quantize_input(x.reshape(m, k), l1.act, k // w1.scale.shape[0], options, source)
        if options.gelu_epilogue and l2.act.group_size == TILE_N:  # (bf16 output: group_scaled_applies)
            cwg = codes_warpgroup(options, qa.dtype)
            q2, s2 = scaled_gemm_mosaic(qa, w1.codes, sa, w1.scale, w1.bias, gelu_codes=l2.act, codes_wg=cwg,
                                        gelu_mode=options.fc1_gelu, **_kernel_schedule(options, m, w1.scale.shape[0]),
                                        **_group_epilogue(options, w1.scale.shape[0], qa.dtype, store=not cwg,
                                                          stack=False))
        else:
            y1 = _codes_gemm(qa, sa, w1, out_dtype, options)
            q2, s2 = gelu_quant_pallas(y1, None, None, None, l2.act, out_dtype)
        s2 = jnp.repeat(s2, g2 // s2.shape[0], axis=0)  # to fc2's (effective) weight groups
    else:
        if not (_per_channel_per_token(l1, w1, k) and l2.act is not None and w2.scale.shape[0] == 1
                and group_width(l2.act, n) == n and gelu_quant_applies(m, n, l2.act)[0]):
            return None  # asymmetric layers, or no kernel here: the per-layer path
        product_dtype = _float_product(options.float_product, out_dtype)
        qa, sa = _quantize_input(x.reshape(m, k), l1.act, k, options, source)
        if _fc1_on_kernel(m, n, k, qa.dtype, w1, out_dtype, product_dtype, options):
            # fc1's output (scales and bias applied in the GEMM's epilogue), then GELU + fc2's codes
            y1 = scaled_gemm_mosaic(qa, w1.codes, sa, w1.scale, w1.bias, epilogue_wg=epilogue_warpgroup(options, qa.dtype),
                                    **_kernel_schedule(options, m, 1))
            q2, s2 = gelu_quant_pallas(y1, None, None, None, l2.act, out_dtype)
        else:
            product = low_bit_product(qa, w1.codes, 1, product_dtype)[0]
            q2, s2 = gelu_quant_pallas(product, sa, w1.scale, w1.bias, l2.act, out_dtype)
    y = _codes_gemm(q2, s2, w2, out_dtype, options)
    return GemmSource(y.reshape(*lead, w2.scale.shape[1]), q2, s2, w2)


def _fc1_on_kernel(m: int, n: int, k: int, codes: Any, w1: RealWeight, out_dtype: Any, product_dtype: Any,
                   options: RealOptions) -> bool:
    """Whether a per-channel MLP's fc1 runs on kernels.scaled_gemm (``options.fc1_kernel``; None: int8 on,
    fp8 off): a bf16 output; fp8 with the epilogue warpgroup and a bf16 product (the kernel's rounding),
    int8 with its compute warpgroups' epilogue (its int32 sums are exact in float32 there); where the
    guard allows."""
    bf16, int8 = jnp.dtype(jnp.bfloat16), jnp.dtype(codes) == jnp.dtype(jnp.int8)
    on = options.fc1_kernel if options.fc1_kernel is not None else int8
    return bool(on and (int8 or (epilogue_warpgroup(options, codes) and jnp.dtype(product_dtype) == bf16))
                and jnp.dtype(w1.codes.dtype) == jnp.dtype(codes) and jnp.dtype(out_dtype) == bf16
                and scaled_gemm_applies(m, n, k, codes, w1.codes.dtype)[0])


def qkv_scaled(x: jax.Array, rw: RealWeight, lq: LayerQuant, out_dtype: Any, options: RealOptions,
                source: NormSource | None, blocks: int) -> jax.Array | None:
    """A SplitQKVDense in fp8 / int8 as ``blocks`` column-block GEMMs with the scales in their epilogue,
    or group scales in their K loop (``kernels.scaled_gemm``; one call writing all blocks unless
    ``options.qkv_one_call`` is off), concatenated (the attention's slices of the concatenation fold
    away), or None where the kernel does not apply."""
    lead, k = x.shape[:-1], x.shape[-1]
    m, n = int(np.prod(lead)), rw.scale.shape[1]
    g = _scaled_groups(lq, rw, k)
    if (g is None or (g > 1 and not group_scaled_applies(m, lq, rw, k, out_dtype, options))
            or jnp.dtype(out_dtype) != jnp.dtype(jnp.bfloat16) or n % blocks):
        return None
    c = n // blocks
    if not scaled_gemm_applies(m, c, k, rw.codes.dtype, rw.codes.dtype, groups=g)[0]:
        return None
    qa, sa = _quantize_input(x.reshape(m, k), lq.act, k // g, options, source)
    if qa.dtype != rw.codes.dtype:
        return None
    sw = _scales_f32(rw).scale
    # each block reshaped before the concatenation, as SplitQKVDense does: XLA folds the attention's
    # slices of a concatenation into its operands, but not of a reshaped concatenation (measured:
    # concatenating (M, C) blocks and reshaping after left a q / k / v copy pass of ~300 us per block)
    sched = dict(_kernel_schedule(options, m, g), prefetch=options.qkv_prefetch if g == 1 else None)
    if epilogue_warpgroup(options, qa.dtype, g):  # the epilogue warpgroup loads its own vectors
        sched.update(prefetch=None, epilogue_wg=True)
    else:
        sched.update(_group_epilogue(options, g, qa.dtype))
    if options.qkv_one_call and blocks > 1:
        outs = scaled_gemm_mosaic(qa, rw.codes, sa, sw, rw.bias, n=n, out_blocks=blocks, **sched)
    else:
        outs = [scaled_gemm_mosaic(qa, rw.codes, sa, sw, rw.bias, n_off=i * c, n=c, **sched) for i in range(blocks)]
    return jnp.concatenate([o.reshape(*lead, c) for o in outs], axis=-1)


__all__ = ["RealWeight", "RealOptions", "NormSource", "AttentionSource", "GemmSource", "group_width", "effective_group",
           "quantize_act",
           "column_block", "real_dense", "dense_with_codes", "residual_mismatch", "residual_scaled", "mlp_fused", "qkv_scaled"]
