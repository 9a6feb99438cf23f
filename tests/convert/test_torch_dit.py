"""Official DiT .pt -> Flax: forward parity against an independent PyTorch DiT, strictness, safety."""
from __future__ import annotations

import argparse
import functools
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from qdit_jax.convert.torch_dit import (  # noqa: E402
    convert_torch_checkpoint, infer_config, load_torch_checkpoint, state_dict_to_params,
)
from qdit_jax.errors import QditError  # noqa: E402
from qdit_jax.models.dit import DiT, DiTConfig, param_shapes  # noqa: E402
from tests.reference.torch_dit import TorchDiT, random_official_state_dict, sincos_pos_embed  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("QDIT_SHARED", REPO.parent / "shared"))
FMNIST_PT = SHARED / "models" / "dit_fmnist_fp16.pt"


@functools.lru_cache(maxsize=None)
def _apply(cfg: DiTConfig):
    return jax.jit(lambda p, x, t, y: DiT(cfg).apply({"params": p}, x, t, y))


def flax_forward(params, cfg: DiTConfig, x_nchw: np.ndarray, t: np.ndarray, y: np.ndarray) -> np.ndarray:
    out = _apply(cfg)(params, jnp.asarray(x_nchw.transpose(0, 2, 3, 1)), jnp.asarray(t), jnp.asarray(y))
    return np.asarray(out).transpose(0, 3, 1, 2)


def torch_forward(model: TorchDiT, x: np.ndarray, t: np.ndarray, y: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(y)).numpy()


def shape_dict(tree) -> dict[str, tuple[int, ...]]:
    return {jax.tree_util.keystr(p): tuple(np.shape(v)) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def rel_err(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.max(np.abs(a - ref)) / np.max(np.abs(ref)))


def inputs(cfg: DiTConfig, n: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, cfg.in_channels, cfg.input_size, cfg.input_size)).astype(np.float32)
    t = np.array([0, 137, 999, 500][:n], np.int64)
    y = rng.integers(0, cfg.num_classes + int(cfg.class_dropout_prob > 0), n).astype(np.int64)
    return x, t, y


def make_reference(**kw) -> tuple[TorchDiT, dict[str, np.ndarray]]:
    model = TorchDiT(**kw).eval()
    sd = random_official_state_dict(model, seed=kw["depth"])
    model.load_state_dict(sd, strict=True)
    return model, {k: v.numpy() for k, v in sd.items()}


CONFIGS = {
    "small": dict(input_size=8, patch_size=2, in_channels=3, hidden_size=64, depth=2, num_heads=4, num_classes=7),
    "xl_width": dict(input_size=8, patch_size=2, in_channels=4, hidden_size=1152, depth=2, num_heads=16, num_classes=1000),
    "no_sigma_no_null_p4": dict(input_size=16, patch_size=4, in_channels=2, hidden_size=128, depth=3, num_heads=8,
                                mlp_ratio=2.0, num_classes=5, class_dropout_prob=0.0, learn_sigma=False),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_random_official_state_dict_forward_parity(name: str, tmp_path: Path) -> None:
    kw = CONFIGS[name]
    model, sd = make_reference(**kw)
    path = tmp_path / "dit.pt"
    torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, path)
    heads = None if name == "xl_width" else kw["num_heads"]  # 1152 -> 16 heads is the official default
    classes = kw["num_classes"] if kw.get("class_dropout_prob", 0.1) == 0.0 else None
    params, cfg = convert_torch_checkpoint(path, num_heads=heads, num_classes=classes)
    want = DiTConfig(**{k: v for k, v in kw.items()})
    assert cfg == want
    assert shape_dict(params) == shape_dict(param_shapes(cfg))  # exactly the Flax model's tree
    x, t, y = inputs(cfg)
    ref = torch_forward(model, x, t, y)
    assert rel_err(flax_forward(params, cfg, x, t, y), ref) <= 1e-5


