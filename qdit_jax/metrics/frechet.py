"""Fréchet distance (FID, sFID) between Gaussian fits of feature sets, as the ADM evaluator defines it.

``FD = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^{1/2})``. The trace of the matrix square
root is computed stably in float64 from eigen-decompositions of symmetric matrices:
``tr((S1 S2)^{1/2}) = sum sqrt(eig(S1^{1/2} S2 S1^{1/2}))`` (the two products are similar, so
their eigenvalues agree), which never produces complex numbers for PSD inputs and needs no SciPy.

Covariances use ``np.cov`` conventions (ddof=1), accumulated in float64 over batches. With fewer
samples than feature dimensions the covariance is singular: we warn (the ADM evaluator does not
refuse this either) and FID stays finite; fewer than 2 samples is an error.
"""
from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from qdit_jax.errors import QditError


def _as_features(features: Any, name: str = "features") -> np.ndarray:
    x = np.asarray(features)
    if x.ndim != 2:
        raise QditError(f"{name} must be a 2-D (num_samples, dim) array, got shape {x.shape}: "
                        "flatten each sample's features")
    if not np.issubdtype(x.dtype, np.number):
        raise QditError(f"{name} must be numeric, got dtype {x.dtype}")
    return x


class StatsAccumulator:
    """Streaming mean and covariance (float64, shifted by the first batch's mean for accuracy)."""

    def __init__(self) -> None:
        self.n = 0
        self._shift: np.ndarray | None = None
        self._sum: np.ndarray | None = None
        self._outer: np.ndarray | None = None

    def update(self, features: Any) -> None:
        x = _as_features(features).astype(np.float64)
        if x.shape[0] == 0:
            return
        if not np.isfinite(x).all():
            raise QditError("features contain NaN or inf: check the images fed to the feature network")
        if self._shift is None:
            self._shift = x.mean(axis=0)
            self._sum = np.zeros(x.shape[1])
            self._outer = np.zeros((x.shape[1], x.shape[1]))
        elif x.shape[1] != self._shift.shape[0]:
            raise QditError(f"feature dim changed from {self._shift.shape[0]} to {x.shape[1]} between batches")
        d = x - self._shift
        self._sum += d.sum(axis=0)
        self._outer += d.T @ d
        self.n += x.shape[0]

    def finalize(self) -> tuple[np.ndarray, np.ndarray]:
        """Return ``(mu, sigma)`` in float64 (``sigma`` as ``np.cov(rowvar=False)``)."""
        if self.n < 2:
            raise QditError(f"need at least 2 samples for a covariance, got {self.n}: generate more samples")
        dim = self._shift.shape[0]
        if self.n <= dim:
            warnings.warn(f"{self.n} samples for {dim}-dim features: the covariance is singular and "
                          "FID is biased; use more samples than feature dimensions", stacklevel=3)
        mean_d = self._sum / self.n
        sigma = (self._outer - self.n * np.outer(mean_d, mean_d)) / (self.n - 1)
        return self._shift + mean_d, (sigma + sigma.T) / 2


def feature_statistics(features: Any, batch_size: int = 10000) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (float64) of (N, D) features, accumulated ``batch_size`` rows at a time."""
    x = _as_features(features)
    acc = StatsAccumulator()
    for start in range(0, x.shape[0], max(int(batch_size), 1)):
        acc.update(x[start:start + batch_size])
    return acc.finalize()


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(sigma)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def _trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """``tr((sigma1 @ sigma2)^{1/2})`` for symmetric PSD inputs."""
    s1 = _psd_sqrt(sigma1)
    m = s1 @ sigma2 @ s1
    w = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(np.clip(w, 0.0, None)).sum())


def _check_stats(mu: Any, sigma: Any, name: str) -> tuple[np.ndarray, np.ndarray]:
    mu = np.atleast_1d(np.asarray(mu, dtype=np.float64))
    sigma = np.atleast_2d(np.asarray(sigma, dtype=np.float64))
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise QditError(f"{name} statistics have mu {mu.shape} and sigma {sigma.shape}: "
                        "sigma must be (D, D) for a mean of length D")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise QditError(f"{name} statistics contain NaN or inf: recompute them from finite features")
    return mu, sigma


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any, eps: float = 1e-6) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

    Non-finite intermediate results are retried with ``eps`` added to both diagonals (the usual
    offset for near-singular covariances); if that still fails a QditError is raised, never NaN.
    """
    mu1, sigma1 = _check_stats(mu1, sigma1, "first")
    mu2, sigma2 = _check_stats(mu2, sigma2, "second")
    if mu1.shape != mu2.shape:
        raise QditError(f"feature dims differ: {mu1.shape[0]} vs {mu2.shape[0]}: "
                        "compare statistics of the same feature layer")
    sigma1, sigma2 = (sigma1 + sigma1.T) / 2, (sigma2 + sigma2.T) / 2
    diff = mu1 - mu2
    try:
        tr_covmean = _trace_sqrt_product(sigma1, sigma2)
    except np.linalg.LinAlgError:
        tr_covmean = float("nan")
    if not np.isfinite(tr_covmean):
        warnings.warn(f"singular covariance product; adding {eps} to the diagonals", stacklevel=2)
        offset = np.eye(sigma1.shape[0]) * eps
        tr_covmean = _trace_sqrt_product(sigma1 + offset, sigma2 + offset)
    fd = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)
    if not np.isfinite(fd):
        raise QditError("Fréchet distance is not finite: the feature statistics are degenerate; "
                        "check the features (constant or overflowing) and the sample count")
    return fd
