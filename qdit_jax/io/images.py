"""Images: model space [-1, 1] <-> uint8, grids as PNG, and the samples .npz format."""
from __future__ import annotations

import math
import os
from typing import Sequence

import numpy as np

from qdit_jax.errors import QditError


def to_uint8(x: np.ndarray) -> np.ndarray:
    """[-1, 1] float images -> uint8 in [0, 255] (clipped, rounded as the official sampler does)."""
    x = np.asarray(x, np.float32)
    return np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


def make_grid(images: np.ndarray, nrow: int | None = None, pad: int = 2, pad_value: int = 255) -> np.ndarray:
    """(N, H, W, C) uint8 -> one (H', W', C) uint8 grid with ``nrow`` images per row."""
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.dtype != np.uint8:
        raise QditError(f"make_grid wants uint8 images (N, H, W, C), got {images.dtype} {images.shape}")
    n, h, w, c = images.shape
    nrow = nrow or int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / nrow))
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), pad_value, np.uint8)
    for i in range(n):
        r, k = divmod(i, nrow)
        y0, x0 = pad + r * (h + pad), pad + k * (w + pad)
        grid[y0:y0 + h, x0:x0 + w] = images[i]
    return grid


def save_png(path: str, image: np.ndarray, upscale: int = 1) -> None:
    """Write one uint8 (H, W, C) image (C = 1 or 3) as PNG, optionally upscaled by pixel repetition."""
    from PIL import Image

    image = np.asarray(image)
    if upscale > 1:
        image = image.repeat(upscale, axis=0).repeat(upscale, axis=1)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(image).save(path)


def save_grid(path: str, images: np.ndarray, nrow: int | None = None, upscale: int = 1) -> None:
    save_png(path, make_grid(images, nrow), upscale)


def save_samples(path: str, images: np.ndarray, labels: np.ndarray | None = None, **extra: np.ndarray) -> None:
    """Samples as .npz: ``arr_0`` uint8 (N, H, W, C) as the ADM evaluator reads it, plus ``labels``."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise QditError(f"samples must be uint8 (N, H, W, C), got {images.dtype} {images.shape}")
    arrays = {"arr_0": images, **extra}
    if labels is not None:
        arrays["labels"] = np.asarray(labels, np.int32)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def load_samples(path: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Read a samples .npz written by ``save_samples`` (or an ADM-style ``arr_0`` batch)."""
    if not os.path.exists(path):
        raise QditError(f"samples file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as f:
            if "arr_0" not in f:
                raise QditError(f"{path} has no 'arr_0' image array (keys: {sorted(f.keys())})")
            images = f["arr_0"]
            labels = f["labels"] if "labels" in f else None
    except QditError:
        raise
    except Exception as e:  # zip / format errors from numpy
        raise QditError(f"{path} is not a readable .npz samples file ({type(e).__name__}: {e})") from None
    return images, labels


def side_by_side(rows: Sequence[np.ndarray]) -> np.ndarray:
    """Stack equally sized uint8 image batches as grid rows (e.g. FP over quantized, same noise)."""
    return np.concatenate([np.asarray(r) for r in rows], axis=0)
