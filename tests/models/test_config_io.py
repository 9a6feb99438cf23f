"""The config mixin: DiT / VAE configs survive JSON, and a key from elsewhere is named, not dropped."""
from __future__ import annotations

import json

import pytest

from qdit_jax.errors import QditError
from qdit_jax.models.dit import DiTConfig
from qdit_jax.models.vae import VAEConfig

CONFIGS = [DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=128, depth=1, num_heads=2,
                     num_classes=10, dtype="bfloat16"),
           VAEConfig(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, dtype="bfloat16")]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: type(c).__name__)
def test_json_round_trip_and_replace(cfg):
    again = type(cfg).from_json(cfg.to_json())
    assert again == cfg and hash(again) == hash(cfg)
    assert json.loads(cfg.to_json()) == cfg.to_dict()
    changed = cfg.replace(dtype="float32")
    assert type(changed) is type(cfg) and changed.dtype == "float32" and cfg.dtype == "bfloat16"


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: type(c).__name__)
def test_unknown_keys_are_named_with_the_class(cfg):
    with pytest.raises(QditError, match=f"unknown {type(cfg).__name__} field.*'hiden_size'"):
        type(cfg).from_dict({**cfg.to_dict(), "hiden_size": 3})
