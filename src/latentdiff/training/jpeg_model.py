"""A differentiable model of baseline JPEG (ITU-T T.81 with the IJG/libjpeg defaults that Pillow uses), for the
*backward* pass of the decoder-mark training's JPEG attack.

The forward pass of that attack stays the real encoder (Pillow); this model only supplies the gradient, through
``straight_through(model(x), real(x))``. Without it the gradient of JPEG was the identity, which tells the
embedder nothing about which parts of its residual JPEG erases; with it, a DCT coefficient that quantises to zero
passes almost no gradient (the cubic rounding below), and the chroma planes pass theirs at half resolution.

Steps, as libjpeg does them: edge-replicate to whole MCUs; RGB → YCbCr (JFIF); chroma 2×2 averaged (4:2:0, Pillow's
default); 8×8 orthonormal DCT of each plane less 128; divide by the quality-scaled Annex K table; round; multiply;
inverse DCT; chroma upsampled with the triangle filter (libjpeg's "fancy" upsampling, which is bilinear ×2 with
half-pixel centres); back to RGB; crop. Rounding uses round(u) + (u − round(u))³ (Shin & Song 2017), whose value is
within 1/8 of round(u) and whose gradient 3(u − round(u))² vanishes on coefficients that quantise exactly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# ITU-T T.81 Annex K, tables K.1 (luminance) and K.2 (chrominance), in natural (row-major) order.
LUMA_TABLE = (16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
              14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
              49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99)
CHROMA_TABLE = (17, 18, 24, 47, 99, 99, 99, 99, 18, 21, 26, 66, 99, 99, 99, 99, 24, 26, 56, 99, 99, 99, 99, 99,
                47, 66, 99, 99, 99, 99, 99, 99, *(99,) * 32)

_TO_YCBCR = ((0.299, 0.587, 0.114), (-0.168736, -0.331264, 0.5), (0.5, -0.418688, -0.081312))
_TO_RGB = ((1.0, 0.0, 1.402), (1.0, -0.344136, -0.714136), (1.0, 1.772, 0.0))


def quant_table(base: tuple[int, ...], quality: int) -> torch.Tensor:
    """The 8×8 table libjpeg uses at `quality` (jpeg_quality_scaling, clamped to 1..255 for baseline)."""
    if not 1 <= quality <= 100:
        raise ValueError(f"JPEG quality must be in 1..100, got {quality}")
    scale = 5000 // quality if quality < 50 else 200 - 2 * quality
    return torch.tensor([min(255, max(1, (b * scale + 50) // 100)) for b in base], dtype=torch.float32).view(8, 8)


def dct_matrix() -> torch.Tensor:
    """The orthonormal 8-point DCT-II matrix D (coefficients = D · block · Dᵀ)."""
    k, n = torch.arange(8.0)[:, None], torch.arange(8.0)[None, :]
    d = torch.cos(math.pi * (2 * n + 1) * k / 16) * math.sqrt(2 / 8)
    d[0] /= math.sqrt(2)
    return d


def soft_round(u: torch.Tensor) -> torch.Tensor:
    """round(u) + (u − round(u))³: close to rounding, with a gradient that is 0 at integers."""
    r = torch.round(u).detach()
    return r + (u - r) ** 3


def _quantise_plane(p: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """One plane (N×H×W, level-shifted, H and W multiples of 8) through DCT, quantisation and inverse DCT."""
    n, h, w = p.shape
    d = dct_matrix().to(p)
    blocks = p.reshape(n, h // 8, 8, w // 8, 8).transpose(2, 3)  # N×(H/8)×(W/8)×8×8
    q = table.to(p)
    coef = soft_round(d @ blocks @ d.T / q) * q
    return (d.T @ coef @ d).transpose(2, 3).reshape(n, h, w)


def jpeg_model(x: torch.Tensor, quality: int) -> torch.Tensor:
    """The differentiable JPEG round trip of N×C×H×W images in [0, 255] (C = 1 grey, 3 RGB); same range out,
    unrounded and unclamped (the caller's quantisation does that)."""
    n, c, h, w = x.shape
    if c not in (1, 3):
        raise ValueError(f"JPEG model takes 1 or 3 channels, got {c}")
    mcu = 8 if c == 1 else 16  # 4:2:0 chroma needs 16×16 luma per MCU
    x = F.pad(x, (0, -w % mcu, 0, -h % mcu), mode="replicate")
    if c == 1:
        return (_quantise_plane(x[:, 0] - 128, quant_table(LUMA_TABLE, quality)) + 128)[:, None, :h, :w]
    ycc = torch.einsum("ij,njhw->nihw", torch.tensor(_TO_YCBCR).to(x), x)
    y = _quantise_plane(ycc[:, 0] - 128, quant_table(LUMA_TABLE, quality)) + 128  # Cb, Cr are already centred
    chroma = _quantise_plane(F.avg_pool2d(ycc[:, 1:], 2).flatten(0, 1), quant_table(CHROMA_TABLE, quality))
    chroma = F.interpolate(chroma.view(n, 2, *chroma.shape[1:]), scale_factor=2, mode="bilinear",
                           align_corners=False)
    rgb = torch.einsum("ij,njhw->nihw", torch.tensor(_TO_RGB).to(x), torch.cat([y[:, None], chroma], 1))
    return rgb[:, :, :h, :w]
