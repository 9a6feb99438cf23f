"""`qdit bench`: every variant builds and computes the model it names (CPU), and the command writes
its table / JSON; unknown variants are one-line errors."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qdit_jax.cli.bench import VARIANTS, build_variant, parse_tiles, random_params
from qdit_jax.cli.main import main
from qdit_jax.errors import QditError
from qdit_jax.models.dit import DiT, DiTConfig

CFG = DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=128, depth=1, num_heads=2,
                num_classes=10, dtype="bfloat16")


@pytest.fixture(scope="module")
def params():
    return random_params(CFG)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_every_variant_computes_its_model(name, params):
    """Each variant's forward is the bf16 model up to its quantization error: close, and (for the
    quantized ones) not identical."""
    apply_fn, vparams, info = build_variant(name, CFG, params, parse_tiles("16,16,32,4,2"), False)
    r = np.random.default_rng(0)
    x = jnp.asarray(r.standard_normal((2, 8, 8, 4)), jnp.float32)
    t, y = jnp.asarray([5, 900], jnp.int32), jnp.asarray([1, 7], jnp.int32)
    if name == "bf16-triton-attn":  # the Triton attention kernel: GPU only, and 16 tokens are too few for it
        from qdit_jax.models.attention_kernel import attention_applies

        ok, why = attention_applies((2, CFG.num_patches, CFG.num_heads, CFG.hidden_size // CFG.num_heads),
                                    jnp.bfloat16)
        if not ok:
            with pytest.raises(QditError, match="Triton attention kernel does not apply"):
                jax.jit(apply_fn)(vparams, x, t, y)
            return
    if name == "bf16-cudnn-attn" and jax.default_backend() != "gpu":  # cuDNN: GPU only
        with pytest.raises(QditError, match="cuDNN attention is not available here"):
            jax.jit(apply_fn)(vparams, x, t, y)
        return
    out = np.asarray(jax.jit(apply_fn)(vparams, x, t, y), np.float64)
    ref = np.asarray(DiT(CFG.replace(dtype="float32")).apply({"params": params}, x, t, y), np.float64)
    err = np.linalg.norm(out - ref) / np.linalg.norm(ref)
    assert np.isfinite(out).all() and err < 0.15, (name, err)
    if VARIANTS[name][1] != "fp":
        assert err > 1e-3, (name, err)  # really quantized
        assert info["weight_bytes"]["quantized"] < info["weight_bytes"]["bf16"]


def test_bench_command_writes_rows_and_profiles(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "")  # --profile adds a flag; keep it out of the other tests
    out = str(tmp_path / "b.json")
    assert main(["bench", "--model", "S/8", "--batch", "2", "--variants", "bf16", "real-w8a8", "--repeats", "2",
                 "--matmul-peak", "0", "--sample-batch", "2", "--sample-steps", "2", "--profile", "1",
                 "--dump-hlo", str(tmp_path / "hlo"), "--json", out]) == 0
    rows = json.load(open(out))["rows"]
    fwd = [r for r in rows if "batch" in r]
    assert [(r["variant"], r["batch"]) for r in fwd] == [("bf16", 2), ("real-w8a8", 2)]
    assert all(r["images_per_s"] > 0 and r["profile"]["us_by_kind"]["total"] > 0 for r in fwd)
    for r in fwd:  # every instruction is kept, and the times add up to the total
        assert abs(sum(o["us"] for o in r["profile"]["ops"]) - r["profile"]["us_by_kind"]["total"]) < 1e-6 * max(
            1.0, r["profile"]["us_by_kind"]["total"])
    assert "dot" in (tmp_path / "hlo" / "real-w8a8_b2.hlo.txt").read_text()
    assert fwd[1]["weight_bytes"]["quantized"] < 0.6 * fwd[1]["weight_bytes"]["bf16"]
    assert sum(1 for r in rows if "sample_images_per_s" in r) == 2
    text = capsys.readouterr().out
    assert "profile bf16 b2" in text and "x bf16" in text
    assert "sampling (DDIM, CFG)" in text and "\nreal-w8a8 " in text.split("sampling (DDIM, CFG)")[1]


def test_unknown_variant_is_a_one_line_error(capsys):
    assert main(["bench", "--model", "S/8", "--variants", "bf17"]) == 2
    err = capsys.readouterr().err.strip()
    assert "bf17" in err and "choose from" in err and "\n" not in err


def test_disable_command_buffers_adds_the_flag_once(monkeypatch):
    from qdit_jax.cli.bench import NO_COMMAND_BUFFERS, disable_command_buffers

    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/x")
    disable_command_buffers()
    disable_command_buffers()
    flags = __import__("os").environ["XLA_FLAGS"].split()
    assert flags.count(NO_COMMAND_BUFFERS) == 1 and "--xla_dump_to=/tmp/x" in flags


def test_xla_options_parse_and_reject_bad_items():
    from qdit_jax.cli.bench import parse_xla_options
    from qdit_jax.errors import QditError

    assert parse_xla_options(["xla_gpu_enable_triton_gemm=false", "a=3", "b=x"]) == {
        "xla_gpu_enable_triton_gemm": False, "a": 3, "b": "x"}
    with pytest.raises(QditError, match="KEY=VALUE"):
        parse_xla_options(["no_value"])


def test_looped_forward_equals_one_call_per_step(params):
    """The scan of K forwards gives each step's forward, in order (so the loop timing times the model)."""
    from qdit_jax.cli.bench import looped_forward

    apply_fn, vparams, _ = build_variant("bf16", CFG, params, parse_tiles("16,16,32,4,2"), False)
    r = np.random.default_rng(3)
    xs = jnp.asarray(r.standard_normal((3, 2, 8, 8, 4)), jnp.float32)
    ts, ys = jnp.asarray(r.integers(0, 1000, (3, 2)), jnp.int32), jnp.asarray(r.integers(0, 10, (3, 2)), jnp.int32)
    looped = np.asarray(jax.jit(looped_forward(apply_fn))(vparams, xs, ts, ys), np.float32)
    one = jax.jit(apply_fn)
    for i in range(3):
        np.testing.assert_allclose(looped[i], np.asarray(one(vparams, xs[i], ts[i], ys[i]), np.float32),
                                   rtol=2e-2, atol=2e-2)
    assert np.abs(looped[0] - looped[1]).max() > 1e-2  # the steps really differ


