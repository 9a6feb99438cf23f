"""Device meshes for data (batch) parallel work, and the helpers every heavy command shares.

The default mesh has one axis, ``'data'``, over all devices: the global batch is split over it
in order (device k holds rows ``k*b .. (k+1)*b - 1``), parameters are replicated, and per-device
programs run under ``shard_map`` so that each device computes exactly what one device would
compute on its slice (no collective in the sampler; a ``psum``/``pmin``/``pmax`` all-reduce where
statistics are reduced). A second axis, ``'model'``, can shard large parameters for models that do
not fit one device; computations then go through plain ``jit`` and XLA inserts the collectives.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from qdit_jax.errors import QditError
from qdit_jax.perf.compiler import jit as perf_jit

DATA = "data"
MODEL = "model"


def make_mesh(devices: None | int | Sequence[jax.Device] = None, axes: Sequence[str] = (DATA,),
              model_size: int = 1) -> Mesh:
    """A mesh over ``devices`` (all, the first ``n``, or a list) with ``axes``.

    With ``axes=('data', 'model')`` the devices form a (n / model_size, model_size) grid.
    """
    available = jax.devices()
    if devices is None:
        devs = available
    elif isinstance(devices, (int, np.integer)) and not isinstance(devices, bool):
        if not 1 <= devices <= len(available):
            raise QditError(f"--devices {devices} asked for, but {len(available)} {available[0].platform} "
                            f"device(s) are visible; use 1..{len(available)}")
        devs = available[: int(devices)]
    else:
        devs = list(devices)
        if not devs:
            raise QditError("the device list is empty; pass None (all devices) or a count")
    axes = tuple(axes)
    if axes == (DATA,):
        shape: tuple[int, ...] = (len(devs),)
    elif axes == (DATA, MODEL):
        if model_size < 1 or len(devs) % model_size:
            raise QditError(f"model axis size {model_size} does not divide {len(devs)} devices; pick a divisor")
        shape = (len(devs) // model_size, model_size)
    else:
        raise QditError(f"mesh axes must be ('data',) or ('data', 'model'), got {axes}")
    return Mesh(np.asarray(devs, dtype=object).reshape(shape), axes)


def data_size(mesh: Mesh) -> int:
    """Number of batch shards (the size of the 'data' axis)."""
    return int(mesh.shape[DATA])


def check_divisible(batch: int, n_devices: int, what: str = "batch size") -> None:
    """Raise a one-line QditError unless ``batch`` splits evenly over ``n_devices``."""
    if n_devices < 1:
        raise QditError(f"device count must be >= 1, got {n_devices}")
    if batch < 1 or batch % n_devices:
        raise QditError(f"{what} {batch} does not divide over {n_devices} devices; "
                        f"use a multiple of {n_devices} (e.g. {max(n_devices, round_up(batch, n_devices))})")


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over 'data', everything else replicated."""
    return NamedSharding(mesh, P(DATA))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def shard_batch(tree: Any, mesh: Mesh) -> Any:
    """Put every array of ``tree`` on the mesh, split along its leading axis over 'data'."""
    n = data_size(mesh)
    for leaf in jax.tree_util.tree_leaves(tree):
        check_divisible(int(np.shape(leaf)[0]), n)
    return jax.device_put(tree, batch_sharding(mesh))


def replicate(tree: Any, mesh: Mesh) -> Any:
    """A full copy of ``tree`` (e.g. the parameters) on every device of the mesh."""
    return jax.device_put(tree, replicated(mesh))


def param_specs(params: Any, mesh: Mesh, min_size: int = 1 << 16) -> Any:
    """PartitionSpecs sharding each parameter of at least ``min_size`` elements over 'model'
    along its last axis that the model axis divides; smaller ones stay replicated."""
    m = int(mesh.shape.get(MODEL, 1))

    def spec(x: Any) -> P:
        shape = np.shape(x)
        if m == 1 or int(np.prod(shape)) < min_size:
            return P()
        for ax in range(len(shape) - 1, -1, -1):
            if shape[ax] % m == 0:
                return P(*([None] * ax + [MODEL]))
        return P()

    return jax.tree_util.tree_map(spec, params)


def shard_params(params: Any, mesh: Mesh, min_size: int = 1 << 16) -> Any:
    """Parameters placed per ``param_specs``: replicated on a data-only mesh, split over 'model' otherwise."""
    specs = param_specs(params, mesh, min_size)
    return jax.tree_util.tree_map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), params, specs)


def data_parallel(fn: Callable, mesh: Mesh, in_specs: tuple, out_specs: Any, *, check_vma: bool = True,
                  compiler_options: dict[str, Any] | None = None) -> Callable:
    """``jit(shard_map(fn))``: ``fn`` sees each device's slice; ``P('data')`` splits, ``P()`` replicates.

    ``check_vma=False`` turns off shard_map's replication typing, for functions whose loop carry
    starts replicated and becomes per-device (sampling one noise batch with per-device weights).
    ``compiler_options``: XLA options (None: ``perf.compiler``'s defaults for this backend)."""
    return perf_jit(jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=check_vma),
                    compiler_options)


def free_device_bytes(device: jax.Device | None = None) -> int | None:
    """Bytes the allocator can still hand out on ``device``; None where the backend does not say (CPU)."""
    device = device or jax.local_devices()[0]
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - backends without memory stats raise various errors
        return None
    if not stats or "bytes_limit" not in stats:
        return None
    return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))


def per_device_batch(bytes_per_sample: int, *, device: jax.Device | None = None, fraction: float = 0.8,
                     fallback: int = 64, maximum: int | None = None) -> int:
    """The largest per-device batch whose estimated working set (``bytes_per_sample`` each) fits
    ``fraction`` of the device's free memory; ``fallback`` where memory is not reported."""
    if bytes_per_sample <= 0:
        raise QditError(f"bytes_per_sample must be > 0, got {bytes_per_sample}")
    if not 0 < fraction <= 1:
        raise QditError(f"memory fraction must be in (0, 1], got {fraction}")
    free = free_device_bytes(device)
    b = fallback if free is None else int(free * fraction) // int(bytes_per_sample)
    if maximum is not None:
        b = min(b, maximum)
    if b < 1:
        raise QditError(f"one sample needs ~{bytes_per_sample / 2**20:.0f} MiB but the device has "
                        f"{(free or 0) / 2**20:.0f} MiB free; use a smaller model or dtype, or shard over 'model'")
    return b


def global_batch(bytes_per_sample: int, mesh: Mesh, **kw: Any) -> int:
    """Memory-aware global batch: ``per_device_batch`` times the data axis size (divisible by design)."""
    return per_device_batch(bytes_per_sample, **kw) * data_size(mesh)


def compiled_bytes_per_sample(build: Callable[[int], Any], probes: tuple[int, int] = (2, 4)) -> int:
    """Device bytes one more sample costs in a compiled program, measured by XLA's memory analysis:
    ``build(b)`` returns the program lowered and compiled at batch ``b``; the difference between two
    probe batches removes what does not scale with the batch (parameters, constants)."""
    sizes = []
    for b in probes:
        ma = build(b).memory_analysis()
        if ma is None:
            raise QditError("this backend gives no memory analysis; pass an explicit --batch-size")
        sizes.append(int(ma.temp_size_in_bytes + ma.argument_size_in_bytes + ma.output_size_in_bytes))
    return max(1, (sizes[1] - sizes[0]) // (probes[1] - probes[0]))
