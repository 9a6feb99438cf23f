"""The decoder half of diffusers' ``AutoencoderKL`` (sd-vae-ft-ema / -mse) in Flax Linen, NHWC.

DiT works on VAE latents; this module turns them back into images:
``images = decoder(post_quant_conv(latents / scaling_factor + shift_factor))`` in roughly [-1, 1].

Module paths mirror the diffusers state_dict (``decoder/up_blocks_0/resnets_1/conv1``,
``decoder/mid_block/attentions_0/to_q``, ...) so that ``qdit_jax.convert.vae`` maps keys by a
plain rename. GroupNorm statistics and the attention softmax are computed in float32 whatever the
compute dtype, as diffusers does (``upcast_softmax``), so a bfloat16 decoder stays well behaved.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from qdit_jax.errors import QditError
from qdit_jax.models.config_io import ConfigIO

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
_EPS = 1e-6  # GroupNorm epsilon of every norm in the diffusers VAE


@dataclasses.dataclass(frozen=True)
class VAEConfig(ConfigIO):
    """Architecture of the VAE decoder; the defaults are sd-vae-ft-ema / sd-vae-ft-mse.

    ``dtype`` is the compute dtype (parameters stay float32). Images are
    ``2 ** (len(block_out_channels) - 1)`` times larger than latents (8x for the default).
    """

    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    out_channels: int = 3
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float = 0.0
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    dtype: str = "float32"

    def __post_init__(self) -> None:
        try:
            channels = tuple(int(c) for c in self.block_out_channels)
        except (TypeError, ValueError):
            raise QditError(f"invalid VAEConfig: block_out_channels must be a sequence of ints, "
                            f"got {self.block_out_channels!r}") from None
        object.__setattr__(self, "block_out_channels", channels)  # lists from JSON -> hashable tuple
        problems = []
        if not channels or any(c <= 0 for c in channels):
            problems.append(f"block_out_channels must be non-empty and positive, got {channels}")
        for name in ("layers_per_block", "latent_channels", "out_channels", "norm_num_groups"):
            if int(getattr(self, name)) <= 0:
                problems.append(f"{name} must be positive, got {getattr(self, name)}")
        if self.norm_num_groups > 0 and any(c % self.norm_num_groups for c in channels):
            problems.append(f"every block_out_channels {channels} must be divisible by norm_num_groups "
                            f"{self.norm_num_groups}")
        if not (isinstance(self.scaling_factor, (int, float)) and math.isfinite(self.scaling_factor)
                and self.scaling_factor > 0):
            problems.append(f"scaling_factor must be a positive finite number, got {self.scaling_factor!r}")
        if not (isinstance(self.shift_factor, (int, float)) and math.isfinite(self.shift_factor)):
            problems.append(f"shift_factor must be a finite number, got {self.shift_factor!r}")
        if self.dtype not in _DTYPES:
            problems.append(f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if problems:
            raise QditError("invalid VAEConfig: " + "; ".join(problems))

    @property
    def upsample_factor(self) -> int:
        """Image side / latent side."""
        return 2 ** (len(self.block_out_channels) - 1)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["block_out_channels"] = list(self.block_out_channels)
        return d


# ----------------------------------------------------------------------------- layers


class GroupNorm(nn.Module):
    """GroupNorm over (H, W, channels-in-group) of NHWC input, statistics in float32."""

    num_groups: int
    epsilon: float = _EPS

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        g = x.astype(jnp.float32).reshape(*x.shape[:-1], self.num_groups, c // self.num_groups)
        axes = tuple(range(1, g.ndim - 2)) + (g.ndim - 1,)
        mean = jnp.mean(g, axis=axes, keepdims=True)
        var = jnp.mean(jnp.square(g - mean), axis=axes, keepdims=True)
        y = ((g - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(x.shape)
        return (y * scale + bias).astype(x.dtype)


def _conv(features: int, kernel: int, dtype: Any, name: str) -> nn.Conv:
    pad = kernel // 2
    return nn.Conv(features, (kernel, kernel), padding=((pad, pad), (pad, pad)), dtype=dtype,
                   param_dtype=jnp.float32, name=name)


class ResnetBlock(nn.Module):
    """diffusers ResnetBlock2D without time embedding: pre-norm, SiLU, two 3x3 convs, residual."""

    out_channels: int
    groups: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = _conv(self.out_channels, 3, self.dtype, "conv1")(nn.silu(GroupNorm(self.groups, name="norm1")(x)))
        h = _conv(self.out_channels, 3, self.dtype, "conv2")(nn.silu(GroupNorm(self.groups, name="norm2")(h)))
        if x.shape[-1] != self.out_channels:
            x = _conv(self.out_channels, 1, self.dtype, "conv_shortcut")(x)
        return x + h


class AttentionBlock(nn.Module):
    """Single-head spatial self-attention with a GroupNorm in front and a residual around it."""

    groups: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        n, hgt, wid, c = x.shape
        h = GroupNorm(self.groups, name="group_norm")(x).reshape(n, hgt * wid, c)
        dense = functools.partial(nn.Dense, c, dtype=self.dtype, param_dtype=jnp.float32)
        q, k, v = dense(name="to_q")(h), dense(name="to_k")(h), dense(name="to_v")(h)
        logits = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32) / math.sqrt(c)
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = dense(name="to_out_0")(jnp.einsum("bqk,bkc->bqc", probs, v))
        return x + out.reshape(x.shape)


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 conv."""

    channels: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return _conv(self.channels, 3, self.dtype, "conv")(x)


