"""Statistics over a batch sharded on the 'data' axis, reduced with XLA collectives.

Each device reduces its slice (min/max of layer inputs, sums of x^T x, feature sums and outer
products) and ``lax.pmin`` / ``pmax`` / ``psum`` over 'data' combine the slices inside the
compiled program (an all-reduce); batches are then folded on the host. Min/max equal the
single-device results exactly; sums equal them up to float32 summation order.

Padding rows (when the data does not fill the last batch) repeat real rows: harmless for
min/max, and given weight 0 in every sum.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from qdit_jax.errors import QditError
from qdit_jax.parallel.mesh import DATA, check_divisible, data_parallel, data_size, round_up


def _padded_batches(n: int, batch_size: int, mesh: Mesh) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(row indices, 0/1 weights) of fixed-size global batches; the last one wraps with weight 0."""
    check_divisible(batch_size, data_size(mesh), "batch size")
    for start in range(0, n, batch_size):
        idx = np.arange(start, start + batch_size)
        yield idx % n, (idx < n).astype(np.float32)


# ----------------------------------------------------------------------------- layer inputs


def layer_stats_fn(cfg: Any, plan: Mapping[str, Any], reduce: Callable[[str, int, jax.Array, jax.Array], Any],
                   all_reduce: Callable[[Any], Any], combine: Callable[[Any, Any], Any], mesh: Mesh, *,
                   act_quant: bool = False, static: Mapping[str, Any] | None = None) -> Callable:
    """Compiled ``(params, x, t, y, w) -> {(path, i): stat}`` over a batch split on 'data'.

    ``reduce(path, i, a, w)`` folds one device's layer input ``a`` (rows weighted by ``w``, shape
    (local batch,)); ``all_reduce`` combines the devices' results (inside shard_map: lax.psum,
    pmin, pmax over 'data'); ``combine`` folds several inputs of one layer. Build once, call per
    batch (and per GPTQ block: params are an argument, so nothing recompiles).
    """
    from qdit_jax.models.dit import DiT
    from qdit_jax.quant.config import LayerQuant
    from qdit_jax.quant.interceptor import quantized

    model = DiT(cfg)
    run_plan = dict(plan) if act_quant else {p: LayerQuant(lq.weight, None) for p, lq in plan.items()}

    def local(params, x, t, y, w):
        acc: dict[tuple[str, int], Any] = {}

        def tap(path: str, i: int, a: jax.Array) -> None:
            if isinstance(a, jax.Array) and jnp.issubdtype(a.dtype, jnp.floating):
                if a.shape[0] != w.shape[0]:
                    raise QditError(f"layer {path} input has leading size {a.shape[0]}, not the batch {w.shape[0]}")
                r = reduce(path, i, a, w)
                if r is not None:
                    acc[(path, i)] = r if (path, i) not in acc else combine(acc[(path, i)], r)

        with quantized(run_plan, static if act_quant else None, tap):
            model.apply({"params": params}, x, t, y)
        return all_reduce(acc)

    return data_parallel(local, mesh, (P(), P(DATA), P(DATA), P(DATA), P(DATA)), P())


def fold_batches(fn: Callable, params: Any, calib: Any, mesh: Mesh, batch_size: int,
                 combine: Callable[[Any, Any], Any]) -> dict[tuple[str, int], Any]:
    """Run ``layer_stats_fn``'s function over the calibration set in fixed global batches and fold
    the per-batch results on the host (padding rows weigh 0)."""
    total: dict[tuple[str, int], Any] = {}
    batch_size = min(batch_size, round_up(len(calib), data_size(mesh)))
    for idx, w in _padded_batches(len(calib), batch_size, mesh):
        part = fn(params, jnp.asarray(calib.x[idx]), jnp.asarray(calib.t[idx]), jnp.asarray(calib.y[idx]),
                  jnp.asarray(w))
        total = part if not total else {k: combine(total[k], v) for k, v in part.items()}
    return total


def sharded_layer_input_stats(params: Any, cfg: Any, plan: Mapping[str, Any], calib: Any,
                              reduce: Callable[[str, int, jax.Array, jax.Array], Any],
                              all_reduce: Callable[[Any], Any], combine: Callable[[Any, Any], Any], mesh: Mesh,
                              *, act_quant: bool = False, static: Mapping[str, Any] | None = None,
                              batch_size: int = 64) -> dict[tuple[str, int], Any]:
    """``quant.calibration.layer_input_stats`` with the batch split over ``mesh`` (see
    ``layer_stats_fn`` for ``reduce`` / ``all_reduce`` / ``combine``)."""
    fn = layer_stats_fn(cfg, plan, reduce, all_reduce, combine, mesh, act_quant=act_quant, static=static)
    return fold_batches(fn, params, calib, mesh, batch_size, combine)


