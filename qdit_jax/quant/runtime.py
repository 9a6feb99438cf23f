"""The forward a command should run for a loaded model: plain, or under the quantization interceptor."""
from __future__ import annotations

from typing import Any

from qdit_jax.diffusion.pipeline import ApplyFn, dit_apply_fn
from qdit_jax.io.loading import LoadedModel
from qdit_jax.models.dit import DiTConfig, params_in_compute_dtype


def model_apply_fn(model: LoadedModel, cfg: DiTConfig | None = None) -> tuple[ApplyFn, Any]:
    """(apply_fn, first argument of apply_fn) for ``model``; a quantized checkpoint runs under its interceptor."""
    cfg = cfg or model.config
    if model.quantization:
        from qdit_jax.quant.checkpoint import quantized_apply_fn

        return quantized_apply_fn(model, cfg)
    return dit_apply_fn(cfg), params_in_compute_dtype(model.params, cfg)
