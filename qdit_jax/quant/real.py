"""Real low-bit execution of a quantized DiT: the interceptor's second mode.

Fake-quant mode (``interceptor.quantized``) computes in float on dequantized weights. Here every
planned Dense layer's computation is *replaced*: its weight is stored as int8 codes, 4-bit codes
packed two per byte, or fp8 codes, with per-(channel, group) scales (``build_real``); its input is
quantized on the fly (per token, or per token and group; dynamic, symmetric), the product runs on
the int8 / fp8 operands and the scales and bias are applied after (``real_layers``: the XLA path,
the group-wise Pallas GEMM and the GPU kernel routes). The interceptor here decides per call which
route runs: a layer fed by a ``ModulatedNorm`` quantizes from the norm's input in one pass, each DiT
``Mlp`` runs its middle step as one kernel, q / k / v come from scaled GEMMs, and a
``GatedResidual`` whose branch ends in a per-token GEMM reruns that GEMM with the residual in its
epilogue; elsewhere, and off the GPU, the XLA path.

The plan (rules + per-layer configs) is the fake-quant mode's: ``build_real`` takes a
``QuantizedModel`` (or float params + ``QuantConfig``) and reuses its codes and scales, so both
modes compute the same function up to accumulation order.

Supported: integer weights of 2..8 bits (symmetric, or asymmetric through a zero-point correction),
symmetric integer activations of <= 8 bits, fp8 weights and activations (both fp8), symmetric
integer weights of <= 4 bits with fp8 activations (W4A8 with FP8 activations: the 4-bit codes are
exact in fp8, so the product runs on fp8 operands), dynamic activation scales. Asymmetric or static activations are rejected with a QditError (use
``act symmetric=True`` / ``act_mode='dynamic'``, or run the fake-quant mode).
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from qdit_jax.errors import QditError
from qdit_jax.models.dit import AttentionCore, DiT, DiTConfig, GatedResidual, Mlp, ModulatedNorm, SplitQKVDense
from qdit_jax.quant.config import LayerQuant, QuantConfig, resolve
from qdit_jax.quant.interceptor import discover_layers, get_kernel, module_path, quantize_activation
from qdit_jax.quant.kernels.group_gemm import pack_blocked, weight_codes_int8
from qdit_jax.quant.kernels.scaled_gemm import GROUP_TILE_M
from qdit_jax.quant.quantizers import SCALE_DTYPES, QParams
from qdit_jax.quant.real_layers import (AttentionSource, NormSource, RealOptions, RealWeight, column_block,
                                        dense_with_codes, effective_group, group_scaled_applies, group_width, mlp_fused,
                                        qkv_scaled, quantize_act, real_dense, residual_scaled)

# ----------------------------------------------------------------------------- plan checks

# integer weight codes that fp8 represents exactly (e5m2: every integer up to 8 in magnitude, e4m3 up to
# 16), so a layer with integer weights and fp8 activations can run its product in fp8
MAX_INT_BITS_FOR_FP8 = 4


def check_real_plan(plan: Mapping[str, LayerQuant], act_mode: str = "dynamic") -> None:
    """Raise a QditError for a plan the real mode cannot execute (see module doc)."""
    for path, lq in plan.items():
        if lq.weight is None or lq.act is None:
            continue
        w, a = lq.weight, lq.act
        if act_mode != "dynamic":
            raise QditError(f"{path}: real execution quantizes activations dynamically; quantize without "
                            f"--static (act_mode 'dynamic') or run static activations in fake-quant mode")
        if w.format != "int" and a.format == "int":
            raise QditError(f"{path}: fp8 weights with integer activations; real execution needs both fp8, both "
                            f"integer, or integer weights of <= {MAX_INT_BITS_FOR_FP8} bits with fp8 activations")
        if w.format == "int" and a.format != "int" and (w.bits > MAX_INT_BITS_FOR_FP8 or not w.symmetric):
            raise QditError(f"{path}: {w.bits}-bit {'symmetric' if w.symmetric else 'asymmetric'} integer weights "
                            f"with {a.format} activations; real execution runs them on fp8 tensor cores, which "
                            f"needs symmetric integer weights of <= {MAX_INT_BITS_FOR_FP8} bits (their codes exact "
                            f"in fp8): quantize weights with --w-sym and 4 bits, or use one format for both")
        if a.format == "int" and not a.symmetric:
            raise QditError(f"{path}: real execution needs symmetric activation quantization (int8 codes without "
                            f"a zero point); quantize with `qdit quantize --a-sym` (Python: qdit_rules(..., a_sym=True))")


# ----------------------------------------------------------------------------- building


def real_weight(codes: jax.Array, qp: QParams, lq: LayerQuant, bias: Any, *, pack4: bool = True) -> RealWeight:
    """Stored form of one layer from its codes (N, K) and parameters (N, n_groups)."""
    w = lq.weight
    n, k = codes.shape
    ge = effective_group(lq, k) if lq.act is not None else group_width(w, k)
    rep = group_width(w, k) // ge
    # stored in the spec's scale dtype: the quantizer rounded the scales to it, so this is lossless
    scale = jnp.repeat(jnp.asarray(qp.scale, jnp.float32), rep, axis=1).T.astype(SCALE_DTYPES[w.scale_dtype])
    zero = None
    if w.format == "int":
        c = jnp.asarray(codes).astype(jnp.int32)
        if not w.symmetric:  # uint8 codes 0..2^b-1 -> int8 around 0; zero point shifted alike
            shift = 2 ** (w.bits - 1)
            c = c - shift
            zero = jnp.repeat(jnp.asarray(qp.zero_point, jnp.float32) - shift, rep, axis=1).T
        c = c.astype(jnp.int8)
        if w.bits <= 4 and pack4 and k % 2 == 0:
            c = pack_blocked(c)
    else:
        c = jnp.asarray(codes)
    b = None if bias is None else jnp.asarray(bias, jnp.float32)
    return RealWeight(c, scale, zero, b)


def strip_kernels(params: Any, paths: list[str]) -> dict[str, Any]:
    """Params without the kernels and biases of ``paths`` (they live in the RealWeights)."""
    def walk(node: Mapping[str, Any], prefix: str) -> dict[str, Any]:
        out = {}
        for key, val in node.items():
            p = f"{prefix}/{key}" if prefix else key
            if p in paths:
                rest = {kk: vv for kk, vv in val.items() if kk not in ("kernel", "bias")}
                if rest:
                    out[key] = rest
            elif isinstance(val, Mapping):
                sub = walk(val, p)
                if sub:
                    out[key] = sub
            else:
                out[key] = val
        return out

    return walk(params, "")


def _fp8_codes_of(lq: LayerQuant) -> Any:
    """The fp8 dtype integer weight codes take for this layer's product (its activations are fp8), or None."""
    if lq.act is None or lq.act.format == "int" or lq.weight is None or lq.weight.format != "int":
        return None
    from qdit_jax.quant.kernels.row_quant import codes_dtype

    return codes_dtype(lq.act)


