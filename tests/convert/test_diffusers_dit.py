"""diffusers DiTTransformer2DModel -> Flax: forward parity with diffusers itself, with every weight random."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from qdit_jax.convert.diffusers_dit import (  # noqa: E402
    config_from_diffusers, convert_diffusers_dit, diffusers_to_official,
)
from qdit_jax.convert.torch_dit import state_dict_to_params  # noqa: E402
from qdit_jax.errors import QditError  # noqa: E402
from qdit_jax.models.dit import DiTConfig, param_shapes  # noqa: E402
from tests.convert.test_torch_dit import flax_forward, rel_err, shape_dict  # noqa: E402

EMB = ".norm1.emb."


def random_diffusers_dit(seed: int = 0, **kw) -> "diffusers.DiTTransformer2DModel":
    """A DiTTransformer2DModel with every weight random (adaLN and output layers included).

    The per-block copies of the timestep/class embedder get block 0's values, as in every
    diffusers DiT converted from the official model (which has one shared embedder).
    """
    model = diffusers.DiTTransformer2DModel(**kw).eval()
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for name, p in model.state_dict().items():
        if EMB in name and not name.startswith("transformer_blocks.0."):
            continue
        if p.ndim == 1:
            sd[name] = 0.1 * torch.randn(p.shape, generator=gen)
        elif "embedding_table" in name:
            sd[name] = torch.randn(p.shape, generator=gen)
        else:
            gain = 0.5 if "norm1.linear" in name or "proj_out_1" in name else 1.0
            sd[name] = gain * torch.randn(p.shape, generator=gen) / np.sqrt(np.prod(p.shape[1:]))
    for name in model.state_dict():
        if EMB in name and name not in sd:
            sd[name] = sd["transformer_blocks.0." + name.split(".", 2)[2]].clone()
    model.load_state_dict(sd, strict=True)
    return model


def diffusers_forward(model, x: np.ndarray, t: np.ndarray, y: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x), timestep=torch.from_numpy(t), class_labels=torch.from_numpy(y)).sample.numpy()


def _inputs(cfg: DiTConfig, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((3, cfg.in_channels, cfg.input_size, cfg.input_size)).astype(np.float32)
    return x, np.array([0, 421, 999]), np.array([0, cfg.num_classes - 1, cfg.num_classes])  # last: the null label


CONFIGS = {
    "small": dict(num_attention_heads=4, attention_head_dim=16, in_channels=3, out_channels=6, num_layers=2,
                  sample_size=8, patch_size=2, num_embeds_ada_norm=7),
    "xl_width": dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=2,
                     sample_size=8, patch_size=2, num_embeds_ada_norm=1000),
    "no_sigma_p4_eps": dict(num_attention_heads=2, attention_head_dim=32, in_channels=2, out_channels=None, num_layers=3,
                            sample_size=16, patch_size=4, num_embeds_ada_norm=5, norm_eps=1e-3),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_random_diffusers_dit_forward_parity(name: str, tmp_path: Path) -> None:
    model = random_diffusers_dit(seed=len(name), **CONFIGS[name])
    model.save_pretrained(tmp_path / "transformer")
    params, cfg = convert_diffusers_dit(tmp_path / "transformer")
    kw = CONFIGS[name]
    assert cfg.hidden_size == kw["num_attention_heads"] * kw["attention_head_dim"]
    assert cfg.num_heads == kw["num_attention_heads"] and cfg.depth == kw["num_layers"]
    assert cfg.learn_sigma == (kw["out_channels"] is not None) and cfg.freq_shift == 1.0
    assert cfg.mlp_norm_eps == kw.get("norm_eps", 1e-5)
    assert shape_dict(params) == shape_dict(param_shapes(cfg))
    x, t, y = _inputs(cfg)
    ref = diffusers_forward(model, x, t, y)
    assert rel_err(flax_forward(params, cfg, x, t, y), ref) <= 1e-5
    if name == "small":  # the diffusers timestep frequencies matter: the official ones are far off
        assert rel_err(flax_forward(params, cfg.replace(freq_shift=0.0), x, t, y), ref) > 1e-2


def test_bin_weights_and_pipeline_layout(tmp_path: Path) -> None:
    model = random_diffusers_dit(seed=3, **CONFIGS["small"])
    model.save_pretrained(tmp_path / "pipe" / "transformer", safe_serialization=False)
    (tmp_path / "pipe" / "model_index.json").write_text(json.dumps({"_class_name": "DiTPipeline"}))
    assert (tmp_path / "pipe" / "transformer" / "diffusion_pytorch_model.bin").is_file()
    params, cfg = convert_diffusers_dit(tmp_path / "pipe")
    x, t, y = _inputs(cfg)
    assert rel_err(flax_forward(params, cfg, x, t, y), diffusers_forward(model, x, t, y)) <= 1e-5
    # a weights file with its config given separately
    weights = tmp_path / "pipe" / "transformer" / "diffusion_pytorch_model.bin"
    conf = json.loads((tmp_path / "pipe" / "transformer" / "config.json").read_text())
    params2, cfg2 = convert_diffusers_dit(weights, config=conf)
    assert cfg2 == cfg
    np.testing.assert_array_equal(params2["blocks_1"]["attn"]["qkv"]["kernel"], params["blocks_1"]["attn"]["qkv"]["kernel"])


def test_qkv_fused_in_q_k_v_order() -> None:
    model = random_diffusers_dit(seed=5, **CONFIGS["small"])
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    cfg = config_from_diffusers(dict(model.config))
    off = diffusers_to_official(sd, cfg)
    w = off["blocks.1.attn.qkv.weight"]
    for j, n in enumerate("qkv"):
        np.testing.assert_array_equal(w[j * 64:(j + 1) * 64], sd[f"transformer_blocks.1.attn1.to_{n}.weight"])


def test_differing_per_block_embedders_are_refused() -> None:
    model = random_diffusers_dit(seed=1, **CONFIGS["small"])
    sd = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    sd["transformer_blocks.1.norm1.emb.timestep_embedder.linear_2.bias"] += 1.0
    cfg = config_from_diffusers(dict(model.config))
    with pytest.raises(QditError, match="transformer_blocks.1.norm1.emb.timestep_embedder.linear_2.bias"):
        diffusers_to_official(sd, cfg)


def test_unknown_and_missing_keys_are_listed() -> None:
    model = random_diffusers_dit(seed=2, **CONFIGS["small"])
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    sd["transformer_blocks.0.ff.net.0.proj.weightx"] = sd.pop("transformer_blocks.0.ff.net.0.proj.weight")
    cfg = config_from_diffusers(dict(model.config))
    with pytest.raises(QditError) as e:
        state_dict_to_params(diffusers_to_official(sd, cfg), cfg)
    msg = str(e.value)
    assert "\n" not in msg and "blocks.0.mlp.fc1.weight" in msg and "transformer_blocks.0.ff.net.0.proj.weightx" in msg


def test_non_dit_configs_are_refused(tmp_path: Path) -> None:
    base = {"_class_name": "DiTTransformer2DModel", **CONFIGS["small"]}
    with pytest.raises(QditError, match="norm_type"):
        config_from_diffusers({**base, "norm_type": "ada_norm_single"})
    with pytest.raises(QditError, match="activation_fn"):
        config_from_diffusers({**base, "activation_fn": "geglu"})
    with pytest.raises(QditError, match="not a DiT"):
        config_from_diffusers({**base, "_class_name": "UNet2DModel"})
    with pytest.raises(QditError, match="out_channels"):
        config_from_diffusers({**base, "out_channels": 5})
    # the legacy class name of the hub's DiT checkpoints maps to the same config
    legacy = {"_class_name": "Transformer2DModel", "activation_fn": "gelu-approximate", "attention_bias": True,
              "norm_elementwise_affine": False, "norm_type": "ada_norm_zero", **CONFIGS["small"]}
    assert config_from_diffusers(legacy) == config_from_diffusers(base)
    with pytest.raises(QditError, match="no config.json"):
        convert_diffusers_dit(tmp_path)


def test_truncated_safetensors_is_one_line_error(tmp_path: Path) -> None:
    model = random_diffusers_dit(seed=4, **CONFIGS["small"])
    model.save_pretrained(tmp_path / "m")
    f = tmp_path / "m" / "diffusion_pytorch_model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(QditError) as e:
        convert_diffusers_dit(tmp_path / "m")
    assert "\n" not in str(e.value) and "truncated" in str(e.value)
