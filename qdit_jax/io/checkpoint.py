"""qdit checkpoints: an Orbax PyTree of params plus ``config.json``, written atomically.

Layout of a checkpoint directory::

    config.json   format tag and version, model config, params layout, array manifest, ``extra``
    params/       Orbax PyTree checkpoint (nested dicts of arrays of any dtype)

A save writes everything into a hidden temporary sibling and renames it into place at the end,
so an interrupted save never leaves a directory that loads. ``layout="dit"`` (the default)
means the tree is the float param tree of ``DiT(config)`` and is checked against it on save and
load; any other layout (e.g. quantized codes and scales) is stored as is and checked only
against its own manifest. Arrays come back as NumPy arrays with their saved dtypes.
"""
from __future__ import annotations

import functools
import json
import os
import re
import shutil
import uuid
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qdit_jax.errors import QditError
from qdit_jax.models.dit import DiTConfig, param_shapes

FORMAT = "qdit_jax-checkpoint"
FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
PARAMS_NAME = "params"
_TMP = re.compile(r"^\..+\.(tmp|old)-[0-9a-f]+$")


def _flatten(tree: Any, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], np.ndarray]:
    """Nested mappings with string keys -> {path: ndarray}; anything else is refused."""
    if isinstance(tree, Mapping):
        out: dict[tuple[str, ...], np.ndarray] = {}
        for k, v in tree.items():
            if not isinstance(k, str):
                raise QditError(f"params key {k!r} at {'/'.join(prefix) or '<root>'} is not a string; use nested dicts with str keys")
            out.update(_flatten(v, prefix + (k,)))
        return out
    arr = np.asarray(tree)
    if arr.dtype.kind not in "biufV" or arr.dtype.fields is not None or arr.dtype.name.startswith("void"):
        raise QditError(f"params leaf {'/'.join(prefix)} has dtype {arr.dtype}; only numeric arrays can be saved")
    return {prefix: arr}


def _unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return tree


def _fmt(items: list[str], limit: int = 5) -> str:
    return ", ".join(items[:limit]) + (f" (+{len(items) - limit} more)" if len(items) > limit else "")


