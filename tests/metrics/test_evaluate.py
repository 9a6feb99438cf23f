"""evaluate_samples against direct metric calls, the exact low-rank FID, input checks, the fmnist path."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

from qdit_jax.errors import QditError
from qdit_jax.metrics import evaluate as ev
from qdit_jax.metrics.frechet import feature_statistics, frechet_distance
from qdit_jax.metrics.inception_score import inception_score
from qdit_jax.metrics.precision_recall import precision_recall


def _fid64(a: np.ndarray, b: np.ndarray) -> float:
    """float64 NumPy/SciPy FID from full covariances (independent of the low-rank path)."""
    linalg = pytest.importorskip("scipy.linalg")
    a, b = a.astype(np.float64), b.astype(np.float64)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    d = a.mean(0) - b.mean(0)
    return float(d @ d + np.trace(s1) + np.trace(s2) - 2 * np.trace(np.real(linalg.sqrtm(s1 @ s2))))


@pytest.mark.parametrize("n1,n2,d", [(12, 20, 48), (30, 40, 16)])  # low-rank path, then the full one
def test_frechet_from_features_matches_scipy(n1, n2, d):
    rng = np.random.default_rng(n1)
    a = rng.normal(size=(n1, d))
    b = rng.normal(size=(n2, d)) * 1.3 + 0.2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = ev.frechet_from_features(a, b)
        ref = frechet_distance(*feature_statistics(a), *feature_statistics(b))
    np.testing.assert_allclose(got, ref, rtol=1e-6)
    if n1 > d:
        np.testing.assert_allclose(got, _fid64(a, b), rtol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert abs(ev.frechet_from_features(a, a)) < 1e-6


class _FakeInception:
    """Stand-in for extract_features: deterministic random projections of the pixels."""

    def __init__(self, monkeypatch):
        rng = np.random.default_rng(0)
        self.w = {"pool": rng.normal(size=(8 * 8 * 3, 24)), "spatial": rng.normal(size=(8 * 8 * 3, 10)),
                  "logits_unbiased": rng.normal(size=(8 * 8 * 3, 12)) * 0.05}
        self.calls = []
        monkeypatch.setattr(ev, "_inception_features", self)

    def __call__(self, params, images, outputs, preprocess, batch_size, mesh=None):
        self.calls.append(preprocess)
        x = images.reshape(len(images), -1).astype(np.float64) / 255.0
        return {k: (x @ self.w[k]).astype(np.float32) for k in outputs}


def test_evaluate_samples_matches_direct_calls(monkeypatch):
    fake = _FakeInception(monkeypatch)
    rng = np.random.default_rng(1)
    samples = rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8)
    ref_images = rng.integers(0, 200, (50, 8, 8, 3), dtype=np.uint8)
    out = ev.evaluate_samples(samples, {"images": ref_images}, inception_params={})
    assert out["preprocess"] == "pytorch_fid" and fake.calls == ["pytorch_fid"] * 2  # reference, samples
    fs = fake(None, samples, ("pool", "spatial", "logits_unbiased"), None, 0)
    fr = fake(None, ref_images, ("pool", "spatial"), None, 0)
    np.testing.assert_allclose(out["fid"], _fid64(fs["pool"], fr["pool"]), rtol=1e-5)
    np.testing.assert_allclose(out["sfid"], _fid64(fs["spatial"], fr["spatial"]), rtol=1e-5)
    is_ref = inception_score(fs["logits_unbiased"], splits=10)
    np.testing.assert_allclose([out["is"], out["is_std"]], [is_ref.mean, is_ref.std], rtol=1e-9)
    assert (out["precision"], out["recall"]) == precision_recall(fr["pool"], fs["pool"], k=3)


def test_adm_stats_reference_defaults_to_tf1(monkeypatch, tmp_path):
    fake = _FakeInception(monkeypatch)
    rng = np.random.default_rng(2)
    ref_images = rng.integers(0, 256, (30, 8, 8, 3), dtype=np.uint8)
    fr = fake(None, ref_images, ("pool", "spatial"), None, 0)
    mu, sigma = feature_statistics(fr["pool"])
    mu_s, sigma_s = feature_statistics(fr["spatial"])
    path = tmp_path / "adm.npz"
    np.savez(path, arr_0=ref_images, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    samples = rng.integers(0, 256, (30, 8, 8, 3), dtype=np.uint8)
    out = ev.evaluate_samples(samples, str(path), metrics="fid,sfid,is", inception_params={})
    assert out["preprocess"] == "tf1" and fake.calls[-1] == "tf1"
    fs = fake(None, samples, ("pool",), None, 0)
    np.testing.assert_allclose(out["fid"], frechet_distance(*feature_statistics(fs["pool"]), mu, sigma), rtol=1e-9)
    # An explicit choice wins over the default rule.
    ev.evaluate_samples(samples, str(path), metrics="fid", inception_params={}, preprocess="pytorch_fid")
    assert fake.calls[-1] == "pytorch_fid"
    # A stats file without images cannot give precision/recall.
    np.savez(tmp_path / "stats.npz", mu=mu, sigma=sigma)
    with pytest.raises(QditError, match="images"):
        ev.evaluate_samples(samples, str(tmp_path / "stats.npz"), metrics="prec", inception_params={})


@pytest.mark.parametrize("images,match", [
    (np.zeros((4, 8, 8, 3), np.float32), "uint8"),
    (np.full((4, 8, 8, 3), 300, np.int32), "outside 0..255"),
    (np.zeros((1, 8, 8, 3), np.uint8), "at least 2 samples"),
])
def test_bad_samples_are_one_line_errors(images, match):
    with pytest.raises(QditError, match=match) as e:
        ev.evaluate_samples(images, {"images": np.zeros((4, 8, 8, 3), np.uint8)}, metrics="fid", inception_params={})
    assert "\n" not in str(e.value)


def test_other_input_errors(tmp_path):
    x = np.zeros((8, 8, 8, 3), np.uint8)
    with pytest.raises(QditError, match="pt_inception-2015-12-05-6726825d.pth"):
        ev.evaluate_samples(x, {"images": x})
    with pytest.raises(QditError, match="unknown metrics"):
        ev.evaluate_samples(x, {"images": x}, metrics="fid,kid", inception_params={})
    with pytest.raises(QditError, match="more than 3 samples"):
        ev.evaluate_samples(x[:3], {"images": x}, metrics="prec", inception_params={})
    np.savez(tmp_path / "bad.npz", something=x)
    with pytest.raises(QditError, match="neither images"):
        ev.evaluate_samples(x, str(tmp_path / "bad.npz"), metrics="fid", inception_params={})
    with pytest.raises(QditError, match="sfid"):
        ev.evaluate_samples(x[..., :1], "fmnist-test", features="fmnist", metrics="sfid")


def test_fidelity_to_reference():
    rng = np.random.default_rng(3)
    a = rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-5, 6, a.shape), 0, 255).astype(np.uint8)
    got = ev.fidelity_to_reference(b, a)
    mse = ((a.astype(np.float64) - b) ** 2).reshape(3, -1).mean(1)
    np.testing.assert_allclose(got["psnr"], np.mean(10 * np.log10(255.0 ** 2 / mse)), rtol=1e-4)
    assert 0.5 < got["ssim"] < 1.0
    assert ev.fidelity_to_reference(a, a)["ssim"] == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(QditError, match="differ in shape"):
        ev.fidelity_to_reference(a, a[:2])


def test_fmnist_features_on_real_images(tmp_path):
    from qdit_jax.io.fmnist import load_fashion_mnist
    from qdit_jax.models import fmnist_classifier as fc

    try:
        images, labels = load_fashion_mnist("test")
        params = fc.load_classifier()
    except QditError as e:
        pytest.skip(str(e))
    samples, ref = images[:160], images[1000:1200]  # more samples than the 128 feature dims
    np.savez(tmp_path / "ref.npz", arr_0=np.repeat(ref[..., None], 3, -1))  # RGB refs are rejected
    with pytest.raises(QditError, match="greyscale"):
        ev.evaluate_samples(samples, str(tmp_path / "ref.npz"), features="fmnist")
    np.savez(tmp_path / "ref.npz", arr_0=ref[..., None])
    out = ev.evaluate_samples(samples[..., None], {"images": ref[..., None]}, features="fmnist",
                              labels=labels[:160], fmnist_params=params)
    fs, ls = fc.embed(samples, params)
    fr, _ = fc.embed(ref, params)
    np.testing.assert_allclose(out["fid"], _fid64(fs, fr), rtol=1e-5)
    assert out["accuracy"] == pytest.approx(float(np.mean(ls.argmax(-1) == labels[:160])))
    assert out["accuracy"] > 0.7  # the shipped classifier is ~92% accurate
    assert out["is"] == pytest.approx(inception_score(ls, splits=10).mean, rel=1e-9)
    assert (out["precision"], out["recall"]) == precision_recall(fr, fs, k=3)
