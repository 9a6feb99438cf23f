"""VAE decoder parity with diffusers' AutoencoderKL (every weight random), and the converter's checks."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from qdit_jax.convert.vae import convert_vae_state_dict, load_diffusers_vae, load_vae, save_vae
from qdit_jax.errors import QditError
from qdit_jax.models.vae import VAEConfig, decode_latents, decode_to_uint8

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

SMALL_A = dict(block_out_channels=(32, 64), norm_num_groups=8, layers_per_block=1)
SMALL_B = dict(block_out_channels=(32, 48, 64), norm_num_groups=16, layers_per_block=2)
SD_VAE = dict(block_out_channels=(128, 256, 512, 512), norm_num_groups=32, layers_per_block=2)

_LEGACY = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def _random_vae(kw: dict, seed: int = 0) -> "diffusers.AutoencoderKL":
    """An AutoencoderKL whose every parameter is random (norm scales near 1, fan-in scaled weights)."""
    torch.manual_seed(seed)
    n = len(kw["block_out_channels"])
    with torch.device("meta"):  # skip torch's default init: every tensor is overwritten below
        vae = diffusers.AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * n,
                                      up_block_types=("UpDecoderBlock2D",) * n, latent_channels=4, **kw)
    vae = vae.to_empty(device="cpu").eval()
    assert not list(vae.buffers())
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if name.endswith("weight") and p.ndim > 1:
                p.copy_(torch.randn_like(p) / p[0].numel() ** 0.5)
            elif name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
    return vae


def _reference(vae, latents: np.ndarray) -> np.ndarray:
    """diffusers' decode of DiT-scaled NHWC latents, as NHWC NumPy."""
    with torch.no_grad():
        z = torch.from_numpy(latents).permute(0, 3, 1, 2) / vae.config.scaling_factor
        return vae.decode(z).sample.permute(0, 2, 3, 1).numpy()


def _rel_err(out, ref) -> float:
    return float(np.max(np.abs(np.asarray(out) - ref)) / np.max(np.abs(ref)))


def _latents(n: int, side: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, side, side, 4)).astype(np.float32)


@pytest.fixture(scope="module")
def small_a(tmp_path_factory):
    """(torch model, its save_pretrained directory) for SMALL_A."""
    vae = _random_vae(SMALL_A, seed=0)
    d = tmp_path_factory.mktemp("vae_a")
    vae.save_pretrained(d)
    return vae, str(d)


def test_small_decoder_matches_diffusers_safetensors_dir(small_a):
    vae, d = small_a
    params, cfg = load_diffusers_vae(d)
    assert cfg == VAEConfig(**SMALL_A)
    z = _latents(2, 4)
    out = decode_latents(params, cfg, z)
    assert out.shape == (2, 8, 8, 3)
    assert _rel_err(out, _reference(vae, z)) <= 1e-5


def test_small_decoder_matches_diffusers_bin_dir(tmp_path):
    vae = _random_vae(SMALL_B, seed=3)
    vae.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "diffusion_pytorch_model.bin").is_file()
    params, cfg = load_diffusers_vae(str(tmp_path))
    assert cfg == VAEConfig(**SMALL_B)
    z = _latents(2, 3)
    out = decode_latents(params, cfg, z)
    assert out.shape == (2, 12, 12, 3)
    assert _rel_err(out, _reference(vae, z)) <= 1e-5


def test_sd_vae_decoder_matches_diffusers(tmp_path):
    vae = _random_vae(SD_VAE, seed=5)
    vae.save_pretrained(tmp_path)
    params, cfg = load_diffusers_vae(str(tmp_path))
    assert cfg == VAEConfig()  # the defaults are sd-vae-ft-ema's
    z = _latents(1, 4)
    out = decode_latents(params, cfg, z)
    assert out.shape == (1, 32, 32, 3)
    assert _rel_err(out, _reference(vae, z)) <= 1e-5


def test_legacy_attention_names_load_like_diffusers(small_a, tmp_path):
    """A checkpoint with query/key/value/proj_attn: diffusers' own loader is the reference mapping."""
    from safetensors.torch import save_file

    vae, d = small_a
    sd = {}
    for k, v in vae.state_dict().items():
        for new, old in _LEGACY.items():
            k = k.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
        sd[k] = v.contiguous()
    assert "decoder.mid_block.attentions.0.proj_attn.weight" in sd
    save_file(sd, os.path.join(tmp_path, "diffusion_pytorch_model.safetensors"))
    with open(os.path.join(d, "config.json")) as f:
        (tmp_path / "config.json").write_text(f.read())
    ref_vae = diffusers.AutoencoderKL.from_pretrained(str(tmp_path)).eval()
    params, cfg = load_diffusers_vae(str(tmp_path))
    z = _latents(2, 4)  # the shape of the other SMALL_A tests: no recompilation
    assert _rel_err(decode_latents(params, cfg, z), _reference(ref_vae, z)) <= 1e-5


def test_single_file_with_config_and_bfloat16(small_a, tmp_path):
    from safetensors.torch import save_file

    vae, d = small_a
    params, cfg = load_diffusers_vae(d)
    # decoder-only bf16 file in a folder without config.json: the config must be given
    sd = {k: v.to(torch.bfloat16).contiguous() for k, v in vae.state_dict().items() if not k.startswith("encoder.")}
    path = str(tmp_path / "vae_bf16.safetensors")
    save_file(sd, path)
    with pytest.raises(QditError, match="no config"):
        load_diffusers_vae(path)
    p16, cfg16 = load_diffusers_vae(path, config=os.path.join(d, "config.json"))
    assert cfg16 == cfg
    w, w16 = params["decoder"]["conv_in"]["kernel"], p16["decoder"]["conv_in"]["kernel"]
    assert w16.dtype == np.float32 and 0 < np.max(np.abs(w16 - w)) <= 2**-8 * np.max(np.abs(w))
    # a .bin holding a bare state_dict, config passed as a VAEConfig
    torch.save(vae.state_dict(), tmp_path / "vae.bin")
    pb, _ = load_diffusers_vae(str(tmp_path / "vae.bin"), config=cfg)
    np.testing.assert_array_equal(pb["decoder"]["conv_out"]["kernel"], params["decoder"]["conv_out"]["kernel"])


