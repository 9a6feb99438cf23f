import argparse
import json

import pytest

from qdit_jax.cli import search as cli
from qdit_jax.errors import QditError
from qdit_jax.io.checkpoint import save_checkpoint
from qdit_jax.quant.config import load_per_layer
from tests.search._tiny import TINY, tiny_params


def _args(**kw):
    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    argv = []
    for k, v in kw.items():
        flag = "--" + k.replace("_", "-")
        argv += [flag] if v is True else [flag, str(v)]
    return p.parse_args(argv)


def test_bad_budget_is_a_one_line_error(tmp_path):
    with pytest.raises(QditError, match="budget"):
        cli.run(_args(out=str(tmp_path / "s.json"), budget="flops=3"))


def test_search_run_on_tiny_checkpoint_then_resume(tmp_path):
    ckpt = save_checkpoint(tmp_path / "ckpt", tiny_params(), TINY)
    out = tmp_path / "s.json"
    common = dict(ckpt=ckpt, wbits=4, abits=8, groups="16,32,64", budget="mean-group=32", population=3,
                  top_k=2, mutation_num=1, crossover_num=1, num_samples=2, steps=2, seed=0, batch_size=2,
                  no_progress=True, out=str(out))
    assert cli.run(_args(epochs=1, **common)) == 0
    res = json.loads(out.read_text())
    assert len(res["search_log"]) == 1 and res["cost"]["mean_group"] >= 32
    per_layer = load_per_layer(res)  # what `qdit quantize --per-layer` reads
    assert per_layer["blocks_0/attn/qkv"].act.group_size == res["group_sizes"][0]
    assert cli.run(_args(epochs=2, resume=True, **common)) == 0
    res2 = json.loads(out.read_text())
    assert [e["epoch"] for e in res2["search_log"]] == [0, 1]
    assert res2["search_log"][0] == res["search_log"][0]
