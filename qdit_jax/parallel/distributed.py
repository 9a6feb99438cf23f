"""Several hosts: JAX's distributed runtime, each host's slice of the samples, and the merge.

Sampling needs no communication between hosts: sample ``i`` depends only on (seed, i), so host
``p`` of ``P`` samples the contiguous slice ``host_slice(N, p, P)`` on its local devices and writes
``out.host{p}.npz``; ``merge_host_samples`` concatenates the files in global order afterwards.
``initialize`` still starts ``jax.distributed`` so that ``jax.process_index()`` and global meshes
(for statistics reduced across hosts) are available, and fails fast with a clear message.
"""
from __future__ import annotations

import os
import socket
import time

import numpy as np

from qdit_jax.errors import QditError


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               timeout_s: int = 300) -> bool:
    """Join a multi-host run (``jax.distributed.initialize``); False (nothing done) for one process.

    With no arguments JAX reads its own environment (``JAX_COORDINATOR_ADDRESS``,
    ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``) or a cluster it detects (SLURM, TPU pods). Must run
    before anything touches a JAX device. A coordinator that cannot be reached within
    ``timeout_s`` seconds raises a one-line QditError.
    """
    import jax

    given = [coordinator, num_processes, process_id]
    if any(v is not None for v in given) and any(v is None for v in given):
        raise QditError("--coordinator, --num-processes and --process-id go together; pass all three (or none "
                        "and set JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID)")
    if coordinator is None and not os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return False
    if num_processes is not None:
        if num_processes < 1:
            raise QditError(f"--num-processes must be >= 1, got {num_processes}")
        if not 0 <= process_id < num_processes:
            raise QditError(f"--process-id must be in 0..{num_processes - 1}, got {process_id}")
        if num_processes == 1:
            return False
    where = coordinator or os.environ["JAX_COORDINATOR_ADDRESS"]
    _host_port(where)  # validates HOST:PORT
    pid = process_id if process_id is not None else int(os.environ.get("JAX_PROCESS_ID", "0") or 0)
    if pid != 0:  # XLA aborts the process on a connect timeout, so find out first that it will answer
        wait_for_coordinator(where, timeout_s)
    from qdit_jax.parallel.hosts import setup_cpu_collectives

    setup_cpu_collectives()
    try:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id, initialization_timeout=int(timeout_s))
    except Exception as e:  # noqa: BLE001 - the runtime raises several types (RuntimeError, XlaRuntimeError)
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise QditError(f"could not join the coordinator at {where} within {timeout_s}s ({msg}); check the "
                        "address and port, that process 0 is running, and the firewall") from None
    return True


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise QditError(f"--coordinator must be HOST:PORT (e.g. 10.0.0.1:1234), got {address!r}")
    return host.strip("[]"), int(port)


def wait_for_coordinator(address: str, timeout_s: float) -> None:
    """Return once a TCP connection to ``address`` succeeds; a QditError after ``timeout_s`` seconds."""
    host, port = _host_port(address)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=max(0.1, min(2.0, deadline - time.monotonic()))):
                return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise QditError(f"cannot reach the coordinator at {address} within {timeout_s}s ({e.strerror or e}); "
                                "start process 0 first and check the address, port and firewall") from None
            time.sleep(0.2)


def host_slice(n: int, process_id: int, num_processes: int) -> tuple[int, int]:
    """Start and stop of host ``process_id``'s contiguous share of ``n`` items (sizes differ by <= 1)."""
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise QditError(f"process id {process_id} is outside 0..{num_processes - 1}")
    base, extra = divmod(n, num_processes)
    start = process_id * base + min(process_id, extra)
    return start, start + base + (1 if process_id < extra else 0)


def host_output_path(path: str, process_id: int, num_processes: int) -> str:
    """``samples.npz`` -> ``samples.host3.npz`` when several processes write; unchanged for one."""
    if num_processes <= 1:
        return path
    root, ext = os.path.splitext(path)
    return f"{root}.host{process_id}{ext}"


def merge_host_samples(path: str, num_processes: int, *, remove: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """Concatenate ``path``'s per-host files (``host_output_path``) in host order into ``path``.

    Files carry ``indices`` (the global sample indices); they must cover 0..N-1 exactly once.
    """
    from qdit_jax.io.images import save_samples

    parts = [host_output_path(path, p, num_processes) for p in range(num_processes)]
    missing = [p for p in parts if not os.path.exists(p)]
    if missing:
        raise QditError(f"per-host sample file(s) {missing} missing: wait for every host to finish, then merge")
    images, labels, indices = [], [], []
    for p in parts:
        with np.load(p, allow_pickle=False) as f:
            if "indices" not in f:
                raise QditError(f"{p} has no 'indices'; write it with qdit sample on several processes")
            images.append(f["arr_0"])
            labels.append(f["labels"] if "labels" in f else None)
            indices.append(f["indices"])
    idx = np.concatenate(indices)
    if not np.array_equal(np.sort(idx), np.arange(len(idx))):
        raise QditError(f"per-host files of {path} do not cover samples 0..{len(idx) - 1} exactly once; "
                        "were they written with the same --num-samples and --num-processes?")
    order = np.argsort(idx, kind="stable")
    x = np.concatenate(images)[order]
    y = None if any(v is None for v in labels) else np.concatenate(labels)[order]
    save_samples(path, x, y)
    if remove:
        for p in parts:
            os.remove(p)
    return x, y
