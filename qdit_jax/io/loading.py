"""One entry point for every command that needs a model: a checkpoint dir, a .pt, or the bundled one.

``load_model(None)`` gives the bundled trained Fashion-MNIST DiT, so every command works on a
fresh machine with no download and without torch.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import numpy as np

from qdit_jax.errors import QditError
from qdit_jax.models.dit import DiTConfig

BUNDLED_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "dit_fmnist")


@dataclasses.dataclass
class LoadedModel:
    """Params (float32 or quantized tree), the model config and JSON metadata (``sampling`` etc.)."""

    params: Any
    config: DiTConfig
    meta: dict[str, Any]

    @property
    def sampling_defaults(self) -> dict[str, Any]:
        return dict(self.meta.get("sampling", {}))

    @property
    def quantization(self) -> dict[str, Any] | None:
        return self.meta.get("quantization")


def sampling_defaults_for(cfg: DiTConfig) -> dict[str, Any]:
    """Latent (4-channel, official) models: no clipping, guidance on 3 channels as DiT does.
    Pixel-space models: clip x0 to [-1, 1] each step, guide every eps channel."""
    if cfg.in_channels == 4:
        return {"clip_denoised": False, "guidance_channels": 3, "latent": True}
    return {"clip_denoised": True, "guidance_channels": None, "latent": False}


def flatten(tree: Any, sep: str = "/") -> dict[str, np.ndarray]:
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        out[sep.join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)] = np.asarray(leaf)
    return out


def unflatten(flat: dict[str, np.ndarray], sep: str = "/") -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        node = tree
        parts = key.split(sep)
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return tree


def save_bundled(params: Any, cfg: DiTConfig, meta: dict[str, Any], directory: str = BUNDLED_DIR) -> None:
    """Write params as float16 .npz plus config.json (the bundled model's format)."""
    os.makedirs(directory, exist_ok=True)
    flat = {k: v.astype(np.float16) for k, v in flatten(params).items()}
    np.savez(os.path.join(directory, "params.npz"), **flat)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump({"model": cfg.to_dict(), **meta}, f, indent=2, sort_keys=True)


def load_bundled(directory: str = BUNDLED_DIR) -> LoadedModel:
    try:
        with open(os.path.join(directory, "config.json")) as f:
            meta = json.load(f)
        with np.load(os.path.join(directory, "params.npz"), allow_pickle=False) as z:
            flat = {k: z[k].astype(np.float32) for k in z.files}
    except FileNotFoundError as e:
        raise QditError(f"the bundled model is missing ({e.filename}); reinstall qdit_jax") from None
    cfg = DiTConfig.from_dict(meta.pop("model"))
    meta.setdefault("source", "bundled Fashion-MNIST DiT")
    return LoadedModel(unflatten(flat), cfg, meta)


def load_model(ckpt: str | None) -> LoadedModel:
    """``None``: the bundled model; a directory: a ``qdit convert``/``qdit quantize`` checkpoint;
    a ``.pt`` file: converted on the fly (needs torch)."""
    if ckpt is None:
        return load_bundled()
    if not os.path.exists(ckpt):
        raise QditError(f"checkpoint {ckpt} does not exist")
    if os.path.isdir(ckpt):
        from qdit_jax.io.checkpoint import load_checkpoint

        params, cfg, extra = load_checkpoint(ckpt)
        meta = dict(extra or {})
        meta.setdefault("sampling", sampling_defaults_for(cfg))
        meta.setdefault("source", ckpt)
        return LoadedModel(params, cfg, meta)
    if ckpt.endswith((".pt", ".pth", ".bin", ".ckpt")):
        from qdit_jax.convert.torch_dit import convert_torch_checkpoint

        params, cfg = convert_torch_checkpoint(ckpt)
        return LoadedModel(params, cfg, {"sampling": sampling_defaults_for(cfg), "source": ckpt})
    raise QditError(f"{ckpt} is neither a checkpoint directory nor a .pt file; run `qdit convert` on it first")
