"""Diffusion Transformer (DiT) in Flax Linen, with the semantics of the official PyTorch model.

The model is pure: ``DiT(cfg).apply({'params': p}, x, t, y)`` with ``x`` in NHWC. It carries no
quantization code; the quantizer wraps it from outside (``qdit_jax.quant.interceptor``).

Module paths mirror the PyTorch state_dict so that quantization rules read naturally:
``blocks_3/attn/qkv``, ``blocks_3/attn/proj``, ``blocks_3/mlp/fc1``, ``blocks_3/mlp/fc2``,
``blocks_3/adaLN_modulation``, ``final_layer/linear``. The attention core is a module of its own
(``blocks_3/attn/core``) so that its q, k, v inputs can be intercepted too.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from qdit_jax.errors import QditError
from qdit_jax.models.config_io import ConfigIO

# Official variants: name -> (depth, hidden_size, num_heads).
_SIZES: dict[str, tuple[int, int, int]] = {
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "triton", "mosaic")
QKV_GEMMS = ("fused", "split")


@dataclasses.dataclass(frozen=True)
class DiTConfig(ConfigIO):
    """Architecture of a DiT. ``dtype`` is the compute dtype; parameters stay ``param_dtype``."""

    input_size: int = 32
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1
    num_classes: int = 1000
    learn_sigma: bool = True
    dtype: str = "float32"
    param_dtype: str = "float32"
    # diffusers' DiT port differs from the official model in two constants; a diffusers conversion
    # sets them (1 and its norm_eps, 1e-5) so outputs match diffusers exactly. Official: 0 and 1e-6.
    freq_shift: float = 0.0  # timestep frequencies exp(-ln(10000) * i / (half - freq_shift)), half = 128
    mlp_norm_eps: float = 1e-6  # eps of the LayerNorm before each block's MLP
    # attention kernel: "auto" (on a Hopper GPU models.attention_mosaic's kernel for bf16/fp16 heads
    # of 64 or 72 up to 256 tokens, else cuDNN's fused flash attention where the head size allows it, else
    # models.attention_kernel's Triton kernel where it applies, else XLA's), "xla", "cudnn",
    # "triton" or "mosaic". An implementation choice, not architecture.
    attention: str = "auto"
    # how the fused qkv projection runs: "split" (three GEMMs of width C on column slices of the
    # same weight, each writing its output directly; 1.05x the bf16 XL/2 forward on an H100,
    # docs/RESULTS.md) or "fused" (one GEMM of width 3C, then q / k / v are sliced out, a copy
    # each, since cuDNN wants them dense). Same parameters and function.
    qkv_gemms: str = "split"

    def __post_init__(self) -> None:
        problems = []
        for name in ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads", "num_classes"):
            if int(getattr(self, name)) <= 0:
                problems.append(f"{name} must be positive, got {getattr(self, name)}")
        if self.input_size % max(self.patch_size, 1):
            problems.append(f"input_size {self.input_size} is not a multiple of patch_size {self.patch_size}")
        if self.hidden_size % max(self.num_heads, 1):
            problems.append(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if (self.hidden_size // 2) % 2 and self.hidden_size > 0:
            problems.append(f"hidden_size {self.hidden_size} must be a multiple of 4 (2-D sin-cos position embedding)")
        if not 0.0 <= self.freq_shift < 128:
            problems.append(f"freq_shift must be in [0, 128), got {self.freq_shift}")
        if not self.mlp_norm_eps > 0:
            problems.append(f"mlp_norm_eps must be positive, got {self.mlp_norm_eps}")
        if not 0.0 <= self.class_dropout_prob < 1.0:
            problems.append(f"class_dropout_prob must be in [0, 1), got {self.class_dropout_prob}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in _DTYPES:
                problems.append(f"{name} must be one of {sorted(_DTYPES)}, got {getattr(self, name)!r}")
        if self.attention not in ATTENTION_IMPLS:
            problems.append(f"attention must be one of {ATTENTION_IMPLS}, got {self.attention!r}")
        if self.qkv_gemms not in QKV_GEMMS:
            problems.append(f"qkv_gemms must be one of {QKV_GEMMS}, got {self.qkv_gemms!r}")
        if problems:
            raise QditError("invalid DiTConfig: " + "; ".join(problems))

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def num_patches(self) -> int:
        return (self.input_size // self.patch_size) ** 2

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def null_label(self) -> int:
        """Index of the extra 'no class' row used by classifier-free guidance."""
        return self.num_classes


def dit_config(name: str, *, image_size: int = 256, **overrides: Any) -> DiTConfig:
    """Config of an official variant such as ``"XL/2"`` for 256x256 or 512x512 images.

    The official models work on VAE latents (image_size / 8, 4 channels, 1000 classes).
    """
    m = re.fullmatch(r"(?:DiT-)?(S|B|L|XL)[/-]([248])", name.strip())
    if not m:
        raise QditError(f"unknown DiT variant {name!r}; expected one of S, B, L, XL with patch 2, 4 or 8, e.g. 'XL/2'")
    if image_size not in (256, 512):
        raise QditError(f"official DiT image sizes are 256 and 512, got {image_size}")
    depth, hidden, heads = _SIZES[m.group(1)]
    cfg = DiTConfig(
        input_size=image_size // 8, patch_size=int(m.group(2)), in_channels=4, hidden_size=hidden,
        depth=depth, num_heads=heads, num_classes=1000, learn_sigma=True,
    )
    return cfg.replace(**overrides) if overrides else cfg


VARIANTS: tuple[str, ...] = tuple(f"{s}/{p}" for s in _SIZES for p in (2, 4, 8))


# ----------------------------------------------------------------------------- embeddings


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
    """Frozen 2-D sin-cos position embedding (grid_size**2, embed_dim), as in MAE / DiT, in float64."""
    gh = np.arange(grid_size, dtype=np.float64)
    gw = np.arange(grid_size, dtype=np.float64)
    w_grid, h_grid = np.meshgrid(gw, gh)  # first output varies along width, as the official code

    def one_axis(dim: int, pos: np.ndarray) -> np.ndarray:
        omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
        omega = 1.0 / 10000**omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    # The official code embeds grid[0] (the width coordinate) first, then grid[1].
    emb_w = one_axis(embed_dim // 2, w_grid)
    emb_h = one_axis(embed_dim // 2, h_grid)
    return np.concatenate([emb_w, emb_h], axis=1)


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0, freq_shift: float = 0.0) -> jax.Array:
    """Sinusoidal timestep features, cos then sin (GLIDE / DiT order), in float32.

    ``freq_shift`` 1 gives diffusers' ``Timesteps(downscale_freq_shift=1)`` frequencies."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift))
    args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
    return emb


