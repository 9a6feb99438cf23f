"""Inception-v3, the FID variant, in Flax Linen (the network of ``pt_inception-2015-12-05``).

This is the TF 2015-12-05 Inception graph that FID, sFID and IS are defined on, with the block
structure of pytorch-fid's ``FIDInceptionV3`` (``FIDInceptionA/C/E_1/E_2``): average pools that
ignore padding, a max pool in the last block, BatchNorm eps 1e-3, 1008 classes.

``InceptionV3(preprocess).apply({'params': p}, images)`` takes NHWC float images in [0, 1] of any
size (``to_unit_range`` validates and converts uint8), resizes them to 299x299 and returns:

- ``pool``: the 2048 pool_3 features (FID, precision/recall);
- ``spatial``: the first 7 channels of ``mixed_6/conv`` (``Mixed_6d.branch1x1`` after BN+ReLU,
  17x17x7 = 2023 values, flattened in HWC order), the sFID features of the ADM evaluator;
- ``logits``: ``fc(pool)`` with bias; ``logits_unbiased``: ``pool @ W`` without bias, which is
  what the ADM evaluator and improved-GAN's Inception Score use.

Two input pipelines (``preprocess``):

- ``"pytorch_fid"``: ``F.interpolate(bilinear, align_corners=False, antialias=False)`` on [0, 1]
  values, then ``2x - 1``; matches pytorch-fid exactly.
- ``"tf1"``: the TF graph's own ``ResizeBilinear`` (legacy, no half-pixel centres) on [0, 255]
  values, then ``(x - 128) / 128``; matches the ADM evaluator, whose reference statistics
  (``VIRTUAL_imagenet256_labeled.npz``) were computed this way.

Parameters are in one ``params`` collection; BatchNorm statistics are stored as ``mean``/``var``
next to ``scale``/``bias`` since the network is inference-only.
"""
from __future__ import annotations

import functools
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from qdit_jax.errors import QditError

INPUT_SIZE = 299
NUM_CLASSES = 1008
POOL_DIM = 2048
SPATIAL_CHANNELS = 7
SPATIAL_DIM = 17 * 17 * SPATIAL_CHANNELS
BN_EPS = 1e-3
PREPROCESS_MODES = ("pytorch_fid", "tf1")
OUTPUT_KEYS = ("pool", "spatial", "logits", "logits_unbiased")


# ----------------------------------------------------------------------------- input pipeline
def _resize_matrix(in_size: int, out_size: int, mode: str) -> np.ndarray:
    """(out, in) bilinear interpolation weights along one axis.

    Source coordinates are float32, rounded once (as PyTorch's fused multiply-add kernels and
    TF's float kernels produce them), so that resizing agrees to float32 rounding, not just 1e-4.
    """
    scale = np.float64(np.float32(in_size) / np.float32(out_size))
    dst = np.arange(out_size, dtype=np.float64)
    if mode == "pytorch_fid":  # half-pixel centres, negative sources clamped to 0
        src = np.maximum((scale * (dst + 0.5) - 0.5).astype(np.float32), 0.0)
    else:  # TF1 ResizeBilinear(align_corners=False, half_pixel_centers=False)
        src = (dst * scale).astype(np.float32)
    lo = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    hi = np.minimum(lo + 1, in_size - 1)
    frac = np.clip(src - lo, 0.0, 1.0).astype(np.float64)
    mat = np.zeros((out_size, in_size), dtype=np.float64)
    np.add.at(mat, (np.arange(out_size), lo), 1.0 - frac)
    np.add.at(mat, (np.arange(out_size), hi), frac)
    return mat


