"""Orbax checkpoints: exact round trip of any dtype, atomic saves, clear refusals."""
from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest

from qdit_jax.errors import QditError
from qdit_jax.io import checkpoint as ckpt
from qdit_jax.io.checkpoint import load_checkpoint, save_checkpoint
from qdit_jax.models.dit import DiTConfig, param_shapes

CFG = DiTConfig(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=2, num_heads=2, num_classes=5)


@pytest.fixture(scope="module")
def dit_params() -> dict:
    rng = np.random.default_rng(0)  # random values of the model's shapes (no slow Flax init)
    return jax.tree_util.tree_map(lambda s: rng.standard_normal(s.shape).astype(np.float32), param_shapes(CFG))


def _leaves(tree) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _mixed_tree() -> dict:
    rng = np.random.default_rng(0)
    return {
        "blocks_0": {"qkv": {"codes": rng.integers(-128, 128, (4, 6), dtype=np.int8),
                             "packed": rng.integers(0, 256, (3,), dtype=np.uint8),
                             "scale": rng.standard_normal((6,)).astype(np.float16)}},
        "bf16": rng.standard_normal((2, 3)).astype(ml_dtypes.bfloat16),
        "f32": rng.standard_normal((5,)).astype(np.float32),
        "scalar": np.float32(0.25),
        "i32": np.arange(4, dtype=np.int32),
    }


def test_mixed_dtype_round_trip_is_exact(tmp_path: Path) -> None:
    tree = _mixed_tree()
    extra = {"quantization": {"w_bits": 4, "groups": [128, 64]}, "note": "ünïcode", "ok": True}
    save_checkpoint(tmp_path / "q", tree, CFG, extra, layout="qdit-test-quantized")
    params, cfg, got_extra = load_checkpoint(tmp_path / "q")
    assert cfg == CFG and got_extra == extra
    want, got = _leaves(tree), _leaves(params)
    assert set(got) == set(want)
    for k, v in want.items():
        v = np.asarray(v)
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        np.testing.assert_array_equal(got[k].reshape(-1).view(np.uint8), v.reshape(-1).view(np.uint8))  # bit-exact


def test_dit_params_round_trip_and_config_check(tmp_path: Path, dit_params: dict) -> None:
    save_checkpoint(tmp_path / "c", dit_params, CFG)
    params, cfg, extra = load_checkpoint(tmp_path / "c")
    assert cfg == CFG and extra == {}
    for k, v in _leaves(dit_params).items():
        np.testing.assert_array_equal(_leaves(params)[k], v)
    # a config.json edited to another depth no longer matches the stored tree
    meta = json.loads((tmp_path / "c" / "config.json").read_text())
    meta["model_config"]["depth"] = 3
    (tmp_path / "c" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(QditError) as e:
        load_checkpoint(tmp_path / "c")
    assert "blocks_2/adaLN_modulation/bias missing" in str(e.value) and "\n" not in str(e.value)


def test_save_refuses_tree_that_does_not_match_config(tmp_path: Path, dit_params: dict) -> None:
    bad = jax.tree_util.tree_map(lambda x: x, dit_params)
    bad["blocks_1"]["mlp"]["fc1"]["kernel"] = bad["blocks_1"]["mlp"]["fc1"]["kernel"][:, :4]
    with pytest.raises(QditError, match=r"blocks_1/mlp/fc1/kernel \(32, 4\) \(expected \(32, 128\)\)"):
        save_checkpoint(tmp_path / "x", bad, CFG)
    assert not (tmp_path / "x").exists()


def test_overwrite_is_refused_unless_asked(tmp_path: Path) -> None:
    tree = _mixed_tree()
    save_checkpoint(tmp_path / "o", tree, CFG, {"v": 1}, layout="t")
    with pytest.raises(QditError, match="already exists"):
        save_checkpoint(tmp_path / "o", tree, CFG, {"v": 2}, layout="t")
    assert load_checkpoint(tmp_path / "o")[2] == {"v": 1}
    save_checkpoint(tmp_path / "o", tree, CFG, {"v": 2}, overwrite=True, layout="t")
    assert load_checkpoint(tmp_path / "o")[2] == {"v": 2}
    assert sorted(os.listdir(tmp_path)) == ["o"]  # no temporary or old siblings left
    other = tmp_path / "photos"
    other.mkdir()
    (other / "cat.jpg").write_bytes(b"x")
    with pytest.raises(QditError, match="not a qdit checkpoint"):
        save_checkpoint(other, tree, CFG, overwrite=True, layout="t")
    assert (other / "cat.jpg").exists()


def test_failure_mid_save_leaves_nothing_loadable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tree = _mixed_tree()
    real_write = ckpt._write

    def crash_after_params(tmp: str, flat, meta) -> None:
        real_write(tmp, flat, meta)  # params and config.json written: only the final rename is missing
        raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(ckpt, "_write", crash_after_params)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path / "a", tree, CFG, layout="t")
    assert os.listdir(tmp_path) == []  # no final dir, temporary removed

    # A hard kill skips the clean-up: the temporary sibling stays, the final dir still does not exist.
    monkeypatch.setattr(ckpt, "_cleanup", lambda path: None)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path / "a", tree, CFG, layout="t")
    assert not (tmp_path / "a").exists()
    (leftover,) = os.listdir(tmp_path)
    with pytest.raises(QditError, match="does not exist"):
        load_checkpoint(tmp_path / "a")
    # killed before config.json was written: refused as half-written
    os.remove(tmp_path / leftover / "config.json")
    with pytest.raises(QditError, match="half-written"):
        load_checkpoint(tmp_path / leftover)


def test_half_written_or_foreign_directories_are_refused(tmp_path: Path) -> None:
    with pytest.raises(QditError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(QditError, match="not a qdit checkpoint; run qdit convert first"):
        load_checkpoint(tmp_path / "empty")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text('{"_class_name": "DiTTransformer2DModel"}')
    with pytest.raises(QditError, match="not a qdit checkpoint"):
        load_checkpoint(tmp_path / "hf")
    save_checkpoint(tmp_path / "c", _mixed_tree(), CFG, layout="t")
    cfg_text = (tmp_path / "c" / "config.json").read_text()
    (tmp_path / "c" / "config.json").write_text(cfg_text[: len(cfg_text) // 2])  # truncated config.json
    with pytest.raises(QditError, match="half-written"):
        load_checkpoint(tmp_path / "c")
    (tmp_path / "c" / "config.json").write_text(cfg_text)
    data_files = [p for p in (tmp_path / "c" / "params").rglob("*") if p.is_file() and p.stat().st_size > 0]
    for p in data_files:  # damage every array file
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 3])
    with pytest.raises(QditError, match="half-written or damaged"):
        load_checkpoint(tmp_path / "c")


def test_non_json_extra_is_refused(tmp_path: Path) -> None:
    with pytest.raises(QditError, match="JSON"):
        save_checkpoint(tmp_path / "j", _mixed_tree(), CFG, {"bad": object()}, layout="t")
    assert not (tmp_path / "j").exists()
