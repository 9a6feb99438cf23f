"""The float (bf16) DiT with adaLN-Zero's gated residuals in its GEMMs' epilogues, on Hopper.

Why: in the bf16 forward XLA computes each block's proj and fc2 on cuBLAS and the gated residuals
``x + gate * y`` as passes over the residual stream (after fc2 a loop fusion reading x, y1 and y2,
~190 us a block at DiT-XL/2's batch 256; and the second LayerNorm's fusion reads y1 beside x). The
real low-bit path's persistent GEMM (``kernels.scaled_gemm``) in its bf16 form (``gemm_bf16_mosaic``)
runs these two GEMMs at cuBLAS' speed, and with the residual in its epilogue y1 / y2 are never
written: the XL/2 forward 1.8-2.4% faster at batch 256 on an H100 (docs/RESULTS.md, eighteenth
session).

How: an interceptor, as the real mode's: every bf16 ``nn.Dense`` output is recorded with its input
and parameters; a ``GatedResidual`` whose ``y`` is such an output reruns that Dense through the
kernel with the residual (XLA drops the first GEMM, whose output is then unused). Where the kernel's
guard refuses (not Hopper, not bf16, shapes off the tiles), the model runs as written. The model
code is unchanged; the function is the model's (the product rounded to bf16, then bias, gate and
residual each rounded to bf16 as the bf16 model's ops are).
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from qdit_jax.diffusion.pipeline import dit_apply_fn
from qdit_jax.models.dit import DiT, DiTConfig, GatedResidual, SplitQKVDense
from qdit_jax.quant.kernels.scaled_gemm import (BF16_TILE_K, TILE_M, TILE_N, bf16_gemm_applies,
                                                epilogue_wg_residual_fits, gemm_bf16_mosaic)
from qdit_jax.quant.real import Traced, call_args
from qdit_jax.quant.real_layers import residual_mismatch

RESIDUAL_GEMMS = ("auto", "xla", "mosaic")


class DenseSource(NamedTuple):
    """A bf16 Dense's output ``out`` with its (M, K) input and parameters (kernel (K, N), bias (N,))."""

    out: jax.Array
    x2: jax.Array
    kernel: jax.Array
    bias: jax.Array | None


def residual_gemm(x: jax.Array, gate: jax.Array, src: DenseSource, force: bool = False,
                  epilogue_wg: bool = False) -> jax.Array | None:
    """``x + gate[:, None] * src.out`` as one bf16 GEMM with the gated residual in its epilogue, or None
    where the kernel does not apply (``force``: raise instead, naming why); ``epilogue_wg``: that epilogue
    on the kernel's fourth warpgroup where one gate row spans a CTA tile (``gemm_bf16_mosaic``)."""
    m, k = src.x2.shape
    n = src.kernel.shape[1]
    why = residual_mismatch(x, gate, src.out, m, n)
    if why is None:
        ok, why = bf16_gemm_applies(m, n, k, rows_per_gate=x.shape[1])
        why = None if ok else why
    if why is not None:
        if force:
            raise ValueError(f"residual_gemm='mosaic': {why}")
        return None
    epi = epilogue_wg and epilogue_wg_residual_fits(m, gate.shape[0])
    y = gemm_bf16_mosaic(src.x2, src.kernel.astype(jnp.bfloat16), src.bias, residual=x.reshape(m, n), gate=gate,
                         w_kn=True, **({"epilogue_wg": True} if epi else {}))
    return y.reshape(x.shape)


def _make_interceptor(force: bool, epilogue_wg: bool) -> Callable:
    dense_out = Traced()

    def interceptor(next_fun: Callable, args: tuple, kwargs: dict, context: Any) -> Any:
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        module = context.module
        if type(module) is GatedResidual:
            x, gate, y = call_args(args, kwargs, ("x", "gate", "y"))
            src = dense_out.get(y)
            out = None if src is None else residual_gemm(x, gate, src, force, epilogue_wg)
            return next_fun(*args, **kwargs) if out is None else out
        out = next_fun(*args, **kwargs)
        if (isinstance(module, nn.Dense) and not isinstance(module, SplitQKVDense) and not kwargs
                and jnp.dtype(out.dtype) == jnp.dtype(jnp.bfloat16)):
            x = args[0]
            params = module.variables.get("params", {})
            if "kernel" in params and x.ndim >= 2:
                dense_out.put(DenseSource(out, x.reshape(-1, x.shape[-1]), params["kernel"], params.get("bias")))
        return out

    return interceptor


@contextlib.contextmanager
def fused_residuals(force: bool = False, epilogue_wg: bool = False) -> Iterator[None]:
    """Within this context, each gated residual fed by a bf16 Dense runs as that Dense's GEMM with the
    residual in its epilogue where the kernel applies (``force``: everywhere, or a ValueError;
    ``epilogue_wg``: see ``residual_gemm``)."""
    with nn.intercept_methods(_make_interceptor(force, epilogue_wg)):
        yield


def kernel_available() -> bool:
    """Whether the bf16 residual GEMM can run here (a Hopper GPU with Pallas Mosaic GPU)."""
    return bf16_gemm_applies(2 * TILE_M, TILE_N, BF16_TILE_K, rows_per_gate=2 * TILE_M)[0]


def fused_float_apply_fn(cfg: DiTConfig, residual_gemm: str = "auto", epilogue_wg: bool = False) -> Callable:
    """The float forward as an ``apply_fn(params, x, t, y)``: with ``residual_gemm`` 'auto' the gated
    residuals in the GEMM epilogue where the kernel applies (bf16 on Hopper), 'mosaic' everywhere (an
    error where it cannot), 'xla' the model as written. ``epilogue_wg``: that epilogue on the kernel's
    fourth warpgroup (opt-in: built in the twentieth session, not yet measured on a GPU)."""
    if residual_gemm not in RESIDUAL_GEMMS:
        raise ValueError(f"residual_gemm must be one of {RESIDUAL_GEMMS}, got {residual_gemm!r}")
    if residual_gemm == "xla" or (residual_gemm == "auto" and not kernel_available()):
        return dit_apply_fn(cfg)
    model = DiT(cfg)

    def apply_fn(params: Any, x: jax.Array, t: jax.Array, y: jax.Array) -> jax.Array:
        with fused_residuals(force=residual_gemm == "mosaic", epilogue_wg=epilogue_wg):
            return model.apply({"params": params}, x, t, y)

    return apply_fn
