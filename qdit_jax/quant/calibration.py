"""Calibration data (Q-DiT's recipe) and the statistics gathered from it.

Calibration data are model inputs ``(x_t, t, y)`` recorded while the full-precision model samples
with classifier-free guidance: for every sample, the inputs at randomly chosen steps of its DDIM
trajectory, both the conditional and the unconditional (null label) copy, as the guided forward
sees them. Q-DiT uses 256 samples, DDIM 50 and CFG 1.5.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from qdit_jax.diffusion.pipeline import ApplyFn, SamplerConfig, check_labels, default_labels, initial_noise, make_sample_fn
from qdit_jax.errors import QditError
from qdit_jax.models.dit import DiT, DiTConfig
from qdit_jax.quant.config import LayerQuant
from qdit_jax.quant.interceptor import quantized
from qdit_jax.quant.quantizers import QParams, QuantSpec, qparams_from_range


@dataclasses.dataclass
class CalibrationData:
    """Model inputs: x (M, H, W, C) float32, t (M,) int32 original timesteps, y (M,) int32 labels.

    ``final`` holds the full-precision samples of the run (N, H, W, C), when recorded.
    """

    x: np.ndarray
    t: np.ndarray
    y: np.ndarray
    final: np.ndarray | None = None

    def __post_init__(self) -> None:
        if not (len(self.x) == len(self.t) == len(self.y)):
            raise QditError(f"calibration arrays disagree in length: x {len(self.x)}, t {len(self.t)}, y {len(self.y)}")

    def __len__(self) -> int:
        return len(self.x)

    def batches(self, batch_size: int) -> Iterator[tuple[jax.Array, jax.Array, jax.Array]]:
        """Fixed-size batches (the last one wraps around) so one compiled forward serves all.
        Fine for min/max statistics; sums must use ``weighted_batches`` to count each input once."""
        for x, t, y, _ in self.weighted_batches(batch_size):
            yield x, t, y

    def weighted_batches(self, batch_size: int) -> Iterator[tuple[jax.Array, jax.Array, jax.Array, jax.Array]]:
        """Like ``batches`` plus a (B,) float weight: 1 for each input's first appearance, 0 for
        the wrapped-around repeats that pad the last batch."""
        n = len(self)
        batch_size = min(batch_size, n)
        for start in range(0, n, batch_size):
            pos = np.arange(start, start + batch_size)
            idx = pos % n
            w = (pos < n).astype(np.float32)
            yield jnp.asarray(self.x[idx]), jnp.asarray(self.t[idx]), jnp.asarray(self.y[idx]), jnp.asarray(w)

    def save(self, path: str) -> None:
        arrays = {"x": self.x, "t": self.t, "y": self.y}
        if self.final is not None:
            arrays["final"] = self.final
        tmp = path + ".tmp.npz"
        np.savez(tmp, **arrays)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> "CalibrationData":
        if not os.path.exists(path):
            raise QditError(f"calibration file {path} does not exist")
        try:
            with np.load(path, allow_pickle=False) as f:
                missing = [k for k in ("x", "t", "y") if k not in f]
                if missing:
                    raise QditError(f"calibration file {path} lacks {missing}; make it with qdit quantize --save-calib")
                return cls(f["x"], f["t"], f["y"], f["final"] if "final" in f else None)
        except QditError:
            raise
        except Exception as e:
            raise QditError(f"calibration file {path} is not a readable .npz ({type(e).__name__})") from None


def collect_calibration(apply_fn: ApplyFn, params: Any, cfg: DiTConfig, scfg: SamplerConfig, *,
                        num_samples: int = 256, steps_per_sample: int = 1, seed: int = 0,
                        batch_size: int = 64, labels: np.ndarray | None = None,
                        progress: bool = False, mesh: Any = None,
                        sample_range: tuple[int, int] | None = None) -> CalibrationData:
    """Sample with the FP model and keep the model inputs at ``steps_per_sample`` random steps per sample.

    Sample i's noise and step noise come from (seed, i) as in ``generate``, so the data do not
    depend on ``batch_size`` or on ``mesh`` (batch split over its devices; the batch is rounded up
    to a multiple of the device count). ``sample_range=(start, stop)``: only those samples (a
    host's share); the kept steps are drawn for all samples in order, so the shares of all hosts
    together are exactly the single-process data."""
    if num_samples < 1 or steps_per_sample < 1:
        raise QditError("calibration needs at least one sample and one step per sample")
    if steps_per_sample > scfg.steps:
        raise QditError(f"steps_per_sample {steps_per_sample} exceeds the sampler's {scfg.steps} steps")
    labels = check_labels(default_labels(num_samples, cfg.num_classes) if labels is None else labels, cfg.num_classes)
    fn = make_sample_fn(apply_fn, cfg, scfg, return_trajectory=True, mesh=mesh)
    shape = (cfg.input_size, cfg.input_size, cfg.in_channels)
    rng = np.random.default_rng(seed)
    xs, ts, ys, finals = [], [], [], []
    key = jax.random.PRNGKey(seed + 1)
    lo, hi = (0, num_samples) if sample_range is None else (int(sample_range[0]), int(sample_range[1]))
    if not 0 <= lo < hi <= num_samples:
        raise QditError(f"sample_range {sample_range} must lie within 0..{num_samples} and hold a sample")
    batch_size = min(batch_size, hi - lo)
    if mesh is not None:
        from qdit_jax.parallel.mesh import data_size, round_up

        batch_size = round_up(batch_size, data_size(mesh))
    starts = range(lo, hi, batch_size)
    choices: list[np.ndarray] | None = None
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="calibration", unit="batch")
    for start in starts:
        idx = np.arange(start, min(start + batch_size, hi))
        full = np.concatenate([idx, np.full(batch_size - len(idx), idx[-1])])
        x0, traj = fn(params, initial_noise(seed, full, shape), jnp.asarray(labels[full]), key,
                      jnp.asarray(full, jnp.uint32))
        x_t, t_m = np.asarray(traj.x_t)[:, : len(idx)], np.asarray(traj.t_model)[:, : len(idx)]
        finals.append(np.asarray(x0)[: len(idx)])
        if choices is None:  # every sample's kept steps, drawn in global sample order
            choices = [rng.choice(x_t.shape[0], size=steps_per_sample, replace=False) for _ in range(num_samples)]
        for j in range(len(idx)):
            for s in choices[idx[j]]:
                xs.append(x_t[s, j])
                ts.append(t_m[s, j])
                ys.append(labels[idx[j]])
                if scfg.cfg_scale != 1.0:  # the unconditional copy the guided forward also runs
                    xs.append(x_t[s, j])
                    ts.append(t_m[s, j])
                    ys.append(cfg.null_label)
    return CalibrationData(np.stack(xs).astype(np.float32), np.asarray(ts, np.int32), np.asarray(ys, np.int32),
                           np.concatenate(finals))


# ----------------------------------------------------------------------------- statistics


def layer_input_stats(params: Any, cfg: DiTConfig, plan: Mapping[str, LayerQuant], calib: CalibrationData,
                      reduce: Callable[[str, int, jax.Array], Any], combine: Callable[[Any, Any], Any],
                      *, act_quant: bool = False, static: Mapping[str, Any] | None = None,
                      batch_size: int = 64) -> dict[tuple[str, int], Any]:
    """Run the model over ``calib`` and fold ``reduce(path, arg_index, input)`` of every planned
    layer's inputs with ``combine``. With ``act_quant`` the inputs are the quantized ones."""
    model = DiT(cfg)
    run_plan = dict(plan) if act_quant else {p: LayerQuant(lq.weight, None) for p, lq in plan.items()}

    @jax.jit
    def stats(params, x, t, y):
        acc: dict[tuple[str, int], Any] = {}

        def tap(path: str, i: int, a: jax.Array) -> None:
            if isinstance(a, jax.Array) and jnp.issubdtype(a.dtype, jnp.floating):
                r = reduce(path, i, a)
                if r is not None:
                    acc[(path, i)] = r if (path, i) not in acc else combine(acc[(path, i)], r)

        with quantized(run_plan, static if act_quant else None, tap):
            model.apply({"params": params}, x, t, y)
        return acc

    total: dict[tuple[str, int], Any] = {}
    for x, t, y in calib.batches(batch_size):
        part = stats(params, x, t, y)
        total = part if not total else {k: combine(total[k], v) for k, v in part.items()}
    return total


def group_range(a: jax.Array, spec: QuantSpec) -> tuple[jax.Array, jax.Array]:
    """Per-group (min, max) of a layer input over every token and sample: shape (n_groups,)."""
    g = a.shape[-1] if spec.group_size == 0 else spec.group_size
    ag = a.astype(jnp.float32).reshape(-1, a.shape[-1] // g, g)
    return jnp.min(ag, axis=(0, 2)), jnp.max(ag, axis=(0, 2))


def merge_ranges(u: tuple[jax.Array, jax.Array], v: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
    return jnp.minimum(u[0], v[0]), jnp.maximum(u[1], v[1])


def ranges_to_qparams(ranges: Mapping[tuple[str, int], Any], plan: Mapping[str, LayerQuant]) -> dict[str, list[QParams]]:
    """Calibrated ranges keyed by (layer path, argument index) -> fixed per-group parameters."""
    out: dict[str, list[QParams]] = {}
    for (path, i), (lo, hi) in sorted(ranges.items()):
        out.setdefault(path, []).append(qparams_from_range(lo, hi, plan[path].act))
    return out


def calibrate_static(params: Any, cfg: DiTConfig, plan: Mapping[str, LayerQuant], calib: CalibrationData,
                     batch_size: int = 64, hosts: Callable | None = None) -> dict[str, list[QParams]]:
    """Static activation parameters: per-group min/max of each layer input over all calibration
    inputs (all timesteps, all samples), turned into fixed scales (the baseline Q-DiT beats).
    ``hosts`` (an allgather, ``parallel.hosts``): ``calib`` is this host's share and the ranges
    are combined over every host's."""

    def reduce(path: str, i: int, a: jax.Array):
        spec = plan[path].act
        return None if spec is None else group_range(a, spec)

    ranges = layer_input_stats(params, cfg, plan, calib, reduce, merge_ranges, batch_size=batch_size)
    if hosts is not None:
        from qdit_jax.parallel.hosts import ranges_across_hosts

        ranges = ranges_across_hosts(ranges, hosts)
    return ranges_to_qparams(ranges, plan)
