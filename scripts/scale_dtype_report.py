"""Does storing weight scales in float16 change the quantized model? (bundled Fashion-MNIST DiT)

    python scripts/scale_dtype_report.py --presets w8a8,w4a8 --num-samples 16

For each preset (group 128, dynamic symmetric activations, round-to-nearest weights) it quantizes
the bundled model twice, with float32 and with float16 weight scales, and reports the bytes of the
quantized linears, the relative error of one forward against the FP model on held-out noisy inputs,
and, from the same noise and labels (DDIM 50, CFG 1.5), the PSNR of the samples against the FP
samples and of the float16-scale samples against the float32-scale ones.
"""
from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qdit_jax.diffusion.pipeline import SamplerConfig, default_labels, dit_apply_fn, generate  # noqa: E402
from qdit_jax.io.loading import load_model  # noqa: E402
from qdit_jax.metrics.fidelity import psnr  # noqa: E402
from qdit_jax.quant.config import preset  # noqa: E402
from qdit_jax.quant.quantize import quantize_model, weight_bytes  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="w8a8,w4a8")
    ap.add_argument("--num-samples", type=int, default=16)
    ap.add_argument("--steps", type=int, default=50)
    args = ap.parse_args()
    m = load_model(None)
    cfg, params = m.config, m.params
    scfg = SamplerConfig(steps=args.steps, cfg_scale=1.5, clip_denoised=True)
    labels = default_labels(args.num_samples, cfg.num_classes)
    fp_images = np.asarray(generate(dit_apply_fn(cfg), params, cfg, scfg, labels=labels, seed=7))
    r = np.random.default_rng(3)
    x = jnp.asarray(r.standard_normal((32, cfg.input_size, cfg.input_size, cfg.in_channels)), jnp.float32)
    t = jnp.asarray(r.integers(0, 1000, 32), jnp.int32)
    y = jnp.asarray(r.integers(0, cfg.num_classes, 32), jnp.int32)
    ref = np.asarray(dit_apply_fn(cfg)(params, x, t, y), np.float64)
    print("| preset | weight scales | quantized linears (bytes) | x bf16 | forward rel. error vs FP "
          "| PSNR vs FP (dB) | PSNR vs float32 scales (dB) |\n| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for name in args.presets.split(","):
        images = {}
        for sd in ("float32", "float16"):
            qm = quantize_model(params, cfg, preset(name, a_sym=True, scale_dtype=sd))
            wb = weight_bytes(qm)
            out = np.asarray(jax.jit(qm.apply_fn())(qm.bundle, x, t, y), np.float64)
            err = np.linalg.norm(out - ref) / np.linalg.norm(ref)
            images[sd] = np.asarray(generate(qm.apply_fn(), qm.bundle, cfg, scfg, labels=labels, seed=7))
            vs_fp = float(psnr(images[sd], fp_images, 2.0))  # mean over the samples
            vs32 = "-" if sd == "float32" else f"{float(psnr(images[sd], images['float32'], 2.0)):.2f}"
            print(f"| {name} | {sd} | {wb['quantized']:,} | {wb['quantized'] / wb['bf16']:.4f} | {err:.4e} "
                  f"| {vs_fp:.2f} | {vs32} |", flush=True)


if __name__ == "__main__":
    main()
