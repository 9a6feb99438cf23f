"""From a model's ``apply_fn`` to images: classifier-free guidance, batching, one jit per shape.

``apply_fn(params, x, t, y) -> out`` is any function with the DiT forward's signature: the
plain ``DiT(cfg).apply`` or the same call under the quantization interceptor. The pipeline
never looks inside it, so the full-precision and quantized models sample the same way.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from qdit_jax.diffusion.respace import make_diffusion, steps_from_arg
from qdit_jax.diffusion.samplers import Trajectory, sample
from qdit_jax.errors import QditError
from qdit_jax.models.dit import DiT, DiTConfig
from qdit_jax.parallel.mesh import DATA, check_divisible, data_parallel, data_size, round_up
from qdit_jax.perf.compiler import jit as perf_jit

ApplyFn = Callable[[Any, jax.Array, jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """How to sample. ``guidance_channels=None`` guides every eps channel; 3 is DiT's official rule."""

    sampler: str = "ddim"
    steps: int = 50
    eta: float = 0.0
    cfg_scale: float = 1.5
    guidance_channels: int | None = None
    clip_denoised: bool = False
    num_timesteps: int = 1000
    schedule: str = "linear"

    def __post_init__(self) -> None:
        steps_from_arg(self.sampler, self.steps, self.num_timesteps)  # validates sampler and steps
        if not (isinstance(self.eta, (int, float)) and self.eta >= 0):
            raise QditError(f"--eta must be a number >= 0, got {self.eta!r}")
        if self.eta and self.sampler != "ddim":
            raise QditError("--eta applies only to --sampler ddim")
        if not (isinstance(self.cfg_scale, (int, float)) and self.cfg_scale >= 1.0):
            raise QditError(f"--cfg-scale must be >= 1 (1 disables guidance), got {self.cfg_scale!r}")
        if self.guidance_channels is not None and self.guidance_channels < 1:
            raise QditError(f"guidance_channels must be >= 1 or None (all eps channels), got {self.guidance_channels}")

    @property
    def respacing(self) -> str:
        return steps_from_arg(self.sampler, self.steps, self.num_timesteps)

    def replace(self, **kw: Any) -> "SamplerConfig":
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def dit_apply_fn(cfg: DiTConfig) -> ApplyFn:
    """The full-precision forward as an ``apply_fn``."""
    model = DiT(cfg)
    return lambda params, x, t, y: model.apply({"params": params}, x, t, y)


def guided_model_fn(apply_fn: ApplyFn, params: Any, y: jax.Array, *, cfg_scale: float, null_label: int,
                    in_channels: int, guidance_channels: int | None = None) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """``model_fn(x, t)`` for the samplers, with CFG as the official ``forward_with_cfg``.

    With guidance the batch is doubled (labels, then the null label); the guided eps replaces the
    first ``guidance_channels`` channels; the remaining channels (unguided eps, variance values)
    come from the conditional half, as in the official code.
    """
    if cfg_scale == 1.0:
        return lambda x, t: apply_fn(params, x, t, y)
    gc = in_channels if guidance_channels is None else guidance_channels
    if gc > in_channels:
        raise QditError(f"guidance_channels {gc} exceeds the model's {in_channels} eps channels")

    def model_fn(x: jax.Array, t: jax.Array) -> jax.Array:
        yy = jnp.concatenate([y, jnp.full_like(y, null_label)])
        out = apply_fn(params, jnp.concatenate([x, x]), jnp.concatenate([t, t]), yy)
        cond, uncond = jnp.split(out, 2, axis=0)
        eps = uncond[..., :gc] + cfg_scale * (cond[..., :gc] - uncond[..., :gc])
        return jnp.concatenate([eps, cond[..., gc:]], axis=-1)

    return model_fn


def check_labels(labels: np.ndarray, num_classes: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise QditError(f"labels must be a 1-D integer array, got {labels.dtype} {labels.shape}")
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.size:
        raise QditError(f"label {int(bad[0])} is outside the class range 0..{num_classes - 1} of this model")
    return labels.astype(np.int32)


def initial_noise(seed: int, indices: np.ndarray, shape: tuple[int, ...]) -> jax.Array:
    """Per-sample initial noise: sample i's noise depends only on (seed, i), not on the batching."""
    base = jax.random.PRNGKey(seed)
    keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.asarray(indices, jnp.uint32))
    return jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(keys)


