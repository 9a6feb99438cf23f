"""Whole-model quantization: RTN vs GPTQ, static calibration, quantized checkpoints."""
from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from qdit_jax.diffusion.pipeline import dit_apply_fn
from qdit_jax.errors import QditError
from qdit_jax.io.loading import load_model
from qdit_jax.quant.calibration import CalibrationData, calibrate_static
from qdit_jax.quant.checkpoint import quantized_apply_fn, save_quantized
from qdit_jax.quant.config import LayerQuant, preset, resolve
from qdit_jax.quant.interceptor import discover_layers, get_kernel, quantized
from qdit_jax.models.dit import DiT
from qdit_jax.quant.quantize import quantize_model, weight_bytes
from qdit_jax.quant.quantizers import dequantize

from tests.quant.conftest import inputs


def _layer_inputs(cfg, params, calib, path):
    got = []

    def tap(p, i, a):
        if p == path:
            got.append(a.reshape(-1, a.shape[-1]))

    with quantized({path: LayerQuant(None, None)}, None, tap):
        DiT(cfg).apply({"params": params}, jnp.asarray(calib.x), jnp.asarray(calib.t), jnp.asarray(calib.y))
    return np.asarray(jnp.concatenate(got), np.float64)


def test_calibration_records_cfg_pairs(tiny, tiny_calib):
    cfg, _ = tiny
    assert len(tiny_calib) == 8 * 2 * 2  # samples x steps per sample x (cond, uncond)
    assert set(np.unique(tiny_calib.y[1::2])) == {cfg.null_label}
    assert np.all(tiny_calib.y[0::2] < cfg.num_classes)
    assert tiny_calib.final.shape == (8, 8, 8, 1)


def test_calibration_save_load(tmp_path, tiny_calib):
    path = str(tmp_path / "calib.npz")
    tiny_calib.save(path)
    back = CalibrationData.load(path)
    np.testing.assert_array_equal(back.x, tiny_calib.x)
    np.testing.assert_array_equal(back.t, tiny_calib.t)
    with pytest.raises(QditError, match="does not exist"):
        CalibrationData.load(str(tmp_path / "nope.npz"))


def test_static_scales_are_minmax_over_all_calibration_inputs(tiny, tiny_calib):
    cfg, params = tiny
    plan = resolve(preset("w8a8", w_group=32, a_group=0, act_mode="static"), discover_layers(cfg)).as_dict()
    static = calibrate_static(params, cfg, plan, tiny_calib, batch_size=32)
    path = "blocks_1/mlp/fc2"
    x = _layer_inputs(cfg, params, tiny_calib, path)
    lo, hi = x.min(), x.max()
    expected_scale = (hi - lo) / 255.0
    np.testing.assert_allclose(float(static[path][0].scale[0]), expected_scale, rtol=1e-5)
    np.testing.assert_allclose(float(static[path][0].zero_point[0]), np.round(-lo / expected_scale), atol=0)


def test_gptq_layer_error_below_rtn(tiny, tiny_calib):
    cfg, params = tiny
    base = preset("w4a8", w_group=32, a_group=32)
    rtn = quantize_model(params, cfg, base, calib=tiny_calib, batch_size=32)
    gq = quantize_model(params, cfg, base.replace(gptq=True), calib=tiny_calib, batch_size=32)
    path = "blocks_0/mlp/fc1"  # first block: both see the same (quantized) inputs
    x = _layer_inputs(cfg, params, tiny_calib, path)
    w = np.asarray(get_kernel(params, path)["kernel"], np.float64)
    err = lambda qp: np.linalg.norm(x @ w - x @ np.asarray(get_kernel(qp, path)["kernel"], np.float64))
    assert err(gq.params) < 0.9 * err(rtn.params)
    # GPTQ's float weights are exactly its stored codes dequantized.
    c, qp = gq.codes[path]
    np.testing.assert_array_equal(np.asarray(dequantize(c, qp, 32)).T, np.asarray(get_kernel(gq.params, path)["kernel"]))
    # And the whole model's output is closer to FP.
    xx, t, y = jnp.asarray(tiny_calib.x[:16]), jnp.asarray(tiny_calib.t[:16]), jnp.asarray(tiny_calib.y[:16])
    ref = dit_apply_fn(cfg)(params, xx, t, y)
    e_rtn = float(jnp.linalg.norm(rtn.apply_fn()(rtn.bundle, xx, t, y) - ref))
    e_gptq = float(jnp.linalg.norm(gq.apply_fn()(gq.bundle, xx, t, y) - ref))
    assert e_gptq < e_rtn


@pytest.mark.parametrize("name,kw", [("w4a8", {}), ("w8a8", {"act_mode": "static"}),
                                     ("w8a8", {"fmt": "fp8_e4m3", "w_sym": True, "a_sym": True}),
                                     ("w8a8", {"scale_dtype": "float16"})])
