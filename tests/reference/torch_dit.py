"""A small PyTorch DiT with the semantics of the official facebookresearch/DiT ``models.py``.

Used only as the independent reference for the official checkpoint format: its module names
give exactly the official state_dict keys (``blocks.3.attn.qkv.weight``, ...), so an official
state_dict loads into it with ``load_state_dict(strict=True)``. Inputs and outputs are NCHW.
Written from the paper's/official code's semantics, without timm.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


def sincos_pos_embed(dim: int, grid: int) -> np.ndarray:
    """MAE/DiT 2-D sin-cos table (grid*grid, dim): first half encodes the column, second the row."""
    col, row = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64))

    def axis(d: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        ang = pos.reshape(-1)[:, None] * omega[None]
        return np.concatenate([np.sin(ang), np.cos(ang)], axis=1)

    return np.concatenate([axis(dim // 2, col), axis(dim // 2, row)], axis=1)


def timestep_features(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """GLIDE features: cos then sin of t * exp(-ln(max_period) * i / half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    ang = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(ang), torch.sin(ang)], dim=-1)


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class _PatchEmbed(nn.Module):
    def __init__(self, patch: int, cin: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(cin, dim, patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class _TimestepEmbedder(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(256, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_features(t))


class _LabelEmbedder(nn.Module):
    def __init__(self, rows: int, dim: int) -> None:
        super().__init__()
        self.embedding_table = nn.Embedding(rows, dim)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(y)


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        w = torch.softmax((q @ k.transpose(-1, -2)) / math.sqrt(c // self.heads), dim=-1)
        return self.proj((w @ v).transpose(1, 2).reshape(b, n, c))


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_hidden: int) -> None:
        super().__init__()
        self.attn = _Attention(dim, heads)
        self.mlp = _Mlp(dim, mlp_hidden)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        sa, ca, ga, sm, cm, gm = self.adaLN_modulation(c).chunk(6, dim=1)
        d = x.shape[-1]
        x = x + ga[:, None] * self.attn(_modulate(F.layer_norm(x, (d,), eps=1e-6), sa, ca))
        return x + gm[:, None] * self.mlp(_modulate(F.layer_norm(x, (d,), eps=1e-6), sm, cm))


class _FinalLayer(nn.Module):
    def __init__(self, dim: int, out: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, out)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(_modulate(F.layer_norm(x, (x.shape[-1],), eps=1e-6), shift, scale))


class TorchDiT(nn.Module):
    """Official DiT forward (eval mode: no label dropout). ``forward(x NCHW, t, y) -> NCHW``."""

    def __init__(self, input_size: int, patch_size: int, in_channels: int, hidden_size: int, depth: int,
                 num_heads: int, mlp_ratio: float = 4.0, num_classes: int = 1000, class_dropout_prob: float = 0.1,
                 learn_sigma: bool = True) -> None:
        super().__init__()
        self.patch, self.out_channels = patch_size, in_channels * (2 if learn_sigma else 1)
        grid = input_size // patch_size
        self.x_embedder = _PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = _TimestepEmbedder(hidden_size)
        self.y_embedder = _LabelEmbedder(num_classes + int(class_dropout_prob > 0), hidden_size)
        pe = torch.from_numpy(sincos_pos_embed(hidden_size, grid)).float()[None]
        self.pos_embed = nn.Parameter(pe, requires_grad=False)
        self.blocks = nn.ModuleList(_Block(hidden_size, num_heads, int(hidden_size * mlp_ratio)) for _ in range(depth))
        self.final_layer = _FinalLayer(hidden_size, patch_size * patch_size * self.out_channels)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y)
        for block in self.blocks:
            h = block(h, c)
        h = self.final_layer(h, c)
        n, tokens, _ = h.shape
        g, p, co = int(round(tokens**0.5)), self.patch, self.out_channels
        h = h.reshape(n, g, g, p, p, co).permute(0, 5, 1, 3, 2, 4)  # n c h p w q
        return h.reshape(n, co, g * p, g * p)


def random_official_state_dict(model: TorchDiT, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every weight random (DiT zero-inits adaLN and the final layer); pos_embed stays the frozen table.

    Scales keep activations O(1) so that every parameter visibly affects the output.
    """
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for name, p in model.state_dict().items():
        if name == "pos_embed":
            sd[name] = p.clone()
        elif p.ndim == 1:
            sd[name] = 0.1 * torch.randn(p.shape, generator=gen)
        elif "embedding_table" in name:
            sd[name] = torch.randn(p.shape, generator=gen)
        else:
            fan_in = int(np.prod(p.shape[1:]))
            gain = 0.5 if "adaLN" in name else 1.0
            sd[name] = gain * torch.randn(p.shape, generator=gen) / math.sqrt(fan_in)
    return sd
