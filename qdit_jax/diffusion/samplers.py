"""DDPM and DDIM samplers, each one ``jax.lax.scan`` over the (respaced) steps.

``model_fn(x_t, t_model) -> model output`` takes NHWC ``x_t`` and int32 ``t_model`` of shape
(N,) holding ORIGINAL timesteps (``timestep_map`` applied, as the official respacing wrapper
does) and returns ``C`` channels (eps) or ``2C`` (eps then the variance value, learned sigma).
Classifier-free guidance lives in ``model_fn`` (e.g. a closure over ``DiT.forward_with_cfg``).

Randomness is explicit: ``split_sampling_key(key, S)`` gives the key of the initial noise and
one key per loop iteration (iteration k runs step index ``S - 1 - k``); all noise is drawn with
``normal_noise(key, shape)``, so a Python loop of ``ddim_step`` / ``ddpm_step`` reproduces the
scan exactly. Math runs in float32 on float32 copies of the float64 tables, as the official
code does. The samplers do not jit themselves: jit the caller (it closes over the params).

Per-sample noise (optional, for results independent of batching and device count): with
``sample_ids`` (N,) given, sample ``i`` draws its noise from ``fold_in(key, sample_ids[i])`` of the
iteration's key instead of one draw for the whole batch, so a sample's noise does not depend on
which other samples share its batch or device.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from qdit_jax.diffusion.respace import SAMPLERS
from qdit_jax.diffusion.schedule import GaussianDiffusion
from qdit_jax.errors import QditError

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]


class StepOutput(NamedTuple):
    """One reverse step: the next x, the x_0 prediction, and the timesteps the model saw."""

    sample: jax.Array
    pred_xstart: jax.Array
    t_model: jax.Array


class Trajectory(NamedTuple):
    """Model inputs of a whole loop, stacked over steps in loop order (t descending)."""

    x_t: jax.Array  # (S, *shape) float32: what the model was fed at each step
    t_model: jax.Array  # (S, N) int32: the original timesteps it was fed


def split_sampling_key(key: jax.Array, num_steps: int) -> tuple[jax.Array, jax.Array]:
    """(key of the initial noise, (num_steps,) keys: one per loop iteration)."""
    init_key, steps_key = jax.random.split(key)
    return init_key, jax.random.split(steps_key, num_steps)


def normal_noise(key: jax.Array, shape: Sequence[int]) -> jax.Array:
    """Standard normal float32 noise of ``shape``: the initial noise and every step's noise.

    Drawn flat and reshaped: the same numbers as ``jax.random.normal(key, shape)`` under JAX's
    default partitionable threefry, but many times faster to compile for 4-D shapes on CPU.
    """
    return jax.random.normal(key, (math.prod(shape),), jnp.float32).reshape(tuple(shape))


def _draw(key: jax.Array, shape: tuple[int, ...], sample_ids: jax.Array | None) -> jax.Array:
    """Noise of ``shape``: one draw for the batch, or one per sample from ``fold_in(key, id)``."""
    if sample_ids is None:
        return normal_noise(key, shape)
    return jax.vmap(lambda i: normal_noise(jax.random.fold_in(key, i), shape[1:]))(sample_ids)


def _batch_t(x: jax.Array, index: int | jax.Array) -> jax.Array:
    index = jnp.asarray(index)
    if index.ndim != 0:
        raise QditError(f"step index must be a scalar, got shape {index.shape}")
    return jnp.full((x.shape[0],), index, dtype=jnp.int32)


def _check_noise(noise: jax.Array, x: jax.Array, what: str) -> jax.Array:
    if tuple(jnp.shape(noise)) != tuple(x.shape):
        raise QditError(f"{what} has shape {tuple(jnp.shape(noise))} but x_t has {tuple(x.shape)}; pass matching noise")
    return jnp.asarray(noise, jnp.float32)


def _check_eta(eta: float | jax.Array) -> bool:
    """Validate a concrete eta (>= 0); returns whether eta is known to be 0 (no noise needed)."""
    try:
        value = float(eta)
    except (TypeError, jax.errors.ConcretizationTypeError):
        return False  # traced: cannot check here
    if not value >= 0 or math.isinf(value):
        raise QditError(f"eta must be a finite number >= 0 (0 = deterministic DDIM, 1 = DDPM-like), got {eta!r}")
    return value == 0.0


def ddim_step(model_fn: ModelFn, x: jax.Array, index: int | jax.Array, diffusion: GaussianDiffusion, *,
              eta: float | jax.Array = 0.0, clip_denoised: bool = False,
              noise: jax.Array | None = None) -> StepOutput:
    """The official ``ddim_sample`` at respaced step ``index`` (noise needed only when eta > 0)."""
    deterministic = _check_eta(eta)
    x = jnp.asarray(x, jnp.float32)
    t = _batch_t(x, index)
    t_model = diffusion.model_timesteps(t)
    out = diffusion.p_mean_variance(model_fn(x, t_model), x, t, clip_denoised=clip_denoised)
    eps = diffusion.predict_eps_from_xstart(x, t, out.pred_xstart)
    abar_prev = diffusion.extract("alphas_cumprod_prev", t, x.ndim)
    sigma = jnp.asarray(eta, jnp.float32) * diffusion.extract("ddim_sigma_unit", t, x.ndim)
    # max(., 0) only guards against float rounding (or eta > 1) making the root's argument < 0.
    mean = out.pred_xstart * jnp.sqrt(abar_prev) + jnp.sqrt(jnp.maximum(1 - abar_prev - sigma**2, 0.0)) * eps
    if noise is None:
        if not deterministic:
            raise QditError("ddim_step with eta > 0 needs noise; pass noise=jax.random.normal(key, x.shape)")
        return StepOutput(mean, out.pred_xstart, t_model)
    nonzero = (t != 0).astype(jnp.float32).reshape((-1,) + (1,) * (x.ndim - 1))
    sample = mean + nonzero * sigma * _check_noise(noise, x, "noise")
    return StepOutput(sample, out.pred_xstart, t_model)


def ddpm_step(model_fn: ModelFn, x: jax.Array, index: int | jax.Array, diffusion: GaussianDiffusion, *,
              noise: jax.Array, clip_denoised: bool = False) -> StepOutput:
    """The official ``p_sample`` at respaced step ``index`` (no noise is added at index 0)."""
    x = jnp.asarray(x, jnp.float32)
    t = _batch_t(x, index)
    t_model = diffusion.model_timesteps(t)
    out = diffusion.p_mean_variance(model_fn(x, t_model), x, t, clip_denoised=clip_denoised)
    nonzero = (t != 0).astype(jnp.float32).reshape((-1,) + (1,) * (x.ndim - 1))
    sample = out.mean + nonzero * jnp.exp(0.5 * out.log_variance) * _check_noise(noise, x, "noise")
    return StepOutput(sample, out.pred_xstart, t_model)


def _loop(step: Callable[[jax.Array, jax.Array, jax.Array | None], StepOutput], shape: Sequence[int],
          key: jax.Array, diffusion: GaussianDiffusion, noise: jax.Array | None, needs_noise: bool,
          return_trajectory: bool, sample_ids: jax.Array | None = None) -> jax.Array | tuple[jax.Array, Trajectory]:
    """Run ``step`` from index S-1 down to 0 in one scan."""
    try:
        shape = tuple(int(s) for s in shape)
    except TypeError:
        raise QditError(f"shape must be a sequence of ints (N, H, W, C), got {shape!r}") from None
    if len(shape) < 2 or min(shape) < 1:
        raise QditError(f"shape must be (N, ..., C) with positive sizes, got {shape}")
    if sample_ids is not None:
        if tuple(jnp.shape(sample_ids)) != shape[:1]:
            raise QditError(f"sample_ids has shape {tuple(jnp.shape(sample_ids))}; pass one id per sample, shape {shape[:1]}")
        sample_ids = jnp.asarray(sample_ids, jnp.uint32)
    n_steps = diffusion.num_timesteps
    init_key, step_keys = split_sampling_key(key, n_steps)
    if noise is None:
        x = _draw(init_key, shape, sample_ids)
    elif tuple(jnp.shape(noise)) != shape:
        raise QditError(f"initial noise has shape {tuple(jnp.shape(noise))} but shape is {shape}; make them equal")
    else:
        x = jnp.asarray(noise, jnp.float32)

    def body(x: jax.Array, inputs: tuple[jax.Array, jax.Array]):
        index, k = inputs
        z = _draw(k, shape, sample_ids) if needs_noise else None
        out = step(x, index, z)
        return out.sample, ((x, out.t_model) if return_trajectory else None)

    indices = jnp.arange(n_steps - 1, -1, -1, dtype=jnp.int32)
    x, traj = jax.lax.scan(body, x, (indices, step_keys))
    return (x, Trajectory(*traj)) if return_trajectory else x


def ddim_sample(model_fn: ModelFn, shape: Sequence[int], key: jax.Array, diffusion: GaussianDiffusion, *,
                eta: float | jax.Array = 0.0, clip_denoised: bool = False, noise: jax.Array | None = None,
                return_trajectory: bool = False, sample_ids: jax.Array | None = None
                ) -> jax.Array | tuple[jax.Array, Trajectory]:
    """DDIM samples (the official ``ddim_sample_loop``); with ``return_trajectory`` also the model inputs."""
    deterministic = _check_eta(eta)

    def step(x: jax.Array, index: jax.Array, z: jax.Array | None) -> StepOutput:
        return ddim_step(model_fn, x, index, diffusion, eta=eta, clip_denoised=clip_denoised, noise=z)

    return _loop(step, shape, key, diffusion, noise, not deterministic, return_trajectory, sample_ids)


def ddpm_sample(model_fn: ModelFn, shape: Sequence[int], key: jax.Array, diffusion: GaussianDiffusion, *,
                clip_denoised: bool = False, noise: jax.Array | None = None,
                return_trajectory: bool = False, sample_ids: jax.Array | None = None
                ) -> jax.Array | tuple[jax.Array, Trajectory]:
    """Ancestral samples (the official ``p_sample_loop``); with ``return_trajectory`` also the model inputs."""

    def step(x: jax.Array, index: jax.Array, z: jax.Array | None) -> StepOutput:
        return ddpm_step(model_fn, x, index, diffusion, noise=z, clip_denoised=clip_denoised)

    return _loop(step, shape, key, diffusion, noise, True, return_trajectory, sample_ids)


def sample(model_fn: ModelFn, shape: Sequence[int], key: jax.Array, diffusion: GaussianDiffusion,
           sampler: str = "ddim", eta: float = 0.0, clip_denoised: bool = False,
           noise: jax.Array | None = None, return_trajectory: bool = False, sample_ids: jax.Array | None = None
           ) -> jax.Array | tuple[jax.Array, Trajectory]:
    """Dispatch to ``ddim_sample`` or ``ddpm_sample`` by name."""
    if sampler == "ddim":
        return ddim_sample(model_fn, shape, key, diffusion, eta=eta, clip_denoised=clip_denoised,
                           noise=noise, return_trajectory=return_trajectory, sample_ids=sample_ids)
    if sampler == "ddpm":
        if not _check_eta(eta):
            raise QditError(f"eta={eta!r} applies only to the ddim sampler; drop it or use sampler='ddim'")
        return ddpm_sample(model_fn, shape, key, diffusion, clip_denoised=clip_denoised, noise=noise,
                           return_trajectory=return_trajectory, sample_ids=sample_ids)
    raise QditError(f"unknown sampler {sampler!r}; use one of {list(SAMPLERS)}")
