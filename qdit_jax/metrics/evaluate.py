"""Evaluate generated samples as the paper does: FID, sFID, IS, precision, recall (+ fidelity to FP).

``evaluate_samples(images, reference)`` is the library function behind ``qdit eval``. Two feature
networks:

- ``features="inception"``: the FID Inception-v3 (``qdit_jax.models.inception``) with the
  weights ``pt_inception-2015-12-05-6726825d.pth``. FID on pool features, sFID on the spatial
  ``mixed_6/conv`` features, IS on ``logits_unbiased`` (ADM convention), precision/recall (k=3) on
  pool features. Preprocessing defaults to ``"tf1"`` when the reference carries ADM's precomputed
  statistics (they came from the TF graph) and ``"pytorch_fid"`` otherwise.
- ``features="fmnist"``: the shipped Fashion-MNIST classifier: FID in its 128-d embedding, the IS
  analogue from its 10 logits, precision/recall in its embedding, and its accuracy on the samples'
  conditioning labels. ``reference="fmnist-test"`` is the test split (embeddings cached on disk).

A reference is an ``.npz`` path (ADM reference batch or a stats cache), ``"fmnist-test"``, a
uint8 image array, a mapping (``images`` and/or ``mu``/``sigma``...), or a :class:`Reference`
from :func:`prepare_reference` (compute it once when evaluating many sample sets against it).
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from qdit_jax.errors import QditError
from qdit_jax.metrics.fidelity import psnr, ssim
from qdit_jax.metrics.frechet import feature_statistics, frechet_distance
from qdit_jax.metrics.inception_score import inception_score
from qdit_jax.metrics.precision_recall import precision_recall

METRICS = ("fid", "sfid", "is", "prec", "recall")
FEATURES = ("inception", "fmnist")
DEFAULT_METRICS = {"inception": METRICS, "fmnist": ("fid", "is", "prec", "recall")}
FMNIST_TEST = "fmnist-test"
PR_K = 3
IS_SPLIT_SIZE = 5000  # ADM: consecutive splits of 5000 samples when there are that many
IS_SPLITS = 10  # improved-GAN: 10 equal splits for smaller sets
INCEPTION_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                 "pt_inception-2015-12-05-6726825d.pth")
_STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")


@dataclasses.dataclass
class Reference:
    """Reference statistics (``mu``, ``sigma``, and ``mu_s``/``sigma_s`` for sFID) and, when
    images were available, the reference features (``pool``, ``spatial``) themselves."""

    stats: dict[str, np.ndarray]
    features: dict[str, np.ndarray]
    feature_net: str
    preprocess: str | None
    source: str


# ----------------------------------------------------------------------------- input checks
def check_samples(images: Any, what: str = "samples") -> np.ndarray:
    """Samples must be uint8 images in 0..255 (integer arrays in range are accepted and cast)."""
    x = np.asarray(images)
    if x.ndim not in (3, 4) or x.shape[0] == 0:
        raise QditError(f"{what} must be a non-empty (N, H, W[, C]) image array, got shape {x.shape}")
    if np.issubdtype(x.dtype, np.floating):
        raise QditError(f"{what} must be uint8 images in 0..255, got {x.dtype}: convert model-space [-1, 1] "
                        "floats with qdit_jax.io.images.to_uint8")
    if not np.issubdtype(x.dtype, np.integer):
        raise QditError(f"{what} must be uint8 images in 0..255, got dtype {x.dtype}")
    if x.dtype != np.uint8:
        lo, hi = int(x.min()), int(x.max())
        if lo < 0 or hi > 255:
            raise QditError(f"{what} have values in [{lo}, {hi}], outside 0..255: save uint8 images")
        x = x.astype(np.uint8)
    return x


def check_metrics(metrics: Sequence[str] | str | None, features: str) -> tuple[str, ...]:
    if features not in FEATURES:
        raise QditError(f"unknown feature network {features!r}: use one of {FEATURES}")
    if metrics is None:
        return DEFAULT_METRICS[features]
    if isinstance(metrics, str):
        metrics = [m.strip() for m in metrics.split(",") if m.strip()]
    metrics = tuple(dict.fromkeys(metrics))
    bad = [m for m in metrics if m not in METRICS]
    if bad or not metrics:
        raise QditError(f"unknown metrics {bad or metrics}: choose from {','.join(METRICS)}")
    if features == "fmnist" and "sfid" in metrics:
        raise QditError("sfid needs Inception's spatial features: drop it from the metrics with --features fmnist")
    return metrics


def default_preprocess(reference: Any) -> str:
    """'tf1' for a reference with ADM's precomputed statistics (TF graph), else 'pytorch_fid'.

    A stats cache written by :func:`save_reference_stats` records its own preprocessing.
    """
    if isinstance(reference, Reference):
        return reference.preprocess or "pytorch_fid"
    if isinstance(reference, (str, os.PathLike)) and os.path.isfile(reference):
        try:
            with np.load(reference, allow_pickle=False) as f:
                if "preprocess" in f.files:
                    return str(f["preprocess"])
                return "tf1" if "mu" in f.files else "pytorch_fid"
        except (OSError, ValueError):
            return "pytorch_fid"  # load_reference reports the unreadable file
    if isinstance(reference, Mapping):
        if "preprocess" in reference:
            return str(np.asarray(reference["preprocess"]))
        return "tf1" if "mu" in reference else "pytorch_fid"
    return "pytorch_fid"


# ----------------------------------------------------------------------------- feature networks
def load_inception(path: str | os.PathLike | None) -> Any:
    """Flax params of the FID Inception from ``pt_inception-2015-12-05-6726825d.pth``."""
    if path is None:
        raise QditError(f"Inception weights are needed: download {INCEPTION_URL} and pass --inception PATH "
                        "(inception_params=... in Python)")
    from qdit_jax.convert.inception import load_inception_params

    if not os.path.isfile(path):
        raise QditError(f"Inception weights file not found: {path}: download {INCEPTION_URL} and pass --inception PATH")
    return load_inception_params(path)


def _inception_outputs(metrics: Sequence[str], for_reference: bool) -> tuple[str, ...]:
    out = []
    if {"fid", "prec", "recall"} & set(metrics):
        out.append("pool")
    if "sfid" in metrics:
        out.append("spatial")
    if "is" in metrics and not for_reference:
        out.append("logits_unbiased")
    return tuple(out) or ("pool",)


def _inception_features(params: Any, images: np.ndarray, outputs: tuple[str, ...], preprocess: str,
                        batch_size: int, mesh: Any = None) -> dict[str, np.ndarray]:
    from qdit_jax.models.inception import extract_features

    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise QditError(f"Inception needs (N, H, W, 3) RGB images, got shape {images.shape}")
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    return extract_features(params, images, batch_size=batch_size, preprocess=preprocess, outputs=outputs, mesh=mesh)


def _fmnist_features(images: np.ndarray, params: Any, batch_size: int) -> dict[str, np.ndarray]:
    from qdit_jax.models import fmnist_classifier as fc

    if images.ndim == 4 and images.shape[-1] == 3:
        raise QditError(f"--features fmnist needs greyscale (N, 28|32, 28|32[, 1]) images, got {images.shape}")
    feats, logits = fc.embed(images, params, batch_size=batch_size)
    return {"pool": feats, "logits": logits}


def _cache_dir() -> Path:
    return Path(os.environ.get("QDIT_CACHE_DIR", Path.home() / ".cache" / "qdit_jax"))


def fmnist_test_features(batch_size: int = 1000) -> dict[str, np.ndarray]:
    """Classifier embeddings of the Fashion-MNIST test split, cached on disk per weights file."""
    from qdit_jax.io.fmnist import load_fashion_mnist
    from qdit_jax.models import fmnist_classifier as fc

    weights = fc.default_path()
    digest = hashlib.sha1(weights.read_bytes()).hexdigest()[:12] if weights.is_file() else "none"
    cache = _cache_dir() / f"fmnist_test_features_{digest}.npz"
    if cache.is_file():
        try:
            with np.load(cache, allow_pickle=False) as f:
                return {"pool": f["pool"], "labels": f["labels"]}
        except (OSError, ValueError, KeyError):
            pass  # a broken cache is recomputed
    images, labels = load_fashion_mnist("test")
    feats = _fmnist_features(images, None, batch_size)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp.npz")
        np.savez(tmp, pool=feats["pool"], labels=labels)
        os.replace(tmp, cache)
    except OSError:
        warnings.warn(f"cannot write the Fashion-MNIST feature cache {cache}", stacklevel=2)
    return {"pool": feats["pool"], "labels": labels}


# ----------------------------------------------------------------------------- reference
def _reference_arrays(reference: Any, need_images: bool) -> tuple[dict[str, np.ndarray], str]:
    from qdit_jax.io.reference import load_reference

    if isinstance(reference, (str, os.PathLike)):
        return load_reference(reference, need_images=need_images), os.fspath(reference)
    if isinstance(reference, Mapping):
        data = {k: np.asarray(v) for k, v in reference.items() if k in _STAT_KEYS + ("images",)}
        if "images" not in data and "mu" not in data:
            raise QditError(f"reference mapping has keys {sorted(reference)}: it needs 'images' or 'mu'/'sigma'")
        if need_images and "images" not in data:
            raise QditError("precision/recall need reference images: pass a reference with 'images'")
        return data, "mapping"
    return {"images": np.asarray(reference)}, "array"


def _fmnist_reference_arrays(reference: Any) -> tuple[dict[str, np.ndarray], str]:
    """Greyscale reference images for the fmnist features: an .npz with 'arr_0', a mapping or an array."""
    if not isinstance(reference, (str, os.PathLike)):
        return _reference_arrays(reference, need_images=True)
    path = os.fspath(reference)
    if not os.path.isfile(path):
        raise QditError(f"reference file not found: {path}: pass an .npz with 'arr_0' images or fmnist-test")
    try:
        with np.load(path, allow_pickle=False) as f:
            if "arr_0" not in f.files:
                raise QditError(f"{path} has no images 'arr_0' (found {sorted(f.files)}): save the reference "
                                "images as np.savez(path, arr_0=images)")
            return {"images": f["arr_0"]}, path
    except (OSError, ValueError) as e:
        if isinstance(e, QditError):
            raise
        raise QditError(f"cannot read {path} as .npz ({type(e).__name__}): pass an .npz with 'arr_0' images") from None


def prepare_reference(reference: Any, *, features: str = "inception", metrics: Sequence[str] | str | None = None,
                      inception_params: Any = None, preprocess: str | None = None, batch_size: int = 200,
                      fmnist_params: Any = None, mesh: Any = None) -> Reference:
    """Load a reference and compute whatever features/statistics ``metrics`` need, once
    (Inception features batch-sharded over ``mesh`` when given)."""
    if isinstance(reference, Reference):
        return reference
    metrics = check_metrics(metrics, features)
    if features == "fmnist":
        if isinstance(reference, str) and reference == FMNIST_TEST:
            if fmnist_params is not None:
                raise QditError("the cached fmnist-test reference uses the shipped classifier: drop fmnist_params")
            feats = {"pool": fmnist_test_features()["pool"]}
            source = FMNIST_TEST
        else:
            arrays, source = _fmnist_reference_arrays(reference)
            feats = {"pool": _fmnist_features(check_samples(arrays["images"], "reference images"),
                                              fmnist_params, batch_size)["pool"]}
        mu, sigma = feature_statistics(feats["pool"])
        return Reference({"mu": mu, "sigma": sigma}, feats, "fmnist", None, source)

    if isinstance(reference, str) and reference == FMNIST_TEST:
        raise QditError("the fmnist-test reference needs --features fmnist")
    preprocess = preprocess or default_preprocess(reference)
    need_images = bool({"prec", "recall"} & set(metrics))
    arrays, source = _reference_arrays(reference, need_images)
    stats = {k: arrays[k] for k in _STAT_KEYS if k in arrays}
    want = _inception_outputs(metrics, for_reference=True)
    missing_stats = ("fid" in metrics and "mu" not in stats) or ("sfid" in metrics and "mu_s" not in stats)
    feats: dict[str, np.ndarray] = {}
    if "images" in arrays and (need_images or missing_stats):
        if inception_params is None:
            raise QditError(f"Inception weights are needed: download {INCEPTION_URL} and pass --inception PATH")
        images = check_samples(arrays["images"], "reference images")
        feats = _inception_features(inception_params, images, want, preprocess, batch_size, mesh)
    if "sfid" in metrics and "mu_s" not in stats and "spatial" not in feats:
        raise QditError(f"reference {source} has no spatial statistics 'mu_s'/'sigma_s' and no images: "
                        "drop sfid from the metrics or pass an ADM reference batch")
    return Reference(stats, feats, "inception", preprocess, source)


def save_reference_stats(path: str | os.PathLike, ref: Reference) -> None:
    """Write a reference's statistics (and its preprocessing) as a stats cache for later ``--ref``."""
    from qdit_jax.io.reference import save_stats

    stats = dict(ref.stats)
    for key, (m, s) in (("pool", ("mu", "sigma")), ("spatial", ("mu_s", "sigma_s"))):
        if m not in stats and key in ref.features:
            stats[m], stats[s] = feature_statistics(ref.features[key])
    if ref.preprocess:
        stats["preprocess"] = np.asarray(ref.preprocess)
    save_stats(path, stats)


