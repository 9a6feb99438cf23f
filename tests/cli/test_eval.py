"""`qdit eval`: one-line errors with exit code 2, and a good run that prints a table and writes JSON."""
from __future__ import annotations

import json

import numpy as np
import pytest

from qdit_jax.cli import eval as eval_cli
from qdit_jax.cli.main import main
from qdit_jax.errors import QditError
from qdit_jax.io.images import save_samples


def _err_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    return err


def test_bad_dtype_exits_2(tmp_path, capsys):
    path = tmp_path / "float.npz"
    np.savez(path, arr_0=np.zeros((4, 8, 8, 3), np.float32))
    np.savez(tmp_path / "ref.npz", arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    assert main(["eval", str(path), "--ref", str(tmp_path / "ref.npz")]) == 2
    assert "uint8" in _err_line(capsys)


def test_reference_without_keys_exits_2(tmp_path, capsys):
    save_samples(str(tmp_path / "s.npz"), np.zeros((4, 8, 8, 3), np.uint8))
    np.savez(tmp_path / "ref.npz", images=np.zeros((4, 8, 8, 3), np.uint8))
    assert main(["eval", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "ref.npz"), "--features", "fmnist"]) == 2
    assert "has no images 'arr_0'" in _err_line(capsys)


def test_missing_inception_weights_exits_2(tmp_path, capsys):
    save_samples(str(tmp_path / "s.npz"), np.zeros((4, 8, 8, 3), np.uint8))
    np.savez(tmp_path / "ref.npz", arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    assert main(["eval", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "ref.npz")]) == 2
    assert "pt_inception-2015-12-05-6726825d.pth" in _err_line(capsys)
    assert main(["eval", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "ref.npz"), "--metrics", "fid,kid"]) == 2
    assert "kid" in _err_line(capsys)


def test_good_run_writes_json(tmp_path, capsys):
    from qdit_jax.io.fmnist import load_fashion_mnist

    try:
        images, labels = load_fashion_mnist("test")
    except QditError as e:
        pytest.skip(str(e))
    save_samples(str(tmp_path / "s.npz"), images[:40, :, :, None], labels[:40])
    save_samples(str(tmp_path / "fp.npz"), images[:40, :, :, None], labels[:40])
    np.savez(tmp_path / "ref.npz", arr_0=images[5000:5040, :, :, None])
    out = tmp_path / "m.json"
    rc = main(["eval", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "ref.npz"), "--features", "fmnist",
               "--fp-samples", str(tmp_path / "fp.npz"), "--json", str(out)])
    assert rc == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())  # strict JSON: PSNR of identical images (inf) is null
    assert {"fid", "is", "precision", "recall", "accuracy", "ssim"} <= set(result)
    assert result["psnr"] is None and result["ssim"] == pytest.approx(1.0, abs=1e-5)
    assert result["num_samples"] == 40 and result["accuracy"] > 0.7
    assert "FID" in printed and "Accuracy" in printed


def test_format_table():
    text = eval_cli.format_table({"fid": 1.23456, "is": 2.0, "is_std": 0.5, "precision": 0.75})
    assert text.splitlines() == ["FID        1.2346", "IS         2.0000 ± 0.5000", "Precision  0.7500"]
