"""qdit merge samples.npz --num-processes N [--remove]

Join the per-host files of a multi-host ``qdit sample`` run (``samples.host0.npz`` ...
``samples.host{N-1}.npz``, each holding its global sample ``indices``) into ``samples.npz`` in
global sample order, checking that they cover every sample exactly once. ``qdit eval`` then reads
the merged file.

    qdit merge out/samples.npz --num-processes 4 --remove
"""
from __future__ import annotations

import argparse

from qdit_jax.errors import QditError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("samples", help="the merged output .npz (the per-host files sit beside it as NAME.hostK.npz)")
    p.add_argument("--num-processes", type=int, required=True, help="number of hosts that wrote files")
    p.add_argument("--remove", action="store_true", help="delete the per-host files after merging")


def run(args: argparse.Namespace) -> int:
    from qdit_jax.parallel.distributed import merge_host_samples

    if not args.samples.endswith(".npz"):
        raise QditError(f"the merged output must be a .npz file, got {args.samples!r}")
    if args.num_processes < 1:
        raise QditError(f"--num-processes must be >= 1, got {args.num_processes}")
    x, y = merge_host_samples(args.samples, args.num_processes, remove=args.remove)
    print(f"merged {args.num_processes} host file(s): {len(x)} samples{'' if y is None else ' with labels'} "
          f"-> {args.samples}")
    return 0
