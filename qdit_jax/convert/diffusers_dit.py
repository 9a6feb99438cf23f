"""diffusers ``DiTTransformer2DModel`` (or legacy ``Transformer2DModel``) -> Flax DiT params, exactly.

The diffusers port stores the official weights under other names; this module renames them to
the official keys (fusing ``to_q``/``to_k``/``to_v`` into ``qkv`` in that order) and reuses the
strict official mapping in :mod:`qdit_jax.convert.torch_dit`. Two things differ from the
official model and are carried in the config so outputs match diffusers exactly:

- timesteps: ``Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=1)`` gives cos-then-sin
  of ``t * exp(-ln(10000) * i / (half - 1))`` (official: ``/ half``) -> ``freq_shift=1``;
- the LayerNorm before each MLP (``norm3``) uses the config's ``norm_eps`` (default 1e-5; the
  official 1e-6 is kept by ``norm1`` and ``norm_out``) -> ``mlp_norm_eps=norm_eps``.

diffusers gives every block its own timestep/label embedder (``norm1.emb``) but uses block 0's
for the final layer; the official architecture shares one, so all copies must be identical.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from qdit_jax.convert.torch_dit import _fmt_keys, _one_line, safe_torch_load, state_dict_to_params
from qdit_jax.errors import QditError
from qdit_jax.models.dit import DiTConfig, get_2d_sincos_pos_embed

_CLASSES = ("DiTTransformer2DModel", "Transformer2DModel")
# Constructor defaults of each class for the fields a config.json may leave out.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "DiTTransformer2DModel": dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=None,
                                  num_layers=28, sample_size=32, patch_size=2, activation_fn="gelu-approximate",
                                  num_embeds_ada_norm=1000, norm_type="ada_norm_zero", norm_elementwise_affine=False,
                                  norm_eps=1e-5, attention_bias=True),
    "Transformer2DModel": dict(num_attention_heads=16, attention_head_dim=88, in_channels=None, out_channels=None,
                               num_layers=1, sample_size=None, patch_size=None, activation_fn="geglu",
                               num_embeds_ada_norm=None, norm_type="layer_norm", norm_elementwise_affine=True,
                               norm_eps=1e-5, attention_bias=False),
}
_WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                 "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin")
_EMB = "norm1.emb."


def config_from_diffusers(dconf: Mapping[str, Any], source: str = "config") -> DiTConfig:
    """DiTConfig for a diffusers DiT config (``config.json`` contents); refuses non-DiT variants."""
    cls = dconf.get("_class_name", "DiTTransformer2DModel")
    if cls not in _CLASSES:
        raise QditError(f"{source} describes a {cls}, not a DiT; expected one of {list(_CLASSES)}")
    c = {**_DEFAULTS[cls], **{k: v for k, v in dconf.items() if not k.startswith("_")}}
    need = {"norm_type": "ada_norm_zero", "activation_fn": "gelu-approximate", "norm_elementwise_affine": False,
            "attention_bias": True}
    bad = [f"{k}={c.get(k)!r} (DiT needs {v!r})" for k, v in need.items() if c.get(k) != v]
    for k in ("cross_attention_dim", "num_vector_embeds", "caption_channels"):
        if c.get(k) is not None:
            bad.append(f"{k}={c[k]!r} (DiT has none)")
    if c.get("patch_size") is None or c.get("sample_size") is None or c.get("num_embeds_ada_norm") is None:
        bad.append("patch_size, sample_size and num_embeds_ada_norm must be set")
    if cls == "Transformer2DModel" and not bad:  # its PatchEmbed rescales positions for large samples
        scale = c.get("interpolation_scale") or max(int(c["sample_size"]) // 64, 1)
        if scale != 1:
            bad.append(f"interpolation_scale {scale} (DiT positions need 1)")
    if bad:
        raise QditError(f"{source} is not a DiT config this converter supports: {'; '.join(bad)}")
    cin = int(c["in_channels"])
    cout = cin if c.get("out_channels") is None else int(c["out_channels"])
    if cout not in (cin, 2 * cin):
        raise QditError(f"{source}: out_channels {cout} must equal in_channels {cin} or twice it (learned sigma)")
    try:
        return DiTConfig(input_size=int(c["sample_size"]), patch_size=int(c["patch_size"]), in_channels=cin,
                         hidden_size=int(c["num_attention_heads"]) * int(c["attention_head_dim"]),
                         depth=int(c["num_layers"]), num_heads=int(c["num_attention_heads"]), mlp_ratio=4.0,
                         class_dropout_prob=0.1, num_classes=int(c["num_embeds_ada_norm"]), learn_sigma=cout == 2 * cin,
                         freq_shift=1.0, mlp_norm_eps=float(c["norm_eps"]))
    except ValueError as e:
        raise QditError(f"{source} gives an invalid DiT config: {_one_line(e)}") from None


def _rename(key: str) -> str | None:
    """diffusers key -> official key; None for per-block embedder copies (checked separately)."""
    fixed = {
        "pos_embed.proj.weight": "x_embedder.proj.weight", "pos_embed.proj.bias": "x_embedder.proj.bias",
        "pos_embed.pos_embed": "pos_embed",
        "proj_out_1.weight": "final_layer.adaLN_modulation.1.weight", "proj_out_1.bias": "final_layer.adaLN_modulation.1.bias",
        "proj_out_2.weight": "final_layer.linear.weight", "proj_out_2.bias": "final_layer.linear.bias",
        "transformer_blocks.0.norm1.emb.timestep_embedder.linear_1.weight": "t_embedder.mlp.0.weight",
        "transformer_blocks.0.norm1.emb.timestep_embedder.linear_1.bias": "t_embedder.mlp.0.bias",
        "transformer_blocks.0.norm1.emb.timestep_embedder.linear_2.weight": "t_embedder.mlp.2.weight",
        "transformer_blocks.0.norm1.emb.timestep_embedder.linear_2.bias": "t_embedder.mlp.2.bias",
        "transformer_blocks.0.norm1.emb.class_embedder.embedding_table.weight": "y_embedder.embedding_table.weight",
    }
    if key in fixed:
        return fixed[key]
    m = re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)\.(weight|bias)", key)
    if not m:
        return key  # left as is: the strict mapping reports it as unexpected
    i, mod, kind = m.groups()
    if mod.startswith(_EMB[:-1]):
        return None if i != "0" else key  # block 0's known embedder keys were renamed above
    sub = {"norm1.linear": "adaLN_modulation.1", "attn1.to_out.0": "attn.proj", "ff.net.0.proj": "mlp.fc1",
           "ff.net.2": "mlp.fc2", "attn1.to_q": "attn.q", "attn1.to_k": "attn.k", "attn1.to_v": "attn.v"}
    return f"blocks.{i}.{sub[mod]}.{kind}" if mod in sub else key


def diffusers_to_official(sd: Mapping[str, np.ndarray], cfg: DiTConfig, source: str = "state_dict") -> dict[str, np.ndarray]:
    """Rename a diffusers DiT state_dict to official keys (q, k, v fused into qkv; pos_embed added)."""
    out: dict[str, np.ndarray] = {}
    emb0 = {k[len("transformer_blocks.0."):]: v for k, v in sd.items() if k.startswith("transformer_blocks.0." + _EMB)}
    differing = []
    for key, value in sd.items():
        new = _rename(key)
        if new is None:
            rest = key.split(".", 2)[2]
            if rest not in emb0 or np.shape(emb0[rest]) != np.shape(value) or not np.array_equal(emb0[rest], value):
                differing.append(key)
            continue
        out[new] = np.asarray(value, np.float32)
    if differing:
        raise QditError(f"{source}: per-block timestep/class embedders differ from block 0's ({_fmt_keys(differing)}); "
                        "the official DiT shares one embedder, so this model cannot be converted exactly")
    for i in range(cfg.depth):
        parts = [f"blocks.{i}.attn.{n}.{kind}" for kind in ("weight", "bias") for n in "qkv"]
        if all(p in out for p in parts):
            for kind in ("weight", "bias"):
                qkv = [out.pop(f"blocks.{i}.attn.{n}.{kind}") for n in "qkv"]
                out[f"blocks.{i}.attn.qkv.{kind}"] = np.concatenate(qkv, axis=0)  # rows: q, then k, then v
    out.setdefault("pos_embed", get_2d_sincos_pos_embed(cfg.hidden_size, cfg.input_size // cfg.patch_size)[None]
                   .astype(np.float32))
    return out


def _load_safetensors(path: str) -> dict[str, np.ndarray]:
    try:
        from safetensors import safe_open
    except ImportError as e:  # pragma: no cover - safetensors is a test dependency
        raise QditError("reading .safetensors needs safetensors: pip install safetensors") from e
    try:
        try:
            import torch  # bfloat16 tensors have no NumPy form in safetensors' numpy backend
        except ImportError:
            torch = None
        out = {}
        with safe_open(path, framework="pt" if torch is not None else "np") as f:
            for k in f.keys():
                t = f.get_tensor(k)
                out[k] = t.float().numpy() if torch is not None else np.asarray(t, np.float32)
        return out
    except Exception as e:  # safetensors raises its own error types for bad headers/truncation
        raise QditError(f"{path!r} is truncated or not a safetensors file ({_one_line(e)[:160]}); re-download it") from None


def _load_weights(path: str) -> dict[str, np.ndarray]:
    if path.endswith(".safetensors.index.json") or path.endswith(".bin.index.json"):
        with open(path) as f:
            shards = sorted(set(json.load(f).get("weight_map", {}).values()))
        out: dict[str, np.ndarray] = {}
        for shard in shards:
            out.update(_load_weights(os.path.join(os.path.dirname(path), shard)))
        return out
    if path.endswith(".safetensors"):
        return _load_safetensors(path)
    obj = safe_torch_load(path)
    if not isinstance(obj, Mapping):
        raise QditError(f"{path!r} holds a {type(obj).__name__}, not a state_dict")
    bad = [str(k) for k, v in obj.items() if not hasattr(v, "is_floating_point") or not v.is_floating_point()]
    if bad:
        raise QditError(f"{path!r} holds non-float or non-tensor entries ({_fmt_keys(bad)}); expected a diffusers state_dict")
    return {str(k): v.float().numpy() for k, v in obj.items()}


def _resolve(path: str) -> tuple[str, str]:
    """(weights file, config.json) of a diffusers model directory or pipeline directory."""
    if os.path.isfile(os.path.join(path, "model_index.json")) and os.path.isdir(os.path.join(path, "transformer")):
        path = os.path.join(path, "transformer")
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        raise QditError(f"{path!r} has no config.json; pass a diffusers DiT model directory (or a weights file and config)")
    for name in _WEIGHT_NAMES + tuple(n + ".index.json" for n in _WEIGHT_NAMES[::2]):
        if os.path.isfile(os.path.join(path, name)):
            return os.path.join(path, name), config
    raise QditError(f"{path!r} has no diffusion_pytorch_model.safetensors or .bin; download the model's weights too")


def load_diffusers_dit(path: str | os.PathLike[str], config: str | os.PathLike[str] | Mapping[str, Any] | None = None
                       ) -> tuple[dict[str, np.ndarray], DiTConfig, dict[str, Any]]:
    """(official-format state_dict, DiTConfig, diffusers config) from a directory or a file plus config."""
    path = os.fspath(path)
    if os.path.isdir(path):
        weights, conf_path = _resolve(path)
        config = conf_path if config is None else config
    elif os.path.isfile(path):
        weights = path
        if config is None:
            config = os.path.join(os.path.dirname(path), "config.json")
    else:
        raise QditError(f"{path!r} does not exist; pass a diffusers DiT directory or weights file")
    if isinstance(config, Mapping):
        dconf, source = dict(config), "the given diffusers config"
    else:
        source = os.fspath(config)
        try:
            with open(source) as f:
                dconf = json.load(f)
        except FileNotFoundError:
            raise QditError(f"no diffusers config at {source!r}; pass config= (config.json path or dict)") from None
        except json.JSONDecodeError as e:
            raise QditError(f"{source!r} is not valid JSON ({e}); re-download config.json") from None
    cfg = config_from_diffusers(dconf, source)
    sd = diffusers_to_official(_load_weights(weights), cfg, repr(weights))
    return sd, cfg, dconf


def convert_diffusers_dit(path: str | os.PathLike[str], config: str | os.PathLike[str] | Mapping[str, Any] | None = None
                          ) -> tuple[dict[str, Any], DiTConfig]:
    """diffusers DiT directory (or weights file + config) -> (Flax params, DiTConfig)."""
    sd, cfg, _ = load_diffusers_dit(path, config)
    return state_dict_to_params(sd, cfg, source=repr(os.fspath(path))), cfg
