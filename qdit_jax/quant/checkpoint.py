"""Quantized checkpoints: integer weight codes (4-bit packed two per byte), scales, zero points,
static activation parameters and the quantization config, in the same Orbax format as FP ones.

Tree layout: each quantized Dense ``{bias, codes, scale, zero_point}`` (codes (out, in) or
(out, in/2) packed; fp8 codes stored as their uint8 bit patterns); every other layer as in the FP
model; static activation parameters under ``static_act/<layer path>/arg<i>/{scale, zero_point}``.
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from qdit_jax.diffusion.pipeline import ApplyFn
from qdit_jax.errors import QditError
from qdit_jax.io.checkpoint import save_checkpoint
from qdit_jax.io.loading import LoadedModel, sampling_defaults_for
from qdit_jax.models.dit import DiTConfig
from qdit_jax.quant.config import LayerQuant, QuantConfig
from qdit_jax.quant.interceptor import discover_layers, get_kernel, quantized_apply_fn as _fake_apply_fn
from qdit_jax.quant.packing import pack_int4, unpack_int4
from qdit_jax.quant.quantize import QuantizedModel, WeightCodes, dequantized_params
from qdit_jax.quant.quantizers import SCALE_DTYPES, QParams

LAYOUT = "qdit-quantized"
FP8_DTYPES = {"fp8_e4m3": jnp.float8_e4m3fn, "fp8_e5m2": jnp.float8_e5m2}


def _packs(spec: Any) -> bool:
    return spec.format == "int" and spec.bits <= 4


def encode_codes(codes: jax.Array, spec: Any) -> np.ndarray:
    """Codes as stored: packed nibbles for <= 4-bit integers, uint8 bit patterns for fp8."""
    if spec.format != "int":
        return np.asarray(codes).view(np.uint8)
    c = np.asarray(codes)
    return np.asarray(pack_int4(jnp.asarray(c))) if _packs(spec) else c


def decode_codes(stored: np.ndarray, spec: Any) -> jax.Array:
    if spec.format != "int":
        return jnp.asarray(np.asarray(stored, np.uint8).view(FP8_DTYPES[spec.format]))
    if _packs(spec):
        return unpack_int4(jnp.asarray(stored), signed=spec.symmetric)
    return jnp.asarray(stored)


def _set(tree: dict, path: str, value: Any) -> None:
    node = tree
    parts = path.split("/")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value


def to_storage(qm: QuantizedModel, fp_params: Any) -> dict[str, Any]:
    """The tree written to disk for ``qm`` (whose FP params are ``fp_params``)."""
    tree = jax.tree_util.tree_map(np.asarray, fp_params)  # fresh nested dicts, safe to edit below
    for path, (codes, qp) in qm.codes.items():
        spec = qm.plan[path].weight
        layer = dict(get_kernel(tree, path))
        layer.pop("kernel")
        layer.update(codes=encode_codes(codes, spec), scale=np.asarray(qp.scale, SCALE_DTYPES[spec.scale_dtype]),
                     zero_point=np.asarray(qp.zero_point))
        _set(tree, path, layer)
    for path, qps in (qm.static or {}).items():
        for i, qp in enumerate(qps):
            _set(tree, f"static_act/{path}/arg{i}", {"scale": np.asarray(qp.scale, np.float32),
                                                     "zero_point": np.asarray(qp.zero_point, np.float32)})
    return tree


def save_quantized(directory: str, qm: QuantizedModel, fp_params: Any, *, extra: Mapping[str, Any] | None = None,
                   overwrite: bool = False) -> str:
    """Write a quantized checkpoint that ``qdit sample --ckpt`` loads."""
    meta = dict(extra or {})
    meta.setdefault("sampling", sampling_defaults_for(qm.config))
    meta["quantization"] = {"name": qm.qcfg.name, "config": qm.qcfg.to_dict(),
                            "plan": {p: lq.to_dict() for p, lq in qm.plan.items()},
                            "static": sorted((qm.static or {}).keys())}
    return save_checkpoint(directory, to_storage(qm, fp_params), qm.config, extra=meta, overwrite=overwrite,
                           layout=LAYOUT)


def _plan_from_meta(meta: Mapping[str, Any]) -> dict[str, LayerQuant]:
    try:
        return {p: LayerQuant.from_dict(d, f"layer {p}") for p, d in meta["plan"].items()}
    except (KeyError, TypeError) as e:
        raise QditError(f"quantized checkpoint metadata lacks a valid plan ({e}); re-run qdit quantize") from None


def from_storage(tree: Mapping[str, Any], cfg: DiTConfig, qmeta: Mapping[str, Any]) -> QuantizedModel:
    """Rebuild the ``QuantizedModel`` (codes decoded, kernels dequantized) from a stored tree."""
    plan = _plan_from_meta(qmeta)
    layers = {l.path: l for l in discover_layers(cfg)}
    params = jax.tree_util.tree_map(lambda a: a, {k: v for k, v in tree.items() if k != "static_act"})  # fresh dicts
    codes: WeightCodes = {}
    for path, lq in plan.items():
        if path not in layers:
            raise QditError(f"quantized checkpoint names layer {path!r}, which its model config does not have; "
                            "the checkpoint and its config.json do not belong together")
        if lq.weight is None:
            continue
        layer = get_kernel(params, path)
        if "codes" not in layer:
            raise QditError(f"quantized checkpoint lacks codes for {path}; re-run qdit quantize")
        c = decode_codes(layer["codes"], lq.weight)
        info = layers[path]
        if tuple(c.shape) != (info.out_features, info.in_features):
            raise QditError(f"quantized checkpoint does not match its model: {path} has codes {tuple(c.shape)}, "
                            f"the model expects ({info.out_features}, {info.in_features})")
        # scales stored in float16 / bfloat16 (the spec's scale_dtype) hold float32 values exactly
        codes[path] = (c, QParams(jnp.asarray(layer["scale"], jnp.float32), jnp.asarray(layer["zero_point"])))
        # A kernel placeholder of the right shape; dequantized_params fills it.
        _set(params, path, {**{k: v for k, v in layer.items() if k not in ("codes", "scale", "zero_point")},
                            "kernel": np.zeros((info.in_features, info.out_features), np.float32)})
    static = None
    if "static_act" in tree:
        static = {}
        for path in qmeta.get("static", []):
            node = get_kernel(tree["static_act"], path)
            static[path] = [QParams(jnp.asarray(node[f"arg{i}"]["scale"]), jnp.asarray(node[f"arg{i}"]["zero_point"]))
                            for i in range(len(node))]
    qcfg = QuantConfig.from_dict(qmeta.get("config", {"rules": []}))
    return QuantizedModel(cfg, qcfg, plan, codes, dequantized_params(params, plan, codes), static)


def quantized_apply_fn(model: LoadedModel, cfg: DiTConfig | None = None) -> tuple[ApplyFn, Any]:
    """(apply_fn, bundle) that run a loaded quantized checkpoint in fake-quant mode."""
    qm = from_storage(model.params, model.config, model.quantization)
    cfg = cfg or model.config
    return _fake_apply_fn(cfg, qm.plan), qm.bundle


def real_checkpoint_apply_fn(model: LoadedModel, cfg: DiTConfig | None = None,
                             options: Any = None, unpack_w4: bool | None = None) -> tuple[ApplyFn, Any]:
    """(apply_fn, variables) that run a loaded quantized checkpoint in real low precision (int8 /
    fp8 / packed-int4 matmuls, ``quant.real``): the fake-quant mode's numbers up to accumulation
    order. A plan the real mode cannot run (static or asymmetric activations) is a QditError.
    ``unpack_w4``: see ``RealModel.variables`` (default: unpack packed 4-bit group-128 layers where
    the Hopper group GEMM runs them)."""
    import dataclasses

    from qdit_jax.quant.real import RealOptions, build_real

    rm = build_real(from_storage(model.params, model.config, model.quantization))
    if cfg is not None:
        rm = dataclasses.replace(rm, config=cfg)
    return rm.apply_fn(options or RealOptions()), rm.variables(unpack_w4)


def checkpoint_bytes(directory: str) -> int:
    """Bytes on disk of a checkpoint directory (all files)."""
    total = 0
    for root, _, files in os.walk(directory):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total