def test_bench_loop_back_to_back_and_gaps_rows(tmp_path, capsys):
    out = str(tmp_path / "b.json")
    assert main(["bench", "--model", "S/8", "--batch", "2", "--variants", "bf16", "real-w8a8", "--repeats", "2",
                 "--matmul-peak", "0", "--loop", "3", "--back-to-back", "4", "--gaps", "2", "--json", out]) == 0
    rows = [r for r in json.load(open(out))["rows"] if "batch" in r]
    for row in rows:
        assert row["loop_k"] == 3 and row["loop_images_per_s"] > 0
        assert row["b2b_calls"] == 4 and row["b2b_images_per_s"] == pytest.approx(2 / row["b2b_median_s"])
        assert row["gaps"]["span_us"] >= row["gaps"]["busy_us"] > 0
    text = capsys.readouterr().out
    assert "forwards in one scan" in text and "loop img/s" in text and "gaps bf16 b2" in text
    table = text.split("b2b img/s")[1]
    cols = table.split("\nreal-w8a8 ")[1].split()  # batch, img/s, x bf16, TFLOP/s, frac, MB, MB, b2b, x bf16, ...
    b2b_rel = float(cols[8])
    assert b2b_rel == pytest.approx(rows[1]["b2b_images_per_s"] / rows[0]["b2b_images_per_s"], rel=1e-2)
