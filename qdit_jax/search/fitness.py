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

from qdit_jax.diffusion.pipeline import SamplerConfig, check_labels, guided_model_fn, initial_noise, iterate_batches
from qdit_jax.diffusion.respace import make_diffusion
from qdit_jax.diffusion.samplers import sample
from qdit_jax.errors import QditError
from qdit_jax.metrics.frechet import feature_statistics, frechet_distance
from qdit_jax.models.dit import DiT, DiTConfig
from qdit_jax.quant.interceptor import ChoiceQuant, get_kernel, quantized, set_leaf
from qdit_jax.quant.quantize import dequantized_params, rtn_codes
from qdit_jax.quant.quantizers import dequantize, quantize_tensor
from qdit_jax.search.space import Candidate, SearchSpace

FeatureFn = Callable[[np.ndarray], np.ndarray]


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
    """

    def __init__(self, params: Any, cfg: DiTConfig, space: SearchSpace, scfg: SamplerConfig, labels: np.ndarray, *,
                 noise_seed: int, batch_size: int = 64, chunk: int | None = None) -> None:
        if cfg.class_dropout_prob <= 0 and scfg.cfg_scale != 1.0:
            raise QditError("this model has no null label (trained without class dropout); use --cfg-scale 1")
        if batch_size < 1:
            raise QditError(f"--batch-size must be >= 1, got {batch_size}")
        if chunk is not None and chunk < 1:
            raise QditError(f"--chunk must be >= 1, got {chunk}")
        self.cfg, self.space, self.scfg = cfg, space, scfg
        self.labels = check_labels(labels, cfg.num_classes)
        self.noise_seed = int(noise_seed)
        self.batch_size = min(batch_size, len(self.labels))
        self.chunk = chunk
        params = jax.tree_util.tree_map(jnp.asarray, params)
        fixed = dict(space.fixed)
        base = dequantized_params(params, fixed, rtn_codes(params, fixed)) if fixed else params
        self.base_params = base
        self.stacks = [self._stack(params, i) for i in range(len(space.slots))]
        self._vmapped = jax.jit(jax.vmap(self._run, in_axes=(None, None, 0, None, None, None)))
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
             key: jax.Array) -> jax.Array:
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
                      clip_denoised=scfg.clip_denoised, noise=noise)

    def _batches(self):
        """(indices, noise, labels, key) of each sample batch, exactly as ``generate`` makes them."""
        n, bs = len(self.labels), self.batch_size
        shape = (self.cfg.input_size, self.cfg.input_size, self.cfg.in_channels)
        base_key = jax.random.PRNGKey(self.noise_seed + 1)
        for bi, idx in enumerate(iterate_batches(n, bs)):
            pad = bs - len(idx)
            full = np.concatenate([idx, np.full(pad, idx[-1])]) if pad else idx
            yield idx, initial_noise(self.noise_seed, full, shape), jnp.asarray(self.labels[full]), \
                jax.random.fold_in(base_key, bi)

    def samples(self, cands: Sequence[Candidate]) -> np.ndarray:
        """(K, N, H, W, C) float32 samples of the K candidates, vmapped in chunks."""
        idx = np.stack([self.space.to_indices(c) for c in cands]) if len(cands) else np.zeros((0, len(self.space)))
        k = len(cands)
        n = len(self.labels)
        out = np.empty((k, n, self.cfg.input_size, self.cfg.input_size, self.cfg.in_channels), np.float32)
        if k == 0:
            return out
        chunk = self.chunk or k  # a fixed chunk (padded) keeps one compiled shape across calls
        for sidx, z, y, key in self._batches():
            start = 0
            while start < k:
                part = idx[start:start + chunk]
                padded = np.concatenate([part, np.repeat(part[-1:], chunk - len(part), axis=0)]) if len(part) < chunk else part
                try:
                    x = self._vmapped(self.stacks, self.base_params, jnp.asarray(padded, jnp.int32), z, y, key)
                    out[start:start + len(part), sidx] = np.asarray(x)[: len(part), : len(sidx)]
                except Exception as e:  # XLA's resource-exhausted error: retry with half the chunk
                    if not _is_oom(e) or chunk == 1:
                        raise
                    chunk = max(1, chunk // 2)
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
            for sidx, z, y, key in batches:
                out[ci, sidx] = np.asarray(self._single(self.stacks, self.base_params, ix, z, y, key))[: len(sidx)]
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


def make_evaluate(sampler: CandidateSampler, fitness: Callable[[np.ndarray], float]
                  ) -> Callable[[list[Candidate]], list[float]]:
    """The search's ``evaluate``: all new candidates sampled in vmapped chunks, then scored."""
    def evaluate(cands: list[Candidate]) -> list[float]:
        imgs = sampler.samples(cands)
        return [float(fitness(x)) if np.isfinite(x).all() else math.inf for x in imgs]

    return evaluate
