"""The forward a command should run for a loaded model: plain, or under the quantization interceptor."""
from __future__ import annotations

from typing import Any, Mapping

from qdit_jax.diffusion.pipeline import ApplyFn
from qdit_jax.errors import QditError
from qdit_jax.io.loading import LoadedModel
from qdit_jax.models.dit import DiTConfig, params_in_compute_dtype


EXECUTIONS = ("fake", "real")


def with_compute_params(first_arg: Any, cfg: DiTConfig) -> Any:
    """An apply_fn's first argument with its float params stored once in ``cfg``'s compute dtype:
    plain params, a fake-quant bundle ``{"params", "static"}`` or real-mode variables
    ``{"params", "weights"}`` (the quantized weights stay as they are). Exact in all three modes:
    every Dense casts its kernel to the compute dtype at each call anyway (tests/quant/test_runtime.py)."""
    if isinstance(first_arg, Mapping) and "params" in first_arg:
        return {**first_arg, "params": params_in_compute_dtype(first_arg["params"], cfg)}
    return params_in_compute_dtype(first_arg, cfg)


def model_apply_fn(model: LoadedModel, cfg: DiTConfig | None = None, execution: str = "fake",
                   real_options: Any = None, unpack_w4: bool | None = None) -> tuple[ApplyFn, Any]:
    """(apply_fn, first argument of apply_fn) for ``model``. A quantized checkpoint runs under its
    interceptor: simulated ('fake': float math on dequantized values) or in real low precision
    ('real': integer / fp8 matmuls, ``quant.real``; ``unpack_w4`` as ``RealModel.variables``); a
    full-precision one runs plainly."""
    cfg = cfg or model.config
    if execution not in EXECUTIONS:
        raise QditError(f"execution must be one of {EXECUTIONS}, got {execution!r}")
    if execution == "real":
        if not model.quantization:
            raise QditError("real low-bit execution needs a quantized checkpoint: make one with "
                            "`qdit quantize --ckpt DIR --out QDIR` and sample QDIR")
        from qdit_jax.quant.checkpoint import real_checkpoint_apply_fn

        fn, variables = real_checkpoint_apply_fn(model, cfg, real_options, unpack_w4)
        return fn, with_compute_params(variables, cfg)
    if model.quantization:
        from qdit_jax.quant.checkpoint import quantized_apply_fn

        fn, bundle = quantized_apply_fn(model, cfg)
        return fn, with_compute_params(bundle, cfg)
    from qdit_jax.quant.fused_float import fused_float_apply_fn

    # bf16 on Hopper: the gated residuals in the proj / fc2 GEMMs' epilogues; elsewhere the model as written
    return fused_float_apply_fn(cfg), with_compute_params(model.params, cfg)
