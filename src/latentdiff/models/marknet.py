"""The networks of the decoder mark: an embedder that adds a message-dependent residual to a decoded image, and
an extractor that reads the message back from a (possibly re-saved, rescaled or noisy) image.

The second watermark layer (``pipeline/decoder_mark.py``) in the spirit of Stable Signature (Fernandez et al.,
ICCV 2023) and HiDDeN (Zhu et al., ECCV 2018): the mark is added where the latent is decoded, so it reaches the
image without passing through the encoder and the DDIM inversion that limit the noise mark. Unlike Stable
Signature the message is an *input* of the embedder, so one trained pair serves every installation's key: no
fine-tuning per key. Both nets are tied to one image size (``size``, ``channels``); their weights ship in
``assets/`` and are trained by ``training/marknet.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MARKNET_ARCH_VERSION = 3  # bump when a layer below changes; the assets' headers record it
# Version 1 had no zero-mean option, version 2 no odd option; their nets load with those options off and behave as
# before.
LOADABLE_VERSIONS = (1, 2, 3)


def _conv(c_in: int, c_out: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), nn.SiLU()]


class MarkEmbedder(nn.Module):
    """(image in [-1, 1], N×C×H×W; message bits in {0, 1}, N×bits) -> the residual to add (N×C×H×W).

    The net works at half resolution (2×2 average) and its residual is upsampled bilinearly: a smooth residual
    survives a 0.5× rescale and JPEG, and it costs a quarter of the compute. The message enters twice: broadcast
    to every pixel (as in HiDDeN) and as a learned spatial field, which lets the net place each bit.

    With ``zero_mean`` each channel of the residual has its spatial mean subtracted, so the mark cannot shift an
    image's average colour. Without it, the emoji nets of version 1 tinted every image (−2.2 levels of green on
    average), and that tint alone cost more FD than the rest of the residual (docs/responsible-generation.md).

    With ``odd`` the residual is r(x, s) − r(x, −s) for the message signs s, so it changes sign with every bit
    and has no part that all messages share. Without it, the emoji nets of version 2 spent 42 % of the
    residual's power on such a shared pattern. It carries no bit, and alone it cost more FD than the whole mark
    (docs/responsible-generation.md)."""

    def __init__(self, channels: int, size: int, bits: int, width: int = 32, field: int = 8,
                 zero_mean: bool = False, odd: bool = False):
        super().__init__()
        self.size, self.bits, self.field_channels = size, bits, field
        self.zero_mean, self.odd = zero_mean, odd
        self.half = (size + 1) // 2
        self.field = nn.Linear(bits, field * self.half * self.half)
        self.features = nn.Sequential(*_conv(channels, width), *_conv(width, width))
        self.mix = nn.Sequential(*_conv(width + bits + field + channels, width), *_conv(width, width),
                                 nn.Conv2d(width, channels, 3, padding=1))

    def _residual(self, feats: torch.Tensor, small: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
        n = len(small)
        field = self.field(signs).view(n, self.field_channels, self.half, self.half)
        broadcast = signs[:, :, None, None].expand(n, self.bits, self.half, self.half)
        return self.mix(torch.cat([feats, broadcast, field, small], 1))

    def forward(self, x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        small = F.adaptive_avg_pool2d(x, (self.half, self.half))
        feats = self.features(small)  # once, also for both signs of `odd`
        signs = bits.float() * 2 - 1
        if self.odd:
            both = self._residual(feats.repeat(2, 1, 1, 1), small.repeat(2, 1, 1, 1), torch.cat([signs, -signs]))
            residual = both[:n] - both[n:]
        else:
            residual = self._residual(feats, small, signs)
        residual = F.interpolate(residual, size=(h, w), mode="bilinear", align_corners=False)
        return residual - residual.mean((2, 3), keepdim=True) if self.zero_mean else residual


class MarkExtractor(nn.Module):
    """Image in [-1, 1] (N×C×H×W) -> one logit per message bit (N×bits): positive reads as 1."""

    def __init__(self, channels: int, size: int, bits: int, width: int = 32):
        super().__init__()
        self.size, self.bits = size, bits
        quarter = (size + 3) // 4
        self.net = nn.Sequential(*_conv(channels, width, 2), *_conv(width, 2 * width), *_conv(2 * width, 2 * width, 2),
                                 *_conv(2 * width, 2 * width), nn.Conv2d(2 * width, width, 1), nn.SiLU(),
                                 nn.Flatten(), nn.Linear(width * quarter * quarter, bits))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
