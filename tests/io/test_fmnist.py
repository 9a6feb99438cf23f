"""IDX reader against files written here, the real dataset (when installed), and the model-space map."""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from qdit_jax.errors import QditError
from qdit_jax.io import fmnist


def _idx_bytes(arr: np.ndarray) -> bytes:
    """An IDX file written independently of the reader: magic (0, 0, type, ndim), big-endian dims, data."""
    codes = {np.dtype("u1"): 0x08, np.dtype(">i4"): 0x0C, np.dtype(">f4"): 0x0D}
    be = arr.astype(arr.dtype.newbyteorder(">"))
    header = struct.pack(">BBBB", 0, 0, codes[be.dtype], arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + be.tobytes()


def _write_dataset(folder: Path, n_train: int = 6, n_test: int = 4, gz: bool = True) -> dict[str, tuple]:
    rng = np.random.default_rng(0)
    out = {}
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, (n,), dtype=np.uint8)
        for stem, arr in ((f"{prefix}-images-idx3-ubyte", images), (f"{prefix}-labels-idx1-ubyte", labels)):
            data = _idx_bytes(arr)
            if gz:
                (folder / (stem + ".gz")).write_bytes(gzip.compress(data))
            else:
                (folder / stem).write_bytes(data)
        out[split] = (images, labels)
    return out


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("arr", [
    np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5),
    np.array([-7, 0, 1 << 20, 3], dtype=np.int32),
    np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4),
])
def test_read_idx_round_trip(tmp_path: Path, arr: np.ndarray, gz: bool) -> None:
    data = _idx_bytes(arr)
    path = tmp_path / ("a.idx.gz" if gz else "a.idx")
    path.write_bytes(gzip.compress(data) if gz else data)
    got = fmnist.read_idx(path)
    assert got.shape == arr.shape and got.dtype == arr.dtype.newbyteorder("=")
    np.testing.assert_array_equal(got, arr)


@pytest.mark.parametrize("mangle", ["truncate_data", "truncate_header", "extra_byte", "bad_magic", "truncate_gzip"])
def test_read_idx_rejects_damaged_files(tmp_path: Path, mangle: str) -> None:
    data = _idx_bytes(np.ones((4, 28, 28), np.uint8))
    path = tmp_path / f"{mangle}-idx3-ubyte"
    if mangle == "truncate_data":
        data = data[:-10]
    elif mangle == "truncate_header":
        data = data[:9]
    elif mangle == "extra_byte":
        data = data + b"\0"
    elif mangle == "bad_magic":
        data = b"\x01\x02" + data[2:]
    elif mangle == "truncate_gzip":
        data = gzip.compress(data)[:40]
    path.write_bytes(data)
    with pytest.raises(QditError) as err:
        fmnist.read_idx(path)
    msg = str(err.value)
    assert str(path) in msg and "\n" not in msg


def test_read_idx_missing_file(tmp_path: Path) -> None:
    with pytest.raises(QditError, match="cannot read"):
        fmnist.read_idx(tmp_path / "nope.gz")


@pytest.mark.parametrize("gz", [False, True])
def test_load_from_data_dir_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, gz: bool) -> None:
    want = _write_dataset(tmp_path, gz=gz)
    for split in ("train", "test"):
        images, labels = fmnist.load_fashion_mnist(split, data_dir=tmp_path)
        np.testing.assert_array_equal(images, want[split][0])
        np.testing.assert_array_equal(labels, want[split][1])
    monkeypatch.setenv(fmnist.ENV_VAR, str(tmp_path))
    np.testing.assert_array_equal(fmnist.load_fashion_mnist("test")[0], want["test"][0])


