"""Q-DiT accuracy report on the bundled trained Fashion-MNIST DiT (the table in docs/RESULTS.md).

    python scripts/fmnist_report.py --num-samples 1000 --out runs/fmnist_report

For FP and W8A8 / W6A8 / W4A8 / W4A4 with
  (a) round-to-nearest per-channel weights + static per-tensor activations,
  (b) + group 128 (weights and activations, static per-group activation scales),
  (c) + dynamic activations (Q-DiT's sample-wise dynamic quantization),
  (d) + GPTQ weights,
it samples the same labels from the same noise (DDIM 50, CFG 1.5 on all eps channels, clipped
x0) and reports: the Frechet distance to the Fashion-MNIST test set in the feature space of the
shipped classifier, the classifier's accuracy on the sampled labels, and PSNR / SSIM of each
sample against the FP sample from the same noise. Calibration (static scales, GPTQ Hessians)
uses Q-DiT's recipe (FP samples, DDIM 50, CFG 1.5) on seeds disjoint from the evaluation seeds.
One compiled sampler is shared by all models with the same activation settings.

--real (issue 6, accuracy of the real low-bit path): methods (c) and (d) with symmetric
activations (the real path's requirement) are sampled twice from the same noise, in fake-quant
and through the real int8 / packed-int4 execution (``quant.real``), and the table gets a row for
each plus the largest |fake - real| sample difference and the PSNR of real against fake:

    python scripts/fmnist_report.py --real --presets w8a8,w4a8 --methods c,d --out runs/fmnist_real

``--group 0`` quantizes per channel / per token instead of in groups of 128 (the real path's
per-token kernels), ``--format fp8_e4m3`` uses fp8 codes (8-bit presets), ``--dtype bfloat16``
computes in bf16 (where the fp8 GEMM kernels with their epilogues apply).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qdit_jax.diffusion.pipeline import SamplerConfig, default_labels, dit_apply_fn, generate, make_sample_fn  # noqa: E402
from qdit_jax.io import fmnist  # noqa: E402
from qdit_jax.io.images import save_grid, side_by_side, to_uint8  # noqa: E402
from qdit_jax.io.loading import load_model  # noqa: E402
from qdit_jax.metrics.fidelity import psnr, ssim  # noqa: E402
from qdit_jax.metrics.frechet import feature_statistics, frechet_distance  # noqa: E402
from qdit_jax.models import fmnist_classifier as clf  # noqa: E402
from qdit_jax.quant.calibration import collect_calibration  # noqa: E402
from qdit_jax.quant.config import PRESETS, preset  # noqa: E402
from qdit_jax.quant.quantize import quantize_model  # noqa: E402
from qdit_jax.quant.real import RealOptions, build_real  # noqa: E402

METHODS = {
    "a": ("RTN per-channel W, static per-tensor A", dict(w_group=0, a_group=0, act_mode="static")),
    "b": ("+ group 128", dict(w_group=128, a_group=128, act_mode="static")),
    "c": ("+ dynamic activations", dict(w_group=128, a_group=128, act_mode="dynamic")),
    "d": ("+ GPTQ (Q-DiT)", dict(w_group=128, a_group=128, act_mode="dynamic", gptq=True)),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-samples", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--cfg-scale", type=float, default=1.5)
    ap.add_argument("--calib-samples", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=500)
    ap.add_argument("--presets", default="w8a8,w6a8,w4a8,w4a4")
    ap.add_argument("--methods", default="a,b,c,d")
    ap.add_argument("--skip", default="", help="preset:method pairs to skip, e.g. w4a8:a,w4a8:b")
    ap.add_argument("--eval-seed", type=int, default=1234)
    ap.add_argument("--calib-seed", type=int, default=0)
    ap.add_argument("--out", default="runs/fmnist_report")
    ap.add_argument("--real", action="store_true",
                    help="symmetric activations; each model sampled in fake-quant and through the real low-bit path")
    ap.add_argument("--real-backend", default="auto", choices=["auto", "xla", "pallas"])
    ap.add_argument("--group", type=int, default=None,
                    help="weight and activation group size for every preset (0: per-channel weights, per-token "
                         "activations; default: the presets' 128)")
    ap.add_argument("--format", default="int", choices=["int", "fp8_e4m3"],
                    help="code format of weights and activations (fp8_e4m3: 8-bit presets only)")
    ap.add_argument("--act-format", default=None, choices=["int", "fp8_e4m3"],
                    help="the activations' format if it differs from --format (e.g. w4a8 with fp8_e4m3 "
                         "activations; symmetric weights then)")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                    help="compute dtype of every model (default: the bundled config's float32); bfloat16 engages "
                         "the real path's bf16-only GPU kernels (kernels.scaled_gemm)")
    args = ap.parse_args()
    if args.eval_seed == args.calib_seed:
        raise SystemExit("--eval-seed must differ from --calib-seed")
    os.makedirs(args.out, exist_ok=True)
    t_start = time.time()

    model = load_model(None)
    cfg, params = model.config, model.params
    if args.dtype:
        cfg = cfg.replace(dtype=args.dtype)
    scfg = SamplerConfig(steps=args.steps, cfg_scale=args.cfg_scale, clip_denoised=True, guidance_channels=None)
    labels = default_labels(args.num_samples, cfg.num_classes)
    cparams = clf.load_classifier()

    test_images, _ = fmnist.load_fashion_mnist("test")
    ref_feats, _ = clf.embed(test_images, cparams)
    ref_mu, ref_sigma = feature_statistics(ref_feats)
    n_floor = min(args.num_samples, 10000)
    try:  # the real-data floor: FD of n training images to the test set
        train_images, _ = fmnist.load_fashion_mnist("train")
        floor_feats, _ = clf.embed(train_images[:n_floor], cparams)
        floor = float(frechet_distance(*feature_statistics(floor_feats), ref_mu, ref_sigma))
    except Exception as e:  # the train split is optional here
        print(f"note: no real-data floor ({e})")
        floor = float("nan")

    def metrics(x: np.ndarray, fp: np.ndarray | None) -> dict:
        imgs = fmnist.from_model_space(x)
        feats, logits = clf.embed(imgs, cparams)
        out = {"fd": float(frechet_distance(*feature_statistics(feats), ref_mu, ref_sigma)),
               "accuracy": float(np.mean(np.argmax(logits, -1) == labels))}
        if fp is not None:
            a = (np.clip(x, -1, 1)[:, 2:-2, 2:-2] + 1) / 2
            b = (np.clip(fp, -1, 1)[:, 2:-2, 2:-2] + 1) / 2
            out["psnr"] = float(psnr(a, b, data_range=1.0))
            out["ssim"] = float(ssim(a, b, data_range=1.0))
        return out

    t0 = time.time()
    fp = generate(dit_apply_fn(cfg), params, cfg, scfg, labels, seed=args.eval_seed, batch_size=args.batch_size)
    rows = [{"preset": "fp", "method": "FP", **metrics(fp, None), "seconds": time.time() - t0}]
    print(f"FP: {rows[-1]} (real-data floor FD train-vs-test at n={n_floor}: {floor:.3f})", flush=True)

    t0 = time.time()
    calib = collect_calibration(dit_apply_fn(cfg), params, cfg, scfg, num_samples=args.calib_samples,
                                seed=args.calib_seed, batch_size=args.batch_size)
    print(f"calibration: {len(calib)} inputs in {time.time() - t0:.1f}s", flush=True)

    samplers: dict = {}
    keep = {}
    for name in args.presets.split(","):
        if name not in PRESETS:
            raise SystemExit(f"unknown preset {name}")
        for m in args.methods.split(","):
            if f"{name}:{m}" in args.skip.split(","):
                continue
            label, kw = METHODS[m]
            if args.group is not None:
                kw, label = dict(kw, w_group=args.group, a_group=args.group), label + f", group {args.group}"
            if args.format != "int":  # fp8 codes are symmetric (no zero point)
                kw, label = dict(kw, fmt=args.format, w_sym=True, a_sym=True), label + f", {args.format}"
            if args.act_format and args.act_format != args.format:  # fp8 activations need symmetric int weights
                kw, label = (dict(kw, a_fmt=args.act_format, w_sym=True, a_sym=True),
                             label + f", {args.act_format} activations")
            if args.real:
                if kw.get("act_mode") != "dynamic":
                    raise SystemExit(f"--real needs dynamic activations: method {m} is static (use --methods c,d)")
                kw, label = dict(kw, a_sym=True), label + ", symmetric A"
            t0 = time.time()
            qm = quantize_model(params, cfg, preset(name, **kw), calib=calib, batch_size=args.batch_size)
            tq = time.time() - t0
            key = (qm.qcfg.act_mode, tuple((p, lq.act) for p, lq in qm.plan.items()))
            if key not in samplers:
                samplers[key] = make_sample_fn(qm.apply_fn(), cfg, scfg)
            x = generate(None, qm.bundle, cfg, scfg, labels, seed=args.eval_seed, batch_size=args.batch_size,
                         sample_fn=samplers[key])
            rows.append({"preset": name, "method": f"({m}) {label}", **metrics(x, fp), "quantize_s": tq,
                         "seconds": time.time() - t0})
            print(f"{name} ({m}): {rows[-1]}", flush=True)
            with open(os.path.join(args.out, "rows_partial.json"), "w") as f:
                json.dump(rows, f, indent=1)
            if args.real:
                t0 = time.time()
                rm = build_real(qm)
                xr = generate(rm.apply_fn(RealOptions(backend=args.real_backend)), rm.variables(), cfg, scfg, labels,
                              seed=args.eval_seed, batch_size=args.batch_size)
                a01 = (np.clip(xr, -1, 1) + 1) / 2
                b01 = (np.clip(x, -1, 1) + 1) / 2
                rows.append({"preset": name, "method": f"({m}) {label}, REAL low-bit", **metrics(xr, fp),
                             "max_abs_diff_vs_fake": float(np.max(np.abs(xr - x))),
                             "psnr_vs_fake": float(psnr(a01, b01, data_range=1.0)),
                             "weight_bytes": rm.weight_bytes(), "seconds": time.time() - t0})
                print(f"{name} ({m}) real: {rows[-1]}", flush=True)
            if name == "w4a8":
                keep[m] = x
    n_show = min(20, args.num_samples)
    show = [to_uint8(fp[:n_show])[:, 2:-2, 2:-2]] + [to_uint8(keep[m][:n_show])[:, 2:-2, 2:-2] for m in sorted(keep)]
    save_grid(os.path.join(args.out, "fp_vs_w4a8.png"), side_by_side(show), nrow=n_show, upscale=3)

    lines = ["| W/A | method | FD (classifier features) | accuracy | PSNR vs FP (dB) | SSIM vs FP |"
             + (" max abs real-fake | PSNR real vs fake (dB) |" if args.real else ""),
             "| --- | --- | ---: | ---: | ---: | ---: |" + (" ---: | ---: |" if args.real else "")]
    for r in rows:
        line = (f"| {r['preset'].upper()} | {r['method']} | {r['fd']:.3f} | {r['accuracy']:.3f} | "
                f"{r.get('psnr', float('inf')):.2f} | {r.get('ssim', 1.0):.4f} |")
        if args.real:
            line += (f" {r['max_abs_diff_vs_fake']:.2e} | {r['psnr_vs_fake']:.2f} |" if "psnr_vs_fake" in r
                     else " - | - |")
        lines.append(line)
    table = "\n".join(lines)
    print(table)
    result = {"rows": rows, "floor_fd_train_vs_test": float(floor), "num_samples": args.num_samples,
              "steps": args.steps, "cfg_scale": args.cfg_scale, "calib_inputs": len(calib),
              "device": jax.devices()[0].device_kind, "jax": jax.__version__, "wall_s": time.time() - t_start}
    with open(os.path.join(args.out, "report.json"), "w") as f:
        json.dump(result, f, indent=2)
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write(table + "\n")


if __name__ == "__main__":
    main()