def _compute_codes(rw: RealWeight, lq: LayerQuant, unpack: bool) -> RealWeight:
    """The weight codes a forward computes with: packed 4-bit unpacked to int8 where ``unpack``, and
    integer codes that meet fp8 activations as fp8 (exact: ``check_real_plan`` allows only <= 4-bit
    symmetric codes there), so the product runs on fp8 tensor cores; packed codes kept packed stay
    packed (the XLA path converts them in the product)."""
    codes = weight_codes_int8(rw.codes) if unpack else rw.codes
    f8 = _fp8_codes_of(lq)
    if f8 is not None and codes.dtype == jnp.int8:
        codes = codes.astype(f8)
    return rw if codes is rw.codes else rw._replace(codes=codes)


def _mosaic_takes_unpacked(lq: LayerQuant, rw: RealWeight, dtype: Any) -> bool:
    """Whether a packed 4-bit layer, unpacked (to int8, or fp8 under fp8 activations), would take the
    Mosaic group GEMM route of a ``dtype`` forward here (the forward's own predicate, at one CTA's rows:
    the batch does not matter)."""
    if rw.codes.dtype != jnp.uint8:
        return False
    n, k = rw.codes.shape[0], 2 * rw.codes.shape[1]
    unpacked = rw._replace(codes=jax.ShapeDtypeStruct((n, k), _fp8_codes_of(lq) or jnp.int8))
    return group_scaled_applies(2 * GROUP_TILE_M, lq, unpacked, k, dtype, RealOptions())


