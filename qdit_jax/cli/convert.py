"""qdit convert CKPT --out DIR

Convert a PyTorch DiT checkpoint to a qdit checkpoint (Orbax params + config.json) that every
other command loads. CKPT is an official DiT ``.pt`` (released or training checkpoint; float32,
float16 or bfloat16) or a diffusers ``DiTTransformer2DModel`` directory / weights file. The
model config is inferred from the tensor shapes. The write is atomic.

    qdit convert DiT-XL-2-256x256.pt --out ckpt/dit-xl2-256
"""
from __future__ import annotations

import argparse
import os

from qdit_jax.errors import QditError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("ckpt", help="official .pt, or a diffusers transformer directory / .safetensors / .bin")
    p.add_argument("--out", required=True, help="output checkpoint directory")
    p.add_argument("--format", choices=["auto", "official", "diffusers"], default="auto")
    p.add_argument("--num-heads", type=int, default=None,
                   help="attention heads (cannot be read from shapes; official widths are known)")
    p.add_argument("--diffusers-config", default=None, help="config.json for a bare diffusers weights file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")


def _is_diffusers(path: str) -> bool:
    if os.path.isdir(path):
        return True
    return path.endswith((".safetensors",))


def run(args: argparse.Namespace) -> int:
    from qdit_jax.io.checkpoint import save_checkpoint
    from qdit_jax.io.loading import sampling_defaults_for

    if not os.path.exists(args.ckpt):
        raise QditError(f"checkpoint {args.ckpt} does not exist")
    fmt = args.format
    if fmt == "auto":
        fmt = "diffusers" if _is_diffusers(args.ckpt) else "official"
    if fmt == "official":
        from qdit_jax.convert.torch_dit import convert_torch_checkpoint

        params, cfg = convert_torch_checkpoint(args.ckpt, num_heads=args.num_heads)
        extra = {"sampling": sampling_defaults_for(cfg)}
    else:
        from qdit_jax.convert.diffusers_dit import convert_diffusers_dit

        params, cfg = convert_diffusers_dit(args.ckpt, args.diffusers_config)
        extra = {"sampling": sampling_defaults_for(cfg)}
    extra["source"] = os.path.abspath(args.ckpt)
    extra["source_format"] = fmt
    save_checkpoint(args.out, params, cfg, extra=extra, overwrite=args.overwrite)
    n = sum(int(v.size) for v in __import__("jax").tree_util.tree_leaves(params))
    print(f"converted {args.ckpt} ({fmt}) -> {args.out}: {n:,} parameters, "
          f"hidden {cfg.hidden_size}, depth {cfg.depth}, heads {cfg.num_heads}, patch {cfg.patch_size}, "
          f"input {cfg.input_size}x{cfg.input_size}x{cfg.in_channels}, {cfg.num_classes} classes")
    return 0
