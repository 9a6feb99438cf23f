"""DDIM / DDPM steps and loops against float64 NumPy equations, analytic models and diffusers."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qdit_jax.diffusion import (
    ddim_sample,
    ddim_step,
    ddpm_sample,
    ddpm_step,
    make_diffusion,
    normal_noise,
    sample,
    split_sampling_key,
)
from qdit_jax.errors import QditError

SHAPE = (2, 3, 3, 2)  # N, H, W, C
C = SHAPE[-1]
ACP_ORIG = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))  # the official linear schedule, float64


def _ref(kept: list[int]) -> dict[str, np.ndarray]:
    """Float64 tables of the process keeping original timesteps ``kept`` (official SpacedDiffusion)."""
    acp = ACP_ORIG[np.asarray(kept)]
    acp_prev = np.concatenate([[1.0], acp[:-1]])
    betas = 1 - acp / acp_prev
    post_var = betas * (1 - acp_prev) / (1 - acp)
    return dict(acp=acp, acp_prev=acp_prev, betas=betas, post_var=post_var,
                post_log=np.log(np.where(np.arange(len(kept)) == 0, post_var[1], post_var)))


def _ref_xstart(r: dict, i: int, x: np.ndarray, eps: np.ndarray, clip: bool) -> np.ndarray:
    x0 = np.sqrt(1 / r["acp"][i]) * x - np.sqrt(1 / r["acp"][i] - 1) * eps
    return np.clip(x0, -1, 1) if clip else x0


def _ref_ddim(r: dict, i: int, x: np.ndarray, out: np.ndarray, eta: float, noise: np.ndarray, clip: bool):
    ab, abp = r["acp"][i], r["acp_prev"][i]
    x0 = _ref_xstart(r, i, x, out[..., :C], clip)
    eps = (np.sqrt(1 / ab) * x - x0) / np.sqrt(1 / ab - 1)
    sigma = eta * np.sqrt((1 - abp) / (1 - ab)) * np.sqrt(1 - ab / abp)
    mean = x0 * np.sqrt(abp) + np.sqrt(1 - abp - sigma**2) * eps
    return mean + (i != 0) * sigma * noise, x0


def _ref_ddpm(r: dict, i: int, x: np.ndarray, out: np.ndarray, noise: np.ndarray, clip: bool, var_type: str):
    ab, abp, beta = r["acp"][i], r["acp_prev"][i], r["betas"][i]
    x0 = _ref_xstart(r, i, x, out[..., :C], clip)
    mean = beta * np.sqrt(abp) / (1 - ab) * x0 + (1 - abp) * np.sqrt(1 - beta) / (1 - ab) * x
    if var_type == "learned_range":
        frac = (out[..., C:] + 1) / 2
        log_var = frac * np.log(beta) + (1 - frac) * r["post_log"][i]
    elif var_type == "fixed_large":
        log_var = np.log(r["post_var"][1] if i == 0 else beta)
    else:
        log_var = r["post_log"][i]
    return mean + (i != 0) * np.exp(0.5 * log_var) * noise, x0


def _constant_model(out: np.ndarray, seen: list):
    def model_fn(x: jax.Array, t: jax.Array) -> jax.Array:
        assert t.dtype == jnp.int32 and t.shape == (x.shape[0],)
        seen.append(np.asarray(t))
        return jnp.asarray(out, jnp.float32)
    return model_fn


def _random_io(seed: int, out_channels: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(SHAPE)
    out = rng.standard_normal(SHAPE[:-1] + (out_channels,))
    out[..., C:] = np.tanh(out[..., C:])  # the variance values live in [-1, 1]
    return x, out, rng.standard_normal(SHAPE)


DDIM50 = make_diffusion(respacing="ddim50")


@pytest.mark.parametrize("index", [0, 1, 23, 49])
@pytest.mark.parametrize("eta,clip", [(0.0, False), (0.5, False), (0.5, True)])
def test_ddim_step_matches_numpy(index: int, eta: float, clip: bool) -> None:
    x, out, noise = _random_io(index, 2 * C)
    if clip:
        x = x * 3
    seen: list = []
    got = ddim_step(_constant_model(out, seen), jnp.asarray(x, jnp.float32), index, DDIM50, eta=eta,
                    clip_denoised=clip, noise=jnp.asarray(noise, jnp.float32))
    want, want_x0 = _ref_ddim(_ref(list(range(0, 1000, 20))), index, x, out, eta, noise, clip)
    np.testing.assert_allclose(np.asarray(got.pred_xstart), want_x0, rtol=2e-5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(got.sample), want, rtol=2e-5, atol=1e-4)
    np.testing.assert_array_equal(seen[0], [20 * index] * SHAPE[0])  # original timestep fed to the model
    np.testing.assert_array_equal(np.asarray(got.t_model), seen[0])
    if eta == 0.0:  # deterministic: noise is not needed and not used
        no_noise = ddim_step(_constant_model(out, []), jnp.asarray(x, jnp.float32), index, DDIM50)
        np.testing.assert_allclose(np.asarray(no_noise.sample), np.asarray(got.sample), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("respacing,var_type,index", [
    ("100", "learned_range", 0), ("100", "learned_range", 1), ("100", "learned_range", 57),
    ("100", "learned_range", 99), ("", "fixed_large", 0), ("", "fixed_large", 500),
    ("", "fixed_small", 0), ("", "fixed_small", 999),
])
@pytest.mark.parametrize("clip", [False, True])
def test_ddpm_step_matches_numpy(respacing: str, var_type: str, index: int, clip: bool) -> None:
    d = make_diffusion(respacing=respacing, learn_sigma=var_type == "learned_range",
                       sigma_small=var_type == "fixed_small")
    x, out, noise = _random_io(index + 7, 2 * C if d.learn_sigma else C)
    seen: list = []
    got = ddpm_step(_constant_model(out, seen), jnp.asarray(x, jnp.float32), index, d,
                    noise=jnp.asarray(noise, jnp.float32), clip_denoised=clip)
    want, want_x0 = _ref_ddpm(_ref(list(d.timestep_map)), index, x, out, noise, clip, var_type)
    np.testing.assert_allclose(np.asarray(got.pred_xstart), want_x0, rtol=2e-5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(got.sample), want, rtol=2e-5, atol=1e-4)
    np.testing.assert_array_equal(seen[0], [d.timestep_map[index]] * SHAPE[0])


def _x0_model(x0: np.ndarray, learn_sigma: bool):
    """A model whose eps makes x_0 = ``x0`` exactly, from the ORIGINAL timestep it is fed."""
    acp = jnp.asarray(ACP_ORIG, jnp.float32)

    def model_fn(x: jax.Array, t: jax.Array) -> jax.Array:
        a = acp[t][:, None, None, None]
        eps = (x - jnp.sqrt(a) * x0) / jnp.sqrt(1 - a)
        return jnp.concatenate([eps, jnp.tanh(x)], -1) if learn_sigma else eps
    return model_fn


@pytest.mark.parametrize("sampler,eta,respacing", [("ddim", 0.0, "ddim25"), ("ddim", 0.5, "10,10"),
                                                   ("ddpm", 0.0, "20")])
def test_loop_with_x0_model_reaches_x0(sampler: str, eta: float, respacing: str) -> None:
    x0 = np.linspace(-0.9, 0.9, np.prod(SHAPE)).reshape(SHAPE).astype(np.float32)
    d = make_diffusion(respacing=respacing)
    got = sample(_x0_model(x0, True), SHAPE, jax.random.key(0), d, sampler=sampler, eta=eta)
    np.testing.assert_allclose(np.asarray(got), x0, atol=2e-4)


def test_zero_eps_ddim_scales_noise_by_final_alpha() -> None:
    # eps = 0: each DDIM step multiplies x by sqrt(acp_prev / acp); the product telescopes.
    d = make_diffusion(respacing="ddim20", learn_sigma=False)
    z = np.random.default_rng(3).standard_normal(SHAPE).astype(np.float32)
    got, traj = ddim_sample(lambda x, t: jnp.zeros_like(x), SHAPE, jax.random.key(1), d,
                            noise=jnp.asarray(z), return_trajectory=True)
    np.testing.assert_allclose(np.asarray(got), z / np.sqrt(ACP_ORIG[950]), rtol=1e-4)
    assert traj.x_t.shape == (20,) + SHAPE and traj.t_model.shape == (20, SHAPE[0])
    assert traj.t_model.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(traj.x_t[0]), z)  # the first model input is the noise
    np.testing.assert_array_equal(np.asarray(traj.t_model[:, 0]), np.arange(950, -1, -50))
    np.testing.assert_allclose(np.asarray(traj.x_t[-1]), z * np.sqrt(ACP_ORIG[0] / ACP_ORIG[950]), rtol=1e-4)


def _toy_model(x: jax.Array, t: jax.Array) -> jax.Array:
    """A nonlinear, timestep-dependent model with learned-sigma channels."""
    s = (t.astype(jnp.float32) / 1000.0)[:, None, None, None]
    return jnp.concatenate([jnp.sin(x) * (1 + s), jnp.tanh(x * s - 0.3)], -1)


@pytest.mark.parametrize("sampler,eta", [("ddpm", 0.0), ("ddim", 0.5)])
def test_jitted_scan_equals_python_loop_of_steps(sampler: str, eta: float) -> None:
    d = make_diffusion(respacing="12")
    key = jax.random.key(42)
    run = jax.jit(lambda k: sample(_toy_model, SHAPE, k, d, sampler=sampler, eta=eta, clip_denoised=True,
                                   return_trajectory=True))
    got, traj = run(key)
    init_key, step_keys = split_sampling_key(key, d.num_timesteps)
    x = normal_noise(init_key, SHAPE)
    for k, index in enumerate(range(d.num_timesteps - 1, -1, -1)):
        np.testing.assert_allclose(np.asarray(traj.x_t[k]), np.asarray(x), rtol=1e-5, atol=1e-5)
        z = normal_noise(step_keys[k], SHAPE)
        if sampler == "ddpm":
            x = ddpm_step(_toy_model, x, index, d, noise=z, clip_denoised=True).sample
        else:
            x = ddim_step(_toy_model, x, index, d, eta=eta, noise=z, clip_denoised=True).sample
    np.testing.assert_allclose(np.asarray(got), np.asarray(x), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(traj.t_model[:, 1]), d.timestep_map[::-1])
    # Same key, same samples; another key, other samples.
    np.testing.assert_array_equal(np.asarray(run(key)[0]), np.asarray(got))
    assert not np.allclose(np.asarray(run(jax.random.key(7))[0]), np.asarray(got))


def test_ddpm_sample_without_trajectory_uses_given_noise() -> None:
    d = make_diffusion(respacing="5")
    z = jnp.ones(SHAPE)
    a = ddpm_sample(_toy_model, SHAPE, jax.random.PRNGKey(0), d, noise=z)  # legacy uint32 keys work too
    b, traj = ddpm_sample(_toy_model, SHAPE, jax.random.PRNGKey(0), d, noise=z, return_trajectory=True)
    assert a.shape == SHAPE and a.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(traj.x_t[0]), np.ones(SHAPE))


def test_bad_inputs_raise() -> None:
    d = make_diffusion(respacing="5")
    key = jax.random.key(0)
    with pytest.raises(QditError, match="initial noise"):
        ddim_sample(_toy_model, SHAPE, key, d, noise=jnp.zeros((2, 3, 3, 1)))
    with pytest.raises(QditError, match="model output"):
        ddim_sample(lambda x, t: x, SHAPE, key, d)  # C channels, but learn_sigma wants 2C
    with pytest.raises(QditError, match="sampler"):
        sample(_toy_model, SHAPE, key, d, sampler="euler")
    for eta in (-0.1, float("nan"), float("inf")):
        with pytest.raises(QditError, match="eta"):
            sample(_toy_model, SHAPE, key, d, sampler="ddim", eta=eta)
    with pytest.raises(QditError, match="eta"):
        sample(_toy_model, SHAPE, key, d, sampler="ddpm", eta=0.5)
    with pytest.raises(QditError, match="noise"):
        ddim_step(_toy_model, jnp.zeros(SHAPE), 2, d, eta=0.5)
    with pytest.raises(QditError, match="noise"):
        ddpm_step(_toy_model, jnp.zeros(SHAPE), 2, d, noise=jnp.zeros((2, 3, 3, 1)))
    with pytest.raises(QditError, match="shape"):
        ddpm_sample(_toy_model, (2,), key, d)


def _torch_nchw(a: np.ndarray, torch):
    return torch.from_numpy(np.ascontiguousarray(np.transpose(a, (0, 3, 1, 2)), dtype=np.float32))


@pytest.mark.parametrize("index", [0, 1, 30, 49])
@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_ddim_step_matches_diffusers(index: int, eta: float) -> None:
    torch = pytest.importorskip("torch")
    from diffusers.schedulers.scheduling_ddim import DDIMScheduler
    sched = DDIMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                          clip_sample=False, set_alpha_to_one=True, steps_offset=0, timestep_spacing="leading")
    sched.set_timesteps(50)
    x, out, noise = _random_io(100 + index, 2 * C)
    want = sched.step(_torch_nchw(out[..., :C], torch), 20 * index, _torch_nchw(x, torch), eta=eta,
                      variance_noise=_torch_nchw(noise, torch)).prev_sample.numpy().transpose(0, 2, 3, 1)
    got = ddim_step(_constant_model(out, []), jnp.asarray(x, jnp.float32), index, DDIM50, eta=eta,
                    noise=jnp.asarray(noise, jnp.float32))
    np.testing.assert_allclose(np.asarray(got.sample), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("index", [1, 30, 49])
def test_ddpm_learned_range_step_matches_diffusers(index: int) -> None:
    torch = pytest.importorskip("torch")
    from diffusers.schedulers.scheduling_ddpm import DDPMScheduler
    sched = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                          variance_type="learned_range", clip_sample=False, timestep_spacing="leading")
    sched.set_timesteps(50)
    x, out, _ = _random_io(200 + index, 2 * C)
    nchw = (SHAPE[0], C, SHAPE[1], SHAPE[2])
    noise = torch.randn(nchw, generator=torch.Generator().manual_seed(index), dtype=torch.float32)
    want = sched.step(_torch_nchw(out, torch), 20 * index, _torch_nchw(x, torch),
                      generator=torch.Generator().manual_seed(index)).prev_sample.numpy().transpose(0, 2, 3, 1)
    got = ddpm_step(_constant_model(out, []), jnp.asarray(x, jnp.float32), index, DDIM50,
                    noise=jnp.asarray(noise.numpy().transpose(0, 2, 3, 1)))
    np.testing.assert_allclose(np.asarray(got.sample), want, rtol=1e-4, atol=1e-4)
