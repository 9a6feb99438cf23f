"""cuBLASLt's block-scaled fp8 GEMM at Q-DiT's granularity, through PyTorch, beside its per-channel fp8
and bf16 GEMMs: what a library kernel does with 128-wide K groups on both operands.

    python scripts/bench_cublaslt_group.py --batch 256

Needs torch with CUDA 12.9+ on a Hopper GPU (the optional torch extra; not part of qdit_jax). For each
DiT-XL/2 linear shape (M = batch x 256 tokens): ``torch._scaled_mm`` with one float32 scale per (token,
128-channel group) for the activations and per (output channel, group) for the weights (cuBLASLt's
VEC128 x VEC128 scaling, the group-128 W8A8 of the real path), with row-wise (per token x per channel)
scales, and a bf16 matmul; each output checked against a float64 evaluation of the same formula on
the first rows, each time a median of CUDA-event-timed rounds of back-to-back calls after warm-up, on
random operands. Why: ``kernels.scaled_gemm``'s group-128 GEMMs run at 1.4-1.7x its per-channel time
(docs/PERF_NOTES.md); this says what cuBLASLt's block-scaled kernel achieves on the same card, i.e.
whether a cuBLASLt route (an XLA FFI call) could reach issue 6's group-128 target.
"""
from __future__ import annotations

import argparse

import numpy as np

from qdit_jax.perf.timing import cuda_event_median

SHAPES = {"proj / q / k / v": (1152, 1152), "fc1": (1152, 4608), "fc2": (4608, 1152)}


def reference_rows(a, b, sa, sw, rows: int) -> np.ndarray:
    """float64 ``sum_g sa[m, g] sw[n, g] (a_g @ b_g^T)`` for the first ``rows`` rows."""
    a64 = a[:rows].float().cpu().numpy().astype(np.float64)
    b64 = b.float().cpu().numpy().astype(np.float64)
    sa64, sw64 = sa[:rows].cpu().numpy().astype(np.float64), sw.cpu().numpy().astype(np.float64)
    out = np.zeros((rows, b.shape[0]))
    for g in range(sa.shape[1]):
        ks = slice(128 * g, 128 * (g + 1))
        out += (a64[:, ks] @ b64[:, ks].T) * sa64[:, g:g + 1] * sw64[:, g][None, :]
    return out


def scale_layouts(sa, sw):
    """Candidate (scale_a, scale_b) tensors for VEC128 x VEC128: torch has taken them as (M, K/128) and
    (K/128, N) or (N, K/128), contiguous or outer-dim-major, depending on the version."""
    yield "a (M,G) M-major, b (G,N) N-major", sa.t().contiguous().t(), sw.t().contiguous()
    yield "a (M,G) M-major, b (N,G) N-major", sa.t().contiguous().t(), sw.t().contiguous().t()
    yield "a (M,G) row-major, b (N,G) row-major", sa.contiguous(), sw.contiguous()
    yield "a (M,G) row-major, b (G,N) row-major", sa.contiguous(), sw.t().contiguous()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--check-rows", type=int, default=256)
    args = p.parse_args()
    import torch

    dev = torch.device("cuda")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}, cuBLASLt "
          f"{torch._C._cuda_getCompiledVersion() if hasattr(torch._C, '_cuda_getCompiledVersion') else '?'}",
          flush=True)
    m = args.batch * 256
    g = torch.Generator(device=dev).manual_seed(0)
    f8 = torch.float8_e4m3fn
    for name, (k, n) in SHAPES.items():
        a = (torch.randn(m, k, device=dev, generator=g) * 3).clamp(-448, 448).to(f8)
        b = (torch.randn(n, k, device=dev, generator=g) * 3).clamp(-448, 448).to(f8)
        groups = k // 128
        sa = torch.rand(m, groups, device=dev, generator=g) * 0.02 + 0.001
        sw = torch.rand(n, groups, device=dev, generator=g) * 0.02 + 0.001
        flop = 2 * m * n * k
        ref = reference_rows(a, b, sa, sw, args.check_rows)
        ab, bb = a.to(torch.bfloat16), b.to(torch.bfloat16)
        t_bf16 = cuda_event_median(lambda: ab @ bb.t(), args.repeats)
        row_a, row_w = sa[:, :1].contiguous(), sw[:, :1].t().contiguous()
        t_row = cuda_event_median(lambda: torch._scaled_mm(a, b.t(), row_a, row_w, out_dtype=torch.bfloat16), args.repeats)
        print(f"{name:18s} M={m} K={k} N={n}: bf16 {t_bf16 * 1e6:8.1f} us ({flop / t_bf16 / 1e12:6.1f} TFLOP/s), "
              f"fp8 per channel {t_row * 1e6:8.1f} us ({flop / t_row / 1e12:6.1f})", flush=True)
        for label, s_a, s_b in scale_layouts(sa, sw):
            try:
                out = torch._scaled_mm(a, b.t(), s_a, s_b, out_dtype=torch.float32)
            except Exception as e:  # noqa: BLE001 - report which layouts this torch / cuBLASLt accepts
                print(f"    group-128 [{label}]: rejected: {str(e).splitlines()[0][:160]}", flush=True)
                continue
            got = out[:args.check_rows].double().cpu().numpy()
            rel = float(np.abs(got - ref).max() / np.abs(ref).max())
            t = cuda_event_median(lambda s_a=s_a, s_b=s_b: torch._scaled_mm(a, b.t(), s_a, s_b, out_dtype=torch.bfloat16),
                          args.repeats)
            print(f"    group-128 [{label}]: {t * 1e6:8.1f} us ({flop / t / 1e12:6.1f} TFLOP/s), x per channel "
                  f"{t / t_row:5.2f}; max |diff| / max |ref| vs float64 {rel:.2e}", flush=True)
            break


if __name__ == "__main__":
    main()
