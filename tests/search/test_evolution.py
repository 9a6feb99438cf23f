import json

import numpy as np
import pytest

from qdit_jax.errors import QditError
from qdit_jax.search.budget import Budget, BudgetCheck
from qdit_jax.search.evolution import EvolutionConfig, Generator, evolve, key_of
from qdit_jax.models.dit import DiTConfig
from qdit_jax.search.space import build_space

CFG = DiTConfig(input_size=8, patch_size=2, in_channels=1, hidden_size=64, depth=4, num_heads=2, num_classes=3)


def _setup(budget="mean-group=40"):
    space = build_space(CFG, 4, 8, groups=(16, 32, 64))
    return space, BudgetCheck(space, Budget.parse(budget))


def _fitness(cands):
    # Deterministic, with an optimum away from uniform: prefers small groups in even slots.
    return [float(sum((g - (16 if i % 2 == 0 else 64)) ** 2 for i, g in enumerate(c))) for c in cands]


def test_mutation_crossover_and_random_stay_in_space_and_budget():
    space, check = _setup()
    rng = np.random.default_rng(1)
    gen = Generator(space, check, EvolutionConfig(mutation_prob=0.5), rng)
    parents = gen.initial(set())[:10]
    assert len(parents) == 10 and all(check(p) for p in parents)
    seen: set = set()
    kids = gen.next_population(parents, seen)
    assert len(kids) == 50 and len({key_of(k) for k in kids}) == 50
    for k in kids:
        assert space.contains(k) and check(k)
    # The raw operators can leave the budget; the generator must have filtered those out.
    raw = [gen.mutate(p) for p in parents for _ in range(20)]
    assert any(not check(r) for r in raw)
    assert all(space.contains(r) for r in raw)
    cross = gen.crossover(parents[0], parents[1])
    assert all(g in (a, b) for g, a, b in zip(cross, parents[0], parents[1]))


def test_search_is_seeded_with_uniform_and_improves():
    space, check = _setup()
    st = evolve(space, check, _fitness, EvolutionConfig(epochs=4, seed=3))
    first = st.log[0]
    assert key_of(space.closest_uniform(128)) in st.cache  # (64,)*16 is seeded
    assert st.log[-1]["best_fitness"] <= first["best_fitness"]
    assert check(st.best[0]) and st.best[1] == min(st.cache.values())
    st2 = evolve(space, check, _fitness, EvolutionConfig(epochs=4, seed=3))
    assert st2.cache == st.cache  # reproducible from the seed
    st3 = evolve(space, check, _fitness, EvolutionConfig(epochs=4, seed=4))
    assert st3.cache != st.cache


def _strip(d):
    d = dict(d)
    d.pop("elapsed_s")
    d["log"] = [{k: v for k, v in e.items() if k != "seconds"} for e in d["log"]]
    return d


def test_resume_continues_exactly(tmp_path):
    space, check = _setup()
    full = tmp_path / "full.json"
    part = tmp_path / "part.json"
    evolve(space, check, _fitness, EvolutionConfig(epochs=3, seed=7), state_path=str(full))
    evolve(space, check, _fitness, EvolutionConfig(epochs=2, seed=7), state_path=str(part))
    calls = []

    def counting(cands):
        calls.append(len(cands))
        return _fitness(cands)

    evolve(space, check, counting, EvolutionConfig(epochs=3, seed=7), state_path=str(part), resume=True)
    assert len(calls) == 1  # only the third epoch ran
    a, b = json.loads(full.read_text()), json.loads(part.read_text())
    assert _strip(a) == _strip(b)
    with pytest.raises(QditError, match="differ"):
        evolve(space, check, _fitness, EvolutionConfig(epochs=4, seed=8), state_path=str(part), resume=True)
