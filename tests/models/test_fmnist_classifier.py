"""The shipped Fashion-MNIST classifier: a float64 NumPy reference forward, accuracy, features, loading."""
from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from qdit_jax.errors import QditError
from qdit_jax.io import fmnist
from qdit_jax.models import fmnist_classifier as fc


@pytest.fixture(scope="module")
def params():
    return fc.load_classifier()


@pytest.fixture(scope="module")
def test_split() -> tuple[np.ndarray, np.ndarray]:
    try:
        return fmnist.load_fashion_mnist("test")
    except QditError as e:
        pytest.skip(f"Fashion-MNIST not installed ({e})")


def _conv_same_np(x: np.ndarray, k: np.ndarray, b: np.ndarray, stride: int) -> np.ndarray:
    """float64 NHWC conv with TensorFlow-style SAME padding (extra pad at the bottom/right)."""
    n, h, w, _ = x.shape
    kh, kw, _, cout = k.shape
    oh, ow = -(-h // stride), -(-w // stride)
    ph, pw = max((oh - 1) * stride + kh - h, 0), max((ow - 1) * stride + kw - w, 0)
    xp = np.pad(x, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))
    out = np.zeros((n, oh, ow, cout))
    for dy in range(kh):
        for dx in range(kw):
            patch = xp[:, dy:dy + stride * (oh - 1) + 1:stride, dx:dx + stride * (ow - 1) + 1:stride, :]
            out += patch @ k[dy, dx]
    return out + b


def _reference_forward(p, images_uint8: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), p)
    x = images_uint8[..., None].astype(np.float64) / 127.5 - 1.0
    for i in range(3):
        x = np.maximum(_conv_same_np(x, p[f"conv{i}"]["kernel"], p[f"conv{i}"]["bias"], 2), 0.0)
    x = x.reshape(x.shape[0], -1)
    feats = np.maximum(x @ p["embed"]["kernel"] + p["embed"]["bias"], 0.0)
    return feats, feats @ p["head"]["kernel"] + p["head"]["bias"]


def test_matches_numpy_reference(params, test_split) -> None:
    images = test_split[0][:16]
    want_f, want_l = _reference_forward(params, images)
    got_f, got_l = fc.embed(images, params)
    np.testing.assert_allclose(got_f, want_f, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got_l, want_l, rtol=1e-4, atol=1e-4)


def test_shipped_accuracy(test_split) -> None:
    images, labels = test_split
    acc = float(np.mean(fc.classify(images[:2000]) == labels[:2000]))
    assert acc >= 0.90, f"shipped classifier accuracy {acc:.4f} < 0.90 on the first 2000 test images"


def test_features_dim_and_spread(params, test_split) -> None:
    images, labels = test_split
    feats, logits = fc.embed(images[:500], params, batch_size=128)  # exercises the padded tail batch
    assert feats.shape == (500, fc.FEATURE_DIM) and logits.shape == (500, fc.NUM_CLASSES)
    assert np.all(np.isfinite(feats)) and np.all(feats >= 0.0)  # post-ReLU
    live = feats.std(axis=0) > 1e-3
    assert live.sum() >= fc.FEATURE_DIM // 2, f"only {live.sum()} feature units vary over real images"
    # Features separate classes: each class mean is nearer its own samples than the global mean is.
    centroids = np.stack([feats[labels[:500] == c].mean(0) for c in range(10)])
    nearest = np.argmin(((feats[:, None, :] - centroids[None]) ** 2).sum(-1), axis=1)
    assert np.mean(nearest == labels[:500]) > 0.6


def test_input_layouts_agree(params, test_split) -> None:
    images = test_split[0][:8]
    want = np.asarray(fc.features(params, images))
    model_space = fmnist.to_model_space(images)  # 32x32x1 floats: cropped
    np.testing.assert_allclose(np.asarray(fc.features(params, model_space)), want, atol=1e-5)
    floats28 = images.astype(np.float32)[..., None] / 127.5 - 1.0
    np.testing.assert_allclose(np.asarray(fc.logits(params, floats28)), np.asarray(fc.logits(params, images)),
                               atol=1e-5)
    jitted = jax.jit(fc.features)(params, model_space)
    np.testing.assert_allclose(np.asarray(jitted), want, atol=1e-5)


def test_metadata() -> None:
    meta = fc.metadata()
    assert meta["test_accuracy"] >= 0.91 and meta["epochs"] >= 1
    assert meta["command"].startswith("python scripts/train_fmnist_classifier.py")
    assert meta["feature_dim"] == fc.FEATURE_DIM
    assert fc.default_path().stat().st_size < 2_000_000


def test_bad_inputs_and_files(params, tmp_path: Path) -> None:
    with pytest.raises(QditError, match="greyscale images"):
        fc.features(params, np.zeros((2, 30, 30), np.uint8))
    with pytest.raises(QditError, match="dtype"):
        fc.features(params, np.zeros((2, 28, 28), np.int32))
    with pytest.raises(QditError, match="not found"):
        fc.load_classifier(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_bytes(b"not an npz")
    with pytest.raises(QditError, match="cannot read"):
        fc.load_classifier(tmp_path / "junk.npz")
    flat = {"conv0/kernel": np.zeros((3, 3, 1, 8), np.float32)}
    np.savez(tmp_path / "wrong.npz", **flat)
    with pytest.raises(QditError, match="do not match"):
        fc.load_classifier(tmp_path / "wrong.npz")


def test_save_load_round_trip(tmp_path: Path) -> None:
    p = fc.init_params(seed=3)
    fc.save_params(p, tmp_path / "c.npz")
    q = fc.load_classifier(tmp_path / "c.npz")
    for a, b in zip(jax.tree_util.tree_leaves(p), jax.tree_util.tree_leaves(q)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with np.load(tmp_path / "c.npz", allow_pickle=False) as z:
        assert json.dumps(sorted(z.files)).count("/") == 10  # five layers, kernel + bias each
