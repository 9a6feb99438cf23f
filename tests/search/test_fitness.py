import numpy as np
import pytest

from qdit_jax.diffusion.pipeline import SamplerConfig, generate
from qdit_jax.errors import QditError
from qdit_jax.quant.quantize import quantize_model
from qdit_jax.search.fitness import CandidateSampler, FrechetFitness, MSEFitness, check_disjoint_seeds
from qdit_jax.search.space import build_space
from tests.search._tiny import TINY, tiny_params


def test_vmapped_evaluation_equals_separate_quantize_model_runs():
    params = tiny_params()
    space = build_space(TINY, 4, 8, groups=(16, 32, 64))
    scfg = SamplerConfig(steps=2, cfg_scale=1.5, clip_denoised=False)
    labels = np.array([0, 1, 2], np.int32)
    cs = CandidateSampler(params, TINY, space, scfg, labels, noise_seed=5, batch_size=2)
    cands = [(16, 64, 32, 16), (64, 16, 64, 32), (32, 32, 16, 64)]
    x = cs.samples(cands)
    assert x.shape == (3, 3, 8, 8, 1)
    for k, c in enumerate(cands):
        qm = quantize_model(params, TINY, space.quant_config(c))
        ref = generate(qm.apply_fn(), qm.bundle, TINY, scfg, labels, seed=5, batch_size=2)
        # Batched and unbatched matmuls round differently, and a last-bit difference can flip one
        # quantization code: nearly all values agree to 1e-5, none by more than 0.1% of the scale.
        scale = np.abs(ref).max()
        assert np.mean(np.abs(x[k] - ref) <= 1e-5 * (1 + np.abs(ref))) >= 0.9
        assert np.abs(x[k] - ref).max() <= 1e-3 * scale
    assert np.abs(x[0] - x[1]).max() > 0.01 * np.abs(x[0]).max()  # candidates differ by 10x the tolerance
    # a chunk smaller than K (padded) gives the same samples
    cs.chunk = 2
    np.testing.assert_allclose(cs.samples(cands), x, rtol=1e-6, atol=1e-6)


def test_fitness_functions():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(6, 4, 4, 1))
    assert MSEFitness(ref)(ref) == 0.0
    assert MSEFitness(ref)(ref + 0.1) == pytest.approx(0.01)
    feat = lambda x: np.asarray(x).reshape(len(x), -1)[:, :3]  # stand-in feature network
    big = rng.normal(size=(400, 4, 4, 1))
    fit = FrechetFitness.from_images(feat, big)
    mu = big.reshape(400, -1)[:, :3].mean(0)
    shifted = big + 1.0
    assert fit(big) == pytest.approx(0.0, abs=1e-9)
    assert fit(shifted) == pytest.approx(3.0, rel=1e-6)  # |mu shift|^2 over 3 features, same covariance
    assert np.isfinite(mu).all()


def test_seeds_must_be_disjoint():
    check_disjoint_seeds(search=0, evaluation=100, reference=200)
    with pytest.raises(QditError, match="overlap"):
        check_disjoint_seeds(search=0, evaluation=0)
    with pytest.raises(QditError, match="overlap"):
        check_disjoint_seeds(search=3, evaluation=4)


def test_multihost_evaluate_splits_candidates_and_reassembles_in_order():
    """Hosts score disjoint shares; the gathered scores equal one host scoring everything."""
    from qdit_jax.search.fitness import host_share, make_evaluate

    class FakeSampler:  # samples = candidate values, so the fitness identifies the candidate
        def samples(self, cands):
            return np.asarray([[float(sum(c))] for c in cands])

    cands = [(i, 2 * i) for i in range(7)]
    fit = lambda x: float(x[0])  # noqa: E731
    hosts = 3
    shares = [set(host_share(7, h, hosts)) for h in range(hosts)]
    assert set().union(*shares) == set(range(7)) and sum(map(len, shares)) == 7
    # simulate the all-gather: every host's local array, computed by that host's own evaluate
    locals_: dict[int, np.ndarray] = {}

    def gather_for(h):
        def allgather(local):
            locals_[h] = local
            return np.stack([locals_.get(j, np.full_like(local, np.nan)) for j in range(hosts)])
        return allgather

    for h in range(hosts - 1):  # hosts 0..1 publish first
        make_evaluate(FakeSampler(), fit, process_id=h, num_processes=hosts, allgather=gather_for(h))(cands)
    got = make_evaluate(FakeSampler(), fit, process_id=hosts - 1, num_processes=hosts,
                        allgather=gather_for(hosts - 1))(cands)
    assert got == make_evaluate(FakeSampler(), fit)(cands) == [3.0 * i for i in range(7)]
