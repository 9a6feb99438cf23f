"""Beta schedules and the GaussianDiffusion tables / math against float64 NumPy written here."""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest

from qdit_jax.diffusion import GaussianDiffusion, get_named_beta_schedule, make_diffusion
from qdit_jax.errors import QditError

RTOL, ATOL = 2e-5, 2e-5


def _ref_tables(betas: np.ndarray) -> dict[str, np.ndarray]:
    """Float64 tables of a process, computed along a different path (logs, not cumprod)."""
    acp = np.exp(np.cumsum(np.log1p(-betas)))
    acp_prev = np.concatenate([[1.0], acp[:-1]])
    post_var = betas * (1 - acp_prev) / (1 - acp)
    return {
        "alphas_cumprod": acp,
        "alphas_cumprod_prev": acp_prev,
        "sqrt_recip_alphas_cumprod": 1 / np.sqrt(acp),
        "sqrt_recipm1_alphas_cumprod": np.sqrt((1 - acp) / acp),
        "posterior_variance": post_var,
        "posterior_log_variance_clipped": np.log(np.where(np.arange(len(betas)) == 0, post_var[1], post_var)),
        "posterior_mean_coef1": betas * np.sqrt(acp_prev) / (1 - acp),
        "posterior_mean_coef2": (1 - acp_prev) * np.sqrt(1 - betas) / (1 - acp),
    }


def test_linear_schedule_is_ho_et_al_scaled() -> None:
    np.testing.assert_allclose(get_named_beta_schedule("linear", 1000), np.linspace(1e-4, 0.02, 1000), rtol=1e-15)
    b = get_named_beta_schedule("linear", 250)  # scaled by 1000 / 250
    assert b.dtype == np.float64 and b.shape == (250,)
    np.testing.assert_allclose([b[0], b[-1]], [4e-4, 0.08], rtol=1e-12)


def test_cosine_schedule() -> None:
    n = 1000
    f = lambda s: np.cos((s + 0.008) / 1.008 * np.pi / 2) ** 2  # noqa: E731
    i = np.arange(n)
    want = np.minimum(1 - f((i + 1) / n) / f(i / n), 0.999)
    got = get_named_beta_schedule("squaredcos_cap_v2", n)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert got[-1] == 0.999 and got[0] < 1e-4


@pytest.mark.parametrize("name,n", [("quadratic", 1000), ("linear", 0), ("linear", 2.5)])
def test_bad_schedule_raises(name: str, n: float) -> None:
    with pytest.raises(QditError):
        get_named_beta_schedule(name, n)


@pytest.mark.parametrize("schedule", ["linear", "squaredcos_cap_v2"])
def test_tables_match_float64_formulas(schedule: str) -> None:
    d = make_diffusion(schedule=schedule)
    betas = get_named_beta_schedule(schedule, 1000)
    # Like the official SpacedDiffusion, even the full process rebuilds betas from acp ratios.
    np.testing.assert_allclose(d.betas, betas, rtol=1e-11)
    np.testing.assert_array_equal(d.timestep_map, np.arange(1000))
    for name, want in _ref_tables(betas).items():
        got = getattr(d, name)
        assert got.dtype == np.float64, name
        np.testing.assert_allclose(got, want, rtol=1e-9, err_msg=name)


def test_from_betas_rejects_bad_betas() -> None:
    with pytest.raises(QditError):
        GaussianDiffusion.from_betas(np.array([0.1, 0.0, 0.2]))
    with pytest.raises(QditError):
        GaussianDiffusion.from_betas(np.zeros((2, 2)) + 0.1)
    with pytest.raises(QditError):
        GaussianDiffusion.from_betas(np.array([0.1, 0.2]), var_type="learned")


