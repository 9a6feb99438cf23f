"""Rebuild the bundled default model (qdit_jax/assets/dit_fmnist) from the shared .pt checkpoint.

    python scripts/bundle_default_model.py --pt ../shared/models/dit_fmnist_fp16.pt

The checkpoint stores float16 tensors; the bundle keeps them as float16 (no rounding happens),
so the bundled params equal the converted checkpoint exactly.
"""
from __future__ import annotations

import argparse
import hashlib

from qdit_jax.convert.torch_dit import convert_torch_checkpoint
from qdit_jax.io.loading import BUNDLED_DIR, sampling_defaults_for, save_bundled


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pt", default="../shared/models/dit_fmnist_fp16.pt")
    ap.add_argument("--out", default=BUNDLED_DIR)
    args = ap.parse_args()
    params, cfg = convert_torch_checkpoint(args.pt)
    sha = hashlib.sha256(open(args.pt, "rb").read()).hexdigest()
    meta = {
        "sampling": sampling_defaults_for(cfg),
        "source": "dit_fmnist_fp16.pt (trained DiT on Fashion-MNIST, 32x32x1, EMA weights)",
        "source_sha256": sha,
        "dataset": "fashion_mnist",
    }
    save_bundled(params, cfg, meta, args.out)
    print(f"wrote {args.out} ({cfg})")


if __name__ == "__main__":
    main()
