"""Building blocks shared by the autoencoder and the U-Net."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with the largest group count <= 32 that divides `channels`."""
    groups = math.gcd(32, channels)
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv ×2 with a residual, and optionally a time/class embedding in between.

    ``scale_shift=False`` adds the embedding to the features before the second GroupNorm (Ho et al. 2020).
    Where a group holds a single channel (widths up to 32), that norm subtracts the added constant again and
    the block never sees the embedding. ``scale_shift=True`` is adaptive GroupNorm (Dhariwal & Nichol 2021,
    §3): the embedding gives a per-channel scale and shift applied after the norm, so it always survives.
    """

    def __init__(self, cin: int, cout: int, emb_dim: int = 0, dropout: float = 0.0, scale_shift: bool = False):
        super().__init__()
        self.norm1, self.conv1 = group_norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.scale_shift = bool(emb_dim) and scale_shift
        self.emb = nn.Linear(emb_dim, 2 * cout if self.scale_shift else cout) if emb_dim else None
        self.norm2, self.conv2 = group_norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity: stable deep nets
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if self.emb is None:
            h = self.norm2(h)
        elif self.scale_shift:
            scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)  # each (B, C, 1, 1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + self.emb(F.silu(emb))[:, :, None, None])
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class Attention(nn.Module):
    """Multi-head self-attention over the H·W positions, via torch SDPA."""

    def __init__(self, channels: int, head_dim: int = 32):
        super().__init__()
        # About channels / head_dim heads, rounded down to a divisor of `channels` so that heads split evenly.
        self.heads = next(h for h in range(max(1, channels // head_dim), 0, -1) if channels % h == 0)
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x)).reshape(B, 3, self.heads, C // self.heads, H * W)
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # each (B, heads, HW, d)
        h = F.scaled_dot_product_attention(q, k, v)
        h = h.transpose(-1, -2).reshape(B, C, H, W)
        return x + self.out(h)


class CrossAttention(nn.Module):
    """Multi-head attention from the H·W positions (queries) to a token context (keys, values), via torch SDPA.

    `mask` (B, L) is True for real tokens: padding tokens get no attention weight, so padding a context
    with more masked tokens changes nothing. Every sample needs at least one real token.
    """

    def __init__(self, channels: int, context_dim: int, head_dim: int = 32):
        super().__init__()
        self.heads = next(h for h in range(max(1, channels // head_dim), 0, -1) if channels % h == 0)
        self.norm = group_norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.kv = nn.Linear(context_dim, 2 * channels)
        self.out = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.out.weight)  # starts as the identity, like the self-attention blocks
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, C, H, W = x.shape
        d = C // self.heads
        q = self.q(self.norm(x)).reshape(B, self.heads, d, H * W).transpose(-1, -2)  # (B, heads, HW, d)
        kv = self.kv(context).reshape(B, context.shape[1], 2, self.heads, d)  # (B, L, 2, heads, d)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, L, d)
        attn_mask = None if mask is None else mask.bool()[:, None, None, :]  # (B, 1, 1, L): True = attend
        h = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=attn_mask)
        h = h.transpose(-1, -2).reshape(B, C, H, W)
        return x + self.out(h)


class Downsample(nn.Module):
    """Stride-2 conv; odd sizes round up (7 -> 4), Upsample restores the exact skip size."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, size=None):
        x = F.interpolate(x, size=size, scale_factor=None if size else 2.0, mode="nearest")
        return self.conv(x)


def time_mlp(dim: int, emb_dim: int) -> nn.Sequential:
    """Linear-SiLU-Linear from a `dim`-wide sinusoidal timestep embedding to `emb_dim` (U-Net, classifier)."""
    return nn.Sequential(nn.Linear(dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps (Vaswani et al. 2017, §3.5): (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))
