"""Official PyTorch DiT checkpoints (facebookresearch/DiT ``.pt``) -> Flax params, exactly.

The released checkpoints are flat ``state_dict``s; training checkpoints hold ``model``/``ema``
(the EMA weights are preferred). Files are read with ``torch.load(weights_only=True)``, so a
pickle that would run code is refused without being executed. torch is imported lazily: it is
needed only here, never by the rest of the library.

The mapping is strict: a missing, unexpected or mis-shaped tensor is an error that lists the
offending keys, and the stored ``pos_embed`` must be the frozen sin-cos table the Flax model
recomputes. Params come back as float32 NumPy arrays (the caller decides device and sharding).
"""
from __future__ import annotations

import argparse
import os
import pickle
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from qdit_jax.errors import QditError
from qdit_jax.models.dit import DiTConfig, get_2d_sincos_pos_embed

# Official widths -> head counts (S, B, L, XL); heads cannot be read from tensor shapes.
OFFICIAL_HEADS: dict[int, int] = {384: 6, 768: 12, 1024: 16, 1152: 16}
# Largest |stored - exact| accepted for pos_embed: rounding of values in [-1, 1] is <= 2**-11 in float16
# and <= 2**-8 in bfloat16; a wrong table (other grid, width or layout) is off by O(1).
_POS_EMBED_ATOL = 5e-3
_WRAPPERS = ("ema", "model", "state_dict", "module", "net")  # training-checkpoint entries, in order of preference
_PREFIXES = ("module.", "_orig_mod.")  # DDP and torch.compile wrappers


def _import_torch() -> Any:
    try:
        import torch
    except ImportError as e:  # pragma: no cover - exercised only without torch
        raise QditError("reading PyTorch checkpoints needs torch: pip install torch (or pip install 'qdit_jax[torch]')") from e
    return torch


def _fmt_keys(keys: Any, limit: int = 5) -> str:
    keys = list(keys)
    shown = ", ".join(str(k) for k in keys[:limit])
    return shown + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _first_sentence(text: str, limit: int = 160) -> str:
    """The first sentence of a (possibly long) library error message, for one-line errors."""
    head = re.split(r"(?<=[a-z)])\. ", text, maxsplit=1)[0]
    return head[:limit] if len(head) > 12 else text[:limit]


def safe_torch_load(path: str | os.PathLike[str]) -> Any:
    """``torch.load(path, weights_only=True)`` with one-line QditErrors for refused or broken files.

    ``argparse.Namespace`` (the ``args`` entry of official training checkpoints) is the one
    non-tensor class allowed besides torch's own safe set.
    """
    torch = _import_torch()
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise QditError(f"checkpoint file {path!r} does not exist (or is not a file); pass the path of a DiT .pt file")
    try:
        if hasattr(torch.serialization, "safe_globals"):
            with torch.serialization.safe_globals([argparse.Namespace]):
                return torch.load(path, map_location="cpu", weights_only=True)
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        msg = _one_line(e)
        if re.search(r"Unsupported global|not an allowed global|GLOBAL [\w.]+|Trying to (call|instantiate)|Unsupported class", msg):
            what = re.search(r"(Unsupported global: [^.]*|GLOBAL [\w.]+|[\w.]+ was not an allowed global)", msg)
            detail = f" ({what.group(1).strip()})" if what else ""
            raise QditError(
                f"refused to load {path!r}: its pickle would import or call code{detail}, which could execute "
                "arbitrary commands; it was not executed. Re-save a plain state_dict (torch.save(model.state_dict(), ...)) "
                "from a trusted environment"
            ) from None
        msg = msg.split("WeightsUnpickler error:", 1)[-1].split(" Check the documentation")[0].strip()
        raise QditError(f"{path!r} is truncated or not a PyTorch checkpoint ({_first_sentence(msg)}); "
                        "re-download or re-save it") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError, AttributeError) as e:
        msg = _first_sentence(_one_line(e))
        raise QditError(f"{path!r} is truncated or not a PyTorch checkpoint ({type(e).__name__}: {msg}); re-download or re-save it") from None


