"""Evaluation metrics: FID/sFID, Inception Score, improved precision/recall (as the ADM evaluator),
and fidelity to the full-precision model (PSNR, SSIM, latent MSE)."""
from qdit_jax.metrics.fidelity import latent_mse, psnr, ssim
from qdit_jax.metrics.frechet import StatsAccumulator, feature_statistics, frechet_distance
from qdit_jax.metrics.inception_score import ISResult, inception_score
from qdit_jax.metrics.precision_recall import manifold_radii, precision_recall

__all__ = [
    "ISResult", "StatsAccumulator", "feature_statistics", "frechet_distance", "inception_score",
    "latent_mse", "manifold_radii", "precision_recall", "psnr", "ssim",
]
