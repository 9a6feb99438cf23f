"""Diffusion schedules, timestep respacing and the DDPM / DDIM samplers (official DiT semantics)."""
from qdit_jax.diffusion.respace import SAMPLERS, make_diffusion, respace_betas, space_timesteps, steps_from_arg
from qdit_jax.diffusion.samplers import (
    StepOutput,
    Trajectory,
    ddim_sample,
    ddim_step,
    ddpm_sample,
    ddpm_step,
    normal_noise,
    sample,
    split_sampling_key,
)
from qdit_jax.diffusion.schedule import GaussianDiffusion, MeanVariance, get_named_beta_schedule

__all__ = [
    "SAMPLERS", "GaussianDiffusion", "MeanVariance", "StepOutput", "Trajectory", "ddim_sample", "ddim_step",
    "ddpm_sample", "ddpm_step", "get_named_beta_schedule", "make_diffusion", "normal_noise", "respace_betas", "sample",
    "space_timesteps", "split_sampling_key", "steps_from_arg",
]
