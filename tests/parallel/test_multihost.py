"""Two real JAX processes on CPU (coordinator on localhost, gloo collectives): calibration shares,
quantization statistics combined across hosts, and a search whose populations are split over the
hosts all equal the single-process results (``tests/parallel/_multihost.py``)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results() -> list[dict]:
    port = str(_free_port())
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    procs = [subprocess.Popen([sys.executable, "-m", "tests.parallel._multihost", port, str(p)], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for p in range(2)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    return outs


@pytest.mark.parametrize("name", ["calibration_share", "quantize_across_hosts", "search_across_hosts"])
def test_two_hosts(results, name):
    for host, r in enumerate(results):
        ok, detail = r[name]
        assert ok, f"host {host} {name}: {detail}"
