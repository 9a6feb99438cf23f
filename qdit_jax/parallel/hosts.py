"""Statistics combined across hosts (processes) of a multi-host run.

Within a host, devices reduce with XLA collectives (``parallel.stats``). Across hosts each host
reduces its own share of the data and these helpers gather the per-host results with
``multihost_utils.process_allgather`` and fold them: min/max for activation ranges, sums for
GPTQ Hessians. Every host must call them with the same keys in the same order (each host holds
the same plan, and at least one calibration input).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

Allgather = Callable[[Any], Any]


def default_allgather(tree: Any) -> Any:
    """Each leaf stacked over hosts on a new leading axis (host order)."""
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree)


def ranges_across_hosts(ranges: Mapping[Any, tuple[Any, Any]], allgather: Allgather = default_allgather
                        ) -> dict[Any, tuple[jax.Array, jax.Array]]:
    """Per-layer (min, max) of every host's ranges."""
    keys = sorted(ranges)
    every = allgather([tuple(np.asarray(v) for v in ranges[k]) for k in keys])
    return {k: (jnp.asarray(np.min(lo, axis=0)), jnp.asarray(np.max(hi, axis=0))) for k, (lo, hi) in zip(keys, every)}


def sums_across_hosts(sums: Mapping[Any, Any], allgather: Allgather = default_allgather) -> dict[Any, Any]:
    """Every leaf summed over hosts (float64 on the host, cast back)."""
    keys = sorted(sums)
    every = allgather([jax.tree_util.tree_map(np.asarray, sums[k]) for k in keys])
    return {k: jax.tree_util.tree_map(lambda a, ref: jnp.asarray(np.sum(np.asarray(a, np.float64), axis=0),
                                                                 jnp.asarray(ref).dtype), v, sums[k])
            for k, v in zip(keys, every)}


def setup_cpu_collectives() -> None:
    """Cross-process collectives on CPU need gloo (the default has none); GPU/TPU are unaffected."""
    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except Exception:  # noqa: BLE001 - an older JAX without the option
        pass
