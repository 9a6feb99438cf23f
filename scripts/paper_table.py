"""The Q-DiT paper's main experiment as one command: DiT-XL/2 256, FP and W8A8 / W6A8 / W4A8 with the
baselines and Q-DiT, FID / sFID / IS / Precision on 10,000 samples, as a markdown + JSON table.

    python scripts/paper_table.py --ckpt DiT-XL-2-256x256.pt --vae sd-vae-ft-ema \\
        --ref VIRTUAL_imagenet256_labeled.npz --inception pt_inception-2015-12-05-6726825d.pth \\
        --num-samples 10000 --sampler ddim --steps 50 --cfg-scale 1.5 --out results/paper_table

Rows per precision (``--methods``): ``rtn`` (round-to-nearest, per-channel weights, static per-tensor
activations), ``rtn_group`` (+ group 128), ``rtn_group_dynamic`` (+ dynamic activations), ``qdit``
(group 128, dynamic activations, GPTQ) and, with ``--search-config W4A8=layers.json``,
``qdit_search`` (the searched per-layer groups). Every row samples from the same noise and labels
(classes in turn), decodes with the VAE and is scored against the same reference features.

``--dry-run`` runs every step (checkpoint conversion, calibration, quantization, sampling, VAE
decoding, evaluation, table) on a tiny random DiT (one block, 8x8x4 latents), a tiny random VAE (16x16 images;
the real run decodes 256x256), random Inception weights and a random reference batch, in about a
minute on a CPU. Its numbers mean nothing; it checks that the pipeline runs.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Any

import numpy as np

from qdit_jax.convert.torch_dit import convert_torch_checkpoint, key_table
from qdit_jax.convert.vae import load_diffusers_vae
from qdit_jax.diffusion.pipeline import SamplerConfig, default_labels, dit_apply_fn, generate
from qdit_jax.errors import QditError
from qdit_jax.io.images import save_samples
from qdit_jax.metrics.evaluate import (Reference, evaluate_samples, fidelity_to_reference, load_inception,
                                       prepare_reference)
from qdit_jax.models.dit import DiTConfig, get_2d_sincos_pos_embed
from qdit_jax.models.vae import VAEConfig, decode_latents, decode_to_uint8, vae_param_shapes
from qdit_jax.quant.calibration import CalibrationData, collect_calibration
from qdit_jax.quant.config import PRESETS, LayerQuant, QuantConfig, qdit_rules, read_per_layer, resolve
from qdit_jax.quant.interceptor import discover_layers
from qdit_jax.quant.quantize import quantize_model

METHODS = ("fp", "rtn", "rtn_group", "rtn_group_dynamic", "qdit", "qdit_search")
METRICS = ("fid", "sfid", "is", "prec", "recall")


@dataclasses.dataclass
class Setup:
    """Everything the experiment needs, loaded once."""

    params: Any
    cfg: DiTConfig
    vae_params: Any
    vae_cfg: VAEConfig
    inception: Any
    reference: str


def method_name(method: str, group: int) -> str:
    return {"fp": "FP", "rtn": "RTN (per-channel W, static per-tensor A)",
            "rtn_group": f"+ group {group}", "rtn_group_dynamic": f"+ group {group} + dynamic A",
            "qdit": "Q-DiT (group, dynamic A, GPTQ)", "qdit_search": "Q-DiT + searched groups"}[method]


def method_config(method: str, wbits: int, abits: int, group: int, per_layer: dict[str, LayerQuant] | None = None
                  ) -> QuantConfig:
    """The quantization recipe of one table row."""
    name = f"{method}_w{wbits}a{abits}"
    if method == "rtn":
        return QuantConfig(qdit_rules(wbits, abits, w_group=0, a_group=0), act_mode="static", name=name)
    rules = qdit_rules(wbits, abits, w_group=group, a_group=group)
    if method == "rtn_group":
        return QuantConfig(rules, act_mode="static", name=name)
    if method == "rtn_group_dynamic":
        return QuantConfig(rules, act_mode="dynamic", name=name)
    if method == "qdit":
        return QuantConfig(rules, act_mode="dynamic", gptq=True, name=name)
    if method == "qdit_search":
        if not per_layer:
            raise QditError(f"qdit_search for W{wbits}A{abits} needs --search-config W{wbits}A{abits}=layers.json")
        return QuantConfig(rules, per_layer=per_layer, act_mode="dynamic", gptq=True, name=name)
    raise QditError(f"unknown method {method!r}; choose from {METHODS}")


# ----------------------------------------------------------------------------- setup
def load_setup(args: argparse.Namespace) -> Setup:
    """The released checkpoint, VAE, Inception weights and reference batch named on the command line."""
    missing = [f"--{k}" for k in ("ckpt", "vae", "ref", "inception") if not getattr(args, k)]
    if missing:
        raise QditError(f"the real run needs {', '.join(missing)} (or pass --dry-run)")
    params, cfg = convert_torch_checkpoint(args.ckpt)
    vae_params, vae_cfg = load_diffusers_vae(args.vae)
    return Setup(params, cfg, vae_params, vae_cfg, load_inception(args.inception), args.ref)


def random_params(shapes: Any, seed: int = 0, gain: float = 2.0) -> Any:
    """Random params for a tree of shapes from NumPy: kernels N(0, gain / fan_in), BatchNorm / GroupNorm
    scales and variances 1, the rest 0 (Flax's own init runs op by op and takes long on a CPU)."""
    from flax import traverse_util

    rng = np.random.default_rng(seed)
    flat = {}
    for path, s in traverse_util.flatten_dict(shapes).items():
        leaf = path[-1]
        if leaf.endswith("kernel"):
            fan_in = int(np.prod(s.shape[:-1]))
            flat[path] = (rng.standard_normal(s.shape, np.float32) * np.sqrt(gain / fan_in)).astype(np.float32)
        else:
            flat[path] = np.full(s.shape, 1.0 if leaf in ("scale", "var") else 0.0, np.float32)
    return traverse_util.unflatten_dict(flat)


def random_inception_params(seed: int = 0) -> Any:
    """He-initialised random FID-Inception params with the real network's shapes."""
    from qdit_jax.models.inception import init_inception_params

    return init_inception_params(seed)


def dry_run_setup(out_dir: str, seed: int = 0, num_ref: int = 4) -> Setup:
    """A tiny random DiT written as an official .pt and converted back, a tiny VAE, random Inception
    weights and a random uint8 reference batch (ADM format)."""
    import torch

    rng = np.random.default_rng(seed)
    cfg = DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=1, num_heads=2, num_classes=10)
    state = {}
    for key, (_, shape) in key_table(cfg).items():
        if key == "pos_embed":
            value = get_2d_sincos_pos_embed(cfg.hidden_size, cfg.input_size // cfg.patch_size)[None]
        else:
            value = rng.standard_normal(shape) * 0.05
        state[key] = torch.from_numpy(np.asarray(value, np.float32))
    ckpt = os.path.join(out_dir, "dry_run_dit.pt")
    torch.save(state, ckpt)
    params, cfg = convert_torch_checkpoint(ckpt, num_heads=2)
    vae_cfg = VAEConfig(block_out_channels=(16, 16), layers_per_block=1, norm_num_groups=8)
    vae_params = random_params(vae_param_shapes(vae_cfg), seed, gain=1.0)
    side = cfg.input_size * vae_cfg.upsample_factor
    ref = os.path.join(out_dir, "dry_run_reference.npz")
    np.savez(ref, arr_0=rng.integers(0, 256, (num_ref, side, side, 3), dtype=np.uint8))
    return Setup(params, cfg, vae_params, vae_cfg, random_inception_params(seed), ref)


# ----------------------------------------------------------------------------- one row
def sample_images(apply_fn: Any, params: Any, setup: Setup, scfg: SamplerConfig, labels: np.ndarray, seed: int,
                  batch_size: int) -> np.ndarray:
    """Latents from the (quantized) DiT, decoded by the VAE to uint8 with the official DiT rounding."""
    latents = generate(apply_fn, params, setup.cfg, scfg, labels, seed=seed, batch_size=batch_size)
    out = [np.asarray(decode_to_uint8(decode_latents(setup.vae_params, setup.vae_cfg, latents[i:i + batch_size])))
           for i in range(0, len(latents), batch_size)]
    return np.concatenate(out)


def format_markdown(rows: list[dict[str, Any]]) -> str:
    """The paper's layout: Method, W/A bits, FID, sFID, IS, Precision."""
    def num(r: dict[str, Any], k: str) -> str:
        v = r.get(k)
        return "-" if v is None else f"{v:.2f}" if k != "precision" else f"{100 * v:.2f}"

    lines = ["| Method | W/A | FID ↓ | sFID ↓ | IS ↑ | Precision (%) ↑ |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['bits']} | {num(r, 'fid')} | {num(r, 'sfid')} | {num(r, 'is')} "
                     f"| {num(r, 'precision')} |")
    return "\n".join(lines)


def parse_search_configs(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, path = item.partition("=")
        if not sep or key.lower() not in PRESETS:
            raise QditError(f"--search-config takes PRECISION=PATH with PRECISION in {sorted(PRESETS)}, got {item!r}")
        out[key.lower()] = path
    return out


def write_search_config(path: str, cfg: DiTConfig, wbits: int, abits: int, groups: tuple[int, ...]) -> None:
    """A per-layer config in the search's output format, layer kinds cycling through ``groups`` (dry run)."""
    plan = resolve(QuantConfig(qdit_rules(wbits, abits, w_group=groups[0], a_group=groups[0])),
                   discover_layers(cfg)).as_dict()
    kinds = sorted({p.split("/", 1)[1] for p in plan})  # same group per layer kind: fewer GPTQ compiles
    layers = {p: lq.with_group(groups[kinds.index(p.split("/", 1)[1]) % len(groups)]).to_dict()
              for p, lq in plan.items()}
    with open(path, "w") as f:
        json.dump({"layers": layers}, f, indent=2)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the experiment; returns the JSON written to ``{out}/paper_table.json``."""
    t_start = time.time()
    os.makedirs(args.out, exist_ok=True)
    precisions = [p.strip().lower() for p in args.precisions.split(",") if p.strip()]
    bad = [p for p in precisions if p not in PRESETS]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad += [m for m in methods if m not in METHODS]
    if bad:
        raise QditError(f"unknown precisions/methods {bad}: precisions {sorted(PRESETS)}, methods {METHODS}")
    searches = parse_search_configs(args.search_config)
    scfg = SamplerConfig(sampler=args.sampler, steps=args.steps, cfg_scale=args.cfg_scale,
                         guidance_channels=args.guidance_channels)
    setup = dry_run_setup(args.out, args.seed, args.num_samples) if args.dry_run else load_setup(args)
    if args.dry_run and "qdit_search" in methods:
        for p in precisions:
            if p not in searches:
                searches[p] = os.path.join(args.out, f"dry_run_search_{p}.json")
                write_search_config(searches[p], setup.cfg, *PRESETS[p], groups=(args.group_size, args.group_size // 2))
    labels = default_labels(args.num_samples, setup.cfg.num_classes)
    print(f"reference features ({setup.reference}) ...", flush=True)
    ref: Reference = prepare_reference(setup.reference, metrics=METRICS, inception_params=setup.inception,
                                       batch_size=args.eval_batch_size)
    fp_apply = dit_apply_fn(setup.cfg)
    calib: CalibrationData | None = None
    if set(methods) - {"fp"}:
        print(f"calibration ({args.calib_samples} FP samples) ...", flush=True)
        calib = collect_calibration(fp_apply, setup.params, setup.cfg, scfg, num_samples=args.calib_samples,
                                    seed=args.seed + 1, batch_size=args.batch_size)

    rows: list[dict[str, Any]] = []
    fp_images = None

    def finish(method: str, bits: str, images: np.ndarray, t0: float) -> None:
        metrics = evaluate_samples(images, ref, metrics=METRICS, inception_params=setup.inception,
                                   batch_size=args.eval_batch_size)
        row = {"method": method_name(method, args.group_size), "key": method, "bits": bits,
               **{k: metrics.get(k) for k in ("fid", "sfid", "is", "is_std", "precision", "recall")}}
        if fp_images is not None and method != "fp":
            row.update(fidelity_to_reference(images, fp_images))
        row["seconds"] = round(time.time() - t0, 1)
        rows.append(row)
        if args.save_samples:
            save_samples(os.path.join(args.out, "samples", f"{method}_{bits.replace('/', '')}.npz"), images, labels)
        print(f"  {row['method']} {bits}: FID {row['fid']:.2f} sFID {row['sfid']:.2f} IS {row['is']:.2f} "
              f"P {row['precision']:.3f} ({row['seconds']}s)", flush=True)

    # FP is sampled whenever a quantized row runs: it is their fidelity reference.
    if "fp" in methods or calib is not None:
        t0 = time.time()
        images = sample_images(fp_apply, setup.params, setup, scfg, labels, args.seed, args.batch_size)
        if "fp" in methods:
            finish("fp", "32/32", images, t0)
        fp_images = images
    for prec in precisions:
        wbits, abits = PRESETS[prec]
        for method in methods:
            if method == "fp":
                continue
            t0 = time.time()
            per_layer = read_per_layer(searches[prec]) if method == "qdit_search" and prec in searches else None
            qcfg = method_config(method, wbits, abits, args.group_size, per_layer)
            qm = quantize_model(setup.params, setup.cfg, qcfg, calib=calib, batch_size=args.batch_size)
            images = sample_images(qm.apply_fn(), qm.bundle, setup, scfg, labels, args.seed, args.batch_size)
            finish(method, f"{wbits}/{abits}", images, t0)

    result = {"rows": rows, "num_samples": args.num_samples, "sampler": scfg.to_dict(), "group_size": args.group_size,
              "calib_samples": args.calib_samples, "reference": setup.reference, "preprocess": ref.preprocess,
              "dry_run": bool(args.dry_run), "seconds": round(time.time() - t_start, 1)}
    md = format_markdown(rows)
    with open(os.path.join(args.out, "paper_table.md"), "w") as f:
        f.write(md + "\n")
    with open(os.path.join(args.out, "paper_table.json"), "w") as f:
        json.dump(result, f, indent=2, allow_nan=False, default=lambda v: None)
    print(md)
    print(f"-> {args.out}/paper_table.md and paper_table.json ({result['seconds']}s)")
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", help="official DiT .pt (DiT-XL-2-256x256.pt)")
    p.add_argument("--vae", help="diffusers AutoencoderKL directory (stabilityai/sd-vae-ft-ema)")
    p.add_argument("--ref", help="ADM reference batch with images (VIRTUAL_imagenet256_labeled.npz)")
    p.add_argument("--inception", help="pt_inception-2015-12-05-6726825d.pth")
    p.add_argument("--out", required=True, help="output folder (paper_table.md, paper_table.json)")
    p.add_argument("--num-samples", type=int, default=10000)
    p.add_argument("--sampler", choices=["ddim", "ddpm"], default="ddim")
    p.add_argument("--steps", type=int, default=50, help="50 for DDIM, 250 for DDPM in the paper")
    p.add_argument("--cfg-scale", type=float, default=1.5)
    p.add_argument("--guidance-channels", type=int, default=3, help="eps channels CFG applies to (official DiT: 3)")
    p.add_argument("--precisions", default="w8a8,w6a8,w4a8")
    p.add_argument("--methods", default="fp,rtn,rtn_group,rtn_group_dynamic,qdit")
    p.add_argument("--search-config", action="append", default=[], metavar="W4A8=PATH",
                   help="per-layer config from `qdit search` for the qdit_search row (repeatable)")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--calib-samples", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--eval-batch-size", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-samples", action="store_true", help="keep each row's samples as .npz")
    p.add_argument("--dry-run", action="store_true", help="tiny random models and data: checks every step runs")
    return p


DRY_RUN_DEFAULTS = {"num_samples": 4, "steps": 2, "precisions": "w4a8", "calib_samples": 2, "batch_size": 4,
                    "eval_batch_size": 4, "group_size": 32, "methods": ",".join(METHODS)}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.dry_run:  # tiny defaults for flags the user left alone
        for k, v in DRY_RUN_DEFAULTS.items():
            if getattr(args, k) == parser.get_default(k):
                setattr(args, k, v)
    try:
        run(args)
    except QditError as e:
        print(f"paper_table: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
