"""The compute capability the kernels' guards read, from stand-in devices."""
from __future__ import annotations

import jax

from qdit_jax.perf.device import compute_capability, is_hopper


def test_compute_capability_parses_cuda_and_refuses_the_rest(monkeypatch):
    class _Dev:
        def __init__(self, cc):
            if cc is not None:
                self.compute_capability = cc

    for cc, want, hopper in (("9.0", (9, 0), True), ("8.6", (8, 6), False), ("10.0", (10, 0), False),
                             ("gfx90a", None, False), ("", None, False), (None, None, False)):
        monkeypatch.setattr(jax, "devices", lambda *a, cc=cc: [_Dev(cc)])
        assert compute_capability() == want, cc
        assert is_hopper() is hopper, cc
