"""diffusers ``AutoencoderKL`` checkpoints -> Flax params of ``qdit_jax.models.vae.VAEDecoder``.

Only ``decoder.*`` and ``post_quant_conv.*`` are read (the encoder is ignored). The expected keys
and shapes come from the Flax model itself, so a checkpoint that does not match its config fails
with one line naming the offending keys. Attention weights are accepted under the current names
(``to_q``, ``to_k``, ``to_v``, ``to_out.0``) and the pre-0.14 ones (``query``, ``key``, ``value``,
``proj_attn``), mapped the way diffusers' own ``_fix_state_dict_keys_on_load`` maps them.

Converted params can be kept in a single ``.npz`` (flat ``a/b/kernel`` keys plus the config JSON)
with ``save_vae`` / ``load_vae``.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
from typing import Any, Mapping

import numpy as np
from flax import traverse_util

from qdit_jax.errors import QditError
from qdit_jax.models.vae import VAEConfig, vae_param_shapes

_PREFIXES = ("decoder.", "post_quant_conv.")
_LEGACY_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_LEGACY_RE = re.compile(r"^(decoder\.mid_block\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")
_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                 "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.fp16.bin")
_CONFIG_KEY = "__vae_config_json__"


# ----------------------------------------------------------------------------- config


def vae_config_from_diffusers(d: Mapping[str, Any], dtype: str = "float32") -> VAEConfig:
    """Build a ``VAEConfig`` from a diffusers ``AutoencoderKL`` config.json dict."""
    cls = d.get("_class_name", "AutoencoderKL")
    if cls != "AutoencoderKL":
        raise QditError(f"VAE config is for {cls!r}, not 'AutoencoderKL'; point at an AutoencoderKL (e.g. sd-vae-ft-ema)")
    n = len(d.get("block_out_channels", (64,)))
    up = list(d.get("up_block_types", ["UpDecoderBlock2D"] * n))
    if up != ["UpDecoderBlock2D"] * n:
        raise QditError(f"unsupported VAE up_block_types {up}; only {n} x 'UpDecoderBlock2D' are supported")
    if d.get("act_fn", "silu") != "silu":
        raise QditError(f"unsupported VAE act_fn {d['act_fn']!r}; only 'silu' is supported")
    shift = d.get("shift_factor")
    return VAEConfig(
        block_out_channels=tuple(d.get("block_out_channels", (64,))),
        layers_per_block=int(d.get("layers_per_block", 1)),
        latent_channels=int(d.get("latent_channels", 4)),
        out_channels=int(d.get("out_channels", 3)),
        norm_num_groups=int(d.get("norm_num_groups", 32)),
        scaling_factor=float(d.get("scaling_factor", 0.18215)),
        shift_factor=0.0 if shift is None else float(shift),
        use_post_quant_conv=bool(d.get("use_post_quant_conv", True)),
        mid_block_add_attention=bool(d.get("mid_block_add_attention", True)),
        dtype=dtype,
    )


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise QditError(f"cannot read VAE config {path}: {e}; pass a diffusers AutoencoderKL config.json") from None


# ----------------------------------------------------------------------------- reading weights


def _to_numpy(t: Any) -> np.ndarray:
    """A torch tensor (any float dtype, bf16 included) -> float32 NumPy."""
    import torch

    return t.detach().to(torch.float32).cpu().numpy()


def _read_weights(path: str) -> dict[str, np.ndarray]:
    """The decoder.* and post_quant_conv.* tensors of a .safetensors or .bin file, as float32."""
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        try:
            with safe_open(path, framework="np") as f:
                keys = [k for k in f.keys() if k.startswith(_PREFIXES)]
                try:
                    return {k: np.asarray(f.get_tensor(k), np.float32) for k in keys}
                except TypeError:  # bfloat16, which NumPy cannot hold: read it through torch below
                    pass
        except Exception as e:  # safetensors raises its own SafetensorError for a bad header
            raise QditError(f"cannot read safetensors file {path}: {e}; check that the file is complete") from None
        if importlib.util.find_spec("torch") is None:
            raise QditError(f"{path} holds bfloat16 tensors; install torch to load it")
        with safe_open(path, framework="pt") as f:
            return {k: _to_numpy(f.get_tensor(k)) for k in keys}
    if path.endswith((".bin", ".pt", ".pth", ".ckpt")):
        try:
            import torch
        except ImportError:
            raise QditError(f"reading {path} needs torch; install torch or convert the file to .safetensors") from None
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many types for a bad pickle
            raise QditError(f"cannot read PyTorch file {path}: {type(e).__name__}; check that the file is complete") from None
        sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd
        if not isinstance(sd, dict):
            raise QditError(f"{path} does not hold a state_dict; save the VAE with save_pretrained or torch.save(vae.state_dict())")
        return {k: _to_numpy(v) for k, v in sd.items() if isinstance(k, str) and k.startswith(_PREFIXES)}
    raise QditError(f"unknown VAE weight file type {path!r}; expected .safetensors or .bin")


def _resolve(path: str, config: VAEConfig | Mapping[str, Any] | str | None, dtype: str) -> tuple[str, VAEConfig]:
    """(weight file, config) for a diffusers directory, a pipeline root, or a single weight file."""
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")) and os.path.isfile(os.path.join(path, "vae", "config.json")):
            path = os.path.join(path, "vae")  # a whole pipeline directory: use its vae/ subfolder
        weights = next((os.path.join(path, w) for w in _WEIGHT_FILES if os.path.isfile(os.path.join(path, w))), None)
        if weights is None:
            raise QditError(f"no diffusion_pytorch_model.safetensors or .bin in {path}; point at an AutoencoderKL directory")
        if config is None:
            config = os.path.join(path, "config.json")
    elif os.path.isfile(path):
        weights = path
        if config is None:
            beside = os.path.join(os.path.dirname(os.path.abspath(path)), "config.json")
            if not os.path.isfile(beside):
                raise QditError(f"no config for VAE weights {path}; pass config= (a VAEConfig, dict or config.json path)")
            config = beside
    else:
        raise QditError(f"VAE path {path!r} does not exist; pass a diffusers AutoencoderKL directory or weight file")
    if isinstance(config, VAEConfig):
        return weights, config.replace(dtype=dtype)
    if isinstance(config, str):
        config = _read_json(config)
    return weights, vae_config_from_diffusers(config, dtype)


# ----------------------------------------------------------------------------- conversion


def _torch_key(path: tuple[str, ...]) -> str:
    """('decoder', 'up_blocks_0', 'resnets_1', 'conv1', 'kernel') -> 'decoder.up_blocks.0.resnets.1.conv1.weight'."""
    parts = [re.sub(r"_(\d+)$", r".\1", p) for p in path[:-1]]
    return ".".join(parts + ["bias" if path[-1] == "bias" else "weight"])


def _to_flax(w: np.ndarray, ndim: int) -> np.ndarray:
    if ndim == 4:  # conv (O, I, kh, kw) -> (kh, kw, I, O)
        return np.transpose(w, (2, 3, 1, 0))
    if ndim == 2:  # linear (O, I) -> (I, O)
        return w.T
    return w


def _torch_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    if len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    if len(shape) == 2:
        return (shape[1], shape[0])
    return tuple(shape)


def _names(keys: list[str], limit: int = 4) -> str:
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def convert_vae_state_dict(state_dict: Mapping[str, Any], cfg: VAEConfig) -> Any:
    """A diffusers AutoencoderKL state_dict (NumPy or torch values) -> nested Flax params for ``cfg``.

    Strict: a missing, mis-shaped or unexpected decoder key raises a one-line ``QditError``.
    """
    sd = {k: v for k, v in state_dict.items() if k.startswith(_PREFIXES)}
    for k in list(sd):
        m = _LEGACY_RE.match(k)
        if m:
            new = f"{m.group(1)}.{_LEGACY_ATTN[m.group(2)]}.{m.group(3)}"
            if new in sd:
                raise QditError(f"VAE checkpoint holds both {k} and {new}; keep one attention naming")
            sd[new] = sd.pop(k)
    expected = traverse_util.flatten_dict(vae_param_shapes(cfg))
    flat, missing, misshaped = {}, [], []
    for path, leaf in expected.items():
        key = _torch_key(path)
        if key not in sd:
            missing.append(key)
            continue
        w = sd[key]
        w = np.asarray(w if isinstance(w, np.ndarray) else _to_numpy(w), np.float32)
        want = _torch_shape(tuple(leaf.shape))
        if tuple(w.shape) != want:
            misshaped.append(f"{key} {tuple(w.shape)} != {want}")
            continue
        flat[path] = _to_flax(w, len(want))
    unexpected = sorted(set(sd) - {_torch_key(p) for p in expected})
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} key(s): {_names(missing)}")
    if misshaped:
        problems.append(f"mis-shaped: {_names(misshaped)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} key(s): {_names(unexpected)}")
    if problems:
        raise QditError("VAE checkpoint does not match its config (" + "; ".join(problems)
                        + "); check block_out_channels / layers_per_block / norm_num_groups in config.json")
    return traverse_util.unflatten_dict(flat)


def load_diffusers_vae(path: str, config: VAEConfig | Mapping[str, Any] | str | None = None,
                       dtype: str = "float32") -> tuple[Any, VAEConfig]:
    """Load a diffusers AutoencoderKL's decoder as ``(params, VAEConfig)``.

    ``path``: a directory with config.json and diffusion_pytorch_model.{safetensors,bin} (or a
    pipeline root with a ``vae/`` subfolder), or a single weight file whose config is ``config``
    (a VAEConfig, a diffusers config dict or a config.json path) or a config.json beside it.
    ``dtype`` is the compute dtype of the returned config; params are float32.
    """
    weights, cfg = _resolve(os.fspath(path), config, dtype)
    return convert_vae_state_dict(_read_weights(weights), cfg), cfg


# ----------------------------------------------------------------------------- npz storage


def save_vae(path: str, params: Any, cfg: VAEConfig) -> None:
    """Write converted params and their config to one ``.npz`` (flat ``a/b/kernel`` keys)."""
    flat = {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}
    flat[_CONFIG_KEY] = np.asarray(cfg.to_json())
    tmp = f"{path}.tmp.npz"
    np.savez(tmp, **flat)
    os.replace(tmp, path)


def load_vae(path: str) -> tuple[Any, VAEConfig]:
    """Read ``(params, VAEConfig)`` written by ``save_vae``; shapes are checked against the config."""
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise QditError(f"cannot read VAE params {path}: {e}; write them with qdit_jax.convert.vae.save_vae") from None
    if _CONFIG_KEY not in data:
        raise QditError(f"{path} has no VAE config; write it with qdit_jax.convert.vae.save_vae")
    cfg = VAEConfig.from_json(str(data.pop(_CONFIG_KEY)))
    expected = traverse_util.flatten_dict(vae_param_shapes(cfg))
    got = {tuple(k.split("/")): v for k, v in data.items()}
    bad = sorted("/".join(p) for p in set(expected) ^ set(got))
    bad += sorted("/".join(p) for p in expected if p in got and got[p].shape != tuple(expected[p].shape))
    if bad:
        raise QditError(f"VAE params in {path} do not match their config ({_names(bad)}); re-convert the checkpoint")
    return traverse_util.unflatten_dict(got), cfg
