"""The GPU's SM clock, power draw and throttle reasons while a benchmark runs, sampled by ``nvidia-smi``.

Why: an H100 running a DiT-XL/2 forward at batch 256 sits at its power limit (700 W) at 1.5-1.7 GHz,
not at its 1.98 GHz boost (docs/RESULTS.md, twenty-third session), so throughput there is energy per
image, and a kernel timed alone for a few milliseconds runs at a clock the forward never sees. A bench
row with the clock and the share of samples under the power cap says which regime it was measured in.

``PowerLog`` starts ``nvidia-smi --query-gpu=... --loop-ms=N`` in the background (the instant power
reading where the GPU has one); ``mark()`` brackets the timed span; ``summary()`` keeps the samples
inside it (nvidia-smi's local timestamps against the host's local clock). Nothing is estimated: without
samples inside the span there is no summary.
"""
from __future__ import annotations

import datetime as _dt
import os
import shutil
import statistics
import subprocess
import tempfile
from typing import Any

FIELDS = ("timestamp", "clocks.sm", "power.draw", "power.limit", "clocks_throttle_reasons.active")
# the power field sampled, first that the GPU answers: on Ampere and newer "power.draw" is a one-second
# average (a batch-64 bench row's ~0.6 s span read 214-265 W, mostly the idle second before it, while
# 50-71% of its samples were power-capped: docs/RESULTS.md, twenty-fourth session), the instant reading is not
POWER_FIELDS = ("power.draw.instant", "power.draw")
SW_POWER_CAP = 0x4  # nvmlClocksThrottleReasonSwPowerCap
HW_SLOWDOWN = 0x8 | 0x40 | 0x80  # hardware slowdown, hardware thermal slowdown, power brake
_TIME_FORMATS = ("%Y/%m/%d %H:%M:%S.%f", "%Y/%m/%d %H:%M:%S")


def gpu_index(device: Any) -> str:
    """The ``nvidia-smi --id`` of a JAX GPU device: its entry of CUDA_VISIBLE_DEVICES where that is set
    (JAX numbers the visible GPUs from 0), else its own id."""
    local = getattr(device, "local_hardware_id", None)
    local = device.id if local is None else local
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    return visible[local] if local < len(visible) else str(local)


def parse_sample(line: str) -> dict[str, Any] | None:
    """One ``--format=csv,noheader,nounits`` line of FIELDS as a dict, or None for a line that is not one
    (a header, a "[N/A]" field, a partial line at shutdown)."""
    cols = [c.strip() for c in line.split(",")]
    if len(cols) != len(FIELDS):
        return None
    for fmt in _TIME_FORMATS:
        try:
            t = _dt.datetime.strptime(cols[0], fmt)
            break
        except ValueError:
            continue
    else:
        return None
    try:
        return dict(time=t, sm_mhz=float(cols[1]), power_w=float(cols[2]), limit_w=float(cols[3]),
                    reasons=int(cols[4], 16))
    except ValueError:
        return None


class PowerLog:
    """``with PowerLog(index) as log: log.mark(); work(); log.mark()`` then ``log.summary()``. Where
    ``command`` is None or not on PATH the log is off: ``available`` is False and ``summary()`` None."""

    def __init__(self, index: str = "0", interval_ms: int = 100, command: str | None = "nvidia-smi") -> None:
        if interval_ms < 1:
            raise ValueError(f"interval_ms must be >= 1, got {interval_ms}")
        self.command = shutil.which(command) if command else None
        self.index, self.interval_ms = index, interval_ms
        self.power_field: str | None = None  # chosen when the log starts (``power_field``)
        self.marks: list[_dt.datetime] = []
        self.samples: list[dict[str, Any]] = []
        self._proc: subprocess.Popen | None = None
        self._out: Any = None  # a temporary file, not a pipe: a long span must not fill a pipe and stall nvidia-smi

    @property
    def available(self) -> bool:
        return self.command is not None

    def power_field_of(self) -> str:
        """The first of POWER_FIELDS that nvidia-smi answers with a number for this GPU (an older driver
        rejects the instant field's name, an older GPU answers "[N/A]")."""
        for field in POWER_FIELDS[:-1]:
            try:
                done = subprocess.run([self.command, f"--id={self.index}", f"--query-gpu={field}",
                                       "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10)
                float(done.stdout.strip())
            except (OSError, subprocess.TimeoutExpired, ValueError):
                continue
            if done.returncode == 0:
                return field
        return POWER_FIELDS[-1]

    @property
    def args(self) -> list[str]:
        fields = [(self.power_field or POWER_FIELDS[-1]) if f == "power.draw" else f for f in FIELDS]
        return [f"--id={self.index}", "--query-gpu=" + ",".join(fields), "--format=csv,noheader,nounits",
                f"--loop-ms={self.interval_ms}"]

    def __enter__(self) -> "PowerLog":
        if self.available:
            self.power_field = self.power_field_of()
            self._out = tempfile.TemporaryFile(mode="w+")
            self._proc = subprocess.Popen([self.command, *self.args], stdout=self._out, stderr=subprocess.DEVNULL,
                                          text=True)
        return self

    def mark(self) -> None:
        """Start, then end, of the span ``summary`` keeps (the host's local time, as nvidia-smi writes)."""
        self.marks.append(_dt.datetime.now())

    def __exit__(self, *exc: Any) -> None:
        if self._proc is None:
            return
        self._proc.terminate()
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._out.seek(0)
        out = self._out.read()
        self._out.close()
        self.samples = [s for s in map(parse_sample, out.splitlines()) if s is not None]

    def summary(self) -> dict[str, Any] | None:
        """Medians of the SM clock and power draw over the samples between the first two marks, the power
        limit, and the share of those samples throttled by the software power cap or by hardware
        slowdown; None without such samples."""
        if len(self.marks) < 2:
            return None
        t0, t1 = self.marks[0], self.marks[1]
        inside = [s for s in self.samples if t0 <= s["time"] <= t1]
        if not inside:
            return None
        n = len(inside)
        return dict(samples=n, power_field=self.power_field, sm_mhz=statistics.median(s["sm_mhz"] for s in inside),
                    power_w=statistics.median(s["power_w"] for s in inside), limit_w=inside[-1]["limit_w"],
                    power_capped=sum(bool(s["reasons"] & SW_POWER_CAP) for s in inside) / n,
                    hw_slowdown=sum(bool(s["reasons"] & HW_SLOWDOWN) for s in inside) / n)