class MidBlock(nn.Module):
    channels: int
    groups: int
    add_attention: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = ResnetBlock(self.channels, self.groups, self.dtype, name="resnets_0")(x)
        if self.add_attention:
            x = AttentionBlock(self.groups, self.dtype, name="attentions_0")(x)
        return ResnetBlock(self.channels, self.groups, self.dtype, name="resnets_1")(x)


class UpBlock(nn.Module):
    """diffusers UpDecoderBlock2D: ``num_layers`` resnets, then an optional upsampler."""

    out_channels: int
    num_layers: int
    groups: int
    add_upsample: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for j in range(self.num_layers):
            x = ResnetBlock(self.out_channels, self.groups, self.dtype, name=f"resnets_{j}")(x)
        if self.add_upsample:
            x = Upsample(self.out_channels, self.dtype, name="upsamplers_0")(x)
        return x


class Decoder(nn.Module):
    config: VAEConfig

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        cfg, dt = self.config, _DTYPES[self.config.dtype]
        rev = cfg.block_out_channels[::-1]
        x = _conv(rev[0], 3, dt, "conv_in")(z)
        x = MidBlock(rev[0], cfg.norm_num_groups, cfg.mid_block_add_attention, dt, name="mid_block")(x)
        for i, ch in enumerate(rev):
            x = UpBlock(ch, cfg.layers_per_block + 1, cfg.norm_num_groups, i < len(rev) - 1, dt,
                        name=f"up_blocks_{i}")(x)
        x = nn.silu(GroupNorm(cfg.norm_num_groups, name="conv_norm_out")(x))
        return _conv(cfg.out_channels, 3, dt, "conv_out")(x)


class VAEDecoder(nn.Module):
    """(N, h, w, latent_channels) unscaled latents -> (N, f*h, f*w, out_channels) images, float32.

    Images are in about [-1, 1] and not clipped; see ``decode_to_uint8``. The input is the VAE's own
    latent (already divided by ``scaling_factor``); ``decode_latents`` does that division.
    """

    config: VAEConfig

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        dt = _DTYPES[self.config.dtype]
        z = z.astype(dt)
        if self.config.use_post_quant_conv:
            z = _conv(self.config.latent_channels, 1, dt, "post_quant_conv")(z)
        return Decoder(self.config, name="decoder")(z).astype(jnp.float32)


# ----------------------------------------------------------------------------- functions


def _check_latents(cfg: VAEConfig, latents: Any) -> None:
    shape = tuple(getattr(latents, "shape", ()))
    if len(shape) != 4 or shape[-1] != cfg.latent_channels:
        raise QditError(f"VAE latents must be NHWC with {cfg.latent_channels} channels, got shape {shape}; "
                        f"transpose NCHW latents with .transpose(0, 2, 3, 1)")


def init_vae_params(cfg: VAEConfig, key: jax.Array) -> Any:
    """Random parameters for ``cfg`` (callers that load a checkpoint only need their shapes)."""
    z = jnp.zeros((1, 1, 1, cfg.latent_channels), jnp.float32)
    return VAEDecoder(cfg).init(key, z)["params"]


def vae_param_shapes(cfg: VAEConfig) -> Any:
    """Parameter ShapeDtypeStructs of ``cfg`` without allocating them."""
    return jax.eval_shape(lambda k: init_vae_params(cfg, k), jax.random.PRNGKey(0))


@functools.partial(jax.jit, static_argnums=1)
def _decode(params: Any, cfg: VAEConfig, latents: jax.Array) -> jax.Array:
    z = latents.astype(jnp.float32) / cfg.scaling_factor + cfg.shift_factor
    return VAEDecoder(cfg).apply({"params": params}, z)


def decode_latents(params: Any, cfg: VAEConfig, latents: jax.Array) -> jax.Array:
    """Diffusion-model latents (N, h, w, C), i.e. scaled by ``scaling_factor``, -> images in ~[-1, 1].

    Jitted per config; float32 output of shape (N, f*h, f*w, out_channels).
    """
    _check_latents(cfg, latents)
    return _decode(params, cfg, jnp.asarray(latents))


def decode_to_uint8(images: jax.Array) -> jax.Array:
    """[-1, 1] float images -> uint8 [0, 255] with the official DiT rule ``clamp(127.5 x + 128)``, truncated."""
    x = jnp.asarray(images, jnp.float32)
    return jnp.floor(jnp.clip(127.5 * x + 128.0, 0.0, 255.0)).astype(jnp.uint8)
