"""The flags every heavy command shares: ``--devices`` and the multi-host trio."""
from __future__ import annotations

import argparse

from qdit_jax.errors import QditError


def add_parallel_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("devices and hosts")
    g.add_argument("--devices", type=int, default=None,
                   help="local devices to split the batch over (default: all; 1 = no mesh)")
    g.add_argument("--coordinator", default=None,
                   help="HOST:PORT of process 0 for a multi-host run (or set JAX_COORDINATOR_ADDRESS)")
    g.add_argument("--num-processes", type=int, default=None, help="number of hosts (processes) in the run")
    g.add_argument("--process-id", type=int, default=None, help="this host's index, 0..num-processes-1")
    g.add_argument("--coordinator-timeout", type=int, default=300, help="seconds to wait for the coordinator")


def setup_from_args(args: argparse.Namespace):
    """Join the multi-host run if asked, then return a data-parallel mesh over this host's devices
    (None for a single device: the plain jitted path)."""
    import jax

    from qdit_jax.parallel.distributed import initialize
    from qdit_jax.parallel.mesh import make_mesh

    initialize(args.coordinator, args.num_processes, args.process_id, timeout_s=args.coordinator_timeout)
    local = jax.local_devices()
    n = len(local) if args.devices is None else args.devices
    if not 1 <= n <= len(local):
        raise QditError(f"--devices {n} asked for, but this host has {len(local)} {local[0].platform} device(s)")
    return None if n == 1 else make_mesh(local[:n])