@functools.lru_cache(maxsize=8)
def _expected_shapes(cfg: DiTConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    return {tuple(getattr(k, "key", k) for k in path): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_flatten_with_path(param_shapes(cfg))[0]}


def _check_against_config(manifest: Mapping[tuple[str, ...], tuple[str, tuple[int, ...]]], cfg: DiTConfig,
                          where: str) -> None:
    """The tree of a ``layout="dit"`` checkpoint must be exactly DiT(cfg)'s float param tree."""
    expected = _expected_shapes(cfg)
    bad = [f"{'/'.join(p)} missing (expected {s})" for p, s in expected.items() if p not in manifest]
    bad += [f"{'/'.join(p)} unexpected" for p in manifest if p not in expected]
    bad += [f"{'/'.join(p)} {tuple(manifest[p][1])} (expected {s})" for p, s in expected.items()
            if p in manifest and tuple(manifest[p][1]) != s]
    bad += [f"{'/'.join(p)} dtype {manifest[p][0]} (expected a float dtype)" for p in expected
            if p in manifest and not jnp.issubdtype(jnp.dtype(manifest[p][0]), jnp.floating)]
    if bad:
        raise QditError(f"{where} do not match the model config (depth {cfg.depth}, hidden {cfg.hidden_size}): "
                        f"{_fmt(bad)}; re-convert the checkpoint or fix config.json")


def _import_orbax() -> Any:
    import orbax.checkpoint as ocp  # imported lazily: it is slow to import and only needed here

    return ocp


def _write(tmp: str, flat: dict[tuple[str, ...], np.ndarray], meta: dict[str, Any]) -> None:
    """Params first, config.json last: a directory without config.json never loads."""
    ocp = _import_orbax()
    ckptr = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
    ckptr.save(os.path.join(tmp, PARAMS_NAME), args=ocp.args.PyTreeSave(_unflatten(flat)))
    with open(os.path.join(tmp, CONFIG_NAME), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def _cleanup(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _is_checkpoint_dir(path: str) -> bool:
    try:
        with open(os.path.join(path, CONFIG_NAME)) as f:
            return json.load(f).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def save_checkpoint(directory: str | os.PathLike[str], params: Any, model_config: DiTConfig,
                    extra: dict[str, Any] | None = None, *, overwrite: bool = False, layout: str = "dit") -> str:
    """Write ``params`` and ``model_config`` (plus JSON ``extra``) to ``directory`` atomically.

    Refuses an existing directory unless ``overwrite=True`` (and then only an existing qdit
    checkpoint or an empty directory). Returns the absolute path written.
    """
    directory = os.path.abspath(os.fspath(directory))
    if not isinstance(model_config, DiTConfig):
        raise QditError(f"model_config must be a DiTConfig, got {type(model_config).__name__}")
    try:
        extra_json = json.loads(json.dumps(extra or {}))
    except (TypeError, ValueError) as e:
        raise QditError(f"extra metadata is not JSON-serialisable ({e}); pass plain dicts, lists, str and numbers") from None
    if os.path.lexists(directory):
        if not overwrite:
            raise QditError(f"{directory} already exists; pass overwrite=True (--overwrite) or choose another directory")
        if not os.path.isdir(directory) or (os.listdir(directory) and not _is_checkpoint_dir(directory)):
            raise QditError(f"{directory} exists and is not a qdit checkpoint; refusing to replace it, choose another directory")
    flat = _flatten(params)
    if not flat:
        raise QditError("params tree is empty; nothing to save")
    manifest = {p: (a.dtype.name, tuple(a.shape)) for p, a in flat.items()}
    if layout == "dit":
        _check_against_config(manifest, model_config, "the params being saved")
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "layout": layout,
        "model_config": model_config.to_dict(), "extra": extra_json,
        "arrays": [{"path": list(p), "dtype": d, "shape": list(s)} for p, (d, s) in manifest.items()],
    }
    parent, name = os.path.split(directory)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{name}.tmp-{uuid.uuid4().hex[:12]}")
    try:
        os.mkdir(tmp)
        _write(tmp, flat, meta)
        if os.path.lexists(directory):  # overwrite: move the old one aside, then swap in the new one
            old = os.path.join(parent, f".{name}.old-{uuid.uuid4().hex[:12]}")
            os.rename(directory, old)
            os.rename(tmp, directory)
            _cleanup(old)
        else:
            os.rename(tmp, directory)
    except BaseException:
        _cleanup(tmp)
        raise
    return directory


def read_checkpoint_meta(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed ``config.json`` of a checkpoint (no arrays read), after format checks."""
    directory = os.fspath(directory)
    if not os.path.exists(directory):
        raise QditError(f"checkpoint directory {directory} does not exist; check the path or run qdit convert first")
    if not os.path.isdir(directory):
        raise QditError(f"{directory} is a file, not a checkpoint directory; pass the directory written by qdit convert")
    cfg_path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(cfg_path):
        if _TMP.match(os.path.basename(os.path.normpath(directory))) or os.path.isdir(os.path.join(directory, PARAMS_NAME)):
            raise QditError(f"{directory} is a half-written checkpoint (an interrupted save); delete it and save again")
        raise QditError(f"{directory} has no {CONFIG_NAME}: not a qdit checkpoint; run qdit convert first")
    try:
        with open(cfg_path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise QditError(f"{cfg_path} is unreadable or half-written ({e}); delete the checkpoint and save it again") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise QditError(f"{cfg_path} is not a qdit checkpoint config: not a qdit checkpoint; run qdit convert first")
    if int(meta.get("format_version", -1)) > FORMAT_VERSION:
        raise QditError(f"{directory} has format version {meta.get('format_version')}, newer than this qdit_jax "
                        f"reads ({FORMAT_VERSION}); upgrade qdit_jax")
    return meta


def load_checkpoint(directory: str | os.PathLike[str]) -> tuple[Any, DiTConfig, dict[str, Any]]:
    """Read a checkpoint written by :func:`save_checkpoint`: ``(params, DiTConfig, extra)``."""
    directory = os.fspath(directory)
    meta = read_checkpoint_meta(directory)
    try:
        cfg = DiTConfig.from_dict(meta["model_config"])
        manifest = {tuple(a["path"]): (str(a["dtype"]), tuple(int(s) for s in a["shape"])) for a in meta["arrays"]}
    except (KeyError, TypeError, ValueError) as e:
        raise QditError(f"{directory}/{CONFIG_NAME} has a bad model config or array manifest ({e}); re-convert the checkpoint") from None
    if meta.get("layout", "dit") == "dit":
        _check_against_config(manifest, cfg, f"params of {directory}")
    params_dir = os.path.join(directory, PARAMS_NAME)
    if not os.path.isdir(params_dir):
        raise QditError(f"{directory} is half-written or damaged: {PARAMS_NAME}/ is missing; delete it and save again")
    ocp = _import_orbax()
    restore_args = _unflatten({p: ocp.RestoreArgs(restore_type=np.ndarray, dtype=jnp.dtype(d)) for p, (d, _) in manifest.items()})
    try:
        restored = ocp.Checkpointer(ocp.PyTreeCheckpointHandler()).restore(
            params_dir, args=ocp.args.PyTreeRestore(restore_args=restore_args))
    except Exception as e:  # orbax/tensorstore raise many types for missing or truncated files
        msg = " ".join(str(e).split())[:200]
        raise QditError(f"{directory} is half-written or damaged: its params could not be read ({type(e).__name__}: {msg}); "
                        "delete it and save again") from None
    flat = _flatten(restored)
    bad = [f"{'/'.join(p)}" for p in set(manifest) | set(flat)
           if p not in flat or p not in manifest or (flat[p].dtype.name, tuple(flat[p].shape)) != manifest[p]]
    if bad:
        raise QditError(f"{directory} is half-written or damaged: params differ from its manifest at {_fmt(sorted(bad))}; "
                        "delete it and save again")
    return _unflatten(flat), cfg, dict(meta.get("extra") or {})
