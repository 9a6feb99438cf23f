"""Per-host slices, file names and the merge; coordinator errors (no real cluster needed)."""
from __future__ import annotations

import socket
import subprocess
import sys

import numpy as np
import pytest

from qdit_jax.errors import QditError
from qdit_jax.io.images import load_samples, save_samples
from qdit_jax.parallel.distributed import (host_output_path, host_slice, initialize, merge_host_samples,
                                           wait_for_coordinator)


@pytest.mark.parametrize("n,procs", [(10, 3), (7, 8), (64, 4), (1, 1)])
def test_host_slices_tile_the_range_in_order(n, procs):
    slices = [host_slice(n, p, procs) for p in range(procs)]
    assert slices[0][0] == 0 and slices[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(slices, slices[1:]))
    sizes = [b - a for a, b in slices]
    assert max(sizes) - min(sizes) <= 1


def test_host_output_paths_do_not_collide():
    assert host_output_path("out/samples.npz", 0, 1) == "out/samples.npz"
    names = {host_output_path("out/samples.npz", p, 4) for p in range(4)}
    assert names == {f"out/samples.host{p}.npz" for p in range(4)}


def test_merge_restores_global_order(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (10, 4, 4, 1), dtype=np.uint8)
    labels = np.arange(10) % 3
    path = str(tmp_path / "s.npz")
    for p in (2, 0, 1):  # hosts finish in any order
        a, b = host_slice(10, p, 3)
        save_samples(host_output_path(path, p, 3), images[a:b], labels[a:b], indices=np.arange(a, b))
    x, y = merge_host_samples(path, 3, remove=True)
    np.testing.assert_array_equal(x, images)
    got, got_labels = load_samples(path)
    np.testing.assert_array_equal(got, images)
    np.testing.assert_array_equal(got_labels, labels)
    assert not (tmp_path / "s.host1.npz").exists()


def test_merge_errors(tmp_path):
    path = str(tmp_path / "s.npz")
    save_samples(host_output_path(path, 0, 2), np.zeros((2, 4, 4, 1), np.uint8), None, indices=np.arange(2))
    with pytest.raises(QditError, match="missing"):
        merge_host_samples(path, 2)
    save_samples(host_output_path(path, 1, 2), np.zeros((2, 4, 4, 1), np.uint8), None, indices=np.arange(2))
    with pytest.raises(QditError, match="exactly once"):
        merge_host_samples(path, 2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_initialize_argument_errors(monkeypatch):
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
    assert initialize() is False  # one process: nothing to do
    with pytest.raises(QditError, match="go together"):
        initialize("host:1", 2, None)
    with pytest.raises(QditError, match="0..1"):
        initialize("host:1", 2, 5)
    with pytest.raises(QditError, match="HOST:PORT"):
        initialize("no-port", 2, 1)
    assert initialize("host:1", 1, 0) is False


def test_unreachable_coordinator_is_a_clear_error():
    with pytest.raises(QditError, match=r"cannot reach the coordinator at 127\.0\.0\.1:\d+ within 1s"):
        wait_for_coordinator(f"127.0.0.1:{_free_port()}", 1)


def test_unreachable_coordinator_through_initialize_does_not_abort():
    # XLA's own client aborts the process on a connect timeout; initialize must raise first.
    code = ("from qdit_jax.parallel.distributed import initialize\n"
            "from qdit_jax.errors import QditError\n"
            "try:\n"
            f"    initialize('127.0.0.1:{_free_port()}', 2, 1, timeout_s=1)\n"
            "except QditError as e:\n"
            "    print('QDIT', e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "QDIT cannot reach the coordinator" in r.stdout, r.stdout + r.stderr[-500:]


def test_qdit_merge_command(tmp_path, capsys):
    """`qdit merge` joins per-host files in global order; a missing host file is a one-line error."""
    from qdit_jax.cli.main import main

    images = np.random.default_rng(1).integers(0, 255, (7, 4, 4, 1), dtype=np.uint8)
    path = str(tmp_path / "m.npz")
    for p in range(2):
        a, b = host_slice(7, p, 2)
        save_samples(host_output_path(path, p, 2), images[a:b], None, indices=np.arange(a, b))
    assert main(["merge", path, "--num-processes", "2"]) == 0
    np.testing.assert_array_equal(load_samples(path)[0], images)
    assert main(["merge", str(tmp_path / "none.npz"), "--num-processes", "2"]) == 2
    assert "missing" in capsys.readouterr().err
