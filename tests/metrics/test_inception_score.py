"""Inception Score vs a float64 SciPy implementation (softmax + entropy)."""
from __future__ import annotations

import numpy as np
import pytest

from qdit_jax.errors import QditError
from qdit_jax.metrics import inception_score

special = pytest.importorskip("scipy.special")
stats = pytest.importorskip("scipy.stats")


def _scipy_is(probs: np.ndarray, parts: list[np.ndarray]) -> tuple[float, float]:
    scores = []
    for idx in parts:
        p = probs[idx]
        marginal = p.mean(axis=0)
        scores.append(np.exp(np.mean([stats.entropy(row, marginal) for row in p])))
    return float(np.mean(scores)), float(np.std(scores))


@pytest.fixture(scope="module")
def logits():
    return np.random.default_rng(0).normal(scale=3.0, size=(1003, 50))


def test_ten_splits(logits):
    probs = special.softmax(logits, axis=1)
    n = len(logits)  # improved-GAN cuts at i * n // splits
    parts = [np.arange(i * n // 10, (i + 1) * n // 10) for i in range(10)]
    ref = _scipy_is(probs, parts)
    got = inception_score(logits, splits=10)
    assert got.mean == pytest.approx(ref[0], rel=1e-10) and got.std == pytest.approx(ref[1], rel=1e-8)
    got_p = inception_score(probs, splits=10, from_logits=False)
    assert got_p.mean == pytest.approx(ref[0], rel=1e-10)


def test_adm_split_size(logits):
    probs = special.softmax(logits, axis=1)
    parts = [np.arange(s, min(s + 400, len(logits))) for s in range(0, len(logits), 400)]
    assert inception_score(logits, split_size=400).mean == pytest.approx(_scipy_is(probs, parts)[0], rel=1e-10)


def test_bounds():
    """Confident and diverse predictions give IS = number of classes; identical ones give 1."""
    onehot = np.eye(20)[np.arange(200) % 20] * 50.0
    assert inception_score(onehot, splits=1).mean == pytest.approx(20.0, rel=1e-6)
    same = np.tile(np.random.default_rng(1).normal(size=(1, 20)), (200, 1))
    assert inception_score(same, splits=2).mean == pytest.approx(1.0, abs=1e-12)


def test_errors():
    with pytest.raises(QditError, match="num_classes"):
        inception_score(np.zeros(10))
    with pytest.raises(QditError, match="splits"):
        inception_score(np.zeros((5, 3)), splits=10)
    with pytest.raises(QditError, match="sum to 1"):
        inception_score(np.ones((5, 3)), from_logits=False)
    with pytest.raises(QditError, match="NaN"):
        inception_score(np.full((5, 3), np.nan))