def test_load_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(QditError, match="apt-get install dataset-fashion-mnist"):
        fmnist.load_fashion_mnist("train", data_dir=tmp_path)
    monkeypatch.setenv(fmnist.ENV_VAR, str(tmp_path))
    monkeypatch.setattr(fmnist, "DEFAULT_DIR", tmp_path / "absent")
    with pytest.raises(QditError, match=fmnist.ENV_VAR):
        fmnist.load_fashion_mnist("test")
    _write_dataset(tmp_path)
    with pytest.raises(QditError, match="unknown Fashion-MNIST split"):
        fmnist.load_fashion_mnist("val", data_dir=tmp_path)
    # a folder with the test split only: the train split's error names the split and its missing files
    only_test = tmp_path / "only_test"
    only_test.mkdir()
    for stem in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (only_test / stem).write_bytes((tmp_path / stem).read_bytes())
    assert fmnist.load_fashion_mnist("test", data_dir=only_test)[0].shape[1:] == (28, 28)
    with pytest.raises(QditError, match="train split not found.*lacks train-images-idx3-ubyte.gz, "
                                        "train-labels-idx1-ubyte.gz"):
        fmnist.load_fashion_mnist("train", data_dir=only_test)
    # Labels out of range are caught at load time.
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(np.full(4, 10, np.uint8))))
    with pytest.raises(QditError, match="label 10"):
        fmnist.load_fashion_mnist("test", data_dir=tmp_path)


def _real_test_split() -> tuple[np.ndarray, np.ndarray]:
    try:
        return fmnist.load_fashion_mnist("test")
    except QditError as e:
        pytest.skip(f"Fashion-MNIST not installed ({e})")


def test_real_test_split() -> None:
    images, labels = _real_test_split()
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,) and labels.dtype == np.uint8
    np.testing.assert_array_equal(np.bincount(labels, minlength=10), np.full(10, 1000))
    assert images.min() == 0 and images.max() == 255
    assert len(fmnist.CLASS_NAMES) == 10


def test_model_space_round_trip_real() -> None:
    images, _ = _real_test_split()
    x = fmnist.to_model_space(images[:500])
    assert x.shape == (500, 32, 32, 1) and x.dtype == np.float32
    np.testing.assert_array_equal(fmnist.from_model_space(x), images[:500])


def test_model_space_map() -> None:
    every = np.arange(256, dtype=np.uint8)
    images = np.stack([np.resize(np.roll(every, k), (28, 28)) for k in range(4)])
    x = fmnist.to_model_space(images)
    # Independent float64 reference of the scaling; the border is -1.
    np.testing.assert_allclose(x[:, 2:30, 2:30, 0], images.astype(np.float64) / 127.5 - 1.0, atol=1e-6)
    border = np.ones((32, 32), bool)
    border[2:30, 2:30] = False
    assert np.all(x[:, border, 0] == -1.0)
    np.testing.assert_array_equal(fmnist.from_model_space(x), images)
    np.testing.assert_array_equal(fmnist.from_model_space(x[..., 0]), images)  # no channel axis
    np.testing.assert_array_equal(fmnist.to_model_space(images[..., None]), x)


def test_from_model_space_clips_and_rounds() -> None:
    x = np.full((1, 32, 32, 1), -1.0, np.float32)
    x[0, 2, 2, 0] = 3.0          # above range -> 255
    x[0, 2, 3, 0] = -5.0         # below range -> 0
    x[0, 2, 4, 0] = 0.0          # 127.5 -> rounds half to even: 128
    x[0, 2, 5, 0] = 1.0 / 127.5 * 10.4 - 1.0  # 10.4 -> 10
    x[0, 2, 6, 0] = np.nan       # diverged sample -> black
    x[0, 0, 0, 0] = 1.0          # border pixel is cropped away
    out = fmnist.from_model_space(x)
    assert out.shape == (1, 28, 28) and out.dtype == np.uint8
    assert list(out[0, 0, :5]) == [255, 0, 128, 10, 0]


@pytest.mark.parametrize("bad", [
    lambda: fmnist.to_model_space(np.zeros((2, 28, 28), np.float32)),
    lambda: fmnist.to_model_space(np.zeros((2, 32, 32), np.uint8)),
    lambda: fmnist.from_model_space(np.zeros((2, 28, 28), np.float32)),
    lambda: fmnist.from_model_space(np.zeros((2, 32, 32, 3), np.float32)),
])
def test_model_space_bad_input(bad) -> None:
    with pytest.raises(QditError):
        bad()
