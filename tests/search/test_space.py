import json

import numpy as np
import pytest

from qdit_jax.errors import QditError
from qdit_jax.models.dit import dit_config
from qdit_jax.quant.config import QuantConfig, load_per_layer, qdit_rules, resolve
from qdit_jax.quant.interceptor import discover_layers
from qdit_jax.search.space import QDIT_XL_GROUPS, build_space, parse_groups
from tests.search._tiny import TINY


def test_xl_space_has_112_slots_with_qdit_choices():
    space = build_space(dit_config("XL/2"), 4, 8)
    assert len(space) == 112
    assert all(s.choices == QDIT_XL_GROUPS for s in space.slots)  # 1152 and 4608 are multiples of 288
    assert {s.path.split("/", 1)[1] for s in space.slots} == {"attn/qkv", "attn/proj", "mlp/fc1", "mlp/fc2"}


def test_choices_are_filtered_to_divisors_and_error_without_any():
    space = build_space(TINY, 4, 8, groups=(16, 48, 64, 128))
    for s in space.slots:
        assert all(s.in_features % g == 0 for g in s.choices)
    fc2 = [s for s in space.slots if s.path.endswith("fc2")][0]  # width 256
    assert fc2.choices == (16, 64, 128)
    qkv = [s for s in space.slots if s.path.endswith("qkv")][0]  # width 64
    assert qkv.choices == (16, 64)
    with pytest.raises(QditError, match="no candidate group size divides"):
        build_space(TINY, 4, 8, groups=(48, 96))


def test_candidate_conversions_and_per_layer_json_roundtrip(tmp_path):
    space = build_space(TINY, 4, 8, groups=(16, 32, 64))
    cand = (16, 32, 64, 16)
    assert space.from_indices(space.to_indices(cand)) == cand
    with pytest.raises(QditError, match="not a choice"):
        space.check((16, 32, 64, 17))
    d = space.to_json_config(cand, note="x")
    path = tmp_path / "c.json"
    path.write_text(json.dumps(d))
    per_layer = load_per_layer(json.loads(path.read_text()))
    plan = resolve(QuantConfig(qdit_rules(4, 8), per_layer=per_layer), discover_layers(TINY)).as_dict()
    for s, g in zip(space.slots, cand):
        assert plan[s.path].weight.group_size == g and plan[s.path].act.group_size == g
        assert plan[s.path].weight.bits == 4 and plan[s.path].act.bits == 8
    assert plan["blocks_0/adaLN_modulation"].act is None


def test_closest_uniform_and_parse_groups():
    space = build_space(TINY, 4, 8, groups=(16, 32, 64))
    assert space.closest_uniform(128) == (64,) * 4
    assert space.closest_uniform(24) == (32,) * 4  # tie 16/32 -> larger
    assert parse_groups("64, 32,32") == (32, 64)
    with pytest.raises(QditError):
        parse_groups("32,abc")
    rng = np.random.default_rng(0)
    assert all(space.contains(space.random(rng)) for _ in range(20))