def preprocess_images(images: jax.Array, mode: str = "pytorch_fid") -> jax.Array:
    """Resize float [0, 1] NHWC images to 299x299 and map them to the network's [-1, 1] range."""
    if mode not in PREPROCESS_MODES:
        raise QditError(f"unknown Inception preprocess {mode!r}: use one of {PREPROCESS_MODES}")
    x = jnp.asarray(images, jnp.float32)
    if mode == "tf1":
        x = x * 255.0
    h, w = x.shape[1], x.shape[2]
    if (h, w) != (INPUT_SIZE, INPUT_SIZE):
        rh = jnp.asarray(_resize_matrix(h, INPUT_SIZE, mode), jnp.float32)
        rw = jnp.asarray(_resize_matrix(w, INPUT_SIZE, mode), jnp.float32)
        hp = jax.lax.Precision.HIGHEST
        x = jnp.einsum("oh,nhwc->nowc", rh, x, precision=hp)
        x = jnp.einsum("pw,nowc->nopc", rw, x, precision=hp)
    return 2.0 * x - 1.0 if mode == "pytorch_fid" else (x - 128.0) / 128.0


def to_unit_range(images: Any) -> np.ndarray:
    """Validate NHWC RGB images (uint8 in [0, 255] or float in [0, 1]); return float32 in [0, 1]."""
    x = np.asarray(images)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise QditError(f"images must be NHWC with 3 channels, got shape {x.shape}: "
                        "stack them as (N, H, W, 3) and repeat grayscale to 3 channels")
    if x.shape[0] == 0:
        raise QditError("no images given: pass at least one image")
    if x.dtype == np.uint8:
        return x.astype(np.float32) / 255.0
    if not np.issubdtype(x.dtype, np.floating):
        raise QditError(f"images must be uint8 in [0, 255] or float in [0, 1], got dtype {x.dtype}: "
                        "convert them with .astype(np.uint8) or divide by 255")
    lo, hi = float(np.min(x)), float(np.max(x))
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise QditError("images contain NaN or inf: check the sampler output")
    if lo < -1e-6 or hi > 1.0 + 1e-6:
        raise QditError(f"float images must be in [0, 1], got values in [{lo:.4g}, {hi:.4g}]: "
                        "map [-1, 1] samples with (x + 1) / 2, or pass uint8 images")
    return np.clip(x, 0.0, 1.0).astype(np.float32)


