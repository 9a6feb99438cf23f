"""qdit eval samples.npz --ref REF.npz [--metrics fid,sfid,is,prec,recall] [--json out.json]

Evaluate samples written by ``qdit sample`` (uint8 ``arr_0``, optional ``labels``) against a
reference: an ADM reference batch (e.g. VIRTUAL_imagenet256_labeled.npz), a stats cache, or
``fmnist-test`` with ``--features fmnist``. Prints a table and writes JSON.

    qdit eval out/samples.npz --ref VIRTUAL_imagenet256_labeled.npz \\
        --inception pt_inception-2015-12-05-6726825d.pth --json out/metrics.json
    qdit eval out/fmnist.npz --ref fmnist-test --features fmnist

Inception features are batch-sharded over the local devices (``--devices``, default all) and the
FID statistics' sums all-reduced there. Samples from several hosts: ``qdit merge`` them first.
"""
from __future__ import annotations

import argparse
import json
import math
import os
from typing import Any, Mapping

from qdit_jax.errors import QditError

_LABELS = (("fid", "FID"), ("sfid", "sFID"), ("is", "IS"), ("precision", "Precision"), ("recall", "Recall"),
           ("accuracy", "Accuracy"), ("psnr", "PSNR vs FP (dB)"), ("ssim", "SSIM vs FP"))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("samples", help="samples .npz (uint8 'arr_0', optional 'labels')")
    p.add_argument("--ref", required=True, help="reference .npz (ADM batch or stats cache), or 'fmnist-test'")
    p.add_argument("--metrics", default=None, help="comma list of fid,sfid,is,prec,recall "
                   "(default: all; fid,is,prec,recall with --features fmnist)")
    p.add_argument("--features", choices=["inception", "fmnist"], default="inception")
    p.add_argument("--inception", default=None, metavar="PATH", help="pt_inception-2015-12-05-6726825d.pth")
    p.add_argument("--preprocess", choices=["pytorch_fid", "tf1"], default=None,
                   help="Inception input pipeline (default: tf1 for ADM precomputed statistics, else pytorch_fid)")
    p.add_argument("--fp-samples", default=None, help="full-precision samples .npz (same noise): adds PSNR and SSIM")
    p.add_argument("--batch-size", type=int, default=200)
    p.add_argument("--json", default=None, help="write the results here (default: beside the samples)")
    from qdit_jax.parallel.cli import add_parallel_arguments

    add_parallel_arguments(p)


def format_table(results: Mapping[str, Any]) -> str:
    """The metrics present in ``results`` as a two-column plain-text table."""
    rows = []
    for key, name in _LABELS:
        if key in results:
            value = f"{results[key]:.4f}"
            if key == "is" and "is_std" in results:
                value += f" ± {results['is_std']:.4f}"
            rows.append((name, value))
    width = max((len(n) for n, _ in rows), default=6)
    return "\n".join(f"{n:<{width}}  {v}" for n, v in rows)


def json_ready(obj: Any) -> Any:
    """Non-finite floats (e.g. PSNR of identical images) become null so the file is strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Mapping):
        return {k: json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    return obj


def run(args: argparse.Namespace) -> int:
    from qdit_jax.io.images import load_samples
    from qdit_jax.metrics.evaluate import (check_metrics, check_samples, evaluate_samples, fidelity_to_reference,
                                           load_inception)

    import jax

    from qdit_jax.parallel.cli import setup_from_args
    from qdit_jax.parallel.mesh import data_size, round_up

    metrics = check_metrics(args.metrics, args.features)
    mesh = setup_from_args(args)
    if mesh is not None:
        args.batch_size = round_up(args.batch_size, data_size(mesh))
    json_path = args.json or os.path.splitext(args.samples)[0] + "_metrics.json"
    if not json_path.endswith(".json"):
        raise QditError(f"--json must name a .json file, got {json_path!r}")
    images, labels = load_samples(args.samples)
    images = check_samples(images, args.samples)
    if args.ref != "fmnist-test" and not os.path.isfile(args.ref):
        raise QditError(f"reference file not found: {args.ref}: pass an ADM reference batch, a stats .npz "
                        "or fmnist-test")
    fp = None
    if args.fp_samples:
        fp = check_samples(load_samples(args.fp_samples)[0], args.fp_samples)
    params = load_inception(args.inception) if args.features == "inception" else None
    results = evaluate_samples(images, args.ref, metrics=metrics, features=args.features, inception_params=params,
                               preprocess=args.preprocess, batch_size=args.batch_size, labels=labels, mesh=mesh)
    if fp is not None:
        results.update(fidelity_to_reference(images, fp))
    results["samples"] = args.samples
    print(f"{results['num_samples']} samples, {args.features} features"
          + (f" ({results['preprocess']})" if results.get("preprocess") else "") + f", reference {args.ref}")
    print(format_table(results))
    if jax.process_index() != 0:  # several hosts evaluated the same files; process 0 writes
        return 0
    os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
    with open(json_path, "w") as f:
        json.dump(json_ready(results), f, indent=2)
    print(f"-> {json_path}")
    return 0
