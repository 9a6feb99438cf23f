"""Granularity search on the bundled Fashion-MNIST DiT: searched vs uniform group sizes, and speed.

    python scripts/search_fmnist.py --out docs/search_fmnist.json            # GPU, ~3-4 min
    python scripts/search_fmnist.py --speed --out docs/search_speed.json     # one epoch, vmapped vs one by one
    python scripts/search_fmnist.py --small --out /tmp/search_small.json     # CPU smoke test
    python scripts/search_fmnist.py --speed --sharded --shard candidates    # + the epoch on all GPUs

Default mode, for W4A8 and a harder setting (--hard, W4A4 by default): run Q-DiT's search
(MSE to FP samples by default) on the search seed, then evaluate the searched config against
every uniform group size that meets the same budget on evaluation seeds the search never saw:
the Fréchet distance in the shipped classifier's features (to FP samples on a third seed) and
the MSE to the FP samples from the same noise. Prints a markdown table and writes JSON.

--speed: times one search epoch (a population of random candidates) sampled with vmapped
candidates against the same candidates one by one through one compiled function (both warmed
up first; block_until_ready via host copies), and projects the cost of a full Q-DiT search on
DiT-XL/2 (800 samples per candidate, 50 candidates x 10 epochs, DDIM steps) from the measured
per-candidate time scaled by FLOPs (``flops_per_forward``).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qdit_jax.diffusion.pipeline import default_labels  # noqa: E402
from qdit_jax.io.loading import load_model  # noqa: E402
from qdit_jax.models.dit import dit_config, flops_per_forward  # noqa: E402
from qdit_jax.search.budget import Budget, BudgetCheck  # noqa: E402
from qdit_jax.search.evolution import EvolutionConfig, write_json_atomic  # noqa: E402
from qdit_jax.search.fitness import (CandidateSampler, FrechetFitness, MSEFitness,  # noqa: E402
                                     check_disjoint_seeds, classifier_feature_fn)
from qdit_jax.search.runner import SearchSettings, fp_samples, run_search, sampler_config  # noqa: E402
from qdit_jax.search.space import build_space  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="search_fmnist.json")
    p.add_argument("--speed", action="store_true", help="time one epoch: vmapped vs one by one")
    p.add_argument("--small", action="store_true", help="tiny settings for a CPU smoke test")
    p.add_argument("--hard", default="w4a4", choices=["w4a4", "w3a8", "none"], help="the harder setting")
    p.add_argument("--budget", default="mean-group=128")
    p.add_argument("--fitness", default="mse", choices=["mse", "fid"])
    p.add_argument("--population", type=int, default=50)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--num-samples", type=int, default=20, help="samples per candidate in the search")
    p.add_argument("--steps", type=int, default=10, help="DDIM steps in the search")
    p.add_argument("--eval-samples", type=int, default=500)
    p.add_argument("--eval-steps", type=int, default=50)
    p.add_argument("--num-ref", type=int, default=1000, help="FP reference samples of the Fréchet distance")
    p.add_argument("--search-seed", type=int, default=0)
    p.add_argument("--eval-seed", type=int, default=100)
    p.add_argument("--ref-seed", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--chunk", type=int, default=None)
    p.add_argument("--xl-steps", type=int, default=50, help="DDIM steps of the projected XL/2 search")
    p.add_argument("--sharded", action="store_true",
                   help="with --speed: also time the epoch on all devices (--shard) and compare with one device")
    p.add_argument("--shard", default="candidates", choices=["batch", "candidates"])
    a = p.parse_args(argv)
    if a.small:
        a.population, a.epochs, a.num_samples, a.steps = 4, 2, 4, 2
        a.eval_samples, a.eval_steps, a.num_ref, a.batch_size = 8, 2, 16, 8
    return a


def shrink(model, small: bool):
    """--small: the bundled model cut to 2 blocks (CPU smoke test; numbers meaningless)."""
    if not small:
        return model
    cfg = model.config.replace(depth=2)
    params = {k: v for k, v in model.params.items() if not k.startswith("blocks_") or int(k.split("_")[1]) < 2}
    return type(model)(params, cfg, dict(model.meta))


def feature_fn_or_none():
    try:
        fn = classifier_feature_fn()
        return fn
    except Exception as e:  # the classifier asset may not be shipped yet
        print(f"(no Fréchet distance: {e})")
        return None


def compare(model, a, wbits: int, abits: int) -> dict:
    s = SearchSettings(wbits=wbits, abits=abits, budget=a.budget, fitness=a.fitness, num_samples=a.num_samples,
                       num_ref=a.num_ref, steps=a.steps, seed=a.search_seed, ref_seed=a.ref_seed,
                       batch_size=min(a.batch_size, a.num_samples), chunk=a.chunk)
    evo = EvolutionConfig(population=a.population, epochs=a.epochs, seed=a.search_seed,
                          top_k=min(10, a.population), mutation_num=a.population // 2,
                          crossover_num=a.population // 2)
    sr = run_search(model, s, evo, progress=True)
    space, check = sr.space, sr.budget
    # Evaluation: disjoint noise, more samples and steps.
    scfg = sampler_config(model, a.eval_steps, 1.5)
    labels = default_labels(a.eval_samples, model.config.num_classes)
    ev = CandidateSampler(model.params, model.config, space, scfg, labels, noise_seed=a.eval_seed,
                          batch_size=min(a.batch_size, a.eval_samples), chunk=a.chunk)
    fp = fp_samples(model, scfg, a.eval_samples, a.eval_seed, min(a.batch_size, a.eval_samples))
    mse = MSEFitness(fp)
    ffn = feature_fn_or_none()
    fid = None
    if ffn is not None:
        fid = FrechetFitness.from_images(ffn, fp_samples(model, scfg, a.num_ref, a.ref_seed,
                                                         min(a.batch_size, a.num_ref)))
    rows = {"searched": sr.best}
    for g in sorted({g for sl in space.slots for g in sl.choices}):
        c = space.closest_uniform(g)
        if check(c) and all(g in sl.choices for sl in space.slots):
            rows[f"uniform {g}"] = c
    imgs = ev.samples(list(rows.values()))
    out = {"setting": f"W{wbits}A{abits}", "search_wall_s": sr.wall_s, "search_log": sr.state.log,
           "best_group_sizes": list(sr.best), "rows": []}
    if fid is not None:
        out["rows"].append({"name": "FP", "fid": fid(fp), "mse": 0.0})
    for (name, c), x in zip(rows.items(), imgs):
        cost = check.cost(c)
        out["rows"].append({"name": name, "mean_group": cost.mean_group, "bitops": cost.bitops, "bytes": cost.bytes,
                            "fid": fid(x) if fid is not None else None, "mse": mse(x)})
    return out


def table(results: list[dict]) -> str:
    lines = ["| setting | config | mean group | Gbit ops / image | weight+scale bytes | Fréchet (classifier) | MSE to FP |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        for row in r["rows"]:
            fid = "-" if row.get("fid") is None else f"{row['fid']:.3f}"
            if row["name"] == "FP":
                lines.append(f"| {r['setting']} | FP | - | - | - | {fid} | 0 |")
                continue
            lines.append(f"| {r['setting']} | {row['name']} | {row['mean_group']:.1f} | {row['bitops'] / 1e9:.2f} | "
                         f"{row['bytes']} | {fid} | {row['mse']:.5f} |")
    return "\n".join(lines)


def speed(model, a) -> dict:
    space = build_space(model.config, 4, 8)
    check = BudgetCheck(space, Budget.parse(a.budget))
    rng = np.random.default_rng(a.search_seed)
    cands = []
    while len(cands) < a.population:
        c = space.random(rng)
        if check(c) and c not in cands:
            cands.append(c)
    scfg = sampler_config(model, a.steps, 1.5)
    labels = default_labels(a.num_samples, model.config.num_classes)
    cs = CandidateSampler(model.params, model.config, space, scfg, labels, noise_seed=a.search_seed,
                          batch_size=a.num_samples, chunk=a.chunk)
    cs.samples(cands)  # warm-up (compile)
    t0 = time.perf_counter()
    xv = cs.samples(cands)  # host copies block until the device is done
    t_vmap = time.perf_counter() - t0
    print(f"vmapped epoch: {t_vmap:.2f}s", flush=True)  # progress: a run cut by its time limit keeps this
    cs.samples_one_by_one(cands[:1])  # warm-up
    t0 = time.perf_counter()
    xs = cs.samples_one_by_one(cands)
    t_single = time.perf_counter() - t0
    diff = float(np.abs(xv - xs).max())
    k = len(cands)
    xl = dit_config("XL/2")
    ratio = flops_per_forward(xl) / flops_per_forward(model.config)
    per_cand = {"vmapped": t_vmap / k, "one_by_one": t_single / k}
    scale = ratio * (800 / a.num_samples) * (a.xl_steps / a.steps) * 500
    proj = {m: per_cand[m] * scale / 3600 for m in per_cand}
    if a.sharded:
        fit = MSEFitness(fp_samples(model, scfg, a.num_samples, a.search_seed, a.num_samples))
        out_sh = sharded_epoch(model, a, space, scfg, labels, cands, xv, fit)
    out = {"candidates": k, "num_samples": a.num_samples, "steps": a.steps, "epoch_s_vmapped": t_vmap,
           "epoch_s_one_by_one": t_single, "speedup": t_single / t_vmap, "max_abs_diff": diff,
           "flops_ratio_xl_over_fmnist": ratio, "projected_xl_search_hours": proj,
           "projection": f"500 candidates x 800 samples x DDIM {a.xl_steps} on XL/2 (CFG included in both)",
           "chunk_used": cs.chunk}
    if a.sharded:
        out["sharded"] = out_sh
    print(f"one epoch of {k} candidates ({a.num_samples} samples, DDIM {a.steps}): vmapped {t_vmap:.2f}s, "
          f"one by one {t_single:.2f}s ({t_single / t_vmap:.2f}x); max |diff| {diff:.2e}")
    print(f"projected full Q-DiT search on DiT-XL/2 ({out['projection']}; FLOPs x{ratio:.0f}): "
          f"vmapped {proj['vmapped']:.1f} h, one by one {proj['one_by_one']:.1f} h on this device")
    return out


def sharded_epoch(model, a, space, scfg, labels, cands, x_one, fitness) -> dict:
    """The same epoch on a mesh of all devices (``--shard``) against the one-device vmapped run:
    wall time, and whether the best candidate (the search's fitness: MSE to the FP samples of the
    same noise) and the samples agree."""
    import jax

    from qdit_jax.parallel.mesh import make_mesh

    n = jax.device_count()
    cs = CandidateSampler(model.params, model.config, space, scfg, labels, noise_seed=a.search_seed,
                          batch_size=a.num_samples, chunk=a.chunk, mesh=make_mesh(n), shard=a.shard)
    cs.samples(cands)  # warm-up (compile)
    t0 = time.perf_counter()
    xs = cs.samples(cands)
    t = time.perf_counter() - t0
    f_one = [fitness(x) for x in x_one]
    f_sh = [fitness(x) for x in xs]
    best_one, best_sh = int(np.argmin(f_one)), int(np.argmin(f_sh))
    d = np.abs(xs - x_one)
    out = {"devices": n, "shard": a.shard, "epoch_s": t, "same_best": best_one == best_sh,
           "max_abs_diff": float(d.max()), "rel_rms_diff": float(np.sqrt(np.mean(d ** 2) / np.mean(x_one ** 2))),
           "identical": bool(np.array_equal(xs, x_one))}
    print(f"sharded over {n} devices ({a.shard}): epoch {t:.2f}s; same best candidate: {out['same_best']}; "
          f"max |diff| {out['max_abs_diff']:.2e}, relative RMS {out['rel_rms_diff']:.2e}", flush=True)
    return out


def main(argv=None) -> int:
    a = parse_args(argv)
    import jax

    model = shrink(load_model(None), a.small)
    device = str(jax.devices()[0].device_kind)
    if a.speed:
        res = {"device": device, **speed(model, a)}
    else:
        check_disjoint_seeds(search_seed=a.search_seed, eval_seed=a.eval_seed, reference_seed=a.ref_seed)
        settings = [(4, 8)] + ({"w4a4": [(4, 4)], "w3a8": [(3, 8)], "none": []}[a.hard])
        t0 = time.time()
        results = [compare(model, a, wb, ab) for wb, ab in settings]
        md = table(results)
        print(md)
        for r in results:
            print(f"{r['setting']}: search {r['search_wall_s']:.1f}s, best group sizes {r['best_group_sizes']}")
        res = {"device": device, "command": " ".join(sys.argv), "args": vars(a), "results": results,
               "markdown": md, "total_s": time.time() - t0}
    write_json_atomic(a.out, res)
    print(f"-> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