# ----------------------------------------------------------------------------- network
class BasicConv(nn.Module):
    """Conv (no bias) + BatchNorm (inference, eps 1e-3) + ReLU; PyTorch ``BasicConv2d``."""

    features: int
    kernel: tuple[int, int]
    stride: int = 1
    padding: tuple[int, int] = (0, 0)
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kh, kw = self.kernel
        in_ch = x.shape[-1]
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (kh, kw, in_ch, self.features))
        scale = self.param("scale", nn.initializers.ones, (self.features,))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        mean = self.param("mean", nn.initializers.zeros, (self.features,))
        var = self.param("var", nn.initializers.ones, (self.features,))
        ph, pw = self.padding
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype), kernel.astype(self.dtype), (self.stride, self.stride),
            ((ph, ph), (pw, pw)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
        mul = scale * jax.lax.rsqrt(var + BN_EPS)
        y = y * mul.astype(self.dtype) + (bias - mean * mul).astype(self.dtype)
        return nn.relu(y)


def _avg_pool_same(x: jax.Array) -> jax.Array:
    """3x3 stride-1 average pool whose border windows average only the real pixels (TF)."""
    return nn.avg_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_valid(x: jax.Array) -> jax.Array:
    return nn.max_pool(x, (3, 3), (2, 2), padding="VALID")


class InceptionA(nn.Module):
    pool_features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = functools.partial(BasicConv, dtype=self.dtype)
        b1 = c(64, (1, 1), name="branch1x1")(x)
        b5 = c(48, (1, 1), name="branch5x5_1")(x)
        b5 = c(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
        b3 = c(64, (1, 1), name="branch3x3dbl_1")(x)
        b3 = c(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
        b3 = c(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
        bp = c(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_same(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = functools.partial(BasicConv, dtype=self.dtype)
        b3 = c(384, (3, 3), stride=2, name="branch3x3")(x)
        bd = c(64, (1, 1), name="branch3x3dbl_1")(x)
        bd = c(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = c(96, (3, 3), stride=2, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_valid(x)], axis=-1)


class InceptionC(nn.Module):
    channels_7x7: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Returns the block output and its ``branch1x1`` output (``mixed_N/conv`` in TF)."""
        c = functools.partial(BasicConv, dtype=self.dtype)
        c7 = self.channels_7x7
        b1 = c(192, (1, 1), name="branch1x1")(x)
        b7 = c(c7, (1, 1), name="branch7x7_1")(x)
        b7 = c(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
        b7 = c(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
        bd = c(c7, (1, 1), name="branch7x7dbl_1")(x)
        bd = c(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
        bd = c(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
        bd = c(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
        bd = c(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
        bp = c(192, (1, 1), name="branch_pool")(_avg_pool_same(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1), b1


class InceptionD(nn.Module):
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = functools.partial(BasicConv, dtype=self.dtype)
        b3 = c(192, (1, 1), name="branch3x3_1")(x)
        b3 = c(320, (3, 3), stride=2, name="branch3x3_2")(b3)
        b7 = c(192, (1, 1), name="branch7x7x3_1")(x)
        b7 = c(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = c(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = c(192, (3, 3), stride=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_valid(x)], axis=-1)


class InceptionE(nn.Module):
    """``FIDInceptionE_1`` (average pool) or ``FIDInceptionE_2`` (max pool, as in the TF graph)."""

    max_pool: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = functools.partial(BasicConv, dtype=self.dtype)
        b1 = c(320, (1, 1), name="branch1x1")(x)
        b3 = c(384, (1, 1), name="branch3x3_1")(x)
        b3 = jnp.concatenate([c(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                              c(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], axis=-1)
        bd = c(448, (1, 1), name="branch3x3dbl_1")(x)
        bd = c(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate([c(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                              c(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], axis=-1)
        if self.max_pool:
            pooled = nn.max_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)))
        else:
            pooled = _avg_pool_same(x)
        bp = c(192, (1, 1), name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3(nn.Module):
    """FID Inception-v3. ``__call__`` takes [0, 1] images of any size; ``network`` 299x299 [-1, 1]."""

    preprocess: str = "pytorch_fid"
    dtype: Any = jnp.float32

    def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
        return self.network(preprocess_images(images, self.preprocess))

    @nn.compact
    def network(self, x: jax.Array) -> dict[str, jax.Array]:
        c = functools.partial(BasicConv, dtype=self.dtype)
        x = c(32, (3, 3), stride=2, name="Conv2d_1a_3x3")(x)
        x = c(32, (3, 3), name="Conv2d_2a_3x3")(x)
        x = c(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
        x = _max_pool_valid(x)
        x = c(80, (1, 1), name="Conv2d_3b_1x1")(x)
        x = c(192, (3, 3), name="Conv2d_4a_3x3")(x)
        x = _max_pool_valid(x)
        x = InceptionA(32, self.dtype, name="Mixed_5b")(x)
        x = InceptionA(64, self.dtype, name="Mixed_5c")(x)
        x = InceptionA(64, self.dtype, name="Mixed_5d")(x)
        x = InceptionB(self.dtype, name="Mixed_6a")(x)
        x, _ = InceptionC(128, self.dtype, name="Mixed_6b")(x)
        x, _ = InceptionC(160, self.dtype, name="Mixed_6c")(x)
        x, mixed_6_conv = InceptionC(160, self.dtype, name="Mixed_6d")(x)
        x, _ = InceptionC(192, self.dtype, name="Mixed_6e")(x)
        x = InceptionD(self.dtype, name="Mixed_7a")(x)
        x = InceptionE(False, self.dtype, name="Mixed_7b")(x)
        x = InceptionE(True, self.dtype, name="Mixed_7c")(x)
        pool = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        kernel = self.param("fc_kernel", nn.initializers.lecun_normal(), (POOL_DIM, NUM_CLASSES))
        fc_bias = self.param("fc_bias", nn.initializers.zeros, (NUM_CLASSES,))
        unbiased = jnp.dot(pool, kernel, precision=jax.lax.Precision.HIGHEST)
        spatial = mixed_6_conv[..., :SPATIAL_CHANNELS].astype(jnp.float32)
        return {
            "pool": pool,
            "spatial": spatial.reshape(spatial.shape[0], -1),
            "logits": unbiased + fc_bias,
            "logits_unbiased": unbiased,
        }


def init_inception_params(seed: int = 0, gain: float = 2.0) -> dict:
    """Random parameters with the real network's shapes (for tests and benchmarks): kernels
    N(0, gain / fan_in), BatchNorm scales and variances 1, the rest 0, drawn with NumPy from the
    shapes alone (Flax's own init runs op by op and takes minutes on a CPU)."""
    from flax import traverse_util

    x = jnp.zeros((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
    shapes = jax.eval_shape(lambda: InceptionV3().init(jax.random.PRNGKey(0), x, method=InceptionV3.network))
    rng = np.random.default_rng(seed)
    flat = {}
    for path, s in traverse_util.flatten_dict(shapes["params"]).items():
        if path[-1].endswith("kernel"):
            fan_in = int(np.prod(s.shape[:-1]))
            flat[path] = (rng.standard_normal(s.shape, np.float32) * np.sqrt(gain / fan_in)).astype(np.float32)
        else:
            flat[path] = np.full(s.shape, 1.0 if path[-1] in ("scale", "var") else 0.0, np.float32)
    return traverse_util.unflatten_dict(flat)


@functools.lru_cache(maxsize=None)
def _compiled(preprocess: str, dtype_name: str):
    model = InceptionV3(preprocess=preprocess, dtype=jnp.dtype(dtype_name))
    prep = jax.jit(functools.partial(preprocess_images, mode=preprocess))
    net = jax.jit(lambda p, x: model.apply({"params": p}, x, method=InceptionV3.network))
    return prep, net


def extract_features(params: Mapping, images: Any | Iterable[Any], *, batch_size: int = 200,
                     preprocess: str = "pytorch_fid", dtype: Any = jnp.float32,
                     outputs: tuple[str, ...] = OUTPUT_KEYS, mesh: Any = None) -> dict[str, np.ndarray]:
    """Run the network over an (N, H, W, 3) array or an iterable of such batches, in fixed batches.

    Images are uint8 [0, 255] or float [0, 1] (checked). The last batch is padded so that one
    compiled program serves every batch (``min(batch_size, len(array))`` images each).
    With a ``mesh`` (``parallel.make_mesh``) each batch is split over its devices (params
    replicated; the batch is rounded up to a multiple of the device count).
    Returns float32 NumPy arrays keyed by ``outputs``.
    """
    if preprocess not in PREPROCESS_MODES:
        raise QditError(f"unknown Inception preprocess {preprocess!r}: use one of {PREPROCESS_MODES}")
    bad = [k for k in outputs if k not in OUTPUT_KEYS]
    if bad:
        raise QditError(f"unknown Inception outputs {bad}: choose from {OUTPUT_KEYS}")
    if batch_size <= 0:
        raise QditError(f"batch_size must be positive, got {batch_size}")
    prep, net = _compiled(preprocess, jnp.dtype(dtype).name)
    place = lambda a: a  # noqa: E731
    if mesh is not None:
        from qdit_jax.parallel.mesh import data_size, replicate, round_up, shard_batch

        params = replicate(params, mesh)
        place = lambda a: shard_batch(a, mesh)  # noqa: E731
    chunks: dict[str, list[np.ndarray]] = {k: [] for k in outputs}
    batches = [images] if isinstance(images, (np.ndarray, jax.Array)) else images
    for batch in batches:
        x = to_unit_range(batch)
        size = min(batch_size, x.shape[0])
        if mesh is not None:
            size = round_up(size, data_size(mesh))
        for start in range(0, x.shape[0], size):
            part = x[start:start + size]
            n = part.shape[0]
            if n < size:
                part = np.concatenate([part, np.zeros((size - n,) + part.shape[1:], part.dtype)])
            out = net(params, prep(place(part)))
            for k in outputs:
                chunks[k].append(np.asarray(out[k][:n], dtype=np.float32))
    if not chunks[outputs[0]]:
        raise QditError("no images given: pass at least one image")
    return {k: np.concatenate(v, axis=0) for k, v in chunks.items()}
