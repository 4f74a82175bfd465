"""The denoising U-Net (Ronneberger et al. 2015, as adapted by Ho et al. 2020 and Dhariwal & Nichol 2021).

It maps (x_t, t, labels) to a tensor shaped like x_t and knows nothing about noise schedules or
parameterisations. Class conditioning adds a learned label embedding to the time embedding; the
extra index ``num_classes`` is the "null" label used for classifier-free guidance.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from latentdiff.errors import ConfigError
from latentdiff.nn.layers import Attention, Downsample, ResBlock, Upsample, group_norm, time_mlp, timestep_embedding


@dataclass
class UNetConfig:
    in_channels: int = 4           # latent channels in (and out)
    base_channels: int = 64        # width of the first level
    channel_mults: tuple[int, ...] = (1, 2, 2)  # width multiplier per resolution level
    num_res_blocks: int = 2        # ResBlocks per level on the way down (one more on the way up)
    attention_levels: tuple[int, ...] = (1, 2)  # level indices (0 = full resolution) with self-attention
    head_dim: int = 32             # attention head width
    dropout: float = 0.0
    num_classes: int = 0           # 0: unconditional; else labels 0…K-1 plus the null label K

    def validate(self):
        # Upper bounds refuse absurd sizes (e.g. from an untrusted config.json) before anything is allocated.
        if not (1 <= self.in_channels <= 64 and 8 <= self.base_channels <= 1024 and 1 <= self.num_res_blocks <= 8):
            raise ConfigError("unet: in_channels in 1…64, base_channels in 8…1024 and num_res_blocks in 1…8 are "
                              f"required, got {self.in_channels}, {self.base_channels}, {self.num_res_blocks}")
        if not 1 <= len(self.channel_mults) <= 6 or any(not 1 <= m <= 16 for m in self.channel_mults):
            raise ConfigError("unet.channel_mults must be a list of 1…6 integers in 1…16, "
                              f"got {list(self.channel_mults)}")
        if any(not 0 <= a < len(self.channel_mults) for a in self.attention_levels):
            raise ConfigError(f"unet.attention_levels must index levels 0…{len(self.channel_mults) - 1}")
        if not 1 <= self.head_dim <= 1024:
            raise ConfigError(f"unet.head_dim must be in 1…1024, got {self.head_dim}")
        if not 0 <= self.dropout < 1 or not 0 <= self.num_classes <= 100_000:
            raise ConfigError("unet: dropout must be in [0, 1) and num_classes in 0…100000")


def down_path(ch: int, channel_mults: tuple[int, ...], num_res_blocks: int,
              block: Callable[[int, int, int], nn.ModuleList]) -> tuple[nn.ModuleList, list[int]]:
    """The encoder half shared by the U-Net and the noise-aware classifier: per level `num_res_blocks`
    blocks ``block(c_in, c_out, level)`` (a ResBlock first, optionally attention after it), and a
    stride-2 Downsample between levels. Returns the modules and the channels after each one, the
    input's `ch` first (the U-Net's skip connections)."""
    down, chans, cur = nn.ModuleList(), [ch], ch
    for lvl, mult in enumerate(channel_mults):
        for _ in range(num_res_blocks):
            down.append(block(cur, ch * mult, lvl))
            cur = ch * mult
            chans.append(cur)
        if lvl < len(channel_mults) - 1:
            down.append(Downsample(cur))
            chans.append(cur)
    return down, chans


def run_down(down: nn.ModuleList, h: torch.Tensor, emb: torch.Tensor) -> list[torch.Tensor]:
    """The input and the output of every module of a :func:`down_path`, in order."""
    hs = [h]
    for m in down:
        h = m(h) if isinstance(m, Downsample) else _run_block(m, h, emb)
        hs.append(h)
    return hs


def _run_block(block: nn.ModuleList, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    h = block[0](h, emb)
    return block[1](h) if len(block) > 1 else h


class UNet(nn.Module):
    def __init__(self, cfg: UNetConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        ch = cfg.base_channels
        emb = 4 * ch
        self.time_mlp = time_mlp(ch, emb)
        self.label_emb = nn.Embedding(cfg.num_classes + 1, emb) if cfg.num_classes else None
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)

        self.down, skips = down_path(ch, cfg.channel_mults, cfg.num_res_blocks,
                                     lambda cin, cout, lvl: self._block(cin, cout, emb, lvl))
        cur = skips[-1]

        self.mid = nn.ModuleList([ResBlock(cur, cur, emb, cfg.dropout), Attention(cur, cfg.head_dim),
                                  ResBlock(cur, cur, emb, cfg.dropout)])

        self.up = nn.ModuleList()
        for lvl, mult in reversed(list(enumerate(cfg.channel_mults))):
            for _ in range(cfg.num_res_blocks + 1):
                self.up.append(self._block(cur + skips.pop(), ch * mult, emb, lvl))
                cur = ch * mult
            if lvl > 0:
                self.up.append(Upsample(cur))

        self.norm_out = group_norm(cur)
        self.conv_out = nn.Conv2d(cur, cfg.in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def _block(self, cin, cout, emb, lvl):
        res = ResBlock(cin, cout, emb, self.cfg.dropout)
        if lvl in self.cfg.attention_levels:
            return nn.ModuleList([res, Attention(cout, self.cfg.head_dim)])
        return nn.ModuleList([res])

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if x.shape[1] != self.cfg.in_channels:
            raise ConfigError(f"U-Net expects {self.cfg.in_channels} input channels, got {x.shape[1]}")
        emb = self.time_mlp(timestep_embedding(t, self.cfg.base_channels))
        if self.label_emb is not None:
            if labels is None:  # unconditional request on a conditional model: the null label
                labels = torch.full((x.shape[0],), self.cfg.num_classes, dtype=torch.long, device=x.device)
            emb = emb + self.label_emb(labels)
        hs = run_down(self.down, self.conv_in(x), emb)
        h = hs[-1]
        h = self.mid[2](self.mid[1](self.mid[0](h, emb)), emb)
        for m in self.up:
            if isinstance(m, Upsample):
                h = m(h, size=hs[-1].shape[-2:])  # match the skip exactly (odd sizes)
            else:
                h = _run_block(m, torch.cat([h, hs.pop()], dim=1), emb)
        return self.conv_out(F.silu(self.norm_out(h)))
