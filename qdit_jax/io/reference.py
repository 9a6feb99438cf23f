"""Reference sets for FID/sFID/IS/precision/recall: ADM reference batches, stats caches, TFDS.

ADM reference batch ``.npz`` (e.g. ``VIRTUAL_imagenet256_labeled.npz``): ``arr_0`` holds the
images (N, H, W, 3) uint8, and precomputed statistics ``mu``/``sigma`` (pool features) and
``mu_s``/``sigma_s`` (spatial features) may sit beside them. A stats cache written by
``save_stats`` uses the same key names, so either file can be passed as ``--ref``.

Note: statistics in ADM's files were computed with the TF graph, so compare them with features
extracted with ``InceptionV3(preprocess="tf1")``.
"""
from __future__ import annotations

import os
import zipfile
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from qdit_jax.errors import QditError
from qdit_jax.metrics.frechet import StatsAccumulator

STAT_PAIRS = (("mu", "sigma"), ("mu_s", "sigma_s"))
FeatureFn = Callable[[np.ndarray], Any]


def load_reference(path: str | os.PathLike, need_images: bool = False) -> dict[str, np.ndarray]:
    """Read a reference ``.npz``: ``images`` (from ``arr_0``) and/or ``mu``, ``sigma``, ``mu_s``, ``sigma_s``.

    Images (all of them, in memory: ~2 GB for 10k 256x256) are loaded when ``need_images`` is set
    (precision and recall need reference features, not only statistics) or when the file has no
    statistics; ``need_images`` without ``arr_0`` is an error.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise QditError(f"reference file not found: {path}: pass an ADM reference batch or a stats .npz")
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise QditError(f"cannot read {path} as .npz ({type(e).__name__}): pass an ADM reference batch") from e
    if not hasattr(data, "files"):
        raise QditError(f"{path} is a single .npy array, not an .npz: save it with np.savez(path, arr_0=images)")
    keys = set(data.files)
    out: dict[str, np.ndarray] = {}
    for mu_key, sigma_key in STAT_PAIRS:
        if (mu_key in keys) != (sigma_key in keys):
            raise QditError(f"{path} has only one of {mu_key!r}/{sigma_key!r}: a statistics file needs both")
        if mu_key in keys:
            out[mu_key], out[sigma_key] = data[mu_key], data[sigma_key]
            d = out[mu_key].shape[0] if out[mu_key].ndim == 1 else -1
            if d < 0 or out[sigma_key].shape != (d, d):
                raise QditError(f"{path}: {mu_key} {out[mu_key].shape} and {sigma_key} "
                                f"{out[sigma_key].shape} are not a mean and its covariance")
    if "arr_0" in keys and (need_images or "mu" not in out):
        out["images"] = check_reference_images(data["arr_0"], path)
    if need_images and "images" not in out:
        raise QditError(f"{path} has no images (key 'arr_0'; found {sorted(keys)}): "
                        "precision/recall need an ADM reference batch with images")
    if "images" not in out and "mu" not in out:
        raise QditError(f"{path} has neither images 'arr_0' nor statistics 'mu'/'sigma' (found {sorted(keys)}): "
                        "pass an ADM reference batch or a stats file from save_stats")
    return out


def check_reference_images(images: np.ndarray, where: str = "reference") -> np.ndarray:
    """ADM reference images are (N, H, W, 3) uint8."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise QditError(f"{where}: images must be (N, H, W, 3) uint8, got {images.dtype} {images.shape}: "
                        "save them as np.savez(path, arr_0=images.astype(np.uint8))")
    return images


def compute_reference_stats(images_iter: Iterable[np.ndarray], feature_fn: FeatureFn,
                            keep_pool_features: bool = False) -> dict[str, np.ndarray]:
    """Statistics of ``feature_fn`` over batches of images.

    ``feature_fn(batch)`` returns either an (n, D) array (pool features) or a mapping with
    ``pool`` and optionally ``spatial`` (as ``extract_features`` does). Returns ``mu``, ``sigma``
    (+ ``mu_s``, ``sigma_s`` if spatial features came back, + ``pool_features`` if asked) and
    ``num_images``.
    """
    pool_acc, spatial_acc = StatsAccumulator(), StatsAccumulator()
    kept: list[np.ndarray] = []
    for batch in images_iter:
        feats = feature_fn(batch)
        if isinstance(feats, Mapping):
            if "pool" not in feats:
                raise QditError(f"feature_fn returned keys {sorted(feats)}: it must return 'pool' (and 'spatial')")
            pool, spatial = np.asarray(feats["pool"]), feats.get("spatial")
        else:
            pool, spatial = np.asarray(feats), None
        pool_acc.update(pool)
        if spatial is not None:
            spatial_acc.update(np.asarray(spatial))
        if keep_pool_features:
            kept.append(pool.astype(np.float32))
    if pool_acc.n == 0:
        raise QditError("no reference images were read: check the dataset path or split")
    mu, sigma = pool_acc.finalize()
    out = {"mu": mu, "sigma": sigma, "num_images": np.asarray(pool_acc.n)}
    if spatial_acc.n:
        out["mu_s"], out["sigma_s"] = spatial_acc.finalize()
    if keep_pool_features:
        out["pool_features"] = np.concatenate(kept, axis=0)
    return out


