"""Fashion-MNIST: an IDX reader, the dataset loader, and the map to and from the DiT's pixel space.

The trained Fashion-MNIST DiT works on 32x32x1 images in [-1, 1]: each 28x28 uint8 image is scaled
by ``x / 127.5 - 1`` and padded by 2 pixels of -1 (black) on every side. ``to_model_space`` and
``from_model_space`` are exact inverses on uint8 images.

The IDX files come from the Debian package ``dataset-fashion-mnist`` (``/usr/share/datasets/
fashion-mnist``); ``$QDIT_FMNIST_DIR`` overrides that location.
"""
from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np

from qdit_jax.errors import QditError

CLASS_NAMES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
NUM_CLASSES = len(CLASS_NAMES)
IMAGE_SIZE = 28
PAD = 2
MODEL_SIZE = IMAGE_SIZE + 2 * PAD  # 32
ENV_VAR = "QDIT_FMNIST_DIR"
DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
_INSTALL_HINT = (f"install it with `apt-get install dataset-fashion-mnist` or set {ENV_VAR} to a folder "
                 "holding train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz "
                 "and t10k-labels-idx1-ubyte.gz")

# IDX type codes -> big-endian NumPy dtypes.
_IDX_DTYPES: dict[int, str] = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped when it starts with the gzip magic."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise QditError(f"cannot read IDX file {path}: {e.strerror or e}; check the path") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise QditError(f"corrupt or truncated gzip IDX file {path} ({e}); re-download or reinstall it") from None
    return raw


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Reads an IDX file (plain or gzip): checks the magic number, the dims and the data length."""
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise QditError(f"truncated IDX file {path}: {len(data)} bytes, no header; re-download or reinstall it")
    zero, code, ndim = int.from_bytes(data[:2], "big"), data[2], data[3]
    if zero != 0 or code not in _IDX_DTYPES or ndim == 0:
        raise QditError(f"not an IDX file {path}: bad magic number 0x{data[:4].hex()}; give a *-idx?-ubyte(.gz) file")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise QditError(f"truncated IDX file {path}: header needs {header} bytes, file has {len(data)}; re-download it")
    dims = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        kind = "truncated" if len(data) < expected else "oversized"
        raise QditError(f"{kind} IDX file {path}: dims {dims} need {expected} bytes, file has {len(data)}; "
                        "re-download or reinstall it")
    arr = np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def _find(directory: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (directory / name).is_file():
            return directory / name
    return None


def dataset_dir(data_dir: str | os.PathLike[str] | None = None, split: str | None = None) -> Path:
    """The folder holding the IDX files (of ``split``, or of both splits): ``data_dir``, else
    ``$QDIT_FMNIST_DIR``, else the Debian path."""
    if data_dir is not None:
        candidates = [Path(data_dir)]
    else:
        env = os.environ.get(ENV_VAR)
        candidates = ([Path(env)] if env else []) + [DEFAULT_DIR]
    pairs = [_FILES[split]] if split in _FILES else list(_FILES.values())
    stems = [stem for pair in pairs for stem in pair]
    for d in candidates:
        if all(_find(d, stem) for stem in stems):
            return d
    # name the files missing from the first folder tried (a folder holding only the test split is not
    # "no Fashion-MNIST")
    missing = ", ".join(stem + ".gz" for stem in stems if not _find(candidates[0], stem))
    tried = ", ".join(str(d) for d in candidates)
    what = f"Fashion-MNIST {split} split" if split in _FILES else "Fashion-MNIST"
    raise QditError(f"{what} not found (looked in {tried}; {candidates[0]} lacks {missing}); {_INSTALL_HINT}")


def load_fashion_mnist(split: str = "train",
                       data_dir: str | os.PathLike[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Returns ``(images uint8 (N, 28, 28), labels uint8 (N,))`` of the 'train' (60k) or 'test' (10k) split."""
    if split not in _FILES:
        raise QditError(f"unknown Fashion-MNIST split {split!r}; use 'train' or 'test'")
    d = dataset_dir(data_dir, split)
    img_path, lab_path = (_find(d, stem) for stem in _FILES[split])
    images, labels = read_idx(img_path), read_idx(lab_path)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise QditError(f"{img_path} holds {images.dtype} {images.shape}, expected uint8 (N, 28, 28); reinstall it")
    if labels.dtype != np.uint8 or labels.shape != (images.shape[0],):
        raise QditError(f"{lab_path} holds {labels.dtype} {labels.shape}, expected uint8 ({images.shape[0]},); "
                        "reinstall it")
    if labels.size and int(labels.max()) >= NUM_CLASSES:
        raise QditError(f"{lab_path} has label {int(labels.max())} >= {NUM_CLASSES}; reinstall it")
    return images, labels


def to_model_space(images: np.ndarray) -> np.ndarray:
    """uint8 (N, 28, 28[, 1]) -> float32 (N, 32, 32, 1) in [-1, 1], padded by 2 pixels of -1."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise QditError(f"to_model_space expects uint8 images, got {images.dtype}; convert with from_model_space")
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if images.ndim != 3 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise QditError(f"to_model_space expects (N, 28, 28) or (N, 28, 28, 1) images, got {images.shape}")
    x = images.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
    x = np.pad(x, ((0, 0), (PAD, PAD), (PAD, PAD)), constant_values=-1.0)
    return x[..., None]


def from_model_space(x: np.ndarray) -> np.ndarray:
    """float (N, 32, 32[, 1]) in [-1, 1] -> uint8 (N, 28, 28): clip, crop the 2-pixel border, round (NaN -> 0)."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 4 and x.shape[-1] == 1:
        x = x[..., 0]
    if x.ndim != 3 or x.shape[1:] != (MODEL_SIZE, MODEL_SIZE):
        raise QditError(f"from_model_space expects (N, 32, 32) or (N, 32, 32, 1) arrays, got {x.shape}")
    # NaN (a diverged sampler) becomes black rather than an undefined cast.
    x = np.clip(np.nan_to_num(x[:, PAD:-PAD, PAD:-PAD], nan=-1.0), -1.0, 1.0)
    return np.rint((x + 1.0) * 127.5).astype(np.uint8)
