"""Q-DiT's evolutionary search over per-slot group sizes (lower fitness is better).

Defaults follow the paper (after SPOS): a population of 50, the top 10 ever seen kept as
parents, 25 children by mutation (each slot resampled with probability 0.1), 25 by crossover
(each slot from one of two parents), random candidates filling any shortfall, 10 epochs, and
the uniform group-128 candidate (or the closest valid one) seeded in the first population.
Every generated candidate lies in the space and within the budget (resampled, bounded tries)
and is new (never evaluated before), as SPOS does.

Reproducible: all randomness comes from one ``numpy.random.Generator`` (PCG64) seeded by
``seed``. Resumable: after each epoch the whole state (population, RNG state, fitness cache,
top-k, log) is written atomically to JSON; ``resume=True`` continues from it exactly, so that
2 epochs + a resumed third equal 3 epochs in one run. The next population is generated lazily
at the start of an epoch, so a finished run can be extended by raising ``epochs``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from typing import Any, Callable, Sequence

import numpy as np

from qdit_jax.errors import QditError
from qdit_jax.search.space import Candidate, SearchSpace

Evaluate = Callable[[list[Candidate]], Sequence[float]]
Feasible = Callable[[Candidate], bool]
STATE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class EvolutionConfig:
    """Hyper-parameters (Q-DiT's defaults). ``max_tries``: attempts per generated child."""

    population: int = 50
    top_k: int = 10
    mutation_num: int = 25
    mutation_prob: float = 0.1
    crossover_num: int = 25
    epochs: int = 10
    seed: int = 0
    seed_group: int = 128
    max_tries: int = 100

    def __post_init__(self) -> None:
        for name in ("population", "top_k", "epochs", "max_tries"):
            if int(getattr(self, name)) < 1:
                raise QditError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("mutation_num", "crossover_num"):
            if int(getattr(self, name)) < 0:
                raise QditError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.mutation_prob <= 1.0:
            raise QditError(f"mutation probability must be in [0, 1], got {self.mutation_prob}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def key_of(cand: Sequence[int]) -> str:
    return ",".join(str(int(g)) for g in cand)


def cand_of(key: str) -> Candidate:
    return tuple(int(g) for g in key.split(","))


@dataclasses.dataclass
class SearchState:
    """Everything needed to continue a search exactly (JSON-serialisable)."""

    config: dict[str, Any]
    space: list[list[Any]]  # [[path, choices], ...]: a resumed search must have the same space
    epoch: int = 0
    population: list[Candidate] | None = None  # None: generate at the start of the next epoch
    rng_state: dict[str, Any] | None = None
    cache: dict[str, float] = dataclasses.field(default_factory=dict)  # candidate key -> fitness
    top: list[tuple[Candidate, float]] = dataclasses.field(default_factory=list)
    log: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    elapsed_s: float = 0.0

    @property
    def best(self) -> tuple[Candidate, float] | None:
        return self.top[0] if self.top else None

    def to_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "config": self.config, "space": self.space, "epoch": self.epoch,
                "population": None if self.population is None else [list(c) for c in self.population],
                "rng_state": self.rng_state, "cache": self.cache,
                "top": [[list(c), f] for c, f in self.top], "log": self.log, "elapsed_s": self.elapsed_s}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SearchState":
        if d.get("version") != STATE_VERSION:
            raise QditError(f"search state version {d.get('version')!r} is not {STATE_VERSION}; start a new search")
        pop = d["population"]
        return cls(config=d["config"], space=d["space"], epoch=int(d["epoch"]),
                   population=None if pop is None else [tuple(int(g) for g in c) for c in pop],
                   rng_state=d["rng_state"], cache={k: float(v) for k, v in d["cache"].items()},
                   top=[(tuple(int(g) for g in c), float(f)) for c, f in d["top"]], log=list(d["log"]),
                   elapsed_s=float(d.get("elapsed_s", 0.0)))


def write_json_atomic(path: str, obj: Any) -> None:
    """Write JSON to a temporary file beside ``path`` and rename it over ``path`` (atomic on POSIX)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_state(path: str) -> SearchState:
    try:
        with open(path) as f:
            d = json.load(f)
    except FileNotFoundError:
        raise QditError(f"--resume: search state {path} does not exist; run without --resume to start") from None
    except json.JSONDecodeError as e:
        raise QditError(f"--resume: search state {path} is not valid JSON ({e})") from None
    return SearchState.from_dict(d)


class Generator:
    """Candidate generation (random, mutation, crossover) inside ``space`` and ``feasible``."""

    def __init__(self, space: SearchSpace, feasible: Feasible, cfg: EvolutionConfig, rng: np.random.Generator):
        self.space, self.feasible, self.cfg, self.rng = space, feasible, cfg, rng

    def _collect(self, n: int, make: Callable[[], Candidate], seen: set[str], out: list[Candidate]) -> None:
        """Append up to ``n`` new feasible candidates from ``make`` (at most ``n * max_tries`` tries)."""
        tries, added = 0, 0
        while added < n and tries < n * self.cfg.max_tries:
            tries += 1
            c = make()
            k = key_of(c)
            if k in seen or not self.feasible(c):
                continue
            seen.add(k)
            out.append(c)
            added += 1

    def random(self) -> Candidate:
        return self.space.random(self.rng)

    def mutate(self, parent: Candidate) -> Candidate:
        out = list(parent)
        for i, s in enumerate(self.space.slots):
            if self.rng.random() < self.cfg.mutation_prob:
                out[i] = s.choices[int(self.rng.integers(len(s.choices)))]
        return tuple(out)

    def crossover(self, a: Candidate, b: Candidate) -> Candidate:
        pick = self.rng.integers(2, size=len(a))
        return tuple(x if p == 0 else y for x, y, p in zip(a, b, pick))

    def initial(self, seen: set[str]) -> list[Candidate]:
        out: list[Candidate] = []
        uniform = self.space.closest_uniform(self.cfg.seed_group)
        if self.feasible(uniform):
            seen.add(key_of(uniform))
            out.append(uniform)
        self._collect(self.cfg.population - len(out), self.random, seen, out)
        return out

    def next_population(self, parents: list[Candidate], seen: set[str]) -> list[Candidate]:
        out: list[Candidate] = []
        if parents:
            pick = lambda: parents[int(self.rng.integers(len(parents)))]
            self._collect(self.cfg.mutation_num, lambda: self.mutate(pick()), seen, out)
            self._collect(self.cfg.crossover_num, lambda: self.crossover(pick(), pick()), seen, out)
        self._collect(self.cfg.population - len(out), self.random, seen, out)
        return out


def _space_signature(space: SearchSpace) -> list[list[Any]]:
    return [[s.path, list(s.choices)] for s in space.slots]


def evolve(space: SearchSpace, feasible: Feasible, evaluate: Evaluate, cfg: EvolutionConfig = EvolutionConfig(), *,
           state_path: str | None = None, resume: bool = False, progress: bool = False,
           log: Callable[[str], None] | None = None, extra_config: dict[str, Any] | None = None) -> SearchState:
    """Run (or resume) the search; ``evaluate`` gets a batch of new candidates and returns their
    fitness (lower is better). Returns the final state (``state.best``, ``state.log``)."""
    config = {**cfg.to_dict(), **(extra_config or {})}
    if resume:
        if state_path is None:
            raise QditError("resume needs the path of the search state (--out)")
        state = load_state(state_path)
        if state.space != _space_signature(space):
            raise QditError(f"--resume: {state_path} was written for a different search space "
                            "(model, bits or --groups differ); start a new search")
        old = {k: v for k, v in state.config.items() if k != "epochs"}
        new = {k: v for k, v in config.items() if k != "epochs"}
        if old != new:
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise QditError(f"--resume: settings {diff} differ from those of {state_path}; use the same flags "
                            "(only --epochs may grow)")
        state.config = config
    else:
        state = SearchState(config=config, space=_space_signature(space))
    rng = np.random.default_rng(cfg.seed)
    if state.rng_state is not None:
        rng.bit_generator.state = state.rng_state
    gen = Generator(space, feasible, cfg, rng)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.epochs, initial=min(state.epoch, cfg.epochs), desc="search", unit="epoch")
    say = log or (bar.write if bar is not None else (lambda s: None))
    try:
        while state.epoch < cfg.epochs:
            t0 = time.time()
            seen = set(state.cache)
            if state.population is None:
                parents = [c for c, _ in state.top]
                state.population = gen.initial(seen) if state.epoch == 0 else gen.next_population(parents, seen)
            new = [c for c in state.population if key_of(c) not in state.cache]
            if new:
                fits = [float(f) for f in evaluate(new)]
                if len(fits) != len(new):
                    raise QditError(f"the fitness function returned {len(fits)} values for {len(new)} candidates")
                for c, f in zip(new, fits):
                    state.cache[key_of(c)] = f if np.isfinite(f) else float("inf")
            # Top-k over everything seen so far (previous parents + this population); ties by key.
            pool = {key_of(c): c for c, _ in state.top}
            pool.update({key_of(c): c for c in state.population})
            ranked = sorted(pool.values(), key=lambda c: (state.cache[key_of(c)], key_of(c)))
            state.top = [(c, state.cache[key_of(c)]) for c in ranked[:cfg.top_k]]
            pop_fits = [state.cache[key_of(c)] for c in state.population]
            dt = time.time() - t0
            state.elapsed_s += dt
            entry = {"epoch": state.epoch, "best_fitness": state.top[0][1] if state.top else None,
                     "best": list(state.top[0][0]) if state.top else None,
                     "population_mean": float(np.mean(pop_fits)) if pop_fits else None,
                     "evaluated": len(new), "seconds": dt}
            state.log.append(entry)
            state.epoch += 1
            state.population = None
            state.rng_state = rng.bit_generator.state
            if state_path is not None:
                write_json_atomic(state_path, state.to_dict())
            say(f"epoch {entry['epoch']}: best fitness {entry['best_fitness']:.6g} "
                f"({len(new)} new candidates, {dt:.1f}s)")
            if bar is not None:
                bar.update(1)
                bar.set_postfix(best=f"{entry['best_fitness']:.4g}")
    finally:
        if bar is not None:
            bar.close()
    return state
