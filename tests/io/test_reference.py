"""ADM reference batches, stats caches, ADM's centre crop (PIL) and the TFDS path's error."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from PIL import Image

from qdit_jax.errors import QditError
from qdit_jax.io import reference as ref


@pytest.fixture()
def images():
    return np.random.default_rng(0).integers(0, 256, (40, 8, 8, 3), dtype=np.uint8)


def _features(batch: np.ndarray) -> dict[str, np.ndarray]:
    """A stand-in feature network: per-image channel means (pool) and a 2x2 pooled map (spatial)."""
    x = batch.astype(np.float64) / 255.0
    pool = np.concatenate([x.mean(axis=(1, 2)), x.std(axis=(1, 2))], axis=1)
    spatial = x.reshape(len(x), 2, 4, 2, 4, 3).mean(axis=(2, 4)).reshape(len(x), -1)
    return {"pool": pool, "spatial": spatial}


def test_reference_batch_images_and_stats(tmp_path, images):
    path = tmp_path / "ref.npz"
    np.savez(path, arr_0=images)
    got = ref.load_reference(path)
    np.testing.assert_array_equal(got["images"], images)
    assert "mu" not in got

    mu, sigma = np.zeros(3), np.eye(3)
    np.savez(path, arr_0=images, mu=mu, sigma=sigma, mu_s=mu[:2], sigma_s=sigma[:2, :2])
    got = ref.load_reference(path)
    assert "images" not in got and got["sigma_s"].shape == (2, 2)  # stats present: images not loaded
    assert ref.load_reference(path, need_images=True)["images"].shape == images.shape


@pytest.mark.parametrize("content, match", [
    ({"images": np.zeros((2, 8, 8, 3), np.uint8)}, "neither images 'arr_0' nor statistics"),
    ({"mu": np.zeros(3)}, "only one of 'mu'/'sigma'"),
    ({"mu": np.zeros(3), "sigma": np.eye(4)}, "not a mean and its covariance"),
    ({"arr_0": np.zeros((2, 8, 8, 3), np.float32)}, "uint8"),
    ({"arr_0": np.zeros((2, 8, 8), np.uint8)}, r"\(N, H, W, 3\)"),
])
def test_bad_reference_files(tmp_path, content, match):
    path = tmp_path / "bad.npz"
    np.savez(path, **content)
    with pytest.raises(QditError, match=match):
        ref.load_reference(path)


def test_unreadable_and_missing(tmp_path):
    with pytest.raises(QditError, match="not found"):
        ref.load_reference(tmp_path / "nope.npz")
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip file at all")
    with pytest.raises(QditError, match="cannot read"):
        ref.load_reference(junk)
    stats_only = tmp_path / "stats.npz"
    np.savez(stats_only, mu=np.zeros(2), sigma=np.eye(2))
    with pytest.raises(QditError, match="no images"):
        ref.load_reference(stats_only, need_images=True)


def test_compute_save_load_stats(tmp_path, images):
    batches = [images[:5], images[5:9], images[9:]]
    stats = ref.compute_reference_stats(batches, _features, keep_pool_features=True)
    feats = _features(images)
    np.testing.assert_allclose(stats["mu"], feats["pool"].mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(stats["sigma"], np.cov(feats["pool"], rowvar=False), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(stats["sigma_s"], np.cov(feats["spatial"], rowvar=False), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(stats["pool_features"], feats["pool"], rtol=1e-6)
    assert int(stats["num_images"]) == 40

    path = tmp_path / "cache" / "stats.npz"
    ref.save_stats(path, stats)
    back = ref.load_stats(path)
    for k in ("mu", "sigma", "mu_s", "sigma_s"):
        np.testing.assert_array_equal(back[k], stats[k])
    pool_only = ref.compute_reference_stats([images], lambda b: _features(b)["pool"])
    assert "mu_s" not in pool_only
    with pytest.raises(QditError, match="end in .npz"):
        ref.save_stats(tmp_path / "stats.bin", stats)
    with pytest.raises(QditError, match="no reference images"):
        ref.compute_reference_stats([], _features)
    np.savez(tmp_path / "imgs.npz", arr_0=images)
    with pytest.raises(QditError, match="no statistics"):
        ref.load_stats(tmp_path / "imgs.npz")


def test_center_crop_box_halving():
    """1024x1024 -> 256: two BOX halvings, then an identity bicubic and no crop; a direct
    bicubic downsampling (what a single resize would do) gives a different image."""
    arr = np.random.default_rng(1).integers(0, 256, (1024, 1024, 3), dtype=np.uint8)
    out = ref.center_crop_arr(Image.fromarray(arr), 256)
    assert out.shape == (256, 256, 3) and out.dtype == np.uint8
    halved = Image.fromarray(arr).resize((512, 512), Image.BOX).resize((256, 256), Image.BOX)
    np.testing.assert_array_equal(out, np.asarray(halved))
    direct = np.asarray(Image.fromarray(arr).resize((256, 256), Image.BICUBIC))
    assert np.abs(out.astype(int) - direct).max() > 10
    block_mean = arr.reshape(256, 4, 256, 4, 3).mean(axis=(1, 3))
    assert np.abs(out - block_mean).mean() < 2.0  # BOX halvings average 4x4 blocks


def test_center_crop_is_centred():
    """511x700 (short side < 2x256: no BOX): bicubic to 256x351, crop columns 47..303."""
    arr = np.zeros((511, 700, 3), np.uint8)
    arr[:, 350 - 60:350 + 60] = 255  # a bright vertical band around the centre
    out = ref.center_crop_arr(Image.fromarray(arr), 256)
    assert out.shape == (256, 256, 3)
    band = np.nonzero(out[128, :, 0] > 127)[0]
    centre = (band[0] + band[-1]) / 2
    assert abs(centre - 127.5) <= 1.0  # band stays in the middle of the crop
    assert 57 <= len(band) <= 63  # 120 px * 256/511 ~ 60 px wide: wrong scaling would change it


def test_center_crop_exact_size_is_identity():
    arr = np.random.default_rng(2).integers(0, 256, (256, 300, 3), dtype=np.uint8)
    out = ref.center_crop_arr(Image.fromarray(arr), 256)
    np.testing.assert_array_equal(out, arr[:, 22:278])


@pytest.mark.skipif(importlib.util.find_spec("tensorflow_datasets") is not None, reason="TFDS installed")
def test_tfds_missing_names_install(tmp_path):
    with pytest.raises(QditError, match="pip install tensorflow-datasets"):
        ref.imagenet_reference_stats(_features)
    cache = tmp_path / "c.npz"
    ref.save_stats(cache, {"mu": np.zeros(2), "sigma": np.eye(2)})
    assert set(ref.imagenet_reference_stats(_features, cache_path=str(cache))) == {"mu", "sigma"}
