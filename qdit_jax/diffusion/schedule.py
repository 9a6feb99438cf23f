"""Beta schedules and the Gaussian diffusion process, with the semantics of the official DiT code.

``GaussianDiffusion`` is a frozen record of float64 NumPy tables (as the official code keeps
them, for accuracy). Its methods gather the tables at a batch of (respaced) step indices as
float32 and do the math in float32, exactly like the official ``_extract_into_tensor(...)``
followed by float32 torch arithmetic. Arrays are NHWC: the channel axis is the last one.

Variance types (official ``ModelVarType``):
- ``learned_range``: the model outputs ``2C`` channels, ``eps`` then ``v`` in [-1, 1];
  ``log var = frac * log(beta_t) + (1 - frac) * posterior_log_variance_clipped_t`` with
  ``frac = (v + 1) / 2``. This is DiT's default (``learn_sigma=True``).
- ``fixed_large``: variance ``beta_t`` (with the posterior variance at t = 0).
- ``fixed_small``: the posterior variance.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from qdit_jax.errors import QditError

SCHEDULES = ("linear", "squaredcos_cap_v2")
VAR_TYPES = ("learned_range", "fixed_large", "fixed_small")


def get_named_beta_schedule(name: str, num_timesteps: int) -> np.ndarray:
    """Betas (float64) of the named schedule, as the official ``get_named_beta_schedule``.

    ``linear`` is Ho et al.'s 1e-4..0.02 over 1000 steps, scaled by ``1000 / num_timesteps`` so
    that it stays similar for other step counts; ``squaredcos_cap_v2`` is the cosine schedule
    of Nichol & Dhariwal with betas capped at 0.999.
    """
    if int(num_timesteps) != num_timesteps or num_timesteps < 1:
        raise QditError(f"num_timesteps must be a positive integer, got {num_timesteps!r}")
    n = int(num_timesteps)
    if name == "linear":
        scale = 1000 / n
        return np.linspace(scale * 0.0001, scale * 0.02, n, dtype=np.float64)
    if name == "squaredcos_cap_v2":
        def alpha_bar(s: float) -> float:
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

        return np.array(
            [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)],
            dtype=np.float64,
        )
    raise QditError(f"unknown beta schedule {name!r}; use one of {list(SCHEDULES)}")


class MeanVariance(NamedTuple):
    """What ``p_mean_variance`` returns: the reverse-step Gaussian and the x_0 prediction."""

    mean: jax.Array
    variance: jax.Array
    log_variance: jax.Array
    pred_xstart: jax.Array


@dataclasses.dataclass(frozen=True, eq=False)
class GaussianDiffusion:
    """Tables of a (possibly respaced) diffusion process. Build it with ``from_betas``.

    Index ``i`` of every table is the respaced step; ``timestep_map[i]`` is the original
    timestep the model is conditioned on (the identity when nothing was respaced).
    """

    betas: np.ndarray
    alphas_cumprod: np.ndarray
    alphas_cumprod_prev: np.ndarray
    sqrt_recip_alphas_cumprod: np.ndarray
    sqrt_recipm1_alphas_cumprod: np.ndarray
    posterior_variance: np.ndarray
    posterior_log_variance_clipped: np.ndarray
    posterior_mean_coef1: np.ndarray
    posterior_mean_coef2: np.ndarray
    timestep_map: np.ndarray
    var_type: str = "learned_range"
    original_num_steps: int = 0

    def __post_init__(self) -> None:
        n = self.betas.shape[0] if self.betas.ndim == 1 else -1
        if n < 1:
            raise QditError(f"betas must be a non-empty 1-D array, got shape {self.betas.shape}")
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, np.ndarray) and v.shape != (n,):
                raise QditError(f"GaussianDiffusion.{f.name} has shape {v.shape}, expected ({n},)")
        if not (np.all(self.betas > 0) and np.all(self.betas <= 1)):
            raise QditError("betas must lie in (0, 1]; check the schedule")
        if self.var_type not in VAR_TYPES:
            raise QditError(f"unknown var_type {self.var_type!r}; use one of {list(VAR_TYPES)}")
        if np.any(np.diff(self.timestep_map) <= 0) or self.timestep_map[0] < 0:
            raise QditError("timestep_map must be strictly increasing non-negative timesteps")

    @classmethod
    def from_betas(cls, betas: np.ndarray, *, timestep_map: np.ndarray | None = None,
                   var_type: str = "learned_range", original_num_steps: int | None = None
                   ) -> "GaussianDiffusion":
        """Derive every table from ``betas`` in float64, as the official constructor does."""
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or betas.shape[0] < 1:
            raise QditError(f"betas must be a non-empty 1-D array, got shape {betas.shape}")
        n = betas.shape[0]
        alphas = 1.0 - betas
        acp = np.cumprod(alphas)
        acp_prev = np.append(1.0, acp[:-1])
        post_var = betas * (1.0 - acp_prev) / (1.0 - acp)
        # The posterior variance is 0 at t = 0; the official code clips its log with the value
        # at t = 1. A one-step process has no t = 1: use log(beta_0) (its noise is never added).
        with np.errstate(divide="ignore"):
            post_log = np.log(np.append(post_var[1], post_var[1:])) if n > 1 else np.log(betas)
        tmap = np.arange(n, dtype=np.int64) if timestep_map is None else np.asarray(timestep_map, np.int64)
        return cls(
            betas=betas,
            alphas_cumprod=acp,
            alphas_cumprod_prev=acp_prev,
            sqrt_recip_alphas_cumprod=np.sqrt(1.0 / acp),
            sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / acp - 1),
            posterior_variance=post_var,
            posterior_log_variance_clipped=post_log,
            posterior_mean_coef1=betas * np.sqrt(acp_prev) / (1.0 - acp),
            posterior_mean_coef2=(1.0 - acp_prev) * np.sqrt(alphas) / (1.0 - acp),
            timestep_map=tmap,
            var_type=var_type,
            original_num_steps=int(original_num_steps if original_num_steps is not None else n),
        )

    # ----------------------------------------------------------------------------- tables
    @property
    def num_timesteps(self) -> int:
        return int(self.betas.shape[0])

    @property
    def learn_sigma(self) -> bool:
        return self.var_type == "learned_range"

    @functools.cached_property
    def _f32(self) -> dict[str, np.ndarray]:
        """Float32 copies of the tables (NumPy, so the cache never holds a tracer or a device)."""
        large = np.append(self.posterior_variance[1], self.betas[1:]) if self.num_timesteps > 1 else self.betas
        t64 = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if isinstance(getattr(self, f.name), np.ndarray) and f.name != "timestep_map"}
        t64["log_betas"] = np.log(self.betas)
        t64["sqrt_alphas_cumprod"] = np.sqrt(self.alphas_cumprod)
        t64["sqrt_one_minus_alphas_cumprod"] = np.sqrt(1.0 - self.alphas_cumprod)
        t64["fixed_large_variance"] = large
        t64["fixed_large_log_variance"] = np.log(large)
        # DDIM's sigma at eta = 1 (precomputed in float64; the sampler multiplies by eta).
        t64["ddim_sigma_unit"] = (np.sqrt((1 - self.alphas_cumprod_prev) / (1 - self.alphas_cumprod))
                                  * np.sqrt(1 - self.alphas_cumprod / self.alphas_cumprod_prev))
        out = {k: v.astype(np.float32) for k, v in t64.items()}
        out["timestep_map"] = self.timestep_map.astype(np.int32)
        return out

    def extract(self, name: str, t: jax.Array, ndim: int) -> jax.Array:
        """Table ``name`` at step indices ``t`` (shape (N,)), shaped (N, 1, ..., 1) with ``ndim`` axes."""
        vals = jnp.asarray(self._f32[name])[jnp.asarray(t)]
        return vals.reshape(vals.shape + (1,) * (ndim - vals.ndim))

    def model_timesteps(self, t: jax.Array) -> jax.Array:
        """Original timesteps (int32) fed to the model for respaced indices ``t``."""
        return jnp.asarray(self._f32["timestep_map"])[jnp.asarray(t)]

    # ----------------------------------------------------------------------------- math
    def q_sample(self, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
        """Sample q(x_t | x_0) = sqrt(acp_t) x_0 + sqrt(1 - acp_t) noise."""
        x0 = jnp.asarray(x0, jnp.float32)
        _check_same_shape(x0, noise, "noise", "x0")
        return (self.extract("sqrt_alphas_cumprod", t, x0.ndim) * x0
                + self.extract("sqrt_one_minus_alphas_cumprod", t, x0.ndim) * noise)

    def predict_xstart_from_eps(self, x_t: jax.Array, t: jax.Array, eps: jax.Array) -> jax.Array:
        """x_0 = sqrt(1 / acp_t) x_t - sqrt(1 / acp_t - 1) eps."""
        _check_same_shape(x_t, eps, "eps", "x_t")
        return (self.extract("sqrt_recip_alphas_cumprod", t, x_t.ndim) * x_t
                - self.extract("sqrt_recipm1_alphas_cumprod", t, x_t.ndim) * eps)

    def predict_eps_from_xstart(self, x_t: jax.Array, t: jax.Array, pred_xstart: jax.Array) -> jax.Array:
        """Inverse of ``predict_xstart_from_eps`` (DDIM re-derives eps this way)."""
        return ((self.extract("sqrt_recip_alphas_cumprod", t, x_t.ndim) * x_t - pred_xstart)
                / self.extract("sqrt_recipm1_alphas_cumprod", t, x_t.ndim))

    def q_posterior_mean(self, x_start: jax.Array, x_t: jax.Array, t: jax.Array) -> jax.Array:
        """Mean of q(x_{t-1} | x_t, x_0)."""
        return (self.extract("posterior_mean_coef1", t, x_t.ndim) * x_start
                + self.extract("posterior_mean_coef2", t, x_t.ndim) * x_t)

    def split_model_output(self, model_out: jax.Array, x_t: jax.Array) -> tuple[jax.Array, jax.Array | None]:
        """(eps, v) from a model output of 2C channels (learned sigma) or (eps, None) from C."""
        c = x_t.shape[-1]
        want = 2 * c if self.learn_sigma else c
        if tuple(model_out.shape) != tuple(x_t.shape[:-1]) + (want,):
            raise QditError(
                f"model output has shape {tuple(model_out.shape)}, expected {tuple(x_t.shape[:-1]) + (want,)} "
                f"(var_type={self.var_type!r}: {'eps then v channels' if self.learn_sigma else 'eps only'}); "
                "make learn_sigma match the model")
        model_out = model_out.astype(jnp.float32)
        if self.learn_sigma:
            return model_out[..., :c], model_out[..., c:]
        return model_out, None

    def p_mean_variance(self, model_out: jax.Array, x_t: jax.Array, t: jax.Array,
                        clip_denoised: bool = False) -> MeanVariance:
        """The official ``p_mean_variance`` given the model output (eps prediction)."""
        x_t = jnp.asarray(x_t, jnp.float32)
        eps, v = self.split_model_output(model_out, x_t)
        nd = x_t.ndim
        if v is not None:
            min_log = self.extract("posterior_log_variance_clipped", t, nd)
            max_log = self.extract("log_betas", t, nd)
            frac = (v + 1) / 2
            log_var = frac * max_log + (1 - frac) * min_log
            var = jnp.exp(log_var)
        else:
            var_name, log_name = {
                "fixed_large": ("fixed_large_variance", "fixed_large_log_variance"),
                "fixed_small": ("posterior_variance", "posterior_log_variance_clipped"),
            }[self.var_type]
            var = jnp.broadcast_to(self.extract(var_name, t, nd), x_t.shape)
            log_var = jnp.broadcast_to(self.extract(log_name, t, nd), x_t.shape)
        pred_xstart = self.predict_xstart_from_eps(x_t, t, eps)
        if clip_denoised:
            pred_xstart = jnp.clip(pred_xstart, -1.0, 1.0)
        mean = self.q_posterior_mean(pred_xstart, x_t, t)
        return MeanVariance(mean=mean, variance=var, log_variance=log_var, pred_xstart=pred_xstart)


def _check_same_shape(ref: jax.Array, other: jax.Array, name: str, ref_name: str) -> None:
    if tuple(jnp.shape(other)) != tuple(jnp.shape(ref)):
        raise QditError(f"{name} has shape {tuple(jnp.shape(other))} but {ref_name} has {tuple(jnp.shape(ref))}; "
                        "pass arrays of the same shape")
