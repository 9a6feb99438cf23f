"""qdit sample [--ckpt DIR] --num-samples N --out samples.npz

Sample images from a converted or quantized checkpoint (or, with no --ckpt, the bundled
Fashion-MNIST DiT) with DDIM or DDPM and classifier-free guidance. Writes uint8 images and
labels to an .npz (``arr_0``, as the ADM evaluator reads it) and a PNG grid beside it.

    qdit sample --num-samples 100 --steps 50 --cfg-scale 1.5 --out out/samples.npz
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np

from qdit_jax.errors import QditError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", default=None, help="checkpoint directory or .pt (default: the bundled model)")
    p.add_argument("--num-samples", type=int, default=100)
    p.add_argument("--sampler", choices=["ddim", "ddpm"], default="ddim")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--eta", type=float, default=0.0)
    p.add_argument("--cfg-scale", type=float, default=1.5)
    p.add_argument("--guidance-channels", default=None,
                   help="eps channels CFG is applied to: 'all', or a number (official DiT: 3); default from the checkpoint")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--noise", default=None, help=".npy of initial noise (N, H, W, C)")
    p.add_argument("--labels", default=None, help=".npy of int labels (N,); default: classes in turn")
    clip = p.add_mutually_exclusive_group()
    clip.add_argument("--clip-denoised", dest="clip_denoised", action="store_true", default=None)
    clip.add_argument("--no-clip-denoised", dest="clip_denoised", action="store_false")
    p.add_argument("--batch-size", default="64",
                   help="global batch (a multiple of the devices), or 'auto': the largest that fits 80%% of each "
                        "device's free memory, from XLA's memory analysis of the sampler")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="compute dtype")
    p.add_argument("--execution", choices=["fake", "real"], default="fake",
                   help="quantized checkpoints: 'fake' simulates quantization in float (the paper's way); "
                        "'real' runs int8 / fp8 / packed-int4 matmuls (same numbers up to accumulation order, "
                        "less memory; meant for GPUs: on CPU it is slower than 'fake', see docs/RESULTS.md)")
    p.add_argument("--real-backend", choices=["auto", "xla", "pallas"], default="auto",
                   help="with --execution real: 'auto' (group-wise layers through the Pallas GPU kernel where it "
                        "applies, XLA otherwise), 'xla' or 'pallas'")
    p.add_argument("--keep-w4-packed", action="store_true",
                   help="with --execution real: keep packed 4-bit weights packed in device memory (half W8's "
                        "bytes) instead of unpacking group-128 layers to int8 once at load for the Hopper "
                        "group GEMM (W4A8 g128 at 0.99x bf16 unpacked, 0.28x packed on an H100)")
    p.add_argument("--vae", default=None, help="diffusers AutoencoderKL directory to decode latents")
    p.add_argument("--out", required=True, help="output .npz (a PNG grid is written beside it)")
    from qdit_jax.parallel.cli import add_parallel_arguments

    add_parallel_arguments(p)  # --devices, --coordinator, --num-processes, --process-id


def parse_guidance(value: str | None, default: int | None) -> int | None:
    if value is None:
        return default
    if value == "all":
        return None
    try:
        return int(value)
    except ValueError:
        raise QditError(f"--guidance-channels must be 'all' or an integer, got {value!r}") from None


def load_array(path: str, what: str) -> np.ndarray:
    if not os.path.exists(path):
        raise QditError(f"{what} file {path} does not exist")
    try:
        return np.load(path, allow_pickle=False)
    except Exception as e:
        raise QditError(f"{what} file {path} is not a readable .npy array ({type(e).__name__})") from None


def run(args: argparse.Namespace) -> int:
    from qdit_jax.diffusion.pipeline import SamplerConfig, check_labels, default_labels, generate
    from qdit_jax.io.images import save_grid, save_samples, to_uint8
    from qdit_jax.io.loading import load_model
    from qdit_jax.quant.runtime import model_apply_fn

    if args.num_samples < 1:
        raise QditError(f"--num-samples must be >= 1, got {args.num_samples}")
    if args.batch_size != "auto":
        try:
            args.batch_size = int(args.batch_size)
        except ValueError:
            raise QditError(f"--batch-size must be an integer or 'auto', got {args.batch_size!r}") from None
    if not args.out.endswith(".npz"):
        raise QditError(f"--out must name an .npz file, got {args.out!r}")
    import jax

    from qdit_jax.parallel.cli import setup_from_args
    from qdit_jax.parallel.distributed import host_output_path, host_slice

    mesh = setup_from_args(args)  # joins a multi-host run first, when asked
    pid, nproc = jax.process_index(), jax.process_count()
    # Validate the sampler flags before the (slow) model load.
    scfg = SamplerConfig(sampler=args.sampler, steps=args.steps, eta=args.eta, cfg_scale=args.cfg_scale)
    model = load_model(args.ckpt)
    cfg = model.config if args.dtype is None else model.config.replace(dtype=args.dtype)
    d = model.sampling_defaults
    clip = d.get("clip_denoised", False) if args.clip_denoised is None else args.clip_denoised
    scfg = scfg.replace(clip_denoised=clip,
                        guidance_channels=parse_guidance(args.guidance_channels, d.get("guidance_channels")))
    if args.labels:
        labels = check_labels(load_array(args.labels, "--labels"), cfg.num_classes)
        if len(labels) != args.num_samples:
            raise QditError(f"--labels holds {len(labels)} labels but --num-samples is {args.num_samples}")
    else:
        labels = default_labels(args.num_samples, cfg.num_classes)
    noise = load_array(args.noise, "--noise") if args.noise else None
    vae = None
    if d.get("latent") or args.vae:
        if not args.vae:
            raise QditError("this model works on VAE latents: pass --vae DIR (diffusers sd-vae-ft-ema/-mse) to decode them")
        from qdit_jax.convert.vae import load_diffusers_vae

        vae = load_diffusers_vae(args.vae)
    real_options = None
    if args.execution == "real":
        from qdit_jax.quant.real import RealOptions

        real_options = RealOptions(backend=args.real_backend)
    apply_fn, params = model_apply_fn(model, cfg, args.execution, real_options,
                                      unpack_w4=False if args.keep_w4_packed else None)
    start, stop = host_slice(len(labels), pid, nproc)  # each host samples its slice of the global indices
    if args.batch_size == "auto":
        from qdit_jax.diffusion.pipeline import auto_batch_size

        args.batch_size = auto_batch_size(apply_fn, params, cfg, scfg, mesh=mesh, num_samples=stop - start)
        print(f"--batch-size auto: {args.batch_size}")
    labels, noise = labels[start:stop], (noise[start:stop] if noise is not None else None)
    out_path = host_output_path(args.out, pid, nproc)
    t0 = time.time()
    x = generate(apply_fn, params, cfg, scfg, labels, seed=args.seed, noise=noise,
                 batch_size=args.batch_size, progress=True, mesh=mesh, start_index=start)
    elapsed = time.time() - t0
    if vae is not None:
        from qdit_jax.models.vae import decode_latents

        vparams, vcfg = vae
        x = np.concatenate([np.asarray(decode_latents(vparams, vcfg, x[i:i + args.batch_size]))
                            for i in range(0, len(x), args.batch_size)])
    images = to_uint8(x)
    extra = {"indices": np.arange(start, stop)} if nproc > 1 else {}
    save_samples(out_path, images, labels, **extra)
    grid_path = os.path.splitext(out_path)[0] + ".png"
    upscale = max(1, 256 // images.shape[1])
    save_grid(grid_path, images[: min(len(images), 100)], nrow=cfg.num_classes if cfg.num_classes <= 10 else None,
              upscale=upscale)
    q = model.quantization
    kind = f"quantized ({q.get('name', 'custom')}, {args.execution})" if q else "full precision"
    print(f"sampled {len(images)} images ({kind}, {scfg.sampler} {scfg.steps} steps, cfg {scfg.cfg_scale}) "
          f"in {elapsed:.1f}s -> {out_path} and {grid_path}")
    return 0
