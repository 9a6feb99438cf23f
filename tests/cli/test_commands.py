"""End-to-end `qdit convert / sample / quantize` on a tiny random DiT, and their one-line errors."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from qdit_jax.cli.main import main
from qdit_jax.io.images import load_samples

torch = pytest.importorskip("torch")
from tests.reference.torch_dit import TorchDiT, random_official_state_dict  # noqa: E402


def _one_line_error(capsys, argv) -> str:
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert err.count("\n") == 0 and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def tiny_pt(tmp_path_factory):
    d = tmp_path_factory.mktemp("pt")
    model = TorchDiT(input_size=8, patch_size=2, in_channels=1, hidden_size=64, depth=2, num_heads=2,
                     num_classes=10, learn_sigma=True, class_dropout_prob=0.1)
    path = str(d / "tiny.pt")
    torch.save(random_official_state_dict(model, seed=3), path)
    return path


@pytest.fixture(scope="module")
def tiny_ckpt(tiny_pt, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ck") / "tiny")
    assert main(["convert", tiny_pt, "--out", out, "--num-heads", "2"]) == 0
    return out


def test_convert_writes_a_loadable_checkpoint(tiny_ckpt):
    meta = json.load(open(os.path.join(tiny_ckpt, "config.json")))
    assert meta["model_config"]["hidden_size"] == 64 and meta["model_config"]["depth"] == 2
    assert meta["extra"]["sampling"]["clip_denoised"] is True  # 1-channel pixel model


def test_sample_fp_and_quantized(tiny_ckpt, tmp_path, capsys):
    out = str(tmp_path / "s.npz")
    assert main(["sample", "--ckpt", tiny_ckpt, "--num-samples", "3", "--steps", "2", "--out", out]) == 0
    images, labels = load_samples(out)
    assert images.shape == (3, 8, 8, 1) and images.dtype == np.uint8 and list(labels) == [0, 1, 2]
    assert os.path.exists(str(tmp_path / "s.png"))
    assert images.std() > 0
    # Same seed, same images; another seed, other images.
    out2 = str(tmp_path / "s2.npz")
    main(["sample", "--ckpt", tiny_ckpt, "--num-samples", "3", "--steps", "2", "--out", out2])
    np.testing.assert_array_equal(load_samples(out2)[0], images)
    qdir = str(tmp_path / "q")
    assert main(["quantize", "--ckpt", tiny_ckpt, "--preset", "w8a8", "--w-group", "32", "--a-group", "32",
                 "--out", qdir]) == 0
    qout = str(tmp_path / "q.npz")
    assert main(["sample", "--ckpt", qdir, "--num-samples", "3", "--steps", "2", "--out", qout]) == 0
    q_images = load_samples(qout)[0]
    assert q_images.shape == images.shape
    # W8A8 is close to FP on the same noise, but not bit-identical (it is really quantized).
    diff = np.abs(q_images.astype(int) - images.astype(int))
    assert diff.max() > 0 and diff.mean() < 8


def test_sample_real_execution_matches_fake(tiny_ckpt, tmp_path, capsys):
    """`qdit sample --execution real` (int8 matmuls, packed int4) draws the fake-quant mode's
    images up to accumulation order; on a full-precision checkpoint it is a one-line error."""
    for preset in ("w8a8", "w4a8"):
        qdir = str(tmp_path / preset)
        assert main(["quantize", "--ckpt", tiny_ckpt, "--preset", preset, "--w-group", "32", "--a-group", "32",
                     "--a-sym", "--out", qdir]) == 0
        outs = {}
        for ex in ("fake", "real"):
            outs[ex] = str(tmp_path / f"{preset}-{ex}.npz")
            packed = ["--keep-w4-packed"] if ex == "real" and preset == "w4a8" else []
            assert main(["sample", "--ckpt", qdir, "--num-samples", "4", "--steps", "3", "--execution", ex,
                         "--out", outs[ex]] + packed) == 0
        assert "real)" in capsys.readouterr().out
        fake, real = load_samples(outs["fake"])[0].astype(int), load_samples(outs["real"])[0].astype(int)
        assert fake.std() > 0 and np.abs(real - fake).max() <= 2, np.abs(real - fake).max()
        # and 'real' really runs integer matmuls (fake-quant runs float ones)
        import jax
        import jax.numpy as jnp

        from qdit_jax.io.loading import load_model
        from qdit_jax.quant.runtime import model_apply_fn
        from tests.quant.test_real import _dot_operand_dtypes

        m = load_model(qdir)
        x = jnp.zeros((2, 8, 8, 1), jnp.float32) + 0.5
        t, y = jnp.asarray([3, 7], jnp.int32), jnp.asarray([1, 2], jnp.int32)
        n_int8 = {}
        for ex in ("fake", "real"):
            fn, variables = model_apply_fn(m, execution=ex)
            dts = _dot_operand_dtypes(jax.make_jaxpr(fn)(variables, x, t, y).jaxpr)
            n_int8[ex] = sum(1 for d in dts if d == ("int8", "int8"))
        assert n_int8 == {"fake": 0, "real": 4 * 2}, n_int8
        if preset == "w4a8":  # packed 4-bit codes stay packed or become int8 codes at load, as asked
            dts = {u: {str(w.codes.dtype) for w in model_apply_fn(m, execution="real", unpack_w4=u)[1]["weights"].values()}
                   for u in (True, False)}
            assert dts == {True: {"int8"}, False: {"uint8"}}, dts
    err = _one_line_error(capsys, ["sample", "--ckpt", tiny_ckpt, "--execution", "real", "--out",
                                   str(tmp_path / "x.npz")])
    assert "quantized checkpoint" in err and "qdit quantize" in err
    asym = str(tmp_path / "asym")  # the presets' asymmetric activations have no real int8 path
    assert main(["quantize", "--ckpt", tiny_ckpt, "--preset", "w8a8", "--w-group", "32", "--a-group", "32",
                 "--out", asym]) == 0
    err = _one_line_error(capsys, ["sample", "--ckpt", asym, "--execution", "real", "--out", str(tmp_path / "y.npz")])
    assert "--a-sym" in err


def test_w4a8_with_fp8_activations_quantizes_and_runs_real(tiny_ckpt, tmp_path, capsys):
    """`qdit quantize --act-format fp8_e4m3`: 4-bit weights (stored packed), fp8 activations; `qdit sample
    --execution real` draws the fake-quant images up to accumulation order with every quantized product
    on fp8 operands (the 4-bit codes as fp8); integer 8-bit weights with fp8 activations are refused."""
    import jax
    import jax.numpy as jnp

    from qdit_jax.io.loading import load_model
    from qdit_jax.quant.runtime import model_apply_fn
    from tests.quant.test_real import _dot_operand_dtypes

    qdir = str(tmp_path / "w4a8fp8")
    assert main(["quantize", "--ckpt", tiny_ckpt, "--preset", "w4a8", "--w-group", "32", "--a-group", "32",
                 "--w-sym", "--a-sym", "--act-format", "fp8_e4m3", "--out", qdir]) == 0
    outs = {}
    for ex in ("fake", "real"):
        outs[ex] = str(tmp_path / f"{ex}.npz")
        assert main(["sample", "--ckpt", qdir, "--num-samples", "4", "--steps", "3", "--execution", ex,
                     "--out", outs[ex]]) == 0
    fake, real = load_samples(outs["fake"])[0].astype(int), load_samples(outs["real"])[0].astype(int)
    assert fake.std() > 0 and np.abs(real - fake).max() <= 2, np.abs(real - fake).max()
    m = load_model(qdir)
    x = jnp.zeros((2, 8, 8, 1), jnp.float32) + 0.5
    t, y = jnp.asarray([3, 7], jnp.int32), jnp.asarray([1, 2], jnp.int32)
    for unpack in (True, False):
        fn, variables = model_apply_fn(m, execution="real", unpack_w4=unpack)
        dts = _dot_operand_dtypes(jax.make_jaxpr(fn)(variables, x, t, y).jaxpr)
        assert sum(1 for d in dts if d == ("float8_e4m3fn", "float8_e4m3fn")) == 4 * 2, dts
        codes = {str(w.codes.dtype) for w in variables["weights"].values()}
        assert codes == ({"float8_e4m3fn", "int8"} if unpack else {"uint8"}), codes  # int8: the adaLN layers
    w8 = str(tmp_path / "w8a8fp8")
    assert main(["quantize", "--ckpt", tiny_ckpt, "--preset", "w8a8", "--w-group", "32", "--a-group", "32",
                 "--w-sym", "--a-sym", "--act-format", "fp8_e4m3", "--out", w8]) == 0
    capsys.readouterr()
    err = _one_line_error(capsys, ["sample", "--ckpt", w8, "--execution", "real", "--out", str(tmp_path / "z.npz")])
    assert "8-bit symmetric integer weights" in err and "4 bits" in err


def test_sample_bad_inputs_are_one_line_errors(tiny_ckpt, tmp_path, capsys):
    out = str(tmp_path / "s.npz")
    assert "--steps" in _one_line_error(capsys, ["sample", "--steps", "0", "--out", out])
    assert "37 DDIM steps" in _one_line_error(capsys, ["sample", "--steps", "37", "--out", out])
    labels = str(tmp_path / "y.npy")
    np.save(labels, np.array([1, 12], np.int64))
    err = _one_line_error(capsys, ["sample", "--ckpt", tiny_ckpt, "--num-samples", "2", "--labels", labels, "--out", out])
    assert "label 12" in err and "0..9" in err
    assert "does not exist" in _one_line_error(capsys, ["sample", "--ckpt", str(tmp_path / "nope"), "--out", out])


def test_convert_bad_inputs_are_one_line_errors(tiny_pt, tmp_path, capsys):
    trunc = str(tmp_path / "trunc.pt")
    with open(tiny_pt, "rb") as f:
        data = f.read()
    with open(trunc, "wb") as f:
        f.write(data[: len(data) // 2])
    _one_line_error(capsys, ["convert", trunc, "--out", str(tmp_path / "o1")])
    sd = torch.load(tiny_pt, weights_only=True)
    sd["blocks.0.attn.qkv.weigth"] = sd.pop("blocks.0.attn.qkv.weight")
    renamed = str(tmp_path / "renamed.pt")
    torch.save(sd, renamed)
    err = _one_line_error(capsys, ["convert", renamed, "--out", str(tmp_path / "o2")])
    assert "blocks.0.attn.qkv" in err
    assert not os.path.exists(str(tmp_path / "o2"))


def test_quantize_bad_inputs_are_one_line_errors(tiny_ckpt, tmp_path, capsys):
    out = str(tmp_path / "q")
    assert "does not divide" in _one_line_error(capsys, ["quantize", "--ckpt", tiny_ckpt, "--w-group", "48",
                                                          "--a-group", "32", "--out", out])
    assert "bits" in _one_line_error(capsys, ["quantize", "--ckpt", tiny_ckpt, "--wbits", "9", "--out", out])
    assert "bits" in _one_line_error(capsys, ["quantize", "--ckpt", tiny_ckpt, "--wbits", "1", "--out", out])
    per_layer = str(tmp_path / "pl.json")
    json.dump({"blocks_9/mlp/fc1": {"weight": {"bits": 4, "group_size": 32}}}, open(per_layer, "w"))
    assert "blocks_9/mlp/fc1" in _one_line_error(capsys, ["quantize", "--ckpt", tiny_ckpt, "--w-group", "32",
                                                           "--a-group", "32", "--per-layer", per_layer, "--out", out])


def test_sample_latent_model_decodes_with_vae(tmp_path, capsys):
    """A latent (4-channel) DiT: `qdit sample` refuses without --vae, and decodes with one."""
    diffusers = pytest.importorskip("diffusers")
    model = TorchDiT(input_size=4, patch_size=2, in_channels=4, hidden_size=64, depth=1, num_heads=2,
                     num_classes=10, learn_sigma=True, class_dropout_prob=0.1)
    pt = str(tmp_path / "latent.pt")
    torch.save(random_official_state_dict(model, seed=5), pt)
    ck = str(tmp_path / "ck")
    assert main(["convert", pt, "--out", ck, "--num-heads", "2"]) == 0
    out = str(tmp_path / "s.npz")
    assert "--vae" in _one_line_error(capsys, ["sample", "--ckpt", ck, "--num-samples", "2", "--steps", "2", "--out", out])
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                                  block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, latent_channels=4)
    vae_dir = str(tmp_path / "vae")
    vae.save_pretrained(vae_dir)
    assert main(["sample", "--ckpt", ck, "--vae", vae_dir, "--num-samples", "2", "--steps", "2", "--cfg-scale", "4",
                 "--out", out]) == 0
    images, labels = load_samples(out)
    assert images.shape == (2, 8, 8, 3) and images.dtype == np.uint8  # 2x upsampling VAE: 4x4 latents -> 8x8 RGB


def test_quantize_scale_dtype_float16_is_stored(tiny_ckpt, tmp_path):
    """`qdit quantize --scale-dtype float16` writes float16 weight scales (and the spec says so)."""
    from qdit_jax.io.loading import load_model
    from qdit_jax.quant.interceptor import get_kernel

    qdir = str(tmp_path / "q16")
    assert main(["quantize", "--ckpt", tiny_ckpt, "--preset", "w8a8", "--w-group", "32", "--a-group", "32",
                 "--scale-dtype", "float16", "--summary-samples", "0", "--calib-samples", "4", "--out", qdir]) == 0
    m = load_model(qdir)
    assert get_kernel(m.params, "blocks_0/mlp/fc1")["scale"].dtype == np.float16
    assert '"scale_dtype": "float16"' in json.dumps(m.quantization)