def layer_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """LayerNorm, eps 1e-6 by default, no affine, computed in float32 whatever the compute dtype."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """adaLN's modulation of (B, N, C) tokens by per-sample (B, C) shift and scale."""
    return x * (1 + scale[:, None, :]) + shift[:, None, :]


# ----------------------------------------------------------------------------- modules


class ModulatedNorm(nn.Module):
    """``modulate(layer_norm(x), shift, scale)``: the LayerNorm without affine parameters that
    precedes every adaLN-modulated layer (DiT's ``norm1`` / ``norm2`` / ``norm_final``). It owns no
    parameters; it is a module so that interceptors can see it (the real low-bit mode fuses it into
    the next layer's activation quantization)."""

    eps: float = 1e-6

    @nn.compact
    def __call__(self, x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
        return modulate(layer_norm(x, self.eps), shift, scale)


class GatedResidual(nn.Module):
    """``x + gate[:, None] * y``: adaLN-Zero's gated residual update after each branch (DiT's
    attention and MLP). It owns no parameters; it is a module so that interceptors can see it (the
    real low-bit mode computes it in the epilogue of the branch's last GEMM)."""

    @nn.compact
    def __call__(self, x: jax.Array, gate: jax.Array, y: jax.Array) -> jax.Array:
        return x + gate[:, None] * y


class TimestepEmbedder(nn.Module):
    hidden_size: int
    frequency_embedding_size: int = 256
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    freq_shift: float = 0.0

    @nn.compact
    def __call__(self, t: jax.Array) -> jax.Array:
        h = timestep_embedding(t, self.frequency_embedding_size, freq_shift=self.freq_shift).astype(self.dtype)
        h = nn.Dense(self.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype, name="mlp_0")(h)
        h = nn.silu(h)
        return nn.Dense(self.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype, name="mlp_2")(h)


class LabelEmbedder(nn.Module):
    """Class embedding with an extra null row (index ``num_classes``) when class dropout is used."""

    num_classes: int
    hidden_size: int
    dropout_prob: float
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, y: jax.Array, train: bool = False, force_drop_ids: jax.Array | None = None) -> jax.Array:
        rows = self.num_classes + int(self.dropout_prob > 0)
        table = self.param("embedding_table", nn.initializers.normal(0.02), (rows, self.hidden_size), self.param_dtype)
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            if force_drop_ids is None:
                drop = jax.random.uniform(self.make_rng("label_dropout"), y.shape) < self.dropout_prob
            else:
                drop = force_drop_ids == 1
            y = jnp.where(drop, self.num_classes, y)
        return jnp.take(table, y, axis=0)