def calibrate_static_sharded(params: Any, cfg: Any, plan: Mapping[str, Any], calib: Any, mesh: Mesh,
                             batch_size: int = 64, hosts: Callable | None = None) -> dict[str, list]:
    """``quant.calibration.calibrate_static`` (per-group min/max of layer inputs) with the batch
    sharded and the ranges combined by pmin/pmax all-reduces."""
    from qdit_jax.quant.calibration import group_range, merge_ranges, ranges_to_qparams

    def reduce(path: str, i: int, a: jax.Array, w: jax.Array):
        spec = plan[path].act
        return None if spec is None else group_range(a, spec)

    def all_reduce(acc):
        return {k: (jax.lax.pmin(lo, DATA), jax.lax.pmax(hi, DATA)) for k, (lo, hi) in acc.items()}

    ranges = sharded_layer_input_stats(params, cfg, plan, calib, reduce, all_reduce, merge_ranges, mesh,
                                       batch_size=batch_size)
    if hosts is not None:  # this host's share of the calibration set; combine with the others
        from qdit_jax.parallel.hosts import ranges_across_hosts

        ranges = ranges_across_hosts(ranges, hosts)
    return ranges_to_qparams(ranges, plan)


class ShardedHessianRunner:
    """GPTQ Hessians ``2/n sum x^T x`` of every weight-quantized layer's (quantized) input, with
    the batch sharded and the sums combined by a psum all-reduce; compiled once and called per
    GPTQ block like ``quant.quantize._HessianRunner``."""

    def __init__(self, cfg: Any, plan: Mapping[str, Any], static: Mapping[str, Any] | None, mesh: Mesh,
                 hosts: Callable | None = None) -> None:
        self.hosts = hosts
        weighted = {p for p, lq in plan.items() if lq.weight is not None}

        def reduce(path: str, i: int, a: jax.Array, w: jax.Array):
            if i != 0 or path not in weighted:
                return None
            per_row = int(np.prod(a.shape[1:-1]))
            a2 = (a.astype(jnp.float32) * w.reshape((-1,) + (1,) * (a.ndim - 1))).reshape(-1, a.shape[-1])
            return a2.T @ a2, jnp.sum(w) * per_row

        self.mesh = mesh
        self.fn = layer_stats_fn(cfg, plan, reduce, lambda acc: jax.lax.psum(acc, DATA), self._combine, mesh,
                                 act_quant=True, static=static)

    @staticmethod
    def _combine(u: Any, v: Any) -> Any:
        return u[0] + v[0], u[1] + v[1]

    def __call__(self, params: Any, calib: Any, batch_size: int) -> dict[str, jax.Array]:
        from qdit_jax.quant.quantize import hessians_from_sums

        sums = fold_batches(self.fn, params, calib, self.mesh, batch_size, self._combine)
        return hessians_from_sums({p: v for (p, _), v in sums.items()}, self.hosts)


def hessians_sharded(params: Any, cfg: Any, plan: Mapping[str, Any], calib: Any, mesh: Mesh, *,
                     static: Mapping[str, Any] | None = None, batch_size: int = 64) -> dict[str, jax.Array]:
    """One call of :class:`ShardedHessianRunner`."""
    return ShardedHessianRunner(cfg, plan, static, mesh)(params, calib, batch_size)


# ----------------------------------------------------------------------------- FID features


def feature_moments_fn(mesh: Mesh) -> Callable:
    """Compiled ``(features, weights, shift) -> (sum w (f - shift), sum w (f - shift)^T (f - shift))``
    with the rows split over 'data' and the two sums all-reduced (psum)."""

    def local(f: jax.Array, w: jax.Array, shift: jax.Array):
        d = (f.astype(jnp.float32) - shift) * w[:, None]
        return jax.lax.psum((d.sum(axis=0), d.T @ d), DATA)

    return data_parallel(local, mesh, (P(DATA), P(DATA), P()), P())


def feature_statistics_sharded(features: Any, mesh: Mesh, batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """``metrics.frechet.feature_statistics`` (float64 mean, ``np.cov`` covariance) with each batch's
    sums computed sharded over ``mesh``; batches are accumulated in float64 on the host, shifted by
    the first batch's mean as the single-device accumulator does."""
    x = np.asarray(features)
    if x.ndim != 2 or x.shape[0] < 2:
        raise QditError(f"features must be (num_samples >= 2, dim), got shape {x.shape}")
    if not np.isfinite(x).all():
        raise QditError("features contain NaN or inf: check the images fed to the feature network")
    fn = feature_moments_fn(mesh)
    n = x.shape[0]
    batch_size = min(batch_size, round_up(n, data_size(mesh)))
    shift = x[:batch_size].astype(np.float64).mean(axis=0)
    total = np.zeros(x.shape[1]), np.zeros((x.shape[1], x.shape[1]))
    for idx, w in _padded_batches(n, batch_size, mesh):
        s, o = fn(jnp.asarray(x[idx], jnp.float32), jnp.asarray(w), jnp.asarray(shift, jnp.float32))
        total = total[0] + np.asarray(s, np.float64), total[1] + np.asarray(o, np.float64)
    mean_d = total[0] / n
    sigma = (total[1] - n * np.outer(mean_d, mean_d)) / (n - 1)
    return shift.astype(np.float32).astype(np.float64) + mean_d, (sigma + sigma.T) / 2