# ----------------------------------------------------------------------------- metrics
def frechet_from_features(a: np.ndarray, b: np.ndarray) -> float:
    """FID between two feature sets; exact low-rank form when the sets are smaller than the dimension.

    With centred features A (n1, D), B (n2, D): ``tr((S1 S2)^{1/2}) = ||A B^T||_* / sqrt((n1-1)(n2-1))``
    (nuclear norm), so no D x D matrix is formed; otherwise the usual covariances are compared.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    n1, n2, d = a.shape[0], b.shape[0], a.shape[1]
    if min(n1, n2) < 2:
        raise QditError(f"FID needs at least 2 samples for a covariance, got {min(n1, n2)}: generate more samples")
    if max(n1, n2) > d:
        return frechet_distance(*feature_statistics(a), *feature_statistics(b))
    warnings.warn(f"{min(n1, n2)} samples for {d}-dim features: the covariance is singular and FID is biased; "
                  "use more samples than feature dimensions", stacklevel=2)
    ca, cb = a - a.mean(0), b - b.mean(0)
    diff = a.mean(0) - b.mean(0)
    tr1 = float(np.sum(ca * ca)) / (n1 - 1)
    tr2 = float(np.sum(cb * cb)) / (n2 - 1)
    nuclear = float(np.linalg.svd(ca @ cb.T, compute_uv=False).sum())
    return float(diff @ diff + tr1 + tr2 - 2.0 * nuclear / np.sqrt((n1 - 1) * (n2 - 1)))


def _fid(sample_feats: np.ndarray, ref: Reference, kind: str, mesh: Any = None) -> float:
    mu_key, sigma_key = ("mu", "sigma") if kind == "pool" else ("mu_s", "sigma_s")
    if mesh is not None and sample_feats.shape[0] > sample_feats.shape[1]:
        # the sums of the statistics computed on the devices (all-reduce), accumulated in float64
        from qdit_jax.parallel.stats import feature_statistics_sharded

        stats = feature_statistics_sharded(sample_feats, mesh)
        if kind in ref.features:
            return frechet_distance(*stats, *feature_statistics_sharded(ref.features[kind], mesh))
        return frechet_distance(*stats, ref.stats[mu_key], ref.stats[sigma_key])
    if kind in ref.features:
        return frechet_from_features(sample_feats, ref.features[kind])
    return frechet_distance(*feature_statistics(sample_feats), ref.stats[mu_key], ref.stats[sigma_key])


def inception_score_adm(logits: np.ndarray) -> tuple[float, float]:
    """IS with ADM's convention: splits of 5000 when there are >= 5000 samples, else 10 equal splits."""
    n = logits.shape[0]
    if n >= IS_SPLIT_SIZE:
        r = inception_score(logits, split_size=IS_SPLIT_SIZE)
    else:
        r = inception_score(logits, splits=min(IS_SPLITS, n))
    return r.mean, r.std


