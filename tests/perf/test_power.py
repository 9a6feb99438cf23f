"""perf.power: nvidia-smi's samples parsed, kept inside the marked span and summarized (a stand-in
nvidia-smi script here, printing what the real one prints with ``--format=csv,noheader,nounits``)."""
from __future__ import annotations

import datetime as dt
import stat
import sys
import time

import pytest

from qdit_jax.perf.power import FIELDS, PowerLog, gpu_index, parse_sample

FAKE = """#!{python}
import datetime, sys, time
if not any(a.startswith("--loop-ms") for a in sys.argv):  # PowerLog's probe of the instant power field
    if {reject_instant}:  # an older driver
        print('Field "power.draw.instant" is not a valid field to query.', file=sys.stderr)
        sys.exit(2)
    print("695.50")
    sys.exit(0)
print("[N/A], [N/A], [N/A], [N/A], [N/A]", flush=True)  # a line to skip
i = 0
while True:
    now = datetime.datetime.now().strftime("%Y/%m/%d %H:%M:%S.%f")[:-3]
    reasons = "0x0000000000000004" if i % 2 else "0x0000000000000020"  # power cap / software thermal
    print(f"{{now}}, {{1500 + 100 * (i % 3)}}, 695.50, 700.00, {{reasons}}", flush=True)
    i += 1
    time.sleep(0.02)
"""


def _fake(tmp_path, reject_instant: bool = False) -> str:
    path = tmp_path / "nvidia-smi"
    path.write_text(FAKE.format(python=sys.executable, reject_instant=reject_instant))
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


@pytest.fixture()
def fake_smi(tmp_path):
    return _fake(tmp_path)


def test_parse_sample_reads_a_line_and_skips_what_is_not_one():
    s = parse_sample("2026/11/27 13:07:46.125, 1568, 697.41, 700.00, 0x0000000000000004")
    assert s == dict(time=dt.datetime(2026, 11, 27, 13, 7, 46, 125000), sm_mhz=1568.0, power_w=697.41,
                     limit_w=700.0, reasons=4)
    assert len(FIELDS) == 5
    for bad in (", ".join(FIELDS), "[N/A], [N/A], [N/A], [N/A], [N/A]", "2026/11/27 13:07:46.125, 1568",
                "2026/11/27 13:07:46.125, 1568, 697.41, 700.00, zz"):
        assert parse_sample(bad) is None


def test_power_log_keeps_the_marked_span(fake_smi):
    with PowerLog("0", interval_ms=20, command=fake_smi) as log:
        time.sleep(0.4)  # samples before the span
        log.mark()
        time.sleep(0.6)
        log.mark()
        time.sleep(0.3)  # and after it
    s = log.summary()
    assert log.available and s is not None
    assert s["power_field"] == "power.draw.instant" and "--query-gpu=timestamp,clocks.sm,power.draw.instant," in (
        " ".join(log.args))
    assert 10 <= s["samples"] < len(log.samples)
    assert s["sm_mhz"] == 1600 and s["power_w"] == 695.5 and s["limit_w"] == 700
    assert 0.3 < s["power_capped"] < 0.7 and s["hw_slowdown"] == 0


def test_power_log_falls_back_to_the_averaged_field(tmp_path):
    """A driver that rejects the instant field's name: the log samples ``power.draw`` (still samples)."""
    with PowerLog("0", interval_ms=20, command=_fake(tmp_path, reject_instant=True)) as log:
        log.mark()
        time.sleep(0.3)
        log.mark()
    s = log.summary()
    assert log.power_field == "power.draw" and s is not None and s["power_field"] == "power.draw"
    assert "--query-gpu=timestamp,clocks.sm,power.draw,power.limit," in " ".join(log.args)


def test_power_log_is_off_without_nvidia_smi(tmp_path):
    log = PowerLog(command=str(tmp_path / "no-such-command"))
    with log:
        log.mark()
        log.mark()
    assert not log.available and log.summary() is None
    assert PowerLog(command=None).summary() is None
    with pytest.raises(ValueError, match="interval_ms"):
        PowerLog(interval_ms=0)


def test_gpu_index_follows_cuda_visible_devices(monkeypatch):
    class Dev:
        id = 1
        local_hardware_id = 1

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert gpu_index(Dev()) == "5"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert gpu_index(Dev()) == "1"


def test_bench_power_columns(fake_smi, tmp_path, capsys, monkeypatch):
    """`qdit bench --power` puts the span's clock, power and power-capped share in each row and the table
    (the log forced on with the stand-in nvidia-smi: this is a CPU)."""
    import json

    from qdit_jax.cli import bench
    from qdit_jax.cli.main import main

    monkeypatch.setattr(bench, "_power_log", lambda args, dev: PowerLog("0", interval_ms=20, command=fake_smi))
    slow = bench.synced_calls

    def timed(*a, **k):  # a span of a few samples however fast this CPU runs the tiny model
        time.sleep(0.3)
        return slow(*a, **k)

    monkeypatch.setattr(bench, "synced_calls", timed)
    out = str(tmp_path / "b.json")
    assert main(["bench", "--model", "S/8", "--batch", "2", "--variants", "bf16", "--repeats", "2",
                 "--matmul-peak", "0", "--power", "--json", out]) == 0
    (row,) = [r for r in json.load(open(out))["rows"] if "batch" in r]
    assert row["power"]["sm_mhz"] == 1600 and row["power"]["samples"] >= 5
    text = capsys.readouterr().out
    assert "1600 MHz 696 / 700 W, power-capped" in text and "SM MHz" in text
