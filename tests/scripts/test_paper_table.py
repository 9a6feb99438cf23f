"""scripts/paper_table.py: the recipes of its rows, and the --dry-run pipeline end to end."""
from __future__ import annotations

import importlib.util
import json
import os
import sys
import time

import pytest

from qdit_jax.errors import QditError
from qdit_jax.models.dit import DiTConfig
from qdit_jax.quant.config import resolve
from qdit_jax.quant.interceptor import discover_layers

_PATH = os.path.join(os.path.dirname(__file__), "..", "..", "scripts", "paper_table.py")
_spec = importlib.util.spec_from_file_location("paper_table", _PATH)
paper_table = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("paper_table", paper_table)  # dataclasses look their module up
_spec.loader.exec_module(paper_table)

_CFG = DiTConfig(input_size=8, patch_size=2, hidden_size=64, depth=2, num_heads=2, num_classes=10)


def test_method_configs(tmp_path):
    layers = discover_layers(_CFG)
    rtn = resolve(paper_table.method_config("rtn", 4, 8, 32), layers).as_dict()
    lq = rtn["blocks_0/attn/qkv"]
    assert (lq.weight.bits, lq.weight.group_size, lq.act.bits, lq.act.group_size) == (4, 0, 8, 0)
    assert paper_table.method_config("rtn", 4, 8, 32).act_mode == "static"
    grp = paper_table.method_config("rtn_group", 6, 8, 32)
    assert grp.act_mode == "static" and grp.rules[0].weight.group_size == 32 and not grp.gptq
    assert paper_table.method_config("rtn_group_dynamic", 8, 8, 32).act_mode == "dynamic"
    q = paper_table.method_config("qdit", 4, 8, 32)
    assert q.gptq and q.act_mode == "dynamic"
    with pytest.raises(QditError, match="--search-config"):
        paper_table.method_config("qdit_search", 4, 8, 32)
    path = tmp_path / "layers.json"
    paper_table.write_search_config(str(path), _CFG, 4, 8, groups=(32, 16))
    per_layer = paper_table.read_per_layer(str(path))
    plan = resolve(paper_table.method_config("qdit_search", 4, 8, 32, per_layer), layers).as_dict()
    assert {lq.weight.group_size for lq in plan.values()} == {16, 32}
    with pytest.raises(QditError, match="PRECISION=PATH"):
        paper_table.parse_search_configs(["w5a8=x.json"])


def test_markdown_layout():
    md = paper_table.format_markdown([{"method": "FP", "bits": "32/32", "fid": 5.0, "sfid": 6.0, "is": 7.0,
                                       "precision": 0.5}])
    assert md.splitlines()[0].startswith("| Method | W/A | FID")
    assert md.splitlines()[2] == "| FP | 32/32 | 5.00 | 6.00 | 7.00 | 50.00 |"


@pytest.mark.slow
def test_dry_run_end_to_end(tmp_path):
    pytest.importorskip("torch")
    t0 = time.time()
    rc = paper_table.main(["--dry-run", "--out", str(tmp_path)])  # every row of the table
    elapsed = time.time() - t0
    assert rc == 0
    result = json.loads((tmp_path / "paper_table.json").read_text())
    rows = {r["key"]: r for r in result["rows"]}
    assert list(rows) == list(paper_table.METHODS)
    for key, row in rows.items():
        for metric in ("fid", "sfid", "is", "precision", "recall"):
            assert row[metric] is not None and row[metric] >= 0, (key, metric)
        assert row["bits"] == ("32/32" if key == "fp" else "4/8")
        if key != "fp":
            assert 0 < row["ssim"] <= 1.0  # fidelity to the FP samples of the same noise
    md = (tmp_path / "paper_table.md").read_text()
    assert md.count("\n") == 2 + len(rows) and "Q-DiT + searched groups" in md
    print(f"dry run took {elapsed:.1f}s")