def test_q_sample_and_xstart_from_eps() -> None:
    d = make_diffusion()
    ref = _ref_tables(d.betas)
    rng = np.random.default_rng(0)
    x0, noise = rng.standard_normal((2, 4, 3, 3, 2))
    t = np.array([0, 1, 500, 999])
    acp = ref["alphas_cumprod"][t][:, None, None, None]
    want = np.sqrt(acp) * x0 + np.sqrt(1 - acp) * noise
    got = d.q_sample(jnp.asarray(x0, jnp.float32), jnp.asarray(t), jnp.asarray(noise, jnp.float32))
    np.testing.assert_allclose(np.asarray(got), want, rtol=RTOL, atol=ATOL)
    # eps -> x0 inverts q_sample; x0 -> eps inverts it back.
    x0_hat = np.asarray(d.predict_xstart_from_eps(got, jnp.asarray(t), jnp.asarray(noise, jnp.float32)))
    np.testing.assert_allclose(x0_hat, x0, atol=5e-3)
    want_x0 = np.sqrt(1 / acp) * np.asarray(got, np.float64) - np.sqrt(1 / acp - 1) * noise
    np.testing.assert_allclose(x0_hat, want_x0, rtol=RTOL, atol=1e-4)
    eps_hat = d.predict_eps_from_xstart(got, jnp.asarray(t), jnp.asarray(x0_hat))
    np.testing.assert_allclose(np.asarray(eps_hat)[1:], noise[1:], atol=1e-3)
    with pytest.raises(QditError):
        d.q_sample(jnp.zeros((4, 3, 3, 2)), jnp.asarray(t), jnp.zeros((4, 3, 3, 1)))


@pytest.mark.parametrize("var_type", ["learned_range", "fixed_large", "fixed_small"])
@pytest.mark.parametrize("clip", [False, True])
def test_p_mean_variance_matches_numpy(var_type: str, clip: bool) -> None:
    d = make_diffusion(respacing="100", learn_sigma=var_type == "learned_range",
                       sigma_small=var_type == "fixed_small")
    ref = _ref_tables(d.betas)
    rng = np.random.default_rng(1)
    c = 3
    t = np.array([0, 1, 37, 99])
    x = rng.standard_normal((4, 2, 2, c))
    out = rng.standard_normal((4, 2, 2, 2 * c if var_type == "learned_range" else c))
    if var_type == "learned_range":
        out[..., c:] = np.tanh(out[..., c:])  # v in [-1, 1]
    b = lambda a: a[t][:, None, None, None]  # noqa: E731
    eps = out[..., :c]
    x0 = b(ref["sqrt_recip_alphas_cumprod"]) * x - b(ref["sqrt_recipm1_alphas_cumprod"]) * eps
    if clip:
        x0 = np.clip(x0, -1, 1)
    mean = b(ref["posterior_mean_coef1"]) * x0 + b(ref["posterior_mean_coef2"]) * x
    if var_type == "learned_range":
        frac = (out[..., c:] + 1) / 2
        log_var = frac * b(np.log(d.betas)) + (1 - frac) * b(ref["posterior_log_variance_clipped"])
    elif var_type == "fixed_large":
        large = np.concatenate([[ref["posterior_variance"][1]], d.betas[1:]])
        log_var = np.broadcast_to(b(np.log(large)), x.shape)
    else:
        log_var = np.broadcast_to(b(ref["posterior_log_variance_clipped"]), x.shape)
    got = d.p_mean_variance(jnp.asarray(out, jnp.float32), jnp.asarray(x, jnp.float32), jnp.asarray(t),
                            clip_denoised=clip)
    np.testing.assert_allclose(np.asarray(got.pred_xstart), x0, rtol=RTOL, atol=1e-4)
    np.testing.assert_allclose(np.asarray(got.mean), mean, rtol=RTOL, atol=1e-4)
    np.testing.assert_allclose(np.asarray(got.log_variance), log_var, rtol=RTOL, atol=ATOL)
    # The official fixed_small variance is the unclipped posterior variance (0 at t = 0).
    var = np.broadcast_to(b(ref["posterior_variance"]), x.shape) if var_type == "fixed_small" else np.exp(log_var)
    np.testing.assert_allclose(np.asarray(got.variance), var, rtol=1e-4, atol=1e-9)
    if clip:
        assert float(jnp.max(jnp.abs(got.pred_xstart))) <= 1.0


def test_model_output_channels_are_checked() -> None:
    x = jnp.zeros((2, 2, 2, 3))
    t = jnp.array([1, 2])
    with pytest.raises(QditError, match="learn_sigma"):
        make_diffusion(respacing="10").p_mean_variance(jnp.zeros((2, 2, 2, 3)), x, t)
    with pytest.raises(QditError, match="learn_sigma"):
        make_diffusion(respacing="10", learn_sigma=False).p_mean_variance(jnp.zeros((2, 2, 2, 6)), x, t)


def test_single_step_process_is_finite() -> None:
    # A one-step process has no t = 1 to clip the posterior log-variance with.
    d = make_diffusion(respacing="1")
    assert d.num_timesteps == 1 and d.timestep_map.tolist() == [0]
    assert np.all(np.isfinite(d.posterior_log_variance_clipped))
    assert math.isclose(d.alphas_cumprod[0], 1 - 1e-4)
