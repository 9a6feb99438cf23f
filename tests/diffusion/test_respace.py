"""Timestep respacing against a NumPy re-statement of the official algorithm and known values."""
from __future__ import annotations

import numpy as np
import pytest

from qdit_jax.diffusion import get_named_beta_schedule, make_diffusion, space_timesteps, steps_from_arg
from qdit_jax.errors import QditError


def _official_sections(total: int, counts: list[int]) -> list[int]:
    """The official section striding, vectorised: positions are running sums of the stride,
    rounded half-to-even (np.cumsum adds in the same order as the official Python loop)."""
    sizes = np.full(len(counts), total // len(counts)) + (np.arange(len(counts)) < total % len(counts))
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    out: list[int] = []
    for start, size, count in zip(starts, sizes, counts):
        if count == 0:
            continue
        stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        pos = np.concatenate([[0.0], np.cumsum(np.full(count - 1, stride))])
        out += (start + np.round(pos).astype(int)).tolist()
    return sorted(set(out))


@pytest.mark.parametrize("spec", ["50", "100", "250", "1000", "10,20,30", "7,1,0,5"])
def test_sections_match_official_algorithm(spec: str) -> None:
    got = space_timesteps(1000, spec)
    assert got == _official_sections(1000, [int(c) for c in spec.split(",")])
    assert len(got) == sum(int(c) for c in spec.split(","))
    assert space_timesteps(1000, [int(c) for c in spec.split(",")]) == got


def test_known_values() -> None:
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    assert space_timesteps(1000, "ddim250") == list(range(0, 1000, 4))
    # The official search takes the smallest stride giving the count: 143 for 7 steps.
    assert space_timesteps(1000, "ddim7") == list(range(0, 1000, 143))
    for n in (50, 100, 250):
        steps = space_timesteps(1000, str(n))
        assert len(steps) == n and steps[0] == 0 and steps[-1] == 999
        assert all(b > a for a, b in zip(steps, steps[1:]))
    assert space_timesteps(1000, "50")[:4] == [0, 20, 41, 61]  # 999 / 49 = 20.387...
    # Three sections of 334, 333, 333 steps.
    s = space_timesteps(1000, "2,2,3")
    assert s == [0, 333, 334, 666, 667, 833, 999]


def test_respaced_process_matches_spaced_diffusion() -> None:
    acp = np.cumprod(1 - get_named_beta_schedule("linear", 1000))
    for spec in ("ddim50", "250", "10,20,30"):
        d = make_diffusion(respacing=spec)
        kept = np.array(space_timesteps(1000, spec))
        np.testing.assert_array_equal(d.timestep_map, kept)
        prev = np.concatenate([[1.0], acp[kept[:-1]]])
        np.testing.assert_allclose(d.betas, 1 - acp[kept] / prev, rtol=1e-12)
        np.testing.assert_allclose(d.alphas_cumprod, acp[kept], rtol=1e-12)
        assert d.original_num_steps == 1000 and d.num_timesteps == len(kept)
    full = make_diffusion(respacing="")
    np.testing.assert_allclose(full.betas, get_named_beta_schedule("linear", 1000), rtol=1e-12)
    assert full.num_timesteps == 1000 and make_diffusion(respacing=None).num_timesteps == 1000


def test_matches_diffusers_leading_spacing() -> None:
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                                    beta_schedule="linear", timestep_spacing="leading", steps_offset=0)
    sched.set_timesteps(50)
    d = make_diffusion(respacing="ddim50")
    np.testing.assert_array_equal(d.timestep_map[::-1], sched.timesteps.numpy())
    np.testing.assert_allclose(d.alphas_cumprod, sched.alphas_cumprod.numpy()[d.timestep_map], rtol=1e-6)


@pytest.mark.parametrize("spec", ["ddim37", "ddim1", "ddim999", "ddim", "ddimx", "abc", "", "0", "0,0",
                                  "1001", "10,,20", "-5", "5.5", "400,400,400", "ddim50,10"])
def test_bad_respacing_raises(spec: str) -> None:
    with pytest.raises(QditError):
        space_timesteps(1000, spec)


def test_bad_sequences_raise() -> None:
    for bad in ([-1, 5], [], ["a"]):
        with pytest.raises(QditError):
            space_timesteps(1000, bad)
    with pytest.raises(QditError):
        make_diffusion(respacing="ddim37")
    with pytest.raises(QditError):
        make_diffusion(schedule="cosine")


def test_ddim_error_names_reachable_counts() -> None:
    with pytest.raises(QditError, match=r"\[36, 38\]"):
        space_timesteps(1000, "ddim37")


def test_steps_from_arg() -> None:
    assert steps_from_arg("ddim", 50) == "ddim50"
    assert steps_from_arg("ddpm", 250) == "250"
    assert steps_from_arg("ddpm", 1000) == "1000"
    assert steps_from_arg("ddim", 10, num_timesteps=100) == "ddim10"
    for sampler, steps in (("ddim", 0), ("ddpm", 1001), ("ddim", 37), ("euler", 50), ("ddim", "50"),
                           ("ddpm", 2.0), ("ddim", True)):
        with pytest.raises(QditError):
            steps_from_arg(sampler, steps)  # type: ignore[arg-type]