def test_missing_misshaped_and_unexpected_keys_are_one_line_errors(small_a):
    vae, d = small_a
    _, cfg = load_diffusers_vae(d)
    full = {k: v.numpy() for k, v in vae.state_dict().items()}
    sd = dict(full)
    del sd["decoder.mid_block.attentions.0.to_k.bias"]
    with pytest.raises(QditError) as e:
        convert_vae_state_dict(sd, cfg)
    assert "decoder.mid_block.attentions.0.to_k.bias" in str(e.value) and "\n" not in str(e.value)
    sd = dict(full, **{"decoder.conv_in.weight": np.zeros((64, 4, 1, 1), np.float32)})
    with pytest.raises(QditError, match=r"mis-shaped: decoder\.conv_in\.weight"):
        convert_vae_state_dict(sd, cfg)
    with pytest.raises(QditError, match=r"unexpected 1 key\(s\): decoder\.extra\.weight"):
        convert_vae_state_dict(dict(full, **{"decoder.extra.weight": np.zeros(3)}), cfg)
    # a config that disagrees with the weights (2 resnets expected per up block, 3 expected here)
    with pytest.raises(QditError, match="missing"):
        convert_vae_state_dict(full, cfg.replace(layers_per_block=2))
    # encoder keys alone are never a problem
    dec = {k: v for k, v in full.items() if k.startswith(("decoder.", "post_quant_conv."))}
    assert len(dec) < len(full)
    convert_vae_state_dict(dec, cfg)


def test_npz_round_trip(small_a, tmp_path):
    _, d = small_a
    params, cfg = load_diffusers_vae(d)
    path = str(tmp_path / "vae.npz")
    save_vae(path, params, cfg.replace(dtype="bfloat16"))
    p2, cfg2 = load_vae(path)
    assert cfg2 == cfg.replace(dtype="bfloat16")
    z = _latents(2, 4)
    np.testing.assert_array_equal(decode_latents(p2, cfg, z), decode_latents(params, cfg, z))
    np.savez(tmp_path / "bad.npz", x=np.zeros(1))
    with pytest.raises(QditError, match="no VAE config"):
        load_vae(str(tmp_path / "bad.npz"))


def test_bfloat16_compute_is_close_but_not_float32(small_a):
    vae, d = small_a
    params, cfg = load_diffusers_vae(d, dtype="bfloat16")
    z = _latents(2, 4)
    ref = _reference(vae, z)
    out = decode_latents(params, cfg, z)
    assert out.dtype == np.float32
    assert 1e-4 < _rel_err(out, ref) < 5e-2


def test_config_validation_and_json():
    cfg = VAEConfig(block_out_channels=[32, 64], norm_num_groups=8, layers_per_block=1)
    assert cfg.block_out_channels == (32, 64) and hash(cfg) == hash(VAEConfig.from_json(cfg.to_json()))
    assert VAEConfig.from_dict(json.loads(cfg.to_json())) == cfg
    with pytest.raises(QditError, match="divisible by norm_num_groups"):
        VAEConfig(block_out_channels=(32, 40), norm_num_groups=16)
    with pytest.raises(QditError, match="dtype"):
        VAEConfig(dtype="int8")
    with pytest.raises(QditError, match="unknown VAEConfig field"):
        VAEConfig.from_dict({"blocks": 3})
    with pytest.raises(QditError, match="scaling_factor"):
        VAEConfig(scaling_factor=0.0)


def test_bad_latents_and_paths(small_a, tmp_path):
    _, d = small_a
    params, cfg = load_diffusers_vae(d)
    with pytest.raises(QditError, match="NHWC with 4 channels"):
        decode_latents(params, cfg, np.zeros((1, 4, 8, 8), np.float32))
    with pytest.raises(QditError, match="does not exist"):
        load_diffusers_vae(str(tmp_path / "nope"))
    with pytest.raises(QditError, match="no diffusion_pytorch_model"):
        load_diffusers_vae(str(tmp_path))
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(QditError, match="cannot read safetensors"):
        load_diffusers_vae(str(tmp_path / "broken.safetensors"), config=VAEConfig(**SMALL_A))
    bad = tmp_path / "cfg.json"
    bad.write_text(json.dumps({"_class_name": "AutoencoderKL", "block_out_channels": [32, 64],
                               "up_block_types": ["UpDecoderBlock2D", "AttnUpDecoderBlock2D"]}))
    with pytest.raises(QditError, match="up_block_types"):
        load_diffusers_vae(os.path.join(d, "diffusion_pytorch_model.safetensors"), config=str(bad))


def test_decode_to_uint8_matches_dit_rule():
    x = np.concatenate([np.linspace(-1.2, 1.2, 997), [-1.0, 1.0, 0.0, 1 / 255, -1 / 255]]).astype(np.float32)
    ref = torch.clamp(127.5 * torch.from_numpy(x) + 128.0, 0, 255).to(torch.uint8).numpy()
    out = np.asarray(decode_to_uint8(x))
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, ref)
