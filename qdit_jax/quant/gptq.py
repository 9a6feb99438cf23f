"""GPTQ (Frantar et al. 2022) for one linear layer, in JAX, with Q-DiT's group quantizer.

``accumulate_hessian`` keeps the running ``H = 2/N X^T X`` of a layer's inputs over calibration
tokens. ``gptq_quantize_weight`` then quantizes a weight stored ``(out, in)`` column by column,
spreading each column's rounding error over the not-yet-quantized columns through the upper
Cholesky factor of ``H^-1``:

* dead inputs (``H_ii == 0``) get ``H_ii = 1`` and a zero weight column; ``percdamp`` times the
  mean diagonal is added to the diagonal (1% by default);
* columns are processed in blocks of ``block_size``; inside a block updates are immediate, the
  rest of the matrix receives the block's errors in one matmul afterwards (lazy batch updates);
* group ``g`` (``spec.group_size`` consecutive input columns, 0 = the whole row) gets its scale and
  zero point from the error-updated weights of its columns when the first of them is reached,
  exactly as the group quantizer (:mod:`qdit_jax.quant.quantizers`) would compute them on those
  weights. Unlike the reference GPTQ code, which reads the group from a copy that misses the
  current block's updates, the group is read fully updated, so the result does not depend on
  ``block_size`` and equals the plain column-by-column algorithm.
* ``act_order=True`` processes columns by decreasing ``H_ii``; group parameters are then fixed
  up front from the (dead-zeroed) original weights ("static groups"), so groups stay contiguous
  in the original column order and remain storable as ``(codes, qparams)``.

The returned weights are exactly ``dequantize(codes, qparams, group_size)``. Arithmetic is
float32 (float64 when x64 is enabled and the inputs are float64); matmuls use HIGHEST precision
so GPUs do not drop to TF32. The loops are ``lax.fori_loop``: one compilation per shape and spec.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from qdit_jax.errors import QditError
from qdit_jax.quant import formats as F
from qdit_jax.quant.quantizers import QParams, QuantSpec, fake_of_groups, params_of_groups, quantize_spec, zp_dtype

_HI = lax.Precision.HIGHEST


def init_hessian(width: int, dtype: Any = jnp.float32) -> tuple[jax.Array, int]:
    """An empty running Hessian ``(width, width)`` and its token count 0."""
    return jnp.zeros((width, width), dtype), 0


def accumulate_hessian(h: jax.Array, n: Any, x: jax.Array) -> tuple[jax.Array, Any]:
    """Add the inputs ``x`` (``(..., in)``, flattened to ``m`` tokens) to the running ``2/N X^T X``.

    ``H <- H * n / (n + m) + 2 / (n + m) * x^T x``; returns ``(H, n + m)``. (The reference code
    counts samples rather than tokens; the two differ by a constant factor GPTQ is invariant to.)
    """
    if h.ndim != 2 or h.shape[0] != h.shape[1] or x.shape[-1] != h.shape[0]:
        raise QditError(
            f"Hessian {tuple(h.shape)} does not match inputs {tuple(x.shape)}: expected a square "
            f"(in, in) Hessian with in = the inputs' last axis"
        )
    x2 = x.reshape(-1, x.shape[-1]).astype(h.dtype)
    total = n + x2.shape[0]
    h = h * (n / total) + (2.0 / total) * jnp.matmul(x2.T, x2, precision=_HI)
    return h, total


@functools.partial(jax.jit, static_argnames=("block", "percdamp", "act_order"))
def _prepare(
    w: jax.Array, h: jax.Array, block: int, percdamp: float, act_order: bool
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:
    """Dead columns, damping, column order, padding and the upper Cholesky factor of ``H^-1``.

    Independent of the quantizer spec, so it compiles once per shape. Returns the dead-zeroed
    weights, the permuted padded weights, the factor ``U`` (``H^-1 = U^T U``), the permutation
    and whether the factor is finite.
    """
    dt = F.compute_dtype(jnp.promote_types(w.dtype, h.dtype))
    w, h = w.astype(dt), h.astype(dt)
    n = w.shape[1]
    npad = -(-n // block) * block
    dead = jnp.diagonal(h) == 0
    h = h + jnp.diag(dead.astype(dt))
    w = jnp.where(dead[None, :], jnp.zeros((), dt), w)
    perm = jnp.argsort(-jnp.diagonal(h)) if act_order else jnp.arange(n)
    h = h + (percdamp * jnp.mean(jnp.diagonal(h))) * jnp.eye(n, dtype=dt)

    # Permute, then pad to whole blocks with independent zero columns (identity Hessian block).
    wp = jnp.pad(w[:, perm], ((0, 0), (0, npad - n)))
    hp = jnp.eye(npad, dtype=dt).at[:n, :n].set(h[perm][:, perm])
    # H = R R^T with R upper (the Cholesky factor of the index-reversed H, reversed back); then
    # H^-1 = R^-T R^-1, so U = R^-1 is the upper Cholesky factor of H^-1: one factorisation and
    # one triangular solve instead of factor, invert, factor again.
    r = jnp.linalg.cholesky(hp[::-1, ::-1])[::-1, ::-1]
    u = jax.scipy.linalg.solve_triangular(r, jnp.eye(npad, dtype=dt), lower=False)
    return w, wp, u, perm, jnp.all(jnp.isfinite(u))


@functools.partial(jax.jit, static_argnames=("spec", "block", "act_order"))
def _gptq_loop(
    w: jax.Array, wp: jax.Array, u: jax.Array, perm: jax.Array, spec: QuantSpec, block: int, act_order: bool
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The blocked GPTQ column loop; returns fake-quant weights, scales and float zero points."""
    dt = wp.dtype
    rows, n = w.shape
    npad = wp.shape[1]
    gs = F.check_group_size(n, spec.group_size)
    n_groups = n // gs

    gidx = jnp.concatenate([perm // gs, jnp.full((npad - n,), n_groups - 1, perm.dtype)])
    if act_order:
        scale, zp = params_of_groups(F.to_groups(w, gs), spec)  # static groups from the original weights
    else:
        scale = jnp.ones((rows, n_groups), dt)
        zp = jnp.zeros((rows, n_groups), dt)

    def block_body(b: jax.Array, carry: tuple) -> tuple:
        wbuf, qbuf, scale, zp = carry
        i1 = b * block
        w1 = lax.dynamic_slice(wbuf, (0, i1), (rows, block))
        urows = lax.dynamic_slice(u, (i1, 0), (block, npad))
        ublk = lax.dynamic_slice(urows, (0, i1), (block, block))

        def col_body(i: jax.Array, c: tuple) -> tuple:
            w1, e1, q1, scale, zp = c
            p = i1 + i
            if not act_order:
                def refresh(sz: tuple) -> tuple:
                    # The group's weights with every error so far applied (earlier blocks + this one).
                    grp = lax.dynamic_slice(wbuf, (0, p), (rows, gs)) - jnp.matmul(
                        e1, lax.dynamic_slice(urows, (0, p), (block, gs)), precision=_HI
                    )
                    s, z = params_of_groups(grp[:, None, :], spec)
                    g = p // gs
                    return (lax.dynamic_update_slice(sz[0], s, (0, g)), lax.dynamic_update_slice(sz[1], z, (0, g)))

                scale, zp = lax.cond((p % gs == 0) & (p < n), refresh, lambda sz: sz, (scale, zp))
            g = gidx[p]
            s = lax.dynamic_slice(scale, (0, g), (rows, 1))
            z = lax.dynamic_slice(zp, (0, g), (rows, 1))
            col = w1[:, i]
            q = fake_of_groups(col[:, None, None], s, z, spec)[:, 0, 0]
            err = (col - q) / ublk[i, i]
            w1 = w1 - err[:, None] * ublk[i][None, :]
            return w1, e1.at[:, i].set(err), q1.at[:, i].set(q), scale, zp

        zeros = jnp.zeros((rows, block), dt)
        w1, e1, q1, scale, zp = lax.fori_loop(0, block, col_body, (w1, zeros, zeros, scale, zp))
        qbuf = lax.dynamic_update_slice(qbuf, q1, (0, i1))
        wbuf = wbuf - jnp.matmul(e1, urows, precision=_HI)  # lazy update of all later columns
        return wbuf, qbuf, scale, zp

    init = (wp, jnp.zeros_like(wp), scale, zp)
    _, qbuf, scale, zp = lax.fori_loop(0, npad // block, block_body, init)
    q = jnp.zeros((rows, n), dt).at[:, perm].set(qbuf[:, :n])
    return q, scale, zp


def gptq_quantize_weight(
    w_out_in: jax.Array,
    hessian: jax.Array,
    *,
    spec: QuantSpec,
    block_size: int = 128,
    percdamp: float = 0.01,
    act_order: bool = False,
) -> tuple[jax.Array, jax.Array, QParams]:
    """GPTQ-quantize a weight ``(out, in)`` with the input Hessian ``(in, in)``.

    Returns ``(w_fake_quant, codes, qparams)`` with ``w_fake_quant == dequantize(codes, qparams,
    spec.group_size, w_out_in.dtype)`` and qparams of shape ``(out, n_groups)``.
    """
    if not isinstance(spec, QuantSpec):
        raise QditError(f"spec must be a QuantSpec, got {type(spec).__name__}")
    if w_out_in.ndim != 2:
        raise QditError(f"GPTQ quantizes a 2-D weight stored (out, in), got shape {tuple(w_out_in.shape)}")
    n = w_out_in.shape[1]
    if hessian.shape != (n, n):
        raise QditError(f"Hessian of shape {tuple(hessian.shape)} does not match the weight's {n} input columns; expected ({n}, {n})")
    F.check_group_size(n, spec.group_size)
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise QditError(f"block_size must be a positive integer, got {block_size!r}")
    if not 0.0 <= float(percdamp) < 1e3:
        raise QditError(f"percdamp must be a non-negative fraction of the mean diagonal (e.g. 0.01), got {percdamp!r}")
    block = min(block_size, n)
    w, wp, u, perm, finite = _prepare(jnp.asarray(w_out_in), jnp.asarray(hessian), block, float(percdamp), bool(act_order))
    if not bool(finite):
        raise QditError(
            f"GPTQ: the damped Hessian is not positive definite (percdamp={percdamp}); "
            f"raise percdamp or collect more calibration tokens"
        )
    q, scale, zp = _gptq_loop(w, wp, u, perm, spec, block, bool(act_order))
    qparams = QParams(scale, zp.astype(zp_dtype(spec)))
    codes = quantize_spec(q, qparams, spec)
    return q.astype(w_out_in.dtype), codes, qparams