def test_quantized_checkpoint_round_trip(tmp_path, tiny, tiny_calib, name, kw):
    cfg, params = tiny
    qcfg = preset(name, w_group=32, a_group=32, **kw)
    qm = quantize_model(params, cfg, qcfg, calib=tiny_calib, batch_size=32)
    out = str(tmp_path / "q")
    save_quantized(out, qm, params)
    loaded = load_model(out)
    assert loaded.quantization["name"] == name
    apply_fn, qbundle = quantized_apply_fn(loaded)
    x, t, y = inputs(cfg, 2)
    np.testing.assert_array_equal(np.asarray(apply_fn(qbundle, x, t, y)), np.asarray(qm.apply_fn()(qm.bundle, x, t, y)))
    stored = get_kernel(loaded.params, "blocks_0/mlp/fc1")
    assert "kernel" not in stored
    if kw.get("fmt") is None and name == "w4a8":
        assert stored["codes"].dtype == np.uint8 and stored["codes"].shape == (256, 32)  # (out, in/2): packed
    wb = weight_bytes(qm)
    # Hand count: codes at 4 bits packed (or 1 byte), plus a 4-byte (float16: 2-byte) scale and a 1-byte
    # zero point per group of 32.
    shapes = [(l.out_features, l.in_features) for l in discover_layers(cfg) if l.path in qm.codes]
    per_code = 0.5 if name == "w4a8" else 1.0
    per_group = 3 if kw.get("scale_dtype") == "float16" else 5
    assert wb["quantized"] == sum(int(o * i * per_code) + o * (i // 32) * per_group for o, i in shapes)
    if kw.get("scale_dtype") == "float16":  # stored as float16, the values the codes were made with
        assert stored["scale"].dtype == np.float16
        np.testing.assert_array_equal(np.asarray(stored["scale"], np.float32),
                                      np.asarray(qm.codes["blocks_0/mlp/fc1"][1].scale, np.float32))
    assert wb["bf16"] == sum(o * i * 2 for o, i in shapes)


def test_quantized_checkpoint_with_mismatched_model_is_refused(tmp_path, tiny):
    cfg, params = tiny
    qm = quantize_model(params, cfg, preset("w4a8", w_group=32, a_group=32))
    out = str(tmp_path / "q")
    save_quantized(out, qm, params)
    meta_path = os.path.join(out, "config.json")
    meta = json.load(open(meta_path))
    meta["model_config"]["depth"] = 1  # the stored plan names blocks_1, which this config lacks
    json.dump(meta, open(meta_path, "w"))
    with pytest.raises(QditError, match="does not have"):
        quantized_apply_fn(load_model(out))


def test_gptq_and_static_need_calibration(tiny):
    cfg, params = tiny
    with pytest.raises(QditError, match="calibration"):
        quantize_model(params, cfg, preset("w4a8", w_group=32, a_group=32, gptq=True))


def test_hessians_count_each_calibration_input_once(tiny, tiny_calib):
    """The padded last batch must not count wrapped-around inputs twice."""
    from qdit_jax.quant.quantize import _HessianRunner

    cfg, params = tiny
    plan = resolve(preset("w4a8", w_group=32, a_group=32), discover_layers(cfg)).as_dict()
    sub = CalibrationData(tiny_calib.x[:5], tiny_calib.t[:5], tiny_calib.y[:5])
    runner = _HessianRunner(cfg, plan, None)
    h_whole = runner(params, sub, 5)
    h_padded = runner(params, sub, 2)  # batches of 2: the third batch repeats input 0
    for path in ("blocks_0/mlp/fc1", "blocks_1/attn/qkv"):
        np.testing.assert_allclose(np.asarray(h_padded[path]), np.asarray(h_whole[path]), rtol=2e-5, atol=1e-5)


def test_gptq_with_float16_scales_stores_what_it_used(tiny, tiny_calib):
    """GPTQ picks its scales through the same quantizer, so with float16 weight scales its float
    weights are still exactly its codes times the (float16-representable) stored scales."""
    cfg, params = tiny
    gq = quantize_model(params, cfg, preset("w4a8", w_group=32, a_group=32, gptq=True, scale_dtype="float16"),
                        calib=tiny_calib, batch_size=32)
    path = "blocks_0/mlp/fc1"
    c, qp = gq.codes[path]
    scale = np.asarray(qp.scale, np.float32)
    np.testing.assert_array_equal(scale.astype(np.float16).astype(np.float32), scale)
    np.testing.assert_array_equal(np.asarray(dequantize(c, qp, 32)).T, np.asarray(get_kernel(gq.params, path)["kernel"]))
