"""Attention kernels at a DiT's shape: cuDNN's fused attention (what ``DiTConfig.attention="cudnn"``
runs) against ``models.attention_mosaic``'s Mosaic GPU kernel (Hopper; "auto"'s first choice there) and
``models.attention_kernel``'s Triton kernel, by head size and launch shape.

    python scripts/bench_attention.py --batch 256 --tokens 256 --heads 16 --head-sizes 72 64

Each time is the median of rounds of back-to-back calls after warm-up (``perf.timing.chained_median``)
on random normal operands; each output is checked against the float32 reference on the first samples.
``--kernels``: the device kernels of one traced call of each (what a cuDNN call runs besides its
kernel); ``--once``: one launch of each and nothing else (for a profiler such as ``ncu``);
``--torch``: PyTorch's SDPA backends on the same shapes and layout (CUDA-event timed), where torch
is installed, as an outside reference; ``--tiles``: more launch shapes of ours to time.
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from qdit_jax.models import attention_kernel as ak
from qdit_jax.models import attention_mosaic as am
from qdit_jax.perf.timing import chained_median, cuda_event_median
from qdit_jax.perf.trace import kernel_events, traced_calls


def device_kernels(fn, args: tuple) -> list[tuple[str, float]]:
    """(kernel name, us) of the device stream events of one traced call, in order."""
    with traced_calls(fn, [args], 1) as path:
        return [(name, (end - start) / 1e3) for start, end, name in kernel_events(path, kernel_names=True)]


def torch_sdpa(shape: tuple[int, int, int, int], repeats: int) -> None:
    """Median us per call of each PyTorch SDPA backend on (B, T, N, D) bf16 tensors viewed as (B, N, T, D)."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (torch.randn(*shape, device="cuda", dtype=torch.bfloat16).transpose(1, 2) for _ in range(3))
    for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        try:
            with sdpa_kernel(backend):
                sec = cuda_event_median(lambda: F.scaled_dot_product_attention(q, k, v), repeats)
            print(f"d={shape[-1]:3d} torch {backend.name:26s} {sec * 1e6:8.1f} us", flush=True)
        except RuntimeError as e:
            print(f"d={shape[-1]:3d} torch {backend.name}: {str(e)[:200]}", flush=True)


CONFIGS = [ak.Tiles(bq, bkv, w, st, mode) for bq, bkv, w, st in ((64, 64, 4, 3), (64, 64, 4, 2), (128, 64, 8, 3),
                                                                   (64, 128, 4, 2)) for mode in ak.TAIL_MODES]


def parse_tiles(text: str) -> ak.Tiles:
    """``--tiles``' block_q,block_kv,warps,stages,tail as ``Tiles``, or an argparse error naming the bad one."""
    parts = text.split(",")
    if len(parts) != 5 or not all(p.isdigit() for p in parts[:4]) or parts[4] not in ak.TAIL_MODES:
        raise argparse.ArgumentTypeError(f"tiles {text!r}: expected block_q,block_kv,warps,stages,tail with tail one of "
                                         f"{ak.TAIL_MODES}, e.g. 64,256,8,1,masked")
    return ak.Tiles(*(int(p) for p in parts[:4]), parts[4])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-sizes", type=int, nargs="+", default=[72])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--all-configs", action="store_true", help="time every launch shape in CONFIGS, not only the default")
    ap.add_argument("--tiles", nargs="+", type=parse_tiles, default=[],
                    help="launch shapes to time besides the default: block_q,block_kv,warps,stages,tail "
                         "(e.g. 64,256,8,1,masked)")
    ap.add_argument("--kernels", action="store_true", help="list the device kernels of one call of cuDNN's and ours")
    ap.add_argument("--torch", action="store_true", help="also time PyTorch's SDPA backends (needs torch with CUDA)")
    ap.add_argument("--once", action="store_true",
                    help="only launch cuDNN's call and ours once each (after compiling), for a profiler such as ncu")
    args = ap.parse_args()
    print(f"device: {jax.devices()[0].device_kind}; jax {jax.__version__}")
    for d in args.head_sizes:
        ks = jax.random.split(jax.random.key(d), 3)
        q, k, v = (jax.random.normal(kk, (args.batch, args.tokens, args.heads, d), jnp.bfloat16) for kk in ks)
        cudnn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn"))
        if args.once:
            for label, fn in (("cudnn", cudnn), ("triton", ak.attention_triton)):
                fn.lower(q, k, v).compile()
                jax.block_until_ready(fn(q, k, v))
                print(f"d={d:3d} {label}: launched once", flush=True)
            continue
        ref = np.asarray(ak.attention_reference(q[:4], k[:4], v[:4]), np.float32)
        out, sec = chained_median(cudnn, (q, k, v), args.repeats)
        base = sec
        err = np.abs(np.asarray(out[:4], np.float32) - ref).max()
        print(f"d={d:3d} cudnn                      {sec * 1e6:8.1f} us  1.000x  max|out-ref| {err:.2e}", flush=True)
        if args.kernels:
            for label, fn in (("cudnn", cudnn), ("triton", ak.attention_triton)):
                print(f"d={d:3d} {label} kernels: " + "; ".join(f"{n[:70]} {us:.1f} us" for n, us in device_kernels(fn, (q, k, v))))
        if args.torch:
            torch_sdpa(q.shape, args.repeats)
        ok, why = am.mosaic_attention_applies(q.shape, q.dtype)
        if ok:
            out, sec = chained_median(am.attention_mosaic, (q, k, v), args.repeats)
            err = np.abs(np.asarray(out[:4], np.float32) - ref).max()
            print(f"d={d:3d} mosaic                     {sec * 1e6:8.1f} us  {base / sec:.3f}x  max|out-ref| {err:.2e}",
                  flush=True)
        else:
            print(f"d={d:3d} mosaic: {why}", flush=True)
        for tiles in (CONFIGS if args.all_configs else [ak.default_tiles(d)]) + args.tiles:
            ok, why = ak.attention_applies(q.shape, q.dtype, tiles)
            if not ok:
                print(f"d={d:3d} triton {tiles}: {why}")
                continue
            try:
                out, sec = chained_median(lambda q, k, v, t=tiles: ak.attention_triton(q, k, v, t), (q, k, v), args.repeats)
            except Exception as e:  # noqa: BLE001 - report and go on to the next launch shape
                print(f"d={d:3d} triton {tuple(tiles)} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
                continue
            err = np.abs(np.asarray(out[:4], np.float32) - ref).max()
            print(f"d={d:3d} triton {str(tuple(tiles)):32s} {sec * 1e6:8.1f} us  {base / sec:.3f}x  "
                  f"max|out-ref| {err:.2e}", flush=True)


if __name__ == "__main__":
    main()