def _cudnn_fits(q: jax.Array) -> bool:
    """cuDNN's fused attention: GPU, half precision, head size a multiple of 8 up to 128."""
    return (jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
            and q.shape[-1] % 8 == 0 and q.shape[-1] <= 128)


class AttentionCore(nn.Module):
    """softmax(q k^T / sqrt(d)) v on (B, N, H, D) inputs, returned with the heads merged, (B, N, H * D): the
    layout the output projection reads (every kernel writes it so), and the array that projection takes,
    so that interceptors can see both ends (q / k / v in, the projection's input out).

    ``jax.nn.dot_product_attention`` with ``implementation="xla"`` is XLA's (scores materialized,
    float32 softmax); "cudnn" is cuDNN's fused kernel, "triton" ``models.attention_kernel``'s, "mosaic"
    ``models.attention_mosaic``'s (Hopper; heads of 64 or 72: 1.26x cuDNN's speed at XL/2's shape on an
    H100). "auto" asks for the Mosaic kernel where it applies (up to 256 tokens, where it was measured
    faster), then cuDNN where it fits, then the Triton kernel where it applies (when cuDNN refuses at
    trace time: an old cuDNN, an unsupported shape), then XLA's.
    """

    implementation: str = "auto"

    @nn.compact
    def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        return self._heads(q, k, v).reshape(*q.shape[:2], -1)

    def _heads(self, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        impl = self.implementation
        if impl in ("mosaic", "auto") and jax.default_backend() == "gpu":
            from qdit_jax.models import attention_mosaic

            ok, why = attention_mosaic.mosaic_attention_applies(q.shape, q.dtype)
            if ok and attention_mosaic.chosen_by(impl, q.shape[1]):
                return attention_mosaic.attention_mosaic(q, k, v)
            if impl == "mosaic":
                raise QditError(f"the Mosaic attention kernel does not apply: {why}; use attention='auto' or 'cudnn'")
        elif impl == "mosaic":
            raise QditError(f"the Mosaic attention kernel is GPU-only (backend: {jax.default_backend()}); "
                            "use attention='auto' or 'xla'")
        if impl == "cudnn" or (impl == "auto" and _cudnn_fits(q)):
            try:
                return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
            except Exception as e:  # noqa: BLE001 - trace-time refusal only
                if impl == "cudnn":
                    raise QditError(f"cuDNN attention is not available here ({e}); use attention='xla'") from e
        if impl in ("triton", "auto"):
            from qdit_jax.models import attention_kernel

            ok, why = attention_kernel.attention_applies(q.shape, q.dtype)
            if ok:
                return attention_kernel.attention_triton(q, k, v)
            if impl == "triton":
                raise QditError(f"the Triton attention kernel does not apply: {why}; use attention='auto' or 'xla'")
        return jax.nn.dot_product_attention(q, k, v, implementation="xla")


class SplitQKVDense(nn.Dense):
    """``nn.Dense`` of width 3C (the checkpoint's fused q | k | v kernel and bias) computed as three
    GEMMs of width C, one per column block, concatenated. The attention slices q / k / v back out at
    the block boundaries, which XLA folds into the concatenation, so each GEMM's output feeds the
    attention kernel without a copy. Still an ``nn.Dense`` with Dense's params: the quantization
    interceptors treat it as one layer (and replace the whole call)."""

    BLOCKS: ClassVar[int] = 3  # q, k, v: the real-mode interceptor splits its stored weights alike

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        if self.features % self.BLOCKS:
            raise QditError(f"SplitQKVDense needs a width divisible by {self.BLOCKS}, got {self.features}")
        kernel = self.param("kernel", self.kernel_init, (jnp.shape(inputs)[-1], self.features), self.param_dtype)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
        inputs, kernel, bias = self.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
        c = self.features // self.BLOCKS
        parts = []
        for i in range(self.BLOCKS):
            y = jax.lax.dot_general(inputs, kernel[:, i * c:(i + 1) * c], (((inputs.ndim - 1,), (0,)), ((), ())),
                                    precision=self.precision)
            parts.append(y if bias is None else y + bias[i * c:(i + 1) * c])
        return jnp.concatenate(parts, axis=-1)


class Attention(nn.Module):
    hidden_size: int
    num_heads: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention: str = "auto"
    qkv_gemms: str = "split"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, c = x.shape
        hd = c // self.num_heads
        dense = SplitQKVDense if self.qkv_gemms == "split" else nn.Dense
        qkv = dense(3 * c, dtype=self.dtype, param_dtype=self.param_dtype, name="qkv")(x)
        if self.qkv_gemms == "split":  # column blocks of width C: slices of the concatenation, folded away
            q, k, v = (qkv[..., i * c:(i + 1) * c].reshape(b, n, self.num_heads, hd) for i in range(3))
        else:
            qkv = qkv.reshape(b, n, 3, self.num_heads, hd)  # timm's layout: (3, heads, head_dim)
            q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        out = AttentionCore(self.attention, name="core")(q, k, v)
        return nn.Dense(c, dtype=self.dtype, param_dtype=self.param_dtype, name="proj")(out)


class Mlp(nn.Module):
    """fc1 -> tanh GELU -> fc2. The real low-bit mode (quant.real) runs this exact sequence with its
    middle step fused into one kernel; its tests compare that against the layers run one by one."""

    hidden: int
    out: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.Dense(self.hidden, dtype=self.dtype, param_dtype=self.param_dtype, name="fc1")(x)
        x = nn.gelu(x, approximate=True)
        return nn.Dense(self.out, dtype=self.dtype, param_dtype=self.param_dtype, name="fc2")(x)


class DiTBlock(nn.Module):
    """adaLN-Zero transformer block."""

    hidden_size: int
    num_heads: int
    mlp_hidden: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    mlp_norm_eps: float = 1e-6
    attention: str = "auto"
    qkv_gemms: str = "split"

    @nn.compact
    def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
        mod = nn.Dense(6 * self.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
                       name="adaLN_modulation")(nn.silu(c))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, axis=-1)
        attn = Attention(self.hidden_size, self.num_heads, self.dtype, self.param_dtype, self.attention,
                         self.qkv_gemms, name="attn")
        x = GatedResidual(name="res1")(x, gate_msa, attn(ModulatedNorm(name="norm1")(x, shift_msa, scale_msa)))
        mlp = Mlp(self.mlp_hidden, self.hidden_size, self.dtype, self.param_dtype, name="mlp")
        return GatedResidual(name="res2")(x, gate_mlp,
                                          mlp(ModulatedNorm(self.mlp_norm_eps, name="norm2")(x, shift_mlp, scale_mlp)))


