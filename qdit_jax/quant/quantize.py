"""Apply a ``QuantConfig`` to a DiT: weights once (round-to-nearest or GPTQ), activations calibrated
(static) or left dynamic, and the result as a ``QuantizedModel`` that samples like the FP one."""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from qdit_jax.errors import QditError
from qdit_jax.models.dit import DiT, DiTConfig
from qdit_jax.quant.calibration import CalibrationData, calibrate_static
from qdit_jax.quant.config import LayerQuant, QuantConfig, resolve
from qdit_jax.quant.gptq import gptq_quantize_weight
from qdit_jax.quant.interceptor import (discover_layers, get_kernel, make_bundle, quantized, quantized_apply_fn,
                                         set_leaf)
from qdit_jax.quant.quantizers import SCALE_DTYPES, QParams, dequantize, quantize_tensor

WeightCodes = dict[str, tuple[jax.Array, QParams]]


@dataclasses.dataclass
class QuantizedModel:
    """A quantized DiT: storage form (``codes``), the fake-quant float params, and how to run it."""

    config: DiTConfig
    qcfg: QuantConfig
    plan: dict[str, LayerQuant]
    codes: WeightCodes  # path -> (integer / fp8 codes (out, in), qparams (out, n_groups))
    params: Any  # float params whose planned kernels are dequantize(codes)
    static: dict[str, list[QParams]] | None = None

    def apply_fn(self):
        """``apply_fn(bundle, x, t, y)``; pass ``self.bundle`` as its first argument."""
        return quantized_apply_fn(self.config, self.plan)

    @property
    def bundle(self) -> dict[str, Any]:
        return make_bundle(self.params, self.static)


def dequantized_params(params: Any, plan: Mapping[str, LayerQuant], codes: WeightCodes) -> Any:
    """Float params with each planned kernel replaced by its dequantized codes."""
    out = params
    for path, (c, qp) in codes.items():
        kernel = get_kernel(params, path)["kernel"]
        w = dequantize(c, qp, plan[path].weight.group_size, jnp.float32)  # (out, in)
        out = set_leaf(out, path, "kernel", jnp.asarray(w.T, kernel.dtype))
    return out


def rtn_codes(params: Any, plan: Mapping[str, LayerQuant], paths: list[str] | None = None) -> WeightCodes:
    """Round-to-nearest storage form of the planned weights."""
    out: WeightCodes = {}
    for path, lq in plan.items():
        if lq.weight is None or (paths is not None and path not in paths):
            continue
        w = jnp.asarray(get_kernel(params, path)["kernel"], jnp.float32).T
        out[path] = quantize_tensor(w, lq.weight)
    return out


def hessians_from_sums(sums: Mapping[str, tuple[Any, Any]], hosts: Any = None) -> dict[str, jax.Array]:
    """GPTQ's ``H = 2/n X^T X`` from per-layer ``(X^T X, n)``, first summed over hosts when
    ``hosts`` (an allgather) is given."""
    if hosts is not None:
        from qdit_jax.parallel.hosts import sums_across_hosts

        sums = sums_across_hosts(sums, hosts)
    return {p: 2.0 * s / n for p, (s, n) in sums.items()}


class _HessianRunner:
    """One compiled forward that returns sum(x^T x) and token counts of every weight-quantized
    layer's (quantized) input; reused for every block of GPTQ."""

    def __init__(self, cfg: DiTConfig, plan: Mapping[str, LayerQuant], static: Mapping[str, Any] | None,
                 hosts: Any = None):
        self.hosts = hosts  # an allgather: sums combined over every host's share of the data
        model = DiT(cfg)
        weighted = {p for p, lq in plan.items() if lq.weight is not None}
        plan = dict(plan)

        def run(params, x, t, y, w):
            acc: dict[str, tuple[jax.Array, jax.Array]] = {}

            def tap(path: str, i: int, a: jax.Array) -> None:
                if i == 0 and path in weighted:
                    a3 = a.reshape(a.shape[0], -1, a.shape[-1]).astype(jnp.float32)  # (B, tokens, in)
                    wa = a3 * w[:, None, None]  # padding rows (w = 0) add nothing
                    xtx = jnp.einsum("bti,btj->ij", wa, a3)
                    acc[path] = (xtx, jnp.sum(w) * a3.shape[1])

            with quantized(plan, static, tap):
                model.apply({"params": params}, x, t, y)
            return acc

        self._run = jax.jit(run)

    def __call__(self, params: Any, calib: CalibrationData, batch_size: int) -> dict[str, jax.Array]:
        sums: dict[str, list] = {}
        for x, t, y, w in calib.weighted_batches(batch_size):
            for path, (xtx, n) in self._run(params, x, t, y, w).items():
                if path in sums:
                    sums[path][0] = sums[path][0] + xtx
                    sums[path][1] = sums[path][1] + n
                else:
                    sums[path] = [xtx, n]
        return hessians_from_sums({p: tuple(v) for p, v in sums.items()}, self.hosts)


