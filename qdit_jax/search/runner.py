"""One granularity search from a loaded model to a result file (what ``qdit search`` and
``scripts/search_fmnist.py`` both run): space, budget, vectorized fitness, evolution, output."""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import numpy as np

from qdit_jax.diffusion.pipeline import SamplerConfig, default_labels, dit_apply_fn, generate
from qdit_jax.errors import QditError
from qdit_jax.io.loading import LoadedModel
from qdit_jax.parallel.mesh import data_size, round_up
from qdit_jax.search.budget import Budget, BudgetCheck
from qdit_jax.search.evolution import EvolutionConfig, SearchState, evolve
from qdit_jax.search.fitness import (CandidateSampler, FrechetFitness, MSEFitness, check_disjoint_seeds,
                                     classifier_feature_fn, make_evaluate)
from qdit_jax.search.space import Candidate, SearchSpace, build_space

FITNESSES = ("mse", "fid")


@dataclasses.dataclass(frozen=True)
class SearchSettings:
    """Everything a search depends on besides the model (recorded in the result and the state)."""

    wbits: int = 4
    abits: int | None = 8
    groups: tuple[int, ...] | None = None
    budget: str = "mean-group=128"
    fitness: str = "mse"
    num_samples: int = 32
    num_ref: int = 256
    steps: int = 20
    cfg_scale: float = 1.5
    seed: int = 0  # search noise seed (and the evolution's RNG seed)
    ref_seed: int = 1000  # FID reference samples (full precision)
    batch_size: int = 64
    chunk: int | None = None

    def __post_init__(self) -> None:
        if self.fitness not in FITNESSES:
            raise QditError(f"--fitness must be one of {FITNESSES}, got {self.fitness!r}")
        if self.num_samples < 2:
            raise QditError(f"--num-samples must be >= 2, got {self.num_samples}")
        if self.fitness == "fid":
            if self.num_ref < 2:
                raise QditError(f"--num-ref must be >= 2, got {self.num_ref}")
            check_disjoint_seeds(search_seed=self.seed, reference_seed=self.ref_seed)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["groups"] = None if self.groups is None else list(self.groups)
        return d


def sampler_config(model: LoadedModel, steps: int, cfg_scale: float) -> SamplerConfig:
    d = model.sampling_defaults
    return SamplerConfig(steps=steps, cfg_scale=cfg_scale, clip_denoised=d.get("clip_denoised", False),
                         guidance_channels=d.get("guidance_channels"))


def fp_samples(model: LoadedModel, scfg: SamplerConfig, n: int, seed: int, batch_size: int,
               mesh: Any = None) -> np.ndarray:
    """Full-precision samples on the noise of ``seed`` (labels: classes in turn), batch-sharded
    over ``mesh`` when given (same samples)."""
    labels = default_labels(n, model.config.num_classes)
    if mesh is not None:
        batch_size = round_up(batch_size, data_size(mesh))
    return generate(dit_apply_fn(model.config), model.params, model.config, scfg, labels, seed=seed,
                    batch_size=batch_size, mesh=mesh)


def default_feature_fn(model: LoadedModel) -> Callable[[np.ndarray], np.ndarray]:
    cfg = model.config
    if cfg.input_size == 32 and cfg.in_channels == 1 and cfg.num_classes == 10:
        return classifier_feature_fn()
    raise QditError("--fitness fid needs a feature network for this model; the shipped one covers the "
                    "Fashion-MNIST DiT only (use --fitness mse, or pass a feature_fn through the API)")


def make_fitness(model: LoadedModel, s: SearchSettings, scfg: SamplerConfig, feature_fn=None, mesh: Any = None):
    """The fitness of ``s.fitness``: MSE to the FP samples of the search noise, or the Fréchet
    distance to FP samples drawn on the (disjoint) reference seed."""
    if s.fitness == "mse":
        return MSEFitness(fp_samples(model, scfg, s.num_samples, s.seed, s.batch_size, mesh))
    feature_fn = feature_fn or default_feature_fn(model)
    return FrechetFitness.from_images(feature_fn, fp_samples(model, scfg, s.num_ref, s.ref_seed, s.batch_size, mesh))


@dataclasses.dataclass
class SearchRun:
    """A finished search: the space and budget it ran in, its state, and the wall time."""

    space: SearchSpace
    budget: BudgetCheck
    state: SearchState
    wall_s: float
    sampler: CandidateSampler

    @property
    def best(self) -> Candidate:
        return self.state.best[0]

    def result(self, **metadata: Any) -> dict[str, Any]:
        """The output file: the best candidate's per-layer config, both costs, the log."""
        best, fit = self.state.best
        uniform = self.space.closest_uniform(128)
        return self.space.to_json_config(
            best, wbits=self.space.wbits, abits=self.space.abits, budget=str(self.budget.budget),
            fitness=fit, cost=self.budget.cost(best).to_dict(),
            uniform128_cost=self.budget.cost(uniform).to_dict(),
            uniform128_fitness=self.state.cache.get(",".join(map(str, uniform))),
            slots=[s.path for s in self.space.slots], search_log=self.state.log,
            evaluated=len(self.state.cache), search_wall_s=self.wall_s, **metadata)


def run_search(model: LoadedModel, s: SearchSettings, evo: EvolutionConfig, *, state_path: str | None = None,
               resume: bool = False, progress: bool = True, feature_fn=None,
               log: Callable[[str], None] | None = None, mesh: Any = None, shard: str = "batch",
               hosts: bool | None = None) -> SearchRun:
    """Build the space and budget of ``s`` for ``model``, then evolve (or resume) the search.

    ``mesh``/``shard``: run the candidates' sampling over several devices (``CandidateSampler``);
    the search's result does not depend on either. ``hosts`` (default: when there are several
    processes): each host scores its share of every population and the scores are all-gathered."""
    t0 = time.time()
    budget = Budget.parse(s.budget)
    space = build_space(model.config, s.wbits, s.abits, groups=s.groups)
    check = BudgetCheck(space, budget)
    scfg = sampler_config(model, s.steps, s.cfg_scale)
    labels = default_labels(s.num_samples, model.config.num_classes)
    sampler = CandidateSampler(model.params, model.config, space, scfg, labels, noise_seed=s.seed,
                               batch_size=s.batch_size, chunk=s.chunk or evo.population, mesh=mesh, shard=shard)
    fitness = make_fitness(model, s, scfg, feature_fn, mesh)
    extra = {"settings": {k: v for k, v in s.to_dict().items() if k not in ("batch_size", "chunk")}}
    import jax

    if hosts is None:
        hosts = jax.process_count() > 1
    if hosts:  # hosts split each population and exchange the scores
        from jax.experimental import multihost_utils

        evaluate = make_evaluate(sampler, fitness, process_id=jax.process_index(), num_processes=jax.process_count(),
                                 allgather=multihost_utils.process_allgather)
    else:
        evaluate = make_evaluate(sampler, fitness)
    state = evolve(space, check, evaluate, evo, state_path=state_path, resume=resume,
                   progress=progress, log=log, extra_config=extra)
    return SearchRun(space, check, state, time.time() - t0, sampler)