def test_half_precision_tensors_convert_to_their_float32_values(tmp_path: Path) -> None:
    _, sd = make_reference(**CONFIGS["small"])
    for dtype in (torch.float16, torch.bfloat16):
        path = tmp_path / f"{dtype}.pt"
        torch.save({k: torch.from_numpy(v).to(dtype) for k, v in sd.items()}, path)
        loaded = load_torch_checkpoint(path)
        for k, v in sd.items():
            assert loaded[k].dtype == np.float32
            np.testing.assert_array_equal(loaded[k], torch.from_numpy(v).to(dtype).float().numpy())
        params, cfg = convert_torch_checkpoint(path, num_heads=4)
        w = loaded["blocks.1.attn.qkv.weight"]
        np.testing.assert_array_equal(params["blocks_1"]["attn"]["qkv"]["kernel"], w.T)


def test_training_checkpoint_prefers_ema_and_strips_module_prefix(tmp_path: Path) -> None:
    model, sd = make_reference(**CONFIGS["small"])
    ema = {f"module.{k}": torch.from_numpy(v) for k, v in sd.items()}
    raw = {k: torch.from_numpy(np.zeros_like(v)) for k, v in sd.items()}
    opt = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(2)}},
           "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "params": [0]}]}
    path = tmp_path / "0100000.pt"
    torch.save({"model": raw, "ema": ema, "opt": opt, "args": argparse.Namespace(model="DiT-S/2", lr=1e-4)}, path)
    params, cfg = convert_torch_checkpoint(path, num_heads=4)
    x, t, y = inputs(cfg)
    assert rel_err(flax_forward(params, cfg, x, t, y), torch_forward(model, x, t, y)) <= 1e-5


def test_infer_config_heads_defaults_and_override() -> None:
    _, sd = make_reference(**CONFIGS["small"])
    assert infer_config(sd).num_heads == 1  # 64 is not an official width: head dim 64
    assert infer_config(sd, num_heads=8).num_heads == 8
    assert infer_config(sd).num_classes == 7 and infer_config(sd).class_dropout_prob == 0.1
    no_null = infer_config(sd, num_classes=8)
    assert no_null.num_classes == 8 and no_null.class_dropout_prob == 0.0
    with pytest.raises(QditError, match="num_classes=3"):
        infer_config(sd, num_classes=3)


@pytest.fixture(scope="module")
def fmnist() -> tuple[dict, DiTConfig, dict[str, np.ndarray]]:
    if not FMNIST_PT.is_file():
        pytest.skip(f"bundled checkpoint {FMNIST_PT} is absent (set QDIT_SHARED to the shared folder)")
    params, cfg = convert_torch_checkpoint(FMNIST_PT)
    return params, cfg, load_torch_checkpoint(FMNIST_PT)


def test_fmnist_checkpoint_config_is_inferred(fmnist) -> None:
    _, cfg, _ = fmnist
    assert cfg == DiTConfig(input_size=32, patch_size=2, in_channels=1, hidden_size=256, depth=12, num_heads=4,
                            num_classes=10, class_dropout_prob=0.1, learn_sigma=True)


def test_fmnist_checkpoint_forward_matches_pytorch(fmnist) -> None:
    params, cfg, sd = fmnist
    model = TorchDiT(input_size=32, patch_size=2, in_channels=1, hidden_size=256, depth=12, num_heads=4,
                     num_classes=10).eval()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
    x, t, y = inputs(cfg, n=2)
    y[-1] = cfg.null_label
    out = flax_forward(params, cfg, x, t, y)
    # The file stores pos_embed rounded to float16 (|err| <= 2.4e-4); the Flax model recomputes the
    # frozen table exactly, so the PyTorch model with the stored table differs by that rounding only...
    assert rel_err(out, torch_forward(model, x, t, y)) <= 1e-3
    # ...and with the exact table (all other weights as stored) the two agree to float32 precision.
    with torch.no_grad():
        model.pos_embed.copy_(torch.from_numpy(sincos_pos_embed(256, 16)).float()[None])
    assert rel_err(out, torch_forward(model, x, t, y)) <= 1e-5


# ----------------------------------------------------------------------------- bad input