def _group_by_block(paths: list[str]) -> list[list[str]]:
    groups: dict[str, list[str]] = {}
    for p in paths:
        groups.setdefault(p.split("/")[0], []).append(p)
    return list(groups.values())


def gptq_codes(params: Any, cfg: DiTConfig, plan: Mapping[str, LayerQuant], calib: CalibrationData, *,
               static: Mapping[str, Any] | None = None, batch_size: int = 64, block_size: int = 128,
               percdamp: float = 0.01, progress: bool = False, mesh: Any = None,
               hosts: Any = None) -> tuple[WeightCodes, Any]:
    """GPTQ through the model, block by block: the Hessians of block i's layers come from the model
    whose earlier blocks are already GPTQ-quantized (and whose activations are quantized).
    With a ``mesh`` the Hessian passes split each calibration batch over its devices."""
    if mesh is None:
        runner = _HessianRunner(cfg, plan, static, hosts)
    else:
        from qdit_jax.parallel.stats import ShardedHessianRunner

        runner = ShardedHessianRunner(cfg, plan, static, mesh, hosts)
    order = [p for p in plan if plan[p].weight is not None]
    groups = _group_by_block(order)
    if progress:
        from tqdm.auto import tqdm

        groups = tqdm(groups, desc="GPTQ", unit="block")
    codes: WeightCodes = {}
    current = params
    for group in groups:
        hessians = runner(current, calib, batch_size)
        for path in group:
            w = jnp.asarray(get_kernel(params, path)["kernel"], jnp.float32).T
            _, c, qp = gptq_quantize_weight(w, hessians[path], spec=plan[path].weight, block_size=block_size,
                                            percdamp=percdamp)
            codes[path] = (c, qp)
        current = dequantized_params(current, plan, {p: codes[p] for p in group})
    return codes, current


def quantize_model(params: Any, cfg: DiTConfig, qcfg: QuantConfig, *, calib: CalibrationData | None = None,
                   batch_size: int = 64, progress: bool = False, mesh: Any = None,
                   hosts: Any = None) -> QuantizedModel:
    """Quantize ``params`` of ``cfg`` as ``qcfg`` says. Static activations and GPTQ need ``calib``.

    ``mesh`` (``parallel.make_mesh``): the calibration passes (static ranges, GPTQ Hessians) split
    each batch over its devices and combine with all-reduces; ``batch_size`` is then the global
    batch. Ranges are identical, Hessians equal up to float32 summation order. ``hosts`` (an
    allgather such as ``parallel.hosts.default_allgather``): ``calib`` is this host's share of a
    multi-host calibration set; ranges and Hessian sums are combined over all hosts."""
    plan = resolve(qcfg, discover_layers(cfg)).as_dict()
    if not plan:
        raise QditError("the quantization config matches no layer of this model; check its rule patterns")
    if (qcfg.gptq or qcfg.act_mode == "static") and calib is None:
        raise QditError("GPTQ and static activation quantization need calibration data (calib=...)")
    params = jax.tree_util.tree_map(jnp.asarray, params)
    static = None
    if qcfg.act_mode == "static":
        # Activation ranges from the FP model (all timesteps), fixed for sampling.
        if mesh is None:
            static = calibrate_static(params, cfg, plan, calib, batch_size=batch_size, hosts=hosts)
        else:
            from qdit_jax.parallel.stats import calibrate_static_sharded

            static = calibrate_static_sharded(params, cfg, plan, calib, mesh, batch_size=batch_size, hosts=hosts)
    if qcfg.gptq:
        codes, qparams = gptq_codes(params, cfg, plan, calib, static=static, batch_size=batch_size, progress=progress,
                                    mesh=mesh, hosts=hosts)
    else:
        codes = rtn_codes(params, plan)
        qparams = dequantized_params(params, plan, codes)
    return QuantizedModel(cfg, qcfg, plan, codes, qparams, static)


def weight_bytes(qm: QuantizedModel) -> dict[str, int]:
    """Bytes of the quantized linears: codes at their bit width (4-bit packed two per byte),
    plus scales (in the spec's ``scale_dtype``) and zero points (1 byte); and the same linears in
    fp32 and bf16."""
    q = fp32 = 0
    for path, (c, qp) in qm.codes.items():
        spec = qm.plan[path].weight
        n = int(np.prod(c.shape))
        q += (n + 1) // 2 if spec.bits <= 4 else n  # 2..4-bit codes are stored packed as nibbles
        q += (int(np.prod(qp.scale.shape)) * jnp.dtype(SCALE_DTYPES[spec.scale_dtype]).itemsize
              + int(np.prod(qp.zero_point.shape)))
        fp32 += n * 4
    return {"quantized": q, "fp32": fp32, "bf16": fp32 // 2}