def make_sample_fn(apply_fn: ApplyFn, cfg: DiTConfig, scfg: SamplerConfig, *, return_trajectory: bool = False,
                   mesh: Any = None, compiler_options: dict[str, Any] | None = None):
    """A jitted ``(params, noise, labels, key, sample_ids=None) -> x_0`` (and the trajectory, when asked).

    With ``sample_ids`` (N,) each sample's step noise comes from its own key (see the samplers), so
    results do not depend on the batching. With a ``mesh`` (``qdit_jax.parallel.make_mesh``) the
    function runs under ``shard_map``: noise, labels and ids split over the 'data' axis (N must
    divide), params and key replicated, every device sampling its slice; ``sample_ids`` is required.
    ``compiler_options``: XLA options (None: ``perf.compiler``'s defaults for this backend).
    """
    diffusion = make_diffusion(scfg.num_timesteps, scfg.schedule, scfg.respacing, learn_sigma=cfg.learn_sigma)

    def run(params: Any, noise: jax.Array, labels: jax.Array, key: jax.Array, sample_ids: jax.Array | None = None):
        model_fn = guided_model_fn(apply_fn, params, labels, cfg_scale=scfg.cfg_scale, null_label=cfg.null_label,
                                   in_channels=cfg.in_channels, guidance_channels=scfg.guidance_channels)
        return sample(model_fn, noise.shape, key, diffusion, sampler=scfg.sampler, eta=scfg.eta,
                      clip_denoised=scfg.clip_denoised, noise=noise, return_trajectory=return_trajectory,
                      sample_ids=sample_ids)

    if mesh is None:
        return perf_jit(run, compiler_options)
    out = (P(DATA), Trajectory(P(None, DATA), P(None, DATA))) if return_trajectory else P(DATA)
    return data_parallel(run, mesh, (P(), P(DATA), P(DATA), P(), P(DATA)), out, compiler_options=compiler_options)


def auto_batch_size(apply_fn: ApplyFn, params: Any, cfg: DiTConfig, scfg: SamplerConfig, *, mesh: Any = None,
                    num_samples: int | None = None, fraction: float = 0.8) -> int:
    """A global sampling batch that fits ``fraction`` of each device's free memory: the sampler's
    bytes per sample come from XLA's memory analysis at two probe batches, the free bytes from the
    device's allocator (64 per device where the backend reports none, e.g. CPU). Capped at the
    sample count (rounded up to the device count)."""
    from qdit_jax.parallel.mesh import compiled_bytes_per_sample, data_size, per_device_batch

    fn = make_sample_fn(apply_fn, cfg, scfg)
    shape = (cfg.input_size, cfg.input_size, cfg.in_channels)

    def build(b: int):
        args = (params, jax.ShapeDtypeStruct((b, *shape), jnp.float32), jax.ShapeDtypeStruct((b,), jnp.int32),
                jax.random.PRNGKey(0), jax.ShapeDtypeStruct((b,), jnp.uint32))
        return fn.lower(*args).compile()

    ndev = 1 if mesh is None else data_size(mesh)
    cap = None if num_samples is None else -(-num_samples // ndev)
    per_dev = per_device_batch(compiled_bytes_per_sample(build), fraction=fraction, maximum=cap)
    return per_dev * ndev


def iterate_batches(n: int, batch_size: int) -> Iterator[np.ndarray]:
    for start in range(0, n, batch_size):
        yield np.arange(start, min(start + batch_size, n))


def generate(apply_fn: ApplyFn, params: Any, cfg: DiTConfig, scfg: SamplerConfig, labels: np.ndarray, *,
             seed: int = 0, noise: np.ndarray | None = None, batch_size: int = 64, progress: bool = False,
             sample_fn: Callable | None = None, mesh: Any = None, start_index: int = 0) -> np.ndarray:
    """Sample ``len(labels)`` images (model space, float32 NHWC); one compile for every batch.

    The last partial batch is padded to ``batch_size`` so that it reuses the compiled function.
    Sample ``i`` (global index ``start_index + i``) depends only on the seed and that index, not
    on the batch size, the device count or the host, so hosts can each sample a slice.
    With a ``mesh``, ``batch_size`` is the global batch and must be a multiple of the 'data' axis
    size (a QditError says so); each batch is split over the devices and gathered in order.
    """
    if cfg.class_dropout_prob <= 0 and scfg.cfg_scale != 1.0:
        raise QditError("this model has no null label (trained without class dropout); use --cfg-scale 1")
    labels = check_labels(labels, cfg.num_classes)
    n = len(labels)
    shape = (cfg.input_size, cfg.input_size, cfg.in_channels)
    if noise is not None:
        noise = np.asarray(noise, np.float32)
        if noise.shape != (n, *shape):
            raise QditError(f"--noise has shape {noise.shape}; this model and sample count need {(n, *shape)}")
    if batch_size < 1:
        raise QditError(f"--batch-size must be >= 1, got {batch_size}")
    ndev = 1
    if mesh is not None:
        ndev = data_size(mesh)
        check_divisible(batch_size, ndev, "--batch-size")
    batch_size = min(batch_size, round_up(n, ndev))
    fn = sample_fn or make_sample_fn(apply_fn, cfg, scfg, mesh=mesh)
    out = np.empty((n, *shape), np.float32)
    batches = list(iterate_batches(n, batch_size))
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc=f"sampling ({scfg.sampler} {scfg.steps})", unit="batch")
    key = jax.random.PRNGKey(seed + 1)  # one key: step noise is drawn per sample from fold_in(., index)
    for idx in batches:
        pad = batch_size - len(idx)
        full = np.concatenate([idx, np.full(pad, idx[-1])]) if pad else idx
        gid = full + start_index
        z = jnp.asarray(noise[full]) if noise is not None else initial_noise(seed, gid, shape)
        x = fn(params, z, jnp.asarray(labels[full]), key, jnp.asarray(gid, jnp.uint32))
        out[idx] = np.asarray(x)[: len(idx)]
    return out


def default_labels(n: int, num_classes: int) -> np.ndarray:
    """Labels 0, 1, ..., num_classes-1, 0, 1, ... so every class appears evenly."""
    return (np.arange(n) % num_classes).astype(np.int32)