def evaluate_samples(samples_uint8: Any, reference: Any, *, metrics: Sequence[str] | str | None = None,
                     features: str = "inception", inception_params: Any = None, preprocess: str | None = None,
                     batch_size: int = 200, labels: Any = None, fmnist_params: Any = None,
                     mesh: Any = None) -> dict[str, Any]:
    """Metrics of uint8 samples against a reference; returns a JSON-ready dict.

    ``mesh``: Inception features batch-sharded over its devices and the FID statistics' sums
    all-reduced on them (same numbers up to float summation order).

    Keys: ``fid``, ``sfid``, ``is``/``is_std``, ``precision``, ``recall`` (those asked for),
    ``accuracy`` (fmnist with ``labels``), and ``num_samples``, ``features``, ``preprocess``,
    ``reference``. ``preprocess=None`` picks 'tf1' for ADM precomputed statistics, else 'pytorch_fid'.
    """
    metrics = check_metrics(metrics, features)
    images = check_samples(samples_uint8)
    n = images.shape[0]
    if n < 2 and ({"fid", "sfid"} & set(metrics)):
        raise QditError(f"FID needs at least 2 samples for a covariance, got {n}: generate more samples")
    if n <= PR_K and ({"prec", "recall"} & set(metrics)):
        raise QditError(f"precision/recall (k={PR_K}) need more than {PR_K} samples, got {n}: "
                        "generate more or drop prec,recall from the metrics")
    if batch_size <= 0:
        raise QditError(f"batch_size must be positive, got {batch_size}")
    if features == "inception" and inception_params is None:
        raise QditError(f"Inception weights are needed: download {INCEPTION_URL} and pass --inception PATH")
    ref = prepare_reference(reference, features=features, metrics=metrics, inception_params=inception_params,
                            preprocess=preprocess, batch_size=batch_size, fmnist_params=fmnist_params, mesh=mesh)
    if ref.feature_net != features:
        raise QditError(f"the reference was prepared with {ref.feature_net} features, not {features}")
    if features == "inception":
        preprocess = preprocess or ref.preprocess or "pytorch_fid"
        if ref.preprocess and preprocess != ref.preprocess and ref.features:
            raise QditError(f"reference features used preprocess {ref.preprocess!r}, samples {preprocess!r}: use one")
        feats = _inception_features(inception_params, images, _inception_outputs(metrics, False), preprocess,
                                    batch_size, mesh)
        is_logits = feats.get("logits_unbiased")
    else:
        preprocess = None
        feats = _fmnist_features(images, fmnist_params, batch_size)
        is_logits = feats["logits"]

    out: dict[str, Any] = {}
    if "fid" in metrics:
        out["fid"] = _fid(feats["pool"], ref, "pool", mesh)
    if "sfid" in metrics:
        out["sfid"] = _fid(feats["spatial"], ref, "spatial", mesh)
    if "is" in metrics:
        out["is"], out["is_std"] = inception_score_adm(is_logits)
    if {"prec", "recall"} & set(metrics):
        if "pool" not in ref.features:
            raise QditError(f"precision/recall need reference images, and {ref.source} has only statistics: "
                            "pass an ADM reference batch with images ('arr_0')")
        if ref.features["pool"].shape[0] <= PR_K:
            raise QditError(f"precision/recall (k={PR_K}) need more than {PR_K} reference images")
        prec, rec = precision_recall(ref.features["pool"], feats["pool"], k=PR_K)
        if "prec" in metrics:
            out["precision"] = prec
        if "recall" in metrics:
            out["recall"] = rec
    if features == "fmnist" and labels is not None:
        lab = np.asarray(labels)
        if lab.shape != (n,) or not np.issubdtype(lab.dtype, np.integer):
            raise QditError(f"labels must be {n} integers (one per sample), got {lab.dtype} {lab.shape}")
        out["accuracy"] = float(np.mean(np.argmax(is_logits, axis=-1) == lab))
    out.update(num_samples=int(n), features=features, preprocess=preprocess, reference=ref.source)
    return out


def fidelity_to_reference(samples: Any, fp_samples: Any) -> dict[str, float]:
    """Mean PSNR (dB) and SSIM of uint8 samples against the full-precision model's samples (same noise)."""
    a = check_samples(samples)
    b = check_samples(fp_samples, "full-precision samples")
    if a.shape != b.shape:
        raise QditError(f"samples {a.shape} and full-precision samples {b.shape} differ in shape: "
                        "sample both with the same noise, labels and count")
    per_image = psnr(a, b, data_range=255.0, reduction="none")
    return {"psnr": float(np.mean(per_image)), "ssim": float(ssim(a, b, data_range=255.0))}
