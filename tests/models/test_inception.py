"""FID Inception-v3 in Flax vs PyTorch (pytorch-fid where importable, else our own reference)."""
from __future__ import annotations

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from qdit_jax.convert.inception import convert_inception_state_dict  # noqa: E402
from qdit_jax.errors import QditError  # noqa: E402
from qdit_jax.models import inception as inc  # noqa: E402
from tests.reference.torch_inception import TorchFIDInception, randomize_  # noqa: E402

SIZES = [(299, 299), (256, 256), (64, 80)]  # identity, downsample, upsample (non-square)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def nets():
    torch.set_num_threads(2)
    model = randomize_(TorchFIDInception(), seed=0)
    return model, model.state_dict(), convert_inception_state_dict(model.state_dict())


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return {s: rng.integers(0, 256, (1, *s, 3), dtype=np.uint8) for s in SIZES}


@pytest.fixture(scope="module")
def jax_outputs(nets, images):
    with jax.default_matmul_precision("highest"):  # float32 convolutions on a GPU too (its default is TF32)
        return {s: inc.extract_features(nets[2], x) for s, x in images.items()}


def test_parity_with_torch_reference(nets, images, jax_outputs):
    model = nets[0]
    for size, x in images.items():
        with torch.no_grad():
            pool, spatial, logits = model(torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255.0)
        out = jax_outputs[size]
        assert out["pool"].shape == (1, 2048) and out["spatial"].shape == (1, 2023)
        assert out["logits"].shape == (1, 1008)
        assert _rel(out["pool"], pool.numpy()) < 1e-4, size
        assert _rel(out["spatial"], spatial.numpy()) < 1e-4, size
        assert _rel(out["logits"], logits.numpy()) < 1e-4, size
        unbiased = out["logits"] - model.fc.bias.detach().numpy()
        np.testing.assert_allclose(out["logits_unbiased"], unbiased, atol=1e-4 * np.abs(unbiased).max())


def _import_pytorch_fid():
    try:
        from pytorch_fid import inception as pfi  # needs a working torchvision
    except Exception as e:  # noqa: BLE001 - a broken torchvision raises RuntimeError, not ImportError
        pytest.skip(f"pytorch_fid not importable here ({type(e).__name__}: {str(e)[:80]})")
    return pfi


def test_parity_with_pytorch_fid(nets, images, jax_outputs, monkeypatch):
    """The real pytorch-fid network, its weights download replaced by our random state_dict."""
    pfi = _import_pytorch_fid()
    state = nets[1]
    monkeypatch.setattr(pfi, "load_state_dict_from_url", lambda *a, **k: state)
    wrapper = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
    fc = pfi.fid_inception_v3().fc.eval()
    caught = []
    wrapper.blocks[2][6].branch1x1.register_forward_hook(lambda m, i, o: caught.append(o))  # Mixed_6d
    for size, x in images.items():
        caught.clear()
        with torch.no_grad():
            pool = wrapper(torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255.0)[0].flatten(1)
            logits = fc(pool)
        spatial = caught[0][:, :7].permute(0, 2, 3, 1).flatten(1)
        out = jax_outputs[size]
        assert _rel(out["pool"], pool.numpy()) < 1e-4, size
        assert _rel(out["spatial"], spatial.numpy()) < 1e-4, size
        assert _rel(out["logits"], logits.numpy()) < 1e-4, size


@pytest.mark.parametrize("size", [(299, 299), (512, 384), (37, 301), (1, 1)])
def test_pytorch_fid_resize_matches_interpolate(size):
    x = np.random.default_rng(1).random((2, *size, 3), dtype=np.float32)
    got = np.asarray(inc.preprocess_images(x, "pytorch_fid"))
    ref = torch.nn.functional.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=(299, 299),
                                          mode="bilinear", align_corners=False)
    np.testing.assert_allclose(got, (2 * ref - 1).permute(0, 2, 3, 1).numpy(), atol=2e-6)


