"""Float64 NumPy references of the Q-DiT group quantizer, fp8 fake quantization and GPTQ.

Written from the formulas (not from qdit_jax) so that tests compare two independent versions.
Groups are consecutive elements of the last axis; group_size 0 is the whole axis.
"""
from __future__ import annotations

import numpy as np


def groups(x: np.ndarray, group_size: int) -> np.ndarray:
    g = x.shape[-1] if group_size == 0 else group_size
    return x.reshape(*x.shape[:-1], x.shape[-1] // g, g)


def int_qparams_from_range(lo, hi, bits: int, symmetric: bool):
    """Scale and zero point of one clipped range (hi = absmax when symmetric); float64."""
    lo, hi = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = hi / qmax
        scale = np.where(scale > 0, scale, 1.0)
        return scale, np.zeros_like(scale)
    qmax = 2**bits - 1
    scale = (hi - lo) / qmax
    # Degenerate (constant) group: scale |c| makes c a code; 1 for an all-zero group.
    scale = np.where(scale > 0, scale, np.where(np.abs(hi) > 0, np.abs(hi), 1.0))
    zp = np.clip(np.round(-lo / scale), 0, qmax)
    return scale, zp


def int_fake_from_params(xg, scale, zp, bits: int, symmetric: bool) -> np.ndarray:
    qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)
    q = np.clip(np.round(xg / scale[..., None]) + zp[..., None], qmin, qmax)
    return (q - zp[..., None]) * scale[..., None]


def int_qparams(x, bits, group_size, symmetric, clip_ratio=1.0, method="max", include_zero=False):
    """Per-group (scale, zero point) of Q-DiT's quantizer, 'max' or the 100-step L2.4 search."""
    xg = groups(np.asarray(x, np.float64), group_size)
    if symmetric:
        hi = np.abs(xg).max(-1)
        lo = -hi
    else:
        hi, lo = xg.max(-1), xg.min(-1)
        if include_zero:
            hi, lo = np.maximum(hi, 0), np.minimum(lo, 0)
    if method == "max":
        return int_qparams_from_range(lo * clip_ratio, hi * clip_ratio, bits, symmetric)
    best = None
    best_score = np.full(hi.shape, np.inf)
    for i in range(100):
        r = clip_ratio * (1.0 - 0.001 * i)
        s, z = int_qparams_from_range(lo * r, hi * r, bits, symmetric)
        score = np.mean(np.abs(xg - int_fake_from_params(xg, s, z, bits, symmetric)) ** 2.4, -1)
        better = score < best_score
        best = (s, z) if best is None else (np.where(better, s, best[0]), np.where(better, z, best[1]))
        best_score = np.where(better, score, best_score)
    return best


def int_fake_quant(x, bits, group_size, symmetric, clip_ratio=1.0, method="max", include_zero=False):
    xg = groups(np.asarray(x, np.float64), group_size)
    s, z = int_qparams(x, bits, group_size, symmetric, clip_ratio, method, include_zero)
    return int_fake_from_params(xg, s, z, bits, symmetric).reshape(np.shape(x))


def fp8_fake_quant(x, fmt_dtype, group_size, clip_ratio=1.0):
    """fp8 with per-group scale absmax/fmax, through ml_dtypes' float8 casts."""
    import ml_dtypes

    fmax = float(ml_dtypes.finfo(fmt_dtype).max)
    xg = groups(np.asarray(x, np.float32), group_size)
    absmax = np.abs(xg).max(-1) * np.float32(clip_ratio)
    scale = np.where(absmax > 0, absmax / np.float32(fmax), np.float32(1.0)).astype(np.float32)
    y = np.clip(xg / scale[..., None], -fmax, fmax).astype(fmt_dtype).astype(np.float32)
    return (y * scale[..., None]).reshape(np.shape(x)), scale


def gptq(w, h, bits, group_size, symmetric, percdamp=0.01, act_order=False, method="max"):
    """Column-by-column GPTQ in float64 (no blocks): returns the fake-quant weights (out, in).

    A group's parameters are taken from the fully error-updated weights when its first column is
    reached (static groups from the original weights with act_order).
    """
    w = np.array(w, np.float64)
    h = np.array(h, np.float64)
    rows, n = w.shape
    gs = n if group_size == 0 else group_size
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    perm = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(n)
    h += percdamp * np.mean(np.diag(h)) * np.eye(n)
    if act_order:
        static = int_qparams(w, bits, group_size, symmetric, method=method)
    w = w[:, perm]
    h = h[perm][:, perm]
    u = np.linalg.cholesky(np.linalg.inv(h)).T
    q = np.zeros_like(w)
    for j in range(n):
        if act_order:
            g = perm[j] // gs
            s, z = static[0][:, g], static[1][:, g]
        elif j % gs == 0:
            s_all, z_all = int_qparams(w[:, j : j + gs], bits, 0, symmetric, method=method)
            s, z = s_all[:, 0], z_all[:, 0]
        q[:, j] = int_fake_from_params(w[:, j, None, None], s[:, None], z[:, None], bits, symmetric)[:, 0, 0]
        err = (w[:, j] - q[:, j]) / u[j, j]
        w[:, j:] -= np.outer(err, u[j, j:])
    out = np.zeros_like(q)
    out[:, perm] = q
    return out