def _assert_one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg and msg
    return msg


def test_truncated_and_garbage_files_are_one_line_errors(tmp_path: Path) -> None:
    _, sd = make_reference(**CONFIGS["small"])
    good = tmp_path / "good.pt"
    torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, good)
    data = good.read_bytes()
    for name, payload in (("cut.pt", data[: len(data) // 2]), ("junk.pt", b"not a checkpoint at all" * 10), ("empty.pt", b"")):
        bad = tmp_path / name
        bad.write_bytes(payload)
        with pytest.raises(QditError) as e:
            convert_torch_checkpoint(bad)
        msg = _assert_one_line(e)
        assert name in msg and "truncated or not a PyTorch checkpoint" in msg
    with pytest.raises(QditError, match="does not exist"):
        convert_torch_checkpoint(tmp_path / "missing.pt")


class _Payload:
    """Unpickling this runs code that creates ``marker`` (the attack a weights-only load must refuse)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def test_pickle_that_would_execute_code_is_refused_without_running(tmp_path: Path) -> None:
    _, sd = make_reference(**CONFIGS["small"])
    # Control: the payload is live (an unsafe load runs it), so the check below can fail.
    control = tmp_path / "control_marker"
    control_pt = tmp_path / "control.pt"
    torch.save({"x": _Payload(str(control))}, control_pt)
    torch.load(control_pt, weights_only=False)
    assert control.exists()

    marker = tmp_path / "pwned_marker"
    evil = tmp_path / "evil.pt"
    torch.save({**{k: torch.from_numpy(v) for k, v in sd.items()}, "evil": _Payload(str(marker))}, evil)
    with pytest.raises(QditError) as e:
        convert_torch_checkpoint(evil)
    msg = _assert_one_line(e)
    assert "refused" in msg and "execute" in msg and "evil.pt" in msg
    assert not marker.exists()


def test_renamed_key_lists_missing_and_unexpected(tmp_path: Path) -> None:
    _, sd = make_reference(**CONFIGS["small"])
    sd["blocks.1.mlp.fc_1.weight"] = sd.pop("blocks.1.mlp.fc1.weight")
    cfg = infer_config(sd)
    with pytest.raises(QditError) as e:
        state_dict_to_params(sd, cfg)
    msg = _assert_one_line(e)
    assert "missing keys [blocks.1.mlp.fc1.weight]" in msg and "(256, 64)" in msg
    assert "unexpected keys [blocks.1.mlp.fc_1.weight]" in msg
    sd2 = dict(sd)
    sd2["x_embed.proj.weight"] = sd2.pop("x_embedder.proj.weight")
    with pytest.raises(QditError, match="x_embedder.proj.weight"):
        infer_config(sd2)


def test_misshaped_tensor_lists_expected_shape(tmp_path: Path) -> None:
    _, sd = make_reference(**CONFIGS["small"])
    sd["blocks.0.attn.proj.weight"] = sd["blocks.0.attn.proj.weight"][:, :32]
    path = tmp_path / "bad.pt"
    torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}, path)
    with pytest.raises(QditError) as e:
        convert_torch_checkpoint(path, num_heads=4)
    msg = _assert_one_line(e)
    assert "blocks.0.attn.proj.weight (64, 32) (expected (64, 64))" in msg


def test_wrong_pos_embed_is_refused() -> None:
    _, sd = make_reference(**CONFIGS["small"])
    cfg = infer_config(sd)
    pe = sd["pos_embed"].reshape(4, 4, 64)
    sd["pos_embed"] = np.ascontiguousarray(pe.transpose(1, 0, 2)).reshape(1, 16, 64)  # rows/cols swapped
    with pytest.raises(QditError, match="not the frozen 2-D sin-cos"):
        state_dict_to_params(sd, cfg)


def test_missing_torch_says_how_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(QditError, match="pip install torch"):
        load_torch_checkpoint(tmp_path / "x.pt")


def test_non_state_dict_object_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(QditError, match="not a state_dict"):
        load_torch_checkpoint(path)
