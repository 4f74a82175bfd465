"""The second watermark layer: a keyed message added where latents are decoded, read back by a trained extractor.

The noise mark (``watermark.py``) must survive the decoder, the encoder and a DDIM inversion before it is
read, and at our image sizes that chain loses much of it (docs/responsible-generation.md). This layer avoids
the chain: the embedder (``models/marknet.py``) adds a small residual to every decoded image that carries a
64-bit message, and the extractor reads the bits from the image alone. It is applied to every image that
``LatentDiffusion.decode`` makes with a key, so it also marks what the noise mark cannot: inpainting, repair and
interpolation between images.

Message: m = the first 64 bits of HMAC-SHA256(secret, "latentdiff-decoder-mark"), so one trained pair of nets
serves every key, and the secret is never in an image. The extractor gives logits l; with s_i = 2·m_i − 1
the score is T = Σ s_i·tanh(l_i) / √64. For an image made without this key, m is a uniformly random bit string
independent of the image, so T is a Rademacher sum whose weights have norm ≤ 1 and the same tail bound as the
noise mark holds: P(T ≥ t) ≤ min(exp(-t²/2), (2e³/9)·Φ̄(t)) (``watermark.p_value`` with one pattern). Training
pulls tanh(l) towards 0 on unmarked images, so their score sits near 0 whatever the key.

Unlike the secret of the noise mark, the message can be read from one marked image by anyone who has the
shipped extractor; what it reveals is a hash of the secret (like the key fingerprint in every record), and it
lets such a person put the same mark on other images. The C2PA signature is the layer that cannot be forged.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import math
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from latentdiff.errors import ModelError
from latentdiff.models.marknet import LOADABLE_VERSIONS, MARKNET_ARCH_VERSION, MarkEmbedder, MarkExtractor
from latentdiff.pipeline.watermark import WatermarkKey, p_value
from latentdiff.utils.images import to_tensor
from latentdiff.utils.state import load_into, load_state, save_state

MARK_BITS = 64


def asset_name(size: int, channels: int) -> str:
    return f"marknet_{size}x{size}x{channels}.safetensors"


def asset_path(size: int, channels: int) -> Path:
    """Where the shipped nets for `size`×`size`×`channels` images live (in the source tree or the installed package)."""
    return Path(str(resources.files("latentdiff") / "assets" / asset_name(size, channels)))


def has_marknet(size: int, channels: int) -> bool:
    """Whether nets ship for this image size: other sizes (a user's own model) get the noise mark only."""
    return asset_path(size, channels).is_file()


@functools.lru_cache(maxsize=8)
def marknet_id(size: int, channels: int) -> str:
    """The first 16 hex digits of the SHA-256 of the shipped nets' file: which pair marked an image."""
    return hashlib.sha256(asset_path(size, channels).read_bytes()).hexdigest()[:16]


class MarkNets:
    """The embedder and extractor for one image size, in eval mode on the CPU."""

    def __init__(self, embedder: MarkEmbedder, extractor: MarkExtractor, meta: dict):
        self.embedder, self.extractor, self.meta = embedder, extractor, meta


@functools.lru_cache(maxsize=8)
def load_marknet(size: int, channels: int, path: str | Path | None = None) -> MarkNets:
    """The nets for `size`×`size`×`channels` images (the shipped ones, or those in `path`)."""
    path = Path(path) if path is not None else asset_path(size, channels)
    if not path.is_file():
        raise ModelError(f"no decoder-mark networks for {size}×{size}×{channels} images ({path.name} is not shipped)")
    tensors, meta = load_state(path)
    if meta.get("arch_version") not in LOADABLE_VERSIONS:
        raise ModelError(f"{path.name} was made for decoder-mark architecture {meta.get('arch_version')}, this "
                         f"version reads {', '.join(map(str, LOADABLE_VERSIONS))}: "
                         "retrain it with scripts/train_marknet.py")
    bits, width = int(meta["bits"]), int(meta.get("width", 32))
    emb = MarkEmbedder(channels, size, bits, width, zero_mean=bool(meta.get("zero_mean", False)),
                       odd=bool(meta.get("odd", False)))
    ext = MarkExtractor(channels, size, bits, width)
    load_into(emb, {k[9:]: v for k, v in tensors.items() if k.startswith("embedder.")}, path, "the embedder")
    load_into(ext, {k[10:]: v for k, v in tensors.items() if k.startswith("extractor.")}, path, "the extractor")
    return MarkNets(emb.eval(), ext.eval(), meta)


def save_marknet(path: str | Path, embedder: MarkEmbedder, extractor: MarkExtractor, meta: dict,
                 arch_version: int = MARKNET_ARCH_VERSION) -> None:
    """Write a pair of nets as ``load_marknet`` reads them: prefixed tensors, `meta` (at least ``bits``; ``width``,
    ``zero_mean``, ``odd`` and ``restore_mean`` when not the defaults) and the architecture version."""
    tensors = {**{f"embedder.{k}": v for k, v in embedder.state_dict().items()},
               **{f"extractor.{k}": v for k, v in extractor.state_dict().items()}}
    save_state(path, tensors, {"arch_version": arch_version, **meta})


def nets_for(image_shape: tuple[int, int, int]) -> MarkNets | None:
    """The shipped nets for a model's (C, H, W) images, or None where none ship (the noise mark only)."""
    c, h, _ = image_shape
    return load_marknet(h, c) if has_marknet(h, c) else None


def message(key: WatermarkKey, bits: int = MARK_BITS) -> np.ndarray:
    """The key's message: `bits` bits (0/1, uint8) of HMAC-SHA256(secret, "latentdiff-decoder-mark")."""
    digest = hmac.new(key.secret, b"latentdiff-decoder-mark", hashlib.sha256).digest()
    return np.unpackbits(np.frombuffer(digest, dtype=np.uint8))[:bits]


@torch.no_grad()
def embed(nets: MarkNets, x: torch.Tensor, bits: np.ndarray, scale: float | None = None) -> torch.Tensor:
    """Decoded images N×C×H×W in [-1, 1] -> the same images carrying the message `bits` (in [-1, 1]). The residual
    is multiplied by `scale` (default: the nets' ``scale``, chosen after training to trade strength for the
    sample distribution; see docs/responsible-generation.md). Nets whose metadata says ``restore_mean`` then
    have each channel's mean put back after the clip to [-1, 1] (``restore_mean``)."""
    emb = nets.embedder
    scale = float(nets.meta.get("scale", 1.0)) if scale is None else float(scale)
    m = torch.as_tensor(np.asarray(bits), dtype=torch.float32)[None].expand(len(x), -1)
    x32 = x.float().clamp(-1, 1).cpu()
    marked = (x32 + scale * emb(x32, m)).clamp(-1, 1)
    return (restore_mean(x32, marked) if nets.meta.get("restore_mean") else marked).to(x.device, x.dtype)


def restore_mean(x: torch.Tensor, marked: torch.Tensor) -> torch.Tensor:
    """`marked` (N×C×H×W in [-1, 1]) with each channel's mean put back to `x`'s, by an equal shift of the pixels
    that have room for it.

    A zero-mean residual loses its mean where the image clips it: on a white background only its negative half
    is left, so the mark darkens white backgrounds, and with the emoji nets of version 2 that shift alone cost
    more FD than the whole mark (docs/responsible-generation.md). The lost mean is given back to the pixels that
    can move that way and were at least a level from the limit before the mark: raising the darkened pixels of
    a white background would erase the mark there (three passes, as the shift clips too)."""
    level = 1 / 127.5
    for _ in range(3):
        deficit = (x - marked).sum((2, 3), keepdim=True)  # per image and channel, summed over the pixels
        room = torch.where(deficit > 0, (x < 1 - level) & (marked < 1), (x > level - 1) & (marked > -1)).float()
        marked = (marked + room * deficit / room.sum((2, 3), keepdim=True).clamp_min(1)).clamp(-1, 1)
    return marked


def embed_uint8(nets: MarkNets, images: np.ndarray, bits: np.ndarray, scale: float | None = None) -> np.ndarray:
    """uint8 N×H×W×C images -> the same images carrying `bits` (uint8)."""
    out = embed(nets, to_tensor(np.ascontiguousarray(images)), bits, scale)
    return torch.round((out + 1) * 127.5).to(torch.uint8).permute(0, 2, 3, 1).numpy()


@torch.no_grad()
def mark_score(nets: MarkNets, images: np.ndarray, bits: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """T = Σ s_i·tanh(l_i)/√bits for each uint8 N×H×W×C image (float64, N)."""
    s = torch.as_tensor(np.asarray(bits), dtype=torch.float64) * 2 - 1
    out = []
    for start in range(0, len(images), batch_size):
        x = to_tensor(np.ascontiguousarray(images[start:start + batch_size])).float()
        out.append(torch.tanh(nets.extractor(x).double()) @ s / math.sqrt(len(s)))
    return torch.cat(out).numpy() if out else np.zeros(0)


def mark_detection(nets: MarkNets, cells: np.ndarray, key: WatermarkKey) -> dict:
    """The decoder-mark test over the tiles of one image: the best tile, its p-value times the tile count."""
    bits = message(key, int(nets.meta["bits"]))
    t = mark_score(nets, cells, bits)
    j = int(t.argmax())
    return {"score": round(float(t[j]), 3), "bits": len(bits), "p_value": min(1.0, len(cells) * p_value(float(t[j])))}
