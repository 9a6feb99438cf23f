"""Fréchet distance and feature statistics vs SciPy's sqrtm and NumPy's cov (float64)."""
from __future__ import annotations

import numpy as np
import pytest

from qdit_jax.errors import QditError
from qdit_jax.metrics import StatsAccumulator, feature_statistics, frechet_distance

linalg = pytest.importorskip("scipy.linalg")


def _scipy_fid(mu1, s1, mu2, s2) -> float:
    covmean = linalg.sqrtm(s1 @ s2)
    covmean = np.real(covmean)
    d = mu1 - mu2
    return float(d @ d + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def _features(seed: int, n: int, d: int, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) / np.sqrt(d)
    return (rng.normal(size=(n, d)) @ mix + shift).astype(np.float32)


def test_statistics_match_numpy():
    x = _features(0, 500, 32, shift=100.0)  # large offset: checks the shifted accumulation
    mu, sigma = feature_statistics(x, batch_size=77)
    np.testing.assert_allclose(mu, x.astype(np.float64).mean(0), rtol=1e-12, atol=1e-10)
    np.testing.assert_allclose(sigma, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("d", [8, 64])
def test_fid_matches_scipy(d):
    a, b = _features(1, 400, d), _features(2, 300, d, shift=0.3)
    mu1, s1 = feature_statistics(a)
    mu2, s2 = feature_statistics(b)
    ref = _scipy_fid(mu1, s1, mu2, s2)
    assert ref > 0.1
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-7)
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(ref, rel=1e-7)


def test_fid_with_itself_is_zero():
    mu, sigma = feature_statistics(_features(3, 3000, 256))
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6


def test_fid_singular_covariances_stay_finite():
    """Fewer samples than dims (rank-deficient covariances): finite, non-negative, matches SciPy."""
    with pytest.warns(UserWarning, match="singular"):
        mu1, s1 = feature_statistics(_features(4, 20, 64))
    with pytest.warns(UserWarning, match="singular"):
        mu2, s2 = feature_statistics(_features(5, 20, 64, shift=0.5))
    fd = frechet_distance(mu1, s1, mu2, s2)
    assert np.isfinite(fd) and fd > 0
    assert fd == pytest.approx(_scipy_fid(mu1, s1, mu2, s2), rel=1e-4)


def test_fid_of_known_gaussians():
    """Closed form for diagonal covariances: sum (sqrt(a) - sqrt(b))^2 + |mu1 - mu2|^2."""
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.0])
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    expect = np.sum((np.sqrt(a) - np.sqrt(b)) ** 2) + 5.0
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expect, rel=1e-10)


def test_errors():
    with pytest.raises(QditError, match="at least 2 samples"):
        feature_statistics(np.zeros((1, 4)))
    with pytest.raises(QditError, match="2-D"):
        feature_statistics(np.zeros(4))
    with pytest.raises(QditError, match="NaN"):
        feature_statistics(np.full((3, 2), np.nan))
    with pytest.raises(QditError, match="feature dims differ"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(QditError, match="sigma must be"):
        frechet_distance(np.zeros(3), np.eye(4), np.zeros(3), np.eye(3))
    with pytest.raises(QditError, match="NaN or inf"):
        frechet_distance(np.zeros(2), np.array([[np.nan, 0], [0, 1]]), np.zeros(2), np.eye(2))
    acc = StatsAccumulator()
    acc.update(np.zeros((3, 4)))
    with pytest.raises(QditError, match="feature dim changed"):
        acc.update(np.zeros((3, 5)))
