"""The denoising U-Net (Ronneberger et al. 2015, as adapted by Ho et al. 2020 and Dhariwal & Nichol 2021).

It maps (x_t, t, labels, context, context_mask) to a tensor shaped like x_t and knows nothing about noise
schedules or parameterisations. Class conditioning adds a learned label embedding to the time embedding; the
extra index ``num_classes`` is the "null" label used for classifier-free guidance. Text conditioning is
cross-attention (Rombach et al. 2022, §3.3) from the feature maps of chosen levels (and the middle) to a token
context: frozen encoder states (B, L, context_dim), or byte token ids (B, L) embedded by the U-Net's own small
trainable :class:`~latentdiff.models.text.TokenEncoder` when ``token_layers`` > 0.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from latentdiff.errors import ConfigError
from latentdiff.models.text import TokenEncoder
from latentdiff.nn.layers import Attention, CrossAttention, Downsample, ResBlock, Upsample, group_norm, time_mlp, timestep_embedding


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
    context_dim: int = 0           # width of the text context's tokens; 0: no text conditioning
    cross_attention_levels: tuple[int, ...] = ()  # levels with cross-attention to the text (the middle always has it)
    token_layers: int = 0          # > 0: the context is byte token ids, embedded by a trainable encoder of this
                                   # many transformer layers of width context_dim inside the U-Net; 0: given states
    embedding: str = "add"         # how ResBlocks take the time/label embedding: "add" before the GroupNorm, or
                                   # "scale-shift" (adaptive GroupNorm), which narrow levels need (see ResBlock)

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
        if not 0 <= self.context_dim <= 4096 or not 0 <= self.token_layers <= 12:
            raise ConfigError("unet: context_dim must be in 0…4096 and token_layers in 0…12")
        if any(not 0 <= a < len(self.channel_mults) for a in self.cross_attention_levels):
            raise ConfigError(f"unet.cross_attention_levels must index levels 0…{len(self.channel_mults) - 1}")
        if self.embedding not in ("add", "scale-shift"):
            raise ConfigError(f"unet.embedding must be 'add' or 'scale-shift', got {self.embedding!r}")
        if self.token_layers and self.context_dim % 32:
            raise ConfigError("unet.context_dim must be a multiple of 32 with a built-in token encoder")


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


def run_down(down: nn.ModuleList, h: torch.Tensor, emb: torch.Tensor, ctx=None) -> list[torch.Tensor]:
    """The input and the output of every module of a :func:`down_path`, in order; `ctx` = (context, mask)."""
    hs = [h]
    for m in down:
        h = m(h) if isinstance(m, Downsample) else _run_block(m, h, emb, ctx)
        hs.append(h)
    return hs


def _run_block(block: nn.ModuleList, h: torch.Tensor, emb: torch.Tensor, ctx=None) -> torch.Tensor:
    h = block[0](h, emb)
    for m in block[1:]:  # self-attention, then cross-attention to the text
        h = m(h, *ctx) if isinstance(m, CrossAttention) else m(h)
    return h


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

        self.mid = nn.ModuleList([self._res(cur, cur, emb), Attention(cur, cfg.head_dim), self._res(cur, cur, emb)])
        # Separate attributes (not list entries), so that class-only models keep their state-dict keys.
        self.mid_cross = CrossAttention(cur, cfg.context_dim, cfg.head_dim) if cfg.context_dim else None
        self.token_encoder = TokenEncoder(cfg.context_dim, cfg.token_layers) if cfg.token_layers else None

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

    def _res(self, cin, cout, emb):
        return ResBlock(cin, cout, emb, self.cfg.dropout, scale_shift=self.cfg.embedding == "scale-shift")

    def _block(self, cin, cout, emb, lvl):
        cfg = self.cfg
        mods = [self._res(cin, cout, emb)]
        if lvl in cfg.attention_levels:
            mods.append(Attention(cout, cfg.head_dim))
        if cfg.context_dim and lvl in cfg.cross_attention_levels:
            mods.append(CrossAttention(cout, cfg.context_dim, cfg.head_dim))
        return nn.ModuleList(mods)

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None,
                context: torch.Tensor | None = None, context_mask: torch.Tensor | None = None) -> torch.Tensor:
        if x.shape[1] != self.cfg.in_channels:
            raise ConfigError(f"U-Net expects {self.cfg.in_channels} input channels, got {x.shape[1]}")
        emb = self.time_mlp(timestep_embedding(t, self.cfg.base_channels))
        if self.label_emb is not None:
            if labels is None:  # unconditional request on a conditional model: the null label
                labels = torch.full((x.shape[0],), self.cfg.num_classes, dtype=torch.long, device=x.device)
            emb = emb + self.label_emb(labels)
        ctx = self._context(context, context_mask, x)
        hs = run_down(self.down, self.conv_in(x), emb, ctx)
        h = self.mid[1](self.mid[0](hs[-1], emb))
        if self.mid_cross is not None:
            h = self.mid_cross(h, *ctx)
        h = self.mid[2](h, emb)
        for m in self.up:
            if isinstance(m, Upsample):
                h = m(h, size=hs[-1].shape[-2:])  # match the skip exactly (odd sizes)
            else:
                h = _run_block(m, torch.cat([h, hs.pop()], dim=1), emb, ctx)
        return self.conv_out(F.silu(self.norm_out(h)))

    def _context(self, context, mask, x):
        """(context states (B, L, D), mask (B, L) bool) for the cross-attention blocks, or None without text."""
        if self.mid_cross is None:
            if context is not None:
                raise ConfigError("this model takes no text (it was trained without a text encoder)")
            return None
        if context is None:
            raise ConfigError("this text-conditioned U-Net needs a text context (the empty prompt's for none)")
        if mask is None:
            mask = torch.ones(context.shape[:2], dtype=torch.bool, device=x.device)
        if self.token_encoder is not None:
            context = self.token_encoder(context, mask)
        return context.to(x.dtype) if context.is_floating_point() else context, mask