class FinalLayer(nn.Module):
    hidden_size: int
    out_features: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
        mod = nn.Dense(2 * self.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
                       name="adaLN_modulation")(nn.silu(c))
        shift, scale = jnp.split(mod, 2, axis=-1)
        x = ModulatedNorm(name="norm_final")(x, shift, scale)
        return nn.Dense(self.out_features, dtype=self.dtype, param_dtype=self.param_dtype, name="linear")(x)


class DiT(nn.Module):
    """Diffusion Transformer. Inputs: x (N, H, W, C), t (N,) timesteps, y (N,) labels; output NHWC."""

    config: DiTConfig

    def setup(self) -> None:
        cfg = self.config
        dt, pdt = _DTYPES[cfg.dtype], _DTYPES[cfg.param_dtype]
        p = cfg.patch_size
        self.x_embedder = nn.Conv(cfg.hidden_size, (p, p), strides=(p, p), padding="VALID",
                                  dtype=dt, param_dtype=pdt, name="x_embedder")
        self.t_embedder = TimestepEmbedder(cfg.hidden_size, dtype=dt, param_dtype=pdt, freq_shift=cfg.freq_shift)
        self.y_embedder = LabelEmbedder(cfg.num_classes, cfg.hidden_size, cfg.class_dropout_prob, param_dtype=pdt)
        self.blocks = [
            DiTBlock(cfg.hidden_size, cfg.num_heads, cfg.mlp_hidden, dt, pdt, mlp_norm_eps=cfg.mlp_norm_eps,
                     attention=cfg.attention, qkv_gemms=cfg.qkv_gemms, name=f"blocks_{i}")
            for i in range(cfg.depth)
        ]
        self.final_layer = FinalLayer(cfg.hidden_size, p * p * cfg.out_channels, dt, pdt)

    def pos_embed(self) -> jax.Array:
        grid = self.config.input_size // self.config.patch_size
        return jnp.asarray(get_2d_sincos_pos_embed(self.config.hidden_size, grid), jnp.float32)

    def unpatchify(self, x: jax.Array) -> jax.Array:
        """(N, T, p*p*C) -> (N, H, W, C), the official patch order (p_row, p_col, channel)."""
        cfg = self.config
        p, c = cfg.patch_size, cfg.out_channels
        h = w = cfg.input_size // p
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = jnp.transpose(x, (0, 1, 3, 2, 4, 5))
        return x.reshape(x.shape[0], h * p, w * p, c)

    def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array, train: bool = False,
                 force_drop_ids: jax.Array | None = None) -> jax.Array:
        cfg = self.config
        dt = _DTYPES[cfg.dtype]
        h = self.x_embedder(x.astype(dt))
        h = h.reshape(h.shape[0], -1, cfg.hidden_size) + self.pos_embed().astype(dt)
        c = self.t_embedder(t) + self.y_embedder(y, train, force_drop_ids).astype(dt)
        for block in self.blocks:
            h = block(h, c)
        h = self.final_layer(h, c)
        return self.unpatchify(h).astype(jnp.float32)

    def forward_with_cfg(self, x: jax.Array, t: jax.Array, y: jax.Array, cfg_scale: float | jax.Array,
                         guidance_channels: int | None = 3) -> jax.Array:
        """The official batch-doubled CFG forward: x's second half is replaced by its first half.

        ``y`` holds the class labels for the first half and the null label for the second.
        ``guidance_channels=3`` is the official default (needed to reproduce released DiT-XL/2
        samples); ``None`` guides all eps channels (the standard rule; needed for 1-channel models).
        """
        half = x[: x.shape[0] // 2]
        out = self(jnp.concatenate([half, half], axis=0), t, y)
        gc = self.config.in_channels if guidance_channels is None else guidance_channels
        eps, rest = out[..., :gc], out[..., gc:]
        cond, uncond = jnp.split(eps, 2, axis=0)
        guided = uncond + cfg_scale * (cond - uncond)
        return jnp.concatenate([jnp.concatenate([guided, guided], axis=0), rest], axis=-1)


def init_params(cfg: DiTConfig, key: jax.Array) -> Any:
    """Random parameters for ``cfg`` (shapes only matter to callers that load a checkpoint)."""
    x = jnp.zeros((1, cfg.input_size, cfg.input_size, cfg.in_channels), jnp.float32)
    return DiT(cfg).init(key, x, jnp.zeros((1,), jnp.int32), jnp.zeros((1,), jnp.int32))["params"]


def params_in_compute_dtype(params: Any, cfg: DiTConfig) -> Any:
    """Floating params cast once to the compute dtype (``cfg.dtype``). Exact: every module casts its
    params to ``dtype`` at each call anyway (Flax's ``promote_dtype``; the label table is cast
    after the lookup); stored cast, the bf16 forward skips re-reading float32 weights and writing
    bf16 copies each call (about 4 GB of memory traffic per DiT-XL/2 forward)."""
    dt = _DTYPES[cfg.dtype]
    if dt == jnp.float32:
        return params
    return jax.tree_util.tree_map(lambda a: a.astype(dt) if jnp.issubdtype(a.dtype, jnp.floating) else a, params)


def param_shapes(cfg: DiTConfig) -> Any:
    """Parameter ShapeDtypeStructs of ``cfg`` without allocating them."""
    return jax.eval_shape(lambda k: init_params(cfg, k), jax.random.PRNGKey(0))


def flops_per_forward(cfg: DiTConfig) -> float:
    """Multiply-add FLOPs (2 per MAC) of one image's forward, the way the DiT paper counts Gflops x2."""
    t, d, f = cfg.num_patches, cfg.hidden_size, cfg.mlp_hidden
    per_block = 2 * t * d * (3 * d + d + 2 * f) + 2 * 2 * t * t * d + 2 * d * 6 * d
    patch = 2 * t * d * cfg.patch_size**2 * cfg.in_channels
    final = 2 * t * d * cfg.patch_size**2 * cfg.out_channels + 2 * d * 2 * d
    return float(cfg.depth * per_block + patch + final)
