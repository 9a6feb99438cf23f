"""scripts/profile_gemm_kernels.py: its XLA dot rows compute the products they are labelled with, and the
sustained timing reports without a GPU's power log."""
from __future__ import annotations

import importlib.util
import os
import sys

import numpy as np

_PATH = os.path.join(os.path.dirname(__file__), "..", "..", "scripts", "profile_gemm_kernels.py")
_spec = importlib.util.spec_from_file_location("profile_gemm_kernels", _PATH)
pgk = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("profile_gemm_kernels", pgk)
_spec.loader.exec_module(pgk)


def test_xla_dots_are_the_labelled_products():
    """Each row's output dtype is the one named, and its values are the float64 product of its operands
    (int8 -> int32 exactly; the float rows within their output's rounding); no operand is all zeros."""
    rows = pgk.xla_dots(16, 256, 32, np.random.default_rng(0))
    assert [r[0] for r in rows] == ["xla bf16 -> bf16", "xla int8 -> int32", "xla fp8 -> float32", "xla fp8 -> bf16"]
    for label, fn, (a, w) in rows:
        a64, w64 = np.asarray(a, np.float64), np.asarray(w, np.float64)
        assert np.abs(a64).max() > 0 and np.abs(w64).max() > 0
        ref = a64 @ w64.T
        y = np.asarray(fn(a, w))
        assert str(y.dtype) == label.split("-> ")[1].replace("bf16", "bfloat16"), label
        if y.dtype == np.int32:
            np.testing.assert_array_equal(y, ref.astype(np.int64))
        else:
            tol = 1e-5 if y.dtype == np.float32 else 1e-2
            assert np.abs(np.asarray(y, np.float64) - ref).max() <= tol * np.abs(ref).max(), label


def test_sustained_reports_a_time_without_a_power_log(monkeypatch):
    """Without nvidia-smi (here) the line carries the time and no clock or power."""
    from qdit_jax.perf import power

    monkeypatch.setattr(power.shutil, "which", lambda cmd: None)
    rows = pgk.xla_dots(8, 128, 16, np.random.default_rng(1))
    line = pgk.sustained(rows[1][1], rows[1][2], rounds=2)
    assert line.startswith(", sustained ") and line.endswith(" us per call") and "MHz" not in line
