"""Fitness of granularity candidates: samples of many candidates in one compiled, vmapped call.

:class:`CandidateSampler` is the design card's vectorized evaluation. Per slot it precomputes
the round-to-nearest quantize-dequantized kernel for every candidate group size (stacked,
``(n_choices, in, out)``), and inside ``jax.vmap`` over the candidate axis each candidate
selects its kernels by index and its activation group size through the interceptor's
:class:`~qdit_jax.quant.interceptor.ChoiceQuant` (``lax.switch`` over the dynamic activation
specs). K candidates thus sample the same noise in one call; when the device runs out of
memory the candidate chunk is halved and retried.

Samples follow ``qdit_jax.diffusion.pipeline.generate`` exactly (noise of sample i from
``(noise_seed, i)``, same batching and keys), so a candidate's samples equal those of
``quantize_model`` + ``quantized_apply_fn`` + ``generate`` with its per-layer config.

Fitness (lower is better) of one candidate's samples: :class:`MSEFitness` (mean squared error to
the full-precision samples from the same noise: cheap, paired) or :class:`FrechetFitness`
(Fréchet distance to reference feature statistics; any feature function: the shipped
Fashion-MNIST classifier's, or Inception's for ImageNet models). Search and evaluation must use
disjoint noise seeds (:func:`check_disjoint_seeds`), so the search cannot overfit the numbers it
is judged by.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from qdit_jax.diffusion.pipeline import SamplerConfig, check_labels, guided_model_fn, initial_noise, iterate_batches
from qdit_jax.diffusion.respace import make_diffusion
from qdit_jax.diffusion.samplers import sample
from qdit_jax.errors import QditError
from qdit_jax.metrics.frechet import feature_statistics, frechet_distance
from qdit_jax.models.dit import DiT, DiTConfig
from qdit_jax.parallel.mesh import DATA, check_divisible, data_parallel, data_size, round_up
from qdit_jax.quant.interceptor import ChoiceQuant, get_kernel, quantized, set_leaf
from qdit_jax.quant.quantize import dequantized_params, rtn_codes
from qdit_jax.quant.quantizers import dequantize, quantize_tensor
from qdit_jax.search.space import Candidate, SearchSpace

FeatureFn = Callable[[np.ndarray], np.ndarray]
SHARD_MODES = ("batch", "candidates")


def check_disjoint_seeds(**seeds: int) -> None:
    """QditError unless the named noise seeds are pairwise at least 2 apart (a run with seed s also
    draws sampler keys from s + 1, as ``generate`` does)."""
    items = sorted(seeds.items(), key=lambda kv: kv[1])
    for (na, a), (nb, b) in zip(items, items[1:]):
        if b - a < 2:
            raise QditError(f"{na} ({a}) and {nb} ({b}) overlap: search, evaluation and reference seeds must "
                            "differ by at least 2 so the search never sees the evaluation noise")


def _is_oom(e: Exception) -> bool:
    msg = str(e)
    return "RESOURCE_EXHAUSTED" in msg or "Out of memory" in msg or "out of memory" in msg


class CandidateSampler:
    """Samples of granularity candidates on fixed noise and labels, K candidates per compiled call.

    ``chunk``: candidates per call (None: as many as asked); halved on out-of-memory. Every call
    is padded to the chunk size, so calls with fewer candidates reuse the one compiled function.
    ``mesh`` (``parallel.make_mesh``): ``shard='batch'`` splits each sample batch over the devices
    (every device runs all candidates on its slice; the batch is rounded up to a multiple of the
    device count), ``shard='candidates'`` gives each device its share of the candidates (the chunk
    is rounded up to a multiple of the device count). Params and kernel stacks are replicated;
    neither mode needs a collective. Samples do not depend on the mode or the device count.
    """

    def __init__(self, params: Any, cfg: DiTConfig, space: SearchSpace, scfg: SamplerConfig, labels: np.ndarray, *,
                 noise_seed: int, batch_size: int = 64, chunk: int | None = None, mesh: Any = None,
                 shard: str = "batch") -> None:
        if cfg.class_dropout_prob <= 0 and scfg.cfg_scale != 1.0:
            raise QditError("this model has no null label (trained without class dropout); use --cfg-scale 1")
        if batch_size < 1:
            raise QditError(f"--batch-size must be >= 1, got {batch_size}")
        if chunk is not None and chunk < 1:
            raise QditError(f"--chunk must be >= 1, got {chunk}")
        if shard not in SHARD_MODES:
            raise QditError(f"--shard must be one of {SHARD_MODES}, got {shard!r}")
        self.mesh, self.shard = mesh, shard
        self.ndev = 1 if mesh is None else data_size(mesh)
        self.cfg, self.space, self.scfg = cfg, space, scfg
        self.labels = check_labels(labels, cfg.num_classes)
        self.noise_seed = int(noise_seed)
        self.batch_size = min(batch_size, len(self.labels))
        if self.ndev > 1 and shard == "batch":  # the global batch splits evenly over the devices
            self.batch_size = round_up(self.batch_size, self.ndev)
            check_divisible(self.batch_size, self.ndev, "--batch-size")
        self.chunk = chunk
        params = jax.tree_util.tree_map(jnp.asarray, params)
        fixed = dict(space.fixed)
        base = dequantized_params(params, fixed, rtn_codes(params, fixed)) if fixed else params
        self.base_params = base
        self.stacks = [self._stack(params, i) for i in range(len(space.slots))]
        vm = jax.vmap(self._run, in_axes=(None, None, 0, None, None, None, None))
        if self.ndev == 1:
            self._vmapped = jax.jit(vm)
        elif shard == "candidates":  # each device samples its share of the candidates, whole batches
            self._vmapped = data_parallel(vm, mesh, (P(), P(), P(DATA), P(), P(), P(), P()), P(DATA), check_vma=False)
        else:  # each device samples every candidate on its slice of the batch
            self._vmapped = data_parallel(vm, mesh, (P(), P(), P(), P(DATA), P(DATA), P(), P(DATA)), P(None, DATA))
        self._single = jax.jit(self._run)

    def _stack(self, params: Any, slot: int) -> jax.Array:
        """(n_choices, in, out): the slot's kernel quantize-dequantized at every candidate group size,
        by the same storage round trip ``quantize_model`` uses."""
        s = self.space.slots[slot]
        kernel = get_kernel(params, s.path)["kernel"]
        w = jnp.asarray(kernel, jnp.float32).T  # (out, in): groups along in
        outs = []
        for g in s.choices:
            spec = self.space.layer_quant(slot, g).weight
            if spec is None:
                outs.append(kernel)
                continue
            codes, qp = quantize_tensor(w, spec)
            outs.append(dequantize(codes, qp, spec.group_size, jnp.float32).T.astype(kernel.dtype))
        return jnp.stack(outs)

    def _run(self, stacks: list[jax.Array], base: Any, idx: jax.Array, noise: jax.Array, labels: jax.Array,
             key: jax.Array, sample_ids: jax.Array) -> jax.Array:
        """Samples of one candidate given as per-slot choice indices ``idx`` (n_slots,)."""
        params = base
        plan = {}
        for i, s in enumerate(self.space.slots):
            params = set_leaf(params, s.path, "kernel", jnp.take(stacks[i], idx[i], axis=0))
            plan[s.path] = ChoiceQuant(tuple(self.space.layer_quant(i, g) for g in s.choices), idx[i])
        model = DiT(self.cfg)

        def apply_fn(p: Any, x: jax.Array, t: jax.Array, y: jax.Array) -> jax.Array:
            with quantized(plan):
                return model.apply({"params": p}, x, t, y)

        scfg, cfg = self.scfg, self.cfg
        diffusion = make_diffusion(scfg.num_timesteps, scfg.schedule, scfg.respacing, learn_sigma=cfg.learn_sigma)
        model_fn = guided_model_fn(apply_fn, params, labels, cfg_scale=scfg.cfg_scale, null_label=cfg.null_label,
                                   in_channels=cfg.in_channels, guidance_channels=scfg.guidance_channels)
        return sample(model_fn, noise.shape, key, diffusion, sampler=scfg.sampler, eta=scfg.eta,
                      clip_denoised=scfg.clip_denoised, noise=noise, sample_ids=sample_ids)

    def _batches(self):
        """(indices, noise, labels, key, sample ids) of each sample batch, exactly as ``generate``
        makes them: one key, each sample's noise and step noise from its own index."""
        n, bs = len(self.labels), self.batch_size
        shape = (self.cfg.input_size, self.cfg.input_size, self.cfg.in_channels)
        key = jax.random.PRNGKey(self.noise_seed + 1)
        for idx in iterate_batches(n, bs):
            pad = bs - len(idx)
            full = np.concatenate([idx, np.full(pad, idx[-1])]) if pad else idx
            yield idx, initial_noise(self.noise_seed, full, shape), jnp.asarray(self.labels[full]), key, \
                jnp.asarray(full, jnp.uint32)

    def _fit_chunk(self, chunk: int) -> int:
        """Candidates per call: a multiple of the device count when they are sharded over devices."""
        return round_up(chunk, self.ndev) if self.shard == "candidates" else chunk

    def samples(self, cands: Sequence[Candidate]) -> np.ndarray:
        """(K, N, H, W, C) float32 samples of the K candidates, vmapped in chunks."""
        idx = np.stack([self.space.to_indices(c) for c in cands]) if len(cands) else np.zeros((0, len(self.space)))
        k = len(cands)
        n = len(self.labels)
        out = np.empty((k, n, self.cfg.input_size, self.cfg.input_size, self.cfg.in_channels), np.float32)
        if k == 0:
            return out
        chunk = self._fit_chunk(self.chunk or k)  # a fixed chunk (padded) keeps one compiled shape
        for sidx, z, y, key, ids in self._batches():
            start = 0
            while start < k:
                part = idx[start:start + chunk]
                padded = np.concatenate([part, np.repeat(part[-1:], chunk - len(part), axis=0)]) if len(part) < chunk else part
                try:
                    x = self._vmapped(self.stacks, self.base_params, jnp.asarray(padded, jnp.int32), z, y, key, ids)
                    out[start:start + len(part), sidx] = np.asarray(x)[: len(part), : len(sidx)]
                except Exception as e:  # XLA's resource-exhausted error: retry with half the chunk
                    if not _is_oom(e) or chunk <= (self.ndev if self.shard == "candidates" else 1):
                        raise
                    chunk = self._fit_chunk(max(1, chunk // 2))
                    self.chunk = chunk
                    warnings.warn(f"out of memory with {chunk * 2} candidates per call; retrying with {chunk}")
                    continue
                start += len(part)
        return out

    def samples_one_by_one(self, cands: Sequence[Candidate]) -> np.ndarray:
        """The same samples, one candidate per call of one compiled (unbatched) function: the
        baseline the vmapped evaluation is timed against."""
        n = len(self.labels)
        out = np.empty((len(cands), n, self.cfg.input_size, self.cfg.input_size, self.cfg.in_channels), np.float32)
        batches = list(self._batches())
        for ci, c in enumerate(cands):
            ix = jnp.asarray(self.space.to_indices(c), jnp.int32)
            for sidx, z, y, key, ids in batches:
                out[ci, sidx] = np.asarray(self._single(self.stacks, self.base_params, ix, z, y, key, ids))[: len(sidx)]
        return out


class MSEFitness:
    """Mean squared error of a candidate's samples to reference samples from the same noise
    (normally the full-precision model's)."""

    name = "mse"

    def __init__(self, reference: np.ndarray) -> None:
        self.reference = np.asarray(reference, np.float64)

    def __call__(self, samples: np.ndarray) -> float:
        samples = np.asarray(samples, np.float64)
        if samples.shape != self.reference.shape:
            raise QditError(f"samples {samples.shape} and reference {self.reference.shape} differ in shape")
        return float(np.mean((samples - self.reference) ** 2))


class FrechetFitness:
    """Fréchet distance between the feature statistics of a candidate's samples and a reference's."""

    name = "fid"

    def __init__(self, feature_fn: FeatureFn, ref_mu: np.ndarray, ref_sigma: np.ndarray) -> None:
        self.feature_fn, self.mu, self.sigma = feature_fn, np.asarray(ref_mu), np.asarray(ref_sigma)

    @classmethod
    def from_images(cls, feature_fn: FeatureFn, reference: np.ndarray) -> "FrechetFitness":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mu, sigma = feature_statistics(np.asarray(feature_fn(reference), np.float64))
        return cls(feature_fn, mu, sigma)

    def __call__(self, samples: np.ndarray) -> float:
        feats = np.asarray(self.feature_fn(samples), np.float64)
        if not np.isfinite(feats).all():
            return math.inf
        with warnings.catch_warnings():  # few samples per candidate: singular covariances are expected
            warnings.simplefilter("ignore")
            mu, sigma = feature_statistics(feats)
            return frechet_distance(mu, sigma, self.mu, self.sigma)


def classifier_feature_fn(params: Any = None) -> FeatureFn:
    """Features of the shipped Fashion-MNIST classifier (model-space images in [-1, 1])."""
    from qdit_jax.models import fmnist_classifier as fc

    params = fc.load_classifier() if params is None else params
    return lambda images: fc.embed(np.asarray(images), params)[0]


def host_share(k: int, process_id: int, num_processes: int) -> np.ndarray:
    """Indices of the candidates host ``process_id`` evaluates: every ``num_processes``-th one."""
    return np.arange(process_id, k, num_processes)


def make_evaluate(sampler: CandidateSampler, fitness: Callable[[np.ndarray], float], *,
                  process_id: int = 0, num_processes: int = 1,
                  allgather: Callable[[np.ndarray], np.ndarray] | None = None
                  ) -> Callable[[list[Candidate]], list[float]]:
    """The search's ``evaluate``: all new candidates sampled in vmapped chunks, then scored.

    Over several hosts each host scores its share (``host_share``) on its own devices and
    ``allgather`` (``multihost_utils.process_allgather``: (hosts, ...) from each host's array)
    gives every host every score, so all hosts evolve the same population."""
    def score(cands: list[Candidate]) -> list[float]:
        imgs = sampler.samples(cands)
        return [float(fitness(x)) if np.isfinite(x).all() else math.inf for x in imgs]

    if num_processes == 1:
        return score

    def evaluate(cands: list[Candidate]) -> list[float]:
        k = len(cands)
        per_host = -(-k // num_processes)
        mine = host_share(k, process_id, num_processes)
        local = np.full(per_host, np.nan)
        local[: len(mine)] = score([cands[i] for i in mine])
        every = np.asarray(allgather(local)).reshape(num_processes, per_host)
        out = np.empty(k)
        for h in range(num_processes):
            idx = host_share(k, h, num_processes)
            out[idx] = every[h, : len(idx)]
        return [float(v) for v in out]

    return evaluate
