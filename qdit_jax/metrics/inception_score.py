"""Inception Score: ``exp(E_x KL(p(y|x) || p(y)))``, averaged over splits (improved-GAN / ADM).

The ADM evaluator feeds the softmax of the *unbiased* 1008-way logits (``pool @ W``, the
``logits_unbiased`` output of ``InceptionV3``) and uses splits of 5000 samples
(``split_size=5000``); the improved-GAN convention is ``splits=10`` equal parts.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from qdit_jax.errors import QditError


class ISResult(NamedTuple):
    mean: float
    std: float


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def inception_score(x: Any, splits: int | None = 10, split_size: int | None = None,
                    from_logits: bool = True) -> ISResult:
    """IS of (N, C) logits (or probabilities with ``from_logits=False``), float64.

    ``splits`` cuts the samples into that many near-equal consecutive parts; ``split_size`` (which
    then takes precedence) into consecutive parts of that many samples, the last one shorter.
    """
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2 or a.shape[1] < 2:
        raise QditError(f"inception_score needs (num_samples, num_classes) scores, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise QditError("inception_score input contains NaN or inf: check the classifier outputs")
    n = a.shape[0]
    if from_logits:
        logp = _log_softmax(a)
    else:
        if a.min() < 0 or np.abs(a.sum(axis=1) - 1.0).max() > 1e-3:
            raise QditError("probabilities must be non-negative and sum to 1 per row: "
                            "pass logits with from_logits=True")
        with np.errstate(divide="ignore"):
            logp = np.log(a / a.sum(axis=1, keepdims=True))
    if split_size is not None:
        if split_size < 1:
            raise QditError(f"split_size must be positive, got {split_size}")
        bounds = [(s, min(s + split_size, n)) for s in range(0, n, split_size)]
    else:
        if splits is None or splits < 1 or splits > n:
            raise QditError(f"splits must be in [1, {n}] for {n} samples, got {splits}")
        bounds = [(i * n // splits, (i + 1) * n // splits) for i in range(splits)]
    scores = []
    for lo, hi in bounds:
        lp = logp[lo:hi]
        p = np.exp(lp)
        log_marginal = np.log(p.mean(axis=0))
        terms = np.where(p > 0, p * (lp - log_marginal), 0.0)
        scores.append(np.exp(terms.sum(axis=1).mean()))
    return ISResult(float(np.mean(scores)), float(np.std(scores)))
