"""PSNR, SSIM and latent MSE vs float64 NumPy/SciPy (SSIM as scikit-image's Gaussian variant)."""
from __future__ import annotations

import numpy as np
import pytest

from qdit_jax.errors import QditError
from qdit_jax.metrics import latent_mse, psnr, ssim

ndimage = pytest.importorskip("scipy.ndimage")


def _ssim_ref(x: np.ndarray, y: np.ndarray, data_range: float) -> float:
    """One HxW channel: scipy Gaussian filter (sigma 1.5, truncate 3.5 -> 11 taps), crop 5, mean."""
    f = lambda z: ndimage.gaussian_filter(z, sigma=1.5, truncate=3.5)  # noqa: E731
    ux, uy = f(x), f(y)
    vx, vy, vxy = f(x * x) - ux * ux, f(y * y) - uy * uy, f(x * y) - ux * uy
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux ** 2 + uy ** 2 + c1) * (vx + vy + c2))
    return float(s[5:-5, 5:-5].mean())


@pytest.fixture(scope="module")
def pair():
    rng = np.random.default_rng(0)
    a = rng.random((3, 32, 24, 3))
    b = np.clip(a + rng.normal(scale=[[[[0.02]]], [[[0.1]]], [[[0.3]]]], size=a.shape), 0, 1)
    return a.astype(np.float32), b.astype(np.float32)


def test_ssim_matches_reference(pair):
    a, b = pair
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    ref = np.array([np.mean([_ssim_ref(a64[i, ..., c], b64[i, ..., c], 1.0) for c in range(3)])
                    for i in range(3)])
    assert ref[0] > ref[1] > ref[2]
    np.testing.assert_allclose(ssim(a, b, 1.0, reduction="none"), ref, atol=1e-5)
    assert ssim(a, b) == pytest.approx(ref.mean(), abs=1e-5)
    u8a, u8b = (a * 255).round().astype(np.uint8), (b * 255).round().astype(np.uint8)
    ref_u8 = np.mean([_ssim_ref(u8a[0, ..., c].astype(float), u8b[0, ..., c].astype(float), 255.0)
                      for c in range(3)])
    assert ssim(u8a[:1], u8b[:1], 255.0) == pytest.approx(ref_u8, abs=1e-5)


def test_psnr_and_mse_match_numpy(pair):
    a, b = pair
    mse = ((a.astype(np.float64) - b) ** 2).mean(axis=(1, 2, 3))
    np.testing.assert_allclose(latent_mse(a, b, reduction="none"), mse, rtol=1e-5)
    np.testing.assert_allclose(psnr(a, b, 1.0, reduction="none"), 10 * np.log10(1.0 / mse), rtol=1e-5)
    np.testing.assert_allclose(psnr(2 * a - 1, 2 * b - 1, 2.0, reduction="none"), 10 * np.log10(1.0 / mse),
                               rtol=1e-4)


def test_identical_images(pair):
    a = pair[0]
    assert np.isinf(psnr(a, a, 1.0))
    assert ssim(a, a) == pytest.approx(1.0, abs=1e-6)
    assert latent_mse(a, a) == 0.0
    assert ssim(a[..., 0], a[..., 0]) == pytest.approx(1.0, abs=1e-6)  # NHW


def test_errors(pair):
    a, b = pair
    with pytest.raises(QditError, match="differ in shape"):
        psnr(a, b[:2], 1.0)
    with pytest.raises(QditError, match="data_range"):
        psnr(a, b, 0.0)
    with pytest.raises(QditError, match="at least 11x11"):
        ssim(a[:, :8, :8], b[:, :8, :8])
    with pytest.raises(QditError, match="dtype"):
        latent_mse(a.astype(np.int32), b.astype(np.int32))
    with pytest.raises(QditError, match="reduction"):
        latent_mse(a, b, reduction="sum")
