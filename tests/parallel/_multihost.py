"""One process of a 2-process (2-host) run on CPU, joined through ``parallel.distributed.initialize``
(run by test_multihost.py). Each host takes its share of the calibration set / the population and
the results are combined across hosts; every host also computes the single-process reference and
prints one JSON object: check name -> [ok, detail]."""
from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402

from qdit_jax.parallel.distributed import host_slice, initialize  # noqa: E402

results: dict[str, list] = {}


def main() -> None:
    port, pid = sys.argv[1], int(sys.argv[2])
    t0 = time.time()
    initialize(f"localhost:{port}", 2, pid, timeout_s=60)
    import jax

    from qdit_jax.diffusion.pipeline import SamplerConfig, dit_apply_fn
    from qdit_jax.io.loading import LoadedModel
    from qdit_jax.parallel.hosts import default_allgather
    from qdit_jax.quant.calibration import collect_calibration
    from qdit_jax.quant.config import QuantConfig, qdit_rules
    from qdit_jax.quant.quantize import quantize_model
    from qdit_jax.search.evolution import EvolutionConfig
    from qdit_jax.search.runner import SearchSettings, run_search
    from tests.parallel._multidevice import CFG, random_params

    assert jax.process_count() == 2 and jax.process_index() == pid

    def lap(part: str) -> None:  # where the time goes, on stderr (CI time is scarce)
        print(f"# host {pid} {part}: {time.time() - t0:.1f}s", file=sys.stderr, flush=True)

    lap("joined")
    params = random_params(CFG)
    scfg = SamplerConfig(sampler="ddpm", steps=3, cfg_scale=1.5, clip_denoised=True)
    lap("imports")
    full = collect_calibration(dit_apply_fn(CFG), params, CFG, scfg, num_samples=5, batch_size=2, seed=4)
    share = collect_calibration(dit_apply_fn(CFG), params, CFG, scfg, num_samples=5, batch_size=2, seed=4,
                                sample_range=host_slice(5, pid, 2))
    a, b = host_slice(5, pid, 2)
    rows = slice(2 * a, 2 * b)  # two inputs per sample (conditional + unconditional)
    results["calibration_share"] = [bool(np.array_equal(share.x, full.x[rows]) and np.array_equal(share.y, full.y[rows])),
                                    f"host {pid}: {len(share)} of {len(full)} inputs"]
    lap("calibration")
    qcfg = QuantConfig(qdit_rules(4, 8, w_group=32, a_group=32), {}, act_mode="static", gptq=True)
    ref = quantize_model(params, CFG, qcfg, calib=full, batch_size=2)
    got = quantize_model(params, CFG, qcfg, calib=share, batch_size=2, hosts=default_allgather)
    ranges = all(np.array_equal(np.asarray(x.scale), np.asarray(y.scale)) for p in ref.static
                 for x, y in zip(ref.static[p], got.static[p]))
    agree = float(np.mean(np.concatenate([(np.asarray(ref.codes[p][0]) == np.asarray(got.codes[p][0])).ravel()
                                          for p in ref.codes])))
    results["quantize_across_hosts"] = [ranges and agree >= 0.999, f"ranges equal {ranges}, codes agree {agree:.5f}"]

    lap("quantize")
    model = LoadedModel(params, CFG, {"sampling": {"clip_denoised": True, "guidance_channels": None}})
    evo = EvolutionConfig(population=5, top_k=2, mutation_num=2, crossover_num=2, epochs=2, seed=0)
    s = SearchSettings(wbits=4, abits=8, groups=(16, 32, 64), budget="mean-group=32", num_samples=4, steps=2,
                       batch_size=2)
    one = run_search(model, s, evo, progress=False, hosts=False)
    two = run_search(model, s, evo, progress=False, hosts=True)
    # A host's share sits at other positions of the padded vmapped chunk than on one host, which can
    # change float rounding: same candidates, same best, fitness within 1e-5 relative.
    rel = (max(abs(two.state.cache[k] - v) / abs(v) for k, v in one.state.cache.items())
           if one.state.cache.keys() == two.state.cache.keys() else float("inf"))
    same = one.best == two.best and rel <= 1e-5
    lap("search")
    results["search_across_hosts"] = [same, f"{len(two.state.cache)} candidates, best {two.best}, "
                                             f"max rel fitness diff {rel:.1e}"]
    print(json.dumps(results), flush=True)


if __name__ == "__main__":
    main()
