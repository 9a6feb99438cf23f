"""Fidelity of a quantized model to the full-precision one on the same noise: PSNR, SSIM, latent MSE.

SSIM follows Wang et al. 2004 as scikit-image computes it with ``gaussian_weights=True``: an
11x11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, population (not sample) covariances,
the SSIM map averaged over the valid interior (5 pixels cropped on each side), per image and
channel, then channels averaged. Images are NHWC (or NHW); every function returns per-sample
values with ``reduction="none"`` and their mean otherwise.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qdit_jax.errors import QditError

WIN = 11
SIGMA = 1.5
K1, K2 = 0.01, 0.03


def _pair(a: Any, b: Any, what: str) -> tuple[jax.Array, jax.Array]:
    a, b = jnp.asarray(a), jnp.asarray(b)
    if a.shape != b.shape:
        raise QditError(f"{what} inputs differ in shape: {a.shape} vs {b.shape}: compare matching samples")
    if a.ndim < 2 or a.shape[0] == 0:
        raise QditError(f"{what} needs a non-empty batch (N, ...), got shape {a.shape}")
    for x in (a, b):
        if not (jnp.issubdtype(x.dtype, jnp.floating) or x.dtype == jnp.uint8):
            raise QditError(f"{what} needs float or uint8 arrays, got dtype {x.dtype}")
    return a.astype(jnp.float32), b.astype(jnp.float32)


def _reduce(per_sample: jax.Array, reduction: str) -> Any:
    if reduction == "none":
        return np.asarray(per_sample)
    if reduction == "mean":
        return float(jnp.mean(per_sample))
    raise QditError(f"reduction must be 'mean' or 'none', got {reduction!r}")


def _check_range(data_range: float) -> float:
    if not data_range > 0:
        raise QditError(f"data_range must be positive (1.0 for [0, 1], 2.0 for [-1, 1], 255 for uint8), "
                        f"got {data_range}")
    return float(data_range)


def latent_mse(a: Any, b: Any, reduction: str = "mean") -> Any:
    """Mean squared error per sample (e.g. final latents of the quantized vs FP sampler)."""
    a, b = _pair(a, b, "latent_mse")
    return _reduce(jnp.mean((a - b) ** 2, axis=tuple(range(1, a.ndim))), reduction)


def psnr(a: Any, b: Any, data_range: float, reduction: str = "mean") -> Any:
    """Peak signal-to-noise ratio in dB per image; identical images give ``inf``."""
    data_range = _check_range(data_range)
    a, b = _pair(a, b, "psnr")
    mse = jnp.mean((a - b) ** 2, axis=tuple(range(1, a.ndim)))
    return _reduce(10.0 * jnp.log10(data_range ** 2 / mse), reduction)


def gaussian_window(size: int = WIN, sigma: float = SIGMA) -> np.ndarray:
    """Normalised 1-D Gaussian taps."""
    r = np.arange(size, dtype=np.float64) - (size - 1) / 2
    w = np.exp(-0.5 * (r / sigma) ** 2)
    return w / w.sum()


@functools.partial(jax.jit, static_argnames="data_range")
def _ssim_per_image(a: jax.Array, b: jax.Array, data_range: float) -> jax.Array:
    n, h, w, c = a.shape
    g = jnp.asarray(gaussian_window(), jnp.float32)

    def blur(x):  # valid separable filtering of (N, H, W, C)
        x = jnp.moveaxis(x, -1, 1).reshape(n * c, 1, h, w)
        hp = jax.lax.Precision.HIGHEST
        x = jax.lax.conv_general_dilated(x, g.reshape(1, 1, WIN, 1), (1, 1), "VALID", precision=hp)
        x = jax.lax.conv_general_dilated(x, g.reshape(1, 1, 1, WIN), (1, 1), "VALID", precision=hp)
        return x.reshape(n, c, h - WIN + 1, w - WIN + 1)

    ux, uy = blur(a), blur(b)
    vx, vy, vxy = blur(a * a) - ux * ux, blur(b * b) - uy * uy, blur(a * b) - ux * uy
    c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return jnp.mean(s, axis=(1, 2, 3))


def ssim(a: Any, b: Any, data_range: float = 1.0, reduction: str = "mean") -> Any:
    """Structural similarity per image (NHWC or NHW), channels averaged; 1 for identical images."""
    data_range = _check_range(data_range)
    a, b = _pair(a, b, "ssim")
    if a.ndim == 3:
        a, b = a[..., None], b[..., None]
    if a.ndim != 4:
        raise QditError(f"ssim needs NHWC or NHW images, got shape {a.shape}")
    if min(a.shape[1], a.shape[2]) < WIN:
        raise QditError(f"ssim needs images of at least {WIN}x{WIN} pixels, got {a.shape[1]}x{a.shape[2]}")
    return _reduce(_ssim_per_image(a, b, data_range), reduction)
