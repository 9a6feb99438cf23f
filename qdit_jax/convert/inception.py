"""pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` state_dict -> Flax FID Inception params.

Key names are those of pytorch-fid's ``FIDInceptionV3`` (torchvision ``Inception3`` names with
``aux_logits=False``, 1008 classes): ``Mixed_6d.branch1x1.conv.weight``,
``Mixed_6d.branch1x1.bn.running_var``, ``fc.weight``... The conversion is strict: every
parameter of the Flax network must be filled exactly once, with the right shape.
"""
from __future__ import annotations

import functools
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from qdit_jax.errors import QditError
from qdit_jax.models.inception import INPUT_SIZE, InceptionV3

_BN = {"scale": "bn.weight", "bias": "bn.bias", "mean": "bn.running_mean", "var": "bn.running_var"}
_IGNORED_SUFFIXES = ("num_batches_tracked",)


@functools.lru_cache(maxsize=1)
def _param_shapes() -> dict[tuple[str, ...], tuple[int, ...]]:
    """Flat Flax parameter paths -> shapes, without running the network."""
    x = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
    tree = jax.eval_shape(lambda: InceptionV3().init(jax.random.PRNGKey(0), jnp.zeros(x.shape),
                                                     method=InceptionV3.network))["params"]
    return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(tree).items()}


def _torch_key(path: tuple[str, ...]) -> tuple[str, bool]:
    """Flax path -> (state_dict key, whether the array is a conv/fc kernel to transpose)."""
    leaf = path[-1]
    if path == ("fc_kernel",):
        return "fc.weight", True
    if path == ("fc_bias",):
        return "fc.bias", False
    prefix = ".".join(path[:-1])
    if leaf == "kernel":
        return f"{prefix}.conv.weight", True
    return f"{prefix}.{_BN[leaf]}", False


def convert_inception_state_dict(state_dict: Mapping[str, Any]) -> dict:
    """Convert a FID Inception state_dict (tensors or arrays) into the ``params`` of ``InceptionV3``."""
    arrays = {}
    for k, v in state_dict.items():
        if k.endswith(_IGNORED_SUFFIXES):
            continue
        arrays[k] = np.asarray(v.detach().cpu().numpy() if hasattr(v, "detach") else v, dtype=np.float32)
    flat, expected = {}, set()
    missing, wrong = [], []
    for path, shape in _param_shapes().items():
        key, transpose = _torch_key(path)
        expected.add(key)
        if key not in arrays:
            missing.append(key)
            continue
        a = arrays[key]
        if transpose:
            a = a.T if a.ndim == 2 else a.transpose(2, 3, 1, 0)  # (O, I) -> (I, O); OIHW -> HWIO
        if a.shape != shape:
            wrong.append(f"{key}: {arrays[key].shape}")
            continue
        flat[path] = jnp.asarray(a)
    unexpected = sorted(set(arrays) - expected)
    if missing:
        raise QditError(f"FID Inception state_dict is missing {len(missing)} keys (e.g. {missing[:3]}): "
                        "pass pytorch-fid's pt_inception-2015-12-05-6726825d.pth")
    if wrong:
        raise QditError(f"FID Inception state_dict has {len(wrong)} wrongly shaped tensors (e.g. {wrong[:3]}): "
                        "pass pytorch-fid's pt_inception-2015-12-05-6726825d.pth, not torchvision's Inception")
    if unexpected:
        raise QditError(f"FID Inception state_dict has {len(unexpected)} unexpected keys (e.g. {unexpected[:3]}): "
                        "pass pytorch-fid's pt_inception-2015-12-05-6726825d.pth (aux_logits=False)")
    return traverse_util.unflatten_dict(flat)


def load_inception_params(path: str | os.PathLike) -> dict:
    """Read ``pt_inception-2015-12-05-6726825d.pth`` (needs torch) and convert it."""
    if not os.path.isfile(path):
        raise QditError(f"Inception weights file not found: {path}: download "
                        "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                        "pt_inception-2015-12-05-6726825d.pth")
    try:
        import torch
    except ImportError as e:
        raise QditError("reading a .pth file needs PyTorch: pip install torch") from e
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is a user error here
        raise QditError(f"cannot read {path} as a PyTorch state_dict ({type(e).__name__}): "
                        "pass pt_inception-2015-12-05-6726825d.pth") from e
    if not isinstance(state, Mapping):
        raise QditError(f"{path} holds a {type(state).__name__}, not a state_dict: pass the .pth weights file")
    return convert_inception_state_dict(state)