@dataclasses.dataclass
class RealModel:
    """A DiT in real low-bit form: float params of the unquantized layers plus RealWeights."""

    config: DiTConfig
    plan: dict[str, LayerQuant]
    params: dict[str, Any]
    weights: dict[str, RealWeight]

    def variables(self, unpack_w4: bool | None = None) -> dict[str, Any]:
        """The pytree ``real_apply_fn``'s apply_fn takes as its params argument. ``unpack_w4``: packed
        4-bit codes as int8 codes, once, before any forward (the stored weights stay packed), so
        W4A8 group-128 layers take the int8 routes (the Mosaic group GEMM) instead of the Triton
        group kernel, which unpacks in registers: XL/2 W4A8 g128 at batch 256 on the H100 0.28x ->
        0.99x bf16 (docs/RESULTS.md). In device memory the unpacked linears take W8's bytes.
        None (default): unpack the layers the Mosaic group GEMM would take (symmetric, 128-wide
        groups, int8 activation codes, a bf16 model) when it can run here (Hopper); False: keep every
        layer packed; True: unpack all."""
        weights = self.weights
        if unpack_w4 is None:
            dtype = jnp.dtype(self.config.dtype)
            unpack = {p for p, rw in weights.items() if _mosaic_takes_unpacked(self.plan[p], rw, dtype)}
        else:
            unpack = set(weights) if unpack_w4 else set()
        return {"params": self.params,
                "weights": {p: _compute_codes(rw, self.plan[p], p in unpack) for p, rw in weights.items()}}

    def apply_fn(self, options: RealOptions = RealOptions()):
        return real_apply_fn(self.config, self.plan, options)

    def weight_bytes(self) -> dict[str, int]:
        """Bytes of the quantized linears as stored (codes, scales, zero points, biases) and of the
        same linears' kernels + biases in float32 and bf16."""
        q = f32 = 0
        for rw in self.weights.values():
            q += sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in rw if a is not None)
            n, k = rw.codes.shape[0], rw.codes.shape[1] * (2 if rw.codes.dtype == jnp.uint8 else 1)
            f32 += (n * k + (0 if rw.bias is None else n)) * 4
        return {"quantized": q, "fp32": f32, "bf16": f32 // 2}


def build_real(qm: Any, *, pack4: bool = True) -> RealModel:
    """RealModel from a ``QuantizedModel`` (its plan, codes and scales; float params for the rest)."""
    act_mode = "static" if getattr(qm, "static", None) else "dynamic"
    check_real_plan(qm.plan, act_mode)
    weights = {}
    for path, (codes, qp) in qm.codes.items():
        layer = get_kernel(qm.params, path)
        weights[path] = real_weight(codes, qp, qm.plan[path], layer.get("bias"), pack4=pack4)
    return RealModel(qm.config, dict(qm.plan), strip_kernels(qm.params, list(weights)), weights)


def real_from_params(params: Any, cfg: DiTConfig, qcfg: QuantConfig, *, pack4: bool = True) -> RealModel:
    """RealModel straight from float params (round-to-nearest weights) under ``qcfg``'s rules."""
    from qdit_jax.quant.quantize import rtn_codes

    plan = resolve(qcfg, discover_layers(cfg)).as_dict()
    if not plan:
        raise QditError("the quantization config matches no layer of this model; check its rule patterns")
    check_real_plan(plan, qcfg.act_mode)
    codes = rtn_codes(params, plan)
    weights = {p: real_weight(c, qp, plan[p], get_kernel(params, p).get("bias"), pack4=pack4)
               for p, (c, qp) in codes.items()}
    return RealModel(cfg, plan, strip_kernels(params, list(weights)), weights)


class Traced:
    """Records of this trace keyed by the identity of a traced output array (``entry.out``); the entry
    holds the array itself, so its id stays unique while the record lives."""

    def __init__(self) -> None:
        self._by_id: dict[int, Any] = {}

    def put(self, entry: Any) -> jax.Array:
        self._by_id[id(entry.out)] = entry
        return entry.out

    def get(self, a: Any) -> Any:
        entry = self._by_id.get(id(a))
        return entry if entry is not None and entry.out is a else None


def call_args(args: tuple, kwargs: dict, names: tuple[str, ...]) -> tuple:
    """A module call's arguments by name, whether passed by position or keyword."""
    return tuple(kwargs[n] if n in kwargs else args[i] for i, n in enumerate(names))


def _make_real_interceptor(plan: Mapping[str, LayerQuant], weights: Mapping[str, RealWeight], options: RealOptions):
    # ModulatedNorm outputs with what they were computed from: the layer that takes one as its
    # input may quantize from the source in one kernel pass (XLA then drops the unused float output)
    norms = Traced()
    # per-token GEMM outputs with their codes: a GatedResidual taking one may rerun the GEMM with
    # the residual in its epilogue (XLA then drops the first GEMM)
    gemms = Traced()
    # AttentionCore outputs with their q, k, v: a group-wise layer taking one may take its codes from the
    # attention kernel (XLA then drops the bf16 attention call)
    attns = Traced()

    def interceptor(next_fun: Callable, args: tuple, kwargs: dict, context: Any) -> Any:
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        if options.residual_kernel and type(context.module) is GatedResidual:
            x, gate, y = call_args(args, kwargs, ("x", "gate", "y"))
            src = gemms.get(y)
            out = None if src is None else residual_scaled(x, gate, src, options)
            return next_fun(*args, **kwargs) if out is None else out
        if options.fused_norm and type(context.module) is ModulatedNorm:
            y = next_fun(*args, **kwargs)
            x, shift, scale = call_args(args, kwargs, ("x", "shift", "scale"))
            return norms.put(NormSource(y, x, shift, scale, context.module.eps))
        if options.fused_mlp and type(context.module) is Mlp:
            src = mlp_fused(context.module, args[0], plan, weights, options, norms.get(args[0]))
            if src is not None:
                return gemms.put(src)
        path = module_path(context.module)
        lq = plan.get(path)
        if options.attention_codes and type(context.module) is AttentionCore:
            q, k, v = call_args(args, kwargs, ("q", "k", "v"))
            if lq is not None and lq.act is not None:
                q, k, v = _dynamic_inputs((q, k, v), lq.act)
            return attns.put(AttentionSource(next_fun(q, k, v), q, k, v, context.module.implementation))
        if lq is None:
            return next_fun(*args, **kwargs)
        if path in weights and isinstance(context.module, nn.Dense):
            x = args[0]
            out_dtype = context.module.dtype or x.dtype
            rw = weights[path]
            if options.qkv_kernel and options.backend != "pallas" and isinstance(context.module, SplitQKVDense):
                y = qkv_scaled(x, rw, lq, out_dtype, options, norms.get(x), context.module.BLOCKS)
                if y is not None:
                    return y
            if options.split_qkv and isinstance(context.module, SplitQKVDense):  # one GEMM per column block
                nb = context.module.BLOCKS
                c = rw.scale.shape[1] // nb
                return jnp.concatenate([real_dense(x, column_block(rw, i * c, (i + 1) * c), lq, out_dtype, options)
                                        for i in range(nb)], axis=-1)
            source = norms.get(x) or attns.get(x)
            if options.residual_kernel:
                src = dense_with_codes(x, rw, lq, out_dtype, options, source)
                if src is not None:
                    return gemms.put(src)
            return real_dense(x, rw, lq, out_dtype, options, source)
        if lq.act is None:
            return next_fun(*args, **kwargs)
        # act-only layers (the attention core): the fake-quant mode's dynamic quantization
        return next_fun(*_dynamic_inputs(args, lq.act), **kwargs)

    return interceptor


def _dynamic_inputs(values: Any, act: Any) -> list:
    """The fake-quant mode's dynamic quantization of an act-only layer's floating inputs (rank >= 2)."""
    return [quantize_activation(a, act) if isinstance(a, jax.Array) and a.ndim >= 2
            and jnp.issubdtype(a.dtype, jnp.floating) else a for a in values]


@contextlib.contextmanager
def real_quantized(plan: Mapping[str, LayerQuant], weights: Mapping[str, RealWeight],
                   options: RealOptions = RealOptions()) -> Iterator[None]:
    """Within this context, planned Dense layers run in real low precision from ``weights``."""
    with nn.intercept_methods(_make_real_interceptor(plan, weights, options)):
        yield


def real_apply_fn(cfg: DiTConfig, plan: Mapping[str, LayerQuant], options: RealOptions = RealOptions()):
    """``apply_fn(variables, x, t, y)`` with ``variables = RealModel.variables()``: the pipeline's
    ApplyFn signature, so sampling code runs it unchanged."""
    model = DiT(cfg)
    plan = dict(plan)

    def apply_fn(variables: Mapping[str, Any], x: jax.Array, t: jax.Array, y: jax.Array) -> jax.Array:
        with real_quantized(plan, variables["weights"], options):
            return model.apply({"params": variables["params"]}, x, t, y)

    return apply_fn


def checkpoint_bytes(tree: Any) -> int:
    """Bytes of every array in a pytree as stored (what a checkpoint of it holds, without metadata)."""
    return int(sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize for a in jax.tree_util.tree_leaves(tree)))


__all__ = ["RealWeight", "RealOptions", "RealModel", "build_real", "real_from_params", "real_apply_fn",
           "real_quantized", "real_dense", "quantize_act", "check_real_plan", "effective_group", "checkpoint_bytes"]
