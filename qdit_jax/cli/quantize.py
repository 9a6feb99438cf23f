"""qdit quantize [--ckpt DIR] (--preset w4a8 | --wbits 4 --abits 8 ...) --out QDIR

Quantize a DiT with Q-DiT: group quantization of weights and input activations along input
channels, sample-wise dynamic activation quantization, GPTQ for weights, an optional per-layer
group-size config from `qdit search`; or a baseline (--static: activation scales calibrated once;
--w-group 0 --a-group 0: per-channel / per-token). Writes a quantized checkpoint (integer codes,
4-bit packed two per byte, scales, zero points, the config) that `qdit sample --ckpt QDIR` runs.
With no --ckpt it quantizes the bundled Fashion-MNIST DiT and ends with a summary: sizes,
fidelity to the FP model on the same noise, and a grid of FP (top) vs quantized (bottom) samples.

    qdit quantize --preset w4a8 --gptq --calib-samples 32 --steps 25 --out runs/w4a8

Calibration sampling, static ranges and GPTQ Hessians split each batch over the local devices
(``--devices``, default all; ranges are identical to one device's, Hessians equal up to float32
summation order). Over several hosts each host samples its share of the calibration set, ranges
and Hessian sums are all-gathered and combined, and process 0 writes the checkpoint.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from qdit_jax.errors import QditError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", default=None, help="checkpoint directory or .pt (default: the bundled model)")
    p.add_argument("--out", required=True, help="output directory of the quantized checkpoint")
    p.add_argument("--overwrite", action="store_true")
    q = p.add_argument_group("quantization")
    q.add_argument("--preset", choices=["w8a8", "w6a8", "w4a8", "w4a4"], default=None,
                   help="bit widths; other flags still apply on top")
    q.add_argument("--wbits", type=int, default=None, help="weight bits 2..8 (default 4)")
    q.add_argument("--abits", type=int, default=None, help="activation bits 2..8, 0 = FP activations (default 8)")
    q.add_argument("--w-group", type=int, default=128, help="weight group size along input channels; 0 = per channel")
    q.add_argument("--a-group", type=int, default=128, help="activation group size; 0 = per token")
    q.add_argument("--w-sym", action="store_true", help="symmetric weights")
    q.add_argument("--a-sym", action="store_true", help="symmetric activations")
    q.add_argument("--method", choices=["max", "mse"], default="max", help="weight clipping: min-max or MSE search")
    q.add_argument("--format", choices=["int", "fp8_e4m3", "fp8_e5m2"], default="int",
                   help="code format of weights and activations")
    q.add_argument("--act-format", choices=["int", "fp8_e4m3", "fp8_e5m2"], default=None,
                   help="the activations' code format if it differs from --format, e.g. `--preset w4a8 --w-sym "
                        "--a-sym --act-format fp8_e4m3`: W4A8 with FP8 activations, run on fp8 tensor cores")
    q.add_argument("--scale-dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                   help="storage dtype of the weight scales; float16 brings W8 group-128 weights from 0.517x to "
                        "~0.509x their bf16 size (scales are rounded up to it before the codes are computed)")
    q.add_argument("--gptq", action="store_true", help="GPTQ weights (needs calibration)")
    q.add_argument("--static", action="store_true", help="static activation scales from calibration (baseline)")
    q.add_argument("--quant-attention", action="store_true", help="also quantize the attention matmul inputs q, k, v")
    q.add_argument("--per-layer", default=None, help="per-layer config JSON (e.g. from qdit search)")
    c = p.add_argument_group("calibration (Q-DiT: 256 samples, DDIM 50, CFG 1.5)")
    c.add_argument("--calib", default=None, help="load calibration data (.npz) instead of sampling it")
    c.add_argument("--save-calib", default=None, help="save the calibration data to this .npz")
    c.add_argument("--calib-samples", type=int, default=256)
    c.add_argument("--steps", type=int, default=50, help="DDIM steps for calibration and the summary")
    c.add_argument("--cfg-scale", type=float, default=1.5)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--batch-size", type=int, default=64)
    s = p.add_argument_group("summary")
    s.add_argument("--summary-samples", type=int, default=None,
                   help="FP vs quantized samples for the summary (default: 10 for the bundled model, 0 otherwise)")
    from qdit_jax.parallel.cli import add_parallel_arguments

    add_parallel_arguments(p)


def build_qconfig(args: argparse.Namespace):
    from qdit_jax.quant.config import PRESETS, QuantConfig, qdit_rules, read_per_layer

    wbits, abits = PRESETS[args.preset] if args.preset else (4, 8)
    wbits = args.wbits if args.wbits is not None else wbits
    abits = args.abits if args.abits is not None else abits
    if args.static and not abits:
        raise QditError("--static needs activation quantization (--abits > 0)")
    rules = qdit_rules(wbits, abits or None, w_group=args.w_group, a_group=args.a_group, w_sym=args.w_sym,
                       a_sym=args.a_sym, method=args.method, fmt=args.format, quantize_attention=args.quant_attention,
                       scale_dtype=args.scale_dtype, a_fmt=args.act_format)
    per_layer = read_per_layer(args.per_layer) if args.per_layer else {}
    name = args.preset or f"w{wbits}a{abits or 16}"
    return QuantConfig(rules, per_layer, act_mode="static" if args.static else "dynamic", gptq=args.gptq, name=name)


def run(args: argparse.Namespace) -> int:
    import jax

    from qdit_jax.diffusion.pipeline import SamplerConfig, dit_apply_fn
    from qdit_jax.io.loading import load_model
    from qdit_jax.quant.calibration import CalibrationData, collect_calibration
    from qdit_jax.quant.checkpoint import checkpoint_bytes, save_quantized
    from qdit_jax.quant.config import resolve
    from qdit_jax.quant.interceptor import discover_layers
    from qdit_jax.quant.quantize import quantize_model, weight_bytes

    from qdit_jax.parallel.cli import setup_from_args
    from qdit_jax.parallel.mesh import data_size, round_up

    qcfg = build_qconfig(args)  # flags are checked before anything slow happens
    scfg = SamplerConfig(steps=args.steps, cfg_scale=args.cfg_scale)
    mesh = setup_from_args(args)
    if mesh is not None and args.batch_size % data_size(mesh):
        args.batch_size = round_up(args.batch_size, data_size(mesh))
        print(f"note: --batch-size rounded up to {args.batch_size}, a multiple of the {data_size(mesh)} devices")
    writer = jax.process_index() == 0  # several hosts compute the same result; process 0 writes it
    nproc = jax.process_count()
    if nproc > 1 and args.save_calib:
        raise QditError("--save-calib with several hosts would save one host's share; calibrate on one host")
    model = load_model(args.ckpt)
    if model.quantization:
        raise QditError(f"{args.ckpt} is already quantized; pass the full-precision checkpoint")
    cfg = model.config
    plan = resolve(qcfg, discover_layers(cfg))  # validates the per-layer config against this model
    for pattern in plan.unmatched_rules:
        print(f"note: rule {pattern!r} matched no layer")
    d = model.sampling_defaults
    scfg = scfg.replace(clip_denoised=d.get("clip_denoised", False), guidance_channels=d.get("guidance_channels"))
    fp_apply = dit_apply_fn(cfg)
    n_summary = args.summary_samples if args.summary_samples is not None else (10 if args.ckpt is None else 0)
    if d.get("latent") and n_summary:
        print("note: the summary's sample grid shows latents' first 3 channels is not meaningful; skipping it")
        n_summary = 0
    t0 = time.time()
    calib = None
    hosts = None
    if args.calib:
        calib = CalibrationData.load(args.calib)
    elif qcfg.gptq or qcfg.act_mode == "static" or args.save_calib:
        share = None
        if nproc > 1:  # each host samples its share; statistics are combined across hosts below
            from qdit_jax.parallel.distributed import host_slice
            from qdit_jax.parallel.hosts import default_allgather

            if args.calib_samples < nproc:
                raise QditError(f"--calib-samples {args.calib_samples} is fewer than the {nproc} hosts; "
                                "give every host at least one sample")
            share, hosts = host_slice(args.calib_samples, jax.process_index(), nproc), default_allgather
        calib = collect_calibration(fp_apply, model.params, cfg, scfg, num_samples=args.calib_samples,
                                    seed=args.seed, batch_size=args.batch_size, progress=True, mesh=mesh,
                                    sample_range=share)
        print(f"calibration: {len(calib)} model inputs from {args.calib_samples} samples ({time.time() - t0:.1f}s)")
    if args.save_calib and calib is not None and writer:
        calib.save(args.save_calib)
    t1 = time.time()
    qm = quantize_model(model.params, cfg, qcfg, calib=calib, batch_size=args.batch_size, progress=True, mesh=mesh,
                        hosts=hosts)
    print(f"quantized {len(qm.plan)} layers ({qcfg.name}, {'GPTQ' if qcfg.gptq else 'round-to-nearest'} weights, "
          f"{qcfg.act_mode} activations) in {time.time() - t1:.1f}s")
    if not writer:
        return 0
    save_quantized(args.out, qm, model.params, overwrite=args.overwrite,
                   extra={"sampling": model.sampling_defaults, "source": model.meta.get("source")})
    wb = weight_bytes(qm)
    fp32_bytes = sum(int(np.asarray(v).size) * 4 for v in jax.tree_util.tree_leaves(model.params))
    disk = checkpoint_bytes(args.out)
    summary = {"out": args.out, "config": qcfg.name, "layers": len(qm.plan), "checkpoint_bytes": disk,
               "fp32_param_bytes": fp32_bytes, "quantized_linear_bytes": wb["quantized"],
               "fp32_linear_bytes": wb["fp32"], "bf16_linear_bytes": wb["bf16"]}
    print(f"checkpoint {args.out}: {disk / 2**20:.2f} MiB on disk (FP32 params {fp32_bytes / 2**20:.2f} MiB); "
          f"quantized linears {wb['quantized'] / 2**20:.2f} MiB = {wb['quantized'] / wb['bf16']:.3f} x their bf16 size")
    if n_summary:
        summary.update(_fidelity_summary(args, model, qm, scfg, calib, n_summary, mesh))
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return 0


def _fidelity_summary(args, model, qm, scfg, calib, n: int, mesh=None) -> dict:
    """Sample FP and quantized from the same noise; PSNR/SSIM and a side-by-side grid."""
    from qdit_jax.diffusion.pipeline import default_labels, dit_apply_fn, generate
    from qdit_jax.io.images import save_grid, side_by_side, to_uint8
    from qdit_jax.metrics.fidelity import psnr, ssim

    cfg = model.config
    labels = default_labels(n, cfg.num_classes)
    seed = args.seed + 1000  # not the calibration seed: fidelity is measured on unseen noise
    t0 = time.time()
    fp = generate(dit_apply_fn(cfg), model.params, cfg, scfg, labels, seed=seed, batch_size=args.batch_size,
                  progress=True, mesh=mesh)
    q = generate(qm.apply_fn(), qm.bundle, cfg, scfg, labels, seed=seed, batch_size=args.batch_size, progress=True,
                 mesh=mesh)
    fp01, q01 = (np.clip(fp, -1, 1) + 1) / 2, (np.clip(q, -1, 1) + 1) / 2
    p, s = float(psnr(q01, fp01, data_range=1.0)), float(ssim(q01, fp01, data_range=1.0))
    grid = os.path.join(args.out, "fp_vs_quantized.png")
    crop = 2 if cfg.input_size == 32 and cfg.in_channels == 1 else 0  # Fashion-MNIST: drop the padding
    u8 = lambda x: to_uint8(x)[:, crop:cfg.input_size - crop, crop:cfg.input_size - crop]
    save_grid(grid, side_by_side([u8(fp), u8(q)]), nrow=n, upscale=4)
    print(f"fidelity to FP on {n} samples (same noise, {scfg.sampler} {scfg.steps} steps, cfg {scfg.cfg_scale}): "
          f"PSNR {p:.2f} dB, SSIM {s:.4f}; grid (FP top, quantized bottom) -> {grid} ({time.time() - t0:.1f}s)")
    return {"summary_samples": n, "psnr_db": p, "ssim": s, "grid": grid}
