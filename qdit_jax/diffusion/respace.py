"""Timestep respacing, with the semantics of the official ``space_timesteps`` / ``SpacedDiffusion``.

A respaced process keeps a subset of the original timesteps. Its betas are rebuilt from the
cumulative alphas of consecutive kept steps (``beta_i = 1 - acp[k_i] / acp[k_{i-1}]``), so its
``alphas_cumprod`` equal the original ones at the kept steps, and the model is still
conditioned on the original timesteps (``GaussianDiffusion.timestep_map``).
"""
from __future__ import annotations

import re
from typing import Sequence

import numpy as np

from qdit_jax.diffusion.schedule import GaussianDiffusion, get_named_beta_schedule
from qdit_jax.errors import QditError

SAMPLERS = ("ddim", "ddpm")
_INT = re.compile(r"^\s*\d+\s*$")


def _parse_count(text: str, spec: str) -> int:
    if not _INT.match(text):
        raise QditError(f"bad timestep respacing {spec!r}: {text.strip()!r} is not a non-negative integer; "
                        "use e.g. '250', '10,20,30' or 'ddim50'")
    return int(text)


def _ddim_counts(num_timesteps: int) -> list[int]:
    """Step counts reachable with an integer stride (the DDIM-paper striding)."""
    return sorted({len(range(0, num_timesteps, i)) for i in range(1, num_timesteps)})


def space_timesteps(num_timesteps: int, section_counts: str | Sequence[int]) -> list[int]:
    """Sorted original timesteps kept by a respacing, as the official ``space_timesteps``.

    ``section_counts`` is either ``"ddimN"`` (the smallest integer stride giving exactly N steps
    from ``range(0, num_timesteps, stride)``) or comma-separated counts (a string or a sequence):
    the process is cut into that many near-equal sections and each is strided, with rounding,
    to its count, always keeping a section's first and last step.
    """
    if int(num_timesteps) != num_timesteps or num_timesteps < 1:
        raise QditError(f"num_timesteps must be a positive integer, got {num_timesteps!r}")
    total = int(num_timesteps)
    spec = section_counts
    if isinstance(section_counts, str):
        text = section_counts.strip()
        if text.startswith("ddim"):
            want = _parse_count(text[len("ddim"):], spec)
            # The official search tries strides 1 .. num_timesteps - 1 and takes the first fit.
            for stride in range(1, total):
                if len(range(0, total, stride)) == want:
                    return list(range(0, total, stride))
            reachable = _ddim_counts(total)
            below = [c for c in reachable if c < want][-1:]
            above = [c for c in reachable if c > want][:1]
            raise QditError(f"cannot make exactly {want} DDIM steps from {total} with an integer stride; "
                            f"use a reachable count such as {below + above} or a plain count like '{want}'")
        counts = [_parse_count(part, spec) for part in text.split(",")]
    else:
        try:
            counts = [int(c) for c in section_counts]
        except (TypeError, ValueError):
            raise QditError(f"bad timestep respacing {spec!r}: expected a string or a sequence of integers") from None
        if any(c < 0 for c in counts):
            raise QditError(f"bad timestep respacing {spec!r}: section counts must be non-negative")
    if not counts or sum(counts) < 1:
        raise QditError(f"bad timestep respacing {spec!r}: it keeps no steps; ask for at least one step")
    size_per, extra = divmod(total, len(counts))
    start = 0
    steps: list[int] = []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise QditError(f"bad timestep respacing {spec!r}: cannot take {count} steps from a section of "
                            f"{size} (of {total} timesteps in {len(counts)} sections); ask for fewer steps")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        pos = 0.0
        for _ in range(count):
            steps.append(start + round(pos))  # Python's round, as the official code
            pos += stride
        start += size
    return sorted(set(steps))


def respace_betas(betas: np.ndarray, use_timesteps: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(new betas, timestep_map) of the process keeping ``use_timesteps``, as ``SpacedDiffusion``."""
    acp = np.cumprod(1.0 - np.asarray(betas, dtype=np.float64))
    keep = set(int(t) for t in use_timesteps)
    if not keep or min(keep) < 0 or max(keep) >= acp.shape[0]:
        raise QditError(f"timesteps to keep must be a non-empty subset of 0..{acp.shape[0] - 1}")
    tmap = np.array(sorted(keep), dtype=np.int64)
    kept = acp[tmap]
    new_betas = 1.0 - kept / np.append(1.0, kept[:-1])
    return new_betas, tmap


def make_diffusion(num_timesteps: int = 1000, schedule: str = "linear",
                   respacing: str | Sequence[int] | None = "", learn_sigma: bool = True,
                   sigma_small: bool = False) -> GaussianDiffusion:
    """The process the official ``create_diffusion(respacing, schedule, ...)`` builds.

    ``respacing`` ``''`` or ``None`` keeps every step. ``learn_sigma`` selects the learned-range
    variance (model output ``2C`` channels); otherwise the fixed large (or, with
    ``sigma_small``, small) variance.
    """
    betas = get_named_beta_schedule(schedule, num_timesteps)
    if respacing is None or (isinstance(respacing, str) and respacing.strip() == ""):
        respacing = [int(num_timesteps)]
    new_betas, tmap = respace_betas(betas, space_timesteps(num_timesteps, respacing))
    var_type = "learned_range" if learn_sigma else ("fixed_small" if sigma_small else "fixed_large")
    return GaussianDiffusion.from_betas(new_betas, timestep_map=tmap, var_type=var_type,
                                        original_num_steps=int(num_timesteps))


def steps_from_arg(sampler: str, steps: int, num_timesteps: int = 1000) -> str:
    """Respacing string for CLI flags ``--sampler`` / ``--steps``: ``'ddim50'`` or ``'50'``.

    Checks that the request can be built, so a bad flag fails before any model is loaded.
    """
    if sampler not in SAMPLERS:
        raise QditError(f"unknown sampler {sampler!r}; use one of {list(SAMPLERS)}")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 1 <= steps <= num_timesteps:
        raise QditError(f"--steps must be an integer in 1..{num_timesteps}, got {steps!r}")
    spec = f"ddim{int(steps)}" if sampler == "ddim" else str(int(steps))
    space_timesteps(num_timesteps, spec)  # raises a QditError naming reachable counts
    return spec