def test_tf1_resize_is_legacy_corner_aligned():
    """TF1 ResizeBilinear (no half-pixel centres): out[i] samples in[i * in/out], clamped at the end."""
    n = 13
    row = np.linspace(0.0, 1.0, n, dtype=np.float32)
    x = np.broadcast_to(row[None, None, :, None], (1, n, n, 3))
    got = np.asarray(inc.preprocess_images(x, "tf1"))[0, 0, :, 0] * 128.0 + 128.0
    src = np.arange(299) * (n / 299)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, n - 1)
    expect = 255.0 * (row[lo] + (src - lo) * (row[hi] - row[lo]))
    np.testing.assert_allclose(got, expect, atol=1e-3)
    half_pixel = np.asarray(inc.preprocess_images(x, "pytorch_fid"))[0, 0, :, 0] * 127.5 + 127.5
    assert np.abs(got - half_pixel).max() > 5.0  # the two conventions differ by ~half an input pixel


def test_tf1_value_range():
    x = np.array([0, 128, 255], dtype=np.uint8).reshape(1, 1, 3, 1).repeat(3, -1)
    x = np.broadcast_to(x, (1, 299, 3, 3))
    x = np.concatenate([x] * 100, axis=2)[:, :, :299]
    got = np.asarray(inc.preprocess_images(inc.to_unit_range(x), "tf1"))[0, 0, :3, 0]
    np.testing.assert_allclose(got, [-1.0, 0.0, 127.0 / 128.0], atol=1e-5)


@pytest.mark.parametrize("bad, match", [
    (np.zeros((1, 8, 8, 3), np.int32), "dtype"),
    (np.full((1, 8, 8, 3), -0.5, np.float32), r"\[0, 1\]"),
    (np.full((1, 8, 8, 3), np.nan, np.float32), "NaN"),
    (np.zeros((8, 8, 3), np.uint8), "NHWC"),
    (np.zeros((1, 8, 8, 4), np.uint8), "3 channels"),
    (np.zeros((0, 8, 8, 3), np.uint8), "no images"),
])
def test_bad_images(bad, match):
    with pytest.raises(QditError, match=match):
        inc.to_unit_range(bad)


def test_bad_options():
    with pytest.raises(QditError, match="preprocess"):
        inc.extract_features({}, np.zeros((1, 8, 8, 3), np.uint8), preprocess="tf2")
    with pytest.raises(QditError, match="outputs"):
        inc.extract_features({}, np.zeros((1, 8, 8, 3), np.uint8), outputs=("pool4",))


def test_converter_is_strict(nets):
    state = {k: v.clone() for k, v in nets[1].items()}
    del state["Mixed_6d.branch1x1.bn.running_var"]
    with pytest.raises(QditError, match="missing 1 keys"):
        convert_inception_state_dict(state)
    state = dict(nets[1], **{"AuxLogits.fc.weight": torch.zeros(1000, 768)})
    with pytest.raises(QditError, match="unexpected keys"):
        convert_inception_state_dict(state)
    state = dict(nets[1], **{"fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000)})
    with pytest.raises(QditError, match="wrongly shaped"):
        convert_inception_state_dict(state)


def test_extract_features_batches_and_pads(nets, images, jax_outputs):
    """3 images in batches of 2 (last one padded), fed as an iterable: same rows as one by one."""
    x = images[(299, 299)]
    stacked = np.concatenate([x, np.full_like(x, 128), x])
    with jax.default_matmul_precision("highest"):  # as jax_outputs
        out = inc.extract_features(nets[2], iter([stacked]), batch_size=2, outputs=("pool",))
    assert out["pool"].shape == (3, 2048) and set(out) == {"pool"}
    np.testing.assert_allclose(out["pool"][0], jax_outputs[(299, 299)]["pool"][0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["pool"][2], out["pool"][0], rtol=1e-6)
    assert np.abs(out["pool"][1] - out["pool"][0]).max() > 1e-3  # a different (constant) image
