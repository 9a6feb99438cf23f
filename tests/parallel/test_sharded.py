"""Sharded sampling and statistics on up to 8 virtual CPU devices.

XLA_FLAGS must be set before JAX starts, so every check runs in one subprocess
(``tests/parallel/_multidevice.py``) that compares against single-device references and reports
each result; each test here asserts one of them.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def results() -> dict:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-m", "tests.parallel._multidevice"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", [
    "sample_ddim_bitwise",         # DDIM samples bit-identical on 2 and 8 devices and unsharded
    "sample_ddpm_bitwise",         # DDPM (per-sample step noise) likewise
    "sampler_hlo_no_collectives",  # data-parallel sampler: no all-gather / all-reduce at all
    "indivisible_batch_error",     # a batch that does not divide over 8 devices: one-line QditError
    "static_ranges_equal",         # static activation ranges (pmin/pmax) == calibrate_static, exactly
    "hessians_equal",              # GPTQ Hessians (psum of x^T x) == the single-device runner
    "hessians_padding_masked",     # a calibration set that does not fill the batch: pads weigh 0
    "fid_stats_equal",             # FID mean / covariance == metrics.frechet.feature_statistics
    "fid_hlo_all_reduce",          # FID statistics compile to an all-reduce, no all-gather
    "model_axis_forward",          # params split over a 'model' axis give the same forward
    "search_epoch_equal",          # a search epoch, batch- (8) or candidate-sharded (4, 8) == 1 device
    "search_hlo_no_collectives",   # the sharded candidate sampler compiles without any collective
    "calibration_data_equal",      # collect_calibration on 4 devices == 1 device (per-sample keys)
    "quantize_model_mesh",         # quantize_model(mesh=): same static ranges, GPTQ codes agree >= 99.9%
    "inception_features_equal",    # Inception features batch-sharded over 8 devices == 1 device
])
def test_multidevice(results, name):
    ok, detail = results[name]
    assert ok, f"{name}: {detail}"
