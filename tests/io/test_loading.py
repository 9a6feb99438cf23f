"""The bundled default model is the shared trained checkpoint, converted exactly."""
from __future__ import annotations

import os

import numpy as np
import pytest

from qdit_jax.io.loading import flatten, load_model, sampling_defaults_for

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHARED_PT = os.path.join(os.environ.get("QDIT_SHARED", os.path.join(ROOT, "..", "shared")), "models", "dit_fmnist_fp16.pt")


def test_bundled_model_loads_without_torch_and_has_the_documented_config():
    m = load_model(None)
    c = m.config
    assert (c.input_size, c.patch_size, c.in_channels, c.hidden_size, c.depth, c.num_heads, c.num_classes) == (
        32, 2, 1, 256, 12, 4, 10)
    assert m.sampling_defaults == sampling_defaults_for(c) and m.sampling_defaults["clip_denoised"] is True
    n = sum(v.size for v in flatten(m.params).values())
    assert n + 256 * 256 == 14_536_712  # the README's count includes the frozen pos_embed


def test_bundled_model_equals_the_converted_checkpoint():
    pytest.importorskip("torch")
    if not os.path.exists(SHARED_PT):
        pytest.skip(f"{SHARED_PT} not present")
    from qdit_jax.convert.torch_dit import convert_torch_checkpoint

    params, cfg = convert_torch_checkpoint(SHARED_PT)
    bundled = load_model(None)
    assert bundled.config == cfg
    a, b = flatten(params), flatten(bundled.params)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
