"""What the kernels' guards ask of the device: the first device's CUDA compute capability."""
from __future__ import annotations

import jax


def compute_capability() -> tuple[int, int] | None:
    """(major, minor) of ``jax.devices()[0]``'s CUDA compute capability, or None where it has none (a
    CPU, a TPU) or reports something unreadable."""
    cc = str(getattr(jax.devices()[0], "compute_capability", "") or "")
    major, _, minor = cc.partition(".")
    if not major.isdigit():
        return None
    return int(major), int(minor) if minor.isdigit() else 0


def is_hopper() -> bool:
    """Whether the first device is a Hopper GPU (compute capability 9.x: wgmma, TMA)."""
    cc = compute_capability()
    return cc is not None and cc[0] == 9