def save_stats(path: str | os.PathLike, stats: Mapping[str, np.ndarray]) -> None:
    """Write a stats cache (``mu``, ``sigma``, ...) atomically as ``.npz``."""
    path = os.fspath(path)
    if "mu" not in stats or "sigma" not in stats:
        raise QditError(f"stats to save need 'mu' and 'sigma', got {sorted(stats)}")
    if not path.endswith(".npz"):
        raise QditError(f"stats cache path must end in .npz, got {path}")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path[:-4] + ".tmp.npz"
    np.savez(tmp, **{k: np.asarray(v) for k, v in stats.items()})
    os.replace(tmp, path)


def load_stats(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a stats cache or an ADM batch that carries ``mu``/``sigma``."""
    out = load_reference(path)
    if "mu" not in out:
        raise QditError(f"{path} holds images but no statistics 'mu'/'sigma': compute them with "
                        "compute_reference_stats, or pass the file as a reference batch")
    return out


def center_crop_arr(pil_image: Any, image_size: int) -> np.ndarray:
    """ADM's ImageNet preparation: halve with BOX while the short side is >= 2x the target,
    BICUBIC-resize the short side to ``image_size``, then centre-crop a square (H, W, C) uint8."""
    from PIL import Image

    if image_size <= 0:
        raise QditError(f"image_size must be positive, got {image_size}")
    img = pil_image
    while min(img.size) >= 2 * image_size:
        img = img.resize((img.size[0] // 2, img.size[1] // 2), resample=Image.BOX)
    scale = image_size / min(img.size)
    img = img.resize(tuple(round(s * scale) for s in img.size), resample=Image.BICUBIC)
    arr = np.asarray(img)
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return arr[top:top + image_size, left:left + image_size]


def _batched(images: Iterable[np.ndarray], batch_size: int) -> Iterable[np.ndarray]:
    buf: list[np.ndarray] = []
    for img in images:
        buf.append(img)
        if len(buf) == batch_size:
            yield np.stack(buf)
            buf = []
    if buf:
        yield np.stack(buf)


def imagenet_reference_stats(feature_fn: FeatureFn, split: str = "validation", image_size: int = 256,
                             data_dir: str | None = None, batch_size: int = 200,
                             max_images: int | None = None, cache_path: str | None = None,
                             dataset: str = "imagenet2012") -> dict[str, np.ndarray]:
    """FID reference statistics of a TFDS image dataset, centre-cropped as ADM prepares ImageNet.

    Reads ``cache_path`` if it exists, else computes and writes it. Needs tensorflow-datasets
    (and the manually downloaded ImageNet archives in ``data_dir`` for ``imagenet2012``).
    """
    if cache_path and os.path.isfile(cache_path):
        return load_stats(cache_path)
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise QditError("reference statistics from TFDS need tensorflow-datasets: "
                        "pip install tensorflow-datasets (or pass a reference .npz)") from e
    from PIL import Image

    split_arg = split if max_images is None else f"{split}[:{int(max_images)}]"
    try:
        ds = tfds.load(dataset, split=split_arg, data_dir=data_dir, shuffle_files=False)
    except Exception as e:  # noqa: BLE001 - TFDS raises many types for a missing/unprepared dataset
        raise QditError(f"cannot load TFDS {dataset!r} split {split_arg!r} ({type(e).__name__}: {e}): "
                        "prepare it with tfds build (ImageNet needs its archives in data_dir)") from e

    def crops():
        for example in tfds.as_numpy(ds):
            img = Image.fromarray(example["image"]).convert("RGB")
            yield center_crop_arr(img, image_size)

    stats = compute_reference_stats(_batched(crops(), batch_size), feature_fn)
    if cache_path:
        save_stats(cache_path, stats)
    return stats
