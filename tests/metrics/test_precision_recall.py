"""Improved precision/recall vs a float64 brute-force NumPy/SciPy implementation."""
from __future__ import annotations

import numpy as np
import pytest

from qdit_jax.errors import QditError
from qdit_jax.metrics import manifold_radii, precision_recall

distance = pytest.importorskip("scipy.spatial.distance")


def _ref(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[np.ndarray, np.ndarray, float, float]:
    r64, f64 = real.astype(np.float64), fake.astype(np.float64)
    rr = np.sort(distance.cdist(r64, r64, "sqeuclidean"), axis=1)[:, k]
    ff = np.sort(distance.cdist(f64, f64, "sqeuclidean"), axis=1)[:, k]
    d = distance.cdist(r64, f64, "sqeuclidean")
    precision = np.mean(np.any(d <= rr[:, None], axis=0))
    recall = np.mean(np.any(d <= ff[None, :], axis=1))
    return rr, ff, float(precision), float(recall)


@pytest.fixture(scope="module")
def sets():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(300, 32)).astype(np.float32)
    fake = (rng.normal(size=(250, 32)) + 0.15).astype(np.float32)
    return real, fake


def test_matches_bruteforce(sets):
    real, fake = sets
    rr, ff, p_ref, r_ref = _ref(real, fake)
    assert 0.05 < p_ref < 0.95 and 0.05 < r_ref < 0.95  # a non-trivial case
    np.testing.assert_allclose(manifold_radii(real, batch_size=64), rr, rtol=1e-5)
    np.testing.assert_allclose(manifold_radii(fake, batch_size=1000), ff, rtol=1e-5)
    for bs in (64, 1000):  # padded blocks and one block
        p, r = precision_recall(real, fake, batch_size=bs)
        assert p == pytest.approx(p_ref, abs=1e-12) and r == pytest.approx(r_ref, abs=1e-12)


def test_same_set_is_perfect(sets):
    assert precision_recall(sets[0], sets[0], batch_size=128) == (1.0, 1.0)


def test_errors(sets):
    with pytest.raises(QditError, match="feature dims differ"):
        precision_recall(sets[0], sets[1][:, :16])
    with pytest.raises(QditError, match="more than k"):
        manifold_radii(sets[0][:3], k=3)
    with pytest.raises(QditError, match="NaN"):
        precision_recall(np.full((5, 2), np.nan), sets[1][:, :2])