def _extract_state_dict(obj: Any, path: str) -> Mapping[str, Any]:
    """The tensor mapping inside a loaded object: flat state_dict, or a training checkpoint's ``ema``."""
    torch = _import_torch()
    if not isinstance(obj, Mapping):
        raise QditError(f"{path!r} holds a {type(obj).__name__}, not a state_dict; save model.state_dict() instead")
    if not any(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in _WRAPPERS:
            if isinstance(obj.get(key), Mapping):
                return _extract_state_dict(obj[key], path)
        raise QditError(f"{path!r} holds no tensors and no 'ema'/'model'/'state_dict' entry (keys: {_fmt_keys(obj)}); "
                        "expected a DiT state_dict")
    return obj


def load_torch_checkpoint(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Read an official DiT ``.pt`` into ``{key: float32 ndarray}`` (EMA preferred, wrappers stripped)."""
    torch = _import_torch()
    path = os.fspath(path)
    sd = _extract_state_dict(safe_torch_load(path), path)
    out: dict[str, np.ndarray] = {}
    for key, value in sd.items():
        name = str(key)
        for prefix in _PREFIXES:
            while name.startswith(prefix):
                name = name[len(prefix):]
        if not isinstance(value, torch.Tensor):
            raise QditError(f"entry {key!r} of {path!r} is a {type(value).__name__}, not a tensor; expected a flat state_dict")
        if not value.is_floating_point():
            raise QditError(f"tensor {key!r} of {path!r} has dtype {value.dtype}; DiT weights must be float32, float16 or bfloat16")
        if name in out:
            raise QditError(f"{path!r} holds {name!r} twice (with and without a 'module.' prefix); keep one copy")
        out[name] = value.detach().to(torch.float32).contiguous().numpy()
    return out


def _require(sd: Mapping[str, np.ndarray], key: str, ndim: int) -> tuple[int, ...]:
    if key not in sd:
        raise QditError(f"cannot infer the DiT config: key {key!r} is missing, so this is not an official DiT state_dict "
                        f"(it has {_fmt_keys(sorted(sd))})")
    shape = tuple(np.shape(sd[key]))
    if len(shape) != ndim:
        raise QditError(f"cannot infer the DiT config: {key!r} has shape {shape}, expected {ndim} dimensions")
    return shape


def default_num_heads(hidden_size: int) -> int:
    """The official head count for the official widths, else head dim 64."""
    if hidden_size in OFFICIAL_HEADS:
        return OFFICIAL_HEADS[hidden_size]
    if hidden_size % 64:
        raise QditError(f"hidden size {hidden_size} is not an official DiT width and not a multiple of 64; pass num_heads")
    return hidden_size // 64


def infer_config(state_dict: Mapping[str, np.ndarray], num_heads: int | None = None,
                 num_classes: int | None = None) -> DiTConfig:
    """DiTConfig from tensor shapes. Heads default to the official count (override ``num_heads``).

    The label table has ``num_classes + 1`` rows when trained with class dropout (the official
    recipe); ``num_classes`` may be given to say otherwise (equal to the row count: no null row).
    """
    hidden, cin, ph, pw = _require(state_dict, "x_embedder.proj.weight", 4)
    if ph != pw:
        raise QditError(f"x_embedder.proj.weight has a non-square patch {ph}x{pw}; DiT uses square patches")
    _, tokens, pdim = _require(state_dict, "pos_embed", 3)
    grid = int(round(tokens**0.5))
    if grid * grid != tokens or pdim != hidden:
        raise QditError(f"pos_embed has shape {np.shape(state_dict['pos_embed'])}; expected (1, grid*grid, {hidden})")
    rows, _ = _require(state_dict, "y_embedder.embedding_table.weight", 2)
    if num_classes is None:
        num_classes, dropout = rows - 1, 0.1
    elif num_classes == rows:
        dropout = 0.0
    elif num_classes == rows - 1:
        dropout = 0.1
    else:
        raise QditError(f"num_classes={num_classes} does not fit a label table of {rows} rows; use {rows - 1} or {rows}")
    out_feats, _ = _require(state_dict, "final_layer.linear.weight", 2)
    out_ch, rem = divmod(out_feats, ph * ph)
    if rem or out_ch not in (cin, 2 * cin):
        raise QditError(f"final_layer.linear has {out_feats} outputs; expected patch^2 * {cin} or patch^2 * {2 * cin} channels")
    fc1, _ = _require(state_dict, "blocks.0.mlp.fc1.weight", 2)
    depth = 1 + max(int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k)))
    heads = default_num_heads(hidden) if num_heads is None else int(num_heads)
    try:
        return DiTConfig(input_size=grid * ph, patch_size=ph, in_channels=cin, hidden_size=hidden, depth=depth,
                         num_heads=heads, mlp_ratio=fc1 / hidden, class_dropout_prob=dropout,
                         num_classes=num_classes, learn_sigma=out_ch == 2 * cin)
    except ValueError as e:
        raise QditError(f"checkpoint shapes give an invalid DiT config: {_one_line(e)}") from None


def _module_map(cfg: DiTConfig) -> dict[str, tuple[str, ...]]:
    """Official module prefix -> Flax module path (each owns a ``weight``/``bias`` pair)."""
    m: dict[str, tuple[str, ...]] = {
        "x_embedder.proj": ("x_embedder",),
        "t_embedder.mlp.0": ("t_embedder", "mlp_0"),
        "t_embedder.mlp.2": ("t_embedder", "mlp_2"),
        "final_layer.linear": ("final_layer", "linear"),
        "final_layer.adaLN_modulation.1": ("final_layer", "adaLN_modulation"),
    }
    for i in range(cfg.depth):
        b = f"blocks_{i}"
        m[f"blocks.{i}.attn.qkv"] = (b, "attn", "qkv")
        m[f"blocks.{i}.attn.proj"] = (b, "attn", "proj")
        m[f"blocks.{i}.mlp.fc1"] = (b, "mlp", "fc1")
        m[f"blocks.{i}.mlp.fc2"] = (b, "mlp", "fc2")
        m[f"blocks.{i}.adaLN_modulation.1"] = (b, "adaLN_modulation")
    return m


def key_table(cfg: DiTConfig) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
    """Official key -> (Flax param path, expected torch shape); ``pos_embed`` maps to the empty path.

    Shapes are written out from the config (tracing the Flax model for them costs seconds at
    XL size); the tests check that the resulting tree equals ``param_shapes(cfg)``.
    """
    d, p, f = cfg.hidden_size, cfg.patch_size, cfg.mlp_hidden
    rows = cfg.num_classes + int(cfg.class_dropout_prob > 0)
    weights = {"x_embedder.proj": (d, cfg.in_channels, p, p), "t_embedder.mlp.0": (d, 256), "t_embedder.mlp.2": (d, d),
               "final_layer.linear": (p * p * cfg.out_channels, d), "final_layer.adaLN_modulation.1": (2 * d, d)}
    for i in range(cfg.depth):
        weights.update({f"blocks.{i}.attn.qkv": (3 * d, d), f"blocks.{i}.attn.proj": (d, d),
                        f"blocks.{i}.mlp.fc1": (f, d), f"blocks.{i}.mlp.fc2": (d, f),
                        f"blocks.{i}.adaLN_modulation.1": (6 * d, d)})
    table: dict[str, tuple[tuple[str, ...], tuple[int, ...]]] = {"pos_embed": ((), (1, cfg.num_patches, d))}
    for prefix, mod in _module_map(cfg).items():
        table[prefix + ".weight"] = (mod + ("kernel",), weights[prefix])
        table[prefix + ".bias"] = (mod + ("bias",), weights[prefix][:1])
    table["y_embedder.embedding_table.weight"] = (("y_embedder", "embedding_table"), (rows, d))
    return table


def check_pos_embed(pos_embed: np.ndarray, cfg: DiTConfig, source: str = "checkpoint") -> None:
    """The stored pos_embed must be the frozen 2-D sin-cos table (up to float16 rounding)."""
    grid = cfg.input_size // cfg.patch_size
    exact = get_2d_sincos_pos_embed(cfg.hidden_size, grid)
    err = float(np.max(np.abs(np.asarray(pos_embed, np.float64).reshape(exact.shape) - exact)))
    if not err <= _POS_EMBED_ATOL:
        raise QditError(f"pos_embed of {source} is not the frozen 2-D sin-cos embedding for a {grid}x{grid} grid of width "
                        f"{cfg.hidden_size} (max |diff| {err:.3g}); only the official fixed embedding is supported")


def state_dict_to_params(sd: Mapping[str, np.ndarray], cfg: DiTConfig, source: str = "state_dict") -> dict[str, Any]:
    """Strictly map an official-format state_dict onto the Flax param tree of ``DiT(cfg)``."""
    table = key_table(cfg)
    missing = [k for k in table if k not in sd]
    unexpected = [k for k in sd if k not in table]
    wrong = [f"{k} {tuple(np.shape(sd[k]))} (expected {table[k][1]})"
             for k in table if k in sd and tuple(np.shape(sd[k])) != table[k][1]]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing keys [{_fmt_keys(missing)}] with shapes [{_fmt_keys(str(table[k][1]) for k in missing)}]")
        if unexpected:
            parts.append(f"unexpected keys [{_fmt_keys(unexpected)}]")
        if wrong:
            parts.append(f"wrong shapes [{_fmt_keys(wrong)}]")
        raise QditError(f"{source} does not match DiT(depth={cfg.depth}, hidden={cfg.hidden_size}, "
                        f"patch={cfg.patch_size}, in={cfg.in_channels}): " + "; ".join(parts)
                        + "; fix the checkpoint or the config")
    check_pos_embed(sd["pos_embed"], cfg, source)
    params: dict[str, Any] = {}
    for key, (path, _) in table.items():
        if not path:
            continue
        value = np.asarray(sd[key], np.float32)
        if path[-1] == "kernel":
            value = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value.T
        node = params
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = np.ascontiguousarray(value)
    return params


def convert_torch_checkpoint(path: str | os.PathLike[str], num_heads: int | None = None,
                             num_classes: int | None = None) -> tuple[dict[str, Any], DiTConfig]:
    """Official DiT ``.pt`` -> (Flax params, inferred DiTConfig)."""
    sd = load_torch_checkpoint(path)
    cfg = infer_config(sd, num_heads=num_heads, num_classes=num_classes)
    return state_dict_to_params(sd, cfg, source=repr(os.fspath(path))), cfg
