"""qdit search [--ckpt DIR] --wbits 4 --abits 8 --budget mean-group=128 --out search.json

Q-DiT's automatic granularity allocation: an evolutionary search over the group size of every
block linear (weight and input activation share it) under a budget, with the candidates of a
population sampled together in one vmapped, compiled call. The fitness is the MSE of the
quantized samples to the full-precision ones from the same noise (--fitness mse) or the Fréchet
distance to full-precision samples on a disjoint reference seed (--fitness fid; the shipped
Fashion-MNIST classifier's features). The search state is written after every epoch beside
--out (``<out>.state.json``); --resume continues it exactly. The result is the per-layer config
that ``qdit quantize --per-layer`` takes, plus both costs and the search log.

    qdit search --wbits 4 --abits 8 --budget mean-group=128 --population 50 --epochs 10 \\
        --num-samples 32 --steps 20 --fitness mse --seed 0 --out out/search_w4a8.json

With several local devices the candidates' sampling is split over them (``--shard batch``: each
sample batch; ``--shard candidates``: each device its share of the population); ``--devices 1``
keeps one. The result does not depend on the device count. Over several hosts
(``--coordinator/--num-processes/--process-id``) each host scores its share of every population on
its own devices and the scores are all-gathered; process 0 writes the files.
"""
from __future__ import annotations

import argparse
import os

from qdit_jax.errors import QditError
from qdit_jax.parallel.cli import add_parallel_arguments, setup_from_args


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", default=None, help="checkpoint directory or .pt (default: the bundled model)")
    p.add_argument("--wbits", type=int, default=4)
    p.add_argument("--abits", type=int, default=8, help="activation bits (0: weights only)")
    p.add_argument("--groups", default=None,
                   help="candidate group sizes, e.g. 32,64,128,192,288 (default: Q-DiT's for XL/2, else 32,64,128,256)")
    p.add_argument("--budget", default="mean-group=128",
                   help="mean-group=C (mean group size >= C), bitops=B or bytes=B (per image forward / stored)")
    p.add_argument("--population", type=int, default=50)
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--mutation-num", type=int, default=25)
    p.add_argument("--mutation-prob", type=float, default=0.1)
    p.add_argument("--crossover-num", type=int, default=25)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--num-samples", type=int, default=32, help="samples per candidate")
    p.add_argument("--num-ref", type=int, default=256, help="FP reference samples of --fitness fid")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps of the candidates' samples")
    p.add_argument("--cfg-scale", type=float, default=1.5)
    p.add_argument("--fitness", choices=["mse", "fid"], default="mse")
    p.add_argument("--seed", type=int, default=0, help="search noise seed and evolution seed")
    p.add_argument("--ref-seed", type=int, default=None, help="FID reference noise seed (default: seed + 1000)")
    p.add_argument("--batch-size", type=int, default=64, help="samples per compiled call")
    p.add_argument("--chunk", type=int, default=None, help="candidates per compiled call (default: all; halved on OOM)")
    p.add_argument("--resume", action="store_true", help="continue the search state beside --out")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", required=True, help="output .json (per-layer config + search log)")
    p.add_argument("--shard", choices=["batch", "candidates"], default="batch",
                   help="with several devices: split each sample batch (default) or the candidates over them")
    add_parallel_arguments(p)


def state_path_for(out: str) -> str:
    return os.path.splitext(out)[0] + ".state.json"


def run(args: argparse.Namespace) -> int:
    from qdit_jax.io.loading import load_model
    from qdit_jax.search.budget import Budget
    from qdit_jax.search.evolution import EvolutionConfig, write_json_atomic
    from qdit_jax.search.runner import SearchSettings, run_search
    from qdit_jax.search.space import parse_groups

    if not args.out.endswith(".json"):
        raise QditError(f"--out must name a .json file, got {args.out!r}")
    Budget.parse(args.budget)  # validate before the (slow) model load
    settings = SearchSettings(
        wbits=args.wbits, abits=args.abits or None, groups=parse_groups(args.groups) if args.groups else None,
        budget=args.budget, fitness=args.fitness, num_samples=args.num_samples, num_ref=args.num_ref,
        steps=args.steps, cfg_scale=args.cfg_scale, seed=args.seed,
        ref_seed=args.seed + 1000 if args.ref_seed is None else args.ref_seed,
        batch_size=args.batch_size, chunk=args.chunk)
    evo = EvolutionConfig(population=args.population, top_k=args.top_k, mutation_num=args.mutation_num,
                          mutation_prob=args.mutation_prob, crossover_num=args.crossover_num, epochs=args.epochs,
                          seed=args.seed)
    mesh = setup_from_args(args)
    model = load_model(args.ckpt)
    if model.quantization:
        raise QditError("--ckpt is already quantized; search on the full-precision checkpoint")
    import jax

    if jax.process_count() > 1 and jax.process_index() != 0:
        # hosts split each population and share the scores, so every host holds the same search;
        # only process 0 writes the state and the result
        run_search(model, settings, evo, progress=False, mesh=mesh, shard=args.shard)
        return 0
    sr = run_search(model, settings, evo, state_path=state_path_for(args.out), resume=args.resume,
                    progress=not args.no_progress, log=print if args.no_progress else None, mesh=mesh,
                    shard=args.shard)
    result = sr.result(settings=settings.to_dict(), evolution=evo.to_dict(), model=model.config.to_dict(),
                       source=model.meta.get("source"))
    write_json_atomic(args.out, result)
    c, u = result["cost"], result["uniform128_cost"]
    print(f"best group sizes {result['group_sizes']} fitness {result['fitness']:.6g} "
          f"(uniform: {result['uniform128_fitness']})")
    print(f"cost: mean group {c['mean_group']:.1f}, {c['bitops']:.4g} bit ops/image, {c['bytes']} bytes "
          f"(uniform 128: {u['bitops']:.4g} bit ops, {u['bytes']} bytes); "
          f"{result['evaluated']} candidates in {sr.wall_s:.1f}s -> {args.out}")
    return 0
